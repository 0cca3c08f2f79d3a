"""The `scoreprior` command: train a prior, score images with it, run the demo.

    scoreprior train --data gaussian-field --out prior.pt
    scoreprior logprob prior.pt images.npy --out logp.csv
    scoreprior demo --out scoreprior-demo

A thin layer over `scoreprior.training`, `scoreprior.density` and `scoreprior.data`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from scoreprior.data import DATASETS, builtin_dataset, gaussian_field, load_images
from scoreprior.density import ScorePrior, bits_per_dim
from scoreprior.nets import UNet
from scoreprior.scores import GaussianScore
from scoreprior.sde import VESDE, SubVPSDE, VPSDE
from scoreprior.training import TrainConfig, load_prior, train_score_model

__all__ = ["main"]

_SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}

BPD_NOTE = (
    "bits/dim assumes 8-bit images scaled to [0, 1] and dequantized uniformly; "
    "for other data only log_prob (nats) is meaningful"
)


def _channels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 32,64, got {text!r}") from None


def _training_data(args: argparse.Namespace) -> tuple[Tensor, str]:
    """The training images and a provenance string."""
    if args.data in DATASETS:
        generator = torch.Generator().manual_seed(args.seed)
        data = builtin_dataset(args.data, args.n, size=args.size, generator=generator)
        return data, f"builtin:{args.data} n={args.n} size={args.size} seed={args.seed}"
    path = Path(args.data)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: neither a file nor a built-in dataset {list(DATASETS)}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return load_images(path), f"file:{path.resolve()} sha256={digest}"


def _train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.resume:
        raise ValueError(f"--out {out}: exists; pass --resume to continue training it, or remove it")
    data, provenance = _training_data(args)
    torch.manual_seed(args.seed)
    net = UNet(data.shape[1], channels=args.channels)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                         seed=args.seed, checkpoint_every=args.checkpoint_every)
    print(f"training a U-Net {list(args.channels)} on {tuple(data.shape)} images ({provenance}), "
          f"{args.sde} SDE, {args.steps} steps")
    result = train_score_model(net, _SDES[args.sde](), data, config, checkpoint=out, resume=args.resume,
                               device=args.device, provenance=provenance)
    print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}, {result.wall_time:.1f} s")
    print(f"wrote checkpoint {out}")
    return 0


def _log_probs(
    prior: ScorePrior,
    images: Tensor,
    *,
    batch_size: int,
    desc: str,
    generator: torch.Generator | None = None,
    **options,
) -> tuple[Tensor, list[int]]:
    """log p of every image in batches under a progress bar; returns (N,) nats and the NFE per batch."""
    values, nfes = [], []
    for start in tqdm(range(0, images.shape[0], batch_size), desc=desc, dynamic_ncols=True):
        logp, stats = prior.log_prob(images[start:start + batch_size], generator=generator,
                                     return_stats=True, **options)
        values.append(logp.detach())
        nfes.append(stats["nfe"])
    return torch.cat(values), nfes


def _write_table(path: Path, rows: list[dict], meta: dict) -> None:
    """Rows as CSV (by suffix .csv) or as JSON {**meta, "images": rows}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text(json.dumps({**meta, "images": rows}, indent=2))


