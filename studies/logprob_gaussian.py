"""Log-densities of a learned score prior against the exact ones of its Gaussian (Feng et al., ICCV 2023, Fig. 2).

Problem: the shipped prior `gaussian-16` (a U-Net noise predictor trained by denoising score matching on
samples of `pca_gaussian(16)`: N(mean, cov) of a PCA of the 100 LFW faces and their mirror images,
eigenvalues + 0.01, VP SDE with beta 0.1 to 20) has a known target. Its log-density log p_theta(x), by
the probability-flow ODE from t0 = 1e-3 (the seed paper's smallest time) to T = 1 with the N(0, I)
terminal density, is compared with the closed-form log p_t0(x) of the same Gaussian under the same SDE
(`GaussianScore.log_prob_t`), on
  in-distribution  128 samples of the Gaussian;
  digits           sklearn's 8 x 8 digits, bilinearly resized to 16 x 16, scaled to [0, 1];
  natural          grey natural-image patches of the test split (`natural_patches`);
  constant, noise  flat images of grey levels 0.1 to 0.9, and uniform [0, 1] noise.
Reported on the in-distribution samples: R^2, slope and intercept of the least-squares line network =
slope * true + intercept (`linear_fit`), Pearson r, and the offset network - true (mean, std); per
out-of-distribution set the mean true and network log p and the offset.

Divergence estimator. The exact trace of the score Jacobian costs d = 256 vector-Jacobian products per
ODE evaluation; Hutchinson with K Rademacher probes (fixed for a solve) costs K, at about the same cost
per image, probe and evaluation. A solve takes 80 to 130 evaluations; on a shorter training run of the
same network, rtol = atol = 1e-2 or 1e-3 gave log p within 0.01 nats of each other, and atol = 1e-5 (the
paper's) changed nothing visible at 2.4 times the evaluations. Measured on one CPU thread under load:
68 s per image with the exact divergence, 5.8 s with 32 probes; exact divergence on all 168 images would
take hours. So the full mode uses Hutchinson with 32 probes (Dopri5, rtol = atol = 1e-3) and measures the
estimator itself on 4 in-distribution images: the exact-divergence log p and `--repeats` Hutchinson
solves with independent probes. The spread of the repeats (sigma_H, 1.6 nats measured) adds to the
scatter of the in-distribution fit; with the spread s of the true log p, estimator noise alone would cap
R^2 at s^2 / (s^2 + sigma_H^2), reported as r2_ceiling_hutchinson (0.978 measured).
Solver check: the same ODE with the exact Gaussian score (exact divergence, cheap for a closed form)
against the closed form, on every image, bounds what the solver and the N(0, I) terminal density add.

    OMP_NUM_THREADS=1 python studies/logprob_gaussian.py --out runs/logprob_gaussian   # 8 min CPU, 31 min wall
    OMP_NUM_THREADS=1 python studies/logprob_gaussian.py --out /tmp/lpg --quick         # 30 s CPU, 1 min wall

(wall times measured on 2 cores shared by other jobs, load average 6 to 10).
`--prior-file` takes another slim export of a prior trained on the same Gaussian (e.g. a shorter run).
Writes metrics.json, logprob_gaussian.png (all sets; estimator noise) and logprob_in_distribution.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from scoreprior.data import builtin_dataset, natural_patches, pca_gaussian, sample_gaussian
from scoreprior.density import ScorePrior
from scoreprior.metrics import linear_fit
from scoreprior.plots import logprob_scatter
from scoreprior.pretrained import available_priors, load_pretrained, pretrained
from scoreprior.priors import GaussianPrior
from scoreprior.scores import GaussianScore
from scoreprior.solver_options import ODEOptions

PRIOR = "gaussian-16"
T0 = 1e-3
SIZE = 16
BATCH = 16
CONTROL_FLOOR = 1e-4
OOD_SETS = ("digits", "natural", "constant", "noise")
COLORS = {"in-distribution": "C0", "digits": "C1", "natural": "C2", "constant": "C3", "noise": "C4"}


def study_parser(doc: str, quick_help: str, defaults: dict[str, tuple[int, int]]) -> argparse.ArgumentParser:
    """The arguments of both log-density studies: --out, --quick, --seed, --prior-file and the image counts.

    defaults: (full, quick) defaults of --n-in, --n-ood, --n-flat and --probes, applied by `parse_study_args`.
    """
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--seed", type=int, default=0, help="seeds the images and the probes")
    p.add_argument("--prior-file", type=Path, default=None,
                   help=f"slim export to use instead of the shipped {PRIOR} (trained on the same Gaussian)")
    p.add_argument("--no-control-variate", dest="control_variate", action="store_false",
                   help="Hutchinson without the Gaussian control variate (fitted to 20,000 training draws)")
    p.add_argument("--n-in", type=int, default=None, help="Gaussian samples (default %d; quick %d)" % defaults["n_in"])
    p.add_argument("--n-ood", type=int, default=None,
                   help="digits and natural patches each (default %d; quick %d)" % defaults["n_ood"])
    p.add_argument("--n-flat", type=int, default=None,
                   help="flat grey images and noise images each (default %d; quick %d)" % defaults["n_flat"])
    p.add_argument("--probes", type=int, default=None,
                   help="Hutchinson probes per image (default %d; quick %d)" % defaults["probes"])
    return p


def parse_study_args(p: argparse.ArgumentParser, argv: list[str] | None, defaults: dict[str, tuple[int, int]]):
    """Parse, fill the unset counts in `defaults` by mode, and set the ODE tolerance `tol` (1e-3; quick 1e-2)."""
    args = p.parse_args(argv)
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.tol = 1e-2 if args.quick else 1e-3
    return args


def machine(load_start: tuple[float, float, float]) -> dict:
    """Platform, versions, torch threads and the load averages at the start and now."""
    return {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_average_start": load_start, "load_average_end": os.getloadavg()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = {"n_in": (128, 8), "n_ood": (16, 2), "n_flat": (4, 2), "probes": (32, 4), "noise_images": (4, 1),
                "repeats": (6, 3)}
    p = study_parser(__doc__, "8 Gaussian samples, 2 images per other set, 4 probes, tolerances 1e-2; about a minute",
                     defaults)
    p.add_argument("--noise-images", type=int, default=None,
                   help="images for the exact-vs-Hutchinson measurement (default 4; quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="Hutchinson repeats per such image (default 6; quick 3)")
    return parse_study_args(p, argv, defaults)


def load_problem(prior_file: Path | None, control_variate: bool) -> tuple[ScorePrior, GaussianScore, dict]:
    """The learned prior, the exact score of the Gaussian it was trained on (same SDE), and its provenance.

    control_variate: give the prior the Gaussian fitted to the 20,000 draws it was trained on
    (`train_priors.datasets`, seed 0) as Hutchinson's control variate, which leaves log p unbiased.
    """
    if prior_file is None:
        prior, meta = pretrained(PRIOR, t0=T0), available_priors()[PRIOR]
        info = {"prior": PRIOR, **{k: meta.get(k) for k in ("provenance", "steps", "final_loss", "wall_time_s")}}
    else:
        prior, info = load_pretrained(prior_file, t0=T0), {"prior": str(prior_file)}
    if prior.event_shape != (1, SIZE, SIZE):
        raise ValueError(f"prior: expected event shape (1, {SIZE}, {SIZE}), got {tuple(prior.event_shape)}")
    # builtin_dataset("pca-gaussian") trains on pca_gaussian(size) with its defaults: faces, floor 0.01
    mean, cov = pca_gaussian(SIZE)
    info.update(truth="pca_gaussian(16): faces, all 256 components, eigenvalue floor 0.01", sde=repr(prior.sde),
                control_variate=None)
    if control_variate:
        train = builtin_dataset("pca-gaussian", 20000, size=SIZE, generator=torch.Generator().manual_seed(0))
        gaussian = GaussianPrior.fit(train, floor=CONTROL_FLOOR)
        prior = ScorePrior(prior.score, prior.sde, t0=T0, event_shape=prior.event_shape, data_range=prior.data_range,
                           gaussian_base=gaussian)
        info["control_variate"] = f"GaussianPrior.fit(20,000 training draws, floor={CONTROL_FLOOR})"
    return prior, GaussianScore(mean, cov, prior.sde), info


@dataclass
class Problem:
    """What both log-density studies start from (see `setup`)."""

    prior: ScorePrior  # the learned prior, log p_theta by the probability-flow ODE
    truth: GaussianScore  # the Gaussian it was trained on, same SDE
    exact_score: ScorePrior  # the same ODE with the exact score: the solver check
    sets: dict[str, Tensor]  # images by set, float64 (n, 1, 16, 16)
    info: dict  # provenance of the prior and the truth
    ode: ODEOptions  # the adaptive solver at the study's tolerances
    generator: torch.Generator  # Hutchinson probes
    load_start: tuple[float, float, float]


def setup(args: argparse.Namespace) -> Problem:
    """Create --out; load the prior and its truth, draw the image sets."""
    load_start = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    prior, truth, info = load_problem(args.prior_file, args.control_variate)
    sets = image_sets(truth, args.n_in, args.n_ood, args.n_flat, args.seed)
    return Problem(prior, truth, ScorePrior(truth, prior.sde, t0=T0), sets, info,
                   ODEOptions(solver="adaptive", rtol=args.tol, atol=args.tol),
                   torch.Generator().manual_seed(args.seed + 1), load_start)


def digits(n: int, generator: torch.Generator) -> Tensor:
    """n of sklearn's 8 x 8 digits (values 0..16), resized (bilinear) to 16 x 16, in [0, 1]. -> (n, 1, 16, 16)"""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images).float()[:, None] / 16.0
    chosen = images[torch.randperm(len(images), generator=generator)[:n]]
    return F.interpolate(chosen, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0.0, 1.0)


