import math

import pytest
import torch
from torch import nn

import scoreprior
from scoreprior.density import ODEOptions, ScorePrior, bits_per_dim
from scoreprior.scores import GaussianMixtureScore, GaussianScore

from scoreprior.data import gaussian_field, sample_gaussian

from conftest import SDES, random_spd

T0 = 1e-3


def _gaussian_problem(sde, height, width, *, n=3, seed=0):
    mean, cov = gaussian_field(height, width, length_scale=(2.0, 4.0), scale=0.3)
    model = GaussianScore(mean, cov, sde)
    prior = ScorePrior(model, sde, t0=T0, terminal_log_prob=lambda z: model.log_prob_t(z, sde.T))
    return model, prior, sample_gaussian(mean, cov, n, generator=torch.Generator().manual_seed(seed))


def _cosine(a, b):
    return nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min().item()


def _true_grad(model, x):
    x = x.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(model.log_prob_t(x, T0).sum(), x)
    return g


@pytest.mark.parametrize("name, size", [(name, (8, 8)) for name in SDES] + [("vp", (16, 16))] + [
    pytest.param(name, (16, 16), marks=pytest.mark.slow) for name in SDES if name != "vp"])
def test_exact_log_prob_matches_closed_form(name, size):
    """Anisotropic full covariance, d = 64 and 256: 2e-3 nats at tol 1e-5, 1e-4 at tol 1e-7."""
    model, prior, x = _gaussian_problem(SDES[name], *size)
    truth = model.log_prob_t(x, T0)
    for tol, bound in ((1e-5, 2e-3), (1e-7, 1e-4)):
        logp = prior.log_prob(x, ODEOptions(divergence="exact", rtol=tol, atol=tol))
        assert logp.dtype == torch.float64
        assert (logp - truth).abs().max().item() < bound


def test_float32_log_prob():
    model, prior, x = _gaussian_problem(SDES["vp"], 8, 8)
    logp = prior.log_prob(x.float())
    assert logp.dtype == torch.float32
    assert (logp.double() - model.log_prob_t(x, T0)).abs().max().item() < 2e-2


def test_hutchinson_agrees_within_its_standard_error():
    model, prior, x = _gaussian_problem(SDES["vp"], 8, 8, n=2)
    truth = model.log_prob_t(x, T0)
    runs = torch.stack([
        prior.log_prob(x, ODEOptions(divergence="hutchinson", n_probes=8, rtol=1e-6, atol=1e-6),
                       generator=torch.Generator().manual_seed(k))
        for k in range(16)
    ])
    mean, se = runs.mean(0), runs.std(0) / math.sqrt(runs.shape[0])
    assert (se > 0).all()
    assert ((mean - truth).abs() < 4 * se + 1e-4).all()


def test_gaussian_probes_are_unbiased_too():
    model, prior, x = _gaussian_problem(SDES["subvp"], 4, 4, n=1)
    runs = torch.stack([
        prior.log_prob(x, ODEOptions(divergence="hutchinson", probe="gaussian", n_probes=16),
                       generator=torch.Generator().manual_seed(k))
        for k in range(16)
    ])
    se = runs.std(0) / 4
    assert ((runs.mean(0) - model.log_prob_t(x, T0)).abs() < 4 * se + 1e-4).all()


