"""Throughput of 1 vs N CPU processes (gloo): sharded log-density evaluation and DDP training.

Every configuration runs in freshly spawned processes with `--threads` intra-op threads each, so the
rows differ only in the number of processes; the 1-process rows use no process group at all.
- log p: `map_sharded` over batches of Gaussian-field images, each batch a Hutchinson solve
  (`ScorePrior.log_prob`) of the field score plus an untrained U-Net (`bench_logprob._FieldPlusNet`:
  the NFE of a well-trained prior, the cost of a real network); items = images.
- training: `train_score_model` of a U-Net on Gaussian-field images, `--batch` images per process and
  step (DDP for N > 1, global batch N x batch); items = images seen, N x batch x steps.
Speed-up = items/s over the 1-process items/s; at most N, less by the gather/all-reduce cost and by
whatever else runs on the cores.

    python benchmarks/bench_scale.py [--procs 2] [--images 16] [--steps 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import time

import scoreprior  # noqa: F401  (first: it sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import write_json
from bench_logprob import _FieldPlusNet
from scoreprior import ODEOptions, ScorePrior, TrainConfig, UNet, VPSDE, train_score_model
from scoreprior.data import gaussian_field, sample_gaussian
from scoreprior.distributed import init_from_env, item_seed, map_sharded


def _log_prob_items_per_s(args: argparse.Namespace) -> float:
    score = _FieldPlusNet(args.size)
    prior = ScorePrior(score, score.sde, t0=1e-3)
    images = sample_gaussian(score.field.mean, score.field.cov, args.images, generator=torch.Generator().manual_seed(0))
    starts = range(0, args.images, args.logp_batch)
    options = ODEOptions(divergence="hutchinson", rtol=args.tol, atol=args.tol)

    def one_batch(start: int) -> torch.Tensor:
        probes = torch.Generator().manual_seed(item_seed(0, start))
        return prior.log_prob(images[start:start + args.logp_batch], options, generator=probes)

    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    map_sharded(one_batch, starts)
    return args.images / (time.perf_counter() - start)


def _training_items_per_s(args: argparse.Namespace, world: int) -> float:
    images = sample_gaussian(*gaussian_field(args.size, args.size), 256,
                             generator=torch.Generator().manual_seed(0)).float()
    torch.manual_seed(0)
    net = UNet(1, channels=(16, 32))
    config = TrainConfig(steps=args.steps, batch_size=args.batch, warmup=0, seed=0)
    result = train_score_model(net, VPSDE(), images, config, progress=False)
    return world * args.batch * args.steps / result.wall_time


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world))
    torch.set_num_threads(args.threads)
    with init_from_env("cpu"):
        numbers = {"log p": _log_prob_items_per_s(args), "training": _training_items_per_s(args, world)}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(numbers, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world: int, args: argparse.Namespace) -> dict[str, float]:
    """Items per second of each task with `world` processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, default=2, help="the most processes; rows for 1 and this many")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--size", type=int, default=8, help="image size (size x size)")
    parser.add_argument("--images", type=int, default=16, help="images whose log p is computed")
    parser.add_argument("--logp-batch", type=int, default=2, help="images per ODE solve")
    parser.add_argument("--tol", type=float, default=1e-3, help="ODE rtol = atol")
    parser.add_argument("--steps", type=int, default=20, help="training steps")
    parser.add_argument("--batch", type=int, default=32, help="training images per process and step")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.procs < 2:
        parser.error(f"--procs: expected at least 2, got {args.procs}")

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s) per process, {args.size}x{args.size} images")
    print(f"{'task':>9} {'procs':>6} {'items':>6} {'items/s':>9} {'speed-up':>9}", flush=True)
    rows = []
    base = None
    for world in (1, args.procs):
        numbers = measure(world, args)
        base = base or numbers
        for task, rate in numbers.items():
            items = args.images if task == "log p" else world * args.batch * args.steps
            row = {"task": task, "procs": world, "items": items, "items_per_s": rate,
                   "speedup": rate / base[task]}
            print(f"{task:>9} {world:>6} {items:>6} {rate:>9.1f} {row['speedup']:>9.2f}", flush=True)
            rows.append(row)
    write_json(args.json, args, rows)
    return rows


if __name__ == "__main__":
    main()
