"""Train the score priors shipped in scoreprior/pretrained/, reproducibly, on one CPU thread.

Every prior is a small U-Net noise predictor (channels 16, 32, 64; one residual block per level; Fourier
time embedding of scale 1, which keeps the network smooth in t so probability-flow ODE solves need
fewer steps) under the VP SDE (beta 0.1 to 20, the seed paper's released setting), trained by the recipe
`RECIPE` (issue 15; each change measured by studies/prior_recipe.py at one budget):
  - likelihood weighting by importance sampling: times uniform in log(s / a) (`dsm_loss(time_sampling=
    "likelihood")`), the weighting whose loss bounds the KL divergence (Song et al., NeurIPS 2021);
  - the network is a residual on the Wiener denoiser of the training set's Gaussian
    (`GaussianResidualNet`; eigenvalue floor validated on 10 % of the training images);
  - as before: Adam lr 2e-3, 100 warm-up steps, then constant, gradient clipping 1, EMA decay 0.998 (a
    cosine decay with EMA 0.999 measured no gain, so it was not kept).
The data, with a held-out test set for studies/prior_density.py (`datasets`):
  blackhole-32  20,000 blackhole_images(32) (crescents, fov 160 µas, peak <= 1); test: 1000 other draws
  gaussian-16   20,000 samples of pca_gaussian(16) (faces; its exact density is known); test: 1000 other draws
  natural-16    20,000 natural_patches(16) of the train split (scikit-image photographs, [0, 1]); test: the
                test split's blocks, which share no pixel with the train split
  natural-32    20,000 natural_patches(32), the same splits
  faces-24      the first 90 LFW faces of face_images(24) and their mirror images (180 images); test: the
                last 10 and their mirrors

Data, network initialisation, batches and noise are seeded by --seed. Each run writes the full
training checkpoint to --out/checkpoints/ (every 500 steps: a run started again resumes), its slim
export (EMA weights in float16, the Gaussian in float32, with provenance, wall time, steps, final loss,
recipe and floor) to --pretrained-dir (default: the package folder scoreprior/pretrained, or
--out/pretrained with --quick), and the numbers to --out/metrics.json (merged with earlier runs of other
priors). Sanity checks on the exported priors, into metrics.json:
  gaussian-16   log p of the network (probability-flow ODE, Hutchinson, 16 probes, the training set's
                Gaussian as control variate) against the exact
                Gaussian log p_t0 on 16 samples of the true Gaussian: Pearson r, R^2 of the line fit
                (the paper reports R^2 = 0.98), mean offset;
  blackhole-32  unconditional samples (Euler-Maruyama, 300 steps) against the training set: mean
                total flux, mean ring radius (`ring_radius`), most negative pixel.

    OMP_NUM_THREADS=1 python studies/train_priors.py --out runs/train_priors
    OMP_NUM_THREADS=1 python studies/train_priors.py --out runs/train_priors --only blackhole-32
    OMP_NUM_THREADS=1 python studies/train_priors.py --out /tmp/tp --quick    # a minute, nothing installed
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from scoreprior.data import (BLACKHOLE_FOV_UAS, builtin_dataset, face_images, natural_patches, pca_gaussian,
                             ring_radius, sample_gaussian)
from scoreprior.density import ScorePrior
from scoreprior.nets import UNet
from scoreprior.pretrained import PRETRAINED_DIR, export_pretrained, load_pretrained
from scoreprior.priors import GaussianPrior
from scoreprior.samplers import Run, sample_prior
from scoreprior.scores import GaussianScore
from scoreprior.sde import VPSDE
from scoreprior.solver_options import ODEOptions
from scoreprior.noise_prediction import GaussianResidualNet
from scoreprior.training import TrainConfig, train_score_model

CHANNELS = (16, 32, 64)
FOURIER_SCALE = 1.0
CHECK_T0 = 1e-3
N_TEST = 1000
FLOORS = (1e-5, 1e-4, 1e-3, 1e-2)
FACES_TEST = 10


@dataclass(frozen=True)
class Recipe:
    """How a prior is trained: the time sampling of the loss (`dsm_loss`), whether the network is a residual
    on the Wiener denoiser of the training set's Gaussian (`GaussianResidualNet`), the learning-rate schedule."""

    time_sampling: str = "likelihood"
    gaussian_base: bool = True
    lr_schedule: str = "constant"
    lr: float = 2e-3
    ema_decay: float = 0.998


