"""Calibration runs: many simulated problems, a posterior for each, and their diagnostics.

Problem `index` of a run with seed `seed` draws its truth x ~ prior, its measurement y = A x + noise and
its posterior draws from one torch.Generator seeded by numpy's SeedSequence([seed, index]), so a problem
depends on (seed, index) only and a run can be split across processes (`run_problem`) and merged.
A posterior is a callable `posterior(likelihood, n, *, generator) -> dict` with at least "samples"
(n, *image_shape) and "log_q" (n,) (the log-density of the draws under the posterior, nats); every key
is stacked over problems by `run_calibration`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from scoreprior import diagnostics
from scoreprior._checks import nonnegative_int, positive_float, positive_int
from scoreprior.distributed import map_sharded
from scoreprior.likelihood import GaussianLikelihood
from scoreprior.operators import LinearOperator
from scoreprior.posterior import DPI, FitConfig
from scoreprior.priors import GaussianPrior, gaussian_posterior
from scoreprior.protocols import Prior

__all__ = ["DPIPosterior", "ExactGaussianPosterior", "FUNCTIONALS", "LEVELS", "calibration_metrics",
           "problem_generator", "run_calibration", "run_problem", "write_report"]

LEVELS = tuple(round(0.1 * k, 1) for k in range(1, 10))
"""Credible levels of the coverage curves: 0.1, ..., 0.9."""

FUNCTIONALS: dict[str, Callable[[Tensor], Tensor]] = {
    "flux": lambda x: x.flatten(1).sum(1),
    "max": lambda x: x.flatten(1).max(1).values,
}
"""Scalar image summaries ranked by SBC: total flux and peak brightness. x: (N, *image_shape) -> (N,)."""


def problem_generator(seed: int, index: int, device: torch.device | str | None = None) -> torch.Generator:
    """The generator of problem `index` in a run seeded with `seed`: independent streams for all pairs.

    seed, index: non-negative integers (numpy's SeedSequence takes no negative entropy).
    """
    seed, index = nonnegative_int(seed, "seed"), nonnegative_int(index, "index")
    state = int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device or "cpu").manual_seed(state)


class ExactGaussianPosterior:
    """Draws from the exact posterior N(m, c Σ) of a Gaussian prior and a linear-Gaussian likelihood.

    prior: the GaussianPrior the truths come from. cov_scale: c, multiplies the exact covariance Σ
    (`gaussian_posterior`), so the std by √c: c = 1 is calibrated, c < 1 over-confident, c > 1 too wide.
    """

    def __init__(self, prior: GaussianPrior, *, cov_scale: float = 1.0) -> None:
        self.prior = prior
        self.cov_scale = positive_float(cov_scale, "cov_scale")

    def __call__(self, likelihood: GaussianLikelihood, n: int, *, generator: torch.Generator) -> dict[str, Tensor]:
        """n draws and their log-density under N(m, c Σ): {"samples": (n, *event_shape), "log_q": (n,)}."""
        mean, cov = gaussian_posterior(self.prior, likelihood)
        scaled = GaussianPrior(mean, self.cov_scale * cov)
        samples = scaled.sample(n, generator=generator)
        return {"samples": samples, "log_q": scaled.log_prob(samples)}


class DPIPosterior:
    """Fits a DPI flow (scoreprior.posterior.DPI) to each problem and draws from it.

    prior: the `Prior` DPI trains with (`log_prob(x) -> (B,)`), e.g. a GaussianPrior, SurrogatePrior or
        ScorePrior with `event_shape`. image_shape: (C, H, W).
    steps, batch_size, lr, n_flows, hidden, prior_kwargs: as DPI / DPI.fit (warm-up: a tenth of
        the steps, at most 100; cosine decay).
    init_scale: the flow's initial output scale; default 0.1 without a reference, 1 with one (the flow then
        starts at the reference itself).
    reference: None (the flow starts at N(0, init_scale^2 I)) or a function likelihood -> `GaussianPrior` on
        images of image_shape, the Gaussian reference the flow starts from for that problem, as the main job's
        DPI does, e.g. `lambda lik: reference_posterior(prior_draws, lik, floor=...)` (`scoreprior.priors`).
        Without one the flow is over-confident under Fourier subsampling and the EHT operator
        (studies/sampler_calibration.py).
    The flow's seed, its latents and the prior's randomness (a SurrogatePrior's times, a ScorePrior's Hutchinson
    probes: `DPI.fit` hands them its generator) come from the problem's generator, so a problem's result does not
    depend on the problems run before it in the same process, and the global RNG is not touched.
    """

    def __init__(self, prior: Prior, image_shape: tuple[int, ...], *, steps: int = 300, batch_size: int = 64,
                 lr: float = 1e-2, n_flows: int = 4, hidden: int = 64, init_scale: float | None = None,
                 prior_kwargs: dict | None = None,
                 reference: Callable[[GaussianLikelihood], GaussianPrior] | None = None) -> None:
        if reference is not None and not callable(reference):
            raise TypeError(f"reference: expected None or a function likelihood -> GaussianPrior, got "
                            f"{type(reference).__name__}")
        self.prior, self.image_shape, self.reference = prior, tuple(image_shape), reference
        self.steps, self.batch_size = positive_int(steps, "steps"), positive_int(batch_size, "batch_size")
        if init_scale is None:
            init_scale = 0.1 if reference is None else 1.0
        self.lr, self.init_scale = positive_float(lr, "lr"), positive_float(init_scale, "init_scale")
        self.n_flows, self.hidden = positive_int(n_flows, "n_flows"), positive_int(hidden, "hidden")
        self.prior_kwargs = prior_kwargs

    def __call__(self, likelihood: GaussianLikelihood, n: int, *, generator: torch.Generator) -> dict[str, Tensor]:
        """Fit, then n draws: {"samples": (n, *image_shape), "log_q": (n,), "final_loss": 0-d, "skipped": 0-d}."""
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        reference = None if self.reference is None else self.reference(likelihood)
        dpi = DPI(self.image_shape, n_flows=self.n_flows, hidden=self.hidden, init_scale=self.init_scale, seed=seed,
                  reference=reference)
        config = FitConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup=min(100, self.steps // 10))
        history = dpi.fit(self.prior, likelihood, config, prior_kwargs=self.prior_kwargs, progress=False,
                          generator=generator)
        with torch.no_grad():
            samples, log_q = dpi.sample(n, generator=generator)
        return {"samples": samples, "log_q": log_q, "final_loss": torch.tensor(history["loss"][-1]),
                "skipped": torch.tensor(sum(history["skipped"]))}


def run_problem(
    index: int, *, seed: int, truth_prior: object, operator: LinearOperator, sigma: float,
    posterior: Callable[..., dict[str, Tensor]], n_samples: int,
) -> dict[str, Tensor]:
    """Simulate problem `index` of the run seeded `seed` and draw its posterior.

    truth_prior: `sample(n, generator=...) -> (n, *image_shape)`, the law of the truths (for SBC it must be
        the prior the posterior assumes). operator, sigma: y = A x + noise of std sigma (GaussianLikelihood).
    posterior: see the module docstring. n_samples: L draws.
    Returns the posterior's dict plus "truth" (*image_shape) and "y" (*measurement_shape).
    """
    generator = problem_generator(seed, index)
    truth = truth_prior.sample(1, generator=generator)
    y = GaussianLikelihood(operator, operator.A(truth), sigma).sample(truth, generator=generator)
    result = posterior(GaussianLikelihood(operator, y, sigma), n_samples, generator=generator)
    return {**result, "truth": truth[0], "y": y[0]}


def run_calibration(
    indices: Iterable[int], *, progress: bool = False, desc: str = "problems", **problem
) -> dict[str, Tensor] | None:
    """`run_problem` for each index, results stacked: "samples" (P, L, *image_shape), "truth" (P, ...), ...

    problem: the keyword arguments of `run_problem` (seed, truth_prior, operator, sigma, posterior, n_samples).
    Under a torch.distributed process group (e.g. torchrun) the problems are split across the ranks
    (`scoreprior.distributed.map_sharded`): rank 0 gets every result, in order; the other ranks get None.
    """
    results = map_sharded(lambda i: run_problem(i, **problem), list(indices), desc=desc if progress else None)
    if results is None:
        return None
    return {key: torch.stack([r[key] for r in results]) for key in results[0]}


def calibration_metrics(
    samples: Tensor, truths: Tensor, *, levels: Iterable[float] = LEVELS,
    functionals: Mapping[str, Callable[[Tensor], Tensor]] = FUNCTIONALS, seed: int = 0,
) -> dict:
    """JSON-ready calibration numbers of one posterior over P problems.

    samples: (P, L, *image_shape); truths: (P, *image_shape).
    Returns coverage (mean over problems of the pixel coverage of ETI and HDI intervals at `levels`, with
    the conservative 95 % binomial band of P problems), TARP (ECP at 21 levels from one reference per
    problem drawn with `seed`, ATC, largest |ECP - α|), and SBC (chi-square p-values of the functionals'
    ranks; for the pixels, the fraction of p-values below 0.05 and the smallest one times the number of
    pixels, a Bonferroni p-value).
    """
    levels = list(levels)
    p, n = samples.shape[:2]
    lower, upper = diagnostics.binomial_band(p, levels)
    out: dict = {"n_problems": p, "n_samples": n, "levels": levels,
                 "band95": {"lower": lower.tolist(), "upper": upper.tolist()}}
    for kind in ("eti", "hdi"):
        out[f"coverage_{kind}"] = diagnostics.coverage(samples, truths, levels, kind=kind).mean(0).tolist()
    alpha = torch.linspace(0, 1, 21, dtype=samples.dtype)
    ecp, alpha = diagnostics.tarp_coverage(samples, truths, alpha=alpha,
                                           generator=torch.Generator(device=samples.device).manual_seed(seed))
    out["tarp"] = {"alpha": alpha.tolist(), "ecp": ecp.tolist(), "atc": diagnostics.tarp_atc(ecp, alpha),
                   "max_abs_deviation": float((ecp - alpha).abs().max())}
    ranks = diagnostics.sbc_ranks(samples, truths, functionals)
    pixels = diagnostics.rank_uniformity(ranks.pop("pixels").flatten(1), n)
    out["sbc"] = {"pvalues": {name: float(diagnostics.rank_uniformity(r, n)) for name, r in ranks.items()},
                  "pixel_fraction_p_below_0.05": float((pixels < 0.05).double().mean()),
                  "pixel_bonferroni_p": min(1.0, float(pixels.min()) * pixels.numel())}
    return out


def write_report(
    out: Path, runs: Mapping[str, Mapping[str, Tensor]], *, seed: int = 0, extra: Mapping | None = None,
    functionals: Mapping[str, Callable[[Tensor], Tensor]] = FUNCTIONALS,
) -> tuple[dict, list[Path]]:
    """Metrics and figures of several posteriors of the same problems into the folder `out`.

    runs: label -> `run_calibration` output (needs "samples" and "truth"). extra: more JSON entries.
    Writes metrics.json, coverage.png (ETI coverage curves with the binomial band), tarp.png, sbc.png (ECDF
    differences of the functionals' ranks with simultaneous 95 % bands) and summary_<label>.png (maps of
    the first problem). Returns (metrics, written paths).
    """
    from scoreprior import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {label: calibration_metrics(run["samples"], run["truth"], functionals=functionals, seed=seed)
               for label, run in runs.items()}
    first = next(iter(metrics.values()))
    figures = {
        "coverage": plots.coverage_figure(first["levels"], {k: m["coverage_eti"] for k, m in metrics.items()},
                                          n=first["n_problems"]),
        "tarp": plots.tarp_figure({k: (m["tarp"]["ecp"], m["tarp"]["alpha"]) for k, m in metrics.items()},
                                  n=first["n_problems"]),
        "sbc": plots.sbc_ecdf_figure({
            f"{label}: {name}": diagnostics.sbc_ecdf(ranks, run["samples"].shape[1], seed=seed)
            for label, run in runs.items()
            for name, ranks in diagnostics.sbc_ranks(run["samples"], run["truth"], functionals).items()
            if name != "pixels"}, ncols=len(functionals)),
    }
    for label, run in runs.items():
        maps = diagnostics.summary_maps(run["samples"][0], run["truth"][0])
        figures[f"summary_{label}"] = plots.summary_figure(maps, truth=run["truth"][0])
    paths = []
    for name, fig in figures.items():
        paths.append(out / f"{name}.png")
        fig.savefig(paths[-1], dpi=110)
    document = {**(extra or {}), "results": metrics}
    paths.append(out / "metrics.json")
    paths[-1].write_text(json.dumps(document, indent=2) + "\n")
    return document, paths

