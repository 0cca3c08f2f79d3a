"""Sampler calibration benchmark: every posterior method next to an exact posterior, by coverage and not only PSNR.

Part "gaussian" (exact posteriors). An 8×8 circulant Gaussian prior (`circulant_prior`: a periodic field with a
squared-exponential spectrum of length 2 px, pixel std 0.22, mean 0.5) with its exact score (`GaussianScore` on the VP SDE), so every posterior
N(m*, C*) is known (`gaussian_posterior`). Four problems: denoising (σ 0.1), blur (1 px, σ 0.05), the lowest 3×3
DFT coefficients (complex σ 0.05) and the EHT 2017 M87 uv-coverage on an 8×8, 160 µas grid (complex σ 0.05).
For each, `--truths` truths drawn from the prior and `--draws` draws per truth by each method; against the exact
posterior of that truth: the mean error in posterior stds (RMS over pixels of (mean of draws − m*) / s*; its
Monte Carlo floor is 1 / sqrt(draws)), the std ratio (mean over pixels of the draws' std / s*), the Wasserstein-2
distance between the Gaussian fitted to the draws and the exact one (Monte Carlo floor: the exact sampler's row),
and the fraction of pixels whose truth lies in the draws' central 90 % interval (0.9 if calibrated).

Part "blackhole" (the shipped prior). `--bh-truths` truths drawn from the shipped blackhole-32 prior itself
(`sample_prior`, 500 steps on the log-SNR grid: for simulation-based calibration the truths must come from the prior
the samplers assume, and the default uniform grid's draws carry white noise that the prior's draws do not,
`blackhole_truths`), each observed like the demo (`simulate_observation`: EHT 2017 at M87, thermal noise), `--bh-draws`
draws per truth by each sampler. Metrics: the fraction of pixels whose truth lies within the draws' range
((n − 1) / (n + 1) if calibrated, n draws), SBC rank-uniformity p-values of the total flux and of the pixels
(`calibration_metrics`), TARP ATC, the closure-phase and log-closure-amplitude reduced χ² of the draws (about 1
at the noise level) and their blurred PSNR at 10 µas (InverseBench's black-hole metrics; over the draws with a
positive total flux, the share of the others reported). DPI is not re-fitted
here (a fit takes 3 minutes; 50 of them are `blackhole_calibration.py`): its row is quoted from that study.

Methods at the package's defaults (nothing tuned on these problems): the exact posterior (a control), DPI with
the closed-form Gaussian prior and with the surrogate (ELBO) prior, both from N(0, I) (`DPIPosterior`, part
gaussian only), DPI with the surrogate from a Gaussian reference like the main job's (dpi_reference: the exact
posterior of the Gaussian fitted to 256 prior draws), DPS,
Score-ALD (needs one noise std: not on EHT data with per-visibility noise), SDE + projection, PnP-DM, DAPS, and
WS (`ws_sample`, covariance data step, ancestral sampler: circulant operators and stationary noise only, so
denoising and blur). Each row gives the network evaluations and the wall time per posterior sample (one
evaluation of a batch of n counts as one per sample; DPS also back-propagates through each).

Every (part, problem, method) result is written to --out/results/ when done and skipped when present: the run
resumes, and `--methods` splits it across processes. The report (metrics.json, table.md, figure.png) is written
from whatever results exist.

    OMP_NUM_THREADS=1 python studies/sampler_calibration.py --out runs/samplers --parts gaussian
    OMP_NUM_THREADS=1 python studies/sampler_calibration.py --out runs/samplers --parts blackhole --methods dps projection
    OMP_NUM_THREADS=1 python studies/sampler_calibration.py --out /tmp/samplers --quick   # about 2 minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from scoreprior.calibration import DPIPosterior, calibration_metrics
from scoreprior.checkpoints import atomic_save
from scoreprior.data import BLACKHOLE_FOV_UAS
from scoreprior.demo import M87, simulate_observation
from scoreprior.eht import load_array, uv_coverage
from scoreprior.likelihood import ClosureLikelihood, GaussianLikelihood
from scoreprior.metrics import blurred_psnr
from scoreprior.operators import FourierSubsample, GaussianBlur, Identity, Interferometer, uas_to_rad
from scoreprior.pretrained import pretrained
from scoreprior.priors import GaussianPrior, gaussian_posterior, reference_posterior
from scoreprior.samplers import Run, daps, dps, pnp_dm, rho_schedule, sample_prior, score_ald, sde_projection
from scoreprior.samplers.engine import CountedScore
from scoreprior.scores import GaussianScore
from scoreprior.sde import VPSDE
from scoreprior.surrogate import SurrogatePrior
from scoreprior.ws import GaussianWhitenedScore, WSProcess, ws_sample

SIZE = 8
METHODS = ("exact", "dpi_exact", "dpi_surrogate", "dpi_reference", "dps", "score_ald", "projection", "pnp_dm", "daps",
           "ws")
PROBLEMS = ("denoise", "blur", "fourier", "eht")
REFERENCE_DRAWS = 256
"""Prior draws whose Gaussian's posterior is dpi_reference's starting point (the demo fits its reference the same way)."""
RING_LEVEL = 0.2
"""Black-hole pixels brighter than this fraction of their truth's peak are "ring", the others "background"."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (finished results are kept)")
    p.add_argument("--quick", action="store_true",
                   help="2 truths, 64 draws, 60 DPI steps; 2 black holes, 2 draws, short samplers: a smoke test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", nargs="+", default=["gaussian", "blackhole"], choices=["gaussian", "blackhole"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--truths", type=int, default=8, help="truths per Gaussian problem")
    p.add_argument("--draws", type=int, default=256, help="draws per truth (Gaussian part)")
    p.add_argument("--bh-truths", type=int, default=50)
    p.add_argument("--bh-draws", type=int, default=4)
    p.add_argument("--dpi-steps", type=int, default=600, help="DPI optimiser steps per Gaussian problem")
    p.add_argument("--shard", type=lambda text: tuple(int(v) for v in text.split("/")), default=(0, 1),
                   metavar="K/N", help="black holes: compute only the truths i with i %% N == K, from the last one down "
                                       "(run N processes; one without --shard meets them from the first truth up)")
    p.add_argument("--partial", action="store_true",
                   help="report the black-hole truths done so far (by processes still running) without computing more")
    args = p.parse_args(argv)
    if args.quick:
        args.truths, args.draws, args.bh_truths, args.bh_draws, args.dpi_steps = 2, 64, 2, 2, 60
    return args


# --- part gaussian ---------------------------------------------------------------------------------------------


def circulant_prior() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mean (1, 8, 8), dense covariance (64, 64) and per-frequency variances c (8, 8) of a periodic Gaussian field:
    c = 0.04 w / mean(w) + 0.01 with w = exp(-2 π² l² |f|²), l = 2 px (a squared-exponential kernel's spectrum),
    so the pixel variance is mean(c) = 0.05; the covariance is the circulant matrix of ifft2(c)."""
    f = torch.fft.fftfreq(SIZE, dtype=torch.float64)
    w = torch.exp(-2 * math.pi**2 * 2.0**2 * (f[:, None] ** 2 + f[None, :] ** 2))
    spectrum = 0.04 * w / w.mean() + 0.01
    kernel = torch.fft.ifft2(spectrum).real
    index = torch.arange(SIZE)
    rows, cols = torch.meshgrid(index, index, indexing="ij")
    dr = (rows.reshape(-1, 1) - rows.reshape(1, -1)) % SIZE
    dc = (cols.reshape(-1, 1) - cols.reshape(1, -1)) % SIZE
    return torch.full((1, SIZE, SIZE), 0.5, dtype=torch.float64), kernel[dr, dc], spectrum


def operator_of(problem: str) -> tuple[object, float]:
    """The forward operator and noise std of a Gaussian-part problem."""
    if problem == "denoise":
        return Identity(), 0.1
    if problem == "blur":
        return GaussianBlur(1.0), 0.05
    if problem == "fourier":
        return FourierSubsample(3, image_size=(SIZE, SIZE)), 0.05
    cover = uv_coverage(load_array("EHT2017"), M87["ra_hours"], M87["dec_deg"], M87["mjd"], rf=M87["rf"], tint=60.0)
    return Interferometer(cover.uv, SIZE, uas_to_rad(160.0)), 0.05


def gaussian_metrics(draws: torch.Tensor, truth: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> dict:
    """Draws (n, 1, 8, 8) against the exact posterior N(mean (64,), cov (64, 64)) of one truth (1, 8, 8)."""
    x = draws.reshape(draws.shape[0], -1).double()
    mean = mean.reshape(-1)
    std = cov.diagonal().sqrt()
    m_hat, c_hat = x.mean(0), torch.cov(x.T)
    root = _sqrtm(cov)
    cross = _sqrtm(root @ c_hat @ root)
    w2 = max(0.0, float((m_hat - mean).square().sum() + torch.trace(c_hat + cov - 2 * cross))) ** 0.5
    lo, hi = torch.quantile(x, torch.tensor([0.05, 0.95], dtype=x.dtype), dim=0)
    t = truth.reshape(-1)
    return {"mean_error_stds": float(((m_hat - mean) / std).square().mean().sqrt()),
            "std_ratio": float((x.std(0) / std).mean()), "w2": w2,
            "coverage90": float(((t >= lo) & (t <= hi)).double().mean())}


def _sqrtm(a: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((a + a.T) / 2)
    return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T


def options(method: str, quick: bool) -> dict:
    """A sampler's keyword arguments: its defaults; --quick cuts every sampler to a smoke test (10 iterations,
    10 levels, 50 steps)."""
    if quick:
        return {"pnp_dm": {"rho": rho_schedule(decay=0.5, iterations=10)}, "daps": {"levels": 10},
                "score_ald": {"n_levels": 10}}.get(method, {"steps": 50})
    return {}


SAMPLERS = {"dps": dps, "score_ald": score_ald, "projection": sde_projection, "pnp_dm": pnp_dm, "daps": daps}


def gaussian_method(method: str, score, sde, likelihood, n: int, run: Run, prior: dict, args: argparse.Namespace
                    ) -> torch.Tensor:
    """n posterior draws (n, 1, 8, 8) of one method for one Gaussian-part likelihood."""
    shape = (1, SIZE, SIZE)
    if method in SAMPLERS:
        return SAMPLERS[method](score, sde, likelihood, n, shape, **options(method, args.quick), run=run)
    if method == "ws":
        return ws_sample(score, prior["ws_process"], n, shape, likelihood=likelihood, prior_spectrum=prior["spectrum"],
                         **options(method, args.quick), run=run)
    if method == "exact":
        return GaussianPrior(*gaussian_posterior(prior["prior"], likelihood)).sample(n, generator=run.generator)
    fit_prior = prior["prior"] if method == "dpi_exact" else SurrogatePrior(score, sde, n_time_samples=2)
    reference = None
    if method == "dpi_reference":  # the main job's DPI: the surrogate, from the Gaussian of prior draws' posterior
        draws = prior["prior"].sample(REFERENCE_DRAWS, generator=torch.Generator().manual_seed(args.seed + 7))
        reference = functools.partial(reference_posterior, draws, floor=fit_prior.smoothing)
    return DPIPosterior(fit_prior, shape, steps=args.dpi_steps, reference=reference)(likelihood, n,
                                                                                     generator=run.generator)["samples"]


def applies(method: str, problem: str) -> str | None:
    """Why a method does not run on a problem (None: it does)."""
    if method == "ws" and problem not in ("denoise", "blur"):
        return "WS: the covariance data step needs a circulant operator with the image's shape"
    if problem == "blackhole" and method == "score_ald":
        return "Score-ALD needs one noise std; EHT visibilities have one each"
    if problem == "blackhole" and method == "ws":
        return "WS: the interferometer is not circulant"
    if problem == "blackhole" and method.startswith("dpi"):
        return "DPI: quoted from blackhole_calibration.py (50 fits of 3 minutes)"
    return None


def run_gaussian(args: argparse.Namespace, method: str, problem: str) -> dict:
    mean, cov, spectrum = circulant_prior()
    sde = VPSDE()
    prior = {"prior": GaussianPrior(mean, cov), "score": GaussianScore(mean, cov, sde), "spectrum": spectrum}
    prior["ws_process"] = WSProcess(torch.ones(SIZE, SIZE, dtype=torch.float64))
    prior["ws_model"] = GaussianWhitenedScore(mean, spectrum, prior["ws_process"])
    operator, sigma = operator_of(problem)
    rows = []
    for k in range(args.truths):
        g = torch.Generator().manual_seed(args.seed * 1000 + PROBLEMS.index(problem) * 100 + k)
        truth = prior["prior"].sample(1, generator=g)
        y = GaussianLikelihood(operator, operator.A(truth), sigma).sample(truth, generator=g)
        likelihood = GaussianLikelihood(operator, y, sigma)
        post_mean, post_cov = gaussian_posterior(prior["prior"], likelihood)
        score = CountedScore(prior["ws_model"] if method == "ws" else prior["score"])
        start = time.perf_counter()
        draws = gaussian_method(method, score, sde, likelihood, args.draws,
                                Run(generator=g, dtype=torch.float64, progress=False), prior, args)
        seconds = time.perf_counter() - start
        rows.append(gaussian_metrics(draws, truth, post_mean, post_cov)
                    | {"evals_per_sample": score.calls, "seconds_per_sample": seconds / args.draws})
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]} | {"truths": len(rows)}


# --- part blackhole --------------------------------------------------------------------------------------------


def blackhole_truths(args: argparse.Namespace, prior) -> torch.Tensor:
    """`--bh-truths` draws of the shipped prior, cached in --out/results: 500 reverse-SDE steps on the log-SNR grid to
    the prior's t0. About as rough as the training images (mean |4-neighbour Laplacian| 0.032 against 0.028); the
    uniform grid's draws are not (0.077: its last step's noise stays), and noisy truths make every sampler whose
    draws are clean look over-confident."""
    path = args.out / "results" / f"bh_truths_{args.bh_truths}_{args.seed}_log_snr.pt"
    if path.exists():
        return torch.load(path)
    truths = sample_prior(prior.score, prior.sde, args.bh_truths, tuple(prior.event_shape), steps=500,
                          run=Run(t0=prior.t0, time_grid="log_snr",
                                  generator=torch.Generator().manual_seed(70_000 + args.seed), progress=False))
    atomic_save(truths, path)
    return truths


def blackhole_method(method: str, score, prior, likelihood: GaussianLikelihood, n: int, run: Run, quick: bool
                     ) -> torch.Tensor:
    """n draws of one sampler for one black-hole observation (settings: `options`)."""
    return SAMPLERS[method](score, prior.sde, likelihood, n, tuple(prior.event_shape),
                            **options(method, quick), run=run)


def closure_likelihood(likelihood: GaussianLikelihood) -> ClosureLikelihood:
    """The closure phases and log closure amplitudes of a simulated observation's visibilities."""
    cover = uv_coverage(load_array("EHT2017"), M87["ra_hours"], M87["dec_deg"], M87["mjd"], rf=M87["rf"], tint=60.0)
    if not np.allclose(cover.uv, likelihood.operator.uv.numpy()):
        raise RuntimeError("uv_coverage no longer matches simulate_observation's visibilities")
    std = likelihood.noise.std.reshape(-1).double().numpy() / math.sqrt(2)  # per component, data units
    cover = dataclasses.replace(cover, sigma=std)
    return ClosureLikelihood.from_observation(cover, 32, uas_to_rad(BLACKHOLE_FOV_UAS), vis=likelihood.y[0].numpy())


def run_blackhole_truth(args: argparse.Namespace, method: str, prior, truth: torch.Tensor, k: int) -> dict:
    """One truth's draws and per-truth numbers (draws kept for the SBC / TARP of the whole set)."""
    likelihood, _ = simulate_observation(truth[None], fov_uas=BLACKHOLE_FOV_UAS, seed=80_000 + k)
    score = CountedScore(prior.score)
    start = time.perf_counter()
    draws = blackhole_method(method, score, prior, likelihood, args.bh_draws,
                             Run(t0=prior.t0, generator=torch.Generator().manual_seed(90_000 + k), progress=False),
                             args.quick)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        chi2 = closure_likelihood(likelihood).reduced_chi2(draws.double())
    lo, hi = draws.min(0).values, draws.max(0).values
    imaged = draws.flatten(1).sum(1) > 0  # blurred PSNR aligns by flux: a draw without positive flux has none
    psnr = blurred_psnr(draws[imaged], truth, fov_uas=BLACKHOLE_FOV_UAS, fwhm_uas=(10.0,)) if imaged.any() else None
    return {"draws": draws, "seconds_per_sample": seconds / args.bh_draws, "evals_per_sample": score.calls,
            "range_coverage": float(((truth >= lo) & (truth <= hi)).double().mean()),
            "chi2_closure_phase": float(chi2["closure_phase"].nanmedian()),
            "chi2_log_closure_amplitude": float(chi2["log_closure_amplitude"].nanmedian()),
            "draws_without_positive_flux": float((~imaged).double().mean()),
            "blurred_psnr_10uas": math.nan if psnr is None else float(psnr.median())}


def run_blackhole(args: argparse.Namespace, method: str) -> dict:
    prior = pretrained("blackhole-32")
    truths = blackhole_truths(args, prior)
    rows, done = [], []
    shard, shards = args.shard
    order = range(len(truths)) if shards == 1 else range(len(truths) - 1, -1, -1)
    for k in order:
        path = args.out / "results" / "blackhole" / method / f"{k}.pt"
        if not path.exists() and (args.partial or k % shards != shard):
            continue
        if not path.exists():
            atomic_save(run_blackhole_truth(args, method, prior, truths[k], k), path)
        rows.append(torch.load(path))
        done.append(k)
        print(f"  blackhole {method} truth {k + 1}/{len(truths)}: range coverage {rows[-1]['range_coverage']:.3f}",
              flush=True)
    if not rows:
        return {"skipped": "no truth done yet"}
    if shards > 1 and len(done) < len(truths):
        return {"skipped": f"shard {shard}/{shards} done; the other shards' truths are missing (report with --partial)"}
    samples, truths = torch.stack([r.pop("draws") for r in rows]), truths[done]
    out = {key: float(np.nanmedian([r[key] for r in rows])) for key in rows[0]}
    out["draws_without_positive_flux"] = float(np.mean([r["draws_without_positive_flux"] for r in rows]))
    out["range_coverage"] = float(np.mean([r["range_coverage"] for r in rows]))
    out |= range_coverage_by_region(samples, truths)
    out["nominal_range_coverage"] = (args.bh_draws - 1) / (args.bh_draws + 1)
    metrics = calibration_metrics(samples, truths, seed=args.seed)
    out |= {"truths": len(rows), "sbc_flux_p": metrics["sbc"]["pvalues"]["flux"],
            "sbc_pixel_fraction_p_below_0.05": metrics["sbc"]["pixel_fraction_p_below_0.05"],
            "tarp_atc": metrics["tarp"]["atc"]}
    return out


def range_coverage_by_region(samples: torch.Tensor, truths: torch.Tensor) -> dict:
    """The share of pixels whose truth lies in the draws' range, on the ring (truth above RING_LEVEL of its peak) and
    on the background (the rest): the mean over truths and its standard error (the background's many pixels
    dominate the whole image's figure). samples: (P, L, *image); truths: (P, *image), P >= 2."""
    inside = ((truths >= samples.min(1).values) & (truths <= samples.max(1).values)).flatten(1).double()
    ring = (truths > RING_LEVEL * truths.flatten(1).amax(1).reshape(-1, *[1] * (truths.ndim - 1))).flatten(1)
    out = {}
    for name, region in (("ring", ring), ("background", ~ring)):
        share = (inside * region).sum(1) / region.sum(1)
        out[f"range_coverage_{name}"] = float(share.mean())
        out[f"range_coverage_{name}_se"] = float(share.std() / math.sqrt(len(share)))
    return out


# --- report ----------------------------------------------------------------------------------------------------


def table(results: dict) -> str:
    lines = ["| part | problem | method | mean error (post. stds) | std ratio | W2 | truth in 90 % interval | "
             "evaluations / sample | seconds / sample |", "|---|---|---|---|---|---|---|---|---|"]
    gaussian = results.get("gaussian", {})
    for problem, method in sorted(gaussian, key=lambda key: (PROBLEMS.index(key[0]), METHODS.index(key[1]))):
        r = gaussian[(problem, method)]
        if "skipped" in r:
            lines.append(f"| gaussian | {problem} | {method} | – | – | – | – | – | {r['skipped']} |")
            continue
        lines.append(f"| gaussian | {problem} | {method} | {r['mean_error_stds']:.3f} | {r['std_ratio']:.3f} | "
                     f"{r['w2']:.3f} | {r['coverage90']:.3f} | {r['evals_per_sample']:.0f} | "
                     f"{r['seconds_per_sample']:.2g} |")
    if results.get("blackhole"):
        lines += ["", "| method | truth in draws' range: all / ring / background, ± s.e. over truths (nominal) | "
                  "SBC p flux | pixels with SBC p < 0.05 | TARP ATC | "
                  "χ² closure phase | χ² log closure amp. | blurred PSNR 10 µas (dB) | draws without flux | "
                  "evaluations / sample | seconds / sample |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for method, r in sorted(results["blackhole"].items(), key=lambda item: METHODS.index(item[0])):
            if "skipped" in r:
                lines.append(f"| {method} | – | – | – | – | – | – | – | – | – | {r['skipped']} |")
                continue
            lines.append(f"| {method} | {r['range_coverage']:.3f} / {r['range_coverage_ring']:.3f} ± "
                         f"{r['range_coverage_ring_se']:.3f} / {r['range_coverage_background']:.3f} ± "
                         f"{r['range_coverage_background_se']:.3f} ({r['nominal_range_coverage']:.3f}) | "
                         f"{r['sbc_flux_p']:.2g} | {r['sbc_pixel_fraction_p_below_0.05']:.2f} | {r['tarp_atc']:+.3f} | "
                         f"{r['chi2_closure_phase']:.2f} | {r['chi2_log_closure_amplitude']:.2f} | "
                         f"{r['blurred_psnr_10uas']:.1f} | {r['draws_without_positive_flux']:.0%} | "
                         f"{r['evals_per_sample']:.0f} | {r['seconds_per_sample']:.2g} |")
    return "\n".join(lines) + "\n"


def figure(results: dict, path: Path) -> None:
    """Std ratio against mean error per Gaussian problem (each method a marker), and black-hole range coverage."""
    fig = Figure(figsize=(11, 4))
    ax, bx = fig.subplots(1, 2)
    for method in METHODS:
        points = [(r["mean_error_stds"], r["std_ratio"]) for (p, m), r in results.get("gaussian", {}).items()
                  if m == method and "skipped" not in r]
        if points:
            ax.scatter(*zip(*points), label=method, s=25)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set(xscale="log", yscale="log", xlabel="mean error (posterior stds)", ylabel="std ratio",
           title="Gaussian priors: every problem, every method")
    ax.legend(fontsize=7)
    bh = {m: r for m, r in results.get("blackhole", {}).items() if "skipped" not in r}
    if bh:
        names = np.arange(len(bh))
        for shift, (key, label) in zip((-0.2, 0.2), (("range_coverage_ring", "ring"),
                                                      ("range_coverage_background", "background"))):
            bx.bar(names + shift, [r[key] for r in bh.values()], width=0.4, label=label)
        bx.set_xticks(names, list(bh))
        bx.axhline(next(iter(bh.values()))["nominal_range_coverage"], color="k", ls="--", label="calibrated")
        bx.set(ylabel="pixels whose truth is in the draws' range", title="black holes, shipped prior")
        bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    (args.out / "results").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    results: dict = {"gaussian": {}, "blackhole": {}}
    for part in args.parts:
        for method in args.methods:
            if part == "blackhole" and method == "exact":
                continue
            for problem in PROBLEMS if part == "gaussian" else ("blackhole",):
                path = args.out / "results" / f"{part}_{problem}_{method}.json"
                if not path.exists() or (args.partial and part == "blackhole"):
                    why = applies(method, problem)
                    print(f"{part} {problem} {method}", flush=True)
                    try:
                        result = {"skipped": why} if why else (run_gaussian(args, method, problem)
                                                              if part == "gaussian" else run_blackhole(args, method))
                    except FloatingPointError as err:  # a sampler that diverges at its defaults is a result too
                        result = {"skipped": f"diverged at the defaults ({str(err).split(';')[0]})"}
                    path.write_text(json.dumps(result, indent=1))
    for path in sorted((args.out / "results").glob("*.json")):
        part, problem, method = path.stem.split("_", 2)
        if part == "gaussian":
            results["gaussian"][(problem, method)] = json.loads(path.read_text())
        else:
            results["blackhole"][method] = json.loads(path.read_text())
    (args.out / "table.md").write_text(table(results))
    figure(results, args.out / "figure.png")
    metrics = {"gaussian": {f"{p}/{m}": r for (p, m), r in results["gaussian"].items()}, "blackhole": results["blackhole"],
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "wall_seconds": time.perf_counter() - start, "platform": platform.platform(), "torch": torch.__version__,
               "command": " ".join(sys.argv)}
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(table(results))
    print(f"wrote {args.out / 'metrics.json'}, {args.out / 'table.md'} and {args.out / 'figure.png'}")
    return metrics


if __name__ == "__main__":
    main()
