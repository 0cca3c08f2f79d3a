"""Gaussian likelihoods p(y | x) for linear measurements y = A x + b, b ~ N(0, Σ_y).

Conventions:
- y is ONE measurement with a leading batch dimension of 1: (1, *operator.measurement_shape((C, H, W))),
  exactly what `operator.A(x_true)` (or `GaussianLikelihood.sample(x_true)`) returns for
  x_true: (1, C, H, W). Images x are real batches (B, C, H, W); log-densities are (B,), in nats.
- Real y: b ~ N(0, Σ), log p(y | x) = -1/2 ||Σ^{-1/2} r||^2 - 1/2 log|Σ| - (M / 2) log 2π.
- Complex y: b is circular complex Gaussian CN(0, Σ) (Feng et al. 2023: noise of std σ is split σ/√2
  between the real and imaginary parts), so for diagonal Σ = diag(σ^2)
  log p(y | x) = -Σ_m |r_m|^2 / σ_m^2 - Σ_m log(π σ_m^2), and in general
  log p(y | x) = -||Σ^{-1/2} r||^2 - log|Σ| - M log π.
  Here r = y - A x and M counts measurements (complex entries count once).
- The noise covariance is a `NoiseCovariance` over one measurement: `DiagonalCovariance` for a scalar or
  per-measurement std, `FourierDiagonalCovariance` for stationary noise on image-shaped measurements.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from numbers import Real

import torch
from torch import Tensor

from scoreprior.operators import LinearOperator, _format_shape, _positive_float

__all__ = ["DiagonalCovariance", "FourierDiagonalCovariance", "GaussianLikelihood", "NoiseCovariance"]


def _check_positive_tensor(t: object, name: str) -> Tensor:
    """Raise unless t is a real floating-point tensor of finite positive values; return it detached."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a real floating-point tensor, got dtype {t.dtype}")
    bad = ~(torch.isfinite(t) & (t > 0))
    if bool(bad.any()):
        raise ValueError(f"{name}: expected finite positive values, got {int(bad.sum())} others, "
                         f"e.g. {t[bad][0].item()}")
    return t.detach()


def _kind(t: Tensor) -> str:
    return "complex" if t.is_complex() else "real"


class NoiseCovariance(ABC):
    """Covariance Σ of the noise on one measurement of shape `shape`, given by its action.

    Σ is Hermitian positive definite. Methods act on batches r: (B, *shape), real or complex, and are
    linear over the complex numbers, so complex noise is the circular CN(0, Σ) of the module docstring.
    `whiten` must apply the Hermitian square root, which makes Σ^{-1} = whiten ∘ whiten.
    """

    shape: tuple[int, ...]
    """Shape of one measurement, without the batch dimension."""

    @abstractmethod
    def whiten(self, r: Tensor) -> Tensor:
        """Σ^{-1/2} r. r: (B, *shape) -> (B, *shape), same dtype."""

    @abstractmethod
    def color(self, z: Tensor) -> Tensor:
        """Σ^{1/2} z, turning white noise into noise of covariance Σ. z: (B, *shape) -> (B, *shape)."""

    @abstractmethod
    def log_det(self) -> Tensor:
        """log|Σ|, a 0-d real tensor."""

    @abstractmethod
    def trace(self) -> Tensor:
        """tr Σ = E||b||^2 for b of covariance Σ, a 0-d real tensor."""

    def solve(self, r: Tensor) -> Tensor:
        """Σ^{-1} r. r: (B, *shape) -> (B, *shape)."""
        return self.whiten(self.whiten(r))


class DiagonalCovariance(NoiseCovariance):
    """Independent noise, Σ = diag(std^2): E|b_m|^2 = std_m^2 (for complex b, std_m^2 / 2 per part).

    std: (*shape) positive standard deviations, in the units of y.
    """

    def __init__(self, std: Tensor) -> None:
        self.std = _check_positive_tensor(std, "std")
        self.shape = tuple(self.std.shape)

    def _std_like(self, r: Tensor) -> Tensor:
        return self.std.to(device=r.device, dtype=r.real.dtype)

    def whiten(self, r: Tensor) -> Tensor:
        """r / std. r: (B, *shape) -> (B, *shape)."""
        return r / self._std_like(r)

    def color(self, z: Tensor) -> Tensor:
        """std * z. z: (B, *shape) -> (B, *shape)."""
        return z * self._std_like(z)

    def solve(self, r: Tensor) -> Tensor:
        """r / std^2. r: (B, *shape) -> (B, *shape)."""
        return r / self._std_like(r) ** 2

    def log_det(self) -> Tensor:
        """sum 2 log std."""
        return 2 * self.std.log().sum()

    def trace(self) -> Tensor:
        """sum std^2."""
        return (self.std**2).sum()

    def __repr__(self) -> str:
        lo, hi = self.std.min().item(), self.std.max().item()
        return f"DiagonalCovariance(shape={self.shape}, std in [{lo:.3g}, {hi:.3g}])"


