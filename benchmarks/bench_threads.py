"""Wall time of a short DPI fit alone and beside a busy PyTorch process, by thread count and wait policy.

The workload is `scoreprior demo`'s fit (`scoreprior.demo.fit_posterior`: the blackhole-32 surrogate prior,
an EHT 2017 observation, a Gaussian reference) for `--steps` steps. Each configuration runs in a fresh
process, because OpenMP reads OMP_NUM_THREADS and OMP_WAIT_POLICY once, when torch loads it:
threads 1, 2 and the default (OMP_NUM_THREADS unset: one per core), wait policy ACTIVE (threads spin
while waiting: libgomp's behaviour before scoreprior set PASSIVE), PASSIVE (they sleep: what
`import scoreprior` now sets) and UNSET (no variable, and the timed process imports torch before scoreprior,
as most scripts do: the runtime's default, which scoreprior can only warn about). "Busy" runs it beside a competing process this script starts: a loop of
small matrix products with torch's defaults, like another PyTorch job on the machine; it is stopped
after each measurement. Only the fit is timed (its Gaussian reference included; not the imports).

    python benchmarks/bench_threads.py [--steps 20] [--json PATH]
    python benchmarks/bench_threads.py --quick          # 2 steps, a tiny fit: checks that it runs
    python benchmarks/bench_threads.py --configs 1:PASSIVE,default:ACTIVE   # a subset of the table

Run it on an otherwise idle machine: the "alone" column assumes nothing else is running.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

THREADS = ("1", "2", "default")
POLICIES = ("ACTIVE", "PASSIVE", "UNSET")
_COMPETITOR = """
import torch
a = torch.randn({size}, {size})
while True:
    for _ in range(100):
        a = torch.tanh(a @ a / {size} ** 0.5)
"""


def _child(steps: int, quick: bool) -> None:
    """Time the fit in this process and print one JSON line (torch is imported here, after the env is set, and
    before scoreprior: the UNSET policy is the `import torch` first case)."""
    import torch

    from scoreprior.data import BLACKHOLE_FOV_UAS, blackhole_images
    from scoreprior.demo import DemoConfig, fit_posterior, simulate_observation
    from scoreprior.pretrained import pretrained

    config = DemoConfig.quick() if quick else DemoConfig()
    config.steps = steps
    prior = pretrained(config.prior, t0=config.t0)
    truth = blackhole_images(1, prior.event_shape[-1], generator=torch.Generator().manual_seed(10_000))
    likelihood, _ = simulate_observation(truth, fov_uas=BLACKHOLE_FOV_UAS, seed=0, tint=config.tint)
    start = time.perf_counter()
    fit_posterior(prior, likelihood, config, seed=0, progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads(),
                      "policy": os.environ.get("OMP_WAIT_POLICY")}))


def _environment(threads: str, policy: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    if threads != "default":
        env["OMP_NUM_THREADS"] = threads
    if policy != "UNSET":
        env["OMP_WAIT_POLICY"] = policy
    return env


def _measure(threads: str, policy: str, args: argparse.Namespace) -> float | None:
    """Seconds of the fit in a fresh process, or None past --timeout."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--steps", str(args.steps)]
    command += ["--quick"] if args.quick else []
    try:
        run = subprocess.run(command, env=_environment(threads, policy), capture_output=True, text=True,
                             timeout=args.timeout, check=True)
    except subprocess.TimeoutExpired:
        return None
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"the timed process failed:\n{err.stderr[-2000:]}") from None
    return json.loads(run.stdout.strip().splitlines()[-1])["seconds"]


def _busy(args: argparse.Namespace) -> subprocess.Popen:
    """Start the competing PyTorch process (torch's default threads and wait policy) and let it warm up."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    process = subprocess.Popen([sys.executable, "-c", _COMPETITOR.format(size=args.competitor_size)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(args.warmup)
    if process.poll() is not None:
        raise RuntimeError("the competing process exited at once")
    return process


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="DPI steps per measurement (the demo runs 600)")
    parser.add_argument("--quick", action="store_true", help="2 steps of the demo's quick configuration")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a measurement is given up")
    parser.add_argument("--competitor-size", type=int, default=128, help="matrix side of the competing loop")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds the competitor runs before timing")
    parser.add_argument("--configs", default=",".join(f"{t}:{p}" for t in THREADS for p in POLICIES),
                        help="THREADS:POLICY pairs to measure, comma-separated")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick and args.steps == parser.get_default("steps"):
        args.steps = 2
    if args.child:
        _child(args.steps, args.quick)
        return
    configs = [tuple(pair.split(":")) for pair in args.configs.split(",")]
    for pair in configs:
        if len(pair) != 2 or pair[0] not in THREADS or pair[1] not in POLICIES:
            parser.error(f"--configs: expected THREADS:POLICY pairs with THREADS in {THREADS} and POLICY in "
                         f"{POLICIES}, got {':'.join(pair)!r}")

    rows = []
    print(f"DPI fit of `scoreprior demo`{' (quick configuration)' if args.quick else ''}, {args.steps} steps, "
          f"{os.cpu_count()} cores; busy = beside a loop of {args.competitor_size}x{args.competitor_size} "
          "products with torch's defaults")
    print(f"{'threads':>8} {'policy':>8} {'alone s':>9} {'busy s':>9} {'busy/alone':>11}")
    for threads, policy in configs:
        alone = _measure(threads, policy, args)
        competitor = _busy(args)
        try:
            busy = _measure(threads, policy, args)
        finally:
            _stop(competitor)
        ratio = busy / alone if alone and busy else None
        rows.append({"threads": threads, "policy": policy, "steps": args.steps, "alone_s": alone,
                     "busy_s": busy, "busy_over_alone": ratio})
        cells = [format(v, fmt) if v is not None else "timeout"
                 for v, fmt in ((alone, "9.2f"), (busy, "9.2f"), (ratio, "11.2f"))]
        print(f"{threads:>8} {policy:>8} {' '.join(cells)}", flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import write_json

    write_json(args.json, args, rows)


if __name__ == "__main__":
    main()
