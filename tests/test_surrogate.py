import math

import pytest
import torch
from torch import nn
from torchdiffeq import odeint

from scoreprior.data import gaussian_field, sample_gaussian
from scoreprior.scores import GaussianScore
from scoreprior.surrogate import SurrogatePrior

from conftest import SDES, random_spd

T0 = 1e-3


def _field(sde, height=8, width=8, *, n=4, seed=0):
    """Exact score of an anisotropic Gaussian random field (full covariance) and n samples of it."""
    mean, cov = gaussian_field(height, width, length_scale=(2.0, 4.0), scale=0.3)
    model = GaussianScore(mean, cov, sde)
    return model, sample_gaussian(mean, cov, n, generator=torch.Generator().manual_seed(seed))


def _runs(prior, x, repeats, *, seed=0):
    """Independent estimates (repeats, B), their mean and its standard error."""
    runs = torch.stack([prior.log_prob(x, generator=torch.Generator().manual_seed(seed + k)) for k in range(repeats)])
    return runs, runs.mean(0), runs.std(0) / math.sqrt(repeats)


def _ends(sde, t0):
    return sde.marginal(torch.tensor([t0], dtype=torch.float64))


def _bound_of_exact_score(model, sde, x, t0):
    """d log a0 + E_u log p_{t0}(a0 x + s0 u) = d log a0 + log p_{t0}(a0 x) - s0^2 tr(Sigma_{t0}^{-1}) / 2."""
    a0, s0 = _ends(sde, t0)
    trace = (1.0 / (a0**2 * model.eigvals + s0**2)).sum()
    return x[0].numel() * a0.log() + model.log_prob_t(a0 * x, t0) - 0.5 * s0**2 * trace


def _decoded_gaussian(mean, var_diag, eigvecs, x):
    """log N(x; eigvecs mean, eigvecs diag(var_diag) eigvecs^T), through a dense covariance."""
    cov = eigvecs @ torch.diag(var_diag) @ eigvecs.T
    dist = torch.distributions.MultivariateNormal(eigvecs @ mean, covariance_matrix=0.5 * (cov + cov.T))
    return dist.log_prob(x.reshape(x.shape[0], -1))


def _decoding_gap(model, sde, x, t0):
    """KL(N(a0 x, s0^2 I) || p(x_{t0} | x)) per eigen-direction: the bound's gap for the exact score."""
    a0, s0 = _ends(sde, t0)
    v0 = a0**2 * model.eigvals + s0**2
    v1 = v0 + s0**2
    r = (x.reshape(x.shape[0], -1) - model.mean.reshape(1, -1)) @ model.eigvecs
    return (0.5 * a0**2 * r**2 * s0**2 / (v0 * v1) - 0.5 * torch.log1p(s0**2 / v0) + 0.5 * s0**2 / v0).sum(1)


def _reverse_sde_decoded_log_prob(model, sde, gamma, x, t0):
    """Exact log phat(x) of the reverse-SDE model with score gamma * (exact score), pi = N(0, I).

    The score is linear and diagonal in the covariance's eigenbasis, so the reverse SDE keeps a Gaussian
    law: its mean m and variances P obey dm/dt = c m + gamma g^2 (m - a mu) / v, dP/dt = 2 (c + gamma g^2 / v) P - g^2,
    integrated from T down to t0 by torchdiffeq; phat = N(m / a0, (P + s0^2) / a0^2).
    """
    lam, mu = model.eigvals, model.eigvecs.T @ model.mean.reshape(-1)

    def rhs(t, state):
        m, p = state
        t = t.reshape(1)
        a, s = sde.marginal(t)
        c, g2 = sde.drift_coeff(t), sde.diffusion(t) ** 2
        v = a * a * lam + s * s
        return c * m + gamma * g2 * (m - a * mu) / v, 2 * (c + gamma * g2 / v) * p - g2

    times = torch.tensor([sde.T, t0], dtype=torch.float64)
    start = (torch.zeros_like(lam), torch.full_like(lam, sde.prior_std() ** 2))
    ms, ps = odeint(rhs, start, times, rtol=1e-10, atol=1e-10)
    a0, s0 = _ends(sde, t0)
    return _decoded_gaussian(ms[-1] / a0, (ps[-1] + s0**2) / a0**2, model.eigvecs, x)


