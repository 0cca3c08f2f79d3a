"""Tests for scoreprior/samplers.py against closed-form Gaussian priors and posteriors.

With a Gaussian prior and the exact GaussianScore, the prior and (for linear-Gaussian measurements) the
posterior are known exactly, so sample means can be compared with the truth in standard-error units.
"""

import math

import pytest
import torch

from conftest import random_spd
from scoreprior import GaussianLikelihood, GaussianPrior, GaussianScore, VPSDE, gaussian_posterior
from scoreprior.operators import Identity
from scoreprior.samplers import dps, sample_prior, score_ald

N = 4000
SHAPE = (1, 2, 3)
D = 6
SDE_ = VPSDE()


def _problem():
    cov = random_spd(D, 0) + 0.05 * torch.eye(D, dtype=torch.float64)
    mean = torch.linspace(-0.5, 0.5, D, dtype=torch.float64)
    return mean, cov


def _denoising_problem():
    """Gaussian prior on (1, 2, 3) images, y = x + b with σ_y = 0.1; returns score, likelihood, posterior."""
    mean, cov = _problem()
    mean = mean.reshape(SHAPE)
    prior = GaussianPrior(mean, cov)
    g = torch.Generator().manual_seed(1)
    x_true = prior.sample(1, generator=g)
    y = GaussianLikelihood(Identity(), x_true, 0.1).sample(x_true, generator=g)
    lik = GaussianLikelihood(Identity(), y, 0.1)
    post_mean, post_cov = gaussian_posterior(prior, lik)
    return GaussianScore(mean, cov, SDE_), lik, post_mean.reshape(-1), post_cov


def _report(name, x, mean, cov):
    """Largest |sample mean - mean| in standard errors, and per-dimension variance ratios (printed)."""
    xf = x.reshape(x.shape[0], -1)
    se = (cov.diagonal() / x.shape[0]).sqrt()
    z = ((xf.mean(0) - mean) / se).abs().max().item()
    ratio = torch.cov(xf.T).diagonal() / cov.diagonal()
    print(f"{name}: max |mean error| = {z:.2f} SE, variance ratio = {[round(r, 2) for r in ratio.tolist()]}")
    return z, ratio


@pytest.mark.parametrize("method", ["sde", "ode"])
def test_sample_prior_matches_gaussian(method):
    mean, cov = _problem()
    score = GaussianScore(mean, cov, SDE_)
    g = torch.Generator().manual_seed(0)
    x = sample_prior(score, SDE_, N, (D,), steps=200, method=method, generator=g, dtype=torch.float64,
                     progress=False)
    assert x.shape == (N, D)
    # p_t0 has covariance a^2 C + s^2 I with s(1e-3)^2 ~ 1e-4, negligible against C's smallest eigenvalue 0.05.
    z, ratio = _report(f"sample_prior[{method}]", x, mean, cov)
    assert z < 4.0  # max over 6 dims of |N(0,1)|: 4 SE has p < 4e-4
    # Sample variance has relative SE sqrt(2/N) = 0.022; allow 5 of them plus 2% Euler bias at 200 steps.
    assert (ratio - 1).abs().max() < 0.13
    sample_cov = torch.cov(x.T)
    assert torch.allclose(sample_cov, cov, atol=0.1 * cov.diagonal().max().item())


def test_score_ald_denoising_mean():
    score, lik, post_mean, post_cov = _denoising_problem()
    g = torch.Generator().manual_seed(2)
    x = score_ald(score, SDE_, lik, N, SHAPE, lr=1e-4, n_levels=50, steps_per_level=10, generator=g,
                  dtype=torch.float64, progress=False)
    assert x.shape == (N, *SHAPE)
    z, _ = _report("score_ald", x, post_mean, post_cov)
    # Unadjusted Langevin on a Gaussian target keeps the exact mean at stationarity (the update is affine
    # with fixed point the mean); the allowance of 1 SE covers incomplete mixing at the last level.
    assert z < 4.0


def test_dps_zero_weight_is_sample_prior():
    score, lik, _, _ = _denoising_problem()
    a = dps(score, SDE_, lik, 50, SHAPE, zeta=0.0, steps=20, generator=torch.Generator().manual_seed(3),
            dtype=torch.float64, progress=False)
    b = sample_prior(score, SDE_, 50, SHAPE, steps=20, generator=torch.Generator().manual_seed(3),
                     dtype=torch.float64, progress=False)
    torch.testing.assert_close(a, b)


def test_dps_moves_to_posterior():
    """DPS is an approximation (it drops Cov[x_0 | x_t] from p(y | x_t)): it is NOT exact even here.

    We check only that guidance pulls the sample mean from the prior mean (5.4 posterior std away) to within
    0.5 posterior std of the posterior mean (measured: 0.28), and print the bias.
    """
    score, lik, post_mean, post_cov = _denoising_problem()
    g = torch.Generator().manual_seed(4)
    x = dps(score, SDE_, lik, N, SHAPE, zeta=0.1, steps=200, generator=g, dtype=torch.float64, progress=False)
    _report("dps[zeta=0.1]", x, post_mean, post_cov)
    err = (x.reshape(N, -1).mean(0) - post_mean) / post_cov.diagonal().sqrt()
    assert err.abs().max() < 0.5


def test_reproducible_with_generator():
    score, lik, _, _ = _denoising_problem()
    for f in (lambda g: sample_prior(score, SDE_, 8, SHAPE, steps=10, generator=g, progress=False),
              lambda g: dps(score, SDE_, lik, 8, SHAPE, steps=10, generator=g, progress=False),
              lambda g: score_ald(score, SDE_, lik, 8, SHAPE, n_levels=5, steps_per_level=2, generator=g,
                                  progress=False)):
        torch.testing.assert_close(f(torch.Generator().manual_seed(5)), f(torch.Generator().manual_seed(5)))


def test_nan_score_raises_naming_step():
    _, lik, _, _ = _denoising_problem()

    def nan_score(x, t):
        return torch.full_like(x, math.nan)

    with pytest.raises(FloatingPointError, match=r"step 1/10.*method='sde'"):
        sample_prior(nan_score, SDE_, 4, SHAPE, steps=10, progress=False)
    with pytest.raises(FloatingPointError, match=r"step 1/10.*zeta=0.5"):
        dps(nan_score, SDE_, lik, 4, SHAPE, zeta=0.5, steps=10, progress=False)
    with pytest.raises(FloatingPointError, match=r"step 1/6.*lr="):
        score_ald(nan_score, SDE_, lik, 4, SHAPE, n_levels=3, steps_per_level=2, progress=False)


def test_bad_arguments():
    score, lik, _, _ = _denoising_problem()
    with pytest.raises(ValueError, match="method"):
        sample_prior(score, SDE_, 4, SHAPE, method="heun", progress=False)
    with pytest.raises(ValueError, match="zeta"):
        dps(score, SDE_, lik, 4, SHAPE, zeta=-1.0, progress=False)
    with pytest.raises(ValueError, match="t0"):
        score_ald(score, SDE_, lik, 4, SHAPE, t0=0.0, progress=False)
