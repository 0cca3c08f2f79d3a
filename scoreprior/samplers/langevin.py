"""The data step of the split samplers (PnP-DM, DAPS): a draw from

    π(z) ∝ p(y | z) N(z; c, r^2 I),

the likelihood times an isotropic Gaussian around a centre c (PnP-DM: c = x, r = ρ; DAPS: c = x̂_0, r = r_i).

- Exact for a `GaussianLikelihood` (y = A z + b, b ~ N(0, Σ), or CN(0, Σ) for complex y), by perturb-and-MAP:
      z = P^{-1} [κ A^H Σ^{-1} (y + b') + (c + r ε) / r^2],   P = κ A^H Σ^{-1} A + I / r^2,
  b' ~ the noise model, ε ~ N(0, I), κ = 1 for real y and 2 for complex y (`GaussianLikelihood.grad_log_prob`:
  each part of CN(0, Σ) noise has covariance Σ / 2; A^H stands for `A_adjoint`, Re(A^H ·)). The right-hand side
  has mean κ A^H Σ^{-1} y + c / r^2 and covariance P, so z ~ N(P^{-1}(κ A^H Σ^{-1} y + c / r^2), P^{-1}), which is
  π exactly. P z = rhs is solved through the eigendecomposition of κ A^H Σ^{-1} A, formed once per sampler run from
  A applied to the pixel basis (exact up to rounding, O(d^2) per draw; for images of at most `DENSE_PIXELS`
  pixels), or by batched conjugate gradients (`conjugate_gradients`) started at c.
- For any other `Likelihood` (closures): unadjusted Langevin from z = c,
      z ← z + γ [∇ log p(y | z) − (z − c) / r^2] + sqrt(2 γ) ξ,   γ = min(lr, r^2 / 10),
  the gradient by autograd through `log_prob`. The rule for γ: the coupling term has curvature 1 / r^2, so
  γ ≤ r^2 / 10 keeps its contraction 1 − γ / r^2 ≥ 0.9 at every r (stable, and its share of the O(γ) variance
  bias of unadjusted Langevin ≤ 5 %); lr caps γ against the likelihood's own curvature L (stable for
  γ < 2 / (L + 1 / r^2)).
`LikelihoodStep` holds the options of both; `DataStep` is the step resolved for one likelihood.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from scoreprior._checks import choice, positive_float, positive_int
from scoreprior.likelihood import GaussianLikelihood
from scoreprior.protocols import Likelihood
from scoreprior.samplers.engine import Run, conjugate_gradients

__all__ = ["LikelihoodStep", "as_likelihood_step", "DataStep", "LANGEVIN_FRACTION", "DENSE_PIXELS"]

LANGEVIN_FRACTION = 0.1
"""The Langevin step γ is at most this fraction of r^2 (see the module docstring)."""

DENSE_PIXELS = 2048
"""solver="auto" solves the exact step densely up to this many pixels, by conjugate gradients above. The d × d
eigendecomposition is made once per sampler call (float64 eigh on one CPU core: 0.4 s at d = 1024, 3.3 s at 2048;
memory 8 d^2 bytes while it runs, 4 d^2 kept in float32). On the 32 × 32 black holes (837 visibilities) it made
PnP-DM's likelihood step 100 times faster than CG (0.003 s against 0.35 s per iteration at ρ = 0.02)."""


@dataclass(frozen=True)
class LikelihoodStep:
    """How the data step draws z ∝ p(y | z) N(z; c, r^2 I): the options of PnP-DM's and DAPS's likelihood step.

    method: "exact" (a `GaussianLikelihood` only: perturb-and-MAP), "langevin" (any `Likelihood`) or "auto"
        (exact for a `GaussianLikelihood`, else Langevin);
    solver: how the exact step solves its linear system: "dense" (eigendecomposition, exact), "cg" (conjugate
        gradients) or "auto" (dense for images of at most `DENSE_PIXELS` pixels, else CG);
    cg_iters: at most this many CG iterations per draw (each one A and one A^H); cg_rtol: CG stops for a chain
        once its residual is below cg_rtol times that of the start (measured on the tests' operators, float32 and
        float64: 2–8 iterations, masks and DFT subsampling 2–3 whatever ρ);
    langevin_steps: Langevin steps per draw (PnP-DM black holes: 200; DAPS: 100); lr: the cap on the Langevin
        step γ, in squared units of x (PnP-DM black holes: 1e-5). The defaults suit images of order 1 and a
        likelihood of curvature up to ~1e5; set lr from the likelihood (γ < 2 / curvature) otherwise.
    """

    method: str = "auto"
    solver: str = "auto"
    cg_iters: int = 500
    cg_rtol: float = 1e-6
    langevin_steps: int = 100
    lr: float = 1e-5

    def __post_init__(self) -> None:
        choice(self.method, "method", ("auto", "exact", "langevin"))
        choice(self.solver, "solver", ("auto", "dense", "cg"))
        positive_int(self.cg_iters, "cg_iters")
        positive_float(self.cg_rtol, "cg_rtol")
        positive_int(self.langevin_steps, "langevin_steps")
        positive_float(self.lr, "lr")

    def resolve(self, likelihood: Likelihood, sampler: str) -> str:
        """"exact" or "langevin" for this likelihood; TypeError naming `sampler` for "exact" with another likelihood."""
        gaussian = isinstance(likelihood, GaussianLikelihood)
        if self.method == "exact" and not gaussian:
            raise TypeError(f"likelihood_step: {sampler}'s exact likelihood step needs a GaussianLikelihood, got "
                            f"{type(likelihood).__name__}; use LikelihoodStep(method='langevin')")
        if self.method == "auto":
            return "exact" if gaussian else "langevin"
        return self.method


