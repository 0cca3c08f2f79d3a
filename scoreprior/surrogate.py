"""Surrogate prior: a stochastic evidence lower bound of a score model's log-density.

The model is the reverse SDE dx = [f(x, t) - g(t)^2 s_theta(x, t)] dt + g(t) dw, run from x_T ~ pi
down to t0; p^theta_{t0} is its density at t0. Theorem 1 of Song, Durkan, Murray & Ermon (NeurIPS 2021,
"Maximum likelihood training of score-based diffusion models") bounds log p^theta_{t0}(y) for a point y
at t0 with forward kernels started at y; the denoising score-matching identity (Vincent 2011) puts it in
the form used by Feng & Bouman (TMLR 2024, arXiv 2309.01949) as a surrogate prior:

    log p^theta_{t0}(y) >= E log pi(y_T) - 1/2 int_{t0}^T E[g^2 |s_theta(y_t, t) - grad log p(y_t | y)|^2
                                                   - g^2 |grad log p(y_t | y)|^2 - 2 div f(y_t, t)] dt.

Which density. With every kernel started at y, the score residual has variance of order 1 / s_{t0->t}^2,
which is not integrable at t0: a Monte Carlo estimate of that bound with one score evaluation per
sample has infinite variance, and the natural proposal g^2 / s^2 cannot be normalised. This module
instead starts the kernels at time 0, x_t = a(t) x + s(t) z, and truncates the time integral at t0. Taking
y ~ N(a(t0) x, s(t0)^2 I), the same law as x_{t0} | x, both forms agree term by term (they equal the
implicit score-matching form, which depends on x_t | x only through its law). Adding one decoding step
x = (y + s(t0) u) / a(t0), u ~ N(0, I), which costs the constant d log a(t0) in the one-latent bound,
gives a lower bound on a normalised density of x:

    log phat(x) >= L(x) = d log a(T) + E_z[log pi(a(T) x + s(T) z)]
                          + 1/2 int_{t0}^T g(t)^2 / s(t)^2 E_z[d - |s(t) s_theta(x_t, t) + z|^2] dt,

where phat is the law of (x_{t0} + s(t0) u) / a(t0) with x_{t0} ~ p^theta_{t0}, and d = x[0].numel().
Two terms are taken in closed form to lower the variance: E|grad log p(x_t | x)|^2 = E|z|^2 / s^2 = d / s^2
(the sampled |z|^2 gave 4x the variance on an 8x8 Gaussian field), and the drift divergence
int_{t0}^T c(t) d dt = d log(a(T) / a(t0)), which with the decoder's d log a(t0) leaves d log a(T).
For the default pi = N(0, sigma_T^2 I) the terminal term is also exact:
E log pi(a x + s z) = log pi(a x) - d s^2 / (2 sigma_T^2).

Tightness. For the exact score of data p_0 and pi = p_T, p^theta_{t0} = p_{t0}, phat = p_0 * N(0, 2 s0^2 / a0^2 I)
and L(x) = d log a0 + E_u[log p_{t0}(a0 x + s0 u)] exactly (a0, s0 at t0): the only gap is the decoding
step's, KL(N(a0 x, s0^2 I) || p(x_{t0} | x)) >= 0, of order s0^2 tr(C^{-1}) for Gaussian data N(mu, C).
L(x) is not a bound on log p_{t0}(x) (what ScorePrior computes); it differs from it by O(t0) terms
(-0.28 nats for the 8x8 field of the tests at t0 = 1e-3, -9.8 nats at t0 = 0.02).

Time integral. With n_time_samples = K, one time per stratum of the proposal's CDF, u_k = (k + U_k) / K,
which leaves the estimate unbiased and removes most of the variance between times for K > 1. The
proposal is uniform on [t0, T] or, with importance sampling, p(t) proportional to g^2 / s^2. For any
linear SDE, d s^2 / dt = 2 c s^2 + g^2 and da / dt = c a, so g^2 / s^2 = -d lambda / dt with
lambda(t) = log(a^2 / s^2) the log signal-to-noise ratio: the proposal's CDF is linear in lambda = -2 tau,
its inverse is `SDE.time_at_log_noise_ratio` (closed form), and the importance weight turns g^2 / s^2
into the constant lambda(t0) - lambda(T).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from scoreprior._checks import number, positive_int
from scoreprior.density import ScoreFn, check_images
from scoreprior.sde import SDE, per_sample

__all__ = ["SurrogatePrior"]


class SurrogatePrior:
    """Stochastic, differentiable evidence lower bound of a score model's log-density.

    score: any callable `score(x, t) -> tensor shaped like x`, x (N, *event_shape), t a (N,) tensor;
    sde: the forward SDE the score belongs to; t0: the smallest time, where the time integral is truncated;
    n_time_samples: times per image and evaluation (stratified); n_noise_samples: noise draws per time;
    importance_sampling: draw times from p(t) proportional to g(t)^2 / s(t)^2 instead of uniformly on
    [t0, T]; event_shape: shape of one image, checked on input (read from `score.event_shape` when
    present); terminal_log_prob: callable x_T (N, *event_shape) -> (N,) replacing the SDE's reference
    density pi at T, its expectation then estimated with n_time_samples * n_noise_samples draws (the
    default pi's is exact).

    One evaluation calls the score once on B * n_time_samples * n_noise_samples images (memory grows
    with that product). Gradients flow to x and to any score parameters that require grad.
    """

    def __init__(
        self,
        score: ScoreFn,
        sde: SDE,
        *,
        t0: float = 1e-3,
        n_time_samples: int = 1,
        n_noise_samples: int = 1,
        importance_sampling: bool = True,
        event_shape: tuple[int, ...] | None = None,
        terminal_log_prob: Callable[[Tensor], Tensor] | None = None,
    ):
        if not callable(score):
            raise TypeError(f"score: expected a callable score(x, t), got {type(score).__name__}")
        t0 = number(t0, "t0", low=0.0, high=sde.T, high_open=True)
        try:
            n_time_samples = positive_int(n_time_samples, "n_time_samples")
            n_noise_samples = positive_int(n_noise_samples, "n_noise_samples")
        except TypeError as err:  # SurrogatePrior's contract (and its tests): ValueError, for a bool or float too
            raise ValueError(str(err)) from None
        if not isinstance(importance_sampling, bool):
            raise ValueError(f"importance_sampling: expected True or False, got {importance_sampling!r}")
        if terminal_log_prob is not None and not callable(terminal_log_prob):
            raise TypeError(f"terminal_log_prob: expected a callable, got {type(terminal_log_prob).__name__}")
        self.score = score
        self.sde = sde
        self.t0 = t0
        self.n_time_samples = n_time_samples
        self.n_noise_samples = n_noise_samples
        self.importance_sampling = importance_sampling
        shape = event_shape if event_shape is not None else getattr(score, "event_shape", None)
        self.event_shape = torch.Size(shape) if shape is not None else None
        self.terminal_log_prob = terminal_log_prob

    @property
    def smoothing(self) -> float:
        """2 s(t0)^2 / a(t0)^2: the variance of the white noise phat adds to the data, phat = p_0 * N(0, this I)
        for an exact score (module docstring). Per pixel, in the images' squared units."""
        a0, s0 = self.sde.marginal(torch.tensor([self.t0], dtype=torch.float64))
        return float(2 * (s0 / a0) ** 2)

    def __repr__(self) -> str:
        return (
            f"SurrogatePrior(sde={self.sde!r}, t0={self.t0}, n_time_samples={self.n_time_samples}, "
            f"n_noise_samples={self.n_noise_samples}, importance_sampling={self.importance_sampling}, "
            f"event_shape={self.event_shape})"
        )

    def _sample_times(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Times from the proposal's inverse CDF at u in [0, 1], and g^2 / (s^2 p(t)). u: (N,) -> two (N,)."""
        t0, t_end = self.t0, self.sde.T
        if not self.importance_sampling:
            t = t0 + u * (t_end - t0)
            _, s = self.sde.marginal(t)
            return t, (t_end - t0) * self.sde.diffusion(t) ** 2 / s**2
        # lambda = -2 tau with tau = log(s / a): the proposal is uniform in tau.
        t, span = self.sde.times_uniform_in_log_noise_ratio(u, t0)
        return t, (2.0 * span).to(u.dtype).expand_as(u)

    def _terminal(self, x: Tensor, a: Tensor, s: Tensor, generator: torch.Generator | None) -> Tensor:
        """E_z log pi(a x + s z) at T: exact for the SDE's reference density, else one draw per
        (time, noise) pair of the integral. -> (B,)"""
        if self.terminal_log_prob is None:
            d = x[0].numel()
            return self.sde.prior_log_prob(a * x) - 0.5 * d * s**2 / self.sde.prior_std() ** 2
        b, m = x.shape[0], self.n_time_samples * self.n_noise_samples
        z = torch.randn((b, m) + x.shape[1:], generator=generator, device=x.device, dtype=x.dtype)
        x_end = (a * x.unsqueeze(1) + s * z).reshape((b * m,) + x.shape[1:])
        return self.terminal_log_prob(x_end).reshape(b, m).mean(1)

    def log_prob(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Unbiased estimate of the lower bound L(x) <= log phat(x) in nats (see the module docstring).

        L(x) = d log a(T) + E_z[log pi(a(T) x + s(T) z)]
               + 1/2 int_{t0}^T g^2 / s^2 E_z[d - |s s_theta(a x + s z, t) + z|^2] dt
        (Song et al., NeurIPS 2021, Theorem 1 in denoising score-matching form, truncated at t0).

        x: (B, *event_shape). generator: draws the times and noises, on x's device.
        Returns (B,) in x's dtype; each call is an independent draw of the estimate.
        """
        check_images(x, self.event_shape)
        b, d, event = x.shape[0], x[0].numel(), x.shape[1:]
        k, m = self.n_time_samples, self.n_noise_samples
        strata = torch.arange(k, dtype=x.dtype, device=x.device)
        u = (strata + torch.rand(b, k, generator=generator, device=x.device, dtype=x.dtype)) / k
        t, weight = self._sample_times(u.reshape(-1))
        t, weight = t.repeat_interleave(m), weight.repeat_interleave(m)
        z = torch.randn((b * k * m,) + event, generator=generator, device=x.device, dtype=x.dtype)
        x_rep = x.unsqueeze(1).expand((b, k * m) + event).reshape((b * k * m,) + event)
        x_t = self.sde.perturb(x_rep, t, z)
        score = self.score(x_t, t)
        if score.shape != x_t.shape:
            raise ValueError(f"score: expected an output shaped like x {tuple(x_t.shape)}, got {tuple(score.shape)}")
        _, s = self.sde.marginal(t)
        residual = (per_sample(s, z) * score + z).pow(2).reshape(b * k * m, d).sum(1)
        integral = 0.5 * (weight * (d - residual)).reshape(b, k * m).mean(1)
        a_end, s_end = self.sde.marginal(torch.tensor([self.sde.T], dtype=x.dtype, device=x.device))
        return d * a_end.log() + self._terminal(x, a_end, s_end, generator) + integral