def _logprob(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix not in (".csv", ".json"):
        raise ValueError(f"--out {out}: expected a .csv or .json file name")
    prior = load_prior(args.checkpoint, t0=args.t0, device=args.device, use_ema=not args.no_ema)
    images = load_images(args.images).to(args.device)
    if images.shape[1:] != prior.event_shape:
        raise ValueError(f"{args.images}: expected images of shape (N, {', '.join(map(str, prior.event_shape))}) "
                         f"for checkpoint {args.checkpoint}, got {tuple(images.shape)}")
    options = dict(divergence=args.divergence, n_probes=args.n_probes, rtol=args.rtol, atol=args.atol)
    generator = torch.Generator(device=images.device).manual_seed(args.seed)
    logp, nfes = _log_probs(prior, images, batch_size=args.batch_size, desc="log p", generator=generator,
                            **options)
    bpd = bits_per_dim(logp, images[0].numel())
    rows = [{"index": i, "log_prob_nats": lp, "bits_per_dim": b}
            for i, (lp, b) in enumerate(zip(logp.tolist(), bpd.tolist()))]
    meta = {"checkpoint": str(args.checkpoint), "images_file": str(args.images), "t0": args.t0,
            **options, "nfe_per_batch": nfes, "note": BPD_NOTE}
    _write_table(out, rows, meta)
    print(f"{len(rows)} images: mean log p {logp.mean().item():.2f} nats, "
          f"mean {bpd.mean().item():.3f} bits/dim ({BPD_NOTE})")
    print(f"wrote {out}")
    return 0


def _pearson(a: Tensor, b: Tensor) -> float:
    return float(np.corrcoef(a.double().numpy(), b.double().numpy())[0, 1])


def _checkerboard(size: int, amplitude: float = 0.2) -> Tensor:
    """(1, 1, size, size) checkerboard 0.5 +- amplitude."""
    idx = torch.arange(size)
    board = 0.5 + amplitude * (1 - 2 * ((idx[:, None] + idx[None, :]) % 2))
    return board.float().reshape(1, 1, size, size)


def _demo_images(
    n_train: int, n_held: int, n_shuffled: int, size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, list[str]]:
    """Training fields, and test images: held-out fields, pixel-shuffled fields, a checkerboard."""
    images = builtin_dataset("gaussian-field", n_train + n_held, size=size, generator=generator)
    data, held = images[:n_train], images[n_train:]
    shuffled = [held[i].reshape(-1)[torch.randperm(size * size, generator=generator)].reshape(held[i].shape)
                for i in range(n_shuffled)]
    test = torch.cat([held, torch.stack(shuffled), _checkerboard(size)])
    kinds = ["held-out"] * n_held + ["shuffled"] * n_shuffled + ["checkerboard"]
    return data, test, kinds


def _print_demo_table(rows: list[dict]) -> None:
    print(f"{'#':>3} {'image':<13} {'true':>9} {'exact':>9} {'hutchinson':>11} {'exact-true':>11}")
    for row in rows:
        missing = row["exact"] is None
        exact = f"{'-':>9}" if missing else f"{row['exact']:>9.2f}"
        diff = f"{'-':>11}" if missing else f"{row['exact'] - row['true']:>11.2f}"
        print(f"{row['index']:>3} {row['kind']:<13} {row['true']:>9.2f} {exact} {row['hutchinson']:>11.2f} {diff}")


def _demo(args: argparse.Namespace) -> int:
    # Sizes tuned so that the full demo takes about two minutes on two CPU cores and --quick well
    # under 30 s. The exact divergence costs d = H W backward passes per ODE step and image, so it
    # runs on a subset (the first held-out images, one shuffled image, the checkerboard); Hutchinson
    # runs on every image.
    quick = args.quick
    size = 8 if quick else 16
    steps = args.steps if args.steps is not None else (200 if quick else 1200)
    n_train, n_held, n_shuffled = 2048, (6 if quick else 12), (1 if quick else 2)
    n_exact_held = n_held if quick else 2
    t0, sde, tol, n_probes = 1e-3, VPSDE(), dict(rtol=1e-3, atol=1e-3), 16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    data, test, kinds = _demo_images(n_train, n_held, n_shuffled, size, torch.Generator().manual_seed(args.seed))
    held_idx = list(range(n_held))
    exact_idx = list(range(n_exact_held)) + [n_held, len(kinds) - 1]

    torch.manual_seed(args.seed)
    # A low Fourier scale keeps the network smooth in t, so the ODE solver needs about half the steps.
    net = UNet(1, channels=(16, 32), fourier_scale=1.0)
    checkpoint = out / "prior.pt"
    config = TrainConfig(steps=steps, batch_size=32, lr=2e-3, warmup=50, ema_decay=0.995, seed=args.seed)
    print(f"demo: training a U-Net prior on {n_train} gaussian-field {size}x{size} images, VP SDE, {steps} steps")
    result = train_score_model(net, sde, data, config, checkpoint=checkpoint, resume=False,
                               provenance=f"builtin:gaussian-field n={n_train} size={size} seed={args.seed}")
    seconds = {"training": time.perf_counter() - start}

    prior = load_prior(checkpoint, t0=t0)
    true = GaussianScore(*gaussian_field(size, size), sde).log_prob_t(test.double(), t0).float()
    tick = time.perf_counter()
    hutchinson, nfe_hutchinson = _log_probs(prior, test, batch_size=len(test), desc="log p (hutchinson)",
                                            generator=torch.Generator().manual_seed(args.seed),
                                            divergence="hutchinson", n_probes=n_probes, **tol)
    seconds["hutchinson"], tick = time.perf_counter() - tick, time.perf_counter()
    exact, nfe_exact = _log_probs(prior, test[exact_idx], batch_size=1, desc="log p (exact)",
                                  divergence="exact", **tol)
    seconds["exact"] = time.perf_counter() - tick

    exact_held = [j for j, i in enumerate(exact_idx) if i < n_held]
    subsets = {
        "hutchinson, all images": (hutchinson, true),
        "hutchinson, held-out": (hutchinson[held_idx], true[held_idx]),
        "exact, all images": (exact, true[exact_idx]),
        "exact, held-out": (exact[exact_held], true[exact_idx][exact_held]),
    }
    correlations = {name: {"pearson": _pearson(a, b), "n": len(a)} for name, (a, b) in subsets.items() if len(a) > 3}
    exact_of = dict(zip(exact_idx, exact.tolist()))
    rows = [{"index": i, "kind": kind, "true": true[i].item(), "hutchinson": hutchinson[i].item(),
             "exact": exact_of.get(i)} for i, kind in enumerate(kinds)]
    lowest_held, highest_ood = hutchinson[held_idx].min().item(), hutchinson[n_held:].max().item()

    print(f"\nlog p_t0(x) in nats, t0 = {t0}, {size}x{size} images: the trained network (probability-flow ODE, "
          f"exact divergence and Hutchinson with {n_probes} probes) vs the closed form")
    _print_demo_table(rows)
    print("Pearson correlation with the true log p: "
          + "; ".join(f"{name} ({c['n']}) {c['pearson']:.3f}" for name, c in correlations.items()))
    print(f"lowest held-out log p {lowest_held:.2f}, highest out-of-distribution {highest_ood:.2f} (hutchinson): "
          + ("every out-of-distribution image ranks below every held-out one" if highest_ood < lowest_held
             else "the rankings overlap"))
    seconds["total"] = time.perf_counter() - start
    print(f"time: training {seconds['training']:.1f} s, log p hutchinson {seconds['hutchinson']:.1f} s "
          f"({len(test)} images), exact {seconds['exact']:.1f} s ({len(exact_idx)} images), "
          f"total {seconds['total']:.1f} s")

    metrics = {
        "config": {"size": size, "sde": sde.config(), "t0": t0, "steps": steps, "n_train": n_train,
                   "n_probes": n_probes, "seed": args.seed, "quick": quick, "net": net.config(), **tol},
        "final_loss": result.final_loss,
        "seconds": seconds,
        "nfe": {"hutchinson": nfe_hutchinson, "exact": nfe_exact},
        "correlation": correlations,
        "lowest_held_out_log_prob": lowest_held,
        "highest_out_of_distribution_log_prob": highest_ood,
        "images": rows,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"wrote {out / 'metrics.json'} and the checkpoint {checkpoint}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scoreprior", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    defaults = argparse.ArgumentDefaultsHelpFormatter
    train = sub.add_parser("train", help="train a U-Net score prior by denoising score matching",
                           formatter_class=defaults)
    train.add_argument("--data", required=True,
                       help=f"images (.npy/.npz, (N, H, W) or (N, C, H, W)) or a built-in dataset {list(DATASETS)}")
    train.add_argument("--out", required=True, help="checkpoint file to write")
    train.add_argument("--sde", choices=sorted(_SDES), default="vp", help="forward SDE")
    train.add_argument("--steps", type=int, default=2000, help="total optimiser steps")
    train.add_argument("--batch-size", type=int, default=64, help="images per step")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    train.add_argument("--warmup", type=int, default=100, help="steps of linear learning-rate warm-up")
    train.add_argument("--seed", type=int, default=0, help="seeds the network, the batches and the noise")
    train.add_argument("--channels", type=_channels, default=(32, 64), help="U-Net channels per level")
    train.add_argument("--size", type=int, default=16, help="image size of a built-in dataset")
    train.add_argument("--n", type=int, default=2048, help="number of images of a built-in dataset")
    train.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    train.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    train.add_argument("--device", default="cpu", help="torch device to train on")
    train.set_defaults(run=_train)

    logprob = sub.add_parser("logprob", help="log-density of images under a trained prior",
                             description=f"Per-image log p (nats) and bits/dim; {BPD_NOTE}.",
                             formatter_class=defaults)
    logprob.add_argument("checkpoint", help="checkpoint written by `scoreprior train`")
    logprob.add_argument("images", help=".npy/.npz images shaped like the training data")
    logprob.add_argument("--out", required=True, help="results file, .csv or .json")
    logprob.add_argument("--divergence", choices=("exact", "hutchinson"), default="exact",
                         help="exact Jacobian trace (H W backward passes per step) or Hutchinson's estimate")
    logprob.add_argument("--n-probes", type=int, default=1, help="Hutchinson probes per image")
    logprob.add_argument("--rtol", type=float, default=1e-5, help="ODE solver relative tolerance")
    logprob.add_argument("--atol", type=float, default=1e-5, help="ODE solver absolute tolerance")
    logprob.add_argument("--t0", type=float, default=1e-5, help="smallest time; log p is that of p_t0")
    logprob.add_argument("--batch-size", type=int, default=16, help="images per ODE solve")
    logprob.add_argument("--seed", type=int, default=0, help="seed of the Hutchinson probes")
    logprob.add_argument("--no-ema", action="store_true", help="use the raw instead of the EMA weights")
    logprob.add_argument("--device", default="cpu", help="torch device to run on")
    logprob.set_defaults(run=_logprob)

    demo = sub.add_parser("demo", help="train a small prior on Gaussian fields and check its log p "
                                       "against the closed form",
                          description="Train a small U-Net prior on gaussian-field images (VP SDE), compute "
                                      "log p of held-out and out-of-distribution images by the probability-flow "
                                      "ODE, and compare with the closed-form log p. About two minutes on two "
                                      "CPU cores.",
                          formatter_class=defaults)
    demo.add_argument("--out", default="scoreprior-demo", help="output folder")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default 1200, --quick 200)")
    demo.add_argument("--quick", action="store_true", help="a short run on 8x8 images, well under 30 s")
    demo.add_argument("--seed", type=int, default=0, help="seeds data, network and training")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `scoreprior` command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"scoreprior {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
