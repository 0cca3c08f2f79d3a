"""Exact log-density of a score model through the probability-flow ODE.

The probability-flow ODE dx/dt = f(x, t) - g(t)^2 s(x, t) / 2 (Song et al., ICLR 2021) transports the
data density p_{t0} to the reference density p_T. The instantaneous change of variables gives

    log p_{t0}(x) = log p_T(x_T) + int_{t0}^{T} div_x [f - g^2 s / 2](x_t, t) dt,

integrated here as the state (x_t, int div) with torchdiffeq (Feng et al., ICCV 2023). Only the
score's Jacobian trace is computed, exactly (vmap over chunks of basis vectors) or by Hutchinson with
probes fixed for the solve. The default, divergence="auto", is exact up to EXACT_MAX_DIM = 256 numbers
per image and Hutchinson above: an exact evaluation costs about d backward passes, so at 32 x 32
(d = 1024) one image at rtol = atol = 1e-5 took more than 15 minutes on 2 CPU cores (16 x 16: 22 s).

Scaled state: with v(t) = a(t)^2 + s(t)^2, the marginal variance of unit-Gaussian data N(0, I), the
solver integrates y = x / sqrt(v) and the divergence in y-coordinates,

    dy/dt = -g^2 / (2 sqrt(v)) (s(x, t) + x / v),    d delta/dt = -g^2 (tr J_s + d / v) / 2,

and adds (d/2) log(v(T) / v(t0)) in closed form. Both right-hand sides vanish for unit-Gaussian data,
so the tolerances are spent on what the data add to the trivial flow, not on the known growth of x
(e.g. by sigma_max / sigma_min for the VE-SDE) or the large known part of log p.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint
from tqdm.auto import tqdm

from scoreprior.sde import SDE, per_sample

__all__ = ["EXACT_MAX_DIM", "ScorePrior", "bits_per_dim", "check_images"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]

# Basis vectors per vmap call are capped so that one chunk of cotangents holds at most this many numbers.
_MAX_CHUNK_ELEMENTS = 2**24
_ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
EXACT_MAX_DIM = 256
"""Largest image size d (numbers per image) for which divergence="auto" takes the exact trace."""


def bits_per_dim(log_prob: Tensor, dim: int, *, data_range: float = 1.0) -> Tensor:
    """Bits per dimension of 8-bit data from a continuous log-density in nats.

    bpd = -log p / (d ln 2) + log2(256 / data_range). Valid only for 8-bit data dequantized uniformly
    and scaled to an interval of length `data_range` (1 for [0, 1], 2 for [-1, 1]): the offset converts
    the density on the scaled interval into the probability of the 256-level bin.

    log_prob: (B,) nats; dim: number of dimensions d of one image. Returns (B,).
    """
    if dim <= 0 or data_range <= 0:
        raise ValueError(f"dim, data_range: must be positive, got {dim}, {data_range}")
    return -log_prob / (dim * math.log(2.0)) + math.log2(256.0 / data_range)


def check_images(x: Tensor, event_shape: torch.Size | None) -> None:
    """Validate a batch x (B, *event_shape) of finite floating-point images at a public boundary."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {type(x).__name__}")
    if event_shape is not None and x.shape[1:] != event_shape:
        expected = ", ".join(map(str, event_shape))
        raise ValueError(f"x: expected shape (B, {expected}), got {tuple(x.shape)}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x: expected a non-empty batch (B, *event_shape), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x: contains NaN or inf")


class _Dynamics(nn.Module):
    """Right-hand side of the augmented ODE d(x, delta)/dt = (drift, div drift).

    An nn.Module so that odeint_adjoint can be given its parameters explicitly.
    """

    def __init__(
        self, score: ScoreFn, sde: SDE, times: Tensor, probes: Tensor | None, chunk: int, stats: dict,
        bar: tqdm | None = None,
    ):
        super().__init__()
        self.bar = bar
        self.score = score
        self.sde = sde
        self.t_min, self.t_max = times.min().item(), times.max().item()
        self.probes = probes
        self.chunk = chunk
        self.stats = stats
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

    def _trace_hutchinson(self, vjp_fn, x: Tensor) -> Tensor:
        """Mean over the fixed probes v of v^T (d score / d x) v per sample. -> (B,)"""
        (vjps,) = torch.func.vmap(vjp_fn)(self.probes)
        return (vjps * self.probes).reshape(self.probes.shape[0], x.shape[0], -1).sum(2).mean(0)

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        self.stats[self.counter] += 1
        if self.bar is not None:
            self.bar.update(1)
        y = state[0]
        # No gradient w.r.t. time is needed: a graph through t would make the adjoint integrate a stiff,
        # unused dL/dt term. The clamp keeps the solver's trial evaluations (initial step selection)
        # inside the SDE's domain.
        tb = t.detach().clamp(self.t_min, self.t_max).expand(y.shape[0])
        a, s = self.sde.marginal(tb)
        g2 = self.sde.diffusion(tb) ** 2
        v = per_sample(a * a + s * s, y)
        x = v.sqrt() * y
        score, vjp_fn = torch.func.vjp(lambda z: self._score(z, tb), x)
        if self.probes is None:
            trace = self._trace_exact(vjp_fn, x)
        else:
            trace = self._trace_hutchinson(vjp_fn, x)
        dy = -0.5 * per_sample(g2, y) / v.sqrt() * (score + x / v)
        d_delta = -0.5 * g2 * (trace + y[0].numel() / (a * a + s * s))
        return dy, d_delta


