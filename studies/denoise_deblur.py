"""Denoising and deblurring natural-image patches with DPI and a score-based prior (Feng et al. 2023, Sec. 5).

Problem. Held-apart grey patches (`natural_patches(split="test")`: blocks of the scikit-image photographs
that the natural-16 / natural-32 priors never saw in training), in [0, 1], seeded by --seed, and three
measurements of each (real Gaussian noise, seeded):
  denoise-0.1   y = x + n,            sigma = 0.1
  denoise-0.2   y = x + n,            sigma = 0.2
  deblur        y = k * x + n,        k a Gaussian PSF of sigma 1 px (7 x 7, circular), noise sigma = 0.05
(the deblurring is the blur + noise of the whitened-score paper's demo, not the seed paper's lowest 8 x 8
DFT coefficients: y then stays an image, and its PSNR is the baseline).

DPI (surrogate prior): SurrogatePrior of the pretrained prior (--prior, default natural-16) with t0 = 1e-3
and --time-samples importance-sampled times per evaluation; RealNVP with --n-flows steps (coupling width
max(64, d / 8)), initial scale 0.1, unconstrained pixels; Adam lr 5e-3, 10 % warm-up, cosine decay,
--steps x --batch-size, path gradient. Statistics from 256 draws per image.

Per image and task: PSNR (dB, peak 1) of the posterior mean and of y itself, RMSE of the mean, mean
posterior std, and the fraction of pixels whose central 90 % interval holds the truth (0.9 when
calibrated); then mean and std over the images.

    OMP_NUM_THREADS=1 python studies/denoise_deblur.py --out runs/denoise_deblur   # 24 fits, ~50 s CPU each
    OMP_NUM_THREADS=1 python studies/denoise_deblur.py --out runs/denoise_deblur_32 --prior natural-32
    OMP_NUM_THREADS=1 python studies/denoise_deblur.py --out /tmp/dd --quick   # 2 images: 18 s CPU, 85 s wall loaded

Writes metrics.json and denoise_deblur.png (truth, y, mean, std, two draws for the first images) into --out.
Runtimes measured: see studies/README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from scoreprior.data import natural_patches
from scoreprior.diagnostics import coverage
from scoreprior.likelihood import GaussianLikelihood
from scoreprior.metrics import psnr
from scoreprior.operators import GaussianBlur, Identity, LinearOperator
from scoreprior.posterior import DPI, FitConfig
from scoreprior.pretrained import pretrained
from scoreprior.surrogate import SurrogatePrior

TASKS: dict[str, tuple[LinearOperator, float]] = {
    "denoise-0.1": (Identity(), 0.1),
    "denoise-0.2": (Identity(), 0.2),
    "deblur": (GaussianBlur(1.0), 0.05),
}
LEVEL = 0.9
T0 = 1e-3
LR = 5e-3
N_DRAWS = 256
SHOWN = 2  # images per task in the figure
FULL = {"n_images": 8, "steps": 500, "batch_size": 16, "time_samples": 2, "n_flows": 8}
QUICK = {"n_images": 2, "steps": 60, "batch_size": 8, "time_samples": 1, "n_flows": 4}
QUANTITIES = ("psnr_mean", "psnr_measurement", "rmse_mean", "mean_posterior_std", "coverage_90")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--quick", action="store_true", help="2 images, 60 DPI steps per fit; under 2 minutes")
    p.add_argument("--seed", type=int, default=0, help="seeds the patches, the noise, the flows and the surrogate")
    p.add_argument("--prior", default="natural-16", choices=("natural-16", "natural-32"), help="pretrained prior")
    for option, text in (("n-images", "test patches"), ("steps", "DPI steps per fit"), ("batch-size", "DPI batch"),
                         ("time-samples", "surrogate time samples per evaluation"), ("n-flows", "RealNVP steps")):
        key = option.replace("-", "_")
        p.add_argument(f"--{option}", type=int, default=None, help=f"{text} (default {FULL[key]}; quick {QUICK[key]})")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def solve(prior, truth: torch.Tensor, operator: LinearOperator, sigma: float, seed: int,
          args: argparse.Namespace) -> tuple[dict, dict]:
    """Simulate y for truth (1, 1, H, W), fit DPI; returns the numbers and the images for the figure."""
    y = GaussianLikelihood(operator, operator.A(truth), sigma).sample(truth, generator=torch.Generator().manual_seed(seed))
    likelihood = GaussianLikelihood(operator, y, sigma)
    shape = tuple(prior.event_shape)
    surrogate = SurrogatePrior(prior.score, prior.sde, t0=T0, n_time_samples=args.time_samples, event_shape=shape)
    dpi = DPI(shape, n_flows=args.n_flows, init_scale=0.1, seed=seed)
    start = time.perf_counter()
    config = FitConfig(steps=args.steps, batch_size=args.batch_size, lr=LR, warmup=max(1, args.steps // 10))
    history = dpi.fit(surrogate, likelihood, config, progress=False)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        draws = dpi.sample(N_DRAWS, generator=torch.Generator().manual_seed(seed + 1))[0]
    mean, std = draws.mean(0, keepdim=True), draws.std(0, keepdim=True)
    result = {"psnr_mean": float(psnr(mean, truth)[0]), "psnr_measurement": float(psnr(y, truth)[0]),
              "rmse_mean": float((mean - truth).square().mean().sqrt()), "mean_posterior_std": float(std.mean()),
              "coverage_90": float(coverage(draws[None], truth, LEVEL)[0, 0]),
              "seconds": seconds, "final_loss": history["loss"][-1], "skipped_steps": int(sum(history["skipped"]))}
    return result, {"truth": truth[0], "y": y[0], "mean": mean[0], "std": std[0], "draws": draws[:2]}


def figure(path: Path, shown: dict, results: dict) -> None:
    """Per task, rows of: truth, y, posterior mean, posterior std, two draws (grey on [0, 1]; std its own scale)."""
    rows = [(task, i) for task in shown for i in range(len(shown[task]))]
    fig = Figure(figsize=(9.5, 1.75 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 6, squeeze=False)
    for row, (task, i) in zip(axes, rows):
        images, numbers = shown[task][i], results[task]["images"][i]
        panels = [(images["truth"], "truth"),
                  (images["y"], f"y: {numbers['psnr_measurement']:.1f} dB"),
                  (images["mean"], f"mean: {numbers['psnr_mean']:.1f} dB"),
                  (images["std"], f"std (90 % cov. {numbers['coverage_90']:.2f})"),
                  (images["draws"][0], "draw 1"), (images["draws"][1], "draw 2")]
        for k, (ax, (image, title)) in enumerate(zip(row, panels)):
            scale = dict(cmap="magma") if k == 3 else dict(cmap="gray", vmin=0, vmax=1)
            im = ax.imshow(image.squeeze(0).numpy(), **scale)
            ax.set_title(title, fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
            if k == 3:
                fig.colorbar(im, ax=ax, shrink=0.8)
        row[0].set_ylabel(f"{task}, image {i}", fontsize=8)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    prior = pretrained(args.prior, t0=T0)
    size = prior.event_shape[-1]
    truths = natural_patches(args.n_images, size, split="test", generator=torch.Generator().manual_seed(args.seed))
    results, shown = {}, {}
    print(f"{args.prior}, {args.n_images} test patches of {size} x {size}; DPI {args.steps} steps x batch "
          f"{args.batch_size}, {args.time_samples} time samples", flush=True)
    print(f"{'task':>12} {'image':>5} {'PSNR y':>7} {'PSNR mean':>9} {'RMSE':>6} {'post. std':>9} {'cov. 90%':>8} {'s':>5}")
    for t, (task, (operator, sigma)) in enumerate(TASKS.items()):
        images = []
        shown[task] = []
        for i, truth in enumerate(truths):
            seed = args.seed + 1000 * t + i
            result, pictures = solve(prior, truth[None], operator, sigma, seed, args)
            images.append(result)
            if i < SHOWN:
                shown[task].append(pictures)
            print(f"{task:>12} {i:5d} {result['psnr_measurement']:7.2f} {result['psnr_mean']:9.2f} "
                  f"{result['rmse_mean']:6.3f} {result['mean_posterior_std']:9.3f} {result['coverage_90']:8.2f} "
                  f"{result['seconds']:5.0f}", flush=True)
        summary = {}
        for key in QUANTITIES:
            values = torch.tensor([r[key] for r in images], dtype=torch.float64)
            summary[key] = {"mean": float(values.mean()), "std": float(values.std()) if len(values) > 1 else 0.0}
        results[task] = {"operator": repr(operator), "noise_sigma": sigma, "summary": summary, "images": images}
    print("\nmean ± std over images")
    for task, entry in results.items():
        s = entry["summary"]
        print(f"{task:>12}: PSNR y {s['psnr_measurement']['mean']:.2f} ± {s['psnr_measurement']['std']:.2f} dB, "
              f"mean {s['psnr_mean']['mean']:.2f} ± {s['psnr_mean']['std']:.2f} dB; 90 % coverage "
              f"{s['coverage_90']['mean']:.2f} ± {s['coverage_90']['std']:.2f}; posterior std "
              f"{s['mean_posterior_std']['mean']:.3f} (RMSE of the mean {s['rmse_mean']['mean']:.3f})")
    metrics = {
        "study": "denoise_deblur", "quick": args.quick, "seed": args.seed, "prior": args.prior,
        "images": {"n": args.n_images, "size": size, "source": "natural_patches(split='test')"},
        "dpi": {"steps": args.steps, "batch_size": args.batch_size, "time_samples": args.time_samples,
                "n_flows": args.n_flows, "init_scale": 0.1, "lr": LR, "schedule": "cosine, 10 % warm-up", "t0": T0,
                "prior": "SurrogatePrior (importance-sampled times)", "n_draws": N_DRAWS},
        "coverage_level": LEVEL, "results": results, "seconds_total": time.perf_counter() - start,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    figure(args.out / "denoise_deblur.png", shown, results)
    print(f"total {metrics['seconds_total']:.0f} s; wrote {args.out / 'metrics.json'} and {args.out / 'denoise_deblur.png'}")
    return metrics


if __name__ == "__main__":
    main()
