"""DPI against the exact posterior at the demo's scale: 32x32 images, the EHT 2017 array at M87.

Why DPI's draws collapsed in `scoreprior demo`: this study separates the three suspects (the flow and its
optimiser, the surrogate bound, the learned network) on a problem of the demo's size whose posterior is
known exactly.

Problem. Prior: the Gaussian with the mean m and covariance C of 8000 crescents (`blackhole_images`,
a generator stream apart from training and from the demo's truths), as the VP SDE sees it at t0 = 1e-3,
N(a0 m, a0^2 C + s0^2 I) (a0 = 0.99995, s0 = 0.0105): C alone is singular (17 eigenvalues above 1e-3).
Truth: a draw of that prior. Measurement: the demo's, `scoreprior.demo.simulate_observation` (EHT 2017
at M87's coordinates, 837 visibilities, thermal noise per baseline). Exact posterior: `gaussian_posterior`
(per-pixel std 0.0093-0.028, principal stds 6e-5 to 0.15).

Priors DPI is fitted with (the same Gaussian each time):
  gaussian     GaussianPrior, the closed-form density: tests the flow and its optimiser alone;
  surrogate-K  SurrogatePrior(GaussianScore) with K = 1, 2, 8 importance-sampled times per evaluation:
               the ELBO surrogate of the exact score (its density is N(m, C + s0^2/a0^2 I), which
               differs from the above by a factor a0 in the mean: 5e-5 relative, negligible here);
  exact        ScorePrior(GaussianScore): the probability-flow ODE density of the exact score, one
               Rademacher probe, continuous adjoint, rtol = atol = 1e-3; about 10 s per step here (a
               quarter of a core), so only the reference flow, for --exact-steps (150) x 16 draws.
Flows:
  plain        the flow as the demo used it before this study: 8 steps, initial scale 1, Adam lr 3e-3
               (no positivity: a Gaussian prior has mass on negative pixels);
  reference    the same flow after a Gaussian reference (`DPI(reference=...)`): the exact posterior of
               `GaussianPrior.fit` on 256 prior draws (floor: the prior's smallest eigenvalue), i.e. the
               moments a user would estimate from samples of a prior; lr 1e-3. On its own that reference
               is 0.4 posterior stds off in the mean and 33 % too wide (printed as the "reference" row).
Budgets: "demo" 600 steps x batch 16 (`scoreprior demo`'s), "large" 2000 x 32 (exact prior: see above).

Metrics from 4096 draws of each fit: mean_z, the RMS over pixels of (mean - exact mean) / exact std;
std ratio (fit / exact) per pixel, median and 5-95 %; coverage of the truth by the per-pixel 50 % and
90 % equal-tailed intervals; KL(q || posterior) = E_q[log q - log p(x | y)] (exact); the PSIS k̂ and ESS
of `scoreprior.importance.importance_draws` with the closed-form density.

Every fit is written to --out/fits/<name>.json as it finishes and skipped when present, so an interrupted
run resumes where it stopped.

    OMP_NUM_THREADS=1 python studies/eht_gaussian_posterior.py --out runs/eht_gaussian
    OMP_NUM_THREADS=1 python studies/eht_gaussian_posterior.py --out /tmp/egp --quick   # 16x16, ~1 min
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from scoreprior.data import BLACKHOLE_FOV_UAS, blackhole_images
from scoreprior.demo import simulate_observation
from scoreprior.density import ScorePrior
from scoreprior.diagnostics import credible_interval
from scoreprior.importance import importance_draws
from scoreprior.posterior import DPI, FitConfig
from scoreprior.priors import GaussianPrior, gaussian_posterior
from scoreprior.scores import GaussianScore
from scoreprior.sde import VPSDE
from scoreprior.solver_options import ODEOptions
from scoreprior.surrogate import SurrogatePrior

T0 = 1e-3
N_MOMENT_IMAGES = 8000
N_REFERENCE_DRAWS = 256
FLOWS = {"plain": {"lr": 3e-3}, "reference": {"lr": 1e-3}}
EXACT_OPTIONS = ODEOptions(divergence="hutchinson", n_probes=1, adjoint=True, rtol=1e-3, atol=1e-3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (created; finished fits are kept)")
    p.add_argument("--quick", action="store_true", help="16x16, two priors, 150 steps: about a minute")
    p.add_argument("--seed", type=int, default=0, help="seeds the truth, the noise, the reference and the flows")
    p.add_argument("--priors", default="gaussian,surrogate-1,surrogate-2,surrogate-8,exact",
                   help="comma-separated subset of gaussian, surrogate-K (any K), exact")
    p.add_argument("--budgets", default="demo,large", help="comma-separated subset of demo, large")
    p.add_argument("--n-draws", type=int, default=4096, help="draws of each fitted flow for the metrics")
    p.add_argument("--exact-steps", type=int, default=150, help="steps of the exact-ODE-prior fit (batch 16)")
    args = p.parse_args(argv)
    args.priors = [s.strip() for s in args.priors.split(",") if s.strip()]
    args.budgets = [s.strip() for s in args.budgets.split(",") if s.strip()]
    for name in args.priors:
        if name not in ("gaussian", "exact") and not (name.startswith("surrogate-") and name[10:].isdigit()):
            p.error(f"--priors: unknown prior {name!r}")
    if set(args.budgets) - {"demo", "large"}:
        p.error(f"--budgets: expected a subset of demo, large, got {args.budgets}")
    if args.quick:
        args.size, args.priors, args.budgets, args.n_draws = 16, ["gaussian", "surrogate-2"], ["demo"], 1024
        args.budget_steps = {"demo": (150, 16)}
    else:
        args.size, args.budget_steps = 32, {"demo": (600, 16), "large": (2000, 32)}
    args.budget_steps["exact"] = (args.exact_steps, 16)
    return args


def make_problem(size: int, seed: int) -> dict:
    """The Gaussian p_t0 of the crescents, a truth from it, its EHT likelihood and the exact posterior."""
    sde = VPSDE()
    a0, s0 = (float(v) for v in sde.marginal(torch.tensor([T0], dtype=torch.float64)))
    images = blackhole_images(N_MOMENT_IMAGES, size, generator=torch.Generator().manual_seed(20_000 + seed),
                              dtype=torch.float64).reshape(N_MOMENT_IMAGES, -1)
    mean, cov = images.mean(0).reshape(1, size, size), torch.cov(images.T)
    eye = torch.eye(size * size, dtype=torch.float64)
    prior = GaussianPrior(a0 * mean, a0**2 * cov + s0**2 * eye)
    truth = prior.sample(1, generator=torch.Generator().manual_seed(seed))
    likelihood, observation = simulate_observation(truth.float(), fov_uas=BLACKHOLE_FOV_UAS, seed=seed)
    post_mean, post_cov = gaussian_posterior(prior, likelihood)
    score = GaussianScore(mean, cov, sde)
    return {"sde": sde, "a0": a0, "s0": s0, "prior": prior, "score": score, "truth": truth[0],
            "likelihood": likelihood, "observation": observation, "posterior": GaussianPrior(post_mean, post_cov),
            "post_std": post_cov.diagonal().sqrt().reshape(post_mean.shape)}


def make_reference(problem: dict, seed: int) -> GaussianPrior:
    """The exact posterior of a Gaussian fitted to N_REFERENCE_DRAWS prior draws, in float32."""
    prior = problem["prior"]
    draws = prior.sample(N_REFERENCE_DRAWS, generator=torch.Generator().manual_seed(seed + 1))
    fitted = GaussianPrior.fit(draws, floor=float(torch.linalg.eigvalsh(prior.cov)[0]))
    mean, cov = gaussian_posterior(fitted, problem["likelihood"])
    return GaussianPrior(mean.float(), cov.float())


def fit_prior(name: str, problem: dict):
    """The prior DPI trains with, and its `DPI.fit` prior_kwargs."""
    sde, score = problem["sde"], problem["score"]
    if name == "gaussian":
        prior = problem["prior"]
        return GaussianPrior(prior.mean.float(), prior.cov.float()), None

    def terminal(x):  # the exact marginal p_T of the data, not N(0, I)
        return score.log_prob_t(x, sde.T)

    shape = tuple(problem["truth"].shape)
    if name == "exact":
        return ScorePrior(score, sde, t0=T0, terminal_log_prob=terminal, event_shape=shape), {"options": EXACT_OPTIONS}
    return SurrogatePrior(score, sde, t0=T0, terminal_log_prob=terminal, event_shape=shape,
                          n_time_samples=int(name.split("-")[1])), None


def evaluate(samples: torch.Tensor, log_q: torch.Tensor, problem: dict) -> dict:
    """Errors of draws (n, *shape) against the exact posterior, and their importance check."""
    x = samples.double()
    post, post_std, truth = problem["posterior"], problem["post_std"], problem["truth"]
    ratio = x.std(0) / post_std
    out = {"mean_z": float(((x.mean(0) - post.mean) / post_std).square().mean().sqrt()),
           "std_ratio_median": float(ratio.median()),
           "std_ratio_q05": float(ratio.quantile(0.05)), "std_ratio_q95": float(ratio.quantile(0.95))}
    for level in (0.5, 0.9):
        bounds = credible_interval(x, level, kind="eti")
        out[f"coverage_{level}"] = float(((bounds[..., 0] <= truth) & (truth <= bounds[..., 1])).double().mean())
    if log_q is not None:
        out["kl"] = float((log_q.double() - post.log_prob(x)).mean())
        check = importance_draws(samples, log_q, problem["prior"], problem["likelihood"])
        out |= {"khat": check.khat, "ess": check.ess}
    return out


def run_fit(flow: str, prior_name: str, budget: str, problem: dict, reference: GaussianPrior, args) -> dict:
    steps, batch = args.budget_steps["exact" if prior_name == "exact" else budget]
    prior, prior_kwargs = fit_prior(prior_name, problem)
    dpi = DPI(tuple(problem["truth"].shape), n_flows=8, seed=args.seed,
              reference=reference if flow == "reference" else None)
    start = time.perf_counter()
    config = FitConfig(steps=steps, batch_size=batch, lr=FLOWS[flow]["lr"], warmup=min(60, steps // 10))
    history = dpi.fit(prior, problem["likelihood"], config, prior_kwargs=prior_kwargs, progress=False)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        samples, log_q = dpi.sample(args.n_draws, generator=torch.Generator().manual_seed(args.seed + 99))
    return {"flow": flow, "prior": prior_name, "budget": budget, "steps": steps, "batch_size": batch,
            "lr": FLOWS[flow]["lr"], "seconds": seconds, "skipped_steps": int(sum(history["skipped"])),
            "final_loss": history["loss"][-1], **evaluate(samples, log_q, problem)}


def figure(path: Path, rows: list[dict]) -> None:
    fig = Figure(figsize=(11, 5), layout="constrained")
    ax_z, ax_s = fig.subplots(1, 2)
    labels = [f"{r['flow']}, {r['prior']}, " + (f"{r['steps']}x{r['batch_size']}" if "steps" in r else "alone")
              for r in rows]
    xs = range(len(rows))
    ax_z.bar(xs, [r["mean_z"] for r in rows], color=["C0" if r["flow"] == "plain" else "C2" for r in rows])
    ax_z.axhline(0.2, color="k", ls="--", lw=0.8)
    ax_z.set_yscale("log")
    ax_z.set_title("mean error, RMS in exact posterior stds (target ≤ 0.2)", fontsize=9)
    med = [r["std_ratio_median"] for r in rows]
    err = [[m - r["std_ratio_q05"] for m, r in zip(med, rows)], [r["std_ratio_q95"] - m for m, r in zip(med, rows)]]
    ax_s.errorbar(xs, med, yerr=err, fmt="o", capsize=3)
    ax_s.axhspan(0.9, 1.1, color="C2", alpha=0.15)
    ax_s.set_yscale("log")
    ax_s.set_title("posterior std / exact: median and 5–95 % of pixels (target 0.9–1.1)", fontsize=9)
    for ax in (ax_z, ax_s):
        ax.set_xticks(list(xs), labels, fontsize=6, rotation=90)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    fits_dir = args.out / "fits"
    fits_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    problem = make_problem(args.size, args.seed)
    reference = make_reference(problem, args.seed)
    post_std = problem["post_std"]
    print(f"{args.size}x{args.size}, {problem['observation']['n_visibilities']} visibilities; exact posterior std "
          f"{post_std.median():.4f} median ({post_std.min():.4f}-{post_std.max():.4f}) per pixel", flush=True)
    ref_draws = reference.sample(args.n_draws, generator=torch.Generator().manual_seed(args.seed + 99))
    rows = [{"flow": "reference", "prior": "(none)", "budget": "0 steps",
             **evaluate(ref_draws, reference.log_prob(ref_draws), problem)}]
    for budget in args.budgets:
        for prior_name in args.priors:
            for flow in FLOWS:
                name = f"{flow}_{prior_name}_{budget}"
                if prior_name == "exact" and (budget != "demo" or flow == "plain"):
                    continue
                path = fits_dir / f"{name}.json"
                if path.exists():
                    row = json.loads(path.read_text())
                else:
                    row = run_fit(flow, prior_name, budget, problem, reference, args)
                    path.write_text(json.dumps(row, indent=2) + "\n")
                rows.append(row)
                print(f"{name:>32}: mean_z {row['mean_z']:.3f}, std ratio {row['std_ratio_median']:.3f} "
                      f"({row['std_ratio_q05']:.3f}-{row['std_ratio_q95']:.3f}), coverage 0.9: "
                      f"{row['coverage_0.9']:.3f}, KL {row['kl']:.1f}, k̂ {row['khat']:.2f}, "
                      f"{row.get('seconds', 0):.0f} s", flush=True)
    metrics = {
        "study": "eht_gaussian_posterior", "quick": args.quick, "seed": args.seed, "size": args.size,
        "t0": T0, "a0": problem["a0"], "s0": problem["s0"], "n_draws": args.n_draws,
        "observation": problem["observation"],
        "exact_posterior_std": {"median": float(post_std.median()), "min": float(post_std.min()),
                                "max": float(post_std.max())},
        "mc_floor_std_ratio": 1 / math.sqrt(2 * args.n_draws),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "rows": rows,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    figure(args.out / "eht_gaussian_posterior.png", rows)
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'eht_gaussian_posterior.png'}")
    return metrics


if __name__ == "__main__":
    main()
