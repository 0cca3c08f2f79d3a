"""scoreprior: principled Bayesian imaging with score-based diffusion priors."""

import os as _os
import sys as _sys
import warnings as _warnings

# OpenMP threads that spin while they wait for a core held by another process made DPI 77x slower beside
# another PyTorch job on 2 cores; PASSIVE makes them sleep instead. libgomp reads the variable once, when
# torch loads it, i.e. at the first `import torch`, which the imports below do: the `scoreprior` command,
# `python -m scoreprior.cli` and the studies all pass here first, before any torch import (the console
# script imports scoreprior.cli, hence this package). A value the user set wins (OMP_WAIT_POLICY=ACTIVE
# restores spinning). A program that imported torch first keeps the runtime's default, which nothing can
# change afterwards: it is told once, with the fix.
if "torch" in _sys.modules and "OMP_WAIT_POLICY" not in _os.environ:
    _warnings.warn("torch was imported before scoreprior without OMP_WAIT_POLICY set, so its OpenMP threads spin "
                   "while they wait: beside another busy process this made scoreprior's fits 5x slower. Fix: "
                   "`export OMP_WAIT_POLICY=PASSIVE` before starting Python, or import scoreprior before torch "
                   "(docs/troubleshooting.md)", RuntimeWarning, stacklevel=2)
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _keep_freed_memory() -> None:
    """Let glibc's malloc reuse freed tensor memory instead of returning it to the system at every free.

    By default glibc serves blocks above 32 MB by mmap and unmaps them on free (and trims the heap's top
    above 128 kB), so every log-density evaluation of a batch faulted its working memory in again, page by
    page: on 2 cores a batch of 64 blackhole-32 log p (4 RK4 steps, 4 probes) took 62.7 s with 17 million
    page faults, 62 s of it in the kernel, and 27.5 s with both thresholds at 1 GiB (0.2 million faults).
    Freed memory up to 1 GiB stays with the process. Thresholds the user set (GLIBC_TUNABLES,
    MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) win; elsewhere than glibc this does nothing.
    """
    if not _sys.platform.startswith("linux") or any(
            name in _os.environ for name in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return
    trim_threshold, mmap_threshold = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD of <malloc.h>
    mallopt(mmap_threshold, 1 << 30)
    mallopt(trim_threshold, 1 << 30)


_keep_freed_memory()

from scoreprior.checkpoints import load_checkpoint, load_prior
from scoreprior.density import ODEOptions, ScorePrior, bits_per_dim
from scoreprior.importance import PosteriorCheck, check_posterior, importance_draws
from scoreprior.likelihood import (
    ClosureLikelihood, DiagonalCovariance, FourierDiagonalCovariance, GaussianLikelihood, NoiseCovariance,
)
from scoreprior.nets import MLP, UNet, build_net
from scoreprior.noise_prediction import GaussianResidualNet, NoisePredictionScore
from scoreprior.posterior import DPI, FitConfig, FitDiverged
from scoreprior.pretrained import available_priors, pretrained
from scoreprior.priors import GaussianPrior, gaussian_posterior, reference_posterior
from scoreprior.protocols import Likelihood, Prior
from scoreprior.samplers import (
    LikelihoodStep, Run, daps, dps, pnp_dm, rho_schedule, sample_prior, score_ald, sde_projection,
)
from scoreprior.scores import GaussianMixtureScore, GaussianScore
from scoreprior.sde import SDE, VESDE, SubVPSDE, VPSDE, sde_from_config
from scoreprior.surrogate import SurrogatePrior
from scoreprior.training import EMA, TrainConfig, TrainResult, dsm_loss, save_checkpoint, train_score_model
from scoreprior.ws import (
    Haze, WhitenedScore, WSProcess, load_ws_model, power_spectrum, sweep_lambda, ws_loss, ws_sample,
)

__version__ = "0.2.0"

__all__ = [
    "SDE", "VPSDE", "SubVPSDE", "VESDE", "sde_from_config",
    "GaussianScore", "GaussianMixtureScore",
    "Prior", "Likelihood", "ScorePrior", "ODEOptions", "bits_per_dim", "SurrogatePrior", "GaussianPrior", "gaussian_posterior", "reference_posterior",
    "check_posterior", "importance_draws", "PosteriorCheck",
    "GaussianLikelihood", "ClosureLikelihood", "NoiseCovariance", "DiagonalCovariance", "FourierDiagonalCovariance",
    "UNet", "MLP", "build_net", "DPI", "FitConfig", "FitDiverged",
    "NoisePredictionScore", "GaussianResidualNet", "EMA", "TrainConfig", "TrainResult", "dsm_loss", "train_score_model",
    "save_checkpoint", "load_checkpoint", "load_prior", "pretrained", "available_priors",
    "Run", "sample_prior", "dps", "score_ald", "sde_projection", "pnp_dm", "rho_schedule", "daps", "LikelihoodStep",
    "WSProcess", "WhitenedScore", "Haze", "ws_loss", "ws_sample", "sweep_lambda", "load_ws_model", "power_spectrum",
]
