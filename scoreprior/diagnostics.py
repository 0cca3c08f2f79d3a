"""Posterior diagnostics: ArviZ export, credible intervals and summary maps, and calibration over many
simulated problems (coverage, SBC, TARP). Image-quality metrics (PSNR, SSIM, nxcorr) are in
`scoreprior.metrics`.

Conventions:
- One posterior: samples (n, *image_shape), image_shape (C, H, W) or (H, W); the truth (*image_shape).
- Calibration runs: samples (P, L, *image_shape), L draws for each of P problems whose truths
  (P, *image_shape) were drawn from the prior and whose measurements from the likelihood. A calibrated
  posterior makes the rank of each truth among its draws uniform (SBC, Talts et al. 2018), so its
  credible intervals cover the truth at their nominal level, and TARP's expected coverage lies on the
  diagonal (Lemos et al. 2023).
- Numerical results are tensors on the input's device and dtype; p-values and bands come from scipy
  (float64 tensors on the input's device). ArviZ, xarray and scipy (core dependencies) are imported
  only by the functions that need them, which keeps `import scoreprior` light.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from scoreprior._checks import choice, integer, number_list, positive_int, probability, real_tensor

__all__ = [
    "IMAGE_DIMS",
    "binomial_band",
    "coverage",
    "credible_interval",
    "rank_uniformity",
    "sbc_ecdf",
    "sbc_ranks",
    "summary_maps",
    "tarp_atc",
    "tarp_coverage",
    "to_datatree",
]

IMAGE_DIMS = {2: ("row", "col"), 3: ("channel", "row", "col")}
"""Names of the image dimensions in a DataTree, by the number of image dimensions."""

_EXTRA = "a dependency of scoreprior; reinstall it (`pip install -e .` in a clone)"


def _require(module: str):
    """Import a dependency lazily (kept out of `import scoreprior`); ImportError saying to reinstall."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"scoreprior.diagnostics needs {module.split('.')[0]}: {_EXTRA}") from err



def _check_image_batch(samples: object, truths: object) -> tuple[Tensor, Tensor]:
    """samples (P, L, *image_shape) and truths (P, *image_shape) as tensors; ValueError on other shapes."""
    samples, truths = real_tensor(samples, "samples"), real_tensor(truths, "truths")
    if samples.ndim < 3:
        raise ValueError(f"samples: expected shape (P, L, *image_shape), got {tuple(samples.shape)}")
    expected = (samples.shape[0], *samples.shape[2:])
    if tuple(truths.shape) != expected:
        raise ValueError(f"truths: expected shape {expected} (samples {tuple(samples.shape)} without the draw "
                         f"dimension), got {tuple(truths.shape)}")
    return samples, truths.to(device=samples.device, dtype=samples.dtype)


def to_datatree(
    samples: object,
    *,
    truth: object | None = None,
    measurement: object | None = None,
    sample_dims: Sequence[str] = ("draw",),
    var_name: str = "x",
):
    """Posterior draws of images as an ArviZ DataTree, for arviz_stats and NetCDF files.

    samples: (*sample_shape, *image_shape): one sample dimension per name in `sample_dims`, then the
        image, (C, H, W) or (H, W), whose dimensions are named `IMAGE_DIMS`: channel, row, col.
        sample_dims ("draw",): independent draws (DPI, diffusion samplers), stored as one chain,
        chain = 1 and draw = n, so ESS and MCSE apply (R-hat needs several chains and is NaN).
        sample_dims ("chain", "draw"): MCMC output with several chains.
    truth: (*image_shape) the true image, or None; stored in the group "truth" under `var_name` with
        the posterior's image dimensions, so `tree.truth[var_name] - tree.posterior[var_name]` aligns.
    measurement: (1, *measurement_shape) or (*measurement_shape) the measurement y (real or complex), or
        None; stored as "y" in the group "observed_data", the batch dimension of 1 dropped.
    var_name: the name of the image variable.

    Save with `tree.to_netcdf(path)` (engine h5netcdf, complex y included) and read back with
    `xarray.open_datatree(path)`. Returns an `xarray.DataTree`.
    """
    azb = _require("arviz_base")
    if tuple(sample_dims) not in (("draw",), ("chain", "draw")):
        raise ValueError(f"sample_dims: expected ('draw',) or ('chain', 'draw'), got {tuple(sample_dims)}")
    x = real_tensor(samples, "samples")
    n_sample_dims = len(sample_dims)
    image_ndim = x.ndim - n_sample_dims
    if image_ndim not in IMAGE_DIMS:
        raise ValueError(f"samples: expected shape ({', '.join(sample_dims)}, C, H, W) or "
                         f"({', '.join(sample_dims)}, H, W), got {tuple(x.shape)}")
    image_shape = tuple(x.shape[n_sample_dims:])
    values = x.cpu().numpy()
    if n_sample_dims == 1:
        values = values[None]
    groups = {"posterior": {var_name: values}}
    dims = {var_name: list(IMAGE_DIMS[image_ndim])}
    if truth is not None:
        t = real_tensor(truth, "truth")
        if tuple(t.shape) != image_shape:
            raise ValueError(f"truth: expected shape {image_shape} like one sample, got {tuple(t.shape)}")
    if measurement is not None:
        if not isinstance(measurement, (Tensor, np.ndarray)):
            raise TypeError(f"measurement: expected a torch.Tensor or numpy array, got {type(measurement).__name__}")
        y = measurement.detach().cpu().numpy() if isinstance(measurement, Tensor) else measurement
        groups["observed_data"] = {"y": y[0] if y.ndim > 1 and y.shape[0] == 1 else y}
    tree = azb.from_dict(groups, dims=dims)
    if truth is not None:
        tree["truth"] = azb.dict_to_dataset({var_name: t.cpu().numpy()}, dims=dims, sample_dims=[])
    return tree


