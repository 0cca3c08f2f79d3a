"""Matplotlib figures of posteriors, samples and training curves.

Every function builds and returns a `matplotlib.figure.Figure` without touching pyplot's global state
(no `show()`, no current figure), so it works under any backend, Agg included; save it with
`fig.savefig(path)`. Images are (C, H, W) arrays or tensors: one channel is drawn as a colour map,
three channels as RGB (clipped to [0, 1]), any other count as its first channel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

try:
    from matplotlib.figure import Figure
except ImportError as err:  # a dependency of scoreprior, missing only from a broken install
    raise ImportError("scoreprior.plots needs matplotlib, a dependency of scoreprior: reinstall it "
                      "(`pip install -e .` in a clone)") from err

from scoreprior._checks import positive_int
from scoreprior.diagnostics import binomial_band
from scoreprior.metrics import linear_fit

__all__ = ["coverage_figure", "demo_report_figure", "logprob_scatter", "loss_figure", "posterior_figure", "sample_grid", "sbc_ecdf_figure",
           "summary_figure", "tarp_figure"]

_PANEL = 2.4  # inches per image panel


def _numpy(x: object) -> np.ndarray:
    """A tensor (any device, with or without grad) or array-like as a numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _image(x: object, name: str) -> tuple[np.ndarray, str]:
    """(C, H, W) -> an (H, W) or (H, W, 3) array for imshow, and a title suffix naming a dropped channel."""
    x = _numpy(x)
    if x.ndim == 2:
        return x, ""
    if x.ndim != 3:
        raise ValueError(f"{name}: expected an image of shape (C, H, W) or (H, W), got {x.shape}")
    if x.shape[0] == 1:
        return x[0], ""
    if x.shape[0] == 3:
        return np.clip(np.moveaxis(x, 0, -1), 0.0, 1.0), ""
    return x[0], " (channel 0)"


def _show(fig: Figure, ax, image: np.ndarray, title: str, *, colorbar: bool, **kwargs) -> None:
    """imshow without ticks; a colour bar beside grey-scale images when asked."""
    im = ax.imshow(image, **({} if image.ndim == 3 else kwargs))
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if colorbar and image.ndim == 2:
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def _scale_bar(ax, pixel_uas: float, width: int) -> None:
    """A bar of a round length in µas (the largest of 1, 2, 2.5, 5 x 10^k below a third of the field),
    at the lower left of an image axis drawn by imshow (pixel centres at 0..width-1)."""
    target = pixel_uas * width / 3
    exponent = math.floor(math.log10(target))
    length = max(m * 10**exponent for m in (1, 2, 2.5, 5) if m * 10**exponent <= target)
    pixels = length / pixel_uas
    x0, y = 0.06 * width - 0.5, 0.9 * width - 0.5
    ax.plot([x0, x0 + pixels], [y, y], color="black", lw=4, solid_capstyle="butt")
    ax.plot([x0, x0 + pixels], [y, y], color="white", lw=2, solid_capstyle="butt")
    ax.text(x0 + pixels / 2, y - 0.04 * width, f"{length:g} µas", ha="center", va="bottom", fontsize=7,
            color="black", bbox=dict(facecolor="white", alpha=0.7, edgecolor="none", pad=1))


def _robust_ylim(ax, curves: Sequence[np.ndarray]) -> None:
    """Linear y-limits that a few outliers cannot flatten: the 5-95 % range of all finite values widened
    by 5 times its width on each side (never beyond the data). Points beyond are marked at the edge
    (triangles) and counted in a note, with their extreme value."""
    finite = np.concatenate([c[np.isfinite(c)] for c in curves]) if curves else np.array([])
    if finite.size < 10:
        return
    q05, q95 = np.percentile(finite, [5, 95])
    span = max(q95 - q05, 1e-9 * max(1.0, abs(q95)))
    lo, hi = max(finite.min(), q05 - 5 * span), min(finite.max(), q95 + 5 * span)
    if lo == finite.min() and hi == finite.max():
        return
    pad = 0.05 * (hi - lo)
    ax.set_ylim(lo - pad, hi + pad)
    off = [(c, np.isfinite(c) & ((c < lo) | (c > hi))) for c in curves]
    count = int(sum(mask.sum() for _, mask in off))
    for curve, mask in off:
        steps = np.flatnonzero(mask) + 1
        above = curve[mask] > hi
        for where, edge, marker in ((above, hi + pad, "^"), (~above, lo - pad, "v")):
            if where.any():  # (an empty unclipped line breaks the constrained layout)
                ax.plot(steps[where], np.full(where.sum(), edge), marker, color="crimson", ms=4, clip_on=False)
    extreme = max((abs(v) for c, mask in off for v in c[mask]), default=0.0)
    ax.text(0.99, 0.98, f"{count} value(s) off scale (|max| {extreme:.3g}), marked ▲▼", transform=ax.transAxes,
            ha="right", va="top", fontsize=7, color="crimson")


