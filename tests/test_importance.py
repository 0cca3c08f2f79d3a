"""Tests for scoreprior/importance.py: PSIS checks against exact Gaussian posteriors (closed form and
through the probability-flow ODE density), the Hutchinson noise against repeated evaluations, and the
weighted summaries against order statistics and the resampling bound |count - m w| < 1."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import random_spd
from scoreprior.density import ODEOptions, ScorePrior
from scoreprior.diagnostics import credible_interval
from scoreprior.importance import PosteriorCheck, check_options, check_posterior, importance_draws
from scoreprior.likelihood import GaussianLikelihood
from scoreprior.operators import GaussianBlur
from scoreprior.priors import GaussianPrior, gaussian_posterior
from scoreprior.scores import GaussianScore
from scoreprior.sde import VPSDE

pytest.importorskip("arviz_stats")

SHAPE = (1, 4, 4)
D = 16
T0 = 1e-3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _GaussianQ:
    """A fitted posterior stand-in: draws from N(mean, cov) with their exact log-density."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, with_log_q: bool = True):
        self.dist = GaussianPrior(mean, cov)
        self.with_log_q = with_log_q

    def sample(self, n, *, generator=None):
        x = self.dist.sample(n, generator=generator)
        return x, (self.dist.log_prob(x) if self.with_log_q else None)


class _Flat:
    def log_prob(self, x):
        return x.new_zeros(x.shape[0])


def _problem(prior: GaussianPrior):
    """A 4x4 deblurring problem with its truth drawn from `prior`; -> (likelihood, posterior mean, cov)."""
    op = GaussianBlur(1.0)
    ax = op.A(prior.sample(1, generator=_gen(1)))
    y = ax + 0.1 * torch.randn(ax.shape, generator=_gen(2), dtype=ax.dtype)
    likelihood = GaussianLikelihood(op, y, 0.1)
    return (likelihood, *gaussian_posterior(prior, likelihood))


@pytest.fixture(scope="module")
def gaussian():
    mean = torch.rand(SHAPE, generator=_gen(0), dtype=torch.float64)
    prior = GaussianPrior(mean, random_spd(D, 0))
    return (prior, *_problem(prior))


def _assert_moments(check: PosteriorCheck, mean: torch.Tensor, cov: torch.Tensor) -> None:
    """Corrected mean and std within 4 Monte-Carlo standard errors (ESS draws) per pixel."""
    sd = cov.diagonal().sqrt().reshape(SHAPE)
    assert ((check.mean - mean) / sd).abs().max() < 4 / math.sqrt(check.ess)
    assert (check.std / sd - 1).abs().max() < 4 / math.sqrt(2 * check.ess)


def test_exact_posterior_gives_equal_weights(gaussian):
    prior, likelihood, mean, cov = gaussian
    check = check_posterior(_GaussianQ(mean, cov), prior, likelihood, n=256, generator=_gen(3))
    assert check.khat < 0.5 and check.reliable
    assert check.ess > 0.999 * 256  # log w = log p(y) up to round-off
    assert torch.equal(check.log_prior_noise, torch.zeros(256, dtype=torch.float64))
    _assert_moments(check, mean, cov)
    assert check.verdict.startswith(f"k̂ = {check.khat:.2f} ± {check.khat_se:.2f} (< 0.58): reliable")


def test_broad_q_is_corrected_towards_the_posterior(gaussian):
    prior, likelihood, mean, cov = gaussian
    check = check_posterior(_GaussianQ(mean, 1.2 * cov), prior, likelihood, n=1024, generator=_gen(4))
    # Per pixel E_q[w^2] / E_q[w]^2 = 1.2 / sqrt(1.4) (up to correlations): ESS about 0.9 n, bounded weights.
    assert check.khat < 0.5 and check.reliable
    assert 0.7 * 1024 < check.ess < 0.99 * 1024
    _assert_moments(check, mean, cov)
    sd = cov.diagonal().sqrt().reshape(SHAPE)
    raw_std = check.samples.std(0) / sd  # about sqrt(1.2) = 1.095
    assert (check.std / sd - 1).abs().mean() < 0.5 * (raw_std - 1).abs().mean()
    assert check.log_weights.dtype == torch.float64
    assert torch.logsumexp(check.log_weights, 0).abs() < 1e-12


