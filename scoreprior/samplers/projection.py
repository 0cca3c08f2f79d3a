"""The reverse SDE with measurement projection (Song, Shen, Xing & Ermon, ICLR 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from scoreprior._checks import nonnegative_int, number, sampler_options
from scoreprior.likelihood import GaussianLikelihood
from scoreprior.operators import LinearOperator
from scoreprior.samplers.engine import (
    Run, ScoreFn, as_run, check_likelihood, conjugate_gradients, euler_step, integrate,
)
from scoreprior.sde import SDE, per_sample

__all__ = ["sde_projection", "least_squares"]


def least_squares(operator: LinearOperator, r: Tensor, like: Tensor, *, iters: int, rtol: float = 1e-6) -> Tensor:
    """A^+ r: the minimum-norm u minimising ||A u - r||, by conjugate gradients on A^H A u = A^H r.

    Batched CG per sample, started at 0 (so the iterates stay in range(A^H) and converge to the
    minimum-norm solution). For operators with A^H A a multiple of a projection (identity, masks,
    DFT subsampling) one iteration is exact; for ill-conditioned A (blur) a few iterations act as a
    regularised pseudo-inverse. r: (B, *measurement_shape); like: (B, C, H, W) -> (B, C, H, W).
    """
    return conjugate_gradients(operator.A_normal, operator.A_adjoint(r), torch.zeros_like(like), iters=iters,
                               rtol=rtol)


def _langevin_corrector(score: ScoreFn, x: Tensor, t: Tensor, snr: float, z: Tensor) -> Tensor:
    """x + ε s(x) + sqrt(2 ε) z with ε = 2 (snr ||z|| / ||s(x)||)^2 per sample (Song et al., ICLR 2021)."""
    g = score(x, t)
    ratio = z.flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
    eps = per_sample(2 * (snr * ratio) ** 2, x)
    return x + eps * g + (2 * eps).sqrt() * z


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
    run: Run | None = None,
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
    pseudo-inverse by `cg_iters` conjugate-gradient steps on A^H A (`least_squares`; exact in one step for
    masks, the identity and DFT subsampling). λ = 1 is a hard projection, λ < 1 a soft one that tolerates
    measurement noise; the noise model of `likelihood` is not used (σ_y enters only through y).
    With λ = 0 and snr = 0 the sampler is `sample_prior` on the same time grid (same draws from the run's generator).

    likelihood: y = A x + b with A acting on (B, *event_shape) images; lam: λ in [0, 1];
    snr: corrector signal-to-noise ratio ≥ 0 (0: no corrector); n_corrector: corrector steps per time;
    run: `Run` (t0, grid, generator, dtype, device, progress).
    Returns (n, *event_shape) approximate posterior samples of x_t0.
    """
    run = as_run(run)
    sampler_options(n, steps, run.t0, sde.T)
    check_likelihood(likelihood, event_shape, linear="sde_projection")
    number(lam, "lam", low=0.0, high=1.0, low_open=False)
    number(snr, "snr", low=0.0, low_open=False)
    nonnegative_int(n_corrector, "n_corrector")
    nonnegative_int(cg_iters, "cg_iters")
    operator = likelihood.operator
    x = run.initial(sde, (n, *event_shape))
    y = likelihood.y.to(x.device)
    ts = run.times(sde, steps).to(x)

    def step(x: Tensor, i: int) -> Tensor:
        t, t_next = ts[i].expand(n), ts[i + 1].expand(n)
        if lam > 0:
            a, s = sde.marginal(t)
            y_t = per_sample(a, y) * y + per_sample(s, y) * operator.A(run.noise(x))
            x = x + lam * least_squares(operator, y_t - operator.A(x), x, iters=cg_iters)
        x = euler_step(sde, x, t, float(ts[i + 1] - ts[i]), score(x, t), run.noise(x))
        for _ in range(n_corrector if snr > 0 else 0):
            x = _langevin_corrector(score, x, t_next, snr, run.noise(x))
        return x

    return integrate(step, x, ts[:-1], name="sde_projection", weight=f"lam={lam}, snr={snr}", progress=run.progress)
