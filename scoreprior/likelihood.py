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
- `ClosureLikelihood` is not of this family: its data are closure phases and log closure amplitudes
  (`scoreprior.eht`), non-linear in x through the visibilities of an `Interferometer`, and immune to
  station gains. Like `GaussianLikelihood` it is a `scoreprior.protocols.Likelihood` (`log_prob(x) -> (B,)`,
  `validate`, `residual`), so DPI, `check_posterior` and `dps` take it; samplers that need a linear A
  (score_ald, sde_projection) do not.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from numbers import Real

import numpy as np
import torch
from torch import Tensor

from scoreprior._checks import choice, format_shape, number, positive_float
from scoreprior.eht import (
    ClosurePhases,
    ClosureQuantities,
    LogClosureAmplitudes,
    UVCoverage,
    UVFitsData,
    closure_quantities,
)
from scoreprior.operators import Interferometer, LinearOperator

__all__ = ["ClosureLikelihood", "DiagonalCovariance", "FourierDiagonalCovariance", "GaussianLikelihood",
           "NoiseCovariance"]


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
        std = positive_float(sigma, "sigma")
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
            raise ValueError(f"y: expected a {_kind(ax)} tensor of shape {format_shape(tuple(ax.shape))} = A(x) "
                             f"for images of shape {tuple(image_shape)}, got a {_kind(self.y)} tensor of shape "
                             f"{format_shape(tuple(self.y.shape))}")
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


class _BlockWhitener:
    """Whitening by the Cholesky factors of a block-diagonal covariance, blocks padded to one size.

    blocks: [(indices (k,), C (k, k)), ...] covering 0..K-1 once. whiten(e): (B, K) -> (B, T * k_max), the
    padded entries 0, so ||whiten(e)||^2 = e^T C^{-1} e.
    """

    def __init__(self, blocks: list[tuple[np.ndarray, np.ndarray]]) -> None:
        size = max(len(index) for index, _ in blocks)
        self.index = torch.zeros((len(blocks), size), dtype=torch.long)
        self.inverse = torch.zeros((len(blocks), size, size), dtype=torch.float64)
        log_det = 0.0
        for b, (index, cov) in enumerate(blocks):
            factor = torch.linalg.cholesky(torch.as_tensor(cov, dtype=torch.float64))
            k = len(index)
            self.index[b, :k] = torch.as_tensor(index)
            self.inverse[b, :k, :k] = torch.linalg.inv(factor)
            log_det += 2 * float(factor.diagonal().log().sum())
        self.log_det = log_det

    def whiten(self, e: Tensor) -> Tensor:
        inverse = self.inverse.to(device=e.device, dtype=e.dtype)
        return torch.einsum("tij,btj->bti", inverse, e[:, self.index.to(e.device)]).flatten(1)


