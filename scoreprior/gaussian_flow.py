"""Log-density of a score model on a Gaussian base: a fixed-grid exponential integrator of the probability flow.

Every shipped prior is a Gaussian N(m, C), C = V diag(lambda) V^T (its training images'), plus a network's
residual. Write the score as s(x, t) = s_G(x, t) + r(x, t), with s_G the exact score of the Gaussian at t:

    s_G(x, t) = -V Sigma_t^{-1} V^T (x - a m),    Sigma_t = diag(a^2 lambda + s^2),    x_t = a x_0 + s z.

The Gaussian's probability flow is linear and solvable in closed form: along it z = Sigma_t^{-1/2} V^T (x - a m)
stays constant. By variation of constants only the residual moves z; in the time tau = log(s / a)
(d tau / dt = g^2 / (2 s^2)) and with the instantaneous change of variables,

    dz/dtau = -s^2 (Sigma_t^{-1/2} V^T s(x, t) + z / Sigma_t)            (= -s^2 Sigma_t^{-1/2} V^T r),
    log p_t0(x) = log p_T(x_T) + 1/2 sum_i log[(a_T^2 lambda_i + s_T^2) / (a_0^2 lambda_i + s_0^2)]
                  - int s^2 tr(d r / d x) dtau,                          x_T = a_T m + V Sigma_T^{1/2} z_T,

since d/dt 1/2 log(a^2 lambda + s^2) = c + g^2 / (2 (a^2 lambda + s^2)) (with f = c x, d a/dt = c a and
d s^2/dt = 2 c s^2 + g^2), and tr(d s_G / d x) = -sum_i 1 / Sigma_t,i in closed form. For data from the
Gaussian r = 0: z is constant and log p is exact at any number of steps.

The integral runs on a fixed grid in tau, graded toward t0, tau_k = tau_0 + (tau_T - tau_0) (k / N)^1.5,
by the classical Runge-Kutta method (4 network evaluations per step); the log-density integral is the
method's quadrature of the trace along the trajectory. Because the grid is fixed, the Hutchinson probes
need not stay fixed for the solve: each evaluation draws its own, so the trace noise of the 4N nodes
averages out over the integral instead of adding up. With several probe sets the spread of their
quadratures gives each image's standard error. Gradients (to x and to the score's parameters) are by
backpropagation through the fixed grid. Accuracy against the adaptive solver: benchmarks/bench_logprob_solvers.py,
numbers in docs/results.md: accurate on typical points of p_t0 (prior and posterior draws), far off on clean
images, whose score changes within a thin layer near t0 that the grid misses (see `ODEOptions.solver`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from scoreprior.priors import GaussianPrior
from scoreprior.sde import SDE
from scoreprior.solver_options import ODEOptions
from scoreprior.traces import difference_step, draw_probes, exact_trace, probe_set_size, quadratic_forms

__all__ = ["GRID_POWER", "GaussianBase", "gaussian_base_log_prob", "tau_grid"]

GRID_POWER = 1.5
"""The grid's grading: tau_k = tau_0 + (tau_T - tau_0) (k / N)^GRID_POWER, denser toward t0."""
_RK4 = ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0))
_RK4_WEIGHTS = (1 / 6, 1 / 3, 1 / 3, 1 / 6)
_RK4_NODES = (0.0, 0.5, 0.5, 1.0)


class GaussianBase:
    """A Gaussian N(m, V diag(lambda) V^T) in its eigenbasis, float64 on the CPU, cast on use.

    gaussian: a `GaussianPrior` on images of its event shape (d = its numel; V is (d, d), so d of a few
    thousand at most).
    """

    def __init__(self, gaussian: GaussianPrior):
        eigvals, eigvecs = torch.linalg.eigh(gaussian.cov.detach().double().cpu())
        self.gaussian = gaussian
        self.event_shape = gaussian.event_shape
        self.mean = gaussian.mean.detach().double().cpu().reshape(-1)
        self.eigvals = eigvals.clamp_min(0.0)
        self.eigvecs = eigvecs

    def on(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mean (d,), eigvals (d,), eigvecs (d, d)) on x's device and dtype."""
        return tuple(v.to(device=x.device, dtype=x.dtype) for v in (self.mean, self.eigvals, self.eigvecs))

    def log_det_ratio(self, a: Tensor, s: Tensor) -> float:
        """1/2 sum_i log[(a_1^2 lambda_i + s_1^2) / (a_0^2 lambda_i + s_0^2)] for (a, s) at two times (2,), float64."""
        a, s = a.double().cpu(), s.double().cpu()
        var = a[:, None] ** 2 * self.eigvals + s[:, None] ** 2
        return float(0.5 * (var[1].log() - var[0].log()).sum())


def tau_grid(sde: SDE, t0: float, steps: int) -> Tensor:
    """The solver's grid in tau = log(s / a) from t0 to T, graded toward t0 (`GRID_POWER`): (steps + 1,) float64."""
    ends = sde.log_noise_ratio(torch.tensor([t0, sde.T], dtype=torch.float64))
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64) ** GRID_POWER
    return ends[0] + (ends[1] - ends[0]) * u