def posterior_figure(
    *,
    mean: object,
    std: object,
    samples: object,
    truth: object | None = None,
    measurement_image: object | None = None,
    measurement_label: str = "A^H y",
    n_samples: int = 3,
) -> Figure:
    """One row of panels: truth, measurement, posterior mean, posterior std, then a few posterior draws.

    mean, std: (C, H, W) pixelwise posterior mean and standard deviation.
    samples: (n, C, H, W) posterior draws; the first min(n, n_samples) are shown.
    truth: (C, H, W) the true image, or None to leave the panel out.
    measurement_image: (C, H, W) the measurement as an image (e.g. A_adjoint(y)), or None; titled
        `measurement_label`.
    Truth, mean and draws share one colour scale (the colour bar beside the mean); the measurement and
    the std each have their own colour bar.
    Returns the Figure: one axes per panel plus one per colour bar.
    """
    samples = _numpy(samples)
    if samples.ndim != 4:
        raise ValueError(f"samples: expected shape (n, C, H, W), got {samples.shape}")
    shown = samples[: max(0, n_samples)]
    mean_img, note = _image(mean, "mean")
    std_img, _ = _image(std, "std")
    panels: list[tuple[np.ndarray, str, dict, bool]] = []
    shared = [mean_img]
    if truth is not None:
        truth_img, _ = _image(truth, "truth")
        shared.append(truth_img)
    shared += [_image(s, "samples")[0] for s in shown]
    scale = dict(vmin=min(float(a.min()) for a in shared), vmax=max(float(a.max()) for a in shared),
                 cmap="viridis")
    if truth is not None:
        panels.append((truth_img, "truth", scale, False))
    if measurement_image is not None:
        panels.append((_image(measurement_image, "measurement_image")[0], measurement_label,
                       dict(cmap="viridis"), True))
    panels.append((mean_img, "posterior mean", scale, True))
    panels.append((std_img, "posterior std", dict(cmap="magma"), True))
    panels += [(_image(s, "samples")[0], f"sample {i + 1}", scale, False) for i, s in enumerate(shown)]

    fig = Figure(figsize=(_PANEL * len(panels), _PANEL + 0.3), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (image, title, kwargs, colorbar) in zip(axes, panels):
        _show(fig, ax, image, title + note, colorbar=colorbar, **kwargs)
    return fig


def loss_figure(history: Mapping[str, Sequence[float]]) -> Figure:
    """The DPI training curves against the step: the total loss (left) and its terms (right).

    history: as returned by `DPI.fit`, per-step lists under "loss", "nll", "neg_log_prior", "log_q" and
        optionally "flux_penalty" (nats; None or NaN where not computed). Terms that are all zero or all
        missing (e.g. flux_penalty without a flux) are left out.
    Both axes are linear, their limits set by the bulk of the values: isolated spikes (a 450,000-nat
    step among values near 1,000) are marked at the edge and counted instead of flattening the curves.
    Returns the Figure with two axes.
    """
    if "loss" not in history:
        raise ValueError(f"history: expected a 'loss' entry, got keys {sorted(history)}")
    fig = Figure(figsize=(10, 3.5), layout="constrained")
    left, right = fig.subplots(1, 2)

    def values(key: str) -> np.ndarray:
        return np.array([math.nan if v is None else float(v) for v in history[key]])

    loss = values("loss")
    left.plot(np.arange(1, len(loss) + 1), loss, lw=1)
    _robust_ylim(left, [loss])
    left.set_title("loss = KL(q || p(x|y)) - log p(y)", fontsize=9)
    labels = {"nll": "-log p(y|x)", "neg_log_prior": "-log p(x)", "log_q": "log q(x)", "flux_penalty": "flux penalty"}
    terms = []
    for key, label in labels.items():
        if key not in history:
            continue
        term = values(key)
        if np.all(np.isnan(term) | (term == 0)):
            continue
        right.plot(np.arange(1, len(term) + 1), term, lw=1, label=label)
        terms.append(term)
    _robust_ylim(right, terms)
    right.set_title("loss terms (batch means)", fontsize=9)
    if right.lines:
        right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.set_ylabel("nats")
    return fig


def sample_grid(samples: object, *, ncols: int = 8, titles: Sequence[str] | None = None) -> Figure:
    """A grid of images on one shared colour scale, row by row.

    samples: (n, C, H, W) images, n >= 1.
    ncols: panels per row (fewer when n < ncols).
    titles: optional, one per image.
    Returns the Figure with exactly n axes.
    """
    samples = _numpy(samples)
    if samples.ndim != 4 or samples.shape[0] == 0:
        raise ValueError(f"samples: expected shape (n, C, H, W) with n >= 1, got {samples.shape}")
    positive_int(ncols, "ncols")
    n = samples.shape[0]
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles: expected {n} titles, one per image, got {len(titles)}")
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    images = [_image(s, "samples")[0] for s in samples]
    scale = dict(vmin=float(samples.min()), vmax=float(samples.max()), cmap="viridis")
    fig = Figure(figsize=(1.6 * ncols, 1.6 * nrows + (0.3 if titles else 0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        if i >= n:
            fig.delaxes(ax)
            continue
        _show(fig, ax, images[i], titles[i] if titles else "", colorbar=False, **scale)
    return fig


_SUMMARY_PANELS = {"mean": ("posterior mean", "viridis"), "std": ("posterior std", "magma"),
                   "hdi_width": ("HDI width", "magma"), "error": ("mean - truth", "RdBu_r"),
                   "zscore": ("(mean - truth) / std", "RdBu_r")}


def summary_figure(maps: Mapping[str, object], *, truth: object | None = None) -> Figure:
    """One row of maps with colour bars: truth, posterior mean, std, HDI width, error, z-score.

    maps: as returned by `scoreprior.diagnostics.summary_maps`: (C, H, W) maps under "mean", "std",
        "hdi_width" and optionally "error", "zscore" (others are ignored). truth: (C, H, W) or None.
    Truth and mean share one colour scale; error and z-score are centred on 0 (z-score limits at least
    ±3). Returns the Figure: one axes per panel plus one per colour bar.
    """
    missing = [key for key in ("mean", "std", "hdi_width") if key not in maps]
    if missing:
        raise ValueError(f"maps: expected entries {missing} (from summary_maps), got keys {sorted(maps)}")
    mean_img, note = _image(maps["mean"], "mean")
    shared = [mean_img] + ([] if truth is None else [_image(truth, "truth")[0]])
    scale = dict(vmin=min(float(a.min()) for a in shared), vmax=max(float(a.max()) for a in shared))
    panels = [] if truth is None else [(shared[1], "truth", dict(cmap="viridis", **scale))]
    for key, (title, cmap) in _SUMMARY_PANELS.items():
        if key not in maps:
            continue
        image = _image(maps[key], key)[0]
        kwargs = dict(cmap=cmap, **scale) if key == "mean" else dict(cmap=cmap)
        if key in ("error", "zscore"):
            limit = max(float(np.abs(image).max()), 3.0 if key == "zscore" else 0.0) or 1.0
            kwargs.update(vmin=-limit, vmax=limit)
        panels.append((image, title, kwargs))
    fig = Figure(figsize=(_PANEL * len(panels), _PANEL + 0.3), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (image, title, kwargs) in zip(axes, panels):
        _show(fig, ax, image, title + note, colorbar=True, **kwargs)
    return fig


def _diagonal_axes(fig: Figure, xlabel: str, ylabel: str):
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--", label="calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax


def coverage_figure(
    levels: Sequence[float], curves: Mapping[str, Sequence[float]], *, n: int | None = None, prob: float = 0.95
) -> Figure:
    """Empirical against nominal coverage of credible intervals, one curve per posterior.

    levels: (K,) nominal levels; curves: label -> (K,) empirical coverage (e.g. `coverage(...).mean(0)`).
    n: number of independent problems; draws the central `prob` Binomial(n, level) band around the
        diagonal (`binomial_band`), where a calibrated curve falls. Returns the Figure with one axes.
    """
    levels = np.asarray(levels, dtype=float)
    fig = Figure(figsize=(4.2, 4.2), layout="constrained")
    ax = _diagonal_axes(fig, "nominal credible level", "empirical coverage")
    if n is not None:
        lower, upper = binomial_band(n, levels, prob=prob)
        ax.fill_between(levels, lower.numpy(), upper.numpy(), color="0.8", label=f"{prob:.0%} binomial band, n={n}")
    for label, curve in curves.items():
        curve = np.asarray(curve, dtype=float)
        if curve.shape != levels.shape:
            raise ValueError(f"curves[{label!r}]: expected shape {levels.shape} like levels, got {curve.shape}")
        ax.plot(levels, curve, marker="o", ms=3, label=label)
    ax.legend(fontsize=8)
    return fig


def tarp_figure(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, n: int | None = None, prob: float = 0.95
) -> Figure:
    """TARP expected coverage probability against the credibility level (Lemos et al. 2023).

    curves: label -> (ecp (K,), alpha (K,)) from `tarp_coverage`. n: number of problems (one reference
    each): draws the pointwise Binomial(n, α) `prob` band. Returns the Figure with one axes.
    """
    fig = Figure(figsize=(4.2, 4.2), layout="constrained")
    ax = _diagonal_axes(fig, "credibility level α", "expected coverage")
    if n is not None:
        grid = np.linspace(0, 1, 101)
        lower, upper = binomial_band(n, grid, prob=prob)
        ax.fill_between(grid, lower.numpy(), upper.numpy(), color="0.8", label=f"{prob:.0%} binomial band, n={n}")
    for label, (ecp, alpha) in curves.items():
        ax.plot(np.asarray(alpha, dtype=float), np.asarray(ecp, dtype=float), label=label)
    ax.legend(fontsize=8)
    return fig


def sbc_ecdf_figure(ecdfs: Mapping[str, Mapping[str, object]], *, ncols: int = 3) -> Figure:
    """SBC rank ECDF minus the uniform CDF, with its band, one panel per entry.

    ecdfs: title -> `scoreprior.diagnostics.sbc_ecdf` output ("z", "ecdf_diff", "lower_diff", "upper_diff").
    A calibrated posterior stays inside the band. Too narrow a posterior piles the ranks at both ends: the
    difference rises above 0 and then dips below it; too wide a posterior does the opposite; a bias gives
    one hump of one sign.
    Returns the Figure with exactly len(ecdfs) axes.
    """
    if not ecdfs:
        raise ValueError("ecdfs: expected at least one entry, got none")
    positive_int(ncols, "ncols")
    n = len(ecdfs)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        fig.delaxes(ax)
    for ax, (title, e) in zip(axes, ecdfs.items()):
        z = _numpy(e["z"])
        ax.fill_between(z, _numpy(e["lower_diff"]), _numpy(e["upper_diff"]), color="0.8", step="post")
        ax.step(z, _numpy(e["ecdf_diff"]), where="post", lw=1)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("scaled rank")
        ax.set_ylabel("ECDF - uniform")
    return fig


def logprob_scatter(
    reference: object, estimate: object, *, xlabel: str = "ground-truth log p (nats)",
    ylabel: str = "estimated log p (nats)",
) -> Figure:
    """Scatter of estimated against ground-truth log-densities, the line y = x and the least-squares line.

    reference, estimate: (N,) log-densities of the same N points. The title gives the fit's R² and slope
    (`scoreprior.metrics.linear_fit`). Returns the Figure with one axes.
    """
    x, y = _numpy(reference).astype(float).ravel(), _numpy(estimate).astype(float).ravel()
    fit = linear_fit(x, y)
    fig = Figure(figsize=(4.2, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.scatter(x, y, s=6, alpha=0.6)
    lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--", label="y = x")
    ax.plot([lo, hi], [fit["slope"] * lo + fit["intercept"], fit["slope"] * hi + fit["intercept"]],
            color="C3", lw=1, label="least squares")
    ax.set_title(f"R² = {fit['r2']:.3f}, slope = {fit['slope']:.3f}", fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return fig


def _trusted(check: Mapping, correction: Mapping) -> bool:
    """Whether the demo's error bars are confirmed under the exact density: the flow passes PSIS, or the
    correction says its samples stand for the posterior (`Correction.trusted`)."""
    return bool(check["reliable"] or correction["trusted"])


def _verdict_title(check: Mapping, correction: Mapping) -> str:
    """The demo report's headline: what the error bars rest on."""
    if check["reliable"]:
        return "error bars confirmed by the exact prior density (the flow passes the PSIS check)"
    if correction["method"] == "smc" and correction["trusted"]:
        return "error bars from the exact prior density (the flow failed PSIS; SMC corrected its draws)"
    if correction["method"] == "smc" and correction["converged"]:
        return (f"error bars uncertain: SMC reached the exact posterior, but its {correction['particles']} draws "
                f"descend from only {correction['lineages']} of the flow's")
    return "do not trust these error bars: the correction did not reach the exact posterior"


def demo_report_figure(
    *,
    truth: object,
    dirty: object,
    mean: object,
    std: object,
    samples: object,
    covered: object,
    metrics: Mapping,
) -> Figure:
    """The report of `scoreprior demo`: truth, dirty image, posterior mean, std, coverage, draws, numbers.

    truth, dirty, mean, std: (C, H, W) images (dirty: A^H y rescaled to the truth's flux);
    samples: (n, C, H, W) posterior draws (up to 4 shown); covered: (C, H, W) 1 where the truth lies in
    the credible interval; metrics: the demo's metrics dict (its "posterior", "observation", "exact_check"
    and "correction" entries are printed in the last panel, the verdict in the title; "truth"["fov_uas"], the field of view, sets the
    µas scale bars of the truth and coverage panels).
    Truth, mean and draws share one colour scale. Returns the Figure.
    """
    draws = _numpy(samples)[:4]
    truth_img, _ = _image(truth, "truth")
    scale = dict(cmap="afmhot", vmin=0.0, vmax=float(max(truth_img.max(), _image(mean, "mean")[0].max())))
    fig = Figure(figsize=(5 * _PANEL, 2 * _PANEL + 0.6), layout="constrained")
    axes = fig.subplots(2, 5)
    post = metrics["posterior"]
    level = post["coverage"]["level"]
    _show(fig, axes[0, 0], truth_img, "truth", colorbar=True, **scale)
    _show(fig, axes[0, 1], _image(dirty, "dirty")[0], "dirty image (A^H y)", colorbar=True, cmap="afmhot")
    _show(fig, axes[0, 2], _image(mean, "mean")[0], "posterior mean", colorbar=True, **scale)
    _show(fig, axes[0, 3], _image(std, "std")[0], "posterior std", colorbar=True, cmap="viridis")
    _show(fig, axes[0, 4], _image(covered, "covered")[0],
          f"truth inside {level:.0%} interval: {post['coverage']['fraction_of_pixels']:.0%}\n(green inside, red outside)",
          colorbar=False,
          cmap="RdYlGn", vmin=0, vmax=1)
    width = truth_img.shape[1]
    for ax in (axes[0, 0], axes[0, 4]):
        _scale_bar(ax, metrics["truth"]["fov_uas"] / width, width)
    for k, ax in enumerate(axes[1, :4]):
        if k < len(draws):
            _show(fig, ax, _image(draws[k], "samples")[0], f"posterior draw {k + 1}", colorbar=False, **scale)
        else:
            ax.axis("off")
    ring = post["ring_diameter_uas"]
    check, correction = metrics["exact_check"], metrics["correction"]
    obs = metrics["observation"]
    khat = "not estimable" if check["khat"] is None else f"{check['khat']:.2f}"
    if correction["method"] == "importance":
        how = [f"importance resampling: ESS {correction['ess']:.0f} of {correction['particles']}"]
    else:
        how = [f"tempered SMC, {len(correction['stages'])} stages" + ("" if correction["converged"] else " (NOT converged)"),
               f"  ESS {correction['ess']:.0f} of {correction['particles']}, {correction['unique']} distinct",
               f"  from {correction['lineages']} draws of the flow"]
    flux = post["flux"]
    lines = [f"{obs['n_visibilities']} visibilities, {len(obs['stations'])} stations",
             f"nxcorr(mean, truth) = {post['nxcorr_mean_truth']:.3f}",
             f"ring diameter {ring['posterior_mean']:.1f} ± {ring['posterior_std']:.1f} µas",
             f"  95 %: {ring['posterior_eti95'][0]:.1f}-{ring['posterior_eti95'][1]:.1f}"
             f" (truth {ring['truth_measured']:.1f})",
             f"flux {flux['posterior_mean']:.4g} ± {flux['posterior_std']:.2g} (truth {flux['truth']:.4g})",
             "exact ODE density:",
             f"  flow alone: k̂ = {khat} ({'passes' if check['reliable'] else 'fails'})",
             *(f"  {line}" for line in how)]
    fig.suptitle(_verdict_title(check, correction), fontsize=11, color="darkgreen" if _trusted(check, correction) else "crimson")
    axes[1, 4].axis("off")
    axes[1, 4].text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=8, family="monospace",
                    transform=axes[1, 4].transAxes)
    return fig
