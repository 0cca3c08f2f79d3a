"""The exact-density correction of a flow, against closed-form Gaussian posteriors."""

import math
import warnings

import pytest
import torch

from scoreprior import DPI, FitConfig, GaussianLikelihood, GaussianPrior, GaussianScore, ODEOptions, ScorePrior, VPSDE
from scoreprior.correction import MIN_LINEAGES, SMCConfig, correct_posterior
from scoreprior.data import gaussian_field
from scoreprior.operators import GaussianBlur
from scoreprior.priors import gaussian_posterior


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _problem(size=4, sigma=0.05):
    """A Gaussian prior on (1, size, size) images, blur + noise, and the exact posterior N(m, S)."""
    mean, cov = gaussian_field(size, size, length_scale=(1.5, 3.0), scale=0.3)
    prior = GaussianPrior(mean, cov)
    operator = GaussianBlur(1.0)
    truth = prior.sample(1, generator=_gen(0))
    y = GaussianLikelihood(operator, operator.A(truth), sigma).sample(truth, generator=_gen(1))
    likelihood = GaussianLikelihood(operator, y, sigma)
    post_mean, post_cov = gaussian_posterior(prior, likelihood)
    return prior, likelihood, post_mean, post_cov


def _flow_at(mean, cov, scale):
    """A DPI whose q is exactly N(mean, scale^2 cov) (an untrained flow on that reference)."""
    return DPI(tuple(mean.shape), n_flows=2, hidden=8, seed=0, dtype=torch.float64,
               reference=GaussianPrior(mean, scale**2 * cov))


def test_smc_restores_a_shrunk_flow_to_the_exact_posterior():
    """q has 0.6x the posterior's std (log w spread over many nats, PSIS fails): SMC's draws have the exact
    posterior's std within 15 % and its mean within 4 Monte Carlo errors, and estimate the evidence."""
    prior, likelihood, post_mean, post_cov = _problem()
    flow = _flow_at(post_mean, post_cov, 0.6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = correct_posterior(flow, prior, likelihood, SMCConfig(particles=512, moves=3, final_moves=5),
                                   generator=_gen(2))
    assert not result.check.reliable and result.method == "smc" and result.converged
    x = result.samples.reshape(512, -1)
    std = post_cov.diagonal().sqrt()
    ratio = (x.std(0) / std).median()
    assert abs(ratio - 1) < 0.15
    z = (x.mean(0) - post_mean.reshape(-1)) / (std / math.sqrt(result.ess))
    assert z.abs().max() < 4.5
    assert result.unique > 256 and 0 < result.lineages <= result.unique
    assert result.trusted
    assert f"from {result.lineages} of q's draws" in result.summary()
    # log p(y) of the linear-Gaussian model: N(y; A m0, A C A^T + sigma^2 I)
    a = torch.stack([likelihood.operator.A(e.reshape(1, 1, 4, 4)).reshape(-1) for e in torch.eye(16, dtype=torch.float64)], 1)
    evidence_cov = a @ prior.cov @ a.T + 0.05**2 * torch.eye(a.shape[0], dtype=torch.float64)
    marginal = torch.distributions.MultivariateNormal(a @ prior.mean.reshape(-1), evidence_cov)
    assert abs(result.log_evidence - float(marginal.log_prob(likelihood.y.reshape(-1)))) < 1.0  # MC spread 0.25


def test_an_exact_flow_needs_only_importance_resampling():
    prior, likelihood, post_mean, post_cov = _problem()
    result = correct_posterior(_flow_at(post_mean, post_cov, 1.0), prior, likelihood, SMCConfig(particles=128),
                               generator=_gen(3))
    assert result.check.reliable and result.method == "importance"
    assert result.ess > 120 and not result.stages
    assert "importance resampling" in result.summary()


def test_smc_whose_moves_stay_put_is_not_trusted():
    """A flow 0.2x too narrow and moves of a step of 1e-12, which leave resampled copies where they are: the
    particles descend from few of q's draws, which the correction says instead of passing their too-narrow
    spread as the posterior's."""
    prior, likelihood, post_mean, post_cov = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = correct_posterior(_flow_at(post_mean, post_cov, 0.2), prior, likelihood,
                                   SMCConfig(particles=128, ess_fraction=0.7, moves=1, final_moves=1, step=1e-12), generator=_gen(2))
    assert result.converged and result.lineages < MIN_LINEAGES * 128 and not result.trusted
    assert f"ONLY {result.lineages} of q's draws survive" in result.summary()
    assert result.to_dict()["trusted"] is False


def test_smc_can_be_switched_off_and_a_stage_limit_is_reported():
    prior, likelihood, post_mean, post_cov = _problem()
    flow = _flow_at(post_mean, post_cov, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        off = correct_posterior(flow, prior, likelihood, SMCConfig(particles=64, smc=False), generator=_gen(4))
        capped = correct_posterior(flow, prior, likelihood, SMCConfig(particles=64, max_stages=1), generator=_gen(4))
    assert off.method == "importance" and not off.check.reliable
    assert capped.method == "smc" and not capped.converged and "NOT converged" in capped.summary()


def test_options_are_checked():
    with pytest.raises(ValueError, match="particles"):
        SMCConfig(particles=10)
    with pytest.raises(ValueError, match="ess_fraction"):
        SMCConfig(ess_fraction=1.5)
    prior, likelihood, post_mean, post_cov = _problem()
    with pytest.raises(TypeError, match="flow"):
        correct_posterior(object(), prior, likelihood)


def test_exact_stage_reaches_the_gaussian_posterior_through_the_ode_density():
    """DPI fitted against a ScorePrior (the Gaussian-base solver, backpropagated) from a shrunk reference on the
    8 x 8 Gaussian problem: the flow's std and mean reach the exact posterior's."""
    mean, cov = gaussian_field(8, 8, length_scale=(1.5, 3.0), scale=0.3)
    sde = VPSDE()
    score = GaussianScore(mean, cov, sde)
    t0 = 1e-3
    exact_prior = GaussianPrior(mean, cov + (sde.marginal(torch.tensor([t0]))[1] ** 2).item() * torch.eye(64, dtype=torch.float64))
    prior = ScorePrior(score, sde, t0=t0, terminal_log_prob=lambda z: score.log_prob_t(z, sde.T), gaussian_base=GaussianPrior(mean, cov))
    operator = GaussianBlur(1.0)
    truth = exact_prior.sample(1, generator=_gen(5))
    y = GaussianLikelihood(operator, operator.A(truth), 0.05).sample(truth, generator=_gen(6))
    likelihood = GaussianLikelihood(operator, y, 0.05)
    post_mean, post_cov = gaussian_posterior(exact_prior, likelihood)
    flow = _flow_at(post_mean, post_cov, 0.7)
    flow.fit(prior, likelihood, FitConfig(steps=300, batch_size=32, lr=1e-2, warmup=30),
             prior_kwargs={"options": ODEOptions(solver="gaussian", steps=1, divergence="hutchinson", n_probes=1)}, progress=False)
    m, s = flow.posterior_stats(n=4096, generator=_gen(7))
    std = post_cov.diagonal().sqrt().reshape(m.shape)
    assert ((s / std).median() - 1).abs() < 0.1
    assert ((m - post_mean) / std).square().mean().sqrt() < 0.15
