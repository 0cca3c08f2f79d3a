"""Diffusion samplers: unconditional reverse-time sampling and posterior-sampling baselines.

All samplers take a score model `score(x, t) -> same shape as x` (t: (B,)), an `SDE`, and return
`(n, *event_shape)` samples in the dtype of the SDE's prior draw (`dtype` argument, default float32).
Time runs backwards on a uniform grid t_0 = T > t_1 > ... > t_steps = t0.
Every sampler checks the state after each step and raises FloatingPointError naming the step, the
time and the guidance weight when it stops being finite or diverges (see `_Guard`).
`dps` takes any `Likelihood` (`scoreprior.protocols`) and needs only its differentiable misfit
`residual`, so it takes a non-linear `ClosureLikelihood`; `score_ald` and `sde_projection` use A, A^H and
a Gaussian noise model and take only a `GaussianLikelihood` (TypeError otherwise).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from scoreprior._checks import (
    choice, implements, nonnegative_int, number, positive_float, positive_int, sampler_options,
)
from scoreprior.likelihood import GaussianLikelihood
from scoreprior.protocols import Likelihood
from scoreprior.sde import SDE, per_sample

__all__ = ["sample_prior", "dps", "score_ald", "sde_projection"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def _check_likelihood(likelihood: Likelihood, event_shape: tuple[int, ...], *, linear: str | None = None) -> None:
    """TypeError unless likelihood is a `Likelihood`; ValueError naming event_shape when the likelihood's y
    does not match A on images of that shape.

    linear: the sampler's name when it needs a linear-Gaussian likelihood (TypeError for any other).
    """
    if linear is not None and not isinstance(likelihood, GaussianLikelihood):
        raise TypeError(f"likelihood: {linear} needs a linear operator and Gaussian noise (a GaussianLikelihood), "
                        f"got {type(likelihood).__name__}; use dps or DPI for non-linear data such as closures")
    implements(likelihood, "likelihood", Likelihood)
    if not isinstance(event_shape, (tuple, list, torch.Size)) or not all(isinstance(s, int) and s > 0
                                                                      for s in event_shape):
        raise ValueError(f"event_shape: expected a tuple of positive ints like (1, 32, 32), got {event_shape!r}")
    try:
        likelihood.validate(tuple(event_shape))
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"event_shape {tuple(event_shape)} does not match the likelihood: {err}") from None


class _Guard:
    """Stops a sampler whose state stops being finite or blows up, naming the step, time and weight.

    A state whose largest magnitude exceeds `factor` times that of the initial draw (at least 1) is
    taken as diverged: no sampler of a normalised prior legitimately moves that far, and an unstable
    linear recursion (Langevin with too large a step) reaches it long before overflowing to inf.
    """

    factor = 1e6

    def __init__(self, name: str, x0: Tensor, total: int, weight: str) -> None:
        self.name, self.total, self.weight = name, total, weight
        self.limit = self.factor * max(1.0, float(x0.abs().max()))

    def __call__(self, x: Tensor, step: int, t: float) -> None:
        where = f"at step {step + 1}/{self.total}, t = {t:.4g}, with {self.weight}"
        advice = "lower the weight/step size or check the score model"
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise FloatingPointError(f"{self.name}: state became non-finite ({bad} NaN/inf entries) {where}; "
                                     f"{advice}")
        largest = float(x.abs().max())
        if largest > self.limit:
            raise FloatingPointError(f"{self.name}: state diverged (max |x| = {largest:.3g} > {self.limit:.3g}, "
                                     f"{self.factor:.0e} times the initial draw's) {where}; {advice}")


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
    sampler_options(n, steps, t0, sde.T)
    choice(method, "method", ("sde", "ode"))
    x = sde.prior_sample((n, *event_shape), generator=generator, device=device, dtype=dtype)
    guard = _Guard("sample_prior", x, steps, f"method={method!r}")
    ts = _time_grid(sde, steps, t0, x.dtype, x.device)
    for i in tqdm(range(steps), desc=f"sample_prior[{method}]", disable=not progress):
        t = ts[i].expand(n)
        dt = float(ts[i + 1] - ts[i])
        with torch.no_grad():
            s = score(x, t)
            z = None if method == "ode" else torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = _em_step(sde, x, t, dt, s, z)
        guard(x, i, float(ts[i]))
    return x


def dps(
    score: ScoreFn,
    sde: SDE,
    likelihood: Likelihood,
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
    not used; for complex y the norm is over |r|. A `ClosureLikelihood` has no linear A: its `residual`
    is the noise-whitened misfit of the closure quantities, so there the norm is sqrt(-2 log p + const).

    score: score(x, t), x: (B, *event_shape), t: (B,). likelihood: a `Likelihood` (`scoreprior.protocols`),
    e.g. a `GaussianLikelihood` (y = A x + b, A acting on (B, *event_shape) images) or a `ClosureLikelihood`;
    dps follows its `residual(x) -> (B, ...)`. zeta: guidance weight, ≥ 0 (public code: 0.3–1.0).
    Returns (n, *event_shape) approximate posterior samples of x_t0.
    """
    sampler_options(n, steps, t0, sde.T)
    _check_likelihood(likelihood, event_shape)
    if not callable(getattr(likelihood, "residual", None)):
        raise TypeError(f"likelihood: dps follows the gradient of the misfit and needs residual(x), got "
                        f"{type(likelihood).__name__} without residual")
    number(zeta, "zeta", low=0.0, low_open=False)
    x = sde.prior_sample((n, *event_shape), generator=generator, device=device, dtype=dtype)
    guard = _Guard("dps", x, steps, f"zeta={zeta}")
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
        guard(x, i, float(ts[i]))
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
    sampler_options(n, n_levels, t0, sde.T, steps_name="n_levels")
    _check_likelihood(likelihood, event_shape, linear="score_ald")
    positive_int(steps_per_level, "steps_per_level")
    positive_float(lr, "lr")
    number(gamma, "gamma", low=0.0, low_open=False)
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
    guard = _Guard("score_ald", x, total, f"lr={lr}, gamma={gamma}")
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
            guard(x, level * steps_per_level + k, float(tc))
    return x


