"""Seconds per DPI step against the exact ODE prior on the main job's problem: the Gaussian-base solver against
the adaptive one, and the surrogate the demo's first stage uses.

The workload is `scoreprior demo`'s: the shipped blackhole-32 prior at t0 = 1e-3, an EHT 2017 observation of
the demo's crescent (837 visibilities), a RealNVP of 8 flow steps started at the demo's Gaussian reference
(4000 crescents), batch 16, one Hutchinson probe per evaluation. A step is a `DPI.fit` step: draws, log q,
log p(y | x), log p(x) and the gradient of their sum through all of them. Each configuration runs in a fresh
process (its peak resident memory above the process's start is its own); the first step is a warm-up and
is not timed. The ratio column is each row's time over the adaptive solver's by backpropagation at tolerance
1e-3 (the old default path of `scoreprior posterior --prior exact`, without the adjoint), measured in the
same run.

    python benchmarks/bench_exact_dpi.py [--steps 3] [--json PATH]
    python benchmarks/bench_exact_dpi.py --quick      # one timed step of two rows: checks that it runs
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import resource
import statistics
import time

import scoreprior  # noqa: F401  (first: it sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)
import torch

from common import write_json

ROWS = (
    ("gaussian base, 3 RK4 steps", {"solver": "gaussian", "steps": 3}),
    ("gaussian base, 4 RK4 steps", {"solver": "gaussian", "steps": 4}),
    ("gaussian base, 6 RK4 steps", {"solver": "gaussian", "steps": 6}),
    ("adaptive, backprop, tol 1e-3", {"solver": "adaptive", "rtol": 1e-3, "atol": 1e-3}),
    ("adaptive, adjoint, tol 1e-3", {"solver": "adaptive", "rtol": 1e-3, "atol": 1e-3, "adjoint": True}),
    ("surrogate, 2 time samples", None),
)
BASELINE = "adaptive, backprop, tol 1e-3"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _step_time(label: str, options: dict | None, batch: int, steps: int) -> dict:
    """Median seconds of `steps` DPI steps (after one untimed) for one row, in this (fresh) process."""
    from scoreprior import ODEOptions, SurrogatePrior
    from scoreprior.data import BLACKHOLE_FOV_UAS, blackhole_images
    from scoreprior.demo import DemoConfig, simulate_observation
    from scoreprior.posterior import DPI, FitConfig
    from scoreprior.pretrained import pretrained
    from scoreprior.priors import reference_posterior

    config = DemoConfig()
    prior = pretrained(config.prior, t0=config.t0)
    truth = blackhole_images(1, 32, generator=torch.Generator().manual_seed(10_000))
    likelihood, _ = simulate_observation(truth, fov_uas=BLACKHOLE_FOV_UAS, seed=0)
    images = blackhole_images(config.reference_images, 32, generator=torch.Generator().manual_seed(30_000))
    if options is None:
        log_prior = SurrogatePrior(prior.score, prior.sde, t0=prior.t0, n_time_samples=2, event_shape=(1, 32, 32))
        kwargs = {}
        floor = log_prior.smoothing
    else:
        log_prior, kwargs = prior, {"options": ODEOptions(divergence="hutchinson", n_probes=1, **options)}
        floor = SurrogatePrior(prior.score, prior.sde, t0=prior.t0).smoothing
    dpi = DPI((1, 32, 32), n_flows=config.n_flows, reference=reference_posterior(images, likelihood, floor=floor))
    generator = torch.Generator().manual_seed(0)
    before = _rss_mb()
    times = []
    for k in range(steps + 1):
        start = time.perf_counter()
        dpi.fit(log_prior, likelihood, FitConfig(steps=1, batch_size=batch, warmup=1), prior_kwargs=kwargs,
                generator=generator, progress=False)
        if k:
            times.append(time.perf_counter() - start)
    return {"row": label, "batch": batch, "steps_timed": steps, "s_per_step": statistics.median(times),
            "peak_mb_above_start": _rss_mb() - before}


def _in_fresh_process(fn, *args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, args)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true", help="one timed step, batch 2, two rows")
    args = parser.parse_args(argv)
    rows = ROWS
    if args.quick:
        args.steps, args.batch = 1, 2
        rows = tuple(r for r in ROWS if r[0] in ("gaussian base, 3 RK4 steps", BASELINE))
    results = [_in_fresh_process(_step_time, label, options, args.batch, args.steps) for label, options in rows]
    baseline = next(r["s_per_step"] for r in results if r["row"] == BASELINE)
    print(f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; demo problem, "
          f"batch {args.batch}, median of {args.steps} steps")
    print(f"{'row':<30} {'s/step':>8} {'vs adaptive':>12} {'peak MB':>8}")
    for r in results:
        r["time_vs_adaptive_backprop"] = r["s_per_step"] / baseline
        print(f"{r['row']:<30} {r['s_per_step']:>8.2f} {r['time_vs_adaptive_backprop']:>11.2f}x "
              f"{r['peak_mb_above_start']:>8.0f}")
    write_json(args.json, args, results)
    return {"rows": results}


if __name__ == "__main__":
    main()