def test_score_prior_exact_density_matches_closed_form(gaussian):
    prior, _, _, _ = gaussian
    sde = VPSDE()
    score = GaussianScore(prior.mean, prior.cov, sde)
    score_prior = ScorePrior(score, sde, t0=T0, terminal_log_prob=lambda x: score.log_prob_t(x, 1.0))
    # The ODE gives the density of p_t0 = N(a0 m, a0^2 C + s0^2 I): the posterior is that prior's.
    a0, s0 = sde.marginal(torch.tensor(T0, dtype=torch.float64))
    prior_t0 = GaussianPrior(a0 * prior.mean, a0**2 * prior.cov + s0**2 * torch.eye(D, dtype=torch.float64))
    likelihood, mean, cov = _problem(prior_t0)
    x, log_q = _GaussianQ(mean, 1.2 * cov).sample(256, generator=_gen(5))
    kwargs = {"options": ODEOptions(divergence="exact", rtol=1e-6, atol=1e-6)}
    check = importance_draws(x, log_q, score_prior, likelihood, log_prob_kwargs=kwargs, batch_size=128)
    closed = importance_draws(x, log_q, prior_t0, likelihood)
    assert (check.raw_log_weights - closed.raw_log_weights).abs().max() < 1e-3
    assert check.khat < 0.5 and check.reliable
    assert torch.equal(check.log_prior_noise, torch.zeros(256, dtype=torch.float64))
    _assert_moments(check, mean, cov)


def test_shrunk_q_is_flagged(gaussian):
    prior, likelihood, mean, cov = gaussian
    with pytest.warns(UserWarning, match="do not trust"):
        check = check_posterior(_GaussianQ(mean, 0.25 * cov), prior, likelihood, n=1000, generator=_gen(6))
    # Weights p / q grow like exp(|x|^2 (1/0.25 - 1) / 2): Pareto tail shape k = 1 - 0.25 per direction.
    assert check.khat > 0.7 and not check.reliable
    assert check.khat_threshold == pytest.approx(1 - 1 / 3)
    assert "do not trust these error bars" in check.verdict
    summary = json.loads(json.dumps(check.to_dict(), allow_nan=False))
    assert not summary["reliable"] and summary["khat"] == pytest.approx(check.khat)
    # Unreliable, yet the weights still push the too-narrow std towards the posterior's.
    sd = cov.diagonal().sqrt().reshape(SHAPE)
    assert (check.std / sd - 1).abs().mean() < (check.samples.std(0) / sd - 1).abs().mean()


def test_far_off_q_is_flagged_when_the_pareto_fit_overflows(gaussian):
    """A q 100x too wide: log w spreads over thousands of nats, where arviz-stats' psislw returns NaN weights
    and a meaningless k̂ (0.047); the check must say k̂ = inf, not 'reliable'."""
    prior, likelihood, mean, cov = gaussian
    with pytest.warns(UserWarning, match="do not trust"):
        check = check_posterior(_GaussianQ(mean, 1e4 * cov), prior, likelihood, n=256, generator=_gen(9))
    assert check.raw_log_weights.std() > 1000
    assert check.khat == math.inf and not check.reliable and check.ess < 2
    assert torch.isfinite(check.log_weights).all() and torch.logsumexp(check.log_weights, 0).abs() < 1e-9


