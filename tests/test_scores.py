import pytest
import torch
from torch.distributions import MultivariateNormal

from scoreprior.scores import GaussianMixtureScore, GaussianScore

from conftest import SDES, random_spd


@pytest.mark.parametrize("name", list(SDES))
def test_gaussian_log_prob_matches_torch_distributions(name):
    sde = SDES[name]
    d = 12
    cov = random_spd(d, 0)
    mean = torch.linspace(-1, 1, d, dtype=torch.float64).reshape(3, 4)
    model = GaussianScore(mean, cov, sde)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    for t in (0.0, 0.2, 1.0):
        a, s = sde.marginal(torch.tensor([t], dtype=torch.float64))
        ref = MultivariateNormal(a * mean.flatten(), a**2 * cov + s**2 * torch.eye(d, dtype=torch.float64))
        torch.testing.assert_close(model.log_prob_t(x, t), ref.log_prob(x.reshape(5, d)))


@pytest.mark.parametrize("name", list(SDES))
def test_scores_are_gradients_of_the_log_density(name):
    sde = SDES[name]
    d = 6
    gauss = GaussianScore(torch.zeros(d, dtype=torch.float64), random_spd(d, 1), sde)
    mixture = GaussianMixtureScore(
        torch.tensor([0.3, 0.7]),
        torch.stack([torch.full((d,), -1.0), torch.full((d,), 1.0)]).double(),
        torch.stack([random_spd(d, 2), random_spd(d, 3)]),
        sde,
    )
    t = torch.tensor([0.01, 0.3, 0.9, 0.5], dtype=torch.float64)
    for model in (gauss, mixture):
        x = torch.randn(4, d, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(model.log_prob_t(x, t).sum(), x)
        torch.testing.assert_close(model(x, t), grad)


def test_mixture_log_prob_is_the_weighted_sum():
    sde = SDES["vp"]
    d = 4
    covs = torch.stack([random_spd(d, 4), random_spd(d, 5)])
    means = torch.stack([torch.zeros(d), torch.ones(d)]).double()
    mix = GaussianMixtureScore(torch.tensor([2.0, 6.0]), means, covs, sde)
    x = torch.randn(3, d, dtype=torch.float64)
    t = 0.4
    dens = sum(
        w * GaussianScore(m, c, sde).log_prob_t(x, t).exp() for w, m, c in zip((0.25, 0.75), means, covs)
    )
    torch.testing.assert_close(mix.log_prob_t(x, t), dens.log())


def test_float32_input_gives_float32_output():
    model = GaussianScore(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64), SDES["vp"])
    x = torch.randn(2, 3)
    assert model(x, 0.5).dtype == torch.float32
    assert model.log_prob_t(x, 0.5).dtype == torch.float32


def test_bad_arguments():
    sde = SDES["vp"]
    with pytest.raises(ValueError, match="cov: expected shape"):
        GaussianScore(torch.zeros(4), torch.eye(3), sde)
    with pytest.raises(ValueError, match="symmetric"):
        GaussianScore(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]), sde)
    with pytest.raises(ValueError, match="positive semi-definite"):
        GaussianScore(torch.zeros(2), torch.tensor([[1.0, 0.0], [0.0, -1.0]]), sde)
    model = GaussianScore(torch.zeros(2, 2), torch.eye(4), sde)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 2, 2\)"):
        model(torch.zeros(3, 4), 0.5)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixtureScore(torch.tensor([1.0, -1.0]), torch.zeros(2, 2), torch.stack([torch.eye(2)] * 2), sde)
