"""Plug-and-play diffusion models, PnP-DM (Wu, Sun, Chen, Zhang, Yue & Bouman, NeurIPS 2024, arXiv 2405.18782).

Split Gibbs sampling of the augmented density
    π(x, z) ∝ p(y | z) p(x) exp(−||x − z||^2 / (2 ρ^2)),
alternating a likelihood step z ~ π(z | x) ∝ p(y | z) N(z; x, ρ^2 I) (`scoreprior.samplers.langevin`: exact for a
`GaussianLikelihood`, Langevin otherwise) and a prior step x ~ π(x | z) ∝ p(x) N(z; x, ρ^2 I), the posterior of a
denoising problem at noise level ρ, which the diffusion model solves: z = x + ρ ε is, scaled by a(t*), the
forward marginal x_{t*} = a(t*) x + s(t*) ε at the time t* with s(t*) / a(t*) = ρ, so the reverse SDE run from
x_{t*} = a(t*) z draws from p(x | z) (`sample_denoising_posterior`; as every sampler here it stops at run.t0, so
its prior is p_σ0 = p * N(0, σ0^2 I), σ0 = s(t0) / a(t0), and t* is shifted to (s / a)^2 = ρ^2 + σ0^2 to keep the
coupling ρ exact). ρ is annealed from large to small (`rho_schedule`). At a fixed ρ the x-marginal of π is
    π(x) ∝ p(x) ∫ p(y | z) N(z; x, ρ^2 I) dz,
the posterior under the likelihood convolved with N(0, ρ^2 I) (for y = A x + b: noise covariance Σ + ρ^2 A A^H),
so the draws are biased at ρ > 0 (wider) and exact only as ρ → 0, where the chain mixes slowly (the annealing's
purpose). Tested against exact Gaussian posteriors in tests/test_pnp_dm_daps.py (ρ_min = 0.02 and σ_y = 0.1:
stds 1-5 % wide; a likelihood as sharp as ρ_min needs a lower floor). With the shipped blackhole-32 prior on EHT
2017 data (studies/sampler_calibration.py, 50 truths drawn from the prior, 4 draws each) the truth lies within the
draws' range for 47 % ± 3 % of the ring's pixels against 60 % if calibrated (53 % with 400 iterations on 10 truths),
and for 76 % of the background's: check the spread before reading it as an error bar.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from scoreprior._checks import number, positive_float, positive_int
from scoreprior.protocols import Likelihood
from scoreprior.samplers.engine import Run, ScoreFn, as_run, check_likelihood, euler_step, integrate, time_grid
from scoreprior.samplers.langevin import DataStep, LikelihoodStep, as_likelihood_step
from scoreprior.sde import SDE

__all__ = ["pnp_dm", "rho_schedule", "sample_denoising_posterior", "PRIOR_GRID"]

PRIOR_GRID = "uniform"
"""The prior step's default time grid. Measured on a 6-d Gaussian prior with the exact score (VP and VE SDEs,
ρ in [0.02, 10], 5-40 steps): Euler–Maruyama inflates the std of p(x | z); at 20 steps by at most 5 % (VP) / 10 %
(VE) on the uniform grid against 8 % / 16 % on the log-SNR grid and 7 % / 11 % on the EDM grid, and the uniform
grid is the most accurate in all but one case measured from 10 steps up (EDM wins at ρ = 10 on VE)."""


def rho_schedule(rho_max: float = 10.0, rho_min: float = 0.02, *, decay: float = 0.93,
                 iterations: int = 200) -> Tensor:
    """PnP-DM's annealing: ρ_k = max(rho_max · decay^k, rho_min), k = 0, ..., iterations − 1, (iterations,) float64.

    The defaults are the paper's black-hole schedule (10 → 0.02, × 0.93 per iteration, 200 iterations: the floor is
    reached after 86 iterations and held for the other 114). rho_max ≥ rho_min > 0 in the units of x; 0 < decay ≤ 1.
    """
    rho_max, rho_min = positive_float(rho_max, "rho_max"), positive_float(rho_min, "rho_min")
    if rho_min > rho_max:
        raise ValueError(f"rho_min: expected a number <= rho_max = {rho_max!r}, got {rho_min!r}")
    decay = number(decay, "decay", low=0.0, high=1.0)
    k = torch.arange(positive_int(iterations, "iterations"), dtype=torch.float64)
    return (rho_max * decay**k).clamp_min(rho_min)


def _noise_range(sde: SDE, t0: float) -> tuple[float, float]:
    """(σ0, σ_T): s / a of the SDE at t0 and at T, in the units of x."""
    tau = sde.log_noise_ratio(torch.tensor([t0, sde.T], dtype=torch.float64))
    return float(tau[0].exp()), float(tau[1].exp())


def _rho_values(rho: object, sde: SDE, t0: float) -> Tensor:
    """rho as a (K,) float64 tensor of levels 0 < ρ ≤ sqrt(σ_T^2 − σ0^2); ValueError/TypeError naming rho."""
    if rho is None:
        rho = rho_schedule()
    if isinstance(rho, (bool, str)) or not isinstance(rho, (Sequence, Tensor, np.ndarray)):
        raise TypeError(f"rho: expected a sequence or 1-D tensor of noise levels (see rho_schedule), got "
                        f"{type(rho).__name__}")
    values = torch.as_tensor(rho, dtype=torch.float64).detach().cpu()
    if values.ndim != 1 or values.numel() == 0:
        raise ValueError(f"rho: expected a non-empty 1-D sequence of noise levels, got shape {tuple(values.shape)}")
    low, high = _noise_range(sde, t0)
    top = math.sqrt(high**2 - low**2)
    bad = ~(torch.isfinite(values) & (values > 0) & (values <= top))
    if bool(bad.any()):
        raise ValueError(f"rho: expected noise levels in (0, {top:.4g}] (the SDE's s / a at T, less that at run.t0), "
                         f"got {int(bad.sum())} outside, e.g. {float(values[bad][0])!r}")
    return values


def _start_time(sde: SDE, rho: Tensor, t0: float) -> Tensor:
    """The times t* with (s / a)(t*)^2 = ρ^2 + (s / a)(t0)^2, (K,) float64, clamped to [t0, T]."""
    low = _noise_range(sde, t0)[0]
    return sde.time_at_log_noise_ratio(0.5 * torch.log(rho.double() ** 2 + low**2)).clamp(t0, sde.T)


def _denoise(score: ScoreFn, sde: SDE, z: Tensor, t_star: float, steps: int, run: Run) -> Tensor:
    """The prior step without checks: x ~ p_σ0(x | z) by `steps` reverse-SDE steps from t* to run.t0."""
    ts = time_grid(sde, steps, run.t0, run.time_grid or PRIOR_GRID, start=t_star)
    a = sde.marginal(ts[[0, -1]])[0]
    x = float(a[0]) * z
    n = z.shape[0]
    for k in range(steps):
        t = ts[k].to(z).expand(n)
        x = euler_step(sde, x, t, float(ts[k + 1] - ts[k]), score(x, t), run.noise(x))
    return x / float(a[1])


def sample_denoising_posterior(score: ScoreFn, sde: SDE, z: Tensor, rho: float, *, steps: int = 20,
                               run: Run | None = None) -> Tensor:
    """PnP-DM's prior step: x ~ p_σ0(x | z) for z = x + ρ ε, ε ~ N(0, I), with the score model's prior at the
    resolution σ0 = s(t0) / a(t0) of the run, p_σ0 = p * N(0, σ0^2 I) (the density of x_{t0} / a(t0)).

    x_t / a(t) = x_0 + (s / a)(t) ε_t has independent increments in (s / a)^2, so x_{t*} = a(t*) z at the time t*
    with (s / a)(t*)^2 = ρ^2 + σ0^2 is x_{t0} / a(t0) plus N(0, ρ^2 I), scaled by a(t*): the reverse SDE from there
    to run.t0 draws x_{t0} from p(x_{t0} | x_{t*}), and x = x_{t0} / a(t0) is the draw. (Stopping at t0 while
    starting at (s / a) = ρ would couple x and z with ρ^2 − σ0^2 instead of ρ^2, which made PnP-DM 5 % too narrow
    at ρ = 0.02 on a VP SDE.) `steps` Euler–Maruyama steps (`euler_step`) on a grid from t* to run.t0
    (`run.time_grid`, default `PRIOR_GRID`); `steps` network evaluations per draw.

    score: score(x, t), x: (B, *event_shape), t: (B,); z: (B, *event_shape) noisy images, in the units of x;
    rho: the noise std ρ > 0 of z, at most sqrt(σ_T^2 − σ0^2). Returns (B, *event_shape) in z's dtype.
    """
    run = as_run(run)
    number(run.t0, "t0", low=0.0, high=sde.T, high_open=True)
    positive_int(steps, "steps")
    if not isinstance(z, Tensor) or not z.is_floating_point():
        raise TypeError(f"z: expected a real floating-point torch.Tensor, got {type(z).__name__}")
    rhos = _rho_values([positive_float(rho, "rho")], sde, run.t0)
    with torch.no_grad():
        return _denoise(score, sde, z.detach(), float(_start_time(sde, rhos, run.t0)[0]), steps, run)


def pnp_dm(
    score: ScoreFn,
    sde: SDE,
    likelihood: Likelihood,
    n: int,
    event_shape: tuple[int, ...],
    *,
    rho: Sequence[float] | Tensor | np.ndarray | None = None,
    prior_steps: int = 20,
    likelihood_step: LikelihoodStep | None = None,
    run: Run | None = None,
) -> Tensor:
    """Plug-and-play diffusion models, PnP-DM (Wu et al., NeurIPS 2024): annealed split Gibbs (module docstring).

    For k = 0, ..., K − 1, with ρ_k = rho[k], on n independent chains started at x ~ the SDE's reference density:
        z ~ p(y | z) N(z; x, ρ_k^2 I)      (likelihood step, `likelihood_step`; `scoreprior.samplers.langevin`)
        x ~ p(x | z), z = x + ρ_k ε        (prior step, `sample_denoising_posterior`: `prior_steps` reverse-SDE
                                            steps from (s / a)^2 = ρ_k^2 + σ0^2 down to run.t0)
    and returns the last x. At ρ > 0 the x-marginal is the posterior under p(y | ·) convolved with N(0, ρ^2 I),
    a bias that vanishes as the floor of ρ goes to 0 (module docstring).

    score: score(x, t), x: (B, *event_shape), t: (B,). likelihood: any `Likelihood`; a `GaussianLikelihood` gets the
        exact Gaussian likelihood step, any other (a `ClosureLikelihood`) unadjusted Langevin on autograd of
        `log_prob`, with step γ = min(lr, ρ^2 / 10) (`LikelihoodStep`).
    rho: (K,) noise levels ρ_k > 0 in the units of x, one per iteration (K = len(rho) iterations; a sequence,
        array or tensor), each at most sqrt(σ_T^2 − σ0^2) with σ = s / a of the SDE; default `rho_schedule()`, the
        paper's black-hole schedule 10 → 0.02, × 0.93 per iteration, 200 iterations.
    prior_steps: Euler–Maruyama steps per prior step. 20 by default: the prior step's std is then at most 5 % (VP) /
        10 % (VE) too wide over ρ in [0.02, 10] (`PRIOR_GRID`), and with 10 steps PnP-DM's mean error on a blurred
        Gaussian (VE) grew from 0.04 to 0.07–0.09 posterior std.
    likelihood_step: a `LikelihoodStep` (default: exact for a GaussianLikelihood, else Langevin, 100 steps, lr 1e-5).
    run: `Run` (t0: where each prior step ends; time_grid: the prior step's grid from t* to t0, default
        `PRIOR_GRID` = "uniform"; generator: x's start and every noise; dtype, device, progress).
    Cost per sample: K · prior_steps network evaluations; plus K · langevin_steps likelihood gradients with
    Langevin; with the exact step one O(d^2) solve per iteration (dense solver, after d applications of A and A^H
    once) or up to cg_iters CG iterations (one A and one A^H each).
    Returns (n, *event_shape) approximate posterior samples of x (under the prior p_σ0, the law of x_t0 / a(t0)).
    """
    run = as_run(run)
    positive_int(n, "n")
    number(run.t0, "t0", low=0.0, high=sde.T, high_open=True)  # before rho, whose range depends on it
    rhos = _rho_values(rho, sde, run.t0)
    check_likelihood(likelihood, event_shape)
    positive_int(prior_steps, "prior_steps")
    starts = _start_time(sde, rhos, run.t0)
    x = run.initial(sde, (n, *event_shape))
    data = DataStep(likelihood, as_likelihood_step(likelihood_step), "pnp_dm", x)

    def step(x: Tensor, i: int) -> Tensor:
        z = data.draw(x, float(rhos[i]), run)
        return _denoise(score, sde, z, float(starts[i]), prior_steps, run)

    weight = (f"rho {float(rhos[0]):.3g} -> {float(rhos[-1]):.3g}, prior_steps={prior_steps}, "
              f"{data.describe()}")
    return integrate(step, x, starts, name="pnp_dm", weight=weight, progress=run.progress)

