"""log p by the probability-flow ODE: scoreprior against the reference algorithm, error against time.

The reference algorithm is score_sde_pytorch's `likelihood.py` as described in its paper and code
comments, re-implemented here: scipy's RK45 on the flattened float64 state (x, log p) in the time t,
rtol and atol on both, one Rademacher probe fixed per solve, one network call and one autograd VJP per
stage; n probes are n solves, averaged. scoreprior: `ScorePrior.log_prob` (time log(s/a), central
differences for J v, log-density tolerance min(atol d, 0.05)), with and without a Gaussian control variate
fitted to training images.

Prior and data: the shipped `natural-16` prior (a trained 370k-parameter U-Net, VP 0.1-20, t0 = 1e-5) on
a batch of 16 held-out natural patches. The error is the mean absolute difference, over images and
probe seeds, from log p with the exact trace at rtol = atol = 1e-5, logp_atol = 1e-3 (cached in
--cache; its solver error, like that of the solver table's rows at 1e-5, is a few hundredths of a nat). A row is
Pareto-better when no other row of its method is both faster and more accurate. For every reference
row, "speed-up at its error" is its time over the fastest scoreprior row at least as accurate.

A solver table: dopri5, bosh3 and dopri8 at each tolerance, their solver error alone (one probe,
against the same probe at 1e-8). Also the exact divergence: one evaluation of tr(d score / d x) by scoreprior's batched VJPs against a
per-dimension loop of backward passes (how simple libraries compute it), at 16 x 16 and 32 x 32.

    python benchmarks/bench_logprob_compare.py [--tols 1e-5,1e-4,1e-3] [--probes 1,4,16] [--json PATH] [--png PATH]
    python benchmarks/bench_logprob_compare.py --quick      # tiny sweep, to check that it runs
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import scoreprior  # noqa: F401  (first: it sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)
import torch
from scipy.integrate import solve_ivp

from common import write_json
from scoreprior import GaussianPrior, ODEOptions, ScorePrior, pretrained
from scoreprior.data import natural_patches

T0 = 1e-5
ADAPTIVE = ODEOptions(solver="adaptive")  # the solver compared here ("auto" picks natural-16's Gaussian base grid)


def reference_log_prob(prior: ScorePrior, x: torch.Tensor, probe: torch.Tensor, tol: float) -> tuple[torch.Tensor, int]:
    """The reference algorithm: RK45 (scipy) on the flattened (x, log p) state in t, one probe. -> ((B,), NFE)."""
    sde, score, shape, n = prior.sde, prior.score, x.shape, x.numel()
    nfe = 0

    def rhs(t: float, state: np.ndarray) -> np.ndarray:
        nonlocal nfe
        nfe += 1
        xt = torch.from_numpy(state[:n]).reshape(shape).to(x.dtype).requires_grad_()
        tb = torch.full((shape[0],), t, dtype=x.dtype)
        with torch.enable_grad():
            drift = sde.ode_drift(xt, tb, score(xt, tb))
            (grad,) = torch.autograd.grad((drift * probe).sum(), xt)
        div = (grad * probe).reshape(shape[0], -1).sum(1)
        return np.concatenate([drift.detach().reshape(-1).double().numpy(), div.double().numpy()])

    start = np.concatenate([x.reshape(-1).double().numpy(), np.zeros(shape[0])])
    end = solve_ivp(rhs, (prior.t0, sde.T), start, rtol=tol, atol=tol, method="RK45").y[:, -1]
    z = torch.from_numpy(end[:n]).reshape(shape).to(x.dtype)
    return sde.prior_log_prob(z) + torch.from_numpy(end[n:]).to(x.dtype), nfe


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def sweep(prior: ScorePrior, cv_prior: ScorePrior, x: torch.Tensor, exact: torch.Tensor, tols, probes, seeds) -> list[dict]:
    rows = []
    for tol in tols:
        for k in probes:
            for method in ("reference", "scoreprior", "scoreprior+cv"):
                errors, walls, nfes = [], [], []
                for seed in range(seeds):
                    gen = torch.Generator().manual_seed(1000 * seed + k)
                    if method == "reference":
                        draws = torch.randn((k,) + tuple(x.shape), generator=gen).sign()
                        runs, wall = _timed(lambda: [reference_log_prob(prior, x, p, tol) for p in draws])
                        logp, nfe = torch.stack([r[0] for r in runs]).mean(0), sum(r[1] for r in runs)
                    else:
                        target = prior if method == "scoreprior" else cv_prior
                        options = ADAPTIVE.replace(divergence="hutchinson", n_probes=k, rtol=tol, atol=tol)
                        (logp, stats), wall = _timed(lambda: target.log_prob(x, options, generator=gen,
                                                                             return_stats=True))
                        nfe = stats["nfe"]
                    errors.append((logp - exact).abs().mean().item())
                    walls.append(wall)
                    nfes.append(nfe)
                row = {"method": method, "tol": tol, "probes": k, "nfe": statistics.mean(nfes),
                       "seconds": statistics.mean(walls), "error": statistics.mean(errors)}
                print(f"{method:>14} {tol:>7.0e} {k:>6} {row['nfe']:>7.0f} {row['seconds']:>8.2f} {row['error']:>9.3f}",
                      flush=True)
                rows.append(row)
    return rows


def speedups(rows: list[dict]) -> list[dict]:
    """For each reference row: its time over the fastest scoreprior row (either variant) at least as accurate."""
    ours = [r for r in rows if r["method"] != "reference"]
    out = []
    for ref in (r for r in rows if r["method"] == "reference"):
        better = [r for r in ours if r["error"] <= ref["error"]]
        best = min(better, key=lambda r: r["seconds"]) if better else None
        out.append({"tol": ref["tol"], "probes": ref["probes"], "error": ref["error"], "reference_s": ref["seconds"],
                    "scoreprior_s": best["seconds"] if best else None,
                    "scoreprior_setting": f"{best['method']} tol {best['tol']:.0e}, {best['probes']} probes" if best else None,
                    "speedup": ref["seconds"] / best["seconds"] if best else None})
    return out


def solver_rows(prior: ScorePrior, x: torch.Tensor, methods, tols) -> list[dict]:
    """Solver error alone: log p with one probe against the same probe at rtol = atol = 1e-8 (dopri5)."""
    def solve(**options):
        options = ADAPTIVE.replace(divergence="hutchinson", **options)
        return prior.log_prob(x, options, generator=torch.Generator().manual_seed(7), return_stats=True)

    tight = solve(rtol=1e-8, atol=1e-8)[0]
    rows = []
    for method in methods:
        for tol in tols:
            (logp, stats), wall = _timed(lambda: solve(method=method, rtol=tol, atol=tol))
            rows.append({"method": method, "tol": tol, "nfe": stats["nfe"], "seconds": wall,
                         "solver_error": (logp - tight).abs().mean().item()})
            r = rows[-1]
            print(f"{method:>8} {tol:>7.0e} {r['nfe']:>5} {wall:>8.2f} {r['solver_error']:>12.4f}", flush=True)
    return rows


def exact_trace_rows(sizes, batch: int) -> list[dict]:
    """One exact divergence evaluation: scoreprior's batched VJPs against a per-dimension loop."""
    from bench_logprob import _FieldPlusNet

    rows = []
    for size in sizes:
        score = _FieldPlusNet(size)
        prior = ScorePrior(score, score.sde, t0=1e-3)
        x = torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(0)) * 0.3
        t = torch.full((batch,), 0.5)

        def loop() -> torch.Tensor:
            xt = x.clone().requires_grad_()
            flat = score(xt, t).reshape(batch, -1)
            trace = torch.zeros(batch)
            for i in range(flat.shape[1]):
                (grad,) = torch.autograd.grad(flat[:, i].sum(), xt, retain_graph=True)
                trace += grad.reshape(batch, -1)[:, i]
            return trace

        def batched() -> torch.Tensor:
            return prior.log_prob(x, ADAPTIVE.replace(divergence="exact", method="euler"))  # one step: one evaluation

        batched()  # warm-up: the first vmap call pays a one-off set-up
        _, ours = _timed(batched)
        _, looped = _timed(loop)
        rows.append({"size": f"{size}x{size}", "d": size * size, "batch": batch, "scoreprior_s": ours,
                     "loop_s": looped, "speedup": looped / ours})
        print(f"{size:>3}x{size:<3} {size * size:>5} {ours:>10.2f} {looped:>9.2f} {looped / ours:>8.1f}x", flush=True)
    return rows


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, marker in (("reference", "o"), ("scoreprior", "s"), ("scoreprior+cv", "^")):
        sel = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seconds"])
        ax.plot([r["seconds"] for r in sel], [r["error"] for r in sel], marker, label=method)
    ax.set(xscale="log", yscale="log", xlabel="seconds per batch of 16", ylabel="mean |log p - exact| (nats)",
           title="log p of natural-16: error against time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tols", default="1e-5,1e-4,1e-3")
    parser.add_argument("--probes", default="1,4,16")
    parser.add_argument("--seeds", type=int, default=2, help="probe seeds averaged per row")
    parser.add_argument("--solvers", default="dopri5,bosh3,dopri8", help="torchdiffeq solvers of the solver table")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--exact-sizes", default="16,32", help="sizes of the exact-divergence comparison ('' for none)")
    parser.add_argument("--cache", default="bench_logprob_exact.pt", help="file caching the exact-trace log p")
    parser.add_argument("--quick", action="store_true", help="batch 2, one tolerance, one probe count, one seed")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--png", help="also draw error against time to this PNG file")
    args = parser.parse_args(argv)
    if args.quick:
        args.tols, args.probes, args.seeds, args.batch, args.exact_sizes = "1e-3", "1", 1, 2, "8"
        args.solvers = "dopri5"
    tols = [float(v) for v in args.tols.split(",")]
    probes = [int(v) for v in args.probes.split(",")]

    prior = pretrained("natural-16", t0=T0)
    x = natural_patches(args.batch, 16, split="test", generator=torch.Generator().manual_seed(0))
    train = natural_patches(20000, 16, split="train", generator=torch.Generator().manual_seed(1))
    cv_prior = ScorePrior(prior.score, prior.sde, t0=T0, gaussian_base=GaussianPrior.fit(train, floor=1e-4))
    cache = Path(args.cache)
    exact, wall = None, 0.0
    if cache.is_file():
        saved = torch.load(cache)
        exact = saved["log_prob"] if saved["batch"] == args.batch else None
    if exact is None:
        print(f"exact-trace log p (batch {args.batch}; cached in {cache}) ...", flush=True)
        options = ADAPTIVE.replace(divergence="exact", rtol=1e-5, atol=1e-5, logp_atol=1e-3)
        exact, wall = _timed(lambda: prior.log_prob(x, options))
        torch.save({"batch": args.batch, "log_prob": exact, "seconds": wall}, cache)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"natural-16, batch {args.batch}, {args.seeds} probe seeds per row")
    print(f"{'method':>14} {'tol':>7} {'probes':>6} {'NFE':>7} {'seconds':>8} {'error':>9}")
    rows = sweep(prior, cv_prior, x, exact, tols, probes, args.seeds)
    print(f"\n{'reference row':>22} {'error':>8} {'ref s':>7} {'ours s':>7} {'speed-up':>9}  fastest scoreprior row as accurate")
    gains = speedups(rows)
    for g in gains:
        ours = f"{g['scoreprior_s']:>7.2f} {g['speedup']:>8.1f}x  {g['scoreprior_setting']}" if g["speedup"] else "      -        -  none"
        print(f"{'tol %.0e, %d probes' % (g['tol'], g['probes']):>22} {g['error']:>8.3f} {g['reference_s']:>7.2f} {ours}")
    print(f"\nsolvers, one probe, error against the same probe at 1e-8\n{'method':>8} {'tol':>7} {'NFE':>5} "
          f"{'seconds':>8} {'solver error':>12}")
    solvers = solver_rows(prior, x, args.solvers.split(","), tols)
    exact_rows = []
    if args.exact_sizes:
        print(f"\nexact divergence, one evaluation, batch 4\n{'size':>7} {'d':>5} {'batched s':>10} {'loop s':>9} {'speed-up':>8}")
        exact_rows = exact_trace_rows([int(v) for v in args.exact_sizes.split(",")], 4)
    result = {"rows": rows, "speedups": gains, "solvers": solvers, "exact_trace": exact_rows,
              "exact_log_prob_seconds": wall}
    write_json(args.json, args, [result])
    if args.png:
        _plot(rows, args.png)
    return result


if __name__ == "__main__":
    main()