def _least_squares(operator, r: Tensor, like: Tensor, *, iters: int, rtol: float = 1e-6) -> Tensor:
    """A^+ r: the minimum-norm u minimising ||A u - r||, by conjugate gradients on A^H A u = A^H r.

    Batched CG per sample, started at 0 (so the iterates stay in range(A^H) and converge to the
    minimum-norm solution). For operators with A^H A a multiple of a projection (identity, masks,
    DFT subsampling) one iteration is exact; for ill-conditioned A (blur) a few iterations act as a
    regularised pseudo-inverse. r: (B, *measurement_shape); like: (B, C, H, W) -> (B, C, H, W).
    """
    rhs = operator.A_adjoint(r)
    u = torch.zeros_like(like)
    res, p = rhs.clone(), rhs.clone()
    rr = res.flatten(1).square().sum(1)
    stop = rtol**2 * rr
    for _ in range(iters):
        q = operator.A_normal(p)
        pq = (p * q).flatten(1).sum(1)
        alpha = torch.where(rr > stop, rr / pq.clamp_min(torch.finfo(pq.dtype).tiny), torch.zeros_like(rr))
        u = u + per_sample(alpha, u) * p
        res = res - per_sample(alpha, res) * q
        rr_new = res.flatten(1).square().sum(1)
        p = res + per_sample(rr_new / rr.clamp_min(torch.finfo(rr.dtype).tiny), p) * p
        rr = rr_new
    return u


def sde_projection(
    score: ScoreFn,
    sde: SDE,
    likelihood: GaussianLikelihood,
    n: int,
    event_shape: tuple[int, ...],
    *,
    lam: float = 1.0,
    snr: float = 0.16,
    n_corrector: int = 1,
    steps: int = 500,
    cg_iters: int = 1,
    t0: float = 1e-3,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Tensor:
    """Reverse SDE with measurement projection (Song, Shen, Xing & Ermon, ICLR 2022).

    At each time t_i of the grid T = t_0 > ... > t_steps = t0:
        ŷ = a(t_i) y + s(t_i) A z                     (the measurement noised to level t_i, fresh z)
        x ← x + λ A^+ (ŷ − A x)                       (move the measured components a fraction λ to ŷ)
        x ← reverse-SDE Euler–Maruyama step to t_{i+1}  (predictor)
        x ← x + ε s(x) + sqrt(2 ε) z', ε = 2 (snr ||z'|| / ||s(x)||)^2 per sample, `n_corrector` times
                                                      (Langevin corrector at t_{i+1}, Song et al. 2021)
    With A = P(Λ) T (a subsampled orthonormal transform) the projection step is the paper's
    T^{-1}[λ Λ ŷ + (1 − λ) Λ T x + (I − Λ) T x]; for other operators A^+ is the least-squares
    pseudo-inverse by `cg_iters` conjugate-gradient steps on A^H A (exact in one step for masks, the
    identity and DFT subsampling). λ = 1 is a hard projection, λ < 1 a soft one that tolerates
    measurement noise; the noise model of `likelihood` is not used (σ_y enters only through y).
    With λ = 0 and snr = 0 the sampler is `sample_prior` (same draws from `generator`).

    likelihood: y = A x + b with A acting on (B, *event_shape) images; lam: λ in [0, 1];
    snr: corrector signal-to-noise ratio ≥ 0 (0: no corrector); n_corrector: corrector steps per time.
    Returns (n, *event_shape) approximate posterior samples of x_t0.
    """
    sampler_options(n, steps, t0, sde.T)
    _check_likelihood(likelihood, event_shape, linear="sde_projection")
    number(lam, "lam", low=0.0, high=1.0, low_open=False)
    number(snr, "snr", low=0.0, low_open=False)
    nonnegative_int(n_corrector, "n_corrector")
    nonnegative_int(cg_iters, "cg_iters")
    operator = likelihood.operator
    x = sde.prior_sample((n, *event_shape), generator=generator, device=device, dtype=dtype)
    y = likelihood.y.to(x.device)
    ts = _time_grid(sde, steps, t0, x.dtype, x.device)
    guard = _Guard("sde_projection", x, steps, f"lam={lam}, snr={snr}")

    def noise() -> Tensor:
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    for i in tqdm(range(steps), desc="sde_projection", disable=not progress):
        t, t_next = ts[i].expand(n), ts[i + 1].expand(n)
        dt = float(ts[i + 1] - ts[i])
        with torch.no_grad():
            if lam > 0:
                a, s = sde.marginal(t)
                y_t = per_sample(a, y) * y + per_sample(s, y) * operator.A(noise())
                x = x + lam * _least_squares(operator, y_t - operator.A(x), x, iters=cg_iters)
            x = _em_step(sde, x, t, dt, score(x, t), noise())
            for _ in range(n_corrector if snr > 0 else 0):
                g = score(x, t_next)
                z = noise()
                ratio = z.flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
                eps = per_sample(2 * (snr * ratio) ** 2, x)
                x = x + eps * g + (2 * eps).sqrt() * z
        guard(x, i, float(ts[i]))
    return x
