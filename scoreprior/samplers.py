"""Diffusion samplers: unconditional reverse-time sampling and posterior-sampling baselines.

All samplers take a score model `score(x, t) -> same shape as x` (t: (B,)), an `SDE`, and return
`(n, *event_shape)` samples in the dtype of the SDE's prior draw (`dtype` argument, default float32).
Time runs backwards on a uniform grid t_0 = T > t_1 > ... > t_steps = t0.
Every sampler checks the state after each step and raises FloatingPointError naming the step, the
time and the guidance weight when it stops being finite.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from scoreprior.likelihood import GaussianLikelihood
from scoreprior.sde import SDE, per_sample

__all__ = ["sample_prior", "dps", "score_ald"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def _check_options(n: int, steps: int, t0: float, sde: SDE) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    if not 0 < t0 < sde.T:
        raise ValueError(f"t0: expected 0 < t0 < T = {sde.T}, got {t0!r}")


def _check_finite(x: Tensor, name: str, step: int, total: int, t: float, weight: str) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise FloatingPointError(
            f"{name}: state became non-finite ({bad} NaN/inf entries) at step {step + 1}/{total}, "
            f"t = {t:.4g}, with {weight}; lower the weight/step size or check the score model"
        )


def _time_grid(sde: SDE, steps: int, t0: float, dtype: torch.dtype, device: torch.device | None) -> Tensor:
    return torch.linspace(sde.T, t0, steps + 1, dtype=dtype, device=device)


def _em_step(sde: SDE, x: Tensor, t: Tensor, dt: float, s: Tensor, z: Tensor | None) -> Tensor:
    """One Euler(-Maruyama) step of the reverse SDE (z given) or probability-flow ODE (z None), dt < 0.

    SDE: x + [f(x, t) - g(t)^2 s] dt + g(t) sqrt(-dt) z;  ODE: x + [f(x, t) - g(t)^2 s / 2] dt.
    """
    if z is None:
        return x + sde.ode_drift(x, t, s) * dt
    g = per_sample(sde.diffusion(t), x)
    drift = per_sample(sde.drift_coeff(t), x) * x - g * g * s
    return x + drift * dt + g * (-dt) ** 0.5 * z


def sample_prior(
    score: ScoreFn,
    sde: SDE,
    n: int,
    event_shape: tuple[int, ...],
    *,
    steps: int = 500,
    method: str = "sde",
    t0: float = 1e-3,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Tensor:
    """Unconditional samples from p_t0 by integrating backwards from the SDE's reference density at T.

    score: score(x, t) with x: (B, *event_shape), t: (B,) -> shaped like x.
    method: "sde" for Euler–Maruyama on the reverse SDE dx = [f - g^2 score] dt + g dw̄,
        "ode" for Euler on the probability flow dx/dt = f - g^2 score / 2 (Song et al., ICLR 2021).
    steps: number of uniform steps from T to t0; no final denoising step is taken.
    Returns (n, *event_shape) samples of x_t0.
    """
    _check_options(n, steps, t0, sde)
    if method not in ("sde", "ode"):
        raise ValueError(f"method: expected 'sde' or 'ode', got {method!r}")
    x = sde.prior_sample((n, *event_shape), generator=generator, device=device, dtype=dtype)
    ts = _time_grid(sde, steps, t0, x.dtype, x.device)
    for i in tqdm(range(steps), desc=f"sample_prior[{method}]", disable=not progress):
        t = ts[i].expand(n)
        dt = float(ts[i + 1] - ts[i])
        with torch.no_grad():
            s = score(x, t)
            z = None if method == "ode" else torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = _em_step(sde, x, t, dt, s, z)
        _check_finite(x, "sample_prior", i, steps, float(ts[i]), f"method={method!r}")
    return x


def dps(
    score: ScoreFn,
    sde: SDE,
    likelihood: GaussianLikelihood,
    n: int,
    event_shape: tuple[int, ...],
    *,
    zeta: float = 1.0,
    steps: int = 500,
    t0: float = 1e-3,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Tensor:
    """Diffusion posterior sampling (Chung et al., ICLR 2023), Euler–Maruyama discretisation.

    Each step: x' = reverse-SDE step of x_t with score(x_t, t), then
        x ← x' − ζ ∇_{x_t} ||y − A x̂_0(x_t)||,   x̂_0(x_t) = (x_t + s(t)^2 score(x_t, t)) / a(t)  (Tweedie),
    the gradient taken through the score model by autograd. The norm is NOT squared, as in the authors'
    public code: ∇||r|| = ∇||r||^2 / (2||r||), so the step has a built-in 1/||r|| scaling and ζ is
    dimensionless (the paper's ζ_i = ζ / ||r||); σ_y enters only through y. The norm is taken per sample
    (the public code's batch-wide norm equals it for batch size 1). The noise model of `likelihood` is
    not used; for complex y the norm is over |r|.

    score: score(x, t), x: (B, *event_shape), t: (B,). likelihood: y = A x + b with A acting on
    (B, *event_shape) images. zeta: guidance weight, ≥ 0 (public code: 0.3–1.0).
    Returns (n, *event_shape) approximate posterior samples of x_t0.
    """
    _check_options(n, steps, t0, sde)
    if not zeta >= 0:
        raise ValueError(f"zeta: expected a non-negative number, got {zeta!r}")
    x = sde.prior_sample((n, *event_shape), generator=generator, device=device, dtype=dtype)
    ts = _time_grid(sde, steps, t0, x.dtype, x.device)
    for i in tqdm(range(steps), desc="dps", disable=not progress):
        t = ts[i].expand(n)
        dt = float(ts[i + 1] - ts[i])
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            s = score(x, t)
            a, std = sde.marginal(t)
            x0_hat = (x + per_sample(std * std, x) * s) / per_sample(a, x)
            norm = likelihood.residual(x0_hat).abs().square().flatten(1).sum(1).sqrt()
            (grad,) = torch.autograd.grad(norm.sum(), x)
        with torch.no_grad():
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = _em_step(sde, x.detach(), t, dt, s.detach(), z) - zeta * grad
        _check_finite(x, "dps", i, steps, float(ts[i]), f"zeta={zeta}")
    return x.detach()


def _times_for_stds(sde: SDE, stds: Tensor, t0: float) -> Tensor:
    """Times t in [t0, T] with s(t) = stds, by linear interpolation on a dense grid (s is increasing)."""
    grid = torch.linspace(t0, sde.T, 20001, dtype=torch.float64)
    s_grid = sde.marginal(grid)[1]
    target = stds.to(torch.float64).clamp(s_grid[0], s_grid[-1])
    j = torch.searchsorted(s_grid, target).clamp(1, grid.numel() - 1)
    lo, hi = s_grid[j - 1], s_grid[j]
    w = ((target - lo) / (hi - lo)).clamp(0, 1)
    return grid[j - 1] + w * (grid[j] - grid[j - 1])


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
    t0: float = 1e-3,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool = True,
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
    Returns (n, *event_shape) approximate posterior samples of x_t_L.
    """
    _check_options(n, n_levels, t0, sde)
    if not isinstance(steps_per_level, int) or steps_per_level < 1:
        raise ValueError(f"steps_per_level: expected a positive int, got {steps_per_level!r}")
    if not lr > 0:
        raise ValueError(f"lr: expected a positive number, got {lr!r}")
    if not gamma >= 0:
        raise ValueError(f"gamma: expected a non-negative number, got {gamma!r}")
    std_y = likelihood.noise.std if hasattr(likelihood.noise, "std") else None
    if std_y is None or not bool((std_y == std_y.flatten()[0]).all()):
        raise ValueError("likelihood: score_ald needs a scalar noise std (sigma a positive number)")
    sigma_y = float(std_y.flatten()[0])
    c = 2.0 if likelihood.operator.is_complex else 1.0
    s_hi = float(sde.marginal(torch.tensor([sde.T], dtype=torch.float64))[1])
    s_lo = float(sde.marginal(torch.tensor([t0], dtype=torch.float64))[1])
    sigmas = torch.logspace(torch.tensor(s_hi).log10(), torch.tensor(s_lo).log10(), n_levels, dtype=torch.float64)
    times = _times_for_stds(sde, sigmas, t0)
    x = sde.prior_sample((n, *event_shape), generator=generator, device=device, dtype=dtype)
    y = likelihood.y.to(x.device)
    total = n_levels * steps_per_level
    for level in tqdm(range(n_levels), desc="score_ald", disable=not progress):
        tc = times[level].to(x.dtype)
        a_c = float(sde.marginal(times[level : level + 1])[0])
        sigma_c = float(sigmas[level])
        eps = lr * (sigma_c / float(sigmas[-1])) ** 2
        var = a_c**2 * sigma_y**2 + (gamma * sigma_c) ** 2
        t = tc.expand(n)
        for k in range(steps_per_level):
            with torch.no_grad():
                r = a_c * y - likelihood.operator.A(x)
                lik = c * likelihood.operator.A_adjoint(r) / var
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                x = x + eps * (score(x, t) + lik) + (2 * eps) ** 0.5 * z
            _check_finite(x, "score_ald", level * steps_per_level + k, total, float(tc),
                          f"lr={lr}, step size eps={eps:.3g}, gamma={gamma}")
    return x