def image_sets(truth: GaussianScore, n_in: int, n_ood: int, n_flat: int, seed: int) -> dict[str, Tensor]:
    """In-distribution samples of the truth and the out-of-distribution sets, float64 (n, 1, 16, 16) each."""
    g = torch.Generator().manual_seed(seed)
    sets = {
        "in-distribution": sample_gaussian(truth.mean, truth.cov, n_in, generator=g),
        "digits": digits(n_ood, g),
        "natural": natural_patches(n_ood, SIZE, split="test", generator=g),
        "constant": torch.linspace(0.1, 0.9, n_flat).reshape(-1, 1, 1, 1).expand(-1, 1, SIZE, SIZE),
        "noise": torch.rand(n_flat, 1, SIZE, SIZE, generator=g),
    }
    return {name: x.double() for name, x in sets.items()}


def batched_log_prob(prior: ScorePrior, x: Tensor, options: ODEOptions,
                     generator: torch.Generator | None = None) -> tuple[Tensor, int]:
    """log p of x (n, ...) by batches of BATCH, under no_grad. Returns (n,) and the ODE evaluations in all."""
    out, nfe = [], 0
    with torch.no_grad():
        for xb in x.split(BATCH):
            lp, stats = prior.log_prob(xb, options, generator=generator, return_stats=True)
            out.append(lp)
            nfe += stats["nfe"]
    return torch.cat(out), nfe


