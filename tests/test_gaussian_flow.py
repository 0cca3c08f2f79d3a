"""The Gaussian-base solver against closed forms: Gaussian and Gaussian-mixture data, whose exact scores give
log p_t0 in closed form (with the exact marginal as the terminal density)."""

import math

import pytest
import torch

from scoreprior import GaussianPrior, ODEOptions, ScorePrior
from scoreprior.data import sample_gaussian
from scoreprior.gaussian_flow import tau_grid
from scoreprior.scores import GaussianMixtureScore, GaussianScore

from conftest import SDES, random_spd

T0 = 1e-3


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mixture(sde, d=16):
    """A two-component mixture on (1, 4, 4) images, its exact-score prior on the mixture's fitted Gaussian, and
    4 draws."""
    means = torch.stack([torch.full((d,), -0.5), torch.full((d,), 0.6)]).double()
    covs = torch.stack([random_spd(d, 1), 0.5 * random_spd(d, 2)])
    model = GaussianMixtureScore(torch.tensor([0.3, 0.7]), means.reshape(2, 1, 4, 4), covs, sde)
    draws = torch.cat([sample_gaussian(m, c, 200, generator=_gen(k)) for k, (m, c) in enumerate(zip(means, covs))])
    base = GaussianPrior.fit(draws.reshape(-1, 1, 4, 4), floor=1e-3)
    prior = ScorePrior(model, sde, t0=T0, terminal_log_prob=lambda z: model.log_prob_t(z, sde.T), gaussian_base=base)
    x = torch.cat([draws[:2], draws[200:202]]).reshape(4, 1, 4, 4)
    return model, prior, x


@pytest.mark.parametrize("name", list(SDES))
def test_gaussian_data_are_exact_at_one_step(name):
    """r = 0 for the base's own data: z stays constant and log p is the closed form at any number of steps."""
    sde = SDES[name]
    cov = random_spd(16, 3)
    mean = torch.linspace(-0.3, 0.4, 16, dtype=torch.float64).reshape(1, 4, 4)
    model = GaussianScore(mean, cov, sde)
    prior = ScorePrior(model, sde, t0=T0, terminal_log_prob=lambda z: model.log_prob_t(z, sde.T),
                       gaussian_base=GaussianPrior(mean, cov))
    x = sample_gaussian(mean, cov, 3, generator=_gen(4))
    for divergence in ("exact", "hutchinson"):
        logp, stats = prior.log_prob(x, ODEOptions(solver="gaussian", steps=1, divergence=divergence, n_probes=2),
                                     generator=_gen(5), return_stats=True)
        assert stats["solver"] == "gaussian" and stats["nfe"] == 4
        torch.testing.assert_close(logp, model.log_prob_t(x, T0), rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", list(SDES))
def test_mixture_converges_to_the_closed_form(name):
    """A non-Gaussian density: fourth order, the error 100x smaller for 4x the steps, below 5e-3 nats at 32."""
    model, prior, x = _mixture(SDES[name])
    truth = model.log_prob_t(x, T0)
    errors = [(prior.log_prob(x, ODEOptions(solver="gaussian", steps=steps, divergence="exact")) - truth).abs().max().item()
              for steps in (8, 32)]
    assert errors[1] < 5e-3
    assert errors[1] < errors[0] / 100


def test_gradient_matches_the_closed_form_and_gradcheck():
    model, prior, x = _mixture(SDES["vp"])
    xg = x.clone().requires_grad_()
    prior.log_prob(xg, ODEOptions(solver="gaussian", steps=16, divergence="exact")).sum().backward()
    xt = x.clone().requires_grad_()
    (truth,) = torch.autograd.grad(model.log_prob_t(xt, T0).sum(), xt)
    torch.testing.assert_close(xg.grad, truth, rtol=0, atol=2e-3 * truth.abs().max().item())
    options = ODEOptions(solver="gaussian", steps=2, divergence="exact")
    assert torch.autograd.gradcheck(lambda z: prior.log_prob(z, options), (x[:2].clone().requires_grad_(),))


def test_hutchinson_is_unbiased_and_its_reported_error_is_its_spread():
    model, prior, x = _mixture(SDES["vp"])
    options = ODEOptions(solver="gaussian", steps=4, divergence="hutchinson", n_probes=4, probe="colored")
    exact = prior.log_prob(x, options.replace(divergence="exact"))
    runs = []
    for seed in range(24):
        logp, stats = prior.log_prob(x, options, generator=_gen(seed), return_stats=True)
        runs.append(logp)
        assert stats["log_prob_se"] is None  # 4 coloured probes on (1, 4, 4) images are one set: no spread
    runs = torch.stack(runs)
    spread = runs.std(0)
    assert ((runs.mean(0) - exact).abs() < 4 * spread / math.sqrt(24) + 1e-6).all()
    options = options.replace(n_probes=8)
    # 64 runs: the RMS of 64 two-set standard errors and the spread of 64 values are each within about 9 %
    runs, stats = zip(*(prior.log_prob(x, options, generator=_gen(100 + s), return_stats=True) for s in range(64)))
    spread = torch.stack(runs).std(0)
    reported = torch.stack([entry["log_prob_se"] for entry in stats]).square().mean(0).sqrt()
    assert ((reported / spread) - 1).abs().max() < 0.5


def test_solver_choice_follows_the_base_and_the_adjoint():
    """The default is the adaptive reference; "auto" takes the Gaussian base where there is one and no adjoint."""
    model, prior, x = _mixture(SDES["vp"])
    _, stats = prior.log_prob(x, return_stats=True)
    assert stats["solver"] == "adaptive"
    _, stats = prior.log_prob(x, ODEOptions(solver="auto"), return_stats=True)
    assert stats["solver"] == "gaussian"
    _, stats = prior.log_prob(x, ODEOptions(solver="auto", adjoint=True), return_stats=True)
    assert stats["solver"] == "adaptive"
    bare = ScorePrior(model, SDES["vp"], t0=T0)
    _, stats = bare.log_prob(x, ODEOptions(solver="auto"), return_stats=True)
    assert stats["solver"] == "adaptive"
    with pytest.raises(ValueError, match="needs a prior with a Gaussian base"):
        bare.log_prob(x, ODEOptions(solver="gaussian"))
    with pytest.raises(ValueError, match="adjoint"):
        ODEOptions(solver="gaussian", adjoint=True)


def test_grid_is_graded_toward_t0_and_ends_at_the_interval():
    sde = SDES["vp"]
    taus = tau_grid(sde, T0, 6)
    ends = sde.log_noise_ratio(torch.tensor([T0, sde.T], dtype=torch.float64))
    torch.testing.assert_close(taus[[0, -1]], ends)
    widths = taus.diff()
    assert (widths.diff() > 0).all()
