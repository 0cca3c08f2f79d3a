"""Whitened-score (WS) diffusion with structured noise (Alido, Li, Sun & Tian, arXiv 2505.10311).

Forward process (VP drift, structured noise):
    dx = -beta(t) x / 2 dt + sqrt(beta(t)) K dw,   x_t = a(t) x_0 + s(t) K z,   z ~ N(0, I),
with a(t), s(t) those of `VPSDE` and K a real, symmetric, circulant filter per channel:
    K = F^H diag(kappa) F,   F the unitary 2-D DFT over (H, W),
given by its spectrum kappa: (H, W), real, >= 0, on the torch.fft.fft2 grid (zero frequency at [0, 0])
and Hermitian-symmetric, kappa[p, q] = kappa[-p mod H, -q mod W] (the grid of `FourierDiagonalCovariance`).
The noise covariance of x_t | x_0 is s(t)^2 K K^T = s(t)^2 F^H diag(kappa^2) F.

Whitened score: n(x, t) = G_t G_t^T grad log p_t(x) = beta(t) K K^T grad log p_t(x), G_t = sqrt(beta) K.
The conditional one needs no inverse:
    beta K K^T grad log p(x_t | x_0) = -beta K K^T (s^2 K K^T)^{-1} (x_t - a x_0) = -beta K z / s.
The sign is minus; the released code of the paper trains on +beta K z / s.
Reverse-time dynamics use n directly (no K^{-1}):
    probability flow  dx = [-beta x / 2 - n / 2] dt,   reverse SDE  dx = [-beta x / 2 - n] dt + sqrt(beta) K dw.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from scoreprior._checks import choice, height_width, number, sampler_options
from scoreprior.checkpoints import load_checkpoint
from scoreprior.likelihood import DiagonalCovariance, FourierDiagonalCovariance, GaussianLikelihood
from scoreprior.metrics import psnr, ssim
from scoreprior.nets import build_net
from scoreprior.noise_prediction import NoisePredictionScore
from scoreprior.operators import Identity, LinearOperator
from scoreprior.samplers import _Guard
from scoreprior.sde import VPSDE, batch_times, per_sample, register_sde, sde_from_config

__all__ = [
    "gaussian_spectrum", "power_law_spectrum", "mix_white", "spectrum_from_recipe",
    "WSProcess", "GaussianWhitenedScore", "WhitenedScore", "WidthConditionedNet", "build_ws_net",
    "load_ws_model", "ws_loss", "Haze", "power_spectrum", "ws_sample", "sweep_lambda", "choose_lambda",
]

ModelFn = Callable[[Tensor, Tensor], Tensor]
_RECIPE_TYPES = ("gaussian", "power_law", "array")


def _frequency_radius(size: tuple[int, int], dtype: torch.dtype = torch.float64) -> Tensor:
    """|f| in cycles per pixel on the fft2 grid of an (H, W) image: (H, W)."""
    fy = torch.fft.fftfreq(size[0], dtype=dtype)
    fx = torch.fft.fftfreq(size[1], dtype=dtype)
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def gaussian_spectrum(size: tuple[int, int], width: float) -> Tensor:
    """Gaussian low-pass kappa(f) = exp(-2 pi^2 width^2 |f|^2), kappa(0) = 1: (H, W) float64 on the fft2 grid.

    The transfer function of convolution with a sum-normalised Gaussian kernel of std `width` pixels (its
    continuous Fourier transform, f in cycles per pixel), the noise filter of the paper's released code.
    size: (H, W); width: kernel std in pixels, > 0.
    """
    width = number(width, "width", low=0.0)
    return torch.exp(-2 * math.pi**2 * width**2 * _frequency_radius(height_width(size, "size")) ** 2)


def power_law_spectrum(size: tuple[int, int], alpha: float) -> Tensor:
    """Power-law amplitude kappa(f) = (max(|f|, f_1) / f_1)^(-alpha): (H, W) float64 on the fft2 grid.

    The noise power spectrum is kappa^2 ~ |f|^(-2 alpha). f_1 = 1 / max(H, W) is the lowest non-zero
    frequency; the zero frequency gets kappa(f_1) = 1 instead of infinity. size: (H, W); alpha >= 0.
    """
    alpha = number(alpha, "alpha", low=0.0, low_open=False)
    size = height_width(size, "size")
    f1 = 1.0 / max(size)
    return (_frequency_radius(size).clamp_min(f1) / f1) ** (-alpha)


def mix_white(spectrum: Tensor, white: float) -> Tensor:
    """Spectrum of sqrt(1 - white) K z_1 + sqrt(white) z_2: sqrt((1 - white) kappa^2 + white), (H, W).

    The noise covariance becomes (1 - white) K K^T + white I. white: in [0, 1].
    """
    white = number(white, "white", low=0.0, high=1.0, low_open=False)
    return torch.sqrt((1 - white) * _check_spectrum(spectrum) ** 2 + white)


def spectrum_from_recipe(recipe: dict) -> Tensor:
    """The spectrum (H, W) float64 described by a JSON-able recipe dict.

    recipe: {"type": "gaussian", "size": [H, W], "width": w} | {"type": "power_law", "size", "alpha"}
        | {"type": "array", "values": nested (H, W) list}, each with an optional "white" (default 0)
        passed to `mix_white`.
    """
    if not isinstance(recipe, dict) or recipe.get("type") not in _RECIPE_TYPES:
        raise ValueError(f"recipe: expected a dict with 'type' in {_RECIPE_TYPES}, got {recipe!r}")
    kind = recipe["type"]
    if kind == "gaussian":
        spectrum = gaussian_spectrum(tuple(recipe["size"]), recipe["width"])
    elif kind == "power_law":
        spectrum = power_law_spectrum(tuple(recipe["size"]), recipe["alpha"])
    else:
        spectrum = torch.tensor(recipe["values"], dtype=torch.float64)
    return mix_white(spectrum, recipe.get("white", 0.0))


def _check_spectrum(spectrum: object, name: str = "spectrum") -> Tensor:
    """A real, finite, non-negative, Hermitian-symmetric (H, W) tensor, returned as float64."""
    if not isinstance(spectrum, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(spectrum).__name__}")
    if not spectrum.is_floating_point():
        raise TypeError(f"{name}: expected a real floating-point tensor, got dtype {spectrum.dtype}")
    if spectrum.ndim != 2:
        raise ValueError(f"{name}: expected shape (H, W), got {tuple(spectrum.shape)}")
    spectrum = spectrum.detach().to(torch.float64)
    if not bool((torch.isfinite(spectrum) & (spectrum >= 0)).all()) or not bool((spectrum > 0).any()):
        raise ValueError(f"{name}: expected finite non-negative values, not all zero")
    mirrored = torch.roll(torch.flip(spectrum, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
    if not torch.allclose(spectrum, mirrored, rtol=1e-6, atol=1e-12):
        raise ValueError(f"{name}: expected Hermitian symmetry spectrum[p, q] = spectrum[-p mod H, -q mod W]")
    return spectrum


def _fourier_filter(x: Tensor, gain: Tensor) -> Tensor:
    """F^H (gain ⊙ F x) for real x: (B, C, H, W) and a real Hermitian-symmetric gain (H, W) or (B, 1, H, W)."""
    w = x.shape[-1]
    half = gain[..., : w // 2 + 1].to(device=x.device, dtype=x.dtype)
    return torch.fft.irfft2(torch.fft.rfft2(x) * half, s=x.shape[-2:])


@register_sde
class WSProcess:
    """Structured VP forward process dx = -beta x / 2 dt + sqrt(beta) K dw (module docstring).

    spectrum: kappa of K, a (H, W) tensor (real, >= 0, Hermitian-symmetric, fft2 grid) or a recipe dict
        (`spectrum_from_recipe`); kappa = 1 everywhere is the ordinary `VPSDE`.
    beta_min, beta_max: the linear beta(t) of `VPSDE`, whose a(t), s(t) are reused.
    Images are (B, C, H, W); every channel gets the same K. Times are scalars or (B,) in [0, T = 1].
    """

    T = 1.0

    def __init__(self, spectrum: Tensor | dict, beta_min: float = 0.1, beta_max: float = 20.0):
        self.vp = VPSDE(beta_min, beta_max)
        self.recipe = spectrum if isinstance(spectrum, dict) else None
        self.spectrum = _check_spectrum(spectrum_from_recipe(spectrum) if isinstance(spectrum, dict) else spectrum)
        self.size = tuple(self.spectrum.shape)

    def __repr__(self) -> str:
        what = self.recipe if self.recipe is not None else f"array of shape {self.size}"
        return f"WSProcess(spectrum={what}, beta_min={self.vp.beta_min}, beta_max={self.vp.beta_max})"

    def config(self) -> dict:
        """Constructor arguments (the recipe, or the spectrum as nested lists), rebuilt by `sde_from_config`."""
        spectrum = self.recipe if self.recipe is not None else {"type": "array", "values": self.spectrum.tolist()}
        return {"kind": "WSProcess", "spectrum": spectrum, "beta_min": self.vp.beta_min, "beta_max": self.vp.beta_max}

    def with_width(self, width: float) -> WSProcess:
        """The same process with the Gaussian recipe's width replaced (random-width training)."""
        if self.recipe is None or self.recipe["type"] != "gaussian":
            raise ValueError(f"width: only a process built from a 'gaussian' recipe has a width, got {self!r}")
        return WSProcess({**self.recipe, "width": float(width)}, self.vp.beta_min, self.vp.beta_max)

    def check_images(self, x: object, name: str = "x") -> None:
        """Raise unless x is a real (B, C, H, W) tensor with (H, W) = the spectrum's size."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{name}: expected a real floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        if x.ndim != 4 or tuple(x.shape[-2:]) != self.size:
            raise ValueError(f"{name}: expected shape (B, C, {self.size[0]}, {self.size[1]}), got {tuple(x.shape)}")

    def beta(self, t: Tensor) -> Tensor:
        """beta(t). t: (B,) -> (B,)."""
        return self.vp.beta(t)

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(a(t), s(t)) with x_t | x_0 ~ N(a x_0, s^2 K K^T). t: (B,) -> two (B,) tensors."""
        return self.vp.marginal(t)

    def apply_K(self, x: Tensor) -> Tensor:
        """K x. x: (B, C, H, W) -> (B, C, H, W)."""
        return _fourier_filter(x, self.spectrum)

    def apply_KKt(self, x: Tensor) -> Tensor:
        """K K^T x = F^H (kappa^2 ⊙ F x). x: (B, C, H, W) -> (B, C, H, W)."""
        return _fourier_filter(x, self.spectrum**2)

    def apply_K_inverse(self, x: Tensor) -> Tensor:
        """K^{-1} x; ValueError if some kappa is 0. x: (B, C, H, W) -> (B, C, H, W)."""
        if not bool((self.spectrum > 0).all()):
            raise ValueError("spectrum: K is singular (some kappa = 0); mix in white noise (`mix_white`)")
        return _fourier_filter(x, 1 / self.spectrum)

    def noise(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
              device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """Structured noise K z, z ~ N(0, I), of shape (B, C, H, W)."""
        return self.apply_K(torch.randn(shape, generator=generator, device=device, dtype=dtype))

    def perturb(self, x0: Tensor, t: Tensor | float, z: Tensor) -> Tensor:
        """x_t = a(t) x_0 + s(t) K z. x0, z: (B, C, H, W) (z white); t: scalar or (B,)."""
        return self.vp.perturb(x0, batch_times(t, x0), self.apply_K(z))

    def conditional_whitened_score(self, xt: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
        """beta K K^T grad log p(x_t | x_0) = -beta (x_t - a x_0) / s^2 (= -beta K z / s). All (B, C, H, W)."""
        t = batch_times(t, xt)
        a, s = self.marginal(t)
        return -per_sample(self.beta(t) / s**2, xt) * (xt - per_sample(a, xt) * x0)

    def tweedie(self, x: Tensor, t: Tensor | float, n: Tensor) -> Tensor:
        """E[x_0 | x_t] = (x_t + s^2 K K^T grad log p_t) / a = (x_t + s^2 n / beta) / a. x, n: (B, C, H, W)."""
        t = batch_times(t, x)
        a, s = self.marginal(t)
        return (x + per_sample(s**2 / self.beta(t), x) * n) / per_sample(a, x)


class GaussianWhitenedScore:
    """Exact whitened score of circulant Gaussian data N(mean, F^H diag(c) F) under a `WSProcess`.

    p_t = N(a mean, F^H diag(a^2 c + s^2 kappa^2) F), so per frequency
        n(x, t) = -beta kappa^2 F[x - a mean] / (a^2 c + s^2 kappa^2)   (then F^H).
    mean: (C, H, W); cov_spectrum: (H, W) positive per-frequency variances c (Hermitian-symmetric, fft2 grid,
    unitary DFT: E|F(x - mean)|^2 = c). Call: x (B, C, H, W), t scalar or (B,) -> (B, C, H, W).
    """

    def __init__(self, mean: Tensor, cov_spectrum: Tensor, process: WSProcess):
        self.cov_spectrum = _check_spectrum(cov_spectrum, "cov_spectrum")
        if not bool((self.cov_spectrum > 0).all()) or self.cov_spectrum.shape != process.spectrum.shape:
            raise ValueError(f"cov_spectrum: expected positive values of shape {process.size}")
        process.check_images(mean[None], "mean")
        self.mean, self.process = mean, process

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        self.process.check_images(x)
        t = batch_times(t, x)
        a, s = self.process.marginal(t)
        kappa2 = self.process.spectrum.to(x.device, x.dtype) ** 2
        var = per_sample(a**2, x) * self.cov_spectrum.to(x.device, x.dtype) + per_sample(s**2, x) * kappa2
        resid = x - per_sample(a, x) * self.mean.to(x.device, x.dtype)
        return -per_sample(self.process.beta(t), x) * _fourier_filter(resid, kappa2 / var)


class WhitenedScore(nn.Module):
    """The whitened score of a network trained by `ws_loss`: n(x, t) = -beta(t) net(x, t) / s(t).

    net predicts the structured noise K z of x_t = a x_0 + s K z. process: its `WSProcess`.
    Call: x (B, C, H, W), t scalar or (B,) -> (B, C, H, W).
    """

    def __init__(self, net: nn.Module, process: WSProcess):
        super().__init__()
        self.noise_score = NoisePredictionScore(net, process)
        self.process = process

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = batch_times(t, x)
        return per_sample(self.process.beta(t), x) * self.noise_score(x, t)


class WidthConditionedNet(nn.Module):
    """A network conditioned on the Gaussian noise width w through an extra constant input channel.

    net: a network for C + 1 channels (e.g. UNet(C + 1, ...)) called net(x, t); its input gets the channel
    (w - lo) / (hi - lo), and its first C output channels are returned. widths: (lo, hi) training range in
    pixels; width: the width used when called without one (sampling), default the midpoint.
    Call: x (B, C, H, W), t (B,), optional width -> (B, C, H, W).
    """

    def __init__(self, net: nn.Module, *, widths: tuple[float, float], width: float | None = None):
        super().__init__()
        lo, hi = (number(w, "widths", low=0.0) for w in widths)
        if not lo < hi:
            raise ValueError(f"widths: expected lo < hi, got {widths}")
        self.net, self.widths = net, (lo, hi)
        self.width = 0.5 * (lo + hi) if width is None else number(width, "width", low=0.0)

    def forward(self, x: Tensor, t: Tensor, width: float | None = None) -> Tensor:
        lo, hi = self.widths
        w = self.width if width is None else width
        level = x.new_full((x.shape[0], 1, *x.shape[2:]), (w - lo) / (hi - lo))
        return self.net(torch.cat([x, level], dim=1), t)[:, : x.shape[1]]

    def config(self) -> dict:
        """{"kind": "WidthConditionedNet", "net": inner config, "widths", "width"}; see `build_ws_net`."""
        return {"kind": "WidthConditionedNet", "net": self.net.config(), "widths": list(self.widths),
                "width": self.width}


def build_ws_net(config: dict) -> nn.Module:
    """Rebuild a network from its `config()`: `WidthConditionedNet` here, anything else by `build_net`."""
    if config.get("kind") == "WidthConditionedNet":
        return WidthConditionedNet(build_ws_net(config["net"]), widths=tuple(config["widths"]), width=config["width"])
    return build_net(config)


def load_ws_model(path: str | Path, *, use_ema: bool = True, device: torch.device | str | None = None,
                  width: float | None = None) -> WhitenedScore:
    """The trained whitened score of a checkpoint written by `train_score_model` with `ws_loss`.

    Network rebuilt by `build_ws_net` with the EMA (or raw) weights, eval mode, gradients off; width: for a
    `WidthConditionedNet`, the noise width to sample with (the process is rebuilt with that width).
    Returns WhitenedScore(net, process); the process is `model.process`.
    """
    checkpoint = load_checkpoint(path)
    process = sde_from_config(checkpoint["sde_config"])
    if not isinstance(process, WSProcess):
        raise ValueError(f"checkpoint {path}: expected a WSProcess checkpoint, got {checkpoint['sde_config']['kind']}")
    net = build_ws_net(checkpoint["net_config"])
    net.load_state_dict(checkpoint["ema"]["shadow"] if use_ema else checkpoint["net"])
    net.to(device if device is not None else "cpu").eval().requires_grad_(False)
    if width is not None:
        if not isinstance(net, WidthConditionedNet):
            raise ValueError(f"width: the checkpoint's net is not width-conditioned ({type(net).__name__})")
        net.width = number(width, "width", low=0.0)
        process = process.with_width(width)
    return WhitenedScore(net, process)


def ws_loss(
    net: Callable[..., Tensor],
    process: WSProcess,
    x0: Tensor,
    *,
    generator: torch.Generator | None = None,
    eps: float = 1e-5,
    widths: tuple[float, float] | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Whitened-score matching loss, structured-noise prediction form (Alido et al. 2025).

    t ~ U(eps, 1), z ~ N(0, I), x_t = a x_0 + s K z, and
        loss = E ||net(x_t, t) - K z||^2 / (d mean(kappa^2)),
    minimised by net = E[K z | x_t], i.e. by WhitenedScore(net) = -beta E[K z | x_t] / s = the whitened
    score beta K K^T grad log p_t (the regression target of n is -beta K z / s). Dividing by the mean noise
    power keeps the loss O(1) for any K; with K = I it is `dsm_loss` exactly (same draws).
    Usable as `train_score_model(..., loss_fn=lambda net, x0, g: ws_loss(net, process, x0, generator=g))`.

    net: net(x, t) -> (B, C, H, W) (called net(x, t, width=w) when `widths` is given);
    x0: (B, C, H, W) clean images; generator: draws w, t and z; eps: smallest time;
    widths: (lo, hi): per batch draw w ~ U(lo, hi), noise from process.with_width(w) (random-spectrum
        training of a `WidthConditionedNet`); reduction: "mean" or "none" ((B,) per-sample losses).
    """
    process.check_images(x0, "x0")
    number(eps, "eps", low=0.0, high=1.0, low_open=False, high_open=True)
    choice(reduction, "reduction", ("mean", "none"))
    kwargs = {}
    if widths is not None:
        lo, hi = widths
        u = float(torch.rand((), generator=generator, device=x0.device, dtype=torch.float64))
        kwargs["width"] = lo + (hi - lo) * u
        process = process.with_width(kwargs["width"])
    b = x0.shape[0]
    t = eps + (1.0 - eps) * torch.rand(b, generator=generator, device=x0.device, dtype=x0.dtype)
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    kz = process.apply_K(z)
    xt = process.vp.perturb(x0, t, kz)
    power = float(process.spectrum.pow(2).mean())
    losses = (net(xt, t, **kwargs) - kz).pow(2).reshape(b, -1).mean(1) / power
    return losses.mean() if reduction == "mean" else losses


class Haze:
    """Measurement model y = A x + haze, haze ~ N(0, sigma^2 K K^T) with K of a noise spectrum (dehazing).

    spectrum: kappa (H, W) of the haze filter (e.g. the WS prior's), floored at 1e-12 of its maximum so the
    covariance is invertible; sigma: haze amplitude (> 0), in image units at zero frequency when kappa(0) = 1;
    operator: A (default `Identity`; e.g. `GaussianBlur` for deblurring + dehazing), acting on (B, C, H, W).
    """

    def __init__(self, spectrum: Tensor, sigma: float, operator: LinearOperator | None = None):
        kappa = _check_spectrum(spectrum)
        self.spectrum = kappa.clamp_min(1e-12 * float(kappa.max()))
        self.sigma = number(sigma, "sigma", low=0.0)
        self.operator = operator if operator is not None else Identity()

    def covariance(self, channels: int) -> FourierDiagonalCovariance:
        """The haze covariance sigma^2 K K^T on (channels, H, W) measurements."""
        return FourierDiagonalCovariance((self.sigma * self.spectrum) ** 2 * torch.ones(channels, 1, 1,
                                                                                       dtype=torch.float64))

    def sample(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """y = A x + haze. x: (B, C, H, W) -> (B, C, H, W)."""
        ax = self.operator.A(x)
        z = torch.randn(ax.shape, generator=generator, dtype=ax.dtype, device=ax.device)
        return ax + self.covariance(ax.shape[1]).color(z)

    def likelihood(self, y: Tensor) -> GaussianLikelihood:
        """GaussianLikelihood(A, y, sigma^2 K K^T) for one measurement y: (1, C, H, W)."""
        if not isinstance(y, Tensor) or y.ndim != 4:
            raise ValueError(f"y: expected shape (1, C, H, W), got {getattr(y, 'shape', type(y).__name__)}")
        return GaussianLikelihood(self.operator, y, self.covariance(y.shape[1]))


def power_spectrum(images: Tensor) -> Tensor:
    """Mean power per frequency of images about each channel's mean pixel value: (H, W) float64.

    c[p, q] = mean over images and channels of |F(x - mean)[p, q]|^2, F the unitary 2-D DFT (fft2 grid):
    the per-frequency variances of the stationary Gaussian fitted to the images (the `prior_spectrum` of
    `ws_sample`'s covariance data step, and the `cov_spectrum` of `GaussianWhitenedScore`).
    images: (N, C, H, W) real, N >= 2.
    """
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(f"images: expected a real (N, C, H, W) tensor with N >= 2, "
                         f"got {getattr(images, 'shape', type(images).__name__)}")
    x = images.detach().to(torch.float64)
    centred = x - x.mean(dim=(0, 2, 3), keepdim=True)
    return torch.fft.fft2(centred, norm="ortho").abs().square().mean(dim=(0, 1)) * x.shape[0] / (x.shape[0] - 1)


class _CovarianceStep:
    """Per-frequency Gaussian algebra of x_0 | x_t (and y) under a stationary Gaussian prior, for `ws_sample`.

    With x_0 ~ N(m, F^H diag(c) F), x_0 | x_t is Gaussian with mean x̂_0 (Tweedie) and, per frequency,
        Jacobian J = d x̂_0 / d x_t = a c / (a^2 c + s^2 kappa^2),  variance C_t = c s^2 kappa^2 / (a^2 c + s^2 kappa^2),
    so for y = A x_0 + b with circulant A (transfer function h) and stationary noise (spectrum sigma2),
    y | x_t ~ N(A x̂_0, A C_t A^H + Sigma) and, per frequency, the data term (`__call__`) is
        beta kappa^2 grad log p(y | x_t) = beta kappa^2 J conj(h) F(y - A x̂_0) / (|h|^2 C_t + sigma2),
    and Var[x_0 | x_t, y] = 1 / (1 / C_t + |h|^2 / sigma2) (`variance`; C_t without a likelihood).
    Exact for a Gaussian prior; for a network x̂_0 is the network's and J, C_t those of the Gaussian with the
    images' power spectrum c (a second-order approximation, Π-GDM-like, per frequency instead of one scalar).
    likelihood: a `GaussianLikelihood` or None (then only `variance` is used).
    """

    def __init__(self, likelihood: GaussianLikelihood | None, process: WSProcess, prior_spectrum: Tensor,
                 event_shape: tuple[int, int, int]):
        c = prior_spectrum if isinstance(prior_spectrum, Tensor) and prior_spectrum.ndim == 2 else None
        if c is None or tuple(c.shape) != process.size:
            raise ValueError(f"prior_spectrum: expected a (H, W) = {process.size} tensor of per-frequency variances "
                             f"(see power_spectrum), got {getattr(prior_spectrum, 'shape', prior_spectrum)!r}")
        self.c = _check_spectrum(c, "prior_spectrum")
        if not bool((self.c > 0).all()):
            raise ValueError("prior_spectrum: expected positive values at every frequency")
        self.process, self.likelihood = process, likelihood
        if likelihood is not None:
            self.transfer = self._transfer_function(likelihood.operator, event_shape)
            self.noise = self._noise_spectrum(likelihood.noise, event_shape)

    @staticmethod
    def _transfer_function(operator: LinearOperator, event_shape: tuple[int, int, int]) -> Tensor:
        """fft2 of A's impulse response, (C, H, W) complex128; TypeError unless A is circulant (checked)."""
        impulse = torch.zeros((1, *event_shape), dtype=torch.float64)
        impulse[..., 0, 0] = 1.0
        probe = torch.randn((1, *event_shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        try:
            transfer = torch.fft.fft2(operator.A(impulse))[0]
            ok = transfer.shape == impulse.shape[1:] and torch.allclose(
                operator.A(probe), torch.fft.ifft2(transfer * torch.fft.fft2(probe)).real, rtol=1e-6, atol=1e-9)
        except (RuntimeError, ValueError):
            ok = False
        if not ok:
            raise TypeError(f"likelihood: the covariance data step needs a circulant operator (a convolution that "
                            f"keeps the image shape, e.g. Identity or GaussianBlur), got {operator!r}")
        return transfer

    @staticmethod
    def _noise_spectrum(noise: object, event_shape: tuple[int, int, int]) -> Tensor:
        """Per-frequency noise variances (C, H, W); TypeError unless the noise is stationary."""
        if isinstance(noise, FourierDiagonalCovariance):
            return noise.spectrum.to(torch.float64).expand(event_shape)
        if isinstance(noise, DiagonalCovariance) and bool((noise.std == noise.std.flatten()[0]).all()):
            return (noise.std.flatten()[0].to(torch.float64) ** 2).expand(event_shape)
        raise TypeError(f"likelihood: the covariance data step needs stationary noise (FourierDiagonalCovariance or "
                        f"one std for every pixel), got {noise!r}")

    def _moments(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(J, C_t) per frequency, (H, W) float64, at the first time of t: (B,)."""
        a, s = (float(v) for v in self.process.marginal(t[:1].double()))
        kappa2 = self.process.spectrum**2
        denominator = a * a * self.c + s * s * kappa2
        return a * self.c / denominator, self.c * s * s * kappa2 / denominator

    def variance(self, t: Tensor) -> Tensor:
        """Var[x_0 | x_t (, y)] per frequency: (H, W), or (C, H, W) with a likelihood; float64."""
        variance = self._moments(t)[1]
        if self.likelihood is None:
            return variance
        return 1 / (1 / variance + self.transfer.abs().square() / self.noise)

    def __call__(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """The data term to add to the whitened score n. x, score: (B, C, H, W); t: (B,) equal times."""
        jacobian, variance = self._moments(t)
        beta = float(self.process.beta(t[:1].double()))
        kappa2 = self.process.spectrum**2
        gain = beta * kappa2 * jacobian * self.transfer.conj() / (self.transfer.abs().square() * variance + self.noise)
        x0 = self.process.tweedie(x, t, score)
        r = self.likelihood.y.to(x) - self.likelihood.operator.A(x0)
        return torch.fft.ifft2(torch.fft.fft2(r.double()) * gain.to(x.device)).real.to(x.dtype)


def _per_sample_norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1)


def ws_sample(
    model: ModelFn,
    process: WSProcess,
    n: int,
    event_shape: tuple[int, int, int],
    *,
    likelihood: GaussianLikelihood | None = None,
    lam: float | Callable[[float], float] | str = 1.0,
    normalize: bool | None = None,
    residual: str | None = None,
    prior_spectrum: Tensor | None = None,
    method: str | None = None,
    steps: int = 1000,
    t0: float = 1e-3,
    time_grid: str | None = None,
    init: str = "structured",
    x_init: Tensor | None = None,
    tweedie: bool = True,
    auto_grid: Sequence[float] = (0.03, 0.1, 0.3, 1.0, 3.0),
    auto_steps: int | None = None,
    auto_n: int = 2,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Tensor:
    """Whitened-score sampling, Algorithm 1 of Alido et al. (2025) with consistent signs.

    Grid t_0 = 1 > ... > t_steps = t0 (`time_grid`), step Δ = t_i - t_{i+1}, n = model(x, t), β = β(t):
      data step (with a likelihood y = A x + b): d = A^H(y - A x) (residual "x", the paper) or
          d = A^H(y - A x̂_0), x̂_0 = (x + s^2 n / β) / a (residual "tweedie", no Jacobian), and n is replaced by
          n + λ ‖n‖ d / ‖d‖   (normalize, the default for these two, Jalal et al.: λ is the ratio of the data
                                 step to the prior step, norms per sample, λ unitless), or
          n + λ β d             (normalize=False: for y = A x + b, b ~ N(0, σ^2 K K^T) and A commuting with K,
                                 β K K^T ∇ log N(y; A x, σ^2 K K^T) = β A^H(y - A x) / σ^2, so λ = 1/σ^2 is the
                                 plain likelihood gradient; λ has units 1 / σ^2);
          or (residual "covariance", needs `prior_spectrum` c, a circulant A and stationary noise) n + λ n_y with
          n_y = β K K^T ∇ log N(y; A x̂_0, A C_t A^H + Σ), the Jacobian of x̂_0 and C_t = Cov[x_0 | x_t] those of
          the Gaussian prior with power spectrum c (`_CovarianceStep`): the exact posterior whitened score for a
          Gaussian prior, so λ = 1 is Bayes' rule (the default); never normalised;
      "ode" (Algorithm 1, probability flow): x ← (2 - sqrt(1 - β Δ)) x + n Δ / 2,
      "sde" (reverse SDE):                   x ← (2 - sqrt(1 - β Δ)) x + n Δ + sqrt(β Δ) K z,
    both Euler steps of dx = [-β x / 2 - c n] dt backwards in time (2 - sqrt(1 - βΔ) = 1 + βΔ/2 + O(Δ^2)),
    c = 1/2 (ODE) or 1 (SDE);
      "ancestral" (needs `prior_spectrum`): x_{t'} ~ ∫ q(x_{t'} | x_t, x_0) N(x_0; x̂_0, V) dx_0, DDPM's step with
          structured noise, x̂_0 Tweedie's estimate from n (data step included) and V the per-frequency
          Var[x_0 | x_t, y] of the covariance step's Gaussian (`_ancestral_step`): exact for a Gaussian prior at any
          number of steps.
    Then a final Tweedie step x ← (x + s^2 n / β) / a at t0, if `tweedie`.

    model: whitened score n(x, t), x (B, C, H, W), t (B,); process: its `WSProcess`; n: samples;
    event_shape: (C, H, W); likelihood: y (1, C', H', W') and A (None: unconditional);
    method: "ode", "sde" or "ancestral" (above); default "ancestral" when `prior_spectrum` is given, else "ode";
    time_grid: the times t_0 > ... > t_steps (`_time_grid`): "uniform" in t, "log_snr" (uniform in log(s / a), the
        default for "ancestral") or "edm"; "ode" and "sde" need beta(t_i) (t_i - t_{i+1}) < 1 on it;
    residual: "x", "tweedie" or "covariance" (above); default "covariance" when `prior_spectrum` is given, else "x";
    prior_spectrum: (H, W) per-frequency variances of the prior's images (`power_spectrum` of training images),
        for residual "covariance" only;
    lam: a number >= 0, a schedule lam(t: float) -> float, or "auto" (`choose_lambda` over `auto_grid` with
        `auto_steps` steps, default steps // 4 or the fewest allowed, and `auto_n` samples);
    init: "structured" (x_T = K z, as trained) or "white" (x_T = z); x_init: (n, C, H, W) start instead;
    generator: for z; dtype, device: of the samples. Raises FloatingPointError naming the step, t and λ.
    Returns (n, C, H, W).
    """
    if method is None:
        method = "ode" if prior_spectrum is None else "ancestral"
    if time_grid is None:
        time_grid = "log_snr" if method == "ancestral" else "uniform"
    ts = _check_sampler_options(process, n, event_shape, steps, t0, method, time_grid)
    if residual is None:
        residual = "x" if prior_spectrum is None else "covariance"
    choice(residual, "residual", ("x", "tweedie", "covariance"))
    if residual == "covariance" and normalize:
        raise ValueError("normalize: the covariance data step is the likelihood score itself (λ = 1 is Bayes' rule) "
                         "and is never normalised; leave normalize unset")
    if prior_spectrum is None and (residual == "covariance" or method == "ancestral"):
        raise ValueError("prior_spectrum: residual='covariance' and method='ancestral' need it (see power_spectrum)")
    if prior_spectrum is not None and residual in ("x", "tweedie") and method != "ancestral":
        raise ValueError(f"prior_spectrum: only residual='covariance' or method='ancestral' use it, got residual="
                         f"{residual!r} and method={method!r}")
    normalize = residual != "covariance" if normalize is None else normalize
    choice(init, "init", ("structured", "white"))
    if isinstance(lam, str):
        if lam != "auto":
            raise ValueError(f"lam: expected a number, a callable or 'auto', got {lam!r}")
        if likelihood is None:
            raise ValueError("lam: 'auto' needs a likelihood")
        pilot_steps = auto_steps or max(steps // 4, math.floor(process.vp.beta_max) + 1)
        lam, _ = choose_lambda(model, process, likelihood, event_shape, grid=auto_grid, n=auto_n, steps=pilot_steps,
                               t0=t0, normalize=normalize, residual=residual, prior_spectrum=prior_spectrum, method=method,
                               init=init,
                               generator=generator, dtype=dtype, device=device)
    if not callable(lam):
        number(lam, "lam", low=0.0, low_open=False)
    schedule = lam if callable(lam) else (lambda t, value=float(lam): value)
    if x_init is not None:
        if not isinstance(x_init, Tensor) or tuple(x_init.shape) != (n, *event_shape):
            raise ValueError(f"x_init: expected shape {(n, *event_shape)}, got {getattr(x_init, 'shape', x_init)}")
        x = x_init.to(device=device, dtype=dtype)
    else:
        z = torch.randn((n, *event_shape), generator=generator, device=device, dtype=dtype)
        x = process.apply_K(z) if init == "structured" else z
    if likelihood is not None:
        likelihood.validate(tuple(event_shape))
    gaussian = None if prior_spectrum is None else _CovarianceStep(likelihood, process, prior_spectrum,
                                                                   tuple(event_shape))
    covariance_step = gaussian if residual == "covariance" and likelihood is not None else None
    guard = _Guard("ws_sample", x, steps, f"lam={lam if not callable(lam) else 'schedule'}")
    for i in tqdm(range(steps), desc=f"ws_sample[{method}]", disable=not progress):
        t = float(ts[i])
        dt = float(ts[i] - ts[i + 1])
        tb = torch.full((n,), t, dtype=x.dtype, device=x.device)
        beta = per_sample(process.beta(tb), x)
        with torch.no_grad():
            score = model(x, tb)
            if likelihood is not None:
                weight = float(schedule(t))
                if covariance_step is not None:
                    score = score + weight * covariance_step(x, tb, score)
                else:
                    target = process.tweedie(x, tb, score) if residual == "tweedie" else x
                    d = likelihood.operator.A_adjoint(likelihood.residual(target))
                    if normalize:
                        ratio = _per_sample_norm(score) / _per_sample_norm(d).clamp_min(torch.finfo(x.dtype).tiny)
                        score = score + weight * per_sample(ratio, x) * d
                    else:
                        score = score + weight * beta * d
            if method == "ancestral":
                x = _ancestral_step(process, x, tb, float(ts[i + 1]), score, gaussian.variance(tb), generator)
            elif method == "ode":
                x = (2 - torch.sqrt(1 - beta * dt)) * x + 0.5 * dt * score
            else:
                x = (2 - torch.sqrt(1 - beta * dt)) * x
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                x = x + dt * score + torch.sqrt(beta * dt) * process.apply_K(z)
        guard(x, i, t)
    if tweedie:
        tb = torch.full((n,), t0, dtype=x.dtype, device=x.device)
        with torch.no_grad():
            x = process.tweedie(x, tb, model(x, tb))
        guard(x, steps - 1, t0)
    return x


def _time_grid(process: WSProcess, steps: int, t0: float, kind: str) -> Tensor:
    """Times T = t_0 > ... > t_steps = t0, (steps + 1,) float64: uniform in t, uniform in log(s / a) ("log_snr"), or
    EDM's (Karras et al. 2022) sigma_i^(1/7) uniform, sigma = s / a ("edm")."""
    choice(kind, "time_grid", ("uniform", "log_snr", "edm"))
    if kind == "uniform":
        return torch.linspace(process.T, t0, steps + 1, dtype=torch.float64)
    tau = process.vp.log_noise_ratio(torch.tensor([process.T, t0], dtype=torch.float64))
    u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    if kind == "log_snr":
        taus = tau[0] + u * (tau[1] - tau[0])
    else:
        rho = 7.0
        ends = tau.exp() ** (1 / rho)
        taus = torch.log((ends[0] + u * (ends[1] - ends[0])) ** rho)
    times = process.vp.time_at_log_noise_ratio(taus)
    times[0], times[-1] = process.T, t0
    return times


def _ancestral_step(process: WSProcess, x: Tensor, t: Tensor, t_next: float, score: Tensor, variance: Tensor,
                    generator: torch.Generator | None) -> Tensor:
    """A draw of x_{t'} | x_t, t' = t_next < t, for Gaussian x_0 | x_t with mean x̂_0 (Tweedie, from `score`) and
    per-frequency variance `variance` ((H, W) or (C, H, W), unitary DFT).

    With r = a(t) / a(t'), x_t | x_{t'} ~ N(r x_{t'}, v K K^T), v = s(t)^2 - r^2 s(t')^2, so (DDPM's posterior)
        x_{t'} | x_t, x_0 ~ N(w x_0 + r s(t')^2 / s(t)^2 x_t,  v s(t')^2 / s(t)^2 K K^T),  w = a(t') v / s(t)^2,
    and integrating x_0 out adds w^2 variance per frequency. Exact for a Gaussian prior at any step size.
    x, score: (B, C, H, W); t: (B,) equal times.
    """
    a, s = process.marginal(t)
    a_next, s_next = process.marginal(torch.full_like(t, t_next))
    r = a / a_next
    v = s**2 - r**2 * s_next**2
    w = float(a_next[0] * v[0] / s[0] ** 2)
    mean = w * process.tweedie(x, t, score) + per_sample(r * s_next**2 / s**2, x) * x
    power = float(v[0] * s_next[0] ** 2 / s[0] ** 2) * process.spectrum**2 + w**2 * variance
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return mean + _fourier_filter(z, power.sqrt().expand(x.shape[1:]).reshape(1, *x.shape[1:]))


def _check_sampler_options(process: WSProcess, n: int, event_shape: tuple, steps: int, t0: float,
                           method: str, time_grid: str) -> Tensor:
    """Check the options; return the time grid (steps + 1,) float64."""
    sampler_options(n, steps, t0, process.T)
    if len(event_shape) != 3 or tuple(event_shape[1:]) != process.size:
        raise ValueError(f"event_shape: expected (C, {process.size[0]}, {process.size[1]}), got {tuple(event_shape)}")
    choice(method, "method", ("ode", "sde", "ancestral"))
    ts = _time_grid(process, steps, t0, time_grid)
    largest = float((process.beta(ts[:-1]) * (ts[:-1] - ts[1:])).max())
    if method != "ancestral" and largest >= 1:
        raise ValueError(f"steps: the Euler steps of 'ode' and 'sde' need beta * dt < 1, got {largest:.3g} with {steps} "
                         f"steps on the {time_grid!r} grid (more steps; 'ancestral' takes any number)")
    return ts


def sweep_lambda(
    model: ModelFn,
    process: WSProcess,
    likelihood: GaussianLikelihood,
    event_shape: tuple[int, int, int],
    lams: Sequence[float],
    *,
    n: int = 2,
    truth: Tensor | None = None,
    data_range: float = 1.0,
    generator: torch.Generator | None = None,
    **sample_options,
) -> list[dict]:
    """Run `ws_sample` for each λ in `lams`; per λ the mean data misfit and, given the truth, PSNR / SSIM.

    Every λ starts from the same seed state of `generator` (common random numbers). sample_options: passed
    to `ws_sample` (steps, method, normalize, residual, ...). truth: (1, C, H, W) image.
    Returns [{"lam", "misfit": mean_i ||y - A x_i||^2, "noise_energy": E||b||^2, "psnr", "ssim"}], the
    metrics being means over the n samples (None without truth).
    """
    if truth is not None and (not isinstance(truth, Tensor) or tuple(truth.shape) != (1, *event_shape)):
        raise ValueError(f"truth: expected shape {(1, *event_shape)}, got {getattr(truth, 'shape', truth)}")
    state = generator.get_state() if generator is not None else None
    rows = []
    for lam in lams:
        if generator is not None:
            generator.set_state(state)
        x = ws_sample(model, process, n, event_shape, likelihood=likelihood, lam=float(lam), generator=generator,
                      progress=False, **sample_options)
        misfit = float(likelihood.residual(x).abs().square().flatten(1).sum(1).mean())
        row = {"lam": float(lam), "misfit": misfit, "noise_energy": likelihood.noise_energy(), "psnr": None,
               "ssim": None}
        if truth is not None:
            ref = truth.to(x).expand_as(x)
            row["psnr"] = float(psnr(x, ref, data_range=data_range).mean())
            row["ssim"] = float(ssim(x, ref, data_range=data_range).mean())
        rows.append(row)
    return rows


def choose_lambda(
    model: ModelFn,
    process: WSProcess,
    likelihood: GaussianLikelihood,
    event_shape: tuple[int, int, int],
    *,
    grid: Sequence[float] = (0.03, 0.1, 0.3, 1.0, 3.0),
    n: int = 2,
    **sample_options,
) -> tuple[float, list[dict]]:
    """λ by the discrepancy principle (Morozov): the grid value whose short-run samples have a data misfit
    ||y - A x||^2 closest, in log, to the noise energy E||b||^2 = tr Σ_y.

    A sample that fits the data better than the noise does is over-fitting it; one that fits it worse
    ignores it. sample_options: passed to `sweep_lambda` / `ws_sample` (use few steps: it is a pilot run).
    Returns (λ, the sweep's rows).
    """
    if not grid or any(not isinstance(v, Real) or not v >= 0 for v in grid):
        raise ValueError(f"grid: expected a non-empty sequence of numbers >= 0, got {grid!r}")
    rows = sweep_lambda(model, process, likelihood, event_shape, grid, n=n, **sample_options)
    energy = likelihood.noise_energy()
    best = min(rows, key=lambda r: abs(math.log(max(r["misfit"], 1e-300) / energy)))
    return best["lam"], rows
