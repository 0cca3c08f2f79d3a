"""Closed-form Gaussian prior and the exact Gaussian posterior for linear-Gaussian measurements.

Ground truth for the learned-prior pipeline: with x ~ N(mean, cov) and y = A x + b, b Gaussian, the
posterior is Gaussian and known exactly, so DPI and the diffusion samplers can be checked against it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from scoreprior._checks import batch_shape, positive_float
from scoreprior.likelihood import ClosureLikelihood, GaussianLikelihood

__all__ = ["GaussianPrior", "gaussian_posterior", "reference_posterior"]


def _cholesky(cov: Tensor, name: str) -> Tensor:
    """Cholesky factor L (d, d) of a symmetric positive-definite cov (d, d); ValueError naming `name`."""
    scale = cov.abs().max().item()
    if not torch.allclose(cov, cov.mT, rtol=1e-6, atol=1e-10 * scale):
        raise ValueError(f"{name}: expected a symmetric matrix, got a largest asymmetry of "
                         f"{(cov - cov.mT).abs().max().item():.3g}")
    chol, info = torch.linalg.cholesky_ex(0.5 * (cov + cov.mT))
    if int(info) != 0:
        raise ValueError(f"{name}: expected a positive-definite matrix, Cholesky failed at row {int(info)}")
    return chol


class GaussianPrior:
    """The prior x ~ N(mean, cov) on images, with exact log-density and sampling.

    A small Cholesky-based implementation rather than `GaussianScore.log_prob_t(x, 0)`: that one needs an
    SDE and admits singular covariances (a density only for t > 0), while a prior needs cov positive
    definite. Computation runs in the dtype of `mean` (keep float64 for reference values); inputs are cast
    and results cast back to the input's dtype, on the input's device.

    mean: (*event_shape) real tensor, e.g. (C, H, W).
    cov: (d, d) symmetric positive definite, d = mean.numel(), in the row-major order of the event.
    """

    def __init__(self, mean: Tensor, cov: Tensor) -> None:
        for name, t in (("mean", mean), ("cov", cov)):
            if not isinstance(t, Tensor) or not t.is_floating_point():
                got = t.dtype if isinstance(t, Tensor) else type(t).__name__
                raise TypeError(f"{name}: expected a real floating-point torch.Tensor, got {got}")
        d = mean.numel()
        if cov.shape != (d, d):
            raise ValueError(f"cov: expected shape ({d}, {d}) for mean of shape {tuple(mean.shape)}, "
                             f"got {tuple(cov.shape)}")
        if not bool(torch.isfinite(mean).all()):
            raise ValueError("mean: expected finite values, got NaN or inf")
        if not bool(torch.isfinite(cov).all()):
            raise ValueError("cov: expected finite values, got NaN or inf")
        self.mean = mean.detach()
        self.cov = cov.detach().to(device=mean.device, dtype=mean.dtype)
        self.event_shape = mean.shape
        self.scale_tril = _cholesky(self.cov, "cov")

    @classmethod
    def fit(cls, images: Tensor, *, floor: float) -> GaussianPrior:
        """N(sample mean, sample covariance + floor I) of `images`, in float64.

        images: (N, *event_shape) real, N >= 2; floor: > 0, added to every eigenvalue of the sample
        covariance (images spanning few directions have a singular one). Used, e.g., to build the Gaussian
        reference of a DPI fit from a prior's images (see `scoreprior.posterior.DPI`).
        """
        if not isinstance(images, Tensor) or not images.is_floating_point() or images.ndim < 2:
            raise TypeError(f"images: expected a real floating-point tensor (N, *event_shape), got "
                            f"{getattr(images, 'shape', type(images).__name__)}")
        if images.shape[0] < 2:
            raise ValueError(f"images: expected at least 2 images for a covariance, got {images.shape[0]}")
        floor = positive_float(floor, "floor")
        flat = images.detach().reshape(images.shape[0], -1).double()
        cov = torch.cov(flat.T) + floor * torch.eye(flat.shape[1], dtype=flat.dtype, device=flat.device)
        return cls(flat.mean(0).reshape(images.shape[1:]), cov)

    @property
    def dim(self) -> int:
        """d, the number of pixels in one image."""
        return self.mean.numel()

    def log_prob(self, x: Tensor) -> Tensor:
        """log N(x; mean, cov) in nats, differentiable in x. x: (B, *event_shape) -> (B,), x's dtype.

        log p = -1/2 (x - mean)^T cov^{-1} (x - mean) - sum log diag L - (d / 2) log 2π, cov = L L^T.
        """
        batch_shape(x, "x", self.event_shape)
        chol = self.scale_tril.to(x.device)
        diff = x.reshape(x.shape[0], -1).to(chol.dtype) - self.mean.to(x.device).reshape(1, -1)
        white = torch.linalg.solve_triangular(chol, diff.mT, upper=False)
        lp = -0.5 * white.square().sum(0) - chol.diagonal().log().sum() - 0.5 * self.dim * math.log(2 * math.pi)
        return lp.to(x.dtype)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """n draws mean + L z, z ~ N(0, I). -> (n, *event_shape), mean's dtype and device.

        generator: for reproducible draws; must live on mean's device.
        """
        z = torch.randn(self.dim, n, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return (self.mean.reshape(1, -1) + (self.scale_tril @ z).mT).reshape(n, *self.event_shape)

    def __repr__(self) -> str:
        return f"GaussianPrior(event_shape={tuple(self.event_shape)}, dtype={self.mean.dtype})"


def gaussian_posterior(prior: GaussianPrior, likelihood: GaussianLikelihood) -> tuple[Tensor, Tensor]:
    """The exact posterior N(mean, cov) of x given y for a Gaussian prior and a linear-Gaussian likelihood.

    Builds the dense whitened operator G = Σ^{-1/2} A by applying A to the d basis images, so it suits
    small images only (d up to a few thousand: O(d) operator calls, O(d^2) memory, O(d^3) time).
    Works for every noise model (scalar, per-measurement, any `NoiseCovariance`). Runs in the prior's
    dtype and device. With w = Σ^{-1/2} y and c = 1 for real y, c = 2 for complex y:
        cov^{-1} = C0^{-1} + F,  F = c Re(G^H G),   mean = cov (C0^{-1} m0 + c Re(G^H w))
                                                     = m0 + cov (c Re(G^H w) - F m0),
    since for real x the complex log-likelihood -||w - G x||^2 is a real Gaussian in [Re; Im] with
    variance 1/2 per part.

    prior: N(m0, C0) on images of shape (C, H, W).
    likelihood: its y must match A on images of the prior's shape (checked with `likelihood.validate`).
    Returns (mean (*event_shape), cov (d, d)).
    """
    likelihood.validate(tuple(prior.event_shape))
    d, dtype, device = prior.dim, prior.mean.dtype, prior.mean.device
    basis = torch.eye(d, dtype=dtype, device=device).reshape(d, *prior.event_shape)
    columns = likelihood.noise.whiten(likelihood.operator.A(basis))
    gram = columns.reshape(d, -1)
    white_y = likelihood.noise.whiten(likelihood.y.to(device=device, dtype=gram.dtype)).reshape(-1)
    c = 2.0 if gram.is_complex() else 1.0
    fisher = c * (gram.conj() @ gram.mT).real
    data = c * (gram.conj() @ white_y).real
    prior_precision = torch.cholesky_inverse(prior.scale_tril)
    cov = torch.cholesky_inverse(torch.linalg.cholesky(prior_precision + fisher))
    m0 = prior.mean.reshape(-1)
    mean = m0 + cov @ (data - fisher @ m0)
    return mean.reshape(prior.event_shape), cov


def reference_posterior(
    images: Tensor, likelihood: GaussianLikelihood | ClosureLikelihood, *, floor: float
) -> GaussianPrior:
    """The posterior of the Gaussian fitted to a prior's `images`: a reference for DPI.

    For a linear-Gaussian likelihood, N(m, S) = gaussian_posterior(GaussianPrior.fit(images, floor=floor),
    likelihood), in float64: a cheap Gaussian approximation of the posterior under the prior the images
    come from, which `scoreprior.posterior.DPI(reference=...)` starts from and corrects. A non-linear
    `ClosureLikelihood` has no closed-form posterior: the reference is the fitted Gaussian itself.
    images: (N, *event_shape) draws of the prior (its training images or samples of the score model);
    floor: variance added to every eigenvalue of their covariance (e.g. the smoothing s(t0)^2 / a(t0)^2
    of a score prior at t0). Costs O(d^3) for d pixels (gaussian_posterior).
    """
    prior = GaussianPrior.fit(images, floor=floor)
    if isinstance(likelihood, ClosureLikelihood):
        return prior
    mean, cov = gaussian_posterior(prior, likelihood)
    return GaussianPrior(mean, cov)