class FourierDiagonalCovariance(NoiseCovariance):
    """Stationary (circulant) noise on image-shaped measurements: Σ = F^H diag(spectrum) F per channel.

    F is the unitary 2-D DFT over (H, W) (torch.fft.fft2 with norm="ortho"), so b = F^H (√spectrum ⊙ F z)
    with z white has E|F b|^2 = spectrum at each frequency, and periodic spatial correlations. The spectrum
    must be Hermitian-symmetric, spectrum[p, q] = spectrum[-p mod H, -q mod W], which makes Σ real and
    keeps real noise real. For noise b = k ⊛ z from a convolution kernel k embedded circularly in an
    (H, W) grid, spectrum = |fft2(k)|^2 (fft2 with its default norm="backward").

    spectrum: (C, H, W) positive per-frequency variances on the fft2 grid (zero frequency at [.., 0, 0]),
        in squared units of y.
    """

    def __init__(self, spectrum: Tensor) -> None:
        spectrum = _check_positive_tensor(spectrum, "spectrum")
        if spectrum.ndim != 3:
            raise ValueError(f"spectrum: expected shape (C, H, W), got {tuple(spectrum.shape)}")
        mirrored = torch.roll(torch.flip(spectrum, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))
        if not torch.allclose(spectrum, mirrored, rtol=1e-6, atol=0.0):
            mismatch = (spectrum - mirrored).abs().max().item()
            raise ValueError("spectrum: expected Hermitian symmetry spectrum[c, p, q] = spectrum[c, -p, -q] "
                             f"(indices mod H, W), got a largest mismatch of {mismatch:.3g}")
        self.spectrum = spectrum
        self.shape = tuple(spectrum.shape)

    def _filter(self, r: Tensor, power: float) -> Tensor:
        """F^H (spectrum^power ⊙ F r), real for real r."""
        gain = self.spectrum.to(device=r.device, dtype=r.real.dtype) ** power
        out = torch.fft.ifft2(torch.fft.fft2(r, norm="ortho") * gain, norm="ortho")
        return out if r.is_complex() else out.real

    def whiten(self, r: Tensor) -> Tensor:
        """F^H (spectrum^(-1/2) ⊙ F r). r: (B, C, H, W) -> (B, C, H, W)."""
        return self._filter(r, -0.5)

    def color(self, z: Tensor) -> Tensor:
        """F^H (spectrum^(1/2) ⊙ F z). z: (B, C, H, W) -> (B, C, H, W)."""
        return self._filter(z, 0.5)

    def solve(self, r: Tensor) -> Tensor:
        """F^H (F r / spectrum). r: (B, C, H, W) -> (B, C, H, W)."""
        return self._filter(r, -1.0)

    def log_det(self) -> Tensor:
        """sum log spectrum."""
        return self.spectrum.log().sum()

    def trace(self) -> Tensor:
        """sum spectrum (F is unitary)."""
        return self.spectrum.sum()

    def __repr__(self) -> str:
        return f"FourierDiagonalCovariance(shape={self.shape})"