def offsets(net: Tensor, true: Tensor) -> dict[str, float]:
    diff = net - true
    return {"n": len(true), "true_mean": true.mean().item(), "net_mean": net.mean().item(),
            "offset_mean": diff.mean().item(), "offset_std": diff.std().item() if len(diff) > 1 else 0.0}


def estimator_noise(prior: ScorePrior, x: Tensor, true: Tensor, args: argparse.Namespace, ode: ODEOptions) -> dict:
    """Exact-divergence log p of x and `args.repeats` Hutchinson solves with independent probes."""
    start = time.perf_counter()
    exact, nfe_exact = batched_log_prob(prior, x, ode.replace(divergence="exact"))
    seconds_exact = time.perf_counter() - start
    g = torch.Generator().manual_seed(args.seed + 2)
    start = time.perf_counter()
    hutchinson = ode.replace(divergence="hutchinson", n_probes=args.probes)
    hutch = torch.stack([batched_log_prob(prior, x, hutchinson, g)[0] for _ in range(args.repeats)])  # (repeats, n)
    seconds_hutch = (time.perf_counter() - start) / args.repeats
    sigma = hutch.std(0).pow(2).mean().sqrt().item() if args.repeats > 1 else float("nan")
    return {"n_images": len(x), "repeats": args.repeats, "n_probes": args.probes,
            "exact": exact.tolist(), "hutchinson": hutch.T.tolist(), "true": true.tolist(),
            "hutchinson_std": sigma, "hutchinson_mean_minus_exact": (hutch.mean(0) - exact).tolist(),
            "exact_minus_true": (exact - true).tolist(),
            "seconds_per_image_exact": seconds_exact / len(x), "seconds_per_image_hutchinson": seconds_hutch / len(x),
            "nfe_exact": nfe_exact}


