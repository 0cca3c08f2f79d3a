"""Exact log-density of a score model through the probability-flow ODE.

Two solvers (`ODEOptions.solver`): for priors with a Gaussian base (every shipped prior, and any ScorePrior
given `gaussian_base`), a fixed-grid exponential integrator that solves the Gaussian's part of the flow in
closed form and integrates only the network's residual (`scoreprior.gaussian_flow`: for prior and
posterior draws, which DPI and the correction evaluate); and the adaptive solver below, the reference and
the default (clean images, e.g. held-out test images, need it: see `ODEOptions.solver`).

The probability-flow ODE dx/dt = f(x, t) - g(t)^2 s(x, t) / 2 (Song et al., ICLR 2021) transports the
data density p_{t0} to the reference density p_T. The instantaneous change of variables gives

    log p_{t0}(x) = log p_T(x_T) + int_{t0}^{T} div_x [f - g^2 s / 2](x_t, t) dt,

integrated here as the state (x_t, int div) with torchdiffeq (Feng et al., ICCV 2023). Only the
score's Jacobian trace is computed, exactly (vmap over chunks of basis vectors) or by Hutchinson with
probes fixed for the solve. The default, divergence="auto", is exact up to EXACT_MAX_DIM = 256 numbers
per image and Hutchinson above: an exact evaluation costs about d backward passes, so at 32 x 32
(d = 1024) one image at rtol = atol = 1e-5 took more than 15 minutes on 2 CPU cores (16 x 16: 22 s).

Scaled state and time: with v(t) = a(t)^2 + s(t)^2, the marginal variance of unit-Gaussian data N(0, I),
the solver integrates y = x / sqrt(v) in the time tau = log(s(t) / a(t)) (d tau / dt = g^2 / (2 s^2)):

    dy/dtau = -s^2 / sqrt(v) (s(x, t) + x / v),    d delta/dtau = -s^2 (tr J_s + d / v),

and adds (d/2) log(v(T) / v(t0)) in closed form. Both right-hand sides vanish for unit-Gaussian data,
so the tolerances are spent on what the data add to the trivial flow; and in tau the flow of image data
changes at a roughly even pace (t crowds it near t0, where the score varies on the scale s(t)), so
the log-density integral is accurate whenever the image state is: on the shipped natural-16 prior at
rtol = atol = 1e-5 its solver error is 0.2 nats with no tolerance of its own, against 10-30 nats in t.

Error control matched to the estimator: the exact trace holds the log-density integral to `atol` nats
per step; Hutchinson to min(`atol` d, 0.05) (atol per dimension, capped), since its Monte-Carlo noise
(10-20 nats for one probe on 16 x 16 and 32 x 32 images) dwarfs that solver error (0.02 nats at
rtol = atol = 1e-5, 0.35 at the DPI tolerance 1e-3; benchmarks/bench_logprob_compare.py, bench_dpi.py).
Hutchinson's Jacobian-vector products are central differences of the score by default (no autograd:
1.5x cheaper per evaluation, 2x cheaper to differentiate), and the Gaussian base (`ScorePrior(gaussian_base=...)`)
serves as a control variate: its part of the trace is taken in closed form. benchmarks/bench_logprob_compare.py
measures all of it against the reference algorithm.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint
from tqdm.auto import tqdm

from scoreprior._checks import batch_shape, number, positive_float, positive_int
from scoreprior.gaussian_flow import GaussianBase, gaussian_base_log_prob
from scoreprior.priors import GaussianPrior
from scoreprior.sde import SDE, per_sample
from scoreprior.solver_options import ODEOptions, merge_deprecated
from scoreprior.traces import difference_step, draw_probes, exact_trace, quadratic_forms

__all__ = ["EXACT_MAX_DIM", "ODEOptions", "ScorePrior", "bits_per_dim", "check_images"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]

_ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
EXACT_MAX_DIM = 256
"""Largest image size d (numbers per image) for which divergence="auto" takes the exact trace."""
# First step of an adaptive solve, as a fraction of the tau interval (natural-16, rtol = atol = 1e-5: 115
# function evaluations with 1/32, 109 with 1/16, 121 with 1/64; at 1e-3, 1/16 saves 12 of 49 but its
# solver error is 7.4 nats against 1.8).
_FIRST_STEP_FRACTION = 32
# Largest default tolerance (nats per step) of Hutchinson's log-density integral: one probe is noisy by
# 5-20 nats on 8 x 8 to 32 x 32 images; 0.05 per step keeps the solver's share at 0.35 (bench_dpi.py).
_HUTCHINSON_LOGP_ATOL = 0.05


def bits_per_dim(log_prob: Tensor, dim: int, *, data_range: float = 1.0) -> Tensor:
    """Bits per dimension of 8-bit data from a continuous log-density in nats.

    bpd = -log p / (d ln 2) + log2(256 / data_range). Valid only for 8-bit data dequantized uniformly
    and scaled to an interval of length `data_range` (1 for [0, 1], 2 for [-1, 1]): the offset converts
    the density on the scaled interval into the probability of the 256-level bin.

    log_prob: (B,) nats; dim: number of dimensions d of one image. Returns (B,).
    """
    dim, data_range = positive_int(dim, "dim"), positive_float(data_range, "data_range")
    return -log_prob / (dim * math.log(2.0)) + math.log2(256.0 / data_range)


def check_images(x: Tensor, event_shape: torch.Size | None) -> None:
    """Validate a batch x (B, *event_shape) of finite floating-point images at a public boundary."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {type(x).__name__}")
    if event_shape is not None:
        batch_shape(x, "x", event_shape)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x: expected a non-empty batch (B, *event_shape), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x: contains NaN or inf")