def as_likelihood_step(step: object) -> LikelihoodStep:
    """step, or the default `LikelihoodStep()` for None; TypeError for anything else."""
    if step is None:
        return LikelihoodStep()
    if not isinstance(step, LikelihoodStep):
        raise TypeError(f"likelihood_step: expected a scoreprior.samplers.LikelihoodStep or None, got "
                        f"{type(step).__name__}")
    return step


def _weighted_adjoint(likelihood: GaussianLikelihood, u: Tensor) -> Tensor:
    """κ A^H Σ^{-1} u for measurements u (B, *measurement_shape): κ = 2 for complex y, 1 for real."""
    kappa = 2.0 if likelihood.operator.is_complex else 1.0
    return kappa * likelihood.operator.A_adjoint(likelihood.noise.solve(u))


def _precision_eigen(likelihood: GaussianLikelihood, like: Tensor) -> tuple[Tensor, Tensor]:
    """(λ, V): the eigendecomposition κ A^H Σ^{-1} A = V diag(λ) V^T over the pixels of `like`'s images,
    (d,) and (d, d) in like's dtype and device, from A applied to the pixel basis in chunks of 256 images."""
    shape = like.shape[1:]
    d = math.prod(shape)
    basis = torch.eye(d, dtype=like.dtype, device=like.device).reshape(d, *shape)
    columns = [_weighted_adjoint(likelihood, likelihood.operator.A(chunk)).reshape(len(chunk), d)
               for chunk in basis.split(256)]
    h = torch.cat(columns).double()
    lam, vec = torch.linalg.eigh((h + h.T) / 2)
    return lam.clamp_min(0).to(like.dtype), vec.to(like.dtype)


def _exact_draw(likelihood: GaussianLikelihood, c: Tensor, r: float, step: LikelihoodStep, run: Run,
                eigen: tuple[Tensor, Tensor] | None) -> Tensor:
    """Perturb-and-MAP draw of z ∝ p(y | z) N(z; c, r^2 I) (module docstring), through `eigen`
    (`_precision_eigen`) or, for None, by CG. c: (B, *event_shape)."""
    b = likelihood.sample(torch.zeros_like(c), generator=run.generator)  # A 0 + b' = b' ~ the noise model
    y = likelihood.y.to(device=b.device, dtype=b.dtype)
    rhs = _weighted_adjoint(likelihood, y + b) + (c + r * run.noise(c)) / r**2
    if eigen is not None:
        lam, vec = eigen
        return (((rhs.flatten(1) @ vec) / (lam + 1 / r**2)) @ vec.T).reshape(c.shape)

    def apply(v: Tensor) -> Tensor:
        return _weighted_adjoint(likelihood, likelihood.operator.A(v)) + v / r**2

    return conjugate_gradients(apply, rhs, c, iters=step.cg_iters, rtol=step.cg_rtol)


def _langevin_draw(likelihood: Likelihood, c: Tensor, r: float, step: LikelihoodStep, run: Run) -> Tensor:
    """Unadjusted Langevin on log p(y | z) − ||z − c||^2 / (2 r^2) from z = c (module docstring)."""
    gamma = min(step.lr, LANGEVIN_FRACTION * r * r)
    z = c
    for _ in range(step.langevin_steps):
        with torch.enable_grad():
            zg = z.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(likelihood.log_prob(zg).sum(), zg)
        z = z + gamma * (grad - (z - c) / r**2) + math.sqrt(2 * gamma) * run.noise(z)
    return z


class DataStep:
    """The data step z ∝ p(y | z) N(z; c, r^2 I) resolved for one likelihood and image shape: `LikelihoodStep`'s
    method and solver chosen once (with the dense solver's eigendecomposition), then `draw(c, r, run)` per call.

    likelihood: the sampler's likelihood; options: a `LikelihoodStep`; sampler: its name, for messages;
    like: a (B, *event_shape) tensor of the chains' dtype and device.
    """

    def __init__(self, likelihood: Likelihood, options: LikelihoodStep, sampler: str, like: Tensor) -> None:
        self.likelihood, self.options = likelihood, options
        self.method = options.resolve(likelihood, sampler)
        dense = options.solver == "dense" or (options.solver == "auto" and like[0].numel() <= DENSE_PIXELS)
        self.eigen = _precision_eigen(likelihood, like) if self.method == "exact" and dense else None

    def draw(self, c: Tensor, r: float, run: Run) -> Tensor:
        """One draw per chain. c: (B, *event_shape) centres, in the units of x; r: the coupling std > 0, same units;
        run: its generator draws every noise. Returns (B, *event_shape), detached."""
        if self.method == "exact":
            return _exact_draw(self.likelihood, c, r, self.options, run, self.eigen)
        return _langevin_draw(self.likelihood, c, r, self.options, run).detach()

    def describe(self) -> str:
        """The options in force, as text for the guard's messages."""
        if self.method == "exact":
            return f"exact likelihood step ({'dense' if self.eigen is not None else 'CG'})"
        return f"Langevin likelihood step (steps={self.options.langevin_steps}, lr={self.options.lr})"
