"""Annealed Langevin posterior sampling, Score-ALD (Jalal et al., NeurIPS 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from scoreprior._checks import number, positive_float, positive_int, sampler_options
from scoreprior.likelihood import GaussianLikelihood
from scoreprior.samplers.engine import Run, ScoreFn, as_run, check_likelihood, integrate
from scoreprior.sde import SDE

__all__ = ["score_ald", "times_for_stds"]


def times_for_stds(sde: SDE, stds: Tensor, t0: float) -> Tensor:
    """Times t in [t0, T] with s(t) = stds, float64, by linear interpolation on a dense grid (s is increasing)."""
    grid = torch.linspace(t0, sde.T, 20001, dtype=torch.float64)
    s_grid = sde.marginal(grid)[1]
    target = stds.to(torch.float64).clamp(s_grid[0], s_grid[-1])
    j = torch.searchsorted(s_grid, target).clamp(1, grid.numel() - 1)
    lo, hi = s_grid[j - 1], s_grid[j]
    w = ((target - lo) / (hi - lo)).clamp(0, 1)
    return grid[j - 1] + w * (grid[j] - grid[j - 1])


def _scalar_noise_std(likelihood: GaussianLikelihood) -> float:
    std_y = likelihood.noise.std if hasattr(likelihood.noise, "std") else None
    if std_y is None or not bool((std_y == std_y.flatten()[0]).all()):
        raise ValueError("likelihood: score_ald needs a scalar noise std (sigma a positive number)")
    return float(std_y.flatten()[0])


def score_ald(
    score: ScoreFn,
    sde: SDE,
    likelihood: GaussianLikelihood,
    n: int,
    event_shape: tuple[int, ...],
    *,
    lr: float = 1e-5,
    n_levels: int = 100,
    steps_per_level: int = 5,
    gamma: float = 1.0,
    run: Run | None = None,
) -> Tensor:
    """Annealed Langevin posterior sampling, Score-ALD (Jalal et al., NeurIPS 2021).

    Noise levels σ_1 > ... > σ_L are geometric between s(T) and s(t0) of the SDE; level c runs at the time
    t_c with s(t_c) = σ_c, and `steps_per_level` unadjusted Langevin steps target p_{t_c}(x_t | y):
        x ← x + ε_c [score(x, t_c) + A^H(a_c y − A x)/(a_c^2 σ_y^2 + γ_c^2)] + sqrt(2 ε_c) z,
    the second term being ∇_x log N(a_c y; A x, (a_c^2 σ_y^2 + γ_c^2) I),
    with a_c = a(t_c), γ_c = gamma · σ_c and ε_c = lr (σ_c / σ_L)^2. For VE (a = 1) this is the paper's
    A^H(y − A x)/(σ_y^2 + γ_c^2); for VP, x_t = a x_0 + s z gives a y − A x_t = a b − s A z, whose variance
    is a^2 σ_y^2 + s^2 for a unit-norm A, hence the scaling. We use the paper's form, not the public code's
    rescaling of the likelihood gradient to the score's norm. No final denoising step.

    likelihood: real-valued y with a scalar noise std (σ_y); complex A^H r is taken via A_adjoint
        (for complex y the gradient carries the factor 2 of `GaussianLikelihood.grad_log_prob`).
    lr: step size at the last level, in squared units of x; Langevin is stable only for
        ε_c < 2 / (largest eigenvalue of the posterior precision at level c).
    run: `Run` (t0 = the last level's time, generator, dtype, device, progress; its time_grid is not used:
        the levels are geometric in σ).
    Returns (n, *event_shape) approximate posterior samples of x_t_L.
    """
    run = as_run(run)
    sampler_options(n, n_levels, run.t0, sde.T, steps_name="n_levels")
    check_likelihood(likelihood, event_shape, linear="score_ald")
    positive_int(steps_per_level, "steps_per_level")
    positive_float(lr, "lr")
    number(gamma, "gamma", low=0.0, low_open=False)
    sigma_y = _scalar_noise_std(likelihood)
    c = 2.0 if likelihood.operator.is_complex else 1.0
    ends = sde.marginal(torch.tensor([sde.T, run.t0], dtype=torch.float64))[1]
    sigmas = torch.logspace(float(ends[0].log10()), float(ends[1].log10()), n_levels, dtype=torch.float64)
    times = times_for_stds(sde, sigmas, run.t0)
    a = sde.marginal(times)[0]
    eps = lr * (sigmas / sigmas[-1]) ** 2
    var = a**2 * sigma_y**2 + (gamma * sigmas) ** 2
    x = run.initial(sde, (n, *event_shape))
    y = likelihood.y.to(x.device)
    step_times = times.repeat_interleave(steps_per_level).to(x.dtype)

    def step(x: Tensor, i: int) -> Tensor:
        level = i // steps_per_level
        r = float(a[level]) * y - likelihood.operator.A(x)
        lik = c * likelihood.operator.A_adjoint(r) / float(var[level])
        drift = score(x, step_times[i].expand(n)) + lik
        return x + float(eps[level]) * drift + (2 * float(eps[level])) ** 0.5 * run.noise(x)

    return integrate(step, x, step_times, name="score_ald", weight=f"lr={lr}, gamma={gamma}", progress=run.progress)
