"""Seconds per DPI step and peak memory for the exact ODE prior, the surrogate prior and a Gaussian prior.

Each configuration runs in a fresh process, so its peak resident memory (ru_maxrss, minus the
process's memory before the first step) is its own. The prior's score is the Gaussian-field score
plus an untrained U-Net (see bench_logprob.py): realistic flow and realistic network cost.
The measurement is denoising (identity operator, sigma 0.1) of one field sample.

Part 0 measures the accuracy of the exact-ode log p at that tolerance (closed form available: the
field is Gaussian). Part 2 checks that the adjoint's memory stays flat as the number of solver steps grows: log p and
its gradient at several tolerances, with and without the adjoint.

    python benchmarks/bench_dpi.py [--sizes 16,32] [--batch 16] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import time

import scoreprior  # noqa: F401  (first: it sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)
import torch

from bench_logprob import _FieldPlusNet
from scoreprior.data import sample_gaussian

_PRIORS = ("exact-ode", "exact-ode-backprop", "surrogate", "surrogate-16", "gaussian")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _make_prior(kind: str, score: _FieldPlusNet, t0: float, tol: float) -> tuple[object, dict]:
    """The prior and the `DPI.fit` prior_kwargs used with it."""
    from scoreprior import GaussianPrior, ODEOptions, ScorePrior, SurrogatePrior

    if kind.startswith("exact-ode"):
        # The paper's set-up is the adjoint; backpropagation through the solver is faster and its memory
        # grows with the number of steps (the peak MB column).
        adjoint = kind == "exact-ode"
        options = ODEOptions(divergence="hutchinson", adjoint=adjoint, rtol=tol, atol=tol)
        return ScorePrior(score, score.sde, t0=t0), {"options": options}
    if kind.startswith("surrogate"):
        # One time sample per evaluation is Feng & Bouman's default; 16 lowers its variance.
        n_time_samples = 16 if kind == "surrogate-16" else 1
        return SurrogatePrior(score, score.sde, t0=t0, n_time_samples=n_time_samples), {}
    return GaussianPrior(score.field.mean, score.field.cov), {}


def _dpi_step_time(kind: str, size: int, batch: int, steps: int, t0: float, tol: float) -> dict:
    from scoreprior import GaussianLikelihood
    from scoreprior.operators import Identity
    from scoreprior.posterior import DPI, FitConfig

    torch.manual_seed(0)
    score = _FieldPlusNet(size)
    prior, prior_kwargs = _make_prior(kind, score, t0, tol)
    x_true = score.field.mean[None].float()
    likelihood = GaussianLikelihood(Identity(), x_true + 0.1 * torch.randn_like(x_true), 0.1)
    dpi = DPI((1, size, size), n_flows=8)
    before = _rss_mb()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        dpi.fit(prior, likelihood, FitConfig(steps=1, batch_size=batch, warmup=1), prior_kwargs=prior_kwargs,
                progress=False)
        times.append(time.perf_counter() - start)
    return {"prior": kind, "size": f"{size}x{size}", "batch": batch, "steps_timed": steps,
            "s_per_step": statistics.median(times), "peak_mb_above_start": _rss_mb() - before}


def _adjoint_memory(size: int, tol: float, adjoint: bool, t0: float) -> dict:
    from scoreprior import ODEOptions, ScorePrior

    score = _FieldPlusNet(size)
    prior = ScorePrior(score, score.sde, t0=t0)
    x = score.field.mean[None].float().repeat(4, 1, 1, 1).requires_grad_()
    options = ODEOptions(divergence="hutchinson", adjoint=adjoint, rtol=tol, atol=tol)
    before = _rss_mb()
    start = time.perf_counter()
    logp, stats = prior.log_prob(x, options, return_stats=True)
    logp.sum().backward()
    return {"size": f"{size}x{size}", "tol": tol, "adjoint": adjoint, "nfe": stats["nfe"],
            "nfe_backward": stats["nfe_backward"], "seconds": time.perf_counter() - start,
            "peak_mb_above_start": _rss_mb() - before}


def _log_prob_accuracy(size: int, batch: int, tol: float, t0: float, seeds: int) -> dict:
    """Error of the exact-ode log p at DPI's tolerance, one probe: against the closed form (the field is
    Gaussian and the net adds nothing; the exact marginal at T as terminal density) and against the
    same probe at rtol = atol = 1e-6 (the solver's share). Runs with every scoreprior version (log_prob took
    the solver options as keyword arguments before ODEOptions), so a checkout of an older one can run it
    (--accuracy-only)."""
    from scoreprior import ScorePrior

    try:
        from scoreprior import ODEOptions
    except ImportError:  # a scoreprior from before ODEOptions: log_prob takes the solver options as keywords
        ODEOptions = None

    score = _FieldPlusNet(size)
    field = score.field
    prior = ScorePrior(score, score.sde, t0=t0, terminal_log_prob=lambda z: field.log_prob_t(z, score.sde.T))
    x = sample_gaussian(field.mean, field.cov, batch, generator=torch.Generator().manual_seed(3))
    truth = field.log_prob_t(x, t0)

    def log_prob(tol: float, seed: int) -> torch.Tensor:
        options = dict(divergence="hutchinson", rtol=tol, atol=tol)
        if ODEOptions is not None:
            options = {"options": ODEOptions(**options)}
        return prior.log_prob(x, generator=torch.Generator().manual_seed(seed), **options)

    total, solver = [], []
    for seed in range(seeds):
        logp, tight = log_prob(tol, seed), log_prob(1e-6, seed)
        total.append((logp - truth).abs().mean().item())
        solver.append((logp - tight).abs().mean().item())
    return {"size": f"{size}x{size}", "tol": tol, "error_vs_closed_form": statistics.mean(total),
            "solver_error": statistics.mean(solver)}


def _in_fresh_process(fn, *args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, args)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16,32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--t0", type=float, default=1e-3)
    parser.add_argument("--tol", type=float, default=1e-3, help="ODE tolerance of the exact prior in DPI")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--accuracy-only", action="store_true", help="only the log p accuracy table")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    print(f"exact-ode log p at tol {args.tol:g}, batch {args.batch}, one probe (4 seeds): mean |error| in nats")
    print(f"{'size':>6} {'vs closed form':>15} {'solver share':>13}")
    accuracy = []
    for size in sizes:
        r = _in_fresh_process(_log_prob_accuracy, size, args.batch, args.tol, args.t0, 4)
        accuracy.append(r)
        print(f"{r['size']:>6} {r['error_vs_closed_form']:>15.3f} {r['solver_error']:>13.4f}", flush=True)
    if args.accuracy_only:
        return {"accuracy": accuracy}

    dpi_rows = [_in_fresh_process(_dpi_step_time, kind, size, args.batch, args.steps, args.t0, args.tol)
                for size in sizes for kind in _PRIORS]
    print(f"DPI steps: batch {args.batch}, 8 flow steps, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'size':>6} {'prior':>10} {'s/step':>9} {'vs exact':>9} {'peak MB':>8}")
    for size in sizes:
        rows = [r for r in dpi_rows if r["size"] == f"{size}x{size}"]
        exact = next(r for r in rows if r["prior"] == "exact-ode")["s_per_step"]
        for r in rows:
            r["speedup_vs_exact"] = exact / r["s_per_step"]
            print(f"{r['size']:>6} {r['prior']:>10} {r['s_per_step']:>9.3f} {r['speedup_vs_exact']:>8.1f}x "
                  f"{r['peak_mb_above_start']:>8.0f}")

    memory_rows = [_in_fresh_process(_adjoint_memory, sizes[0], tol, adjoint, args.t0)
                   for adjoint in (False, True) for tol in (1e-3, 1e-5, 1e-7)]
    print(f"\nlog p + gradient, {sizes[0]}x{sizes[0]}, batch 4, Hutchinson: memory against solver steps")
    print(f"{'adjoint':>8} {'tol':>7} {'NFE':>5} {'NFE back':>9} {'seconds':>8} {'peak MB':>8}")
    for r in memory_rows:
        print(f"{str(r['adjoint']):>8} {r['tol']:>7.0e} {r['nfe']:>5} {r['nfe_backward']:>9} {r['seconds']:>8.2f} "
              f"{r['peak_mb_above_start']:>8.0f}")
    result = {"args": vars(args), "torch": torch.__version__, "accuracy": accuracy, "dpi": dpi_rows,
              "adjoint_memory": memory_rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
