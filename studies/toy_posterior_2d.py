"""Posterior samplers against the true posterior of a 2-D problem (Feng et al., ICCV 2023, Fig. 4).

Problem: a 2-D Gaussian-mixture prior with unequal weights (0.5, 0.3, 0.2), means (-1.2, 0), (1.2, 0.1),
(0, 1.8), exact score from `GaussianMixtureScore` under the VP SDE (t0 = 1e-3; every method targets
p_t0, whose extra variance s(t0)^2 = 1e-4 is negligible). The measurement observes the second coordinate,
y = x_2 + b, b ~ N(0, 0.25^2), y = 0 (an `Inpainting` mask on a (1, 1, 2) "image"): the third component is
ruled out and the posterior is bimodal along x_1 with unequal modes (about 62 % / 38 %).

True posterior: prior x likelihood on a 401 x 401 grid over [-3, 3] x [-2.5, 3.5], normalised there.
Baselines, each swept over its weight on the same score: DPS (zeta), Score-ALD (lr), SDE + projection
(lambda, snr 0.16); PnP-DM and DAPS at their defaults (no weight to sweep). Comparison rows: DPI (RealNVP) with the exact ODE prior (`ScorePrior`, exact
divergence, adjoint) and, as a check of the flow itself, DPI with the closed-form mixture density.

KL(true || estimate) from samples, a histogram estimator: 24 x 24 bins over the grid's domain; the true
bin masses p_b come from the grid; the estimate q_b = (n_b + 1/2) / (n + B/2) (Jeffreys smoothing; samples
outside the domain count in n, so mass put outside is penalised); KL = sum_b p_b log(p_b / q_b). Error
bar: the standard deviation over 20 bootstrap resamples of the samples. The estimator is biased upwards
at finite n; its floor is measured by the row "exact samples": n draws from the true posterior itself.
Also reported: the weight of the right mode, P(x_1 > 0), against the truth (the paper's point: the
baselines split the modes about equally).

    OMP_NUM_THREADS=1 python studies/toy_posterior_2d.py --out runs/toy2d
    OMP_NUM_THREADS=1 python studies/toy_posterior_2d.py --out /tmp/toy2d --quick   # about a minute

Writes metrics.json, table.md and toy_posterior_2d.png into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor
from matplotlib.figure import Figure

from scoreprior.density import ScorePrior
from scoreprior.likelihood import GaussianLikelihood
from scoreprior.operators import Inpainting
from scoreprior.posterior import DPI, FitConfig
from scoreprior.samplers import Run, daps, dps, pnp_dm, score_ald, sde_projection
from scoreprior.scores import GaussianMixtureScore
from scoreprior.sde import VPSDE
from scoreprior.solver_options import ODEOptions

WEIGHTS = (0.5, 0.3, 0.2)
MEANS = ((-1.2, 0.0), (1.2, 0.1), (0.0, 1.8))
COVS = (((0.12, 0.04), (0.04, 0.10)), ((0.20, -0.06), (-0.06, 0.12)), ((0.15, 0.0), (0.0, 0.10)))
SIGMA_Y, Y_OBS = 0.25, 0.0
T0 = 1e-3
SHAPE = (1, 1, 2)
DOMAIN = ((-3.0, 3.0), (-2.5, 3.5))
GRID, BINS, BOOTSTRAP = 401, 24, 20
SWEEPS = {
    "dps": ("zeta", (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)),
    "score_ald": ("lr", (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)),
    "sde_projection": ("lam", (0.05, 0.1, 0.25, 0.5, 1.0)),
}
DEFAULTS = {"pnp_dm": pnp_dm, "daps": daps}
LABELS = {"dps": "DPS", "score_ald": "Score-ALD", "sde_projection": "SDE + projection", "pnp_dm": "PnP-DM (defaults)",
          "daps": "DAPS (defaults)",
          "dpi_exact": "DPI, exact ODE prior", "dpi_closed": "DPI, closed-form prior",
          "exact_samples": "exact samples (estimator floor)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--quick", action="store_true", help="fewer samples, steps and DPI steps; about a minute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=None, help="samples per method (default 8000; quick 2000)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 1000; quick 200)")
    p.add_argument("--dpi-steps", type=int, default=None, help="DPI steps (default 1000; quick 60)")
    p.add_argument("--no-dpi", action="store_true", help="skip the two DPI rows (40 of the 48 minutes)")
    args = p.parse_args(argv)
    args.n = args.n or (2000 if args.quick else 8000)
    args.steps = args.steps or (200 if args.quick else 1000)
    args.dpi_steps = args.dpi_steps or (60 if args.quick else 1000)
    return args


def make_problem(sde: VPSDE):
    """The exact mixture score and the likelihood of the toy problem."""
    dtype = torch.float64
    score = GaussianMixtureScore(torch.tensor(WEIGHTS, dtype=dtype), torch.tensor(MEANS, dtype=dtype).reshape(3, *SHAPE),
                                 torch.tensor(COVS, dtype=dtype), sde)
    operator = Inpainting(torch.tensor([[0.0, 1.0]]))
    y = torch.tensor([0.0, Y_OBS], dtype=dtype).reshape(1, *SHAPE)
    return score, GaussianLikelihood(operator, y, SIGMA_Y)


def true_posterior(score: GaussianMixtureScore, likelihood: GaussianLikelihood) -> tuple[Tensor, Tensor, Tensor]:
    """The grid axes (G,), (G,) and the normalised posterior density (G, G) indexed [x_1, x_2]."""
    x1 = torch.linspace(*DOMAIN[0], GRID, dtype=torch.float64)
    x2 = torch.linspace(*DOMAIN[1], GRID, dtype=torch.float64)
    points = torch.stack(torch.meshgrid(x1, x2, indexing="ij"), -1).reshape(-1, *SHAPE)
    log_post = score.log_prob_t(points, T0) + likelihood.log_prob(points)
    density = (log_post - log_post.max()).exp().reshape(GRID, GRID)
    cell = (x1[1] - x1[0]) * (x2[1] - x2[0])
    return x1, x2, density / (density.sum() * cell)


def bin_masses(x1: Tensor, x2: Tensor, density: Tensor) -> Tensor:
    """True probability of each of the BINS x BINS histogram bins, from the grid (cells by centre)."""
    cell = (x1[1] - x1[0]) * (x2[1] - x2[0])
    i = _bin_index(x1, 0).clamp(0, BINS - 1)
    j = _bin_index(x2, 1).clamp(0, BINS - 1)
    masses = torch.zeros(BINS, BINS, dtype=torch.float64)
    masses.index_put_((i[:, None].expand(-1, GRID), j[None, :].expand(GRID, -1)), density * cell, accumulate=True)
    return masses / masses.sum()


def _bin_index(v: Tensor, axis: int) -> Tensor:
    lo, hi = DOMAIN[axis]
    return torch.floor((v - lo) / (hi - lo) * BINS).long()


def kl_histogram(samples: Tensor, p: Tensor) -> float:
    """KL(p || q) with q the Jeffreys-smoothed histogram of samples: (n, 2); p: (BINS, BINS) true masses."""
    i, j = _bin_index(samples[:, 0], 0), _bin_index(samples[:, 1], 1)
    inside = (i >= 0) & (i < BINS) & (j >= 0) & (j < BINS)
    counts = torch.zeros(BINS * BINS, dtype=torch.float64)
    counts.index_add_(0, (i * BINS + j)[inside], torch.ones(int(inside.sum()), dtype=torch.float64))
    q = (counts.reshape(BINS, BINS) + 0.5) / (samples.shape[0] + 0.5 * BINS * BINS)
    keep = p > 0
    return float((p[keep] * (p[keep] / q[keep]).log()).sum())


def kl_with_error(samples: Tensor, p: Tensor, generator: torch.Generator) -> tuple[float, float]:
    """The histogram KL of the samples and its bootstrap standard deviation."""
    n = samples.shape[0]
    boot = [kl_histogram(samples[torch.randint(n, (n,), generator=generator)], p) for _ in range(BOOTSTRAP)]
    return kl_histogram(samples, p), float(torch.tensor(boot).std())


def sample_grid(x1: Tensor, x2: Tensor, density: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """n exact draws from the gridded posterior: a cell by its mass, then uniform within the cell."""
    idx = torch.multinomial(density.flatten(), n, replacement=True, generator=generator)
    h1, h2 = float(x1[1] - x1[0]), float(x2[1] - x2[0])
    jitter = torch.rand(n, 2, generator=generator, dtype=torch.float64) - 0.5
    return torch.stack([x1[idx // GRID] + h1 * jitter[:, 0], x2[idx % GRID] + h2 * jitter[:, 1]], 1)


def run_baseline(name: str, weight: float, score, sde, likelihood, args) -> Tensor:
    run = Run(t0=T0, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64, progress=False)
    if name == "dps":
        x = dps(score, sde, likelihood, args.n, SHAPE, zeta=weight, steps=args.steps, run=run)
    elif name == "score_ald":
        x = score_ald(score, sde, likelihood, args.n, SHAPE, lr=weight, n_levels=args.steps // 5,
                      steps_per_level=5, run=run)
    else:
        x = sde_projection(score, sde, likelihood, args.n, SHAPE, lam=weight, steps=args.steps, run=run)
    return x.reshape(args.n, 2)


class _ClosedFormPrior:
    """log p_t0 of the mixture in closed form, the reference density for the DPI row."""

    def __init__(self, score: GaussianMixtureScore):
        self.score, self.event_shape = score, score.event_shape

    def log_prob(self, x: Tensor) -> Tensor:
        return self.score.log_prob_t(x, T0)


def run_dpi(prior, likelihood, args, options: ODEOptions | None) -> tuple[Tensor, float]:
    dpi = DPI(SHAPE, n_flows=8, hidden=64, seed=args.seed, dtype=torch.float64)
    start = time.perf_counter()
    config = FitConfig(steps=args.dpi_steps, batch_size=128, lr=3e-3, warmup=min(100, args.dpi_steps // 10))
    prior_kwargs = None if options is None else {"options": options}
    dpi.fit(prior, likelihood, config, prior_kwargs=prior_kwargs, progress=not args.quick)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        x, _ = dpi.sample(args.n, generator=torch.Generator().manual_seed(args.seed + 1))
    return x.reshape(args.n, 2), seconds


def record(rows: list, name: str, weight_name: str | None, weight: float | None, x: Tensor | None, p: Tensor,
           generator: torch.Generator, seconds: float, error: str | None = None) -> dict:
    row = {"method": name, "weight_name": weight_name, "weight": weight, "seconds": round(seconds, 2)}
    if x is None:
        row.update(kl=None, kl_err=None, right_mode=None, error=error)
    else:
        kl, err = kl_with_error(x, p, generator)
        row.update(kl=kl, kl_err=err, right_mode=float((x[:, 0] > 0).double().mean()))
    rows.append(row)
    shown = "diverged" if x is None else f"KL {row['kl']:.3f} ± {row['kl_err']:.3f}, P(x1>0) {row['right_mode']:.3f}"
    label = LABELS[name] + (f" {weight_name}={weight:g}" if weight_name else "")
    print(f"{label:>40}: {shown} ({seconds:.1f} s)", flush=True)
    return row


def figure(path: Path, x1, x2, density, panels: dict[str, Tensor], rows: list[dict], dpi_kl: float | None) -> None:
    fig = Figure(figsize=(4 * (len(panels) + 1), 7.2), layout="constrained")
    axes = fig.subplots(2, len(panels) + 1, squeeze=False)
    extent = (*DOMAIN[0], *DOMAIN[1])
    levels = density.max().item() * torch.tensor([0.02, 0.1, 0.3, 0.6]).numpy()
    axes[0, 0].imshow(density.T.numpy(), origin="lower", extent=extent, cmap="viridis", aspect="auto")
    axes[0, 0].set_title("true posterior", fontsize=10)
    for ax, (title, x) in zip(axes[0, 1:], panels.items()):
        h = torch.histogramdd(x.float(), bins=[80, 80], range=[*DOMAIN[0], *DOMAIN[1]]).hist
        ax.imshow(h.T.numpy(), origin="lower", extent=extent, cmap="viridis", aspect="auto")
        ax.set_title(title, fontsize=10)
    for ax in axes[0]:
        ax.contour(x1.numpy(), x2.numpy(), density.T.numpy(), levels=levels, colors="w", linewidths=0.7)
        ax.set_xlabel("x1"), ax.set_ylabel("x2")
    for ax, name in zip(axes[1], SWEEPS):
        ok = [r for r in rows if r["method"] == name and r["kl"] is not None]
        ax.errorbar([r["weight"] for r in ok], [r["kl"] for r in ok], yerr=[r["kl_err"] for r in ok], marker="o",
                    label=LABELS[name])
        if dpi_kl is not None:
            ax.axhline(dpi_kl, color="C3", linestyle="--", label=LABELS["dpi_exact"])
        floor = next(r["kl"] for r in rows if r["method"] == "exact_samples")
        ax.axhline(floor, color="gray", linestyle=":", label="estimator floor")
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel(SWEEPS[name][0]), ax.set_ylabel("KL(true || estimate)")
        ax.legend(fontsize=8)
    for ax in axes[1, len(SWEEPS):]:
        ax.axis("off")
    fig.savefig(path, dpi=100)


def table(rows: list[dict], truth_right: float) -> str:
    lines = [f"True P(x1 > 0) = {truth_right:.3f}.", "",
             "| method | best weight | best KL(true‖est) | P(x1>0) at best | KL range over sweep |",
             "|---|---|---|---|---|"]
    for name in (*SWEEPS, *DEFAULTS, "dpi_exact", "dpi_closed", "exact_samples"):
        ok = [r for r in rows if r["method"] == name and r["kl"] is not None]
        if not ok:
            continue
        best = min(ok, key=lambda r: r["kl"])
        weight = f"{best['weight_name']}={best['weight']:g}" if best["weight_name"] else "—"
        failed = sum(1 for r in rows if r["method"] == name and r["kl"] is None)
        span = f"{min(r['kl'] for r in ok):.3f}–{max(r['kl'] for r in ok):.3f}" + (f" ({failed} diverged)" if failed else "")
        lines.append(f"| {LABELS[name]} | {weight} | {best['kl']:.3f} ± {best['kl_err']:.3f} | "
                     f"{best['right_mode']:.3f} | {span} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sde = VPSDE()
    score, likelihood = make_problem(sde)
    x1, x2, density = true_posterior(score, likelihood)
    p = bin_masses(x1, x2, density)
    cell = (x1[1] - x1[0]) * (x2[1] - x2[0])
    truth_right = float(density[x1 > 0].sum() * cell)
    print(f"true posterior: P(x1 > 0) = {truth_right:.3f}; {args.n} samples per method, {args.steps} steps", flush=True)
    boot = torch.Generator().manual_seed(args.seed + 7)
    rows: list[dict] = []
    start = time.perf_counter()
    exact = sample_grid(x1, x2, density, args.n, torch.Generator().manual_seed(args.seed + 3))
    record(rows, "exact_samples", None, None, exact, p, boot, time.perf_counter() - start)
    best: dict[str, tuple[float, Tensor]] = {}
    for name, (weight_name, weights) in SWEEPS.items():
        for w in weights:
            start = time.perf_counter()
            try:
                x = run_baseline(name, w, score, sde, likelihood, args)
            except FloatingPointError as exc:
                record(rows, name, weight_name, w, None, p, boot, time.perf_counter() - start, error=str(exc))
                continue
            row = record(rows, name, weight_name, w, x, p, boot, time.perf_counter() - start)
            if name not in best or row["kl"] < best[name][0]:
                best[name] = (row["kl"], x)
    for name, sampler in DEFAULTS.items():
        start = time.perf_counter()
        run = Run(t0=T0, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64, progress=False)
        x = sampler(score, sde, likelihood, args.n, SHAPE, run=run).reshape(args.n, 2)
        best[name] = (record(rows, name, None, None, x, p, boot, time.perf_counter() - start)["kl"], x)
    options = ODEOptions(divergence="exact", adjoint=True, rtol=1e-4, atol=1e-4)
    x_dpi, dpi_row = None, {"kl": None}
    if not args.no_dpi:
        x_dpi, seconds = run_dpi(ScorePrior(score, sde, t0=T0), likelihood, args, options)
        dpi_row = record(rows, "dpi_exact", None, None, x_dpi, p, boot, seconds)
        x_closed, seconds = run_dpi(_ClosedFormPrior(score), likelihood, args, None)
        record(rows, "dpi_closed", None, None, x_closed, p, boot, seconds)

    panels = {LABELS[k] + (" (best)" if k in SWEEPS else ""): v[1] for k, v in best.items()}
    if x_dpi is not None:
        panels[LABELS["dpi_exact"]] = x_dpi
    figure(args.out / "toy_posterior_2d.png", x1, x2, density, panels, rows, dpi_row["kl"])
    text = table(rows, truth_right)
    (args.out / "table.md").write_text(text)
    best_kl = {k: v[0] for k, v in best.items()}
    metrics = {
        "study": "toy_posterior_2d",
        "problem": {"weights": WEIGHTS, "means": MEANS, "covs": COVS, "sigma_y": SIGMA_Y, "y": Y_OBS,
                    "observed": "x_2", "sde": "VP(0.1, 20)", "t0": T0, "true_right_mode": truth_right},
        "estimator": {"kind": "histogram", "bins": BINS, "domain": DOMAIN, "smoothing": "Jeffreys (+1/2)",
                      "error": f"bootstrap std over {BOOTSTRAP} resamples", "grid": GRID},
        "quick": args.quick, "seed": args.seed, "n": args.n, "steps": args.steps, "dpi_steps": args.dpi_steps,
        "dpi_ode_options": asdict(options), "rows": rows, "best_kl": best_kl, "dpi_exact_kl": dpi_row["kl"],
        "dpi_beats_every_baseline_at_every_weight": None if dpi_row["kl"] is None else all(
            r["kl"] is None or r["kl"] > dpi_row["kl"] for r in rows if r["method"] in (*SWEEPS, *DEFAULTS)),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(text)
    print(f"wrote {args.out / 'metrics.json'}, {args.out / 'table.md'}, {args.out / 'toy_posterior_2d.png'}")
    return metrics


if __name__ == "__main__":
    main()
