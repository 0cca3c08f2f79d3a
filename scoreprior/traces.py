"""Estimators of tr(d score / d x), the divergence term of the probability-flow log-density.

Both log-density solvers (`scoreprior.density`'s adaptive one and `scoreprior.gaussian_flow`'s fixed grid)
take the trace of the score's Jacobian J from here:

- exact: one VJP per basis vector, batched with vmap over chunks (about d backward passes);
- Hutchinson: v^T J v averaged over probes v with E[v v^T] = I. Probes are Rademacher, Gaussian, or
  **coloured**: the pixels split into k x k classes by (row mod k, column mod k) and by channel, one probe
  per class holding random signs on its pixels and zeros elsewhere. Summed over the C k^2 probes of one
  set, v^T J v is the diagonal of J plus the couplings between pixels of the same class, which lie k or
  more pixels apart: unbiased, and its variance holds only those distant couplings, where a Rademacher
  set of the same size keeps all of them. A score network's Jacobian is concentrated on neighbouring
  pixels (over 80 % of its off-diagonal weight at distance 1 on the shipped blackhole-32 prior), so one
  coloured set with k = 2 (4 probes) removes most of the noise that 4 Rademacher probes leave;
  docs/results.md gives the measurements.

v^T J v is formed by central differences of the score, J v ~ (score(x + h v) - score(x - h v)) / (2 h),
in one network call on the 2 K B points (their mean is the score itself, to O(h^2)), or by autograd VJPs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from scoreprior._checks import choice, positive_int
from scoreprior.sde import per_sample

__all__ = ["PROBES", "difference_step", "draw_probes", "exact_trace", "probe_set_size", "quadratic_forms"]

PROBES = ("rademacher", "gaussian", "colored")
"""Probe distributions of the Hutchinson estimator."""
COLOR_SPACING = 2
"""k of the coloured probes: pixels of one class lie k or more rows or columns apart."""

# Basis vectors per vmap call are capped so that one chunk of cotangents holds at most this many numbers:
# on CPU small chunks are fastest (one VJP at batch 4 already keeps 2 cores busy); on a GPU large chunks pay.
_MAX_CHUNK_ELEMENTS_CPU = 2**14
_MAX_CHUNK_ELEMENTS_GPU = 2**24


def probe_set_size(probe: str, event_shape: tuple[int, ...]) -> int:
    """Probes in one unbiased estimate: C k^2 for "colored" (C channels of (C, H, W) images), else 1."""
    if probe != "colored":
        return 1
    if len(event_shape) != 3:
        raise ValueError(f"probe: 'colored' needs images (C, H, W), got event shape {tuple(event_shape)}")
    return event_shape[0] * COLOR_SPACING**2


def draw_probes(probe: str, n_probes: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """n_probes probes for a batch x (B, *event_shape), as (n_probes, B, *event_shape) in x's dtype.

    probe: one of PROBES; for "colored" n_probes must be a multiple of `probe_set_size` (each set of C k^2
    coloured probes, with its own signs, is one unbiased estimate). generator: on x's device, or None.
    The probes are drawn in float32 whatever x's dtype, so that one generator gives the same probes to a
    float32 and a float64 evaluation (torch's float64 normal stream is another sequence).
    """
    choice(probe, "probe", PROBES)
    n_probes = positive_int(n_probes, "n_probes")
    shape = (n_probes,) + tuple(x.shape)
    gaussian = torch.randn(shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)
    if probe == "gaussian":
        return gaussian
    signs = gaussian.sign()  # Rademacher, from the same stream as the Gaussian probes
    if probe == "rademacher":
        return signs
    size = probe_set_size(probe, tuple(x.shape[1:]))
    if n_probes % size:
        raise ValueError(f"n_probes: coloured probes come in sets of {size} (C k^2 with C = {x.shape[1]}, "
                         f"k = {COLOR_SPACING}) for images of shape {tuple(x.shape[1:])}, got {n_probes}")
    c, h, w = x.shape[1:]
    k = COLOR_SPACING
    rows = torch.arange(h, device=x.device) % k
    cols = torch.arange(w, device=x.device) % k
    spatial = (rows[:, None] * k + cols[None, :]).expand(c, h, w)
    classes = spatial + (k * k) * torch.arange(c, device=x.device)[:, None, None]  # (C, H, W) in [0, size)
    which = torch.arange(n_probes, device=x.device) % size
    mask = classes[None] == which[:, None, None, None]  # (n_probes, C, H, W)
    return signs * mask[:, None].to(x.dtype)


def quadratic_forms(
    fn: Callable[[Tensor], Tensor], x: Tensor, probes: Tensor, *, step: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """fn(x) and v^T (d fn / d x) v for each probe v: ((B, *event), (K, B)).

    fn: x (N, *event) -> shaped like x, applied per sample; probes: (K, B, *event).
    step: (B,) central-difference steps h (one network call on the 2 K B points x +- h v, their mean standing
    for fn(x), exact for a linear fn; no autograd, so a gradient through it is one backward pass); None:
    a VJP per probe (autograd).
    """
    k, b = probes.shape[0], x.shape[0]
    if step is None:
        value, vjp_fn = torch.func.vjp(fn, x)
        (vjps,) = torch.func.vmap(vjp_fn)(probes)
        return value, (vjps * probes).reshape(k, b, -1).sum(2)
    h = per_sample(step, x)
    points = torch.cat([x + h * probes, x - h * probes]).reshape((2 * k * b,) + x.shape[1:])
    out = fn(points).reshape((2, k) + x.shape)
    jv = (out[0] - out[1]) / (2 * h)
    return out.mean((0, 1)), (jv * probes).reshape(k, b, -1).sum(2)


def exact_trace(fn: Callable[[Tensor], Tensor], x: Tensor, *, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """fn(x) and tr(d fn / d x) per sample, by VJPs with one-hot cotangents in chunks: ((B, *event), (B,)).

    chunk_size: basis vectors per vmap call; default: as many as keep one chunk of cotangents below 2^14
    numbers on CPU (small chunks are fastest there) and 2^24 on a GPU.
    """
    b, d = x.shape[0], x[0].numel()
    cap = _MAX_CHUNK_ELEMENTS_CPU if x.device.type == "cpu" else _MAX_CHUNK_ELEMENTS_GPU
    chunk = chunk_size or max(1, min(d, cap // (b * d)))
    value, vjp_fn = torch.func.vjp(fn, x)
    trace = x.new_zeros(b)
    for start in range(0, d, chunk):
        idx = torch.arange(start, min(start + chunk, d), device=x.device)
        basis = torch.zeros(idx.numel(), b, d, dtype=x.dtype, device=x.device)
        basis[torch.arange(idx.numel(), device=x.device), :, idx] = 1.0
        (rows,) = torch.func.vmap(vjp_fn)(basis.reshape((idx.numel(),) + x.shape))
        rows = rows.reshape(idx.numel(), b, d)
        trace = trace + rows.gather(2, idx.view(-1, 1, 1).expand(-1, b, 1)).sum((0, 2))
    return value, trace


def difference_step(dtype: torch.dtype) -> float:
    """Central-difference step in units of the noise std s(t), the length on which the score of p_t varies:
    2 eps^(1/3) of `dtype` balances truncation (step^2) against rounding (eps / step)."""
    return 2.0 * torch.finfo(dtype).eps ** (1 / 3)