class ScorePrior:
    """Prior density log p_theta(x) of a score model, by the probability-flow ODE.

    score: any callable `score(x, t) -> tensor shaped like x`, x (B, *event_shape), t a (B,) tensor;
    sde: the forward SDE the score belongs to; t0: the smallest time, log p is that of p_{t0};
    event_shape: shape of one image, checked on input (read from `score.event_shape` when present);
    terminal_log_prob: callable x_T (B, *event_shape) -> (B,) replacing the SDE's reference density at T;
    data_range: (lo, hi) of the images the score was trained on, when known (`load_prior` reads it from
    the checkpoint; the shipped priors: (0, 1)), so that callers can catch images on another scale.
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
    ):
        if not callable(score):
            raise TypeError(f"score: expected a callable score(x, t), got {type(score).__name__}")
        if data_range is not None and not (len(data_range) == 2 and all(math.isfinite(v) for v in data_range)
                                           and data_range[0] <= data_range[1]):
            raise ValueError(f"data_range: expected (lo, hi) with lo <= hi, got {data_range!r}")
        self.data_range = None if data_range is None else (float(data_range[0]), float(data_range[1]))
        if not 0.0 < t0 < sde.T:
            raise ValueError(f"t0: expected 0 < t0 < {sde.T}, got {t0}")
        self.score = score
        self.sde = sde
        self.t0 = float(t0)
        shape = event_shape if event_shape is not None else getattr(score, "event_shape", None)
        self.event_shape = torch.Size(shape) if shape is not None else None
        self.terminal_log_prob = terminal_log_prob if terminal_log_prob is not None else sde.prior_log_prob

    def __repr__(self) -> str:
        return f"ScorePrior(sde={self.sde!r}, t0={self.t0}, event_shape={self.event_shape})"

    def log_prob(
        self,
        x: Tensor,
        *,
        divergence: str = "auto",
        n_probes: int = 1,
        probe: str = "rademacher",
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
        solve, backward pass included: an unbiased estimate, one backward pass per probe) or "auto"
        (default: exact when d = x[0].numel() <= EXACT_MAX_DIM = 256, Hutchinson above; pass a
        `generator` for reproducible probes).
        rtol, atol: torchdiffeq tolerances for the image state; the log-density integral is held to the
        absolute tolerance `logp_atol` (nats per step, default atol). method: a torchdiffeq solver.
        adjoint: gradients by the continuous adjoint (memory flat in the number of solver steps).
        Gradients w.r.t. x are built only when grad mode is on and x requires grad.
        progress: show a tqdm counter of the solver's function evaluations (its total is not known ahead).

        Returns (B,) log-densities, and with return_stats a dict: "nfe" (evaluations of the forward
        solve), "nfe_backward" (adjoint evaluations, filled in when backward runs) and "divergence"
        (the method used: "exact" or "hutchinson").
        """
        check_images(x, self.event_shape)
        for name, tol in (("rtol", rtol), ("atol", atol), ("logp_atol", atol if logp_atol is None else logp_atol)):
            if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
                raise ValueError(f"{name}: expected a positive finite number, got {tol!r}")
        if divergence not in ("auto", "exact", "hutchinson"):
            raise ValueError(f"divergence: expected 'auto', 'exact' or 'hutchinson', got {divergence!r}")
        if not isinstance(n_probes, int) or n_probes < 1:
            raise ValueError(f"n_probes: expected a positive integer, got {n_probes!r}")
        if probe not in ("rademacher", "gaussian"):
            raise ValueError(f"probe: expected 'rademacher' or 'gaussian', got {probe!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size!r}")

        d = x[0].numel()
        if divergence == "auto":
            divergence = "exact" if d <= EXACT_MAX_DIM else "hutchinson"
        probes = None
        if divergence == "hutchinson":
            shape = (n_probes,) + tuple(x.shape)
            probes = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
            if probe == "rademacher":
                probes = probes.sign()
        chunk = chunk_size or max(1, min(d, _MAX_CHUNK_ELEMENTS // (x.shape[0] * d)))
        stats = {"nfe": 0, "nfe_backward": 0, "divergence": divergence}
        times = torch.tensor([self.t0, self.sde.T], dtype=x.dtype, device=x.device)
        bar = tqdm(desc=f"log p ({divergence})", unit="nfe", disable=not progress, leave=False, dynamic_ncols=True)
        dynamics = _Dynamics(self.score, self.sde, times, probes, chunk, stats, bar)
        # Adaptive solvers may step past the end of the interval and interpolate back; step_t makes
        # them land on it, so the dynamics are never evaluated outside [t0, T].
        options = {"step_t": times} if method in _ADAPTIVE_SOLVERS else None
        a, s = self.sde.marginal(times)
        v = a * a + s * s
        state = (x / v[0].sqrt(), x.new_zeros(x.shape[0]))
        # The log-density integral is controlled in absolute nats: a relative tolerance on it would
        # loosen with the size of log p, i.e. with the image dimension.
        rtols, atols = (rtol, 0.0), (atol, atol if logp_atol is None else logp_atol)
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        with torch.set_grad_enabled(needs_grad), bar:
            if adjoint and needs_grad:
                params = tuple(p for p in getattr(self.score, "parameters", tuple)() if p.requires_grad)
                ys, deltas = odeint_adjoint(
                    dynamics, state, times, rtol=rtols, atol=atols, method=method, options=options,
                    adjoint_rtol=rtol, adjoint_atol=atol, adjoint_params=params, adjoint_options=options,
                )
            else:
                ys, deltas = odeint(dynamics, state, times, rtol=rtols, atol=atols, method=method, options=options)
        dynamics.counter, dynamics.bar = "nfe_backward", None
        offset = 0.5 * x[0].numel() * (v[1] / v[0]).log()
        logp = self.terminal_log_prob(v[1].sqrt() * ys[-1]) + deltas[-1] + offset
        return (logp, stats) if return_stats else logp