def credible_interval(samples: object, prob: float, *, kind: str = "hdi") -> Tensor:
    """Per-element credible interval of `prob` mass from draws along dim 0.

    samples: (n, *shape) draws. kind:
        "eti": the central (equal-tailed) interval, the (1 - prob) / 2 and (1 + prob) / 2 quantiles with
            linear interpolation (numpy's default, as arviz_stats.eti);
        "hdi": the shortest interval between two draws that holds m = max(2, ceil(prob n)) of the n draws, i.e.
            [s_(i), s_(i+m-1)] of the sorted draws s with the smallest width (1-D HPD interval for
            unimodal marginals; arviz_stats.hdi takes floor(prob n) + 1 draws, the same unless prob n is
            an integer). Choosing the narrowest of many noisy windows biases it narrow: with n = 200 draws
            of a Gaussian its coverage falls a few points below prob, most at low levels.
    Returns (*shape, 2): lower and upper bounds, samples' dtype and device.
    """
    x = real_tensor(samples, "samples")
    prob = probability(prob, "prob")
    if x.ndim < 1 or x.shape[0] < 2:
        raise ValueError(f"samples: expected shape (n, ...) with n >= 2 draws, got {tuple(x.shape)}")
    choice(kind, "kind", ("hdi", "eti"))
    if kind == "eti":
        q = torch.tensor([(1 - prob) / 2, (1 + prob) / 2], dtype=x.dtype, device=x.device)
        return torch.quantile(x, q, dim=0).movedim(0, -1)
    return _hdi_sorted(torch.sort(x, dim=0).values, prob)


def _hdi_sorted(s: Tensor, prob: float) -> Tensor:
    """Shortest intervals from draws s (n, *shape) sorted along dim 0 -> (*shape, 2); see credible_interval."""
    n = s.shape[0]
    m = min(n, max(2, math.ceil(round(prob * n, 9))))
    widths = s[m - 1:] - s[: n - m + 1]
    start = widths.argmin(0, keepdim=True)
    return torch.cat([s.gather(0, start), s.gather(0, start + m - 1)]).movedim(0, -1)


def summary_maps(samples: object, truth: object | None = None, *, prob: float = 0.9) -> dict[str, Tensor]:
    """Pixelwise posterior summaries of one posterior.

    samples: (n, *image_shape) draws, n >= 2. truth: (*image_shape) or None.
    Returns a dict of (*image_shape) maps, samples' dtype: "mean", "std" (unbiased), "hdi_width" (width of
    the `prob` HDI, see `credible_interval`), and with a truth "error" = mean - truth and
    "zscore" = (mean - truth) / std.
    """
    x = real_tensor(samples, "samples")
    interval = credible_interval(x, prob, kind="hdi")
    maps = {"mean": x.mean(0), "std": x.std(0), "hdi_width": interval[..., 1] - interval[..., 0]}
    if truth is not None:
        t = real_tensor(truth, "truth")
        if t.shape != x.shape[1:]:
            raise ValueError(f"truth: expected shape {tuple(x.shape[1:])} like one sample, got {tuple(t.shape)}")
        maps["error"] = maps["mean"] - t.to(device=x.device, dtype=x.dtype)
        maps["zscore"] = maps["error"] / maps["std"]
    return maps


