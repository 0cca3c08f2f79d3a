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
except ImportError as err:  # matplotlib is an optional dependency
    raise ImportError("scoreprior.plots needs matplotlib: install it with `pip install scoreprior[plots]`") from err

__all__ = ["posterior_figure", "loss_figure", "sample_grid"]

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
    left.set_title("loss = KL(q || p(x|y)) - log p(y)", fontsize=9)
    labels = {"nll": "-log p(y|x)", "neg_log_prior": "-log p(x)", "log_q": "log q(x)", "flux_penalty": "flux penalty"}
    for key, label in labels.items():
        if key not in history:
            continue
        term = values(key)
        if np.all(np.isnan(term) | (term == 0)):
            continue
        right.plot(np.arange(1, len(term) + 1), term, lw=1, label=label)
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
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols: expected a positive integer, got {ncols!r}")
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
