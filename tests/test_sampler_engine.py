"""Tests for scoreprior/samplers/engine.py: the time grids, the run options, the guard and the loop."""

import math

import pytest
import torch

from scoreprior.samplers import sample_prior
from scoreprior.samplers.engine import CountedScore, Guard, Run, integrate, time_grid, tweedie
from scoreprior.sde import VESDE, VPSDE


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_time_grids(sde):
    """Every grid runs from T to t0, decreasing; "log_snr" is equally spaced in log(s / a), "edm" in (s / a)^(1/7)."""
    for kind in ("uniform", "log_snr", "edm"):
        ts = time_grid(sde, 50, 1e-3, kind)
        assert ts.shape == (51,) and float(ts[0]) == sde.T and math.isclose(float(ts[-1]), 1e-3)
        assert bool((ts[1:] < ts[:-1]).all())
    assert torch.allclose(torch.diff(time_grid(sde, 50, 1e-3)), torch.full((50,), (1e-3 - sde.T) / 50, dtype=torch.float64))
    a, s = sde.marginal(time_grid(sde, 50, 1e-3, "log_snr"))
    assert torch.allclose(torch.diff(torch.log(s / a)), torch.diff(torch.log(s / a))[0].expand(50), rtol=1e-6)
    a, s = sde.marginal(time_grid(sde, 50, 1e-3, "edm"))
    root = (s / a) ** (1 / 7)
    assert torch.allclose(torch.diff(root), torch.diff(root)[0].expand(50), rtol=1e-6)
    with pytest.raises(ValueError, match="time_grid"):
        time_grid(sde, 50, 1e-3, "cosine")
    for kind in ("uniform", "log_snr", "edm"):  # a grid from another start: the same rule on [t0, start]
        ts = time_grid(sde, 20, 1e-3, kind, start=0.3)
        assert float(ts[0]) == 0.3 and math.isclose(float(ts[-1]), 1e-3) and bool((ts[1:] < ts[:-1]).all())
    a, s = sde.marginal(time_grid(sde, 20, 1e-3, "log_snr", start=0.3))
    assert torch.allclose(torch.diff(torch.log(s / a)), torch.diff(torch.log(s / a))[0].expand(20), rtol=1e-6)


def test_run_options_are_validated_once():
    assert Run().times(VPSDE(), 4).tolist() == time_grid(VPSDE(), 4, 1e-3).tolist()
    assert Run(time_grid="edm").times(VPSDE(), 4, "log_snr").tolist() == time_grid(VPSDE(), 4, 1e-3, "edm").tolist()
    assert Run().times(VPSDE(), 4, "log_snr").tolist() == time_grid(VPSDE(), 4, 1e-3, "log_snr").tolist()
    with pytest.raises(ValueError, match="t0"):
        Run(t0=0.0)
    with pytest.raises(ValueError, match="time_grid"):
        Run(time_grid="cosine")
    with pytest.raises(TypeError, match="generator"):
        Run(generator=0)
    with pytest.raises(TypeError, match="dtype"):
        Run(dtype=torch.int64)
    with pytest.raises(TypeError, match="progress"):
        Run(progress=1)


def test_run_draws_reproducibly():
    a = Run(generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b = Run(generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, y = a.initial(VPSDE(), (3, 2)), b.initial(VPSDE(), (3, 2))
    assert x.dtype == torch.float64 and torch.equal(x, y) and torch.equal(a.noise(x), b.noise(y))


def test_integrate_runs_every_step_without_autograd_and_guards():
    """x ← step(x, i) for every i, no graph kept; a non-finite or exploding state stops the loop naming the step."""
    x0 = torch.ones(2, 3, requires_grad=True)
    seen = []

    def step(x, i):
        seen.append((i, x.requires_grad or torch.is_grad_enabled()))
        return x * 2

    out = integrate(step, x0, torch.tensor([1.0, 0.5, 0.1]), name="test", weight="w=1", progress=False)
    assert torch.equal(out, torch.full((2, 3), 8.0)) and seen == [(0, True), (1, False), (2, False)]
    with pytest.raises(FloatingPointError, match=r"test: state became non-finite \(6 NaN/inf entries\) at step 2/3, "
                                                 r"t = 0.5, with w=1"):
        integrate(lambda x, i: x * math.nan if i == 1 else x, x0.detach(), torch.tensor([1.0, 0.5, 0.1]), name="test",
                  weight="w=1", progress=False)
    with pytest.raises(FloatingPointError, match=r"diverged .* at step 3/3"):
        integrate(lambda x, i: x * 1e3, x0.detach(), torch.tensor([1.0, 0.5, 0.1]), name="test", weight="w=1",
                  progress=False)
    assert Guard("g", torch.full((1,), 5.0), 1, "").limit == 5e6


def test_tweedie_is_the_posterior_mean_of_a_gaussian():
    """For x_0 ~ N(m, v), E[x_0 | x_t] = m + a v (x_t - a m) / (a^2 v + s^2), and the score is -(x_t - a m) / (a^2 v + s^2)."""
    sde, m, v = VPSDE(), 0.3, 0.5
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)
    a, s = sde.marginal(t)
    x = torch.tensor([[0.1], [-1.2]], dtype=torch.float64)
    var = (a**2 * v + s**2)[:, None]
    score = -(x - a[:, None] * m) / var
    expected = m + a[:, None] * v * (x - a[:, None] * m) / var
    assert torch.allclose(tweedie(sde, x, t, score), expected, rtol=1e-12)


def test_counted_score_counts_one_call_per_step():
    """CountedScore passes calls through unchanged and counts them: sample_prior makes one batched call per step."""
    score = CountedScore(lambda x, t: -x)
    x = sample_prior(score, VPSDE(), 5, (2,), steps=7, run=Run(progress=False))
    assert score.calls == 7 and x.shape == (5, 2) and torch.equal(score(x, torch.zeros(5)), -x)