# The recipe of the priors shipped before issue 15, kept to measure what each change brings (prior_recipe.py).
RECIPE_2026_11 = Recipe(time_sampling="uniform", gaussian_base=False)
RECIPE = Recipe()


@dataclass(frozen=True)
class Spec:
    """One shipped prior: a built-in dataset, its image size and size of the training set, the budget."""

    dataset: str
    size: int
    n: int
    steps: int
    batch_size: int
    source: str


SPECS = {
    "blackhole-32": Spec("blackhole", 32, 20000, 5000, 32,
                         f"synthetic m-ring crescents, default parameters, fov {BLACKHOLE_FOV_UAS} µas, peak <= 1"),
    "gaussian-16": Spec("pca-gaussian", 16, 20000, 4000, 64,
                        "N(mean, cov) of pca_gaussian(16): PCA of the 100 scikit-image LFW faces + mirrors, "
                        "eigenvalues + 0.01"),
    "natural-16": Spec("natural", 16, 20000, 4000, 64,
                       "grey patches of scikit-image's CC0/public-domain photographs, train split, [0, 1]"),
    "natural-32": Spec("natural", 32, 20000, 5000, 32,
                       "grey patches of scikit-image's CC0/public-domain photographs, train split, [0, 1]"),
    "faces-24": Spec("faces", 24, 180, 3000, 32,
                     f"the first {100 - FACES_TEST} faces of scikit-image's LFW subset resized to 24 x 24 and their "
                     f"mirror images; the last {FACES_TEST} (and mirrors) held out"),
}


def datasets(spec: Spec, n: int, n_test: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(training images, held-out test images, provenance) of a spec, reproducible from `seed`.

    The test images never enter training: fresh draws of the generator (blackhole, pca-gaussian, seed + 1),
    patches of the test split's blocks (natural), the last FACES_TEST faces and their mirrors (faces).
    """
    train_gen, test_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    if spec.dataset == "faces":
        faces = face_images(spec.size)
        train, test = faces[:-FACES_TEST], faces[-FACES_TEST:]
        train, test = torch.cat([train, train.flip(-1)]), torch.cat([test, test.flip(-1)])
        return train[:n], test, f"scoreprior.data.face_images({spec.size}) [:-{FACES_TEST}] + mirrors: {spec.source}"
    train = builtin_dataset(spec.dataset, n, size=spec.size, generator=train_gen)
    if spec.dataset == "natural":
        test = natural_patches(n_test, spec.size, split="test", generator=test_gen)
    else:
        test = builtin_dataset(spec.dataset, n_test, size=spec.size, generator=test_gen)
    provenance = (f"scoreprior.data.builtin_dataset({spec.dataset!r}, {n}, size={spec.size}, "
                  f"generator=torch.Generator().manual_seed({seed})): {spec.source}")
    return train, test, provenance


def validated_floor(train: torch.Tensor) -> float:
    """The eigenvalue floor of `GaussianPrior.fit` (from FLOORS) with the best mean log-likelihood on the last
    10 % of the training images when fitted to the rest: the Gaussian baseline is given its best chance."""
    cut = max(2, int(0.9 * train.shape[0]))
    fit, valid = train[:cut], train[cut:]
    return max(FLOORS, key=lambda floor: float(GaussianPrior.fit(fit, floor=floor).log_prob(valid.double()).mean()))


def build_model(recipe: Recipe, train: torch.Tensor, sde: VPSDE, floor: float) -> torch.nn.Module:
    """The U-Net of the shipped priors, on the Wiener denoiser of the training set's Gaussian if the recipe says so."""
    net = UNet(1, channels=CHANNELS, fourier_scale=FOURIER_SCALE)
    return GaussianResidualNet.fit(net, sde, train, floor=floor) if recipe.gaussian_base else net


def train_model(recipe: Recipe, train: torch.Tensor, steps: int, batch_size: int, seed: int, checkpoint: Path,
                provenance: str, progress: bool) -> tuple[torch.nn.Module, dict]:
    """Build and train one model by `recipe` (resuming from `checkpoint` if it exists); returns (net, info)."""
    sde = VPSDE(0.1, 20.0)
    floor = validated_floor(train)
    torch.manual_seed(seed)
    net = build_model(recipe, train, sde, floor)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=recipe.lr, warmup=100, ema_decay=recipe.ema_decay,
                         seed=seed, log_every=min(100, steps), checkpoint_every=500,
                         time_sampling=recipe.time_sampling, lr_schedule=recipe.lr_schedule)
    result = train_score_model(net, sde, train, config, checkpoint=checkpoint, resume=True, progress=progress,
                               provenance=provenance)
    return net, {"final_loss": result.final_loss, "wall_time_s": round(result.wall_time, 1), "floor": floor,
                 "recipe": asdict(recipe)}