def test_hutchinson_noise_matches_repeated_evaluations():
    sde = VPSDE()
    mean = torch.zeros(SHAPE, dtype=torch.float64)
    score = GaussianScore(mean, random_spd(D, 7), sde)  # non-diagonal Jacobian: Rademacher probes are noisy
    score_prior = ScorePrior(score, sde, t0=T0, terminal_log_prob=lambda x: score.log_prob_t(x, 1.0))
    n, repeats, reference = 32, 32, 64
    x = GaussianPrior(mean, score.cov).sample(n, generator=_gen(8))
    # No Gaussian base: the adaptive solver, which reports no standard error, so the noise comes from repeats.
    options = ODEOptions(divergence="hutchinson", n_probes=1, rtol=1e-4, atol=1e-4)
    kwargs = {"options": options}
    zeros = torch.zeros(n, dtype=torch.float64)
    check = importance_draws(x, zeros, score_prior, _Flat(), log_prob_kwargs=kwargs, repeats=repeats,
                             batch_size=n, generator=_gen(9))
    many = score_prior.log_prob(x.repeat(reference, 1, 1, 1), options, generator=_gen(10))
    expected = many.reshape(reference, n).std(0) / math.sqrt(repeats)  # about 4 nats / sqrt(32)
    ratio = check.log_prior_noise / expected
    assert bool((ratio > 0.5).all() and (ratio < 2).all()), ratio
    # Two repeats leave a standard error of about 4 / sqrt(2) nats: reported, warned, not trusted.
    with pytest.warns(UserWarning, match="noise"):
        noisy = importance_draws(x, zeros, score_prior, _Flat(), log_prob_kwargs=kwargs, repeats=2, generator=_gen(9))
    assert noisy.noise_median > 1 and "inflates k̂" in noisy.verdict and not noisy.reliable
    # One run (the default) measures no noise: said so, and not trusted.
    with pytest.warns(UserWarning, match=r"log p noise not measured \(repeats=1\): not trusted"):
        once = importance_draws(x, zeros, score_prior, _Flat(), log_prob_kwargs=kwargs, generator=_gen(9))
    assert once.log_prior_noise.isnan().all() and not once.reliable
    # A q shifted by 3 stds per pixel: log w spreads far more than the noise, so the verdict says the noise
    # does not explain k̂.
    shifted = x + 3 * score.cov.diagonal().sqrt().reshape(SHAPE)
    log_q = GaussianPrior(mean + 3 * score.cov.diagonal().sqrt().reshape(SHAPE), score.cov).log_prob(shifted)
    with pytest.warns(UserWarning, match="do not trust"):
        far = importance_draws(shifted, log_q, score_prior, _Flat(), log_prob_kwargs=kwargs, repeats=2,
                               generator=_gen(9))
    assert far.log_weight_spread > 3 * far.noise_median and "does not explain k̂" in far.verdict

    exact = importance_draws(x, score.log_prob_t(x, T0), score_prior, _Flat(),
                             log_prob_kwargs={"options": ODEOptions(divergence="exact")}, repeats=repeats, progress=True)
    assert exact.noise_max == 0.0 and exact.reliable and "log p deterministic" in exact.verdict


# log w is the noise of log p alone (about 0.05 nats), whose Pareto fit this test does not check.
@pytest.mark.filterwarnings("ignore:k̂:UserWarning")
def test_default_check_of_a_prior_with_a_base_takes_the_solver_s_standard_error():
    """A ScorePrior with a Gaussian base and no options: two sets of coloured probes on the Gaussian-base solver,
    whose reported standard error is the spread of repeated evaluations, and with repeats that of their mean
    (compared as the RMS over 32 draws: two sets give each draw's error only roughly)."""
    sde = VPSDE()
    mean = torch.zeros(SHAPE, dtype=torch.float64)
    score = GaussianScore(mean, random_spd(D, 7), sde)
    base = GaussianPrior(mean, 2 * score.cov)  # not the data's Gaussian: the residual's trace is noisy
    score_prior = ScorePrior(score, sde, t0=T0, terminal_log_prob=lambda x: score.log_prob_t(x, 1.0), gaussian_base=base)
    n, reference = 32, 32
    x = GaussianPrior(mean, score.cov).sample(n, generator=_gen(8))
    log_q = score.log_prob_t(x, T0)  # q = the prior, likelihood flat: log w is the noise of log p
    options = check_options(SHAPE)
    assert (options.divergence, options.probe, options.n_probes) == ("hutchinson", "colored", 8)
    many = score_prior.log_prob(x.repeat(reference, 1, 1, 1), options, generator=_gen(10))
    spread = many.reshape(reference, n).std(0)
    assert spread.min() > 0.01
    for repeats in (1, 4):
        check = importance_draws(x, log_q, score_prior, _Flat(), repeats=repeats, batch_size=n, generator=_gen(9))
        ratio = check.log_prior_noise.square().mean().sqrt() / (spread / math.sqrt(repeats)).square().mean().sqrt()
        assert 0.7 < ratio < 1.4, (repeats, ratio)


