"""Tests for scoreprior/protocols.py: every prior and likelihood of the package is a `Prior` / `Likelihood`,
and the consumers refuse an object that is not one with a TypeError naming the argument and the member."""

import numpy as np
import pytest
import torch

from scoreprior import eht
from scoreprior.density import ScorePrior
from scoreprior.likelihood import ClosureLikelihood, GaussianLikelihood
from scoreprior.operators import GaussianBlur, Interferometer, uas_to_rad
from scoreprior.posterior import DPI, FitConfig
from scoreprior.priors import GaussianPrior
from scoreprior.protocols import Likelihood, Prior
from scoreprior.samplers import Run, dps
from scoreprior.scores import GaussianScore
from scoreprior.sde import VPSDE
from scoreprior.surrogate import SurrogatePrior

SHAPE = (1, 2, 2)
B = 3


def _gaussian() -> GaussianPrior:
    return GaussianPrior(torch.zeros(SHAPE, dtype=torch.float64), 0.5 * torch.eye(4, dtype=torch.float64))


def _priors() -> dict[str, Prior]:
    gaussian, sde = _gaussian(), VPSDE()
    score = GaussianScore(gaussian.mean, gaussian.cov, sde)
    return {"gaussian": gaussian, "score": ScorePrior(score, sde, t0=1e-3, event_shape=SHAPE),
            "surrogate": SurrogatePrior(score, sde, event_shape=SHAPE)}


def _closure_likelihood() -> tuple[ClosureLikelihood, tuple[int, ...]]:
    """Closures of a 6 x 6 blob seen by two scans of the EHT 2017 M87 coverage."""
    cover = eht.uv_coverage(eht.load_array("EHT2017"), 12.5137, 12.3911, 57854)
    keep = np.isin(cover.time, np.unique(cover.time)[[20, 30]])
    cover = eht.UVCoverage(*(getattr(cover, f)[keep] for f in ("time", "t1", "t2", "u", "v", "w", "sigma")))
    grid = torch.arange(6, dtype=torch.float64) - 2.5
    blob = torch.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / 4).reshape(1, 1, 6, 6)
    vis = Interferometer(cover.uv, 6, uas_to_rad(120.0)).A(blob)[0].numpy()
    return ClosureLikelihood.from_observation(cover, 6, uas_to_rad(120.0), vis=vis), (1, 6, 6)


def _likelihoods() -> dict[str, tuple[Likelihood, tuple[int, ...]]]:
    blur = GaussianBlur(1.0)
    gaussian = GaussianLikelihood(blur, blur.A(torch.ones((1, *SHAPE), dtype=torch.float64)), 0.1)
    return {"gaussian": (gaussian, SHAPE), "closure": _closure_likelihood()}


@pytest.mark.parametrize("name", ["gaussian", "score", "surrogate"])
def test_every_prior_is_a_prior(name):
    prior = _priors()[name]
    assert isinstance(prior, Prior)
    assert tuple(prior.event_shape) == SHAPE
    x = torch.randn((B, *SHAPE), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert prior.log_prob(x).shape == (B,)


@pytest.mark.parametrize("name", ["gaussian", "closure"])
def test_every_likelihood_is_a_likelihood(name):
    likelihood, shape = _likelihoods()[name]
    assert isinstance(likelihood, Likelihood)
    assert likelihood.validate(shape) is None
    x = torch.rand((B, *shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert likelihood.log_prob(x).shape == (B,)
    assert likelihood.residual(x).shape[0] == B


class _LogProb:
    def log_prob(self, x):
        return x.new_zeros(x.shape[0])


class _Shapeless(_LogProb):
    """log_prob without event_shape: not a Prior."""


class _NoLogProb:
    """event_shape without log_prob: not a Prior."""

    event_shape = None


class _NoValidate(_LogProb):
    def residual(self, x):
        return x.flatten(1)


class _NoResidual(_LogProb):
    def validate(self, image_shape):
        pass


def test_objects_missing_a_member_are_not_priors_or_likelihoods():
    assert not isinstance(_Shapeless(), Prior) and not isinstance(_NoLogProb(), Prior)
    assert not isinstance(_NoValidate(), Likelihood) and isinstance(_NoResidual(), Likelihood)
    assert not isinstance(_gaussian(), Likelihood)


@pytest.mark.parametrize("bad_prior, bad_likelihood, name, missing", [
    (_Shapeless(), None, "prior", "event_shape"),
    (_NoLogProb(), None, "prior", "log_prob"),
    (object(), None, "prior", "event_shape, log_prob"),
    (None, _NoValidate(), "likelihood", "validate"),
])
def test_dpi_fit_names_the_argument_and_the_missing_member(bad_prior, bad_likelihood, name, missing):
    likelihood, _ = _likelihoods()["gaussian"]
    prior = _gaussian() if bad_prior is None else bad_prior
    likelihood = likelihood if bad_likelihood is None else bad_likelihood
    protocol = "Prior" if name == "prior" else "Likelihood"
    with pytest.raises(TypeError, match=rf"^{name}: expected a scoreprior\.protocols\.{protocol} with .*, got "
                                        rf"\w+ without {missing}$"):
        DPI(SHAPE, n_flows=1).fit(prior, likelihood, FitConfig(steps=1), progress=False)


def test_dps_names_the_missing_member_of_its_likelihood():
    gaussian, sde = _gaussian(), VPSDE()
    score = GaussianScore(gaussian.mean, gaussian.cov, sde)
    with pytest.raises(TypeError, match=r"^likelihood: expected a scoreprior\.protocols\.Likelihood .* without "
                                        r"validate$"):
        dps(score, sde, _NoValidate(), 2, SHAPE, steps=1, run=Run(progress=False))
    with pytest.raises(TypeError, match=r"^likelihood: dps .* needs residual\(x\), got _NoResidual without residual$"):
        dps(score, sde, _NoResidual(), 2, SHAPE, steps=1, run=Run(progress=False))