class ClosureLikelihood:
    """p(closure phases, log closure amplitudes | x) through the visibilities of an `Interferometer`.

    With V = operator.A(x) (model visibilities in the rows of the observation the closures come from):
        log p = w_cp log N_cp + w_lca log N_lca [+ log N(sum x; flux, flux_sigma^2)]
    - closure phases: e = 2 sin(Δψ / 2), Δψ = ψ_obs - ψ(V) wrapped to [-π, π), so that with independent
      closures e_k^2 / σ_k^2 = 2 (1 - cos Δψ_k) / σ_k^2 (eht-imaging's phase misfit, small-angle limit
      Δψ^2 / σ^2); log N_cp = -1/2 e^T C^{-1} e - 1/2 log|C| - K/2 log 2π, Gaussian at high SNR;
    - log closure amplitudes: e = log CA_obs - log CA(V), the same Gaussian form.
    C is the closures' first-order thermal covariance: `covariance="full"` uses its blocks (closures of one
    time stamp share baselines and are correlated; `ClosureQuantities.covariance`), `"diagonal"` only
    σ^2, as eht-imaging and the score-prior reference code do. Closure quantities fix neither the image's
    flux scale nor its position; the optional Gaussian total-flux term fixes the scale (the prior, the
    position).

    operator: an `Interferometer` (or any operator whose A gives (B, N) complex visibilities) on the
        observation's (u, v) in its row order. phases, log_amplitudes: from `scoreprior.eht.closure_phases`
        / `log_closure_amplitudes` (or `closure_quantities`) of that observation; at least one.
    weights: (w_cp, w_lca), positive; (1, 1) is the likelihood of the model, the reference code's DPI
        uses (0.5, 0.5), which tempers it (broader posteriors).
    flux: optional (value, sigma) of the image's total flux sum(x), in image units.
    covariance: "full" or "diagonal".
    """

    def __init__(
        self,
        operator: LinearOperator,
        phases: ClosurePhases | None = None,
        log_amplitudes: LogClosureAmplitudes | None = None,
        *,
        weights: tuple[float, float] = (1.0, 1.0),
        flux: tuple[float, float] | None = None,
        covariance: str = "full",
    ) -> None:
        if phases is None and log_amplitudes is None:
            raise ValueError("phases, log_amplitudes: expected at least one set of closure quantities, got none")
        for name, value, kind in (("phases", phases, ClosurePhases), ("log_amplitudes", log_amplitudes,
                                                                      LogClosureAmplitudes)):
            if value is not None and not isinstance(value, kind):
                raise TypeError(f"{name}: expected a scoreprior.eht.{kind.__name__}, got {type(value).__name__}")
            if value is not None and len(value) == 0:
                raise ValueError(f"{name}: expected at least one closure, got none (fewer than 3 or 4 stations "
                                 "at every time stamp?)")
        choice(covariance, "covariance", ("full", "diagonal"))
        if len(weights) != 2:
            raise ValueError(f"weights: expected (w_cp, w_lca), got {weights!r}")
        self.weights = (positive_float(weights[0], "weights[0]"), positive_float(weights[1], "weights[1]"))
        if flux is not None:
            if len(flux) != 2:
                raise ValueError(f"flux: expected (value, sigma), got {flux!r}")
            flux = (number(flux[0], "flux[0]", low=-math.inf), positive_float(flux[1], "flux[1]"))
        self.operator, self.flux, self.covariance = operator, flux, covariance
        self.terms = [(c, w, self._whitener(c)) for c, w in zip((phases, log_amplitudes), self.weights)
                      if c is not None]

    @classmethod
    def from_observation(
        cls, observation: UVCoverage | UVFitsData, npix: int, fov: float, *, vis: object | None = None, **options
    ) -> ClosureLikelihood:
        """Closure phases and log closure amplitudes of an observation, imaged on npix x npix over `fov`.

        observation: a `UVFitsData` (its own vis) or a `UVCoverage` with `vis` (N,) complex in the units of
        its sigma (see `scoreprior.eht.closure_quantities`); fov: image side in radians. options: those of
        the constructor (weights, flux, covariance).
        """
        phases, log_amplitudes = closure_quantities(observation, vis)
        return cls(Interferometer(observation.uv, npix, fov), phases, log_amplitudes, **options)

    def _whitener(self, closures: ClosureQuantities) -> _BlockWhitener:
        if self.covariance == "full":
            return _BlockWhitener(closures.covariance())
        return _BlockWhitener([(np.array([k]), closures.sigma[k : k + 1, None] ** 2) for k in range(len(closures))])

    @property
    def num_measurements(self) -> int:
        """The number of closure quantities (plus 1 with a flux term)."""
        return sum(len(c) for c, _, _ in self.terms) + (self.flux is not None)

    def validate(self, image_shape: tuple[int, ...]) -> None:
        """Check that A gives (1, N) complex visibilities with N covering the closures' rows (ValueError)."""
        zero = torch.zeros((1, *image_shape), dtype=torch.float64)
        vis = self.operator.A(zero)
        needed = max(int(c.rows.max()) for c, _, _ in self.terms) + 1
        if vis.ndim != 2 or not vis.is_complex() or vis.shape[1] < needed:
            raise ValueError(f"operator: expected A(x) of shape (1, N >= {needed}) complex visibilities for images "
                             f"of shape {tuple(image_shape)} (the closures' rows), got a {_kind(vis)} tensor of "
                             f"shape {tuple(vis.shape)}")

    def _errors(self, x: Tensor) -> list[tuple[ClosureQuantities, float, _BlockWhitener, Tensor]]:
        vis = self.operator.A(x)
        errors = []
        for closures, weight, whitener in self.terms:
            difference = closures.difference(closures.of(vis))
            error = 2 * torch.sin(difference / 2) if isinstance(closures, ClosurePhases) else difference
            errors.append((closures, weight, whitener, error))
        return errors

    def _flux_error(self, x: Tensor) -> Tensor:
        return (x.flatten(1).sum(1) - self.flux[0]) / self.flux[1]

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(closures | x) in nats (Gaussian normalisation), differentiable. x: (B, C, H, W) -> (B,)."""
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for closures, weight, whitener, error in self._errors(x):
            energy = whitener.whiten(error).square().sum(1)
            total = total - weight * 0.5 * (energy + whitener.log_det + len(closures) * math.log(2 * math.pi))
        if self.flux is not None:
            total = total - 0.5 * self._flux_error(x).square() - math.log(self.flux[1]) - 0.5 * math.log(2 * math.pi)
        return total

    def residual(self, x: Tensor) -> Tensor:
        """The whitened misfit r with ||r||^2 = -2 log p + const: (B, C, H, W) -> (B, M'), dimensionless.

        What `dps` follows for this likelihood (the weights and covariance included).
        """
        parts = [math.sqrt(weight) * whitener.whiten(error) for _, weight, whitener, error in self._errors(x)]
        if self.flux is not None:
            parts.append(self._flux_error(x)[:, None])
        return torch.cat(parts, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """The non-linear forward model: closure phases then log closure amplitudes of x. (B, C, H, W) -> (B, K)."""
        vis = self.operator.A(x)
        return torch.cat([closures.of(vis) for closures, _, _ in self.terms], dim=1)

    def reduced_chi2(self, x: Tensor) -> dict[str, Tensor]:
        """eht-imaging's reduced χ² of each closure type for each image: {"closure_phase", "log_closure_amplitude"}.

        closure phases: mean of 2 (1 - cos Δψ) / σ^2; log closure amplitudes: mean of (Δ / σ)^2 (independent
        closures, weights ignored); about 1 for an image that fits at the noise level. x: (B, C, H, W) -> (B,) each.
        """
        out = {}
        for closures, _, _, error in self._errors(x):
            sigma = torch.as_tensor(closures.sigma, dtype=error.dtype, device=error.device)
            key = "closure_phase" if isinstance(closures, ClosurePhases) else "log_closure_amplitude"
            out[key] = (error / sigma).square().mean(1)
        return out

    def __repr__(self) -> str:
        counts = ", ".join(f"{len(c)} {type(c).__name__}" for c, _, _ in self.terms)
        return (f"ClosureLikelihood({self.operator!r}, {counts}, weights={self.weights}, flux={self.flux}, "
                f"covariance={self.covariance!r})")