@pytest.mark.parametrize("name, n_noise", [("vp", 1), ("subvp", 2), ("ve", 1)])
def test_exact_score_matches_closed_form(name, n_noise):
    """Exact score and pi = p_T: the mean is d log a0 + E_u log p_{t0}(a0 x + s0 u), within its SE."""
    sde = SDES[name]
    model, x = _field(sde)
    prior = SurrogatePrior(model, sde, t0=T0, n_time_samples=1024, n_noise_samples=n_noise,
                           terminal_log_prob=lambda z: model.log_prob_t(z, sde.T))
    _, mean, se = _runs(prior, x, 16)
    assert mean.dtype == torch.float64 and mean.shape == (4,)
    assert (se > 0).all()
    assert ((mean - _bound_of_exact_score(model, sde, x, T0)).abs() < 4 * se).all()


def test_bound_on_decoded_density_and_its_gap():
    """L(x) = log phat(x) - J(x), phat = N(mu, C + 2 s0^2 / a0^2 I); t0 = 0.02 makes J several nats."""
    sde, t0 = SDES["vp"], 0.02
    model, x = _field(sde)
    a0, s0 = _ends(sde, t0)
    log_phat = _decoded_gaussian(
        model.eigvecs.T @ model.mean.reshape(-1), model.eigvals + 2 * (s0 / a0) ** 2, model.eigvecs, x
    )
    gap = _decoding_gap(model, sde, x, t0)
    prior = SurrogatePrior(model, sde, t0=t0, n_time_samples=1024,
                           terminal_log_prob=lambda z: model.log_prob_t(z, sde.T))
    _, mean, se = _runs(prior, x, 16)
    assert (gap > 2.0).all()
    assert (mean < log_phat - gap + 4 * se).all()
    assert ((mean - (log_phat - gap)).abs() < 4 * se).all()


def test_mse_with_10000_time_samples():
    """Feng & Bouman report MSE < 1.1 on 8x8 images; against log p_{t0} (ScorePrior's target) here ~0.27."""
    sde = SDES["vp"]
    model, x = _field(sde, n=8)
    prior = SurrogatePrior(model, sde, t0=T0, n_time_samples=10_000)
    runs, _, _ = _runs(prior, x, 4)
    mse = (runs - model.log_prob_t(x, T0)).pow(2).mean().item()
    assert mse < 1.1


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_bound_stays_below_the_model_density(gamma):
    """Score gamma * (exact score), pi = N(0, I): L <= log phat of that reverse-SDE model.

    gamma = 1 leaves only the decoding gap and the small terminal mismatch; gamma = 0.5 is a wrong score
    and the gap is tens of nats.
    """
    sde = SDES["vp"]
    model, x = _field(sde)
    prior = SurrogatePrior(lambda y, t: gamma * model(y, t), sde, t0=T0, n_time_samples=2048, event_shape=(1, 8, 8))
    _, mean, se = _runs(prior, x, 8)
    exact = _reverse_sde_decoded_log_prob(model, sde, gamma, x, T0)
    assert (mean < exact + 4 * se).all()
    if gamma == 1.0:
        assert ((exact - mean - _decoding_gap(model, sde, x, T0)).abs() < 4 * se + 0.05).all()
    else:
        assert (exact - mean > 10.0).all()


def test_importance_sampling_same_mean_lower_variance():
    """With stratified times the proposal g^2 / s^2 cuts the variance ~15x on this field."""
    sde = SDES["vp"]
    model, x = _field(sde, n=2)
    stats = {}
    for importance in (True, False):
        prior = SurrogatePrior(model, sde, t0=T0, n_time_samples=256, importance_sampling=importance)
        stats[importance] = _runs(prior, x, 32)
    (runs_is, mean_is, se_is), (runs_u, mean_u, se_u) = stats[True], stats[False]
    assert ((mean_is - mean_u).abs() < 4 * (se_is**2 + se_u**2).sqrt()).all()
    assert (runs_is.var(0) < runs_u.var(0) / 4).all()


def test_gradient_converges_to_the_closed_form():
    """d/dx of the exact-score bound is a0 * score_{t0}(a0 x); 1024 times give cosine > 0.99."""
    sde = SDES["vp"]
    model, x = _field(sde)
    a0, _ = _ends(sde, T0)
    prior = SurrogatePrior(model, sde, t0=T0, n_time_samples=1024)
    xg = x.clone().requires_grad_()
    prior.log_prob(xg, generator=torch.Generator().manual_seed(0)).sum().backward()
    assert torch.isfinite(xg.grad).all()
    cosine = nn.functional.cosine_similarity(xg.grad.flatten(1), (a0 * model(a0 * x, T0)).flatten(1))
    assert cosine.min().item() > 0.99


