"""Noise-prediction score models: a network estimating the noise of x_t, read as a score.

With x_t = a(t) x_0 + s(t) z, a network net(x_t, t) estimating z gives the score -net(x_t, t) / s(t)
(Ho et al., NeurIPS 2020; Song et al., ICLR 2021): `NoisePredictionScore`. `GaussianResidualNet` is a
noise predictor made of the exact one of a Gaussian fitted to the data plus a network's residual; it is
registered with `scoreprior.nets.build_net` under the kind "GaussianResidualNet".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from scoreprior._checks import batch_shape
from scoreprior.nets import build_net, register_net
from scoreprior.priors import GaussianPrior
from scoreprior.sde import SDE, batch_times, per_sample, sde_from_config

__all__ = ["NoisePredictionScore", "GaussianResidualNet", "base_gaussian"]


class NoisePredictionScore(nn.Module):
    """Score model of a noise-prediction network: score(x, t) = -net(x, t) / s(t).

    net: callable net(x, t) -> shaped like x, t a (B,) tensor in [0, 1], estimating the noise z of
    x_t = a(t) x_0 + s(t) z; sde: the forward SDE giving s(t); event_shape: shape of one sample, if
    known (read by `ScorePrior`).
    Inputs are cast to the dtype of the net's parameters and the score is cast back, so a float32 net
    can be called inside a float64 ODE solve.

    Call: x (B, *event_shape), t scalar or (B,) -> (B, *event_shape).
    """

    def __init__(self, net: nn.Module, sde: SDE, *, event_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.net = net
        self.sde = sde
        self.event_shape = torch.Size(event_shape) if event_shape is not None else None

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        param = next(self.net.parameters(), None)
        dtype = param.dtype if param is not None else x.dtype
        t = batch_times(t, x)
        _, s = self.sde.marginal(t)
        eps = self.net(x.to(dtype), t.to(dtype)).to(x.dtype)
        return -eps / per_sample(s, x)


class GaussianResidualNet(nn.Module):
    """Noise predictor = the exact one of a Gaussian fitted to the data + a network's residual.

    For x_0 ~ N(mu, C), C = V diag(lambda) V^T, and x_t = a(t) x_0 + s(t) z, the best noise predictor is
        E[z | x_t] = s V diag(1 / (a^2 lambda + s^2)) V^T (x_t - a mu),
    the Wiener denoiser. The network learns what the data add to their Gaussian: at high noise, where the
    marginals of natural images are nearly Gaussian, it has little to learn, and a Gaussian's covariance,
    global across the image, needs no large receptive field. Untrained (zero last layer), the model is
    the Gaussian fitted to its data.

    net: network net(x, t) -> shaped like x (a `UNet`, ...); sde: the forward SDE giving a(t), s(t);
    mean: (*event_shape) Gaussian mean; eigvals: (d,) covariance eigenvalues, > 0; eigvecs: (d, d)
    orthonormal eigenvectors in its columns (d = prod(event_shape)). `fit` builds them from images.
    They are buffers: saved in the state dict with the network's weights.

    Call: x (B, *event_shape), t (B,) in [0, 1] -> (B, *event_shape).
    """

    def __init__(self, net: nn.Module, sde: SDE, mean: Tensor, eigvals: Tensor, eigvecs: Tensor):
        super().__init__()
        d = mean.numel()
        if eigvals.shape != (d,) or eigvecs.shape != (d, d):
            raise ValueError(f"eigvals, eigvecs: expected shapes ({d},) and ({d}, {d}) for mean of shape "
                             f"{tuple(mean.shape)}, got {tuple(eigvals.shape)} and {tuple(eigvecs.shape)}")
        if not bool((eigvals > 0).all()):
            raise ValueError(f"eigvals: expected positive values, got minimum {float(eigvals.min())}")
        self.net = net
        self.sde = sde
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("eigvals", eigvals.detach().float().clone())
        self.register_buffer("eigvecs", eigvecs.detach().float().clone())

    @classmethod
    def fit(cls, net: nn.Module, sde: SDE, images: Tensor, *, floor: float) -> GaussianResidualNet:
        """The model on the Gaussian N(sample mean, sample covariance + floor I) of images (N, *event_shape)."""
        gaussian = GaussianPrior.fit(images, floor=floor)
        eigvals, eigvecs = torch.linalg.eigh(gaussian.cov)
        return cls(net, sde, gaussian.mean, eigvals.clamp_min(floor), eigvecs)

    def gaussian(self) -> GaussianPrior:
        """The base Gaussian N(mean, V diag(eigvals) V^T), float64 on the CPU: the natural control variate of
        the model's log-density (`ScorePrior(gaussian_base=...)`, set by `load_prior` and `load_pretrained`)."""
        vecs = self.eigvecs.detach().double().cpu()
        return GaussianPrior(self.mean.detach().double().cpu(), (vecs * self.eigvals.double().cpu()) @ vecs.mT)

    def gaussian_noise(self, x: Tensor, t: Tensor) -> Tensor:
        """E[z | x_t] under the Gaussian. x: (B, *event_shape), t: (B,) -> shaped like x."""
        a, s = self.sde.marginal(t)
        flat = x.reshape(x.shape[0], -1) - a[:, None] * self.mean.reshape(1, -1)
        gain = s[:, None] / (a[:, None] ** 2 * self.eigvals + s[:, None] ** 2)
        return ((flat @ self.eigvecs) * gain @ self.eigvecs.mT).reshape(x.shape)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        batch_shape(x, "x", self.mean.shape)
        return self.gaussian_noise(x, t) + self.net(x, t)

    def config(self) -> dict:
        """{"kind": "GaussianResidualNet", "net": the network's config, "sde": the SDE's, "event_shape"}."""
        return {"kind": "GaussianResidualNet", "net": self.net.config(), "sde": self.sde.config(),
                "event_shape": list(self.mean.shape)}


def _build_gaussian_residual(net: dict, sde: dict, event_shape: list[int]) -> GaussianResidualNet:
    """An untrained GaussianResidualNet of a config, its Gaussian N(0, I) until a state dict is loaded."""
    d = math.prod(event_shape)
    return GaussianResidualNet(build_net(net), sde_from_config(sde), torch.zeros(event_shape), torch.ones(d),
                               torch.eye(d))


register_net("GaussianResidualNet", _build_gaussian_residual)



def base_gaussian(net: nn.Module) -> GaussianPrior | None:
    """The base Gaussian of a `GaussianResidualNet` (`GaussianResidualNet.gaussian`), None for other networks."""
    return net.gaussian() if isinstance(net, GaussianResidualNet) else None
