"""Decoupled annealing posterior sampling, DAPS (Zhang, Chu, Berner, Meng, Anandkumar & Song, CVPR 2025,
arXiv 2407.01521).

Noise levels σ_0 > σ_1 > ... > σ_{L−1}, σ = s / a (in the units of x), at the times t_i of a grid from T to t0.
Per level, from x_{t_i}:
  (a) x̂_0 = the probability-flow ODE from σ_i to 0 in EDM form, x̃ = x_t / a:
          dx̃/dσ = (x̃ − D(x̃, σ)) / σ = −σ ∇_x̃ log p_σ(x̃),   D(x̃, σ) = E[x_0 | x_t = a x̃]  (Tweedie),
      by `ode_steps` Euler steps at σ_i (1 − k / K)^7, k = 0, ..., K (Karras et al.'s spacing, ρ = 7, down to 0);
      one step to σ = 0 is exactly Tweedie, x̂_0 = D(x̃, σ_i);
  (b) x_0 ~ p(y | x_0) N(x_0; x̂_0, r_i^2 I), the Gaussian approximation p(x_0 | x_{t_i}) ≈ N(x̂_0, r_i^2 I)
      with the paper's r_i = σ_i (`scoreprior.samplers.langevin`: Langevin as in the paper, or exact for a
      `GaussianLikelihood`);
  (c) x_{t_{i+1}} = a_{i+1} x_0 + s_{i+1} ε;
and returns the x_0 of the last level. If p(x_0 | x_t) were exact, each x_t would be distributed as p_t(x_t | y)
and each x_0 as p(x_0 | y); the isotropic N(x̂_0, σ^2 I) is not (for a Gaussian prior N(m, C) the truth is
N(m + C (C + σ^2)^{-1} (x̃ − m), C (C + σ^2)^{-1} σ^2), anisotropic and narrower), so DAPS is biased. And the
ODE's x̂_0 is the flow's endpoint, not the mean: for a scalar prior N(m, λ) it shrinks x̃ − m by
(1 + σ^2 / λ)^{-1/2} where Tweedie shrinks by (1 + σ^2 / λ)^{-1}, and at small σ the levels' fixed point is then
the posterior under the prior N(m, 2 λ) (with Tweedie, the right one). Measured on exact Gaussian posteriors
(tests/test_pnp_dm_daps.py, published settings): where the likelihood dominates, mean within 0.06 posterior std
and stds within 2 %; where the prior dominates, stds up to 15 % too wide (unseen pixels of an inpainting) and the
mean off by 0.2 posterior std (blur); one ODE step (Tweedie) brings these to 3 % and 0.1 std.
With a network prior its spread depends on the number of levels, not only on the posterior: on black holes drawn
from the shipped blackhole-32 prior (studies/sampler_calibration.py, EHT 2017 data, 4 draws per truth, 10 truths)
the truth lies within the draws' range for 73 % / 40 % / 23 % of the ring's pixels at 50 / 200 / 1000 levels,
against 60 % if calibrated. Do not read DAPS's spread as an error bar without such a check.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scoreprior._checks import integer, number, positive_int, sampler_options
from scoreprior.protocols import Likelihood
from scoreprior.samplers.engine import Run, ScoreFn, as_run, check_likelihood, integrate
from scoreprior.samplers.langevin import DataStep, LikelihoodStep, as_likelihood_step
from scoreprior.sde import SDE

__all__ = ["daps", "ode_estimate"]

DAPS_GRID = "edm"
"""The levels' default time grid: the paper's σ schedule (Karras et al.'s, ρ = 7)."""


def ode_estimate(score: ScoreFn, sde: SDE, x: Tensor, t: float, steps: int, t0: float) -> Tensor:
    """DAPS's x̂_0: the probability-flow ODE from x_t at time t to σ = 0 by `steps` Euler steps in σ (module docstring).

    x: (B, *event_shape) states at time t, t0 ≤ t ≤ T; the score is evaluated at the times of the levels
    σ_k = σ(t) (1 − k / steps)^7 for k < steps, each no earlier than t0: below σ(t0) the score of σ(t0) stands in
    (the model's range ends there; the error is O(σ(t0)^2 / λ) for a prior of variance λ). `steps` network
    evaluations. Returns (B, *event_shape) in the units of x_0.
    """
    number(t0, "t0", low=0.0, high=sde.T, high_open=True)
    number(t, "t", low=t0, high=sde.T, low_open=False)
    positive_int(steps, "steps")
    times = torch.tensor([t], dtype=torch.float64)
    a, s = sde.marginal(times)
    sigma = float(s / a)
    u = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    sigmas = sigma * u**7
    taus = sigmas[:-1].log()
    ts = sde.time_at_log_noise_ratio(taus).clamp(t0, sde.T)
    ts[0] = t
    scales = sde.marginal(ts)[0]
    xt = x / float(a)
    n = x.shape[0]
    for k in range(steps):
        ak = float(scales[k])
        grad = ak * score(ak * xt, ts[k].to(x).expand(n))
        xt = xt + float(sigmas[k] - sigmas[k + 1]) * float(sigmas[k]) * grad
    return xt


def daps(
    score: ScoreFn,
    sde: SDE,
    likelihood: Likelihood,
    n: int,
    event_shape: tuple[int, ...],
    *,
    levels: int = 200,
    ode_steps: int = 5,
    likelihood_step: LikelihoodStep | None = None,
    run: Run | None = None,
) -> Tensor:
    """Decoupled annealing posterior sampling, DAPS (Zhang et al., CVPR 2025); the algorithm is the module docstring's.

    score: score(x, t), x: (B, *event_shape), t: (B,). likelihood: any `Likelihood`.
    levels: L ≥ 2 annealing levels at the times t_0 = T > ... > t_{L−1} = run.t0 of `run.time_grid` (default
        `DAPS_GRID` = "edm", the paper's schedule; the paper: 200 levels from σ = 100 to 0.1).
    ode_steps: Euler steps of the probability-flow ODE per level for x̂_0 (`ode_estimate`; the paper: 5; 1 is Tweedie).
    likelihood_step: how (b) is drawn, a `LikelihoodStep`; default "auto": exact for a GaussianLikelihood
        (perturb-and-MAP), else unadjusted Langevin from x̂_0 with γ_i = min(lr, r_i^2 / 10) (the paper runs 100
        Langevin steps with its own linearly decaying step; here the r_i^2 rule makes γ decay with σ_i);
        LikelihoodStep(method="langevin") forces Langevin, as in the paper.
    run: `Run` (t0: the last level; time_grid; generator: x_T and every noise; dtype, device, progress).
    Cost per sample: L · ode_steps network evaluations (the paper's 200 × 5 = 1000), plus L · langevin_steps
    likelihood gradients with Langevin; with the exact step one O(d^2) solve per level (dense solver, after d
    applications of A and A^H once) or up to cg_iters CG iterations (one A and one A^H each).
    Returns (n, *event_shape) approximate posterior samples of x_0.
    """
    run = as_run(run)
    sampler_options(n, levels, run.t0, sde.T, steps_name="levels")
    integer(levels, "levels", low=2)
    positive_int(ode_steps, "ode_steps")
    check_likelihood(likelihood, event_shape)
    times = run.times(sde, levels - 1, DAPS_GRID)
    a, s = sde.marginal(times)
    sigmas = s / a
    x = run.initial(sde, (n, *event_shape))
    data = DataStep(likelihood, as_likelihood_step(likelihood_step), "daps", x)

    def step(x: Tensor, i: int) -> Tensor:
        x0_hat = ode_estimate(score, sde, x, float(times[i]), ode_steps, run.t0)
        x0 = data.draw(x0_hat, float(sigmas[i]), run)
        if i == levels - 1:
            return x0
        return float(a[i + 1]) * x0 + float(s[i + 1]) * run.noise(x0)

    weight = f"levels={levels}, ode_steps={ode_steps}, r = sigma, {data.describe()}"
    return integrate(step, x, times, name="daps", weight=weight, progress=run.progress)

