"""Asymptotically exact correction of a fitted flow posterior with the exact prior density.

A flow q (a `DPI`: x = T(u), u ~ N(0, I)) fitted to p(x | y) is only an approximation; its draws are
corrected towards p(x | y) ∝ p(y | x) p_theta(x) with the weights log w = log p(y | x) + log p_theta(x) - log q(x):

1. N draws are weighed and checked by PSIS (`scoreprior.importance`). When k̂ is below its threshold and
   the log p noise is small, importance resampling is enough (method "importance").
2. Otherwise a tempered sequential Monte Carlo sampler (Del Moral, Doucet & Jasra, JRSS B 2006) moves the
   draws from q to the posterior in the flow's latent space, through pi_beta(u) ∝ N(u; 0, I) w(T(u))^beta,
   beta from 0 to 1 (method "smc"). Each stage picks the next beta by bisection so that the effective
   sample size of the incremental weights w^(beta' - beta) is `ess_fraction` N (adaptive tempering, Jasra
   et al., Scand. J. Stat. 2011), resamples (systematic), and moves every particle by `moves` Metropolis-
   adjusted Langevin steps on pi_beta (`final_moves` at beta = 1), in the flow's latent space: the flow is
   the preconditioner. The Langevin drift needs grad_u log w, i.e. the gradient of log p_theta; for a
   `ScorePrior` it is taken as the score network at t0, s_theta(x, t0), one network call instead of a
   backpropagated ODE solve: any drift gives a valid Metropolis-Hastings kernel, the acceptance uses the
   exact weights, and the score is the gradient of log p_t0 up to the network's error. The step size follows
   the acceptance rate towards `target_acceptance`. At beta = 1 the particles are draws of the posterior with
   equal weights, and the product of the stages' mean incremental weights estimates the evidence p(y)
   (q is normalised).
   The moves matter: reweighting alone cannot reach beyond q's draws, and with few moves a q narrower than
   the posterior stays too narrow (tests/test_correction.py measures it on a flow 0.6x too narrow).

Both are consistent as N grows. log p_theta comes from the probability-flow ODE with a Hutchinson trace:
each particle keeps its estimate until a move replaces it, so a noise of standard deviation sigma shifts the
target by a factor exp(sigma^2 / 2) of the density (negligible at the 0.1-0.5 nat noise of the default
`check_options`); the noise is reported.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from scoreprior._checks import number, positive_int
from scoreprior.density import ScorePrior
from scoreprior.importance import (
    MIN_DRAWS, PosteriorCheck, check_options, importance_draws, systematic_indices, weigh_draws,
)
from scoreprior.posterior import DPI
from scoreprior.protocols import Likelihood, Prior

__all__ = ["MIN_LINEAGES", "Correction", "SMCConfig", "correct_posterior", "score_prior_options"]

MIN_LINEAGES = 0.25
"""Fraction of SMC's N particles that must descend from distinct draws of q for its error bars to be trusted
(`Correction.trusted`): resampling multiplies the best draws, and Langevin moves that shrink to small steps
do not make the copies independent again."""


@dataclass(frozen=True)
class SMCConfig:
    """Options of `correct_posterior`, validated on construction.

    particles: N draws (and SMC particles), >= 25; ess_fraction: the effective sample size kept at each
    tempering stage, as a fraction of N; moves: Langevin moves per stage before the last; final_moves: at the
    last (beta = 1), where they set how far the draws move from q's; step: initial Langevin step size h > 0
    (the variance of its noise, in the flow's latent units);
    target_acceptance: the acceptance rate eps is adapted to; max_stages: tempering stages before giving up
    (the result then says so); smc: False stops after the PSIS check and importance resampling, whatever k̂.
    """

    particles: int = 128
    ess_fraction: float = 0.5
    moves: int = 2
    final_moves: int = 4
    step: float = 0.1
    target_acceptance: float = 0.574
    max_stages: int = 30
    smc: bool = True

    def __post_init__(self):
        if positive_int(self.particles, "particles") < MIN_DRAWS:
            raise ValueError(f"particles: expected at least {MIN_DRAWS} (PSIS fits its tail to N / 5 >= 5), got "
                             f"{self.particles}")
        number(self.ess_fraction, "ess_fraction", low=0.0, high=1.0)
        positive_int(self.moves, "moves")
        positive_int(self.final_moves, "final_moves")
        number(self.step, "step", low=0.0)
        number(self.target_acceptance, "target_acceptance", low=0.0, high=1.0)
        positive_int(self.max_stages, "max_stages")
        if not isinstance(self.smc, bool):
            raise TypeError(f"smc: expected True or False, got {self.smc!r}")


@dataclass
class Correction:
    """The corrected posterior: `samples` (N, *image_shape), equally weighted draws of p(x | y).

    method: "importance" (resampled by the PSIS weights) or "smc"; check: the PSIS check of q's N draws
    (its k̂, ESS and verdict describe q before the correction); ess: the effective sample size of the last
    reweighting (importance: PSIS ESS; smc: the last stage's); unique: distinct particles among the samples;
    lineages: distinct draws of q the samples descend from (through every resampling; the Langevin moves make
    descendants of one draw distinct, but only as far as they move: few lineages with small final steps mean
    error bars from fewer independent draws than N);
    stages: per SMC stage, {"beta", "ess", "acceptance", "step"}; log_evidence: the SMC estimate of
    log p(y) (None for "importance"); converged: False when SMC stopped at max_stages before beta = 1
    (the samples then are not draws of the posterior); evaluations: log p evaluations of single images;
    log_prior_noise: (N,) the standard errors of the final particles' log p; seconds: wall time.
    """

    samples: Tensor
    method: str
    check: PosteriorCheck
    ess: float
    unique: int
    lineages: int
    log_prior_noise: Tensor
    evaluations: int
    seconds: float
    stages: list[dict[str, float]] = field(default_factory=list)
    log_evidence: float | None = None
    converged: bool = True

    @property
    def trusted(self) -> bool:
        """Whether the samples stand for the posterior: importance resampling of draws that pass PSIS
        (`check.reliable`), or SMC that reached beta = 1 with at least MIN_LINEAGES of its N particles from
        distinct draws of q (fewer: error bars from few independent draws, too narrow as likely as not)."""
        if self.method == "importance":
            return bool(self.check.reliable)
        return bool(self.converged and self.lineages >= MIN_LINEAGES * self.samples.shape[0])

    def summary(self) -> str:
        """One line: what was done, its cost and what it says."""
        n = self.samples.shape[0]
        if self.method == "importance":
            return (f"importance resampling of {n} draws ({self.check.verdict}); {self.unique} distinct draws; "
                    f"{self.evaluations} log p evaluations, {self.seconds:.0f} s")
        accepted = ", ".join(f"{stage['acceptance']:.2f}" for stage in self.stages)
        state = "reached beta = 1" if self.converged else f"stopped at beta = {self.stages[-1]['beta']:.3g}: NOT converged"
        few = "" if self.trusted or not self.converged else (
            f"; ONLY {self.lineages} of q's draws survive (< {MIN_LINEAGES:.0%}): the error bars rest on few independent "
            "draws, moved little; do not trust their width (more particles, moves or a better flow would tell)")
        return (f"tempered SMC from q ({self.check.verdict.split(';')[0]}) in {len(self.stages)} stages, {state}; "
                f"ESS {self.ess:.0f} of {n} at the last reweighting, {self.unique} distinct particles from "
                f"{self.lineages} of q's draws; Langevin acceptance {accepted}, last step {self.stages[-1]['step']:.2g}; "
                f"log evidence {self.log_evidence:.1f}; {self.evaluations} log p evaluations, "
                f"{self.seconds:.0f} s{few}")

    def to_dict(self) -> dict[str, Any]:
        """Scalars and per-stage lists for JSON."""
        noise = self.log_prior_noise
        return {"method": self.method, "particles": int(self.samples.shape[0]), "ess": self.ess,
                "unique": self.unique, "lineages": self.lineages, "trusted": self.trusted,
                "converged": self.converged, "log_evidence": self.log_evidence,
                "stages": self.stages, "evaluations": self.evaluations, "seconds": self.seconds,
                "log_prior_noise_median": float(noise.median()) if noise.numel() else None,
                "q_check": self.check.to_dict(), "summary": self.summary()}


def score_prior_options(image_shape: tuple[int, ...], *, steps: int = 6) -> dict[str, dict]:
    """The log_prob options of `correct_posterior` for a ScorePrior on images of image_shape, as keyword arguments:
    `check_options(image_shape, steps=steps)` for the check (two probe sets: their spread is each draw's
    noise) and the same with half the probes for the SMC moves."""
    check = check_options(tuple(image_shape), steps=steps)
    return {"log_prob_kwargs": {"options": check},
            "move_log_prob_kwargs": {"options": check.replace(n_probes=check.n_probes // 2)}}


class _Particles:
    """Evaluations for latents u (N, d) of a flow: draws x and log q, log w with its noise, Langevin gradients."""

    def __init__(self, flow: DPI, prior: Prior, likelihood: Likelihood, kwargs: dict, generator: torch.Generator):
        self.flow, self.prior, self.likelihood, self.kwargs, self.generator = flow, prior, likelihood, kwargs, generator
        self.evaluations = 0

    def _prior_gradient(self, x: Tensor) -> Tensor:
        """grad_x log p_theta(x): the score at t0 for a ScorePrior (module docstring), else by autograd."""
        if isinstance(self.prior, ScorePrior):
            t = torch.full((x.shape[0],), self.prior.t0, dtype=x.dtype, device=x.device)
            return self.prior.score(x, t)
        xg = x.detach().requires_grad_()
        (grad,) = torch.autograd.grad(self.prior.log_prob(xg).sum(), xg)
        return grad

    def gradient(self, u: Tensor) -> Tensor:
        """G(u) = grad_u [log p(y | T(u)) + log p_theta(T(u)) + log |det dT/du|] (N, d), the part of
        grad_u log pi_beta = -(1 - beta) u + beta G that depends on the model; in batches, detached."""
        out = []
        for start in range(0, u.shape[0], self.kwargs["batch_size"]):
            ub = u[start:start + self.kwargs["batch_size"]].detach().requires_grad_()
            with torch.enable_grad():
                x, log_det = self.flow(ub)
                prior_grad = self._prior_gradient(x.detach()).detach()
                total = self.likelihood.log_prob(x).sum() + log_det.sum() + (prior_grad * x).sum()
                (grad,) = torch.autograd.grad(total, ub)
            out.append(grad.detach())
        return torch.cat(out)

    def draw(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """x = T(u) and log q(x) for latents u (N, d)."""
        with torch.no_grad():
            x, log_det = self.flow(u)
            return x, self.flow.flow.q0.log_prob(u) - log_det

    def weigh(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x, raw log w (N,) float64, log p noise (N,)) of latents u."""
        x, log_q = self.draw(u)
        log_w, noise = weigh_draws(x, log_q, self.prior, self.likelihood, generator=self.generator, **self.kwargs)
        self.evaluations += u.shape[0]
        return x, torch.nan_to_num(log_w, nan=-math.inf), noise


def _langevin_move(particles: _Particles, beta: float, h: float, state: tuple, generator: torch.Generator
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, float]:
    """One Metropolis-adjusted Langevin step on pi_beta(u) ∝ N(u; 0, I) w(T(u))^beta for every particle.

    state: (u, x, log w, noise, G) of the particles (G: `_Particles.gradient`); h: the step (noise variance).
    u' = u + h/2 D(u) + sqrt(h) xi with D = -(1 - beta) u + beta G, accepted with the Metropolis-Hastings ratio
    of pi_beta and the two Gaussian proposal densities. Returns the new state and the acceptance rate.
    """
    u, x, log_w, noise, grad = state
    n = u.shape[0]

    def drift(z: Tensor, g: Tensor) -> Tensor:
        return -(1.0 - beta) * z + beta * g

    xi = torch.randn(u.shape, generator=generator, device=u.device, dtype=u.dtype)
    proposal = u + 0.5 * h * drift(u, grad) + math.sqrt(h) * xi
    x_new, log_w_new, noise_new = particles.weigh(proposal)
    grad_new = particles.gradient(proposal)
    forward = -(proposal - u - 0.5 * h * drift(u, grad)).square().sum(1) / (2 * h)
    backward = -(u - proposal - 0.5 * h * drift(proposal, grad_new)).square().sum(1) / (2 * h)
    log_target = beta * log_w - 0.5 * u.square().sum(1).to(log_w)
    log_target_new = beta * log_w_new - 0.5 * proposal.square().sum(1).to(log_w)
    log_ratio = log_target_new - log_target + (backward - forward).to(log_w)
    uniform = torch.rand(n, generator=generator, device=log_w.device, dtype=log_w.dtype)
    accept = (uniform.log() < log_ratio) & torch.isfinite(log_w_new)
    rows = accept.reshape((n,) + (1,) * (x.ndim - 1)).to(x.device)
    return (torch.where(accept[:, None], proposal, u), torch.where(rows, x_new, x), torch.where(accept, log_w_new, log_w),
            torch.where(accept, noise_new, noise), torch.where(accept[:, None], grad_new, grad),
            float(accept.double().mean()))


def _next_beta(log_w: Tensor, beta: float, target: float) -> float:
    """The beta' in (beta, 1] with ESS(w^(beta' - beta)) = target (by bisection), or 1 if that ESS stays above it."""
    def ess(b: float) -> float:
        inc = (b - beta) * log_w
        w = torch.softmax(inc, 0)
        return float(1.0 / w.square().sum())

    if ess(1.0) >= target:
        return 1.0
    lo, hi = beta, 1.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ess(mid) >= target else (lo, mid)
    return max(lo, beta + 1e-6)


def correct_posterior(
    flow: DPI,
    prior: Prior,
    likelihood: Likelihood,
    config: SMCConfig | None = None,
    *,
    log_prob_kwargs: dict[str, Any] | None = None,
    move_log_prob_kwargs: dict[str, Any] | None = None,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Correction:
    """Correct the fitted flow `flow` towards p(x | y) with the exact prior: importance resampling or SMC.

    flow: a fitted `DPI` (x = T(u), u ~ N(0, I)); prior, likelihood: as `importance_draws` (log_prob_kwargs
    too: for a ScorePrior default {"options": check_options(image_shape)}); config: an `SMCConfig`.
    move_log_prob_kwargs: log_prob options of the SMC moves' evaluations (default log_prob_kwargs): the same
    estimate with fewer probes is cheaper and, with the same expectation, only adds its noise to the
    acceptance ratios (e.g. one set of coloured probes where the check takes two to measure their noise).
    generator: draws the latents, the probes, the resampling offsets and the moves' noise (on the flow's
    device); default seeded with the flow's seed. Returns a `Correction` (see the module docstring).
    """
    config = SMCConfig() if config is None else config
    if not isinstance(config, SMCConfig):
        raise TypeError(f"config: expected a scoreprior.SMCConfig, got {type(config).__name__}")
    if not isinstance(flow, DPI):
        raise TypeError(f"flow: expected a fitted scoreprior.DPI, got {type(flow).__name__}")
    if generator is None:
        generator = torch.Generator(device=flow.device).manual_seed(flow.seed)
    start = time.perf_counter()
    n = config.particles
    u = torch.randn(n, flow.dim, generator=generator, device=flow.device, dtype=flow.dtype)
    kwargs = {"log_prob_kwargs": log_prob_kwargs, "batch_size": batch_size}
    moves = {"log_prob_kwargs": log_prob_kwargs if move_log_prob_kwargs is None else move_log_prob_kwargs,
             "batch_size": batch_size}
    particles = _Particles(flow, prior, likelihood, moves, generator)
    x, log_q = particles.draw(u)
    check = importance_draws(x, log_q, prior, likelihood, generator=generator, progress=progress, **kwargs)
    particles.evaluations = n
    if check.reliable or not config.smc:
        idx = systematic_indices(check.log_weights.exp(), n, generator=generator)
        distinct = int(idx.unique().numel())  # each draw of q is its own lineage
        return Correction(samples=x[idx], method="importance", check=check, ess=float(check.ess),
                          unique=distinct, lineages=distinct, log_prior_noise=check.log_prior_noise[idx],
                          evaluations=particles.evaluations, seconds=time.perf_counter() - start)
    log_w, noise = check.raw_log_weights.clone(), check.log_prior_noise.clone()
    result = _temper(particles, u, x, log_w, noise, config, generator, progress)
    return Correction(check=check, seconds=time.perf_counter() - start, evaluations=particles.evaluations, **result)


def _temper(particles: _Particles, u: Tensor, x: Tensor, log_w: Tensor, noise: Tensor, config: SMCConfig,
            generator: torch.Generator, progress: bool) -> dict[str, Any]:
    """Adaptive tempering from beta = 0 to 1 with resampling and Langevin moves; the `Correction` fields it sets."""
    n = u.shape[0]
    beta, step, log_evidence = 0.0, config.step, 0.0
    grad = particles.gradient(u)
    ancestors = torch.arange(n, device=u.device)
    stages: list[dict[str, float]] = []
    bar = tqdm(desc="SMC", unit="stage", disable=not progress)
    while beta < 1.0 and len(stages) < config.max_stages:
        new_beta = _next_beta(log_w, beta, config.ess_fraction * n)
        inc = (new_beta - beta) * log_w
        log_evidence += float(torch.logsumexp(inc, 0) - math.log(n))
        weights = torch.softmax(inc, 0)
        ess = float(1.0 / weights.square().sum())
        beta = new_beta
        idx = systematic_indices(weights, n, generator=generator)
        u, x, log_w, noise, grad, ancestors = u[idx], x[idx], log_w[idx], noise[idx], grad[idx], ancestors[idx.to(u.device)]
        accepted = 0
        moves = config.final_moves if beta >= 1.0 else config.moves
        for _ in range(moves):
            u, x, log_w, noise, grad, rate = _langevin_move(particles, beta, step, (u, x, log_w, noise, grad), generator)
            accepted += rate
            step = step * math.exp(2.0 * (rate - config.target_acceptance))
        stages.append({"beta": beta, "ess": ess, "acceptance": accepted / moves, "step": step})
        bar.update(1)
        bar.set_postfix(beta=f"{beta:.3g}", ess=f"{ess:.0f}", accept=f"{accepted / moves:.2f}")
    bar.close()
    unique = int(torch.unique(x.reshape(n, -1), dim=0).shape[0])
    return {"samples": x, "method": "smc", "ess": stages[-1]["ess"] if stages else float(n), "unique": unique,
            "lineages": int(ancestors.unique().numel()),
            "log_prior_noise": noise, "stages": stages, "log_evidence": log_evidence, "converged": beta >= 1.0}
