"""Unconditional reverse-time sampling: the reverse SDE or the probability flow from the reference density."""

from __future__ import annotations

from torch import Tensor

from scoreprior._checks import choice, sampler_options
from scoreprior.samplers.engine import Run, ScoreFn, as_run, euler_step, integrate
from scoreprior.sde import SDE

__all__ = ["sample_prior", "SAMPLE_PRIOR_GRID"]

SAMPLE_PRIOR_GRID = "log_snr"
"""`sample_prior`'s default time grid (its docstring gives the measurements)."""


def sample_prior(
    score: ScoreFn,
    sde: SDE,
    n: int,
    event_shape: tuple[int, ...],
    *,
    steps: int = 500,
    method: str = "sde",
    run: Run | None = None,
) -> Tensor:
    """Unconditional samples from p_t0 by integrating backwards from the SDE's reference density at T.

    score: score(x, t) with x: (B, *event_shape), t: (B,) -> shaped like x.
    method: "sde" for Euler–Maruyama on the reverse SDE dx = [f - g^2 score] dt + g dw̄,
        "ode" for Euler on the probability flow dx/dt = f - g^2 score / 2 (Song et al., ICLR 2021).
    steps: number of steps from T to run.t0 (`Run`: grid, generator, dtype, device, progress); no final
        denoising step is taken. The default grid is `SAMPLE_PRIOR_GRID` ("log_snr"), not "uniform": uniform in
        t, the last step of a VP model run to t0 = 1e-5 spans the noise stds from 0.05 (100 steps) or 0.017
        (500 steps) down to 0.001, and its draws keep that step's noise. Measured on the shipped blackhole-32
        prior (mean |4-neighbour Laplacian| of 32 draws; training images 0.028): uniform 0.239 at 100 steps
        and 0.080 at 500, log-SNR 0.034 and 0.037, EDM 0.033 and 0.036. On gaussian-16 (pixel std ≥ 0.1, 1000
        draws at t0 = 1e-5) the variance along the 20 smallest eigenvectors of the exact covariance is 1.13 times
        the exact one on the uniform grid at 100 steps, 1.08 on the log-SNR grid, and 1.02 uniform at 500 steps.
    Returns (n, *event_shape) samples of x_t0.
    """
    run = as_run(run)
    sampler_options(n, steps, run.t0, sde.T)
    choice(method, "method", ("sde", "ode"))
    x = run.initial(sde, (n, *event_shape))
    ts = run.times(sde, steps, SAMPLE_PRIOR_GRID).to(x)

    def step(x: Tensor, i: int) -> Tensor:
        t = ts[i].expand(n)
        z = None if method == "ode" else run.noise(x)
        return euler_step(sde, x, t, float(ts[i + 1] - ts[i]), score(x, t), z)

    return integrate(step, x, ts[:-1], name="sample_prior", weight=f"method={method!r}", progress=run.progress,
                     desc=f"sample_prior[{method}]")
