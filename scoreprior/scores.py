"""Closed-form score models: Gaussian and Gaussian-mixture data pushed through a linear-drift SDE.

For data x_0 ~ N(mu, C) and x_t = a(t) x_0 + s(t) z, the marginal is
p_t = N(a mu, a^2 C + s^2 I); with C = U diag(lam) U^T its score is
-U diag(1 / (a^2 lam + s^2)) U^T (x - a mu). These are ground truth for tests and studies.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from scoreprior._checks import batch_shape
from scoreprior.sde import SDE, batch_times

__all__ = ["GaussianScore", "GaussianMixtureScore"]


class GaussianScore:
    """Exact score of N(mean, cov) data under an SDE.

    mean: tensor shaped like one sample (*event_shape); cov: (d, d) symmetric positive semi-definite,
    d = mean.numel(), in the flattened (row-major) order of the event. Computation runs in the dtype of
    `mean`/`cov` (keep float64 for reference values); inputs are cast and results cast back.
    """

    def __init__(self, mean: Tensor, cov: Tensor, sde: SDE):
        mean = torch.as_tensor(mean)
        cov = torch.as_tensor(cov, dtype=mean.dtype, device=mean.device)
        d = mean.numel()
        if cov.shape != (d, d):
            raise ValueError(f"cov: expected shape ({d}, {d}) for mean of shape {tuple(mean.shape)}, got {tuple(cov.shape)}")
        if not torch.isfinite(cov).all() or not torch.isfinite(mean).all():
            raise ValueError("mean, cov: must be finite")
        if not torch.allclose(cov, cov.mT, rtol=1e-6, atol=1e-8 * cov.abs().max().item()):
            raise ValueError("cov: must be symmetric")
        eigvals, eigvecs = torch.linalg.eigh(0.5 * (cov + cov.mT))
        if eigvals.min() < -1e-8 * eigvals.abs().max():
            raise ValueError(f"cov: must be positive semi-definite, smallest eigenvalue {eigvals.min().item():.3g}")
        self.event_shape = mean.shape
        self.mean = mean
        self.cov = cov
        self.sde = sde
        self.eigvals = eigvals.clamp_min(0.0)
        self.eigvecs = eigvecs

    def _marginal(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Residual in the eigenbasis (B, d) and marginal eigenvalues (B, d) at time t."""
        batch_shape(x, "x", self.event_shape)
        t = batch_times(t, x).to(self.mean.dtype)
        a, s = self.sde.marginal(t)
        xf = x.reshape(x.shape[0], -1).to(self.mean.dtype)
        mean, eigvals, eigvecs = (v.to(x.device) for v in (self.mean, self.eigvals, self.eigvecs))
        resid = (xf - a[:, None] * mean.reshape(1, -1)) @ eigvecs
        var = a[:, None] ** 2 * eigvals + s[:, None] ** 2
        return resid, var

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Score grad_x log p_t(x). x: (B, *event_shape); t: scalar or (B,) -> shaped like x."""
        resid, var = self._marginal(x, t)
        score = -(resid / var) @ self.eigvecs.to(x.device).mT
        return score.reshape(x.shape).to(x.dtype)

    def log_prob_t(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Closed-form log p_t(x) in nats. x: (B, *event_shape); t: scalar or (B,) -> (B,)."""
        resid, var = self._marginal(x, t)
        d = resid.shape[1]
        lp = -0.5 * ((resid**2 / var).sum(1) + var.log().sum(1) + d * math.log(2 * math.pi))
        return lp.to(x.dtype)


class GaussianMixtureScore:
    """Exact score of a Gaussian-mixture data distribution sum_k w_k N(mean_k, cov_k) under an SDE.

    weights: (K,) positive (normalised here); means: (K, *event_shape); covs: (K, d, d).
    """

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor, sde: SDE):
        weights = torch.as_tensor(weights, dtype=torch.as_tensor(means).dtype)
        if weights.ndim != 1 or (weights <= 0).any() or not torch.isfinite(weights).all():
            raise ValueError(f"weights: expected a (K,) tensor of positive finite numbers, got {weights}")
        k = weights.shape[0]
        if means.shape[0] != k or covs.shape[0] != k:
            raise ValueError(
                f"means, covs: expected K={k} components along dim 0, got {tuple(means.shape)} and {tuple(covs.shape)}"
            )
        self.components = [GaussianScore(m, c, sde) for m, c in zip(means, covs)]
        self.log_weights = (weights / weights.sum()).log()
        self.event_shape = self.components[0].event_shape
        self.sde = sde

    def _component_log_probs(self, x: Tensor, t: Tensor | float) -> Tensor:
        lp = torch.stack([c.log_prob_t(x, t).to(self.log_weights.dtype) for c in self.components], dim=1)
        return lp + self.log_weights.to(lp.device)

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Score grad_x log p_t(x). x: (B, *event_shape); t: scalar or (B,) -> shaped like x."""
        resp = torch.softmax(self._component_log_probs(x, t), dim=1)
        scores = torch.stack([c(x, t).to(resp.dtype) for c in self.components], dim=1)
        return torch.einsum("bk,bk...->b...", resp, scores).to(x.dtype)

    def log_prob_t(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Closed-form log p_t(x) in nats. x: (B, *event_shape); t: scalar or (B,) -> (B,)."""
        return torch.logsumexp(self._component_log_probs(x, t), dim=1).to(x.dtype)
