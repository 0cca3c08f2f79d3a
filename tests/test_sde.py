import math

import pytest
import torch

import scoreprior
from scoreprior.sde import SDE, sde_from_config

from conftest import SDES


def _grad_t(fn, t):
    return torch.func.vmap(torch.func.grad(lambda u: fn(u[None])[0]))(t)


@pytest.mark.parametrize("name", list(SDES))
def test_marginal_solves_the_moment_odes(name):
    """For dx = c x dt + g dw: da/dt = c a and d(s^2)/dt = 2 c s^2 + g^2."""
    sde = SDES[name]
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    c, g = sde.drift_coeff(t), sde.diffusion(t)
    a, s = sde.marginal(t)
    torch.testing.assert_close(_grad_t(lambda u: sde.marginal(u)[0], t), c * a)
    torch.testing.assert_close(_grad_t(lambda u: sde.marginal(u)[1] ** 2, t), 2 * c * s**2 + g**2)


@pytest.mark.parametrize("name", list(SDES))
def test_marginal_starts_at_the_data(name):
    a, s = SDES[name].marginal(torch.zeros(1, dtype=torch.float64))
    assert a.item() == 1.0 and s.item() == 0.0


def test_vp_values():
    sde = scoreprior.VPSDE(beta_min=0.1, beta_max=20.0)
    t = torch.tensor([0.5], dtype=torch.float64)
    a, s = sde.marginal(t)
    log_a = -0.25 * 0.25 * 19.9 - 0.5 * 0.5 * 0.1
    assert a.item() == pytest.approx(math.exp(log_a), rel=1e-12)
    assert s.item() ** 2 + a.item() ** 2 == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("name", list(SDES))
def test_prior_log_prob_is_the_normal_density(name):
    sde = SDES[name]
    z = sde.prior_sample((5, 2, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = torch.distributions.Normal(0.0, sde.prior_std()).log_prob(z).sum((1, 2))
    torch.testing.assert_close(sde.prior_log_prob(z), ref)


@pytest.mark.parametrize("name", list(SDES))
def test_perturb_has_the_marginal_moments(name):
    sde = SDES[name]
    g = torch.Generator().manual_seed(1)
    n = 200_000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    t = torch.full((n,), 0.3, dtype=torch.float64)
    xt = sde.perturb(x0, t, torch.randn(n, 1, generator=g, dtype=torch.float64))
    a, s = sde.marginal(t[:1])
    se = s.item() / math.sqrt(n)
    assert abs(xt.mean().item() - 0.7 * a.item()) < 4 * se
    assert xt.std().item() == pytest.approx(s.item(), rel=0.01)


@pytest.mark.parametrize("name", list(SDES))
def test_config_round_trip(name):
    sde = SDES[name]
    rebuilt = sde_from_config(sde.config())
    t = torch.rand(7, dtype=torch.float64)
    for u, v in zip(sde.marginal(t), rebuilt.marginal(t)):
        torch.testing.assert_close(u, v)


def test_bad_arguments():
    with pytest.raises(ValueError, match="beta_min"):
        scoreprior.VPSDE(beta_min=-1.0)
    with pytest.raises(ValueError, match="sigma_min"):
        scoreprior.VESDE(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="kind"):
        sde_from_config({"kind": "nope"})
    with pytest.raises(ValueError, match="t: expected"):
        scoreprior.VPSDE().drift(torch.zeros(3, 2), torch.zeros(2))


@pytest.mark.parametrize("name", list(SDES))
def test_time_at_log_noise_ratio_inverts_it(name):
    """The closed-form inverse of tau(t) = log(s/a), and the base class's bisection, recover t."""
    sde = SDES[name]
    t = torch.tensor([1e-5, 1e-3, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    tau = sde.log_noise_ratio(t)
    assert (tau.diff() > 0).all()
    torch.testing.assert_close(sde.time_at_log_noise_ratio(tau), t, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(SDE.time_at_log_noise_ratio(sde, tau), t, rtol=1e-10, atol=1e-14)
    assert sde.time_at_log_noise_ratio(tau.float()).dtype == torch.float32


def test_log_noise_ratio_rate_is_g2_over_2s2():
    """d tau / dt = g^2 / (2 s^2) for linear-drift SDEs, by central differences."""
    for sde in SDES.values():
        t = torch.tensor([0.01, 0.3, 0.8], dtype=torch.float64)
        h = 1e-6
        rate = (sde.log_noise_ratio(t + h) - sde.log_noise_ratio(t - h)) / (2 * h)
        torch.testing.assert_close(rate, sde.diffusion(t) ** 2 / (2 * sde.marginal(t)[1] ** 2), rtol=1e-6, atol=0)


def test_times_uniform_in_log_noise_ratio_invert_the_linear_cdf(sde):
    u = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    t, span = sde.times_uniform_in_log_noise_ratio(u, 1e-3)
    ends = sde.log_noise_ratio(torch.tensor([1e-3, sde.T], dtype=torch.float64))
    torch.testing.assert_close(span, ends[1] - ends[0])
    torch.testing.assert_close(sde.log_noise_ratio(t), ends[0] + u * span, rtol=1e-9, atol=1e-9)
    assert t.dtype == u.dtype and abs(float(t[0]) - 1e-3) < 1e-9 and abs(float(t[-1]) - sde.T) < 1e-9
    t32, _ = sde.times_uniform_in_log_noise_ratio(u.float(), 1e-3)
    assert t32.dtype == torch.float32
