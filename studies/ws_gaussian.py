"""What limits whitened-score dehazing, in closed form (issue 17, part 1): a Gaussian prior with its exact
whitened score, so the exact posterior is known and every error is the sampler's or λ's.

Problem: `ws_dehaze.py`'s set-up on 32 x 32 images. Prior N(mu, F^H diag(c) F): the stationary Gaussian of
2048 training patches of `natural_patches` (mu their mean pixel, c their mean power per frequency), as the
WS prior's process sees it: `GaussianWhitenedScore` with the process of `ws_dehaze.py` (Gaussian low-pass
of width 3 px plus a 5 % white part). Truths: draws of that prior. Haze: N(0, sigma^2 K_h K_h^T), K_h the
Gaussian low-pass of width 3 px without the white part, sigma = 2 (`ws_dehaze.HAZE`), 4 truths. Exact posterior per
frequency: mean mu + c / (c + sigma^2 kappa_h^2) F(y - mu), variance c sigma^2 kappa_h^2 / (c + sigma^2 kappa_h^2).

Samplers (`ws_sample`, 32 draws per truth, 100 / 200 / 1000 steps, reverse SDE, the probability flow, and the
ancestral sampler for the covariance data step, each on its default time grid):
  normalised λ (the study's data step, Jalal et al.) on a grid, and "auto" (discrepancy principle);
  unnormalised λ = 1 / sigma^2 with the residual at x_t and at Tweedie's x̂_0 (the plain likelihood
  gradient when the haze filter is the process's);
  the covariance data step (residual "covariance", λ = 1), the exact posterior score here.
Per configuration: the error of the draws' mean against the exact posterior mean, relative to the exact
posterior mean's distance from the prior mean (issue target: within 2 % at the default steps), beside the part
of it that Monte Carlo alone gives, sqrt(tr Σ_post / draws) / that distance; PSNR of
the mean and of single draws against the truth and the exact posterior mean's PSNR; the draws' total
variance against the exact posterior's (sum over frequencies).

    OMP_NUM_THREADS=1 python studies/ws_gaussian.py --out runs/ws_gaussian
    OMP_NUM_THREADS=1 python studies/ws_gaussian.py --out runs/ws_gaussian_matched --matched-haze
    OMP_NUM_THREADS=1 python studies/ws_gaussian.py --out runs/ws_gaussian_cov --rules covariance --draws 1024
    OMP_NUM_THREADS=1 python studies/ws_gaussian.py --out /tmp/wsg --quick
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from scoreprior.data import natural_patches
from scoreprior.metrics import psnr
from scoreprior.samplers import Run
from scoreprior.ws import GaussianWhitenedScore, Haze, WSProcess, gaussian_spectrum, ws_sample

SIZE, WIDTH, WHITE, HAZE = 32, 3.0, 0.05, 2.0
NORMALISED = (0.03, 0.1, 0.3, 1.0, 3.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--quick", action="store_true", help="2 truths, 16 draws, 50 and 100 steps")
    p.add_argument("--seed", type=int, default=0, help="seeds the truths, the haze and the samplers")
    p.add_argument("--matched-haze", action="store_true",
                   help="haze filter = the process's (white part included), where λ = 1/σ² is the plain likelihood "
                        "gradient")
    p.add_argument("--draws", type=int, help="posterior draws per truth (default 16 quick, 32 full)")
    p.add_argument("--rules", default="", help="run only the rules whose name contains this text")
    args = p.parse_args(argv)
    args.truths, draws = (2, 16) if args.quick else (4, 32)
    args.draws = args.draws or draws
    args.steps = (50, 100) if args.quick else (100, 200, 1000)
    return args


def problem(args: argparse.Namespace) -> dict:
    """Prior, process, haze, truths, measurements and the exact posterior (means and variance spectrum)."""
    patches = natural_patches(2048, SIZE, generator=torch.Generator().manual_seed(args.seed)).double()
    mu = patches.mean()
    c = torch.fft.fft2(patches - mu, norm="ortho").abs().square().mean(0)[0]
    process = WSProcess({"type": "gaussian", "size": [SIZE, SIZE], "width": WIDTH, "white": WHITE})
    mean = torch.full((1, SIZE, SIZE), float(mu), dtype=torch.float64)
    generator = torch.Generator().manual_seed(args.seed + 1)
    white = torch.randn(args.truths, 1, SIZE, SIZE, generator=generator, dtype=torch.float64)
    truths = mean + torch.fft.ifft2(torch.fft.fft2(white, norm="ortho") * c.sqrt(), norm="ortho").real
    haze = Haze(process.spectrum if args.matched_haze else gaussian_spectrum((SIZE, SIZE), WIDTH), HAZE)
    ys = haze.sample(truths, generator=generator)
    haze_power = (HAZE * haze.spectrum) ** 2
    gain = c / (c + haze_power)
    post_means = mean + torch.fft.ifft2(gain * torch.fft.fft2(ys - mean, norm="ortho"), norm="ortho").real
    return {"model": GaussianWhitenedScore(mean, c, process), "c": c, "process": process, "haze": haze, "mean": mean,
            "truths": truths, "ys": ys, "post_means": post_means, "post_var": c * haze_power / (c + haze_power)}


def evaluate(draws: torch.Tensor, k: int, prob: dict) -> dict:
    """Errors of the draws (N, 1, H, W) of problem k against its exact posterior and truth."""
    post, truth, mean = prob["post_means"][k], prob["truths"][k], prob["mean"]
    m = draws.mean(0)
    power = torch.fft.fft2(draws - m, norm="ortho").abs().square().mean(0)[0] * draws.shape[0] / (draws.shape[0] - 1)
    return {"mean_error": float((m - post).norm() / (post - mean).norm()),
            "mc_floor": float((prob["post_var"].sum() / draws.shape[0]).sqrt() / (post - mean).norm()),
            "psnr_mean": float(psnr(m[None], truth[None])[0]),
            "psnr_draw": float(psnr(draws, truth.expand_as(draws)).mean()),
            "psnr_exact_mean": float(psnr(post[None], truth[None])[0]),
            "variance_ratio": float(power.sum() / prob["post_var"].sum())}


def configurations(prior_spectrum: torch.Tensor) -> dict[str, dict]:
    rules = {f"normalised λ={lam:g}": {"lam": lam, "residual": "x"} for lam in NORMALISED}
    rules["normalised λ=auto"] = {"lam": "auto", "residual": "x"}
    rules["λ=1/σ², residual x_t"] = {"lam": 1 / HAZE**2, "residual": "x-gradient"}
    rules["λ=1/σ², residual x̂_0"] = {"lam": 1 / HAZE**2, "residual": "tweedie-gradient"}
    rules["covariance, λ=1"] = {"lam": 1.0, "residual": "covariance", "prior_spectrum": prior_spectrum}
    return rules


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    prob = problem(args)
    rows = []
    for method in ("sde", "ode", "ancestral"):
        for steps in args.steps:
            for name, rule in configurations(prob["c"]).items():
                if args.rules not in name or (method == "ancestral" and rule.get("residual") != "covariance"):
                    continue
                results = []
                for k in range(args.truths):
                    likelihood = prob["haze"].likelihood(prob["ys"][k : k + 1])
                    run = Run(generator=torch.Generator().manual_seed(args.seed + 100 + k), dtype=torch.float64,
                              progress=False)
                    draws = ws_sample(prob["model"], prob["process"], args.draws, (1, SIZE, SIZE), likelihood=likelihood,
                                      method=method, steps=steps, run=run, **rule)
                    results.append(evaluate(draws, k, prob))
                row = {"method": method, "steps": steps, "rule": name}
                for key in results[0]:
                    values = torch.tensor([r[key] for r in results])
                    row[key] = {"mean": float(values.mean()),
                                "se": float(values.std() / len(values) ** 0.5) if len(values) > 1 else 0.0}
                rows.append(row)
                print(f"{method} {steps:5d} {name:>24}: mean error {row['mean_error']['mean']:7.1%} (Monte Carlo "
                      f"{row['mc_floor']['mean']:.1%}), PSNR mean "
                      f"{row['psnr_mean']['mean']:5.2f} (exact {row['psnr_exact_mean']['mean']:5.2f}), draw "
                      f"{row['psnr_draw']['mean']:5.2f} dB, variance ratio {row['variance_ratio']['mean']:.2f}",
                      flush=True)
    measured = float(psnr(prob["ys"], prob["truths"]).mean())
    metrics = {"study": "ws_gaussian", "quick": args.quick, "seed": args.seed, "matched_haze": args.matched_haze,
               "truths": args.truths,
               "draws": args.draws, "psnr_measurement": measured, "rows": rows,
               "seconds": time.perf_counter() - start}
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"PSNR of the hazy measurement {measured:.2f} dB; wrote {args.out / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main()