def figure(path: Path, true: dict[str, Tensor], net: dict[str, Tensor], noise: dict) -> None:
    fig = Figure(figsize=(10, 4.4), layout="constrained")
    ax, ax_noise = fig.subplots(1, 2, width_ratios=(1.4, 1))
    for name, t in true.items():
        ax.scatter(t.numpy(), net[name].numpy(), s=10, alpha=0.7, color=COLORS[name], label=f"{name} ({len(t)})")
    lo = min(min(t.min().item(), net[name].min().item()) for name, t in true.items())
    hi = max(max(t.max().item(), net[name].max().item()) for name, t in true.items())
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--", label="y = x")
    ax.set_xscale("symlog", linthresh=100)
    ax.set_yscale("symlog", linthresh=100)
    ax.set_xlabel("true log p_t0 (nats; symlog)")
    ax.set_ylabel("network log p_theta (nats; symlog)")
    ax.set_title(f"{PRIOR}, probability-flow ODE, t0 = {T0:g}", fontsize=9)
    ax.legend(fontsize=8)
    hutch, exact, t = (torch.tensor(noise[key]) for key in ("hutchinson", "exact", "true"))
    for i in range(len(exact)):
        ax_noise.scatter([i] * hutch.shape[1], (hutch[i] - t[i]).numpy(), s=14, color="C0",
                         label=f"Hutchinson, {noise['n_probes']} probes" if i == 0 else None)
    ax_noise.scatter(range(len(exact)), (exact - t).numpy(), marker="x", s=40, color="C3", label="exact divergence")
    ax_noise.set_xticks(range(len(exact)))
    ax_noise.set_xlabel("in-distribution image")
    ax_noise.set_ylabel("network log p - true log p (nats)")
    ax_noise.set_title(f"estimator noise: std {noise['hutchinson_std']:.2f} nats over {noise['repeats']} probe draws",
                       fontsize=9)
    ax_noise.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    pb = setup(args)
    prior, truth, sets = pb.prior, pb.truth, pb.sets
    true = {name: truth.log_prob_t(x, T0) for name, x in sets.items()}
    net, solver_error, seconds, nfe = {}, {}, {}, {}
    for name, x in sets.items():
        start = time.perf_counter()
        net[name], nfe[name] = batched_log_prob(prior, x, pb.ode.replace(divergence="hutchinson", n_probes=args.probes),
                                                pb.generator)
        seconds[name] = time.perf_counter() - start
        exact_score_logp, _ = batched_log_prob(pb.exact_score, x, pb.ode.replace(divergence="exact"))
        solver_error[name] = (exact_score_logp - true[name]).abs().max().item()
        print(f"{name:>15}: {len(x):3d} images, {seconds[name]:6.1f} s; true log p {true[name].mean().item():10.1f}, "
              f"network - true {(net[name] - true[name]).mean().item():+9.1f} nats (mean)", flush=True)
    x_in, t_in = sets["in-distribution"], true["in-distribution"]
    start = time.perf_counter()
    noise = estimator_noise(prior, x_in[:args.noise_images], t_in[:args.noise_images], args, pb.ode)
    seconds["estimator_noise"] = time.perf_counter() - start
    n_in = net["in-distribution"]
    fit = linear_fit(t_in, n_in)
    true_var = t_in.var().item()
    in_dist = {**fit, "pearson_r": torch.corrcoef(torch.stack([t_in, n_in]))[0, 1].item(),
               **offsets(n_in, t_in), "true_std": true_var ** 0.5,
               "r2_ceiling_hutchinson": true_var / (true_var + noise["hutchinson_std"] ** 2)}
    all_true, all_net = torch.cat(list(true.values())), torch.cat(list(net.values()))
    metrics = {
        "study": "logprob_gaussian", "quick": args.quick, "seed": args.seed, **pb.info, "t0": T0,
        "estimator": {"divergence": "hutchinson", "n_probes": args.probes, "probe": "rademacher",
                      "method": "dopri5", "rtol": args.tol, "atol": args.tol, "terminal": "N(0, I)"},
        "in_distribution": in_dist,
        "ood": {name: offsets(net[name], true[name]) for name in OOD_SETS},
        "all_images": linear_fit(all_true, all_net),
        "estimator_noise": noise,
        "solver_check_max_abs_error": solver_error,
        "seconds": seconds, "nfe": nfe,
        "machine": machine(pb.load_start),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    figure(args.out / "logprob_gaussian.png", true, net, noise)
    scatter = logprob_scatter(t_in, n_in, xlabel="true log p_t0 (nats)", ylabel="network log p_theta (nats)")
    scatter.savefig(args.out / "logprob_in_distribution.png", dpi=110)
    print(f"in-distribution ({len(t_in)}): R^2 {fit['r2']:.3f}, slope {fit['slope']:.3f}, Pearson r "
          f"{in_dist['pearson_r']:.3f}, offset {in_dist['offset_mean']:+.2f} +- {in_dist['offset_std']:.2f} nats "
          f"(true log p std {in_dist['true_std']:.2f})")
    print(f"Hutchinson ({args.probes} probes) noise {noise['hutchinson_std']:.2f} nats -> R^2 ceiling "
          f"{in_dist['r2_ceiling_hutchinson']:.3f}; {noise['seconds_per_image_hutchinson']:.1f} s/image vs exact "
          f"{noise['seconds_per_image_exact']:.1f} s/image; solver check max |error| "
          f"{max(solver_error.values()):.3f} nats")
    print(f"wrote {args.out / 'metrics.json'}, {args.out / 'logprob_gaussian.png'} and "
          f"{args.out / 'logprob_in_distribution.png'}")
    return metrics


if __name__ == "__main__":
    main()
