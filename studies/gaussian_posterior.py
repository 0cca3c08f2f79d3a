"""DPI against the exact posterior of a Gaussian image prior (Feng et al., ICCV 2023, Fig. 5).

Problem: 16x16 grey images from an anisotropic Gaussian random field (gaussian_field, row / column
length scales 1.5 / 3 px, scale 0.3, nugget 0.01, mean 0.5), a truth drawn from it, and y = the lowest
k x k coefficients of the unnormalised 2-D DFT with complex noise sigma = 0.5 (split sigma / sqrt 2
between real and imaginary parts). Default k = 4, i.e. the lowest 6.25 % of the 16 x 16 DFT as in the
paper's figure: far fewer measurements than the 8 x 8 of tests/test_posterior.py, so the posterior is
mostly prior, and a wrong prior density shows up in the result. `--k 8` gives the test's problem.

The exact posterior comes from `gaussian_posterior`. DPI (8 flow steps, hidden 128, init scale 0.1,
Adam lr 1e-2, 100 warm-up steps, cosine decay, batch 64: the settings of the slow closed-form test) is
fitted with three priors of the same Gaussian:
  gaussian   GaussianPrior: the closed-form log-density (the reference DPI result);
  exact      ScorePrior(GaussianScore): log p by the probability-flow ODE of the exact score (VP SDE,
             t0 = 1e-3), terminal density the exact marginal p_T; during training Hutchinson with one
             Rademacher probe, continuous adjoint, Dopri5 with rtol = atol = 1e-3;
  surrogate  SurrogatePrior(GaussianScore): the stochastic ELBO of the same score (one importance-
             sampled time per image and step), terminal density the exact marginal p_T.
The exact-ODE prior costs seconds per step on a CPU, so it gets its own --exact-steps and
--exact-batch-size; its numbers are then those of a shorter, noisier fit, not of the same budget.

Errors against the exact posterior, from n draws of each fitted flow (definitions of the tests):
  mean_rel  |m - m*| / |m*|;  mean_z  RMS over pixels of (m - m*) / s*;  std_rel  |s - s*| / |s*|.
With n draws, the Monte Carlo floor of std_rel is about 1 / sqrt(2 n) (0.8 % for n = 8192).

    OMP_NUM_THREADS=1 python studies/gaussian_posterior.py --out runs/gaussian_posterior
    OMP_NUM_THREADS=1 python studies/gaussian_posterior.py --out /tmp/gp --quick   # 8x8, under a minute

Writes metrics.json and gaussian_posterior.png into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from matplotlib.figure import Figure

from scoreprior.data import gaussian_field
from scoreprior.density import ScorePrior
from scoreprior.likelihood import GaussianLikelihood
from scoreprior.operators import FourierSubsample
from scoreprior.posterior import DPI, FitConfig
from scoreprior.priors import GaussianPrior, gaussian_posterior
from scoreprior.scores import GaussianScore
from scoreprior.sde import VPSDE
from scoreprior.solver_options import ODEOptions
from scoreprior.surrogate import SurrogatePrior

PRIORS = ("gaussian", "surrogate", "exact")
LABELS = {"gaussian": "DPI, Gaussian prior", "surrogate": "DPI, surrogate prior", "exact": "DPI, exact ODE prior"}
LENGTH_SCALE = (1.5, 3.0)
FIELD_SCALE = 0.3
NOISE = 0.5
T0 = 1e-3
EXACT_OPTIONS = ODEOptions(divergence="hutchinson", n_probes=1, adjoint=True, rtol=1e-3, atol=1e-3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--quick", action="store_true",
                   help="8x8 images, lowest 2x2 coefficients (6.25 %%), 300 steps (exact prior: 20); < 1 min")
    p.add_argument("--seed", type=int, default=0, help="seeds the truth, the noise, the flows and the priors")
    p.add_argument("--priors", default=",".join(PRIORS), help=f"comma-separated subset of {','.join(PRIORS)}")
    p.add_argument("--size", type=int, default=None, help="image side (default 16; quick 8)")
    p.add_argument("--k", type=int, default=None, help="kept DFT block side (default size / 4: 6.25 %%)")
    p.add_argument("--steps", type=int, default=None, help="DPI steps, gaussian and surrogate (default 3000; quick 300)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--exact-steps", type=int, default=None, help="DPI steps with the exact ODE prior (default 600; quick 20)")
    p.add_argument("--exact-batch-size", type=int, default=None, help="batch with the exact ODE prior (default 16; quick 8)")
    p.add_argument("--surrogate-time-samples", type=int, default=1,
                   help="time samples per surrogate evaluation (default 1, Feng & Bouman's)")
    p.add_argument("--n-draws", type=int, default=None, help="flow draws for the statistics (default 8192; quick 2048)")
    args = p.parse_args(argv)
    quick = args.quick
    args.size = args.size or (8 if quick else 16)
    args.k = args.k or max(1, args.size // 4)
    args.steps = args.steps or (300 if quick else 3000)
    args.exact_steps = args.exact_steps or (20 if quick else 600)
    args.exact_batch_size = args.exact_batch_size or (8 if quick else 16)
    args.n_draws = args.n_draws or (2048 if quick else 8192)
    args.priors = [s.strip() for s in args.priors.split(",") if s.strip()]
    unknown = sorted(set(args.priors) - set(PRIORS))
    if unknown or not args.priors:
        p.error(f"--priors: expected a subset of {','.join(PRIORS)}, got {','.join(unknown) or 'nothing'}")
    return args


def make_problem(size: int, k: int, seed: int):
    """Prior, likelihood, truth and the exact posterior mean and per-pixel std."""
    mean, cov = gaussian_field(size, size, length_scale=LENGTH_SCALE, scale=FIELD_SCALE)
    prior = GaussianPrior(mean, cov)
    truth = prior.sample(1, generator=torch.Generator().manual_seed(seed))
    operator = FourierSubsample(k, image_size=(size, size))
    clean = GaussianLikelihood(operator, operator.A(truth), NOISE)
    y = clean.sample(truth, generator=torch.Generator().manual_seed(seed + 1))
    likelihood = GaussianLikelihood(operator, y, NOISE)
    post_mean, post_cov = gaussian_posterior(prior, likelihood)
    post_std = post_cov.diagonal().sqrt().reshape(post_mean.shape)
    return prior, likelihood, truth[0], post_mean, post_std


def make_prior(name: str, prior: GaussianPrior, surrogate_time_samples: int = 1):
    """The DPI prior and the log_prob options used in training (None: the prior takes none)."""
    if name == "gaussian":
        return prior, None
    sde = VPSDE()
    score = GaussianScore(prior.mean, prior.cov, sde)

    def terminal(x):  # the exact marginal p_T of the data under the SDE, not N(0, I)
        return score.log_prob_t(x, sde.T)

    if name == "exact":
        return ScorePrior(score, sde, t0=T0, terminal_log_prob=terminal), EXACT_OPTIONS
    return SurrogatePrior(score, sde, t0=T0, terminal_log_prob=terminal, n_time_samples=surrogate_time_samples), None


def errors(m, s, post_mean, post_std) -> dict[str, float]:
    m, s = m.double(), s.double()
    return {"mean_rel": ((m - post_mean).norm() / post_mean.norm()).item(),
            "mean_z": ((m - post_mean) / post_std).square().mean().sqrt().item(),
            "std_rel": ((s - post_std).norm() / post_std.norm()).item()}


def run_one(name, prior, likelihood, post_mean, post_std, args):
    steps, batch = ((args.exact_steps, args.exact_batch_size) if name == "exact" else (args.steps, args.batch_size))
    fit_prior, options = make_prior(name, prior, args.surrogate_time_samples)
    dpi = DPI((1, args.size, args.size), n_flows=8, hidden=128, init_scale=0.1, seed=args.seed)
    start = time.perf_counter()
    config = FitConfig(steps=steps, batch_size=batch, lr=1e-2, warmup=min(100, steps // 10))
    prior_kwargs = None if options is None else {"options": options}
    history = dpi.fit(fit_prior, likelihood, config, prior_kwargs=prior_kwargs, progress=False)
    seconds = time.perf_counter() - start
    m, s = dpi.posterior_stats(n=args.n_draws, batch_size=1024, generator=torch.Generator().manual_seed(99))
    result = {"steps": steps, "batch_size": batch, "seconds": seconds, "seconds_per_step": seconds / steps,
              "skipped_steps": int(sum(history["skipped"])), "final_loss": history["loss"][-1],
              **errors(m, s, post_mean, post_std)}
    if options is not None:
        result["ode_options"] = asdict(options)
    print(f"{name:>9}: {steps:5d} steps x batch {batch:3d}, {seconds:7.1f} s ({seconds / steps:.3f} s/step); "
          f"mean {result['mean_rel']:.2%} rel, {result['mean_z']:.3f} post. stds RMS; std {result['std_rel']:.2%} rel",
          flush=True)
    return result, m.double(), s.double()


def figure(path: Path, truth, post_mean, post_std, fits: dict) -> None:
    rows = 1 + len(fits)
    fig = Figure(figsize=(10.5, 2.5 * rows), layout="constrained")
    axes = fig.subplots(rows, 4, squeeze=False)
    lo, hi = post_mean.min().item(), post_mean.max().item()
    pad = 0.1 * (hi - lo)
    mean_lim = (min(lo, truth.min().item()) - pad, max(hi, truth.max().item()) + pad)
    std_lim = (0.0, 1.5 * post_std.max().item())  # an unconverged fit's larger stds saturate

    def show(ax, img, lim, cmap, title):
        im = ax.imshow(img.squeeze(0).numpy(), vmin=lim[0], vmax=lim[1], cmap=cmap)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.8)

    show(axes[0, 0], post_mean, mean_lim, "gray", "exact posterior mean")
    show(axes[0, 1], post_std, std_lim, "viridis", "exact posterior std")
    show(axes[0, 2], truth, mean_lim, "gray", "truth")
    axes[0, 3].axis("off")
    for row, (name, (m, s)) in enumerate(fits.items(), start=1):
        show(axes[row, 0], m, mean_lim, "gray", f"{LABELS[name]}: mean")
        show(axes[row, 1], s, std_lim, "viridis", "std")
        # error maps on each row's own scale (see the colour bars): the fits differ by orders of magnitude
        err_m, err_s = (m - post_mean).abs(), (s - post_std).abs()
        show(axes[row, 2], err_m, (0, err_m.max().item() + 1e-12), "magma", "|mean - exact|")
        show(axes[row, 3], err_s, (0, err_s.max().item() + 1e-12), "magma", "|std - exact|")
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    prior, likelihood, truth, post_mean, post_std = make_problem(args.size, args.k, args.seed)
    print(f"{args.size}x{args.size} images, lowest {args.k}x{args.k} DFT coefficients "
          f"({args.k ** 2 / args.size ** 2:.2%}), complex noise {NOISE}; exact posterior std "
          f"{post_std.mean().item():.4f} (prior {prior.cov.diagonal().sqrt().mean().item():.4f}) per pixel", flush=True)
    results, fits = {}, {}
    for name in PRIORS:
        if name in args.priors:
            results[name], m, s = run_one(name, prior, likelihood, post_mean, post_std, args)
            fits[name] = (m, s)
    metrics = {
        "study": "gaussian_posterior",
        "problem": {"size": args.size, "k": args.k, "measured_fraction": args.k ** 2 / args.size ** 2,
                    "noise_sigma": NOISE, "length_scale": LENGTH_SCALE, "field_scale": FIELD_SCALE,
                    "sde": "VP(0.1, 20)", "t0": T0, "terminal_density": "exact marginal p_T"},
        "dpi": {"n_flows": 8, "hidden": 128, "init_scale": 0.1, "lr": 1e-2, "schedule": "cosine"},
        "quick": args.quick, "seed": args.seed, "n_draws": args.n_draws,
        "mc_floor_std_rel": 1 / math.sqrt(2 * args.n_draws),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "results": results,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    figure(args.out / "gaussian_posterior.png", truth, post_mean, post_std, fits)
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'gaussian_posterior.png'}")
    return metrics


if __name__ == "__main__":
    main()