def coverage(samples: object, truths: object, levels: object, *, kind: str = "eti") -> Tensor:
    """Fraction of pixels whose per-pixel credible interval holds the truth, per problem and level.

    samples: (P, L, *image_shape) draws for P problems; truths: (P, *image_shape).
    levels: credible levels in (0, 1), a number or a sequence of K of them.
    kind: "eti" (central) or "hdi" (shortest) intervals, as `credible_interval`; the truth is covered
        when lower <= truth <= upper.
    Returns (P, K). Its mean over problems is the empirical coverage, which a calibrated posterior brings to
    the nominal level up to the finite-L discreteness (about 1 / L). The pixels of one problem are
    correlated, so `binomial_band(P, levels)` (the band for one pixel) is the conservative band for it.
    """
    x, t = _check_image_batch(samples, truths)
    values = [probability(level, "levels") for level in number_list(levels, "levels")]
    choice(kind, "kind", ("hdi", "eti"))
    draws = x.flatten(2).movedim(1, 0)  # (L, P, d)
    truth = t.flatten(1)
    if kind == "hdi":
        draws = torch.sort(draws, dim=0).values
    out = []
    for level in values:
        bounds = credible_interval(draws, level, kind="eti") if kind == "eti" else _hdi_sorted(draws, level)
        inside = (bounds[..., 0] <= truth) & (truth <= bounds[..., 1])
        out.append(inside.to(x.dtype).mean(1))
    return torch.stack(out, dim=1)


def binomial_band(n: int, levels: object, *, prob: float = 0.95) -> tuple[Tensor, Tensor]:
    """Central `prob` band of a Binomial(n, p) proportion at each p in `levels`.

    lower = F^{-1}((1 - prob) / 2) / n, upper = F^{-1}((1 + prob) / 2) / n, F the Binomial(n, p) CDF
    (quantile: smallest k with F(k) >= q). levels: K probabilities in [0, 1].
    Returns (lower, upper), each (K,) float64.
    """
    stats = _require("scipy.stats")
    positive_int(n, "n")
    prob = probability(prob, "prob")
    p = torch.as_tensor(levels, dtype=torch.float64).reshape(-1)
    if bool(((p < 0) | (p > 1)).any()):
        raise ValueError(f"levels: expected probabilities in [0, 1], got {p.tolist()}")
    lower = stats.binom.ppf((1 - prob) / 2, n, p.numpy()) / n
    upper = stats.binom.ppf((1 + prob) / 2, n, p.numpy()) / n
    return torch.from_numpy(np.asarray(lower, dtype=np.float64)), torch.from_numpy(np.asarray(upper, dtype=np.float64))


def sbc_ranks(
    samples: object,
    truths: object,
    functionals: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
) -> dict[str, Tensor]:
    """Simulation-based-calibration ranks: how many of each problem's draws lie below its truth.

    rank = #{l : s_l < truth}, in {0, ..., L}; uniform on it when the posterior is calibrated and the
    truths come from the prior (Talts et al. 2018).
    samples: (P, L, *image_shape); truths: (P, *image_shape).
    functionals: optional scalar summaries, name -> f with f(images (N, *image_shape)) -> (N,), e.g.
        total flux `lambda x: x.flatten(1).sum(1)`; ranked the same way on f(draws) against f(truth).
    Returns {"pixels": (P, *image_shape) int64, name: (P,) int64 for each functional}.
    """
    x, t = _check_image_batch(samples, truths)
    ranks = {"pixels": (x < t.unsqueeze(1)).sum(1)}
    p, n = x.shape[:2]
    for name, f in (functionals or {}).items():
        drawn, true = f(x.flatten(0, 1)), f(t)
        if tuple(drawn.shape) != (p * n,) or tuple(true.shape) != (p,):
            raise ValueError(f"functionals[{name!r}]: expected f(images (N, ...)) to return shape (N,), got "
                             f"{tuple(drawn.shape)} for N = {p * n} and {tuple(true.shape)} for N = {p}")
        ranks[name] = (drawn.reshape(p, n) < true.unsqueeze(1)).sum(1)
    return ranks