class _Residual:
    """The right-hand side (dz/dtau, -s^2 tr(d r / d x) estimates per probe set) at one tau."""

    def __init__(self, score: Callable[[Tensor, Tensor], Tensor], sde: SDE, base: GaussianBase, x: Tensor,
                 t_range: tuple[float, float], options: ODEOptions, generator: torch.Generator | None, stats: dict,
                 bar):
        self.score, self.sde, self.stats, self.bar = score, sde, stats, bar
        self.mean, self.eigvals, self.eigvecs = base.on(x)
        self.shape = x.shape
        self.t_range = t_range
        self.options, self.generator = options, generator
        self.probes = None if options.fresh_probes or options.divergence == "exact" else \
            draw_probes(options.probe, options.n_probes, x, generator)

    def times(self, tau: float, b: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(t (B,), a, s) at tau, in like's dtype; t clamped into the SDE's domain against rounding."""
        tt = self.sde.time_at_log_noise_ratio(torch.tensor([tau], dtype=torch.float64)).clamp(*self.t_range)
        a, s = self.sde.marginal(tt)
        return tt.to(like).expand(b), a.to(like), s.to(like)

    def __call__(self, z: Tensor, tau: float) -> tuple[Tensor, Tensor]:
        self.stats["nfe"] += 1
        if self.bar is not None:
            self.bar.update(1)
        b = z.shape[0]
        t, a, s = self.times(tau, b, z)
        var = a * a * self.eigvals + s * s  # Sigma_t (d,)
        x = (a * self.mean + (z * var.sqrt()) @ self.eigvecs.mT).reshape(self.shape)

        def fn(points: Tensor) -> Tensor:
            return self.score(points, t.repeat(points.shape[0] // b))

        options = self.options
        if options.divergence == "exact":
            score, trace = exact_trace(fn, x, chunk_size=options.chunk_size)
            sets = (trace + (1.0 / var).sum())[None]  # tr(d r / d x), one "set"
        else:
            probes = self.probes if self.probes is not None else draw_probes(options.probe, options.n_probes, x,
                                                                              self.generator)
            step = None if options.jvp == "autograd" else (difference_step(x.dtype) * s).expand(b)
            score, forms = quadratic_forms(fn, x, probes, step=step)
            # v^T (d r / d x) v = v^T J v - v^T J_G v = v^T J v + sum_i w_i^2 / Sigma_i, w = V^T v
            w = probes.reshape(options.n_probes, b, -1) @ self.eigvecs
            forms = forms + (w * w / var).sum(2)
            size = probe_set_size(options.probe, tuple(self.shape[1:]))
            sets = forms.reshape(-1, size, b).sum(1)  # (G, B): one unbiased estimate per probe set
        if score.shape != x.shape:
            raise ValueError(f"score: expected an output shaped like x {tuple(x.shape)}, got {tuple(score.shape)}")
        s2 = s * s
        dz = -s2 * ((score.reshape(b, -1) @ self.eigvecs) / var.sqrt() + z / var)
        return dz, -s2 * sets


def gaussian_base_log_prob(
    score: Callable[[Tensor, Tensor], Tensor],
    sde: SDE,
    base: GaussianBase,
    x: Tensor,
    *,
    t0: float,
    terminal_log_prob: Callable[[Tensor], Tensor],
    options: ODEOptions,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[Tensor, dict]:
    """log p_t0(x) (B,) by the fixed-grid integrator of the module docstring, and its stats.

    x: (B, *event_shape), validated by the caller; options: an `ODEOptions` whose divergence is resolved
    ("exact" or "hutchinson"): `steps` Runge-Kutta steps (4 network calls each), the probes and the JVPs;
    generator: draws the probes. Stats: "nfe" (4 steps), "solver" ("gaussian"), "divergence",
    "log_prob_se": (B,) standard error of the trace integral from the spread of the probe sets (None with
    one set or the exact trace; detached).
    """
    steps, divergence = options.steps, options.divergence
    taus = tau_grid(sde, t0, steps)
    stats = {"nfe": 0, "nfe_backward": 0, "solver": "gaussian", "divergence": divergence, "log_prob_se": None}
    b = x.shape[0]
    bar = tqdm(total=4 * steps, desc=f"log p (gaussian base, {divergence})", unit="nfe", disable=not progress,
               leave=False, dynamic_ncols=True)
    rhs = _Residual(score, sde, base, x, (t0, sde.T), options, generator, stats, bar)
    mean, eigvals, eigvecs = rhs.mean, rhs.eigvals, rhs.eigvecs  # the base on x's device and dtype, cast once
    _, a0, s0 = rhs.times(float(taus[0]), b, x)
    z = ((x.reshape(b, -1) - a0 * mean) @ eigvecs) / (a0 * a0 * eigvals + s0 * s0).sqrt()
    integral = None
    with bar:
        for k in range(steps):
            h = float(taus[k + 1] - taus[k])
            slopes: list[Tensor] = []
            for stage, (coeffs, node, weight) in enumerate(zip(_RK4, _RK4_NODES, _RK4_WEIGHTS)):
                zs = z if stage == 0 else z + h * sum(c * k_ for c, k_ in zip(coeffs, slopes) if c)
                dz, sets = rhs(zs, float(taus[k]) + node * h)
                slopes.append(dz)
                integral = h * weight * sets if integral is None else integral + h * weight * sets
            z = z + h * sum(w * k_ for w, k_ in zip(_RK4_WEIGHTS, slopes))
    _, a_t, s_t = rhs.times(float(taus[-1]), b, x)
    x_end = (a_t * mean + (z * (a_t * a_t * eigvals + s_t * s_t).sqrt()) @ eigvecs.mT).reshape(x.shape)
    ends = sde.time_at_log_noise_ratio(taus[[0, -1]]).clamp(t0, sde.T)
    log_det = base.log_det_ratio(*sde.marginal(ends))
    sets = integral.shape[0]
    if sets > 1:
        stats["log_prob_se"] = (integral.detach().std(0) / math.sqrt(sets))
    log_p = terminal_log_prob(x_end) + log_det + integral.mean(0)
    return log_p, stats
