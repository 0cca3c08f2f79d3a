"""Diffusion samplers: unconditional reverse-time sampling and posterior samplers, on one engine.

All samplers take a score model `score(x, t) -> same shape as x` (t: (B,)), an `SDE`, and return
`(n, *event_shape)` samples in the dtype of the run (`Run`: end time t0, time grid, generator, dtype,
device, progress). Time runs backwards from T to t0. The loop, the grids and the divergence guard are the
engine's (`scoreprior.samplers.engine`); each sampler is a step and a data term:
- `sample_prior` (prior.py): the reverse SDE or the probability flow;
- `dps` (dps.py): any `Likelihood` with a differentiable misfit `residual`, so a non-linear `ClosureLikelihood` too;
- `score_ald` (ald.py) and `sde_projection` (projection.py) use A, A^H and a Gaussian noise model and take only a
  `GaussianLikelihood` (TypeError otherwise);
- `pnp_dm` (pnp_dm.py): PnP-DM's annealed split Gibbs, a likelihood step and a denoising-posterior prior step at
  noise level ρ (`rho_schedule`), for any `Likelihood`;
- `daps` (daps.py): DAPS, per noise level an ODE estimate of x_0, a data step around it, re-noising; any `Likelihood`;
- their shared data step z ∝ p(y | z) N(z; c, r^2 I) (langevin.py, options `LikelihoodStep`): exact for a
  `GaussianLikelihood` (dense eigendecomposition up to 2048 pixels, conjugate gradients above), unadjusted
  Langevin otherwise; `DataStep` is it resolved for one likelihood.
Every sampler checks the state after each step and raises FloatingPointError naming the step, the
time and the guidance weight when it stops being finite or diverges (`engine.Guard`).
"""

from scoreprior.samplers.ald import score_ald
from scoreprior.samplers.daps import daps
from scoreprior.samplers.dps import dps
from scoreprior.samplers.engine import Run
from scoreprior.samplers.langevin import LikelihoodStep
from scoreprior.samplers.pnp_dm import pnp_dm, rho_schedule
from scoreprior.samplers.prior import sample_prior
from scoreprior.samplers.projection import sde_projection

__all__ = ["Run", "sample_prior", "dps", "score_ald", "sde_projection", "pnp_dm", "rho_schedule", "daps",
           "LikelihoodStep"]