def rank_uniformity(ranks: Tensor, n_samples: int, *, bins: int | None = None) -> Tensor:
    """Chi-square test that SBC ranks are uniform on {0, ..., L}, one test per trailing element.

    ranks: (P, *shape) integer ranks of P independent problems; n_samples: L, the draws per problem.
    bins: the L + 1 rank values are cut into this many contiguous groups of near-equal size (default about
        P / 10 groups, so about 10 expected per group, at most L + 1); expected counts P |group| / (L + 1).
    Statistic sum (O - E)^2 / E with bins - 1 degrees of freedom (Pearson).
    Returns the p-values, (*shape) float64 on ranks' device.
    """
    stats = _require("scipy.stats")
    if not isinstance(ranks, Tensor) or ranks.is_floating_point() or ranks.is_complex() or ranks.ndim < 1:
        got = getattr(ranks, "dtype", type(ranks).__name__)
        raise TypeError(f"ranks: expected an integer tensor of shape (P, ...), got {got}")
    n_samples = positive_int(n_samples, "n_samples")
    if bool(((ranks < 0) | (ranks > n_samples)).any()):
        raise ValueError(f"ranks: expected values in [0, {n_samples}], got [{int(ranks.min())}, {int(ranks.max())}]")
    p = ranks.shape[0]
    bins = min(n_samples + 1, max(2, p // 10)) if bins is None else integer(bins, "bins", low=2, high=n_samples + 1)
    edges = torch.linspace(0, n_samples + 1, bins + 1, dtype=torch.float64).round().long()
    group = torch.bucketize(ranks.cpu().reshape(p, -1), edges[1:-1], right=True)  # (P, m) group of each rank
    observed = torch.nn.functional.one_hot(group, bins).sum(0).double()  # (m, bins)
    expected = p * (edges[1:] - edges[:-1]).double() / (n_samples + 1)
    chi2 = ((observed - expected).square() / expected).sum(-1)
    pvalues = torch.from_numpy(stats.chi2.sf(chi2.numpy(), bins - 1))
    return pvalues.reshape(ranks.shape[1:]).to(ranks.device)


def sbc_ecdf(
    ranks: Tensor, n_samples: int, *, prob: float = 0.95, simultaneous: bool = True, n_simulations: int = 1000,
    seed: int = 0,
) -> dict[str, Tensor]:
    """ECDF of scaled SBC ranks minus the uniform CDF, with a `prob` band (Säilynoja et al. 2022).

    ranks: (P,) ranks in {0, ..., L}, L = n_samples. At z_k = k / (L + 1), k = 1..L, the ECDF
    F(z_k) = #{rank < k} / P is exactly Binomial(P, z_k) / P under calibration.
    simultaneous: widen the pointwise binomial band so that the whole ECDF stays inside it with
    probability `prob`, by arviz_stats' simulation of the smallest pointwise tail probability over
    `n_simulations` uniform ECDFs (numpy generator seeded with `seed`); False: the pointwise band.
    Returns {"z", "ecdf_diff", "lower_diff", "upper_diff"}: (L,) float64 each, differences to z.
    """
    if not isinstance(ranks, Tensor) or ranks.ndim != 1 or ranks.is_floating_point():
        raise ValueError(f"ranks: expected an integer tensor of shape (P,), got {getattr(ranks, 'shape', type(ranks))}")
    prob = probability(prob, "prob")
    p = ranks.shape[0]
    z = torch.arange(1, n_samples + 1, dtype=torch.float64) / (n_samples + 1)
    ecdf = (ranks.cpu().unsqueeze(0) < torch.arange(1, n_samples + 1).unsqueeze(1)).double().mean(1)
    level = prob
    if simultaneous:
        ecdf_utils = _require("arviz_stats.ecdf_utils")
        level = float(ecdf_utils.simulate_confidence_bands(p, 1, z.numpy(), prob, n_simulations,
                                                            np.random.default_rng(seed)))
    lower, upper = binomial_band(p, z, prob=level)
    return {"z": z, "ecdf_diff": ecdf - z, "lower_diff": lower - z, "upper_diff": upper - z}


def tarp_coverage(
    samples: object,
    truths: object,
    *,
    n_refs: int = 1,
    references: object | None = None,
    alpha: object | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """TARP expected coverage probability (Lemos, Coogan et al., ICML 2023), as the `tarp` package.

    Images are flattened to d-vectors and normalised per element by the truths' range,
    u = (x - min_p truth) / (max_p truth - min_p truth) (elements with a zero range are only shifted), so
    the truths span the unit box. For each problem p and reference r_p drawn uniformly from [0, 1]^d,
        f_p = #{l : ||u(s_pl) - r_p|| < ||u(truth_p) - r_p||} / L,
    the posterior mass of the ball around r_p through the truth, estimated from the L draws; then
        ECP(α) = mean_p 1[f_p < α],
    the fraction of truths inside the α-credible balls. Under calibration f is uniform: ECP(α) = α up to
    the finite-L discreteness (E ECP = ceil(α L) / (L + 1)). In many dimensions the draws of too narrow a
    posterior lie closer to the reference than the truth (f near 1: ECP below the diagonal) and those of
    too wide a one farther (above it); in few dimensions both bend the curve into an S about α = 1/2
    instead. See `tarp_atc`.

    samples: (P, L, *image_shape); truths: (P, *image_shape).
    n_refs: references per problem; ECP pools the P n_refs values of f (less reference noise).
    references: (n_refs, P, *image_shape) reference points in the normalised units instead of random ones.
    alpha: (K,) credibility levels at which to evaluate ECP; default 101 levels linspace(0, 1).
    generator: draws the references; must live on samples' device.
    Returns (ecp (K,), alpha (K,)), samples' dtype and device.
    """
    x, t = _check_image_batch(samples, truths)
    p, n = x.shape[:2]
    x, t = x.flatten(2), t.flatten(1)
    low, high = t.min(0).values, t.max(0).values
    span = torch.where(high > low, high - low, torch.ones_like(high))
    x, t = (x - low) / span, (t - low) / span
    if references is None:
        n_refs = positive_int(n_refs, "n_refs")
        refs = torch.rand(n_refs, p, t.shape[1], generator=generator, dtype=x.dtype, device=x.device)
    else:
        refs = real_tensor(references, "references").to(device=x.device, dtype=x.dtype)
        if refs.ndim < 2 or refs.shape[1] != p or refs[0, 0].numel() != t.shape[1]:
            raise ValueError(f"references: expected shape (n_refs, {p}, *image_shape) with {t.shape[1]} elements "
                             f"per image, got {tuple(refs.shape)}")
        refs = refs.flatten(2)
    sample_dist = (x.unsqueeze(0) - refs.unsqueeze(2)).norm(dim=-1)  # (R, P, L)
    truth_dist = (t.unsqueeze(0) - refs).norm(dim=-1)  # (R, P)
    f = (sample_dist < truth_dist.unsqueeze(-1)).to(x.dtype).sum(-1) / n
    if alpha is None:
        levels = torch.linspace(0, 1, 101, dtype=x.dtype, device=x.device)
    else:
        levels = real_tensor(alpha, "alpha").to(device=x.device, dtype=x.dtype).reshape(-1)
    ecp = (f.reshape(-1, 1) < levels).to(x.dtype).mean(0)
    return ecp, levels


def tarp_atc(ecp: Tensor, alpha: Tensor) -> float:
    """Signed area between the TARP curve and the diagonal over the upper half of the levels.

    ATC = ∫_{1/2}^{1} (ECP(α) - α) dα by the trapezoid rule over the given levels with α >= 1/2 (sbi's
    `check_tarp` sums ECP - α over those levels instead of integrating). ≈ 0 when calibrated, < 0 for
    over-confident (too narrow) and > 0 for under-confident (too wide) posteriors, also where they only
    bend the curve into an S about α = 1/2, which the area over the whole range would cancel.
    ecp, alpha: (K,) as returned by `tarp_coverage`, alpha increasing.
    """
    ecp, alpha = real_tensor(ecp, "ecp"), real_tensor(alpha, "alpha")
    if ecp.shape != alpha.shape or ecp.ndim != 1:
        raise ValueError(f"ecp: expected the shape of alpha {tuple(alpha.shape)}, got {tuple(ecp.shape)}")
    upper = alpha >= 0.5
    if int(upper.sum()) < 2:
        raise ValueError("alpha: expected at least two levels >= 0.5")
    return float(torch.trapezoid((ecp - alpha)[upper], alpha[upper]))