def test_legacy_log_prob_kwargs_warn_and_give_the_options_call():
    """log_prob_kwargs as ScorePrior.log_prob keywords (the previous release's form) still work: a
    DeprecationWarning, and the same weights as {"options": ODEOptions(...)} with the same generator."""
    sde = VPSDE()
    mean = torch.zeros(SHAPE, dtype=torch.float64)
    score = GaussianScore(mean, random_spd(D, 7), sde)
    score_prior = ScorePrior(score, sde, t0=T0)
    x = GaussianPrior(mean, score.cov).sample(32, generator=_gen(8))
    zeros = torch.zeros(32, dtype=torch.float64)
    legacy = {"divergence": "hutchinson", "n_probes": 1, "rtol": 1e-4, "atol": 1e-4}
    with pytest.warns(DeprecationWarning, match="ODEOptions"):
        old = importance_draws(x, zeros, score_prior, _Flat(), log_prob_kwargs=legacy, repeats=2, generator=_gen(9))
    new = importance_draws(x, zeros, score_prior, _Flat(), log_prob_kwargs={"options": ODEOptions(**legacy)},
                           repeats=2, generator=_gen(9))
    assert torch.equal(old.raw_log_weights, new.raw_log_weights)
    assert torch.equal(old.log_prior_noise, new.log_prior_noise)


def test_khat_standard_error_is_its_spread_over_independent_draws(gaussian):
    """The bootstrap standard error of k̂ from one set of draws against the spread of k̂ over 16 independent
    sets (q with half the posterior's covariance: k̂ about 0.7)."""
    prior, likelihood, mean, cov = gaussian
    q = _GaussianQ(mean, 0.5 * cov)
    checks = []
    with pytest.warns(UserWarning):  # the verdicts of q too narrow
        for seed in range(16):
            checks.append(check_posterior(q, prior, likelihood, n=256, generator=_gen(100 + seed)))
    spread = torch.tensor([c.khat for c in checks]).std().item()
    reported = math.sqrt(sum(c.khat_se**2 for c in checks) / len(checks))
    assert 0.5 < reported / spread < 2, (reported, spread)
    assert f"± {checks[0].khat_se:.2f}" in checks[0].verdict
    assert checks[0].to_dict()["khat_se"] == pytest.approx(checks[0].khat_se)


def test_no_log_q_is_reported_not_faked(gaussian):
    prior, likelihood, mean, cov = gaussian
    check = check_posterior(_GaussianQ(mean, cov, with_log_q=False), prior, likelihood, n=64, generator=_gen(11))
    assert math.isnan(check.khat) and check.log_weights is None and not check.reliable
    assert check.verdict == "no log q: importance check not possible for this sampler"
    assert json.loads(json.dumps(check.to_dict(), allow_nan=False))["khat"] is None
    with pytest.raises(ValueError, match="no log q"):
        check.interval(0.9)