def train_one(name: str, spec: Spec, args: argparse.Namespace, pretrained_dir: Path) -> dict:
    """Train, export and check one prior; returns its metrics."""
    steps = 20 if args.quick else spec.steps
    n = min(spec.n, 512) if args.quick else spec.n
    train, test, provenance = datasets(spec, n, 16 if args.quick else N_TEST, args.seed)
    checkpoint = Path(args.out) / "checkpoints" / f"{name}.pt"
    print(f"{name}: {steps} steps, batch {spec.batch_size}, {tuple(train.shape)} images ({provenance})", flush=True)
    net, info = train_model(RECIPE, train, steps, spec.batch_size, args.seed, checkpoint, provenance, args.progress)
    metadata = {"dataset": spec.dataset, "seed": args.seed, **info,
                "parameters": sum(p.numel() for p in net.parameters()), "n_train": int(train.shape[0]),
                "weights_dtype": "float16", "torch": torch.__version__, "command": " ".join(sys.argv)}
    path = export_pretrained(checkpoint, pretrained_dir / f"{name}.pt", metadata=metadata)
    print(f"{name}: final loss {info['final_loss']:.4f}, {info['wall_time_s']:.0f} s, wrote {path} "
          f"({path.stat().st_size / 1e6:.2f} MB)", flush=True)
    metrics = {**metadata, "steps": steps, "batch_size": spec.batch_size, "provenance": provenance, "file": str(path),
               "file_bytes": path.stat().st_size}
    check = CHECKS.get(name)
    if check is not None:
        start = time.perf_counter()
        metrics["check"] = check(path, train, args)
        metrics["check"]["wall_time_s"] = round(time.perf_counter() - start, 1)
        print(f"{name}: check {metrics['check']}", flush=True)
    return metrics


def check_gaussian(path: Path, data: torch.Tensor, args: argparse.Namespace) -> dict:
    """Network log p vs the exact Gaussian log p_t0 on samples of the true Gaussian."""
    size = data.shape[-1]
    mean, cov = pca_gaussian(size)
    sde = VPSDE(0.1, 20.0)
    truth = GaussianScore(mean, cov, sde)
    n = 4 if args.quick else 16
    x = sample_gaussian(mean, cov, n, generator=torch.Generator().manual_seed(args.seed + 1))
    loaded = load_pretrained(path, t0=CHECK_T0)
    prior = ScorePrior(loaded.score, loaded.sde, t0=CHECK_T0, event_shape=loaded.event_shape,
                       gaussian_base=GaussianPrior.fit(data, floor=1e-4))
    with torch.no_grad():
        options = ODEOptions(solver="adaptive", divergence="hutchinson", n_probes=16, rtol=1e-3, atol=1e-3)
        net_logp = prior.log_prob(x, options, generator=torch.Generator().manual_seed(args.seed + 2))
    true_logp = truth.log_prob_t(x, CHECK_T0)
    r = float(np.corrcoef(net_logp.numpy(), true_logp.numpy())[0, 1])
    return {"n": n, "pearson_r": r, "r2_line_fit": r * r,
            "r2_identity": 1.0 - float(((net_logp - true_logp) ** 2).sum() / ((true_logp - true_logp.mean()) ** 2).sum()),
            "mean_offset_nats": float((net_logp - true_logp).mean()),
            "true_logp_mean": float(true_logp.mean()), "true_logp_std": float(true_logp.std()),
            "divergence": "hutchinson, 16 Rademacher probes, the training set's Gaussian as control variate",
            "t0": CHECK_T0}


