"""The whitened-score forward process and its noise spectra (maths in the `scoreprior.ws` docstring).

Spectra kappa: (H, W) on the torch.fft.fft2 grid, real, >= 0, Hermitian-symmetric; `WSProcess` is the
structured VP process with K = F^H diag(kappa) F; `GaussianWhitenedScore` is its exact whitened score for
circulant Gaussian data (the ground truth of tests).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from scoreprior._checks import height_width, number
from scoreprior.sde import VPSDE, batch_times, per_sample, register_sde

__all__ = [
    "gaussian_spectrum", "power_law_spectrum", "mix_white", "spectrum_from_recipe", "check_spectrum",
    "fourier_filter", "WSProcess", "GaussianWhitenedScore",
]

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
    return torch.sqrt((1 - white) * check_spectrum(spectrum) ** 2 + white)


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


def check_spectrum(spectrum: object, name: str = "spectrum") -> Tensor:
    """Validate a spectrum: a real, finite, non-negative, Hermitian-symmetric (H, W) tensor, not all zero.

    spectrum: (H, W) on the fft2 grid, spectrum[p, q] = spectrum[-p mod H, -q mod W]; name: the argument's
    name in error messages. Returns the spectrum detached, as float64; TypeError / ValueError otherwise.
    """
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


def fourier_filter(x: Tensor, gain: Tensor) -> Tensor:
    """The circulant filter F^H (gain ⊙ F x), F the 2-D DFT over (H, W), applied through rfft2.

    x: (B, C, H, W) real; gain: (H, W) or (B, 1, H, W) real and Hermitian-symmetric on the fft2 grid (only its
    rfft2 half is read). Returns (B, C, H, W) in x's dtype and device.
    """
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
        self.spectrum = check_spectrum(spectrum_from_recipe(spectrum) if isinstance(spectrum, dict) else spectrum)
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
        return fourier_filter(x, self.spectrum)

    def apply_KKt(self, x: Tensor) -> Tensor:
        """K K^T x = F^H (kappa^2 ⊙ F x). x: (B, C, H, W) -> (B, C, H, W)."""
        return fourier_filter(x, self.spectrum**2)

    def apply_K_inverse(self, x: Tensor) -> Tensor:
        """K^{-1} x; ValueError if some kappa is 0. x: (B, C, H, W) -> (B, C, H, W)."""
        if not bool((self.spectrum > 0).all()):
            raise ValueError("spectrum: K is singular (some kappa = 0); mix in white noise (`mix_white`)")
        return fourier_filter(x, 1 / self.spectrum)

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
        self.cov_spectrum = check_spectrum(cov_spectrum, "cov_spectrum")
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
        return -per_sample(self.process.beta(t), x) * fourier_filter(resid, kappa2 / var)
