"""Exact log-density of a score model through the probability-flow ODE.

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
1.5x cheaper per evaluation, 2x cheaper to differentiate), and a Gaussian control variate (`ScorePrior(control_variate=...)`) removes the part of the trace that a
Gaussian fit of the data explains. benchmarks/bench_logprob_compare.py measures all of it against the
reference algorithm.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint
from tqdm.auto import tqdm

from scoreprior._checks import batch_shape, choice, number, positive_float, positive_int
from scoreprior.priors import GaussianPrior
from scoreprior.sde import SDE, per_sample

__all__ = ["EXACT_MAX_DIM", "ScorePrior", "bits_per_dim", "check_images"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]

# Basis vectors per vmap call are capped so that one chunk of cotangents holds at most this many numbers:
# on CPU small chunks are fastest (one VJP at batch 4 already keeps 2 cores busy; a chunk of all 1024
# basis vectors of a 32 x 32 batch of 4 ran 2.6x slower than a loop, 2^14 numbers 1.1x faster, see
# benchmarks/bench_logprob_compare.py); on a GPU large chunks pay.
_MAX_CHUNK_ELEMENTS_CPU = 2**14
_MAX_CHUNK_ELEMENTS_GPU = 2**24
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
    exact trace, else (K, B, *event_shape) Hutchinson probes; cv_weights: None, or the control variate's
    (eigvals (d,), (w^2 - 1) (K, B, d)) with w the probes in the Gaussian's eigenbasis.
    """

    def __init__(
        self, score: ScoreFn, sde: SDE, times: Tensor, probes: Tensor | None, chunk: int, stats: dict,
        jvp: str = "difference", cv_weights: tuple[Tensor, Tensor] | None = None, bar: tqdm | None = None,
    ):
        super().__init__()
        self.bar = bar
        self.score = score
        self.sde = sde
        self.t_min, self.t_max = times.min().item(), times.max().item()
        self.probes = probes
        self.chunk = chunk
        self.stats = stats
        self.jvp = jvp
        self.cv_weights = cv_weights
        # Central-difference step in units of s(t), the length on which the score of p_t varies: the
        # cube root of the machine epsilon balances truncation (step^2) against rounding (eps / step).
        self.step = 2.0 * torch.finfo(probes.dtype).eps ** (1 / 3) if probes is not None else None
        self.counter = "nfe"

    def _score(self, x: Tensor, t: Tensor) -> Tensor:
        s = self.score(x, t)
        if s.shape != x.shape:
            raise ValueError(f"score: expected an output shaped like x {tuple(x.shape)}, got {tuple(s.shape)}")
        return s

    def _trace_exact(self, vjp_fn, x: Tensor) -> Tensor:
        """tr(d score / d x) per sample: vmap of the VJP over chunks of one-hot cotangents. -> (B,)"""
        b, d = x.shape[0], x[0].numel()
        trace = x.new_zeros(b)
        for start in range(0, d, self.chunk):
            idx = torch.arange(start, min(start + self.chunk, d), device=x.device)
            basis = torch.zeros(idx.numel(), b, d, dtype=x.dtype, device=x.device)
            basis[torch.arange(idx.numel(), device=x.device), :, idx] = 1.0
            (rows,) = torch.func.vmap(vjp_fn)(basis.reshape((idx.numel(),) + x.shape))
            rows = rows.reshape(idx.numel(), b, d)
            trace = trace + rows.gather(2, idx.view(-1, 1, 1).expand(-1, b, 1)).sum((0, 2))
        return trace

    def _quadratic_forms(self, x: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """The score at x and v^T (d score / d x) v for each probe v: ((B, ...), (K, B)).

        "difference": one network call on the 2 K B points x +- h v, h = step s(t); their mean is the
        score and their half-difference / h is J v, both to O(h^2), exact for a linear score. It needs no
        autograd, so a gradient through it is one backward pass, not a double one. "autograd": a VJP.
        """
        k = self.probes.shape[0]
        if self.jvp == "autograd":
            score, vjp_fn = torch.func.vjp(lambda z: self._score(z, t), x)
            (vjps,) = torch.func.vmap(vjp_fn)(self.probes)
            return score, (vjps * self.probes).reshape(k, x.shape[0], -1).sum(2)
        h = per_sample(self.step * s, x)
        points = torch.cat([x + h * self.probes, x - h * self.probes]).reshape((2 * k * x.shape[0],) + x.shape[1:])
        out = self._score(points, t.repeat(2 * k)).reshape((2, k) + x.shape)
        jv = (out[0] - out[1]) / (2 * h)
        return out.mean((0, 1)), (jv * self.probes).reshape(k, x.shape[0], -1).sum(2)

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
            score, vjp_fn = torch.func.vjp(lambda z: self._score(z, tb), x)
            trace = self._trace_exact(vjp_fn, x)
        else:
            score, forms = self._quadratic_forms(x, tb, s)
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
    control_variate: a `GaussianPrior` near the data (e.g. `GaussianPrior.fit(training_images, floor=...)`):
    Hutchinson then estimates tr(J - J_G) and adds the Gaussian score's trace tr J_G in closed form,
    still unbiased, with less variance the closer the data are to that Gaussian (on the shipped
    natural-16 prior the mean error of one-probe log p drops from 18.3 to 10.7 nats, see
    benchmarks/bench_logprob_compare.py).
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
        self.control_variate = control_variate
        self._cv_basis = None
        if control_variate is not None:
            if not isinstance(control_variate, GaussianPrior):
                raise TypeError(f"control_variate: expected a GaussianPrior, got {type(control_variate).__name__}")
            if self.event_shape is not None and control_variate.event_shape != self.event_shape:
                raise ValueError(f"control_variate: expected event shape {tuple(self.event_shape)}, got "
                                 f"{tuple(control_variate.event_shape)}")
            eigvals, eigvecs = torch.linalg.eigh(control_variate.cov.double())
            self._cv_basis = (eigvals.clamp_min(0.0), eigvecs)

    def __repr__(self) -> str:
        return f"ScorePrior(sde={self.sde!r}, t0={self.t0}, event_shape={self.event_shape})"

    def log_prob(
        self,
        x: Tensor,
        *,
        divergence: str = "auto",
        n_probes: int = 1,
        probe: str = "rademacher",
        jvp: str = "difference",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        logp_atol: float | None = None,
        method: str = "dopri5",
        adjoint: bool = False,
        generator: torch.Generator | None = None,
        chunk_size: int | None = None,
        return_stats: bool = False,
        progress: bool = False,
    ) -> Tensor | tuple[Tensor, dict]:
        """log p_{t0}(x) in nats.

        x: (B, *event_shape). divergence: "exact" (trace of the score Jacobian, batched over basis
        chunks of `chunk_size` vectors, about d backward passes per evaluation), "hutchinson" (`n_probes`
        Rademacher or Gaussian probes drawn once with `generator` and reused at every evaluation of the
        solve: an unbiased estimate, less noisy with a `control_variate`) or "auto" (default: exact when
        d = x[0].numel() <= EXACT_MAX_DIM = 256, Hutchinson above; pass a `generator` for reproducible
        probes). jvp (Hutchinson only): how the Jacobian-vector products are formed: "difference"
        (default: central differences, one network call on 2 n_probes B points, about 1.5x cheaper than
        a forward and a VJP and 2x cheaper to differentiate; relative error O(1e-4) in float32, exact for
        a linear score) or "autograd" (a VJP per probe).
        The ODE runs in tau = log(s(t) / a(t)) (see the module docstring). rtol, atol: torchdiffeq
        tolerances of the image state y = x / sqrt(a^2 + s^2), per step in tau; logp_atol: absolute
        tolerance of the log-density integral per step in nats. Its default follows the estimator: atol
        for the exact trace, whose solver error is its whole error; min(atol * d, 0.05) for Hutchinson,
        whose Monte-Carlo noise is far larger than that solver error (one probe, 16 x 16 and 32 x 32:
        10-20 nats against 0.35 at tolerance 1e-3; see benchmarks/bench_dpi.py).
        method: a torchdiffeq solver. adjoint: gradients by the continuous adjoint (memory flat in the
        number of solver steps). Gradients w.r.t. x are built only when grad mode is on and x requires
        grad. progress: show a tqdm counter of the solver's function evaluations (its total is not known
        ahead).

        Returns (B,) log-densities, and with return_stats a dict: "nfe" (evaluations of the forward
        solve), "nfe_backward" (adjoint evaluations, filled in when backward runs) and "divergence"
        (the method used: "exact" or "hutchinson").
        """
        check_images(x, self.event_shape)
        d = x[0].numel()
        choice(divergence, "divergence", ("auto", "exact", "hutchinson"))
        if divergence == "auto":
            divergence = "exact" if d <= EXACT_MAX_DIM else "hutchinson"
        rtol, atol = positive_float(rtol, "rtol"), positive_float(atol, "atol")
        if logp_atol is None:
            logp_atol = atol if divergence == "exact" else min(atol * d, _HUTCHINSON_LOGP_ATOL)
        logp_atol = positive_float(logp_atol, "logp_atol")
        positive_int(n_probes, "n_probes")
        choice(probe, "probe", ("rademacher", "gaussian"))
        choice(jvp, "jvp", ("difference", "autograd"))
        if chunk_size is not None:
            positive_int(chunk_size, "chunk_size")

        probes = cv_weights = None
        if divergence == "hutchinson":
            shape = (n_probes,) + tuple(x.shape)
            probes = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
            if probe == "rademacher":
                probes = probes.sign()
            if self._cv_basis is not None:
                eigvals, eigvecs = (v.to(device=x.device, dtype=x.dtype) for v in self._cv_basis)
                w = probes.reshape(n_probes, x.shape[0], d) @ eigvecs
                cv_weights = (eigvals, w * w - 1.0)
        cap = _MAX_CHUNK_ELEMENTS_CPU if x.device.type == "cpu" else _MAX_CHUNK_ELEMENTS_GPU
        chunk = chunk_size or max(1, min(d, cap // (x.shape[0] * d)))
        stats = {"nfe": 0, "nfe_backward": 0, "divergence": divergence}
        times = torch.tensor([self.t0, self.sde.T], dtype=torch.float64, device=x.device)
        taus = self.sde.log_noise_ratio(times).to(x.dtype)
        bar = tqdm(desc=f"log p ({divergence})", unit="nfe", disable=not progress, leave=False, dynamic_ncols=True)
        dynamics = _Dynamics(self.score, self.sde, times.to(x.dtype), probes, chunk, stats, jvp, cv_weights, bar)
        # Adaptive solvers may step past the end of the interval and interpolate back; step_t makes
        # them land on it, so the dynamics are never evaluated outside [t0, T]. A fixed first step keeps
        # gradients exact without the adjoint: torchdiffeq's own choice is a differentiable function of
        # x, so backpropagation through it would add a spurious d(step)/dx term (several % of d log p/dx).
        options = None
        if method in _ADAPTIVE_SOLVERS:
            options = {"step_t": taus, "first_step": (taus[1] - taus[0]).item() / _FIRST_STEP_FRACTION}
        a, s = self.sde.marginal(times)
        v = (a * a + s * s).to(x.dtype)
        state = (x / v[0].sqrt(), x.new_zeros(x.shape[0]))
        # The log-density integral is controlled in absolute nats: a relative tolerance on it would
        # loosen with the size of log p, i.e. with the image dimension.
        rtols, atols = (rtol, 0.0), (atol, logp_atol)
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        with torch.set_grad_enabled(needs_grad), bar:
            if adjoint and needs_grad:
                params = tuple(p for p in getattr(self.score, "parameters", tuple)() if p.requires_grad)
                ys, deltas = odeint_adjoint(
                    dynamics, state, taus, rtol=rtols, atol=atols, method=method, options=options,
                    adjoint_rtol=rtol, adjoint_atol=atol, adjoint_params=params, adjoint_options=options,
                )
            else:
                ys, deltas = odeint(dynamics, state, taus, rtol=rtols, atol=atols, method=method, options=options)
        dynamics.counter, dynamics.bar = "nfe_backward", None
        offset = 0.5 * d * (v[1] / v[0]).log()
        logp = self.terminal_log_prob(v[1].sqrt() * ys[-1]) + deltas[-1] + offset
        return (logp, stats) if return_stats else logp
