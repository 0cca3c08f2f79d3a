"""Forward SDEs dx = f(x, t) dt + g(t) dw on t in [0, T = 1] (Song et al., ICLR 2021).

Every SDE here has a linear drift, so its marginal given x_0 is Gaussian:
x_t = a(t) x_0 + s(t) z, z ~ N(0, I). `marginal(t)` returns (a(t), s(t)).
Pure maths, no networks. Times are scalars or (B,) tensors; images are (B, *event_shape).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from scoreprior._checks import choice, positive_float

__all__ = ["SDE", "VPSDE", "SubVPSDE", "VESDE", "batch_times", "register_sde", "sde_from_config"]


def batch_times(t: Tensor | float, x: Tensor) -> Tensor:
    """Times as a (B,) tensor on x's device and dtype.

    t: scalar, 0-d tensor or (B,) tensor; x: (B, *event_shape).
    """
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t: expected a scalar or shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t


def per_sample(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a (B,) tensor to broadcast against x: (B, 1, ..., 1)."""
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


class SDE(ABC):
    """A forward SDE with linear drift f(x, t) = c(t) x and scalar diffusion g(t)."""

    T: float = 1.0

    @abstractmethod
    def drift_coeff(self, t: Tensor) -> Tensor:
        """c(t) with f(x, t) = c(t) x. t: (B,) -> (B,)."""

    @abstractmethod
    def diffusion(self, t: Tensor) -> Tensor:
        """g(t). t: (B,) -> (B,)."""

    @abstractmethod
    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(a(t), s(t)) with x_t | x_0 ~ N(a(t) x_0, s(t)^2 I). t: (B,) -> two (B,) tensors."""

    @abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the reference density N(0, prior_std^2 I) at t = T."""

    def log_noise_ratio(self, t: Tensor) -> Tensor:
        """tau(t) = log(s(t) / a(t)), half the negative log signal-to-noise ratio. t: (B,) -> (B,).

        Increasing in t for every SDE here: d tau / dt = g(t)^2 / (2 s(t)^2).
        """
        a, s = self.marginal(t)
        return torch.log(s / a)

    def time_at_log_noise_ratio(self, tau: Tensor) -> Tensor:
        """The time t with log_noise_ratio(t) = tau, the inverse of `log_noise_ratio`. tau: (B,) -> (B,).

        Computed in float64 and returned in tau's dtype. This default bisects on [0, T] to float64
        precision; the SDEs here override it with a closed form.
        """
        target = tau.double()
        lo, hi = torch.zeros_like(target), torch.full_like(target, self.T)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            below = self.log_noise_ratio(mid) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (0.5 * (lo + hi)).to(tau.dtype)

    def times_uniform_in_log_noise_ratio(self, u: Tensor, t_min: float) -> tuple[Tensor, Tensor]:
        """Times on [t_min, T] whose tau = `log_noise_ratio` is uniform: the inverse CDF at u in [0, 1].

        Their density is p(t) = (d tau / dt) / span = g^2 / (2 s^2 span), so g^2 / s^2 = 2 span / p(t): the
        likelihood weighting by importance sampling (used by `dsm_loss` and `SurrogatePrior`).
        u: (N,) -> t (N,) in u's dtype, and span = tau(T) - tau(t_min), a float64 scalar tensor.
        """
        ends = self.log_noise_ratio(torch.tensor([t_min, self.T], dtype=torch.float64, device=u.device))
        span = ends[1] - ends[0]
        return self.time_at_log_noise_ratio(ends[0] + u.double() * span).to(u.dtype), span

    def drift(self, x: Tensor, t: Tensor | float) -> Tensor:
        """f(x, t). x: (B, *event_shape), t: scalar or (B,) -> shaped like x."""
        return per_sample(self.drift_coeff(batch_times(t, x)), x) * x

    def marginal_mean(self, x0: Tensor, t: Tensor | float) -> Tensor:
        """E[x_t | x_0] = a(t) x_0. x0: (B, *event_shape) -> shaped like x0."""
        a, _ = self.marginal(batch_times(t, x0))
        return per_sample(a, x0) * x0

    def marginal_std(self, t: Tensor) -> Tensor:
        """s(t), the standard deviation of x_t | x_0. t: (B,) -> (B,)."""
        return self.marginal(t)[1]

    def perturb(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = a(t) x_0 + s(t) noise. x0, noise: (B, *event_shape); t: (B,)."""
        a, s = self.marginal(t)
        return per_sample(a, x0) * x0 + per_sample(s, x0) * noise

    def ode_drift(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Probability-flow drift f(x, t) - g(t)^2 score / 2. x, score: (B, *event_shape); t: (B,)."""
        g = self.diffusion(t)
        return per_sample(self.drift_coeff(t), x) * x - 0.5 * per_sample(g * g, x) * score

    def prior_sample(
        self,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Draw x_T ~ N(0, prior_std^2 I) of the given shape (B, *event_shape)."""
        z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return self.prior_std() * z

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """log N(z; 0, prior_std^2 I) in nats. z: (B, *event_shape) -> (B,)."""
        d = z[0].numel()
        sd = self.prior_std()
        sq = z.reshape(z.shape[0], -1).pow(2).sum(1)
        return -0.5 * sq / sd**2 - d * (math.log(sd) + 0.5 * math.log(2 * math.pi))


class VPSDE(SDE):
    """Variance-preserving SDE: dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw, beta linear in t.

    beta(t) = beta_min + t (beta_max - beta_min); a(t) = exp(-t^2 (beta_max - beta_min)/4 - t beta_min/2),
    s(t)^2 = 1 - a(t)^2. Reference density N(0, I).
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min, self.beta_max = positive_float(beta_min, "beta_min"), positive_float(beta_max, "beta_max")
        if self.beta_min > self.beta_max:
            raise ValueError(f"beta_min, beta_max: need beta_min <= beta_max, got {beta_min}, {beta_max}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta_min={self.beta_min}, beta_max={self.beta_max})"

    def config(self) -> dict:
        """Constructor arguments, enough to rebuild the SDE."""
        return {"kind": type(self).__name__, "beta_min": self.beta_min, "beta_max": self.beta_max}

    def beta(self, t: Tensor) -> Tensor:
        """beta(t) = beta_min + t (beta_max - beta_min). t: (B,) -> (B,)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _log_mean_coeff(self, t: Tensor) -> Tensor:
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def drift_coeff(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    def diffusion(self, t: Tensor) -> Tensor:
        return self.beta(t).sqrt()

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        log_a = self._log_mean_coeff(t)
        return log_a.exp(), (-torch.expm1(2.0 * log_a)).sqrt()

    def _time_at_log_mean_coeff(self, neg_log_a: Tensor) -> Tensor:
        """The t >= 0 with -log a(t) = neg_log_a: the root of (beta_max - beta_min) t^2 / 4 + beta_min t / 2."""
        half_min = 0.5 * self.beta_min
        return 2.0 * neg_log_a / (half_min + (half_min**2 + (self.beta_max - self.beta_min) * neg_log_a).sqrt())

    def time_at_log_noise_ratio(self, tau: Tensor) -> Tensor:
        # s / a = exp(tau) with s^2 = 1 - a^2 gives -log a = log(1 + exp(2 tau)) / 2.
        neg_log_a = 0.5 * torch.nn.functional.softplus(2.0 * tau.double())
        return self._time_at_log_mean_coeff(neg_log_a).to(tau.dtype)

    def prior_std(self) -> float:
        return 1.0


class SubVPSDE(VPSDE):
    """Sub-VP SDE: VP drift, g(t)^2 = beta(t) (1 - exp(-2 int_0^t beta)); s(t) = 1 - a(t)^2.

    Reference density N(0, I).
    """

    def diffusion(self, t: Tensor) -> Tensor:
        return (self.beta(t) * -torch.expm1(4.0 * self._log_mean_coeff(t))).sqrt()

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        log_a = self._log_mean_coeff(t)
        return log_a.exp(), -torch.expm1(2.0 * log_a)

    def time_at_log_noise_ratio(self, tau: Tensor) -> Tensor:
        # s / a = (1 - a^2) / a = exp(tau) gives a = 2 / (r + sqrt(r^2 + 4)), -log a = asinh(r / 2).
        neg_log_a = torch.asinh(0.5 * tau.double().exp())
        return self._time_at_log_mean_coeff(neg_log_a).to(tau.dtype)


class VESDE(SDE):
    """Variance-exploding SDE: dx = sqrt(d sigma(t)^2 / dt) dw, sigma(t) = sigma_min (sigma_max/sigma_min)^t.

    The marginal is exact from t = 0: s(t)^2 = sigma(t)^2 - sigma_min^2, so p_0 is the data itself.
    Reference density N(0, s(1)^2 I).
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        self.sigma_min, self.sigma_max = positive_float(sigma_min, "sigma_min"), positive_float(sigma_max, "sigma_max")
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min, sigma_max: need sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"

    def config(self) -> dict:
        """Constructor arguments, enough to rebuild the SDE."""
        return {"kind": "VESDE", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def sigma(self, t: Tensor) -> Tensor:
        """sigma(t) = sigma_min (sigma_max/sigma_min)^t. t: (B,) -> (B,)."""
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def drift_coeff(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def diffusion(self, t: Tensor) -> Tensor:
        return self.sigma(t) * math.sqrt(2.0 * self._log_ratio)

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        var = self.sigma_min**2 * torch.expm1(2.0 * t * self._log_ratio)
        return torch.ones_like(t), var.sqrt()

    def time_at_log_noise_ratio(self, tau: Tensor) -> Tensor:
        # s^2 = sigma_min^2 (exp(2 t log(sigma_max / sigma_min)) - 1) = exp(2 tau).
        ratio = (2.0 * tau.double() - 2.0 * math.log(self.sigma_min)).exp()
        return (torch.log1p(ratio) / (2.0 * self._log_ratio)).to(tau.dtype)

    def prior_std(self) -> float:
        return math.sqrt(self.sigma_max**2 - self.sigma_min**2)


_KINDS = {cls.__name__: cls for cls in (VPSDE, SubVPSDE, VESDE)}


def register_sde(cls: type) -> type:
    """Let `sde_from_config` rebuild configs whose "kind" is cls.__name__; returns cls (a class decorator).

    For forward processes defined outside this module, e.g. `scoreprior.ws.WSProcess`; cls(**config
    without "kind") must rebuild the process.
    """
    _KINDS[cls.__name__] = cls
    return cls


def sde_from_config(config: dict) -> SDE:
    """Rebuild an SDE (or a process registered with `register_sde`) from its `config()`; unknown kinds raise ValueError."""
    kind = choice(config.get("kind"), "config['kind']", sorted(_KINDS))
    return _KINDS[kind](**{k: v for k, v in config.items() if k != "kind"})