def test_gradcheck_for_fixed_draws():
    model = GaussianScore(torch.zeros(3, dtype=torch.float64), random_spd(3, 0), SDES["vp"])
    prior = SurrogatePrior(model, SDES["vp"], n_time_samples=3, n_noise_samples=2)
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(lambda y: prior.log_prob(y, generator=torch.Generator().manual_seed(1)), (x,))


class _Linear(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(-1.0, dtype=dtype))

    def forward(self, x, t):
        return self.w * x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("importance", [True, False])
def test_dtypes_gradients_and_reproducibility(dtype, importance):
    score = _Linear(dtype)
    prior = SurrogatePrior(score, SDES["vp"], n_time_samples=4, importance_sampling=importance)
    x = torch.randn(3, 1, 4, 4, dtype=dtype, generator=torch.Generator().manual_seed(0), requires_grad=True)
    logp = prior.log_prob(x, generator=torch.Generator().manual_seed(1))
    assert logp.dtype == dtype and logp.shape == (3,)
    logp.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(score.w.grad)
    again = prior.log_prob(x, generator=torch.Generator().manual_seed(1))
    other = prior.log_prob(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(logp, again)
    assert not torch.equal(logp, other)
    with torch.no_grad():
        assert not prior.log_prob(x).requires_grad


def test_float32_matches_closed_form():
    sde = SDES["vp"]
    model, x = _field(sde, n=2)
    prior = SurrogatePrior(model, sde, t0=T0, n_time_samples=1024,
                           terminal_log_prob=lambda z: model.log_prob_t(z, sde.T))
    _, mean, se = _runs(prior, x.float(), 16)
    assert mean.dtype == torch.float32
    assert ((mean.double() - _bound_of_exact_score(model, sde, x, T0)).abs() < 4 * se.double() + 1e-3).all()


def test_bad_input():
    sde = SDES["vp"]
    model, x = _field(sde, 4, 4, n=2)
    prior = SurrogatePrior(model, sde)
    cases = [
        (lambda: prior.log_prob(x[:, :, :3]), "x"),
        (lambda: prior.log_prob(torch.full_like(x, float("nan"))), "x"),
        (lambda: prior.log_prob(x[:0]), "x"),
        (lambda: SurrogatePrior(model, sde, t0=0.0), "t0"),
        (lambda: SurrogatePrior(model, sde, t0=1.5), "t0"),
        (lambda: SurrogatePrior(model, sde, n_time_samples=0), "n_time_samples"),
        (lambda: SurrogatePrior(model, sde, n_time_samples=2.0), "n_time_samples"),
        (lambda: SurrogatePrior(model, sde, n_noise_samples=True), "n_noise_samples"),
        (lambda: SurrogatePrior(model, sde, importance_sampling="yes"), "importance_sampling"),
        (lambda: SurrogatePrior(lambda y, t: y[:, 0], sde).log_prob(x), "score"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()
    with pytest.raises(TypeError, match="score"):
        SurrogatePrior("not a score", sde)
    with pytest.raises(TypeError, match="terminal_log_prob"):
        SurrogatePrior(model, sde, terminal_log_prob=1.0)


def test_smoothing_is_the_closed_form_noise_of_phat():
    """VP: a(t)^2 = exp(-B), s(t)^2 = 1 - exp(-B), B = beta_min t + (beta_max - beta_min) t^2 / 2, so
    2 s^2 / a^2 = 2 (exp(B) - 1); at t0 = 1e-3 and (0.1, 20): 2.2e-4, the 0.0148 per-pixel std of the demo."""
    sde = SDES["vp"]  # beta 0.1 to 20
    prior = SurrogatePrior(lambda x, t: -x, sde, t0=1e-3)
    big_b = 0.1 * 1e-3 + 19.9 * 1e-6 / 2
    assert prior.smoothing == pytest.approx(2 * math.expm1(big_b), rel=1e-9)
    assert prior.smoothing ** 0.5 == pytest.approx(0.0148, abs=1e-4)