def check_blackhole(path: Path, data: torch.Tensor, args: argparse.Namespace) -> dict:
    """Mean flux and ring radius of unconditional samples against the training images."""
    prior = load_pretrained(path, t0=CHECK_T0)
    n, steps = (8, 20) if args.quick else (128, 300)
    samples = sample_prior(prior.score, prior.sde, n, tuple(prior.event_shape), steps=steps,
                           run=Run(time_grid="uniform", t0=CHECK_T0, generator=torch.Generator().manual_seed(args.seed + 3),
                                   progress=False))
    reference = data[:1000]

    def stats(x: torch.Tensor) -> dict:
        flux, radius = x.sum((1, 2, 3)).double(), ring_radius(x)
        return {"flux_mean": float(flux.mean()), "flux_std": float(flux.std()),
                "ring_radius_uas_mean": float(radius.mean()), "ring_radius_uas_std": float(radius.std()),
                "min_pixel": float(x.min()), "peak_mean": float(x.amax((1, 2, 3)).mean())}

    return {"n_samples": n, "sampler": f"Euler-Maruyama, {steps} steps, t0 {CHECK_T0}",
            "samples": stats(samples), "training": stats(reference)}


CHECKS = {"gaussian-16": check_gaussian, "blackhole-32": check_blackhole}


def write_json(obj: dict, path: Path) -> None:
    """JSON to a temporary file in the same folder, then renamed over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)


def study_arguments(doc: str, quick_help: str, seed_help: str, names: list[str]) -> argparse.ArgumentParser:
    """The arguments of the prior studies: --out (folder), --quick, --seed and --only (a subset of `names`)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.json and checkpoints (created)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--only", nargs="+", choices=names, help="these only")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = study_arguments(__doc__, "20 steps each and tiny checks; installs nothing",
                             "seeds data, networks, batches and noise", sorted(SPECS))
    parser.add_argument("--pretrained-dir", default=None,
                        help=f"where the slim exports go (default {PRETRAINED_DIR}, or --out/pretrained with --quick)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar while training")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    default_dir = out / "pretrained" if args.quick else PRETRAINED_DIR
    pretrained_dir = Path(args.pretrained_dir) if args.pretrained_dir else default_dir
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics.update({"python": platform.python_version(), "torch": torch.__version__, "quick": args.quick,
                    "threads": torch.get_num_threads(), "sde": {"kind": "VPSDE", "beta_min": 0.1, "beta_max": 20.0},
                    "unet": {"channels": list(CHANNELS), "fourier_scale": FOURIER_SCALE},
                    "recipe": asdict(RECIPE),
                    "specs": {name: asdict(spec) for name, spec in SPECS.items()}})
    priors = metrics.setdefault("priors", {})
    for name in args.only or SPECS:
        priors[name] = train_one(name, SPECS[name], args, pretrained_dir)
        write_json(metrics, metrics_path)
    total = sum(p.stat().st_size for p in pretrained_dir.glob("*.pt"))
    print(f"wrote {metrics_path}; {pretrained_dir} holds {total / 1e6:.2f} MB of priors "
          f"({math.fsum(m['wall_time_s'] for m in priors.values()) / 60:.1f} min of training recorded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