class _Dynamics(nn.Module):
    """Right-hand side of the augmented ODE d(y, delta)/dtau = (scaled drift, its divergence), tau = log(s/a).

    An nn.Module so that odeint_adjoint can be given its parameters explicitly. probes: None for the
    exact trace, else (K, B, *event_shape) Hutchinson probes; cv_weights: None, or the Gaussian base's
    (eigvals (d,), (w^2 - 1) (K, B, d)) with w the probes in the Gaussian's eigenbasis.
    """

    def __init__(
        self, score: ScoreFn, sde: SDE, times: Tensor, probes: Tensor | None, options: ODEOptions, stats: dict,
        cv_weights: tuple[Tensor, Tensor] | None = None, bar: tqdm | None = None,
    ):
        super().__init__()
        self.bar = bar
        self.score = score
        self.sde = sde
        self.t_min, self.t_max = times.min().item(), times.max().item()
        self.probes = probes
        self.options = options
        self.stats = stats
        self.cv_weights = cv_weights
        self.counter = "nfe"

    def _score(self, x: Tensor, t: Tensor) -> Tensor:
        s = self.score(x, t.repeat(x.shape[0] // t.shape[0]))
        if s.shape != x.shape:
            raise ValueError(f"score: expected an output shaped like x {tuple(x.shape)}, got {tuple(s.shape)}")
        return s

    def forward(self, tau: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        self.stats[self.counter] += 1
        if self.bar is not None:
            self.bar.update(1)
        y = state[0]
        # No gradient w.r.t. time is needed: a graph through tau would make the adjoint integrate a stiff,
        # unused dL/dtau term. The clamp keeps t inside the SDE's domain where tau, rounded to the
        # state's dtype at the interval's ends, maps just outside [t0, T].
        tb = self.sde.time_at_log_noise_ratio(tau.detach()).clamp(self.t_min, self.t_max).expand(y.shape[0])
        a, s = self.sde.marginal(tb)
        v = a * a + s * s
        x = per_sample(v.sqrt(), y) * y
        if self.probes is None:
            score, trace = exact_trace(lambda z: self._score(z, tb), x, chunk_size=self.options.chunk_size)
        else:
            step = None if self.options.jvp == "autograd" else difference_step(x.dtype) * s
            score, forms = quadratic_forms(lambda z: self._score(z, tb), x, self.probes, step=step)
            if self.cv_weights is not None:
                # v^T J v - v^T J_G v + tr J_G with J_G = -U diag(1 / (a^2 lam + s^2)) U^T, the Jacobian of the
                # Gaussian's score: unbiased for any probes with E[v v^T] = I.
                eigvals, centred_w2 = self.cv_weights
                forms = forms + (centred_w2 / (a[0] ** 2 * eigvals + s[0] ** 2)).sum(2)
            trace = forms.mean(0)
        s2 = s * s
        dy = -per_sample(s2 / v.sqrt(), y) * (score + x / per_sample(v, y))
        d_delta = -s2 * (trace + y[0].numel() / v)
        return dy, d_delta


class ScorePrior:
    """Prior density log p_theta(x) of a score model, by the probability-flow ODE.

    score: any callable `score(x, t) -> tensor shaped like x`, x (B, *event_shape), t a (B,) tensor;
    sde: the forward SDE the score belongs to; t0: the smallest time, log p is that of p_{t0};
    event_shape: shape of one image, checked on input (read from `score.event_shape` when present);
    terminal_log_prob: callable x_T (B, *event_shape) -> (B,) replacing the SDE's reference density at T;
    data_range: (lo, hi) of the images the score was trained on, when known (`load_prior` reads it from
    the checkpoint; the shipped priors: (0, 1)), so that callers can catch images on another scale.
    gaussian_base: a `GaussianPrior` near the data (e.g. `GaussianPrior.fit(training_images, floor=...)`;
    `load_prior` and `pretrained` set a `GaussianResidualNet`'s own). With it `log_prob` integrates only
    what the score adds to that Gaussian (`ODEOptions(solver="gaussian")`, for prior and posterior draws), and the
    adaptive solver uses it as a control variate: Hutchinson estimates tr(J - J_G) and adds the Gaussian
    score's trace tr J_G in closed form, still unbiased, with less variance the closer the data are to it.
    control_variate: deprecated name of gaussian_base.
    Gradients flow to x and to any score parameters that require grad, with or without the adjoint;
    without grad mode or an x that requires grad no graph is built.
    """

    def __init__(
        self,
        score: ScoreFn,
        sde: SDE,
        *,
        t0: float = 1e-5,
        event_shape: tuple[int, ...] | None = None,
        terminal_log_prob: Callable[[Tensor], Tensor] | None = None,
        data_range: tuple[float, float] | None = None,
        gaussian_base: GaussianPrior | None = None,
        control_variate: GaussianPrior | None = None,
    ):
        if not callable(score):
            raise TypeError(f"score: expected a callable score(x, t), got {type(score).__name__}")
        if data_range is not None and not (len(data_range) == 2 and all(math.isfinite(v) for v in data_range)
                                           and data_range[0] <= data_range[1]):
            raise ValueError(f"data_range: expected (lo, hi) with lo <= hi, got {data_range!r}")
        self.data_range = None if data_range is None else (float(data_range[0]), float(data_range[1]))
        self.t0 = number(t0, "t0", low=0.0, high=sde.T, high_open=True)
        self.score = score
        self.sde = sde
        shape = event_shape if event_shape is not None else getattr(score, "event_shape", None)
        self.event_shape = torch.Size(shape) if shape is not None else None
        self.terminal_log_prob = terminal_log_prob if terminal_log_prob is not None else sde.prior_log_prob
        if control_variate is not None:
            warnings.warn("ScorePrior(control_variate=G) is deprecated: use ScorePrior(gaussian_base=G)",
                          DeprecationWarning, stacklevel=2)
            if gaussian_base is not None:
                raise TypeError("gaussian_base, control_variate: give one (control_variate is its old name)")
            gaussian_base = control_variate
        self._base = None
        if gaussian_base is not None:
            if not isinstance(gaussian_base, GaussianPrior):
                raise TypeError(f"gaussian_base: expected a GaussianPrior, got {type(gaussian_base).__name__}")
            if self.event_shape is not None and gaussian_base.event_shape != self.event_shape:
                raise ValueError(f"gaussian_base: expected event shape {tuple(self.event_shape)}, got "
                                 f"{tuple(gaussian_base.event_shape)}")
            self._base = GaussianBase(gaussian_base)

    def __repr__(self) -> str:
        return f"ScorePrior(sde={self.sde!r}, t0={self.t0}, event_shape={self.event_shape})"

    @property
    def gaussian_base(self) -> GaussianPrior | None:
        """The Gaussian base (a `GaussianPrior`), or None."""
        return None if self._base is None else self._base.gaussian

    @property
    def control_variate(self) -> GaussianPrior | None:
        """Deprecated name of `gaussian_base`."""
        warnings.warn("ScorePrior.control_variate is deprecated: use ScorePrior.gaussian_base", DeprecationWarning,
                      stacklevel=2)
        return self.gaussian_base

    def resolve(self, options: ODEOptions, x: Tensor) -> ODEOptions:
        """`options` with "auto" solver and divergence resolved for images like x (B, *event_shape)."""
        changes = {}
        if options.divergence == "auto":
            changes["divergence"] = "exact" if x[0].numel() <= EXACT_MAX_DIM else "hutchinson"
        if options.solver == "auto":
            changes["solver"] = "gaussian" if self._base is not None and not options.adjoint else "adaptive"
        elif options.solver == "gaussian" and self._base is None:
            raise ValueError("options: solver='gaussian' needs a prior with a Gaussian base "
                             "(ScorePrior(gaussian_base=...)); use solver='adaptive' or 'auto'")
        return options.replace(**changes) if changes else options

    def log_prob(
        self,
        x: Tensor,
        options: ODEOptions | None = None,
        *,
        generator: torch.Generator | None = None,
        return_stats: bool = False,
        progress: bool = False,
        **deprecated,
    ) -> Tensor | tuple[Tensor, dict]:
        """log p_{t0}(x) in nats.

        x: (B, *event_shape). options: an `ODEOptions` (solver, steps, divergence, probes, tolerances; default
        ODEOptions()). generator: draws the Hutchinson probes (pass one for reproducible values).
        progress: a tqdm counter of the solver's function evaluations.
        The solver options were keyword arguments before (log_prob(x, divergence="hutchinson", n_probes=4));
        they still work, with a DeprecationWarning showing the `ODEOptions` call.

        Returns (B,) log-densities, and with return_stats a dict: "nfe" (evaluations of the forward solve),
        "nfe_backward" (adjoint evaluations, filled in when backward runs), "solver" ("gaussian" or
        "adaptive"), "divergence" ("exact" or "hutchinson") and "log_prob_se" ((B,) standard error of the trace
        integral from the spread of the "gaussian" solver's probe sets, or None).
        """
        options = merge_deprecated(options, deprecated, stacklevel=2)
        check_images(x, self.event_shape)
        options = self.resolve(options, x)
        if options.solver == "gaussian":
            needs_grad = torch.is_grad_enabled() and x.requires_grad
            with torch.set_grad_enabled(needs_grad):
                logp, stats = gaussian_base_log_prob(self.score, self.sde, self._base, x, t0=self.t0,
                                                     terminal_log_prob=self.terminal_log_prob, options=options,
                                                     generator=generator, progress=progress)
        else:
            logp, stats = self._adaptive_log_prob(x, options, generator, progress)
        return (logp, stats) if return_stats else logp

    def _adaptive_log_prob(
        self, x: Tensor, options: ODEOptions, generator: torch.Generator | None, progress: bool
    ) -> tuple[Tensor, dict]:
        """The adaptive solver (module docstring) with resolved options."""
        d = x[0].numel()
        divergence, rtol, atol, method = options.divergence, options.rtol, options.atol, options.method
        logp_atol = options.logp_atol
        if logp_atol is None:
            logp_atol = atol if divergence == "exact" else min(atol * d, _HUTCHINSON_LOGP_ATOL)
        probes = cv_weights = None
        if divergence == "hutchinson":
            probes = draw_probes(options.probe, options.n_probes, x, generator)
            if self._base is not None:
                _, eigvals, eigvecs = self._base.on(x)
                w = probes.reshape(options.n_probes, x.shape[0], d) @ eigvecs
                cv_weights = (eigvals, w * w - 1.0)
        stats = {"nfe": 0, "nfe_backward": 0, "solver": "adaptive", "divergence": divergence, "log_prob_se": None}
        times = torch.tensor([self.t0, self.sde.T], dtype=torch.float64, device=x.device)
        taus = self.sde.log_noise_ratio(times).to(x.dtype)
        bar = tqdm(desc=f"log p ({divergence})", unit="nfe", disable=not progress, leave=False, dynamic_ncols=True)
        dynamics = _Dynamics(self.score, self.sde, times.to(x.dtype), probes, options, stats, cv_weights, bar)
        # Adaptive solvers may step past the end of the interval and interpolate back; step_t makes
        # them land on it, so the dynamics are never evaluated outside [t0, T]. A fixed first step keeps
        # gradients exact without the adjoint: torchdiffeq's own choice is a differentiable function of
        # x, so backpropagation through it would add a spurious d(step)/dx term (several % of d log p/dx).
        solver_options = None
        if method in _ADAPTIVE_SOLVERS:
            solver_options = {"step_t": taus, "first_step": (taus[1] - taus[0]).item() / _FIRST_STEP_FRACTION}
        a, s = self.sde.marginal(times)
        v = (a * a + s * s).to(x.dtype)
        state = (x / v[0].sqrt(), x.new_zeros(x.shape[0]))
        # The log-density integral is controlled in absolute nats: a relative tolerance on it would
        # loosen with the size of log p, i.e. with the image dimension.
        rtols, atols = (rtol, 0.0), (atol, logp_atol)
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        with torch.set_grad_enabled(needs_grad), bar:
            if options.adjoint and needs_grad:
                params = tuple(p for p in getattr(self.score, "parameters", tuple)() if p.requires_grad)
                ys, deltas = odeint_adjoint(
                    dynamics, state, taus, rtol=rtols, atol=atols, method=method, options=solver_options,
                    adjoint_rtol=rtol, adjoint_atol=atol, adjoint_params=params, adjoint_options=solver_options,
                )
            else:
                ys, deltas = odeint(dynamics, state, taus, rtol=rtols, atol=atols, method=method,
                                    options=solver_options)
        dynamics.counter, dynamics.bar = "nfe_backward", None
        offset = 0.5 * d * (v[1] / v[0]).log()
        return self.terminal_log_prob(v[1].sqrt() * ys[-1]) + deltas[-1] + offset, stats
