"""Gradients of a learned prior's log-density against the exact ones (Feng et al., ICCV 2023, Fig. 3).

Problem: as in studies/logprob_gaussian.py, the shipped prior `gaussian-16` and the Gaussian it was
trained on (`pca_gaussian(16)`, VP SDE beta 0.1 to 20), t0 = 1e-3. The true gradient is the exact score
grad_x log p_t0(x) = `GaussianScore(x, t0)`. Two estimates of it from the learned prior:
  ode     grad_x log p_theta(x), differentiating the probability-flow ODE log-density (`ScorePrior.log_prob`,
          Hutchinson with 16 Rademacher probes fixed for the solve, continuous adjoint, Dopri5 with
          rtol = atol = 1e-3): what DPI optimises through;
  score   the score network itself at t = t0, s_theta(x, t0): one network evaluation, the cheap
          alternative (it is the gradient of log p_t0 only as far as the network is a true score).
Per image, the cosine similarity of each with the true gradient (over the 256 pixels), and the ratio
of norms |estimate| / |true|; summarised by mean, median and 10th percentile over 32 samples of the
Gaussian and over out-of-distribution images (resized sklearn digits, natural test patches, flat grey
images, uniform noise; the sets of logprob_gaussian.py).

Checks: (1) the same ODE gradient with the exact Gaussian score in place of the network (exact
divergence; cheap for a closed form) against the truth: what the solver and adjoint lose; (2) on two
in-distribution images, the ODE gradient with the exact divergence (256 vector-Jacobian products per
evaluation, and their derivatives in the adjoint: 116 s per image against 13 s with 16 probes) and three
Hutchinson repeats with independent probes: the cosine of each repeat with the exact-divergence gradient.

    OMP_NUM_THREADS=1 python studies/logprob_gradients.py --out runs/logprob_gradients   # 5 min CPU, 17 min wall
    OMP_NUM_THREADS=1 python studies/logprob_gradients.py --out /tmp/lpgrad --quick      # 1 min CPU, 2 min wall

(wall times measured on 2 cores shared by other jobs, load average 6 to 10).
Writes metrics.json and logprob_gradients.png (histograms of the cosines; per-image comparison).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from logprob_gaussian import BATCH, COLORS, OOD_SETS, PRIOR, T0, machine, parse_study_args, setup, study_parser
from scoreprior.density import ScorePrior
from scoreprior.solver_options import ODEOptions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = {"n_in": (32, 4), "n_ood": (8, 1), "n_flat": (2, 1), "probes": (16, 4), "check_images": (2, 1)}
    p = study_parser(__doc__, "4 Gaussian samples, 1 image per other set, 4 probes, tolerances 1e-2, one check image",
                     defaults)
    p.add_argument("--check-images", type=int, default=None,
                   help="images for the exact-divergence gradient check (default 2; quick 1)")
    p.add_argument("--repeats", type=int, default=3, help="Hutchinson repeats per check image")
    return parse_study_args(p, argv, defaults)


def ode_gradient(prior: ScorePrior, x: Tensor, options: ODEOptions, generator: torch.Generator | None = None) -> Tensor:
    """grad_x log p(x) through the probability-flow ODE (continuous adjoint), by batches. x (n, ...) -> (n, ...)"""
    options = options.replace(adjoint=True)
    grads = []
    for xb in x.split(BATCH):
        xb = xb.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(prior.log_prob(xb, options, generator=generator).sum(), xb)
        grads.append(g)
    return torch.cat(grads)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity per image of two (n, ...) batches. -> (n,)"""
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def summary(values: Tensor) -> dict[str, float]:
    return {"mean": values.mean().item(), "median": values.quantile(0.5).item(),
            "p10": values.quantile(0.1).item(), "min": values.min().item()}