def test_probes_are_reproducible_from_the_generator():
    _, prior, x = _gaussian_problem(SDES["vp"], 4, 4, n=2)
    options = ODEOptions(divergence="hutchinson", n_probes=2)
    a = prior.log_prob(x, options, generator=torch.Generator().manual_seed(5))
    b = prior.log_prob(x, options, generator=torch.Generator().manual_seed(5))
    c = prior.log_prob(x, options, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _small_net_prior():
    from scoreprior.nets import UNet
    from scoreprior.noise_prediction import NoisePredictionScore

    torch.manual_seed(0)
    net = UNet(1, channels=(8, 16)).double().eval()
    for p in net.parameters():
        p.data.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    sde = SDES["vp"]
    return ScorePrior(NoisePredictionScore(net, sde), sde, t0=T0)


def test_difference_and_autograd_products_agree():
    """Central differences against autograd VJPs, same probes: exact for a linear score, O(h^2) for a net."""
    model, prior, x = _gaussian_problem(SDES["vp"], 4, 4, n=2)
    options = ODEOptions(divergence="hutchinson", n_probes=3, rtol=1e-7, atol=1e-7)
    a = prior.log_prob(x, options.replace(jvp="autograd"), generator=torch.Generator().manual_seed(1))
    b = prior.log_prob(x, options.replace(jvp="difference"), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-8)
    net_prior = _small_net_prior()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    options = ODEOptions(divergence="hutchinson", n_probes=2, rtol=1e-5, atol=1e-5)
    a = net_prior.log_prob(x, options.replace(jvp="autograd"), generator=torch.Generator().manual_seed(1))
    b = net_prior.log_prob(x, options.replace(jvp="difference"), generator=torch.Generator().manual_seed(1))
    spread = net_prior.log_prob(x, options.replace(jvp="autograd"), generator=torch.Generator().manual_seed(2)) - a
    assert (a - b).abs().max() < 0.05 * spread.abs().max()
    assert (a - b).abs().max() < 0.1


def test_adaptive_control_variate_of_the_data_gaussian_removes_the_noise():
    """The adaptive solver with the data's own Gaussian as base (its control variate): one probe gives the exact
    trace, v^T (J - J_G) v = 0."""
    model, prior, x = _gaussian_problem(SDES["vp"], 4, 4, n=2)
    cv = ScorePrior(model, SDES["vp"], t0=T0, terminal_log_prob=prior.terminal_log_prob,
                    gaussian_base=scoreprior.GaussianPrior(model.mean, model.cov + 1e-9 * torch.eye(16, dtype=torch.float64)))
    truth = model.log_prob_t(x, T0)
    options = ODEOptions(solver="adaptive", divergence="hutchinson", rtol=1e-7, atol=1e-7)
    for seed in range(3):
        logp, stats = cv.log_prob(x, options, generator=torch.Generator().manual_seed(seed), return_stats=True)
        assert stats["solver"] == "adaptive"
        assert (logp - truth).abs().max() < 1e-4
    plain = prior.log_prob(x, options, generator=torch.Generator().manual_seed(0))
    assert (plain - truth).abs().max() > 1e-2


def test_adaptive_control_variate_stays_unbiased_for_other_data():
    """The adaptive solver on a mixture's log p with a mismatched Gaussian base as control variate: mean over
    probes within 4 SE of the exact trace, and a smaller spread than without it."""
    sde = SDES["vp"]
    d = 9
    means = torch.stack([torch.full((d,), -0.5), torch.full((d,), 0.6)]).double()
    covs = torch.stack([random_spd(d, 1), 0.5 * random_spd(d, 2)])
    model = GaussianMixtureScore(torch.tensor([0.3, 0.7]), means, covs, sde)
    gauss = scoreprior.GaussianPrior(0.3 * means[0] + 0.7 * means[1], 0.5 * (covs[0] + covs[1]) + 0.2 * torch.eye(d, dtype=torch.float64))
    x = sample_gaussian(means[1], covs[1], 2, generator=torch.Generator().manual_seed(0))
    exact = ScorePrior(model, sde, t0=T0).log_prob(x, ODEOptions(divergence="exact", rtol=1e-7, atol=1e-7))
    options = ODEOptions(solver="adaptive", divergence="hutchinson", rtol=1e-6, atol=1e-6)
    spreads = []
    for control in (None, gauss):
        prior = ScorePrior(model, sde, t0=T0, gaussian_base=control)
        runs = torch.stack([prior.log_prob(x, options, generator=torch.Generator().manual_seed(k)) for k in range(24)])
        se = runs.std(0) / math.sqrt(runs.shape[0])
        assert ((runs.mean(0) - exact).abs() < 4 * se + 1e-4).all()
        spreads.append(runs.std(0))
    assert (spreads[1] < spreads[0]).all()


def test_gaussian_base_is_checked():
    model, _, _ = _gaussian_problem(SDES["vp"], 4, 4)
    with pytest.raises(TypeError, match="gaussian_base: expected a GaussianPrior"):
        ScorePrior(model, SDES["vp"], gaussian_base=(model.mean, model.cov))
    other = scoreprior.GaussianPrior(torch.zeros(1, 3, 3, dtype=torch.float64), torch.eye(9, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"gaussian_base: expected event shape \(1, 4, 4\), got \(1, 3, 3\)"):
        ScorePrior(model, SDES["vp"], gaussian_base=other)


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("adjoint", [False, True])
def test_gradient_matches_closed_form(name, adjoint):
    model, prior, x = _gaussian_problem(SDES[name], 8, 8, n=2)
    for divergence in ("exact", "hutchinson"):
        xg = x.clone().requires_grad_()
        logp, stats = prior.log_prob(xg, ODEOptions(divergence=divergence, n_probes=4, adjoint=adjoint),
                                     generator=torch.Generator().manual_seed(0), return_stats=True)
        logp.sum().backward()
        assert _cosine(xg.grad, _true_grad(model, x)) > 0.999
        assert (stats["nfe_backward"] > 0) == adjoint


def test_gradcheck_of_the_solve():
    """The discretised log p is differentiated consistently (fixed-step solver, float64)."""
    model = GaussianScore(torch.zeros(3, dtype=torch.float64), random_spd(3, 0), SDES["vp"])
    prior = ScorePrior(model, SDES["vp"], t0=0.05)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def f(x):
        return prior.log_prob(x, ODEOptions(method="rk4", adjoint=False))

    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_gaussian_mixture(name):
    sde = SDES[name]
    d = 16
    means = torch.stack([torch.full((d,), -0.5), torch.full((d,), 0.6)]).double()
    covs = torch.stack([random_spd(d, 1), 0.5 * random_spd(d, 2)])
    model = GaussianMixtureScore(torch.tensor([0.3, 0.7]), means, covs, sde)
    prior = ScorePrior(model, sde, t0=T0, terminal_log_prob=lambda z: model.log_prob_t(z, sde.T))
    g = torch.Generator().manual_seed(0)
    x = torch.cat([sample_gaussian(m, c, 1, generator=g) for m, c in zip(means, covs)])
    truth = model.log_prob_t(x, T0)
    logp = prior.log_prob(x)
    assert (logp - truth).abs().max().item() < 2e-3
    for adjoint in (False, True):
        xg = x.clone().requires_grad_()
        prior.log_prob(xg, ODEOptions(adjoint=adjoint)).sum().backward()
        assert _cosine(xg.grad, _true_grad(model, x)) > 0.999


def test_default_terminal_is_the_sde_prior():
    """With N(0, I) at T the VP result differs from the exact marginal by the prior mismatch only."""
    sde = SDES["vp"]
    model, prior, x = _gaussian_problem(sde, 8, 8, n=2)
    default = ScorePrior(model, sde, t0=T0)
    assert default.terminal_log_prob == sde.prior_log_prob
    diff = default.log_prob(x) - prior.log_prob(x)
    assert diff.abs().max().item() < 0.1
    assert diff.abs().max().item() > 1e-6


class _Linear(nn.Module):
    def __init__(self, w=-1.0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, x, t):
        return self.w * x


def test_no_graph_without_requires_grad():
    prior = ScorePrior(_Linear(), SDES["vp"])
    x = torch.randn(2, 4, dtype=torch.float64)
    assert not prior.log_prob(x).requires_grad
    with torch.no_grad():
        assert not prior.log_prob(x.requires_grad_()).requires_grad


@pytest.mark.parametrize("w", [-0.5, 0.0])
def test_gradients_match_closed_form(w):
    """Score w x under the VP-SDE: the flow is x_t = x exp(-(1 + w) B(t) / 2), B = int beta, so
    log p = -|x|^2 exp(-(1 + w) B) / 2 - (1 + w) d B / 2 + const, and both gradients are closed forms.
    Without the adjoint they are those of the discretised solve, exact only if no step size is a
    differentiable function of x (torchdiffeq's own first step is: several % off before the fix)."""
    sde = SDES["vp"]
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t0 = 1e-5
    int_beta = sde.beta_min * (1 - t0) + 0.5 * (sde.beta_max - sde.beta_min) * (1 - t0**2)
    shrink = math.exp(-(1 + w) * int_beta)
    expected_w = (0.5 * int_beta * shrink * x.pow(2).sum() - 0.5 * x.numel() * int_beta).item()
    for adjoint in (False, True):
        for options in ({"divergence": "exact"}, {"divergence": "hutchinson", "jvp": "autograd"},
                        {"divergence": "hutchinson", "jvp": "difference"}):
            net = _Linear(w)
            xx = x.clone().requires_grad_()
            ScorePrior(net, sde, t0=t0).log_prob(xx, ODEOptions(adjoint=adjoint, **options)).sum().backward()
            assert net.w.grad.item() == pytest.approx(expected_w, rel=1e-4)
            torch.testing.assert_close(xx.grad, -shrink * x, rtol=5e-3, atol=1e-8)


def test_unit_gaussian_data_is_exact():
    """For data N(0, I) under the VP-SDE the score is -x and log p_t = log N(0, I) at every t."""
    sde = SDES["vp"]
    prior = ScorePrior(lambda x, t: -x, sde, t0=T0)
    x = torch.randn(3, 10, dtype=torch.float64)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(1)
    torch.testing.assert_close(prior.log_prob(x), ref)


def test_bits_per_dim():
    """A uniform density on [0, 1]^d (log p = 0) is 8 bits per dimension for 8-bit data."""
    assert bits_per_dim(torch.zeros(2), 10).tolist() == [8.0, 8.0]
    assert bits_per_dim(torch.zeros(1), 10, data_range=2.0).item() == pytest.approx(7.0)
    lp = torch.tensor([-10 * math.log(2.0)])
    assert bits_per_dim(lp, 10).item() == pytest.approx(9.0)
    with pytest.raises(ValueError, match="dim"):
        bits_per_dim(lp, 0)


def test_bad_input():
    model = GaussianScore(torch.zeros(1, 4, 4), torch.eye(16), SDES["vp"])
    prior = ScorePrior(model, SDES["vp"])
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 1, 4, 4\), got \(2, 4, 4\)"):
        prior.log_prob(torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        prior.log_prob(torch.full_like(x, float("nan")))
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        prior.log_prob(torch.zeros(2, 1, 4, 4, dtype=torch.long))
    for kw, name in (({"rtol": 0.0}, "rtol"), ({"atol": -1.0}, "atol"), ({"logp_atol": float("inf")}, "logp_atol"),
                     ({"divergence": "trace"}, "divergence"), ({"n_probes": 0}, "n_probes"),
                     ({"probe": "normal"}, "probe"), ({"chunk_size": 0}, "chunk_size"), ({"jvp": "forward"}, "jvp"),
                     ({"solver": "euler"}, "solver"), ({"steps": 0}, "steps")):
        with pytest.raises(ValueError, match=name):
            ODEOptions(**kw)
    for kw, name in (({"adjoint": "yes"}, "adjoint"), ({"fresh_probes": 1}, "fresh_probes"), ({"method": 4}, "method")):
        with pytest.raises(TypeError, match=name):
            ODEOptions(**kw)
    with pytest.raises(TypeError, match="options: expected a scoreprior.ODEOptions, got dict"):
        prior.log_prob(x, {"rtol": 1e-3})
    with pytest.raises(ValueError, match="t0"):
        ScorePrior(model, SDES["vp"], t0=0.0)
    with pytest.raises(TypeError, match="score"):
        ScorePrior("not a score", SDES["vp"])
    bad_shape = ScorePrior(lambda x, t: x[:, :1], SDES["vp"])
    with pytest.raises(ValueError, match="score: expected an output shaped like x"):
        bad_shape.log_prob(torch.zeros(2, 3))


def test_exact_divergence_chunks_agree():
    _, prior, x = _gaussian_problem(SDES["vp"], 4, 4, n=2)
    torch.testing.assert_close(prior.log_prob(x, ODEOptions(chunk_size=3)), prior.log_prob(x))


def test_auto_divergence_is_exact_up_to_256_numbers_and_hutchinson_above():
    """The default finishes on large images: Hutchinson above EXACT_MAX_DIM, seeded by the generator."""
    from scoreprior.density import EXACT_MAX_DIM

    assert EXACT_MAX_DIM == 256
    for size, expected in ((16, "exact"), (17, "hutchinson")):
        model, prior, x = _gaussian_problem(SDES["vp"], size, size, n=1)
        options = ODEOptions(rtol=1e-3, atol=1e-3)
        logp, stats = prior.log_prob(x, options, generator=torch.Generator().manual_seed(0), return_stats=True)
        assert stats["divergence"] == expected
        explicit = prior.log_prob(x, options.replace(divergence=expected), generator=torch.Generator().manual_seed(0))
        assert torch.equal(logp, explicit)
        assert (logp - model.log_prob_t(x, T0)).abs().item() < 5.0  # Hutchinson: one probe's noise


def test_progress_counts_the_function_evaluations(monkeypatch):
    import scoreprior.density as density

    bars = []

    class Bar:
        def __init__(self, *args, disable=False, **kwargs):
            self.n, self.disable = 0, disable
            bars.append(self)

        def update(self, k):
            self.n += k

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(density, "tqdm", Bar)
    _, prior, x = _gaussian_problem(SDES["vp"], 4, 4, n=1)
    _, stats = prior.log_prob(x, ODEOptions(rtol=1e-3, atol=1e-3), return_stats=True, progress=True)
    assert len(bars) == 1 and not bars[0].disable and bars[0].n == stats["nfe"] > 0


# --- the calls of the previous release: still working, with a DeprecationWarning that shows the new call -------


@pytest.mark.parametrize("base", [False, True])
def test_old_keyword_options_warn_and_give_the_new_call_s_value(base):
    """log_prob(x, divergence=..., n_probes=...) is log_prob(x, ODEOptions(...)): the same probes from the same
    generator, by the adaptive solver as in the previous release, for a prior without a base and for one with
    a base other than the data's Gaussian."""
    model, prior, x = _gaussian_problem(SDES["vp"], 4, 4, n=2)
    if base:
        prior = ScorePrior(model, SDES["vp"], t0=T0, gaussian_base=scoreprior.GaussianPrior(model.mean, 2 * model.cov))
    with pytest.warns(DeprecationWarning, match=r"use log_prob\(x, ODEOptions\(divergence='hutchinson', n_probes=2\)\)"):
        old, stats = prior.log_prob(x, divergence="hutchinson", n_probes=2, generator=torch.Generator().manual_seed(3),
                                    return_stats=True)
    assert stats["solver"] == "adaptive"
    options = ODEOptions(divergence="hutchinson", n_probes=2)
    new = prior.log_prob(x, options, generator=torch.Generator().manual_seed(3))
    assert torch.equal(old, new)
    assert not torch.equal(new, prior.log_prob(x, options, generator=torch.Generator().manual_seed(4)))
    # Old keywords given beside options replace those fields.
    with pytest.warns(DeprecationWarning, match="ODEOptions"):
        mixed = prior.log_prob(x, ODEOptions(n_probes=2), divergence="hutchinson", generator=torch.Generator().manual_seed(3))
    assert torch.equal(mixed, new)


def test_unknown_keyword_is_a_type_error_naming_it():
    _, prior, x = _gaussian_problem(SDES["vp"], 4, 4, n=1)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['n_probe'\]"):
        prior.log_prob(x, n_probe=2)
    with pytest.raises(TypeError, match=r"\['tol'\]"):
        prior.log_prob(x, divergence="exact", tol=1e-3)


def test_control_variate_is_the_old_name_of_gaussian_base():
    model, _, x = _gaussian_problem(SDES["vp"], 4, 4, n=2)
    base = scoreprior.GaussianPrior(model.mean, 2 * model.cov)
    with pytest.warns(DeprecationWarning, match=r"use ScorePrior\(gaussian_base=G\)"):
        old = ScorePrior(model, SDES["vp"], t0=T0, control_variate=base)
    new = ScorePrior(model, SDES["vp"], t0=T0, gaussian_base=base)
    assert old.gaussian_base is base
    options = ODEOptions(divergence="hutchinson", n_probes=2)
    assert torch.equal(old.log_prob(x, options, generator=torch.Generator().manual_seed(0)),
                       new.log_prob(x, options, generator=torch.Generator().manual_seed(0)))
    with pytest.warns(DeprecationWarning, match=r"use ScorePrior\.gaussian_base"):
        assert new.control_variate is base
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="gaussian_base, control_variate: give one"):
        ScorePrior(model, SDES["vp"], gaussian_base=base, control_variate=base)


def test_deprecation_warnings_point_at_the_caller():
    """Python's default filters show a DeprecationWarning only when it is attributed to code in __main__: a
    script's old call must be named, not a frame inside scoreprior or above the caller."""
    model, prior, x = _gaussian_problem(SDES["vp"], 4, 4, n=1)
    with pytest.warns(DeprecationWarning) as record:
        prior.log_prob(x, n_probes=2)
        ScorePrior(model, SDES["vp"], control_variate=scoreprior.GaussianPrior(model.mean, model.cov)).control_variate
    assert [(w.filename, str(w.message).split(' is ')[0]) for w in record] == [
        (__file__, "log_prob(x, n_probes=2)"), (__file__, "ScorePrior(control_variate=G)"),
        (__file__, "ScorePrior.control_variate")]