class GaussianLikelihood:
    """p(y | x) for y = A x + b with Gaussian noise b; see the module docstring for the densities.

    operator: the forward model A (a `LinearOperator`, or any object with `A`, `A_adjoint`, `is_complex`).
    y: (1, *measurement_shape) the observed measurement, real or complex as `operator.is_complex`, finite.
    sigma: the noise, one of
        - a positive number: the same std for every measurement;
        - a positive real tensor shaped like y, (1, *measurement_shape) or (*measurement_shape): a std per
          measurement (for complex y, std σ means σ/√2 per real and imaginary part);
        - a `NoiseCovariance` whose `shape` is measurement_shape.
    Call `validate(image_shape)` once the image shape is known to check y against A.
    """

    def __init__(self, operator: LinearOperator, y: Tensor, sigma: float | Tensor | NoiseCovariance) -> None:
        if not isinstance(y, Tensor):
            raise TypeError(f"y: expected a torch.Tensor, got {type(y).__name__}")
        if y.ndim < 2 or y.shape[0] != 1:
            raise ValueError(f"y: expected shape (1, *measurement_shape) with a batch dimension of 1, "
                             f"got {tuple(y.shape)}")
        kind = "complex" if operator.is_complex else "real floating-point"
        if (y.is_complex() != operator.is_complex) or not (y.is_complex() or y.is_floating_point()):
            raise ValueError(f"y: expected a {kind} tensor for {operator!r}, got dtype {y.dtype}")
        if not bool(torch.isfinite(y).all()):
            raise ValueError(f"y: expected finite values, got {int((~torch.isfinite(y)).sum())} NaN or inf")
        self.operator = operator
        self.y = y.detach()
        self.noise = self._noise_covariance(sigma, self.y)

    @staticmethod
    def _noise_covariance(sigma: object, y: Tensor) -> NoiseCovariance:
        """The NoiseCovariance for the `sigma` argument, checked against y: (1, *measurement_shape)."""
        event = tuple(y.shape[1:])
        if isinstance(sigma, NoiseCovariance):
            if tuple(sigma.shape) != event:
                raise ValueError(f"sigma: expected a covariance of shape {event} (y's without the batch "
                                 f"dimension), got {tuple(sigma.shape)}")
            return sigma
        if isinstance(sigma, Tensor) and sigma.ndim > 0:
            if tuple(sigma.shape) not in (tuple(y.shape), event):
                raise ValueError(f"sigma: expected a scalar or shape {tuple(y.shape)} or {event} like y, "
                                 f"got {tuple(sigma.shape)}")
            return DiagonalCovariance(_check_positive_tensor(sigma, "sigma").reshape(event))
        if isinstance(sigma, Tensor):
            sigma = _check_positive_tensor(sigma, "sigma").item()
        if not isinstance(sigma, Real):
            raise TypeError("sigma: expected a positive number, tensor or NoiseCovariance, "
                            f"got {type(sigma).__name__}")
        std = _positive_float(sigma, "sigma")
        return DiagonalCovariance(torch.full(event, std, dtype=y.real.dtype, device=y.device))

    @property
    def num_measurements(self) -> int:
        """M, the number of (real or complex) measurement entries."""
        return self.y[0].numel()

    def validate(self, image_shape: tuple[int, ...]) -> None:
        """Check y against A on a zero image of shape (C, H, W), and that A_adjoint returns that shape.

        Raises ValueError naming y when y's shape or real/complex kind differ from A(x)'s.
        """
        zero = torch.zeros((1, *image_shape), dtype=self.y.real.dtype, device=self.y.device)
        ax = self.operator.A(zero)
        if ax.shape != self.y.shape or ax.is_complex() != self.y.is_complex():
            raise ValueError(f"y: expected a {_kind(ax)} tensor of shape {_format_shape(tuple(ax.shape))} = A(x) "
                             f"for images of shape {tuple(image_shape)}, got a {_kind(self.y)} tensor of shape "
                             f"{_format_shape(tuple(self.y.shape))}")
        back = self.operator.A_adjoint(ax)
        if back.shape != zero.shape:
            raise ValueError(f"operator: expected A_adjoint to return shape {tuple(zero.shape)}, "
                             f"got {tuple(back.shape)}")

    def residual(self, x: Tensor) -> Tensor:
        """r = y - A x. x: (B, C, H, W) real -> (B, *measurement_shape), A(x)'s dtype."""
        ax = self.operator.A(x)
        return self.y.to(device=ax.device, dtype=ax.dtype) - ax

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(y | x) in nats, normalised, differentiable in x. x: (B, C, H, W) real -> (B,)."""
        r = self.residual(x)
        white = self.noise.whiten(r)
        energy = white.abs().square().flatten(1).sum(1)
        log_det = self.noise.log_det().to(device=energy.device, dtype=energy.dtype)
        m = self.num_measurements
        if r.is_complex():
            return -energy - log_det - m * math.log(math.pi)
        return -0.5 * (energy + log_det + m * math.log(2 * math.pi))

    def grad_log_prob(self, x: Tensor) -> Tensor:
        """∇_x log p(y | x) in closed form. x: (B, C, H, W) real -> (B, C, H, W).

        Real y: A^T Σ^{-1} r. Complex y: 2 Re(A^H Σ^{-1} r) = 2 A_adjoint(Σ^{-1} r), the factor 2 because
        each part of CN(0, Σ) noise has covariance Σ / 2.
        """
        r = self.residual(x)
        grad = self.operator.A_adjoint(self.noise.solve(r))
        return 2 * grad if r.is_complex() else grad

    def noise_energy(self) -> float:
        """E||b||^2 = tr Σ, in squared units of y (for complex y, both parts together)."""
        return float(self.noise.trace())

    def sample(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw y ~ p(y | x). x: (B, C, H, W) real -> (B, *measurement_shape), A(x)'s dtype.

        generator: for reproducible noise; must live on x's device.
        """
        ax = self.operator.A(x)
        shape, real = ax.shape, ax.real.dtype
        if ax.is_complex():
            parts = torch.randn((2, *shape), generator=generator, dtype=real, device=ax.device) / math.sqrt(2)
            z = torch.complex(parts[0], parts[1])
        else:
            z = torch.randn(shape, generator=generator, dtype=real, device=ax.device)
        return ax + self.noise.color(z)

    def __repr__(self) -> str:
        return f"GaussianLikelihood({self.operator!r}, y of shape {tuple(self.y.shape)}, noise={self.noise!r})"