def figure(path: Path, cos_ode: dict[str, Tensor], cos_score: dict[str, Tensor]) -> None:
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax_hist, ax = fig.subplots(1, 2)
    name = "in-distribution"
    values = torch.cat([cos_ode[name], cos_score[name]])
    bins = torch.linspace(values.min().item() - 1e-3, 1.0, 25).numpy()
    ax_hist.hist(cos_ode[name].numpy(), bins=bins, alpha=0.6, label="ODE gradient grad log p_theta")
    ax_hist.hist(cos_score[name].numpy(), bins=bins, alpha=0.6, label=f"score network at t0 = {T0:g}")
    ax_hist.set_xlabel("cosine with the true grad log p_t0")
    ax_hist.set_ylabel("images")
    ax_hist.set_title(f"{PRIOR}, {len(cos_ode[name])} samples of the Gaussian", fontsize=9)
    ax_hist.legend(fontsize=8)
    for name in cos_ode:
        ax.scatter(cos_score[name].numpy(), cos_ode[name].numpy(), s=12, alpha=0.7, color=COLORS[name],
                   label=f"{name} ({len(cos_ode[name])})")
    lo = min(min(c.min().item() for c in cos_ode.values()), min(c.min().item() for c in cos_score.values()))
    ax.plot([lo, 1], [lo, 1], color="k", lw=0.8, ls="--", label="y = x")
    ax.set_xlabel("cosine: score network at t0")
    ax.set_ylabel("cosine: ODE gradient")
    ax.set_title("per image, against the true gradient", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    pb = setup(args)
    prior, truth, sets = pb.prior, pb.truth, pb.sets
    hutchinson = pb.ode.replace(divergence="hutchinson", n_probes=args.probes)
    results, cos_ode, cos_score, seconds = {}, {}, {}, {}
    for name, x in sets.items():
        true = truth(x, T0)
        start = time.perf_counter()
        grad_ode = ode_gradient(prior, x, hutchinson, pb.generator)
        seconds[name] = time.perf_counter() - start
        with torch.no_grad():
            score = prior.score(x, torch.full((len(x),), T0, dtype=x.dtype))
        control = ode_gradient(pb.exact_score, x, pb.ode.replace(divergence="exact"))
        cos_ode[name], cos_score[name] = cosine(grad_ode, true), cosine(score, true)
        results[name] = {
            "n": len(x),
            "cos_ode": summary(cos_ode[name]), "cos_score_t0": summary(cos_score[name]),
            "cos_ode_vs_score_t0": summary(cosine(grad_ode, score)),
            "norm_ratio_ode": summary(grad_ode.flatten(1).norm(dim=1) / true.flatten(1).norm(dim=1)),
            "norm_ratio_score_t0": summary(score.flatten(1).norm(dim=1) / true.flatten(1).norm(dim=1)),
            "solver_check_cos_min": cosine(control, true).min().item(),
            "per_image": {"cos_ode": cos_ode[name].tolist(), "cos_score_t0": cos_score[name].tolist()},
        }
        print(f"{name:>15}: {len(x):3d} images, {seconds[name]:6.1f} s; cosine with the true gradient, median "
              f"(10th pct): ODE {results[name]['cos_ode']['median']:.3f} ({results[name]['cos_ode']['p10']:.3f}), "
              f"score at t0 {results[name]['cos_score_t0']['median']:.3f} ({results[name]['cos_score_t0']['p10']:.3f})",
              flush=True)
    x = sets["in-distribution"][:args.check_images]
    start = time.perf_counter()
    exact = ode_gradient(prior, x, pb.ode.replace(divergence="exact"))
    seconds["check_exact_divergence"] = time.perf_counter() - start
    repeats = torch.stack([cosine(ode_gradient(prior, x, hutchinson, pb.generator), exact)
                           for _ in range(args.repeats)])
    check = {"n_images": len(x), "repeats": args.repeats, "n_probes": args.probes,
             "cos_exact_divergence_vs_true": cosine(exact, truth(x, T0)).tolist(),
             "cos_hutchinson_vs_exact_divergence": repeats.T.tolist(),
             "seconds_per_image_exact_divergence": seconds["check_exact_divergence"] / len(x),
             "seconds_per_image_hutchinson": seconds["in-distribution"] / len(sets["in-distribution"])}
    metrics = {
        "study": "logprob_gradients", "quick": args.quick, "seed": args.seed, **pb.info, "t0": T0,
        "estimator": {"divergence": "hutchinson", "n_probes": args.probes, "probe": "rademacher", "adjoint": True,
                      "method": "dopri5", "rtol": args.tol, "atol": args.tol, "terminal": "N(0, I)"},
        "results": results,
        "ood_all": {key: summary(torch.cat([c[name] for name in OOD_SETS]))
                    for key, c in (("cos_ode", cos_ode), ("cos_score_t0", cos_score))},
        "estimator_check": check,
        "seconds": seconds,
        "machine": machine(pb.load_start),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    figure(args.out / "logprob_gradients.png", cos_ode, cos_score)
    print(f"check on {len(x)} image(s): exact-divergence ODE gradient vs true, cosine "
          f"{', '.join(f'{c:.3f}' for c in check['cos_exact_divergence_vs_true'])}; Hutchinson repeats vs it, "
          f"min {repeats.min().item():.4f} ({check['seconds_per_image_exact_divergence']:.0f} s/image exact, "
          f"{check['seconds_per_image_hutchinson']:.1f} s/image Hutchinson)")
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'logprob_gradients.png'}")
    return metrics


if __name__ == "__main__":
    main()
