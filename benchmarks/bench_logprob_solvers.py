"""log p of the shipped 32 x 32 priors: the Gaussian-base solver against the adaptive one, error against evaluations.

For each prior and image set (16 images each) the reference is the adaptive solver (dopri5 in tau) at
rtol = atol = 1e-6 and one Rademacher probe per image; every row uses the same probe (common random
numbers: `ODEOptions(fresh_probes=False)` for the Gaussian-base solver) and, like the reference, the network
in float64, so the error is the solver's alone. One more row per set, the adaptive solver at 1e-6 in
float32 (the package's dtype), shows the rounding floor of float32 that comes on top (the same probes:
`draw_probes` draws them in float32 for every dtype). Rows: the adaptive solver at
several tolerances (today's default is 1e-5) and the Gaussian-base solver (`scoreprior.gaussian_flow`) at
several step counts; evaluations (NFE), mean and max |error| in nats, seconds, and the time ratio against
the adaptive solver at its default tolerance in the same run. A row is on the Pareto front when no row is
both cheaper in NFE and more accurate (max error).

Image sets: "prior draws" (`sample_prior`, 300 log-SNR steps to the prior's t0: typical points of p_t0, like
posterior draws) and "held-out" images (crescents from an unseen generator stream; natural patches of
the test split), which are cleaner than p_t0's typical points.

    python benchmarks/bench_logprob_solvers.py [--priors blackhole-32:1e-3,natural-32:1e-5] [--json PATH]
    python benchmarks/bench_logprob_solvers.py --quick      # one tiny configuration, to check that it runs
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import scoreprior  # noqa: F401  (first: it sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)
import torch

from common import write_json
from scoreprior import ODEOptions, Run, pretrained, sample_prior
from scoreprior.data import blackhole_images, natural_patches

TOLS = (1e-2, 1e-3, 1e-4, 1e-5)
STEPS = (2, 3, 4, 6, 8, 12, 16)
DEFAULT_TOL = 1e-5


def image_sets(name: str, prior, n: int, seed: int, draw_steps: int) -> dict[str, torch.Tensor]:
    """{"prior draws": ..., "held-out": ...} of n images each for the shipped prior `name`."""
    size = prior.event_shape[-1]
    g = torch.Generator().manual_seed(seed)
    draws = sample_prior(prior.score, prior.sde, n, tuple(prior.event_shape), steps=draw_steps,
                         run=Run(t0=prior.t0, generator=g))
    if name.startswith("blackhole"):
        held = blackhole_images(n, size, generator=torch.Generator().manual_seed(50_000 + seed))
    else:
        held = natural_patches(n, size, split="test", generator=torch.Generator().manual_seed(seed))
    return {"prior draws": draws, "held-out": held}


def _solve(prior, x: torch.Tensor, options: ODEOptions, seed: int) -> tuple[torch.Tensor, int, float]:
    start = time.perf_counter()
    with torch.no_grad():
        logp, stats = prior.log_prob(x, options, generator=torch.Generator().manual_seed(seed), return_stats=True)
    return logp.double(), stats["nfe"], time.perf_counter() - start


def measure(name: str, t0: float, args: argparse.Namespace) -> list[dict]:
    """The rows of one prior: both solvers on both image sets."""
    prior = pretrained(name, t0=t0)
    reference_prior = copy.deepcopy(prior)
    reference_prior.score.net.double()
    rows = []
    for label, images in image_sets(name, prior, args.images, args.seed, args.draw_steps).items():
        hutchinson = ODEOptions(divergence="hutchinson", n_probes=1)
        ref, ref_nfe, _ = _solve(reference_prior, images.double(),
                                 hutchinson.replace(solver="adaptive", rtol=1e-6, atol=1e-6), args.seed)
        candidates = [("adaptive", f"rtol=atol={tol:g}", hutchinson.replace(solver="adaptive", rtol=tol, atol=tol))
                      for tol in args.tols]
        candidates += [("gaussian base", f"{steps} RK4 steps", hutchinson.replace(solver="gaussian", steps=steps,
                                                                                   fresh_probes=False))
                       for steps in args.steps]
        candidates = [(solver, setting, options, reference_prior, images.double())
                      for solver, setting, options in candidates]
        candidates.append(("adaptive", "1e-6, float32", hutchinson.replace(solver="adaptive", rtol=1e-6, atol=1e-6),
                           prior, images))
        _solve(prior, images[:1], hutchinson.replace(steps=1), args.seed)  # warm-up, untimed
        results = []
        for solver, setting, options, model, x in candidates:
            logp, nfe, seconds = _solve(model, x, options, args.seed)
            error = (logp - ref).abs()
            results.append({"prior": name, "t0": t0, "images": label, "solver": solver, "setting": setting,
                            "nfe": nfe, "mean_abs_error": float(error.mean()), "max_abs_error": float(error.max()),
                            "seconds": seconds, "reference_nfe": ref_nfe})
        baseline = next(r["seconds"] for r in results if r["solver"] == "adaptive" and r["setting"].endswith(f"{DEFAULT_TOL:g}"))
        for r in results:
            r["time_vs_adaptive_default"] = r["seconds"] / baseline
            r["pareto"] = not any(o["nfe"] <= r["nfe"] and o["max_abs_error"] < r["max_abs_error"]
                                  and (o["nfe"], o["max_abs_error"]) != (r["nfe"], r["max_abs_error"]) for o in results)
        print_table(results)  # each set as it finishes: a long run that is stopped keeps what it measured
        rows += results
    return rows


def print_table(rows: list[dict]) -> None:
    """The rows as a table on stdout, flushed."""
    print(f"{'prior':<13} {'t0':>6} {'images':<12} {'solver':<14} {'setting':<18} {'NFE':>4} {'mean|err|':>10} "
          f"{'max|err|':>9} {'s':>6} {'t/adapt':>7} pareto")
    for r in rows:
        print(f"{r['prior']:<13} {r['t0']:>6g} {r['images']:<12} {r['solver']:<14} {r['setting']:<18} {r['nfe']:>4} "
              f"{r['mean_abs_error']:>10.3f} {r['max_abs_error']:>9.3f} {r['seconds']:>6.1f} "
              f"{r['time_vs_adaptive_default']:>7.2f} {'*' if r['pareto'] else ''}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--priors", default="blackhole-32:1e-3,natural-32:1e-5",
                   help="name:t0 pairs (the demo images blackhole-32 at t0 = 1e-3; shipped priors default to 1e-5)")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--draw-steps", type=int, default=300, help="sample_prior steps for the prior draws")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="2 images, 2 tolerances, 2 step counts, 20 draw steps")
    args = p.parse_args(argv)
    args.tols, args.steps = TOLS, STEPS
    if args.quick:
        args.priors, args.images, args.draw_steps = "blackhole-32:1e-3", 2, 20
        args.tols, args.steps = (1e-3, DEFAULT_TOL), (2, 4)
    rows = []
    for entry in args.priors.split(","):
        name, t0 = entry.split(":")
        rows += measure(name, float(t0), args)
    print(f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; reference: adaptive "
          "1e-6, same probe; float64 but where the setting says float32")
    print("all sets:")
    print_table(rows)
    write_json(args.json, args, rows)
    return {"rows": rows}


if __name__ == "__main__":
    main()