def test_input_errors(gaussian):
    prior, likelihood, mean, cov = gaussian
    x, log_q = _GaussianQ(mean, cov).sample(32, generator=_gen(12))
    with pytest.raises(ValueError, match=r"log_q: expected shape \(32,\).*got \(32, 1\)"):
        importance_draws(x, log_q[:, None], prior, likelihood)
    with pytest.raises(ValueError, match="log_q: expected finite"):
        importance_draws(x, torch.full_like(log_q, math.nan), prior, likelihood)
    with pytest.raises(ValueError, match="n: expected an integer >= 1, got 0"):
        check_posterior(_GaussianQ(mean, cov), prior, likelihood, n=0)
    with pytest.raises(ValueError, match="n: expected at least 25"):
        check_posterior(_GaussianQ(mean, cov), prior, likelihood, n=10)
    with pytest.raises(ValueError, match="repeats"):
        importance_draws(x, log_q, prior, likelihood, repeats=0)
    with pytest.raises(TypeError, match="samples"):
        importance_draws(x.long(), log_q, prior, likelihood)


def test_infinite_and_nan_log_densities(gaussian):
    _, _, mean, cov = gaussian
    target = GaussianPrior(mean, cov)
    x, log_q = _GaussianQ(mean, 1.2 * cov).sample(64, generator=_gen(13))

    class Masked:
        def __init__(self, value):
            self.value = value

        def log_prob(self, x):
            return target.log_prob(x).index_fill(0, torch.tensor([0, 5]), self.value)

    check = importance_draws(x, log_q, Masked(-math.inf), _Flat())
    assert check.log_weights[[0, 5]].tolist() == [-math.inf, -math.inf]
    assert torch.isfinite(check.log_weights[1:5]).all()
    with pytest.raises(ValueError, match="prior.log_prob: NaN or \\+inf for 2 of 64 draws"):
        importance_draws(x, log_q, Masked(math.nan), _Flat())


def test_interval_and_resample_on_equal_weights(gaussian):
    prior, _, _, _ = gaussian
    x = prior.sample(101, generator=_gen(14))
    # q = target exactly, log w = 0 for all draws: the tied tail has no Pareto shape (k̂ = -inf).
    check = importance_draws(x, prior.log_prob(x), prior, _Flat())
    assert check.khat == -math.inf and check.ess == pytest.approx(101)
    for prob in (0.5, 0.9):
        ours = check.interval(prob)
        assert ours.shape == (*SHAPE, 2) and bool((ours[..., 0] <= ours[..., 1]).all())
        theirs = credible_interval(x, prob, kind="eti")
        s = x.sort(0).values
        for side, level in ((0, (1 - prob) / 2), (1, (1 + prob) / 2)):
            j = math.floor(level * 100)  # numpy's interpolation lies in [s_(j), s_(j+1)]
            assert bool((ours[..., side] >= s[j - 1]).all() and (ours[..., side] <= s[j + 2]).all())
            assert bool((theirs[..., side] >= s[j]).all() and (theirs[..., side] <= s[j + 1]).all())
    draws = check.resample(50, generator=_gen(15))
    assert draws.shape == (50, *SHAPE)
    assert all(any(torch.equal(d, s) for s in x) for d in draws)


def test_resample_counts_follow_weights(gaussian):
    prior, likelihood, mean, cov = gaussian
    check = check_posterior(_GaussianQ(mean, 1.5 * cov), prior, likelihood, n=64, generator=_gen(16))
    m = 1000
    draws = check.resample(m, generator=_gen(17))
    flat = check.samples.reshape(64, -1)
    index = (draws.reshape(m, 1, -1) == flat.reshape(1, 64, -1)).all(2).float().argmax(1)
    counts = torch.bincount(index, minlength=64).double()
    # Systematic resampling: every count is within one of m w_i.
    assert ((counts - m * check.log_weights.exp()).abs() < 1 + 1e-9).all()
    lo_hi = check.interval(0.8)
    assert bool((lo_hi[..., 0] <= check.mean).all() and (check.mean <= lo_hi[..., 1]).all())
