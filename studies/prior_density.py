"""The shipped priors as density models: held-out likelihoods against a Gaussian, samples against data (issue 15).

For every prior of --pretrained-dir (default: the shipped ones), on the held-out images of
`train_priors.datasets` (never seen in training):
  test NLL      -log p_t0(x) by the probability-flow ODE (`ScorePrior.log_prob`, t0 = 1e-5: the data
                plus noise of std s(t0) = 0.001), Hutchinson's trace with Rademacher probes and the
                baseline Gaussian as control variate (unbiased; its noise is in the standard error), 2 probes,
                tolerances 1e-3 (solver error ~3e-4 nats/dim, issue 14), 256 test images of 16 x 16 and 128 of
                24 x 24 or 32 x 32 (faces-24 has 20), in
                nats/dim and bits/dim. Images are continuous values on [0, 1] (block averages or
                synthetic), not integers, so there is no dequantization; bits/dim follow the 8-bit
                convention of `bits_per_dim` (-log p / (d ln 2) + 8), comparable with published numbers only
                for 8-bit data; differences between models do not depend on the convention.
  baseline      the Gaussian fitted to the same training images (`GaussianPrior.fit`, eigenvalue floor
                chosen on 10 % of them held out, `train_priors.validated_floor`): the number any learned
                prior has to beat. gaussian-16 also gets its true density's NLL, the best possible.
  samples       1000 unconditional samples (Euler-Maruyama, 300 steps, t0 = 1e-3) against the
                same number of test images: blackhole-32, two-sample KS p-values of ring diameter, width,
                brightness position angle and flux (`ring_features`) against fresh generator draws;
                the others, the radially averaged power spectrum, as the largest |log10| ratio over
                frequencies of the samples' to the test images' (0: equal; 0.1: 26 %).

    OMP_NUM_THREADS=2 python studies/prior_density.py --out runs/prior_density            # about 30 min
    OMP_NUM_THREADS=2 python studies/prior_density.py --out /tmp/pd --quick                 # about 2 min
    python studies/prior_density.py --out runs/prior_density_old --pretrained-dir OLD_DIR   # other priors

Writes metrics.json (rewritten after every prior) and prior_density.png; --record stores each prior's test
NLL and its baseline's in the export's metadata (`record_metadata`, shown by `available_priors()`).
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
from matplotlib.ticker import NullFormatter
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_priors import SPECS, datasets, study_arguments, validated_floor, write_json  # noqa: E402

from scoreprior.data import blackhole_images, pca_gaussian, ring_features  # noqa: E402
from scoreprior.density import ScorePrior, bits_per_dim  # noqa: E402
from scoreprior.pretrained import PRETRAINED_DIR, load_pretrained, record_metadata  # noqa: E402
from scoreprior.priors import GaussianPrior  # noqa: E402
from scoreprior.samplers import Run, sample_prior  # noqa: E402
from scoreprior.scores import GaussianScore  # noqa: E402
from scoreprior.solver_options import ODEOptions  # noqa: E402

T0 = 1e-5
SAMPLE_T0 = 1e-3
TEST_SETS = {"blackhole": "fresh blackhole_images draws (seed + 1)", "pca-gaussian": "fresh draws (seed + 1)",
             "natural": "natural_patches of the test split (seed + 1)", "faces": "the last 10 LFW faces and their mirrors"}
FEATURES = ("diameter_uas", "width_uas", "position_angle_deg", "flux")


def per_dim(values: torch.Tensor, d: int) -> dict:
    """Mean NLL of log-densities `values` (N,) in nats/dim, and in bits/dim by the 8-bit convention
    (`bits_per_dim`: 8 more than bits/dim on [0, 1]), with standard errors."""
    nll, bits = -values.double() / d, bits_per_dim(values.double(), d)
    n = len(nll)
    return {"nats_per_dim": float(nll.mean()), "nats_per_dim_se": float(nll.std() / math.sqrt(n)) if n > 1 else None,
            "bits_per_dim": float(bits.mean()), "bits_per_dim_se": float(bits.std() / math.sqrt(n)) if n > 1 else None}


def power_spectrum(images: torch.Tensor) -> torch.Tensor:
    """Radially averaged power spectrum of the mean-removed images, averaged over images. -> (size // 2,)."""
    x = images[:, 0].double()
    power = torch.fft.fft2(x - x.mean((1, 2), keepdim=True)).abs().pow(2).mean(0)
    size = x.shape[-1]
    f = torch.fft.fftfreq(size, dtype=torch.float64) * size
    radius = torch.hypot(f[:, None], f[None, :]).round().long().reshape(-1)
    keep = (radius >= 1) & (radius <= size // 2)
    sums = torch.zeros(size // 2 + 1, dtype=torch.float64).index_add_(0, radius[keep], power.reshape(-1)[keep])
    counts = torch.zeros(size // 2 + 1, dtype=torch.float64).index_add_(0, radius[keep], torch.ones(int(keep.sum()),
                                                                                                  dtype=torch.float64))
    return (sums / counts.clamp_min(1))[1:]


def ring_checks(samples: torch.Tensor, n_reference: int, generator: torch.Generator) -> tuple[dict, dict, dict]:
    """Two-sample KS p-values of `ring_features` of samples (N, 1, H, W) against n_reference fresh
    `blackhole_images`, and the means. A sample without a ring (no positive pixel along any ray: diameter
    NaN) counts as an infinite diameter, so it lowers the p-value instead of vanishing.
    Returns (metrics, features of the samples, features of the reference)."""
    reference = ring_features(blackhole_images(n_reference, samples.shape[-1], generator=generator))
    found = ring_features(samples)
    failed = int((~torch.isfinite(found["diameter_uas"])).sum())
    found = {k: v.nan_to_num(nan=math.inf) for k, v in found.items()}
    ks = {k: float(stats.ks_2samp(found[k].numpy(), reference[k].numpy()).pvalue) for k in FEATURES}
    means = {k: {"samples": float(found[k][torch.isfinite(found[k])].mean()), "data": float(reference[k].mean())}
             for k in FEATURES}
    return {"ks_pvalues": ks, "means": means, "samples_without_ring": failed}, found, reference


def sample_checks(name: str, prior: ScorePrior, test: torch.Tensor, n: int, seed: int) -> tuple[dict, dict]:
    """Samples against data: (metrics, curves for the figure)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        samples = sample_prior(prior.score, prior.sde, n, tuple(prior.event_shape), steps=300,
                               run=Run(time_grid="uniform", t0=SAMPLE_T0, generator=gen, progress=False))
    out = {"n_samples": n, "sampler": f"Euler-Maruyama, 300 steps, t0 {SAMPLE_T0}", "min_pixel": float(samples.min()),
           "max_pixel": float(samples.max())}
    if name.startswith("blackhole"):
        checks, found, reference = ring_checks(samples, n, gen)
        return {**out, **checks}, {"features": (found, reference)}
    data = test[:n]
    ps_samples, ps_data = power_spectrum(samples), power_spectrum(data)
    ratio = (ps_samples / ps_data).log10()
    out["power_spectrum_max_abs_log10_ratio"] = float(ratio.abs().max())
    out["power_spectrum_log10_ratio"] = [round(float(v), 4) for v in ratio]
    out["n_data"] = int(data.shape[0])
    return out, {"spectra": (ps_samples, ps_data)}


def measure(name: str, path: Path, args: argparse.Namespace) -> tuple[dict, dict]:
    """All numbers of one prior: (metrics, curves)."""
    spec = SPECS[name]
    n_test = args.n_test_32 if spec.size >= 24 else args.n_test_16
    train, test, provenance = datasets(spec, 512 if args.quick else spec.n, n_test, args.seed)
    test = test[:n_test]
    d = test[0].numel()
    floor = validated_floor(train)
    gaussian = GaussianPrior.fit(train, floor=floor)
    prior = load_pretrained(path, t0=T0)
    learned = ScorePrior(prior.score, prior.sde, t0=T0, event_shape=prior.event_shape, gaussian_base=gaussian)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed + 2)
    options = ODEOptions(solver="adaptive", divergence="hutchinson", n_probes=args.probes, rtol=args.tol, atol=args.tol)
    with torch.no_grad():
        logp = torch.cat([learned.log_prob(x.double(), options, generator=gen).double()
                          for x in test.split(args.batch)])
    out = {"file": str(path), "provenance": provenance, "test_set": TEST_SETS[spec.dataset], "n_train": int(train.shape[0]), "n_test": int(test.shape[0]),
           "d": d, "t0": T0, "divergence": f"hutchinson, {args.probes} Rademacher probes, Gaussian control variate",
           "tolerance": args.tol, "prior": per_dim(logp, d), "logprob_s": round(time.perf_counter() - start, 1),
           "gaussian_floor": floor, "gaussian": per_dim(gaussian.log_prob(test.double()), d)}
    out["prior_minus_gaussian_bits_per_dim"] = out["prior"]["bits_per_dim"] - out["gaussian"]["bits_per_dim"]
    diff = per_dim(logp - gaussian.log_prob(test.double()), d)
    out["prior_minus_gaussian_bits_per_dim_se"] = diff["bits_per_dim_se"]
    if name == "gaussian-16":
        mean, cov = pca_gaussian(16)
        out["true"] = per_dim(GaussianScore(mean, cov, prior.sde).log_prob_t(test.double(), T0), d)
    start = time.perf_counter()
    out["samples"], curves = sample_checks(name, prior, test, args.samples, args.seed + 3)
    out["samples"]["wall_time_s"] = round(time.perf_counter() - start, 1)
    return out, curves


def record(file: Path, measured: dict) -> None:
    """Store the held-out NLL of a prior and of its Gaussian baseline in the export's metadata
    (`record_metadata`), where `available_priors()` shows them."""
    keep = ("nats_per_dim", "nats_per_dim_se", "bits_per_dim")
    record_metadata(file, {"test_nll": {
        "measured_by": "studies/prior_density.py", "n_test": measured["n_test"], "t0": T0,
        "estimator": measured["divergence"], "prior": {k: measured["prior"][k] for k in keep},
        "gaussian_baseline": {k: measured["gaussian"][k] for k in keep}, "test_set": measured["test_set"]}})


def figure(curves: dict) -> Figure:
    """Power spectra (samples vs test data) and ring-feature histograms (samples vs generator draws)."""
    panels = [(n, k, c) for n, c in curves.items() for k in (FEATURES if "features" in c else ("spectra",))]
    fig = Figure(figsize=(3.2 * len(panels), 3.0), layout="constrained")
    for ax, (name, key, c) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        if key == "spectra":
            ps_samples, ps_data = c["spectra"]
            freq = torch.arange(1, len(ps_data) + 1)
            ax.loglog(freq, ps_data, "k-", label="test images")
            ax.loglog(freq, ps_samples, "C0--", label="prior samples")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on 8 or 16 frequencies
            ax.set(title=f"{name}: power spectrum", xlabel="frequency (cycles / image)")
            ax.legend(fontsize=7)
        else:
            found, reference = c["features"]
            ax.hist(reference[key].numpy(), bins=30, density=True, histtype="step", color="k", label="generator")
            ax.hist(found[key].numpy(), bins=30, density=True, histtype="step", color="C0", label="prior samples")
            ax.set(title=f"{name}: {key}")
            ax.legend(fontsize=7)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = study_arguments(__doc__, "few images and samples, loose tolerance",
                             "seeds data (as train_priors), probes and samples", sorted(SPECS))
    parser.add_argument("--pretrained-dir", type=Path, default=PRETRAINED_DIR, help="folder of slim exports")
    parser.add_argument("--record", action="store_true",
                        help="write each prior's test NLL and its Gaussian baseline into its export's metadata")
    args = parser.parse_args(argv)
    args.n_test_16, args.n_test_32 = (8, 4) if args.quick else (256, 128)
    args.samples = 32 if args.quick else 1000
    args.probes, args.tol, args.batch = (1, 1e-2, 8) if args.quick else (2, 1e-3, 32)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "metrics.json"
    results = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "quick": args.quick, "pretrained_dir": str(args.pretrained_dir), "priors": {}}
    curves = {}
    for name in args.only or sorted(SPECS):
        file = args.pretrained_dir / f"{name}.pt"
        if not file.is_file():
            print(f"{name}: no {file}, skipped", flush=True)
            continue
        results["priors"][name], curves[name] = measure(name, file, args)
        print(f"{name}: {json.dumps({k: v for k, v in results['priors'][name].items() if k != 'samples'})}\n"
              f"  samples: {json.dumps(results['priors'][name]['samples'])}", flush=True)
        write_json(results, path)
        if args.record and not args.quick:
            record(file, results["priors"][name])
    figure(curves).savefig(args.out / "prior_density.png", dpi=120)
    print(f"wrote {path} and {args.out / 'prior_density.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
