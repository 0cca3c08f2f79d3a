"""The shared optimiser loop (scoreprior/optim.py) on problems whose answers are known in closed form."""

import copy
import math
from dataclasses import dataclass

import pytest
import torch

from scoreprior.optim import optimise
from scoreprior.posterior import FitConfig
from scoreprior.training import TrainConfig


@dataclass
class Constant:
    """Loop options with the constant learning rate `lr`."""

    steps: int = 6
    lr: float = 0.1
    grad_clip: float | None = None
    checkpoint_every: int = 0
    log_every: int = 2

    def learning_rate(self, step: int) -> float:
        return self.lr


def _quadratic(w: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """|w - (1, 2, 3) - 0.1 noise|^2, the noise drawn from `generator` when one is given."""
    target = torch.tensor([1.0, 2.0, 3.0], dtype=w.dtype)
    if generator is not None:
        target = target + 0.1 * torch.randn(3, generator=generator, dtype=w.dtype)
    return (w - target).square().sum()


def _cosine(k: float, n: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * k / n))


@pytest.mark.parametrize("config, expected", [
    # DPI: lr (k + 1) / 4 over the warm-up, then a half cosine over the 6 steps after it.
    (FitConfig(steps=10, lr=0.1, warmup=4),
     [0.025, 0.05, 0.075, 0.1] + [0.1 * _cosine(k, 6) for k in range(6)]),
    (FitConfig(steps=10, lr=0.1, warmup=4, schedule="constant"), [0.025, 0.05, 0.075] + [0.1] * 7),
    # Score training: a half cosine over all 10 steps, times the warm-up factor min(1, (k + 1) / 4).
    (TrainConfig(steps=10, lr=0.1, warmup=4, lr_schedule="cosine"),
     [0.1 * _cosine(k, 10) * min(1.0, (k + 1) / 4) for k in range(10)]),
])
def test_each_step_runs_at_the_learning_rate_of_its_schedule(config, expected):
    """SGD on the linear loss c . w, |c| below the configs' grad_clip of 1: the loop hands step k the
    closed-form lr_k, and w moves by -c sum_k lr_k."""
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([0.3, -0.4], dtype=torch.float64)
    optimizer = torch.optim.SGD([w], lr=1.0)
    seen = []

    def loss(step):
        seen.append(optimizer.param_groups[0]["lr"])
        return (c * w).sum()

    assert optimise(optimizer, loss, config, progress=False) == 10
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-15)
    torch.testing.assert_close(w.detach(), -c * sum(expected), rtol=1e-12, atol=0)


def test_non_finite_steps_are_skipped_without_touching_parameters_or_optimizer_state():
    """Adam on a quadratic: a NaN loss at step 2 and a finite loss with a NaN gradient at step 4 make no
    update (parameters and Adam's moments and step count as before), are reported, and the run equals
    the 4-step run without them."""
    def run(bad: dict, steps: int, skip: bool = True):
        w = torch.zeros(3, requires_grad=True)
        optimizer = torch.optim.Adam([w], lr=0.1)
        oks, before, after = [], {}, {}

        def loss(step):
            before[step] = (w.detach().clone(), copy.deepcopy(optimizer.state_dict()))
            value = _quadratic(w)
            if bad.get(step) == "loss":
                return value * math.nan
            if bad.get(step) == "gradient":  # d sqrt(u)/du = inf at u = 0, times du/dw = 0: NaN
                return value + torch.sqrt(0.0 * w.sum())
            return value

        def on_step(step, value, ok):
            oks.append(ok)
            after[step] = (w.detach().clone(), copy.deepcopy(optimizer.state_dict()))

        optimise(optimizer, loss, Constant(steps=steps), on_step=on_step, skip_nonfinite=skip, progress=False)
        return w.detach(), oks, before, after

    w, oks, before, after = run({2: "loss", 4: "gradient"}, 6)
    assert oks == [True, True, False, True, False, True]
    for step in (2, 4):
        assert torch.equal(before[step][0], after[step][0])
        assert before[step][1]["state"][0]["step"] == after[step][1]["state"][0]["step"]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(before[step][1]["state"][0][key], after[step][1]["state"][0][key])
    assert not torch.equal(before[3][0], after[3][0])
    clean, clean_oks, _, _ = run({}, 4)
    assert clean_oks == [True] * 4 and torch.equal(w, clean)
    propagated, oks, _, _ = run({2: "loss"}, 3, skip=False)  # score training's mode: the NaN goes through
    assert oks == [True] * 3 and torch.isnan(propagated).all()


@pytest.mark.parametrize("grad_clip, scale", [(None, 1.0), (10.0, 1.0), (1.0, 1.0 / (5.0 + 1e-6))])
def test_clipping_bounds_the_global_gradient_norm(grad_clip, scale):
    """SGD with lr 1 on c . w, |c| = 5: the update is -c, scaled to norm grad_clip only when |c| exceeds it
    (torch's clip_grad_norm_ factor grad_clip / (|g| + 1e-6))."""
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([3.0, 4.0], dtype=torch.float64)
    optimizer = torch.optim.SGD([w], lr=1.0)
    optimise(optimizer, lambda step: (c * w).sum(), Constant(steps=1, lr=1.0, grad_clip=grad_clip), progress=False)
    torch.testing.assert_close(w.detach(), -scale * c, rtol=1e-15, atol=0)
    assert w.detach().norm() <= (grad_clip or math.inf)


def _noisy_fit(config, start: int = 0, state: dict | None = None, stop_at: int | None = None):
    """Adam on a quadratic with noise from a generator, resumed from `state` (a save) when one is given.
    Returns the weights, the per-step losses and {steps done: what `save` stored}."""
    w = torch.full((3,), 5.0, requires_grad=True)  # another start: a resumed state must replace it
    optimizer = torch.optim.Adam([w], lr=config.lr)
    generator = torch.Generator().manual_seed(0)
    history = []
    if state is not None:
        with torch.no_grad():
            w.copy_(state["w"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        history = list(state["history"])
    saves = {}

    def loss(step):
        if step == stop_at:
            raise KeyboardInterrupt
        return _quadratic(w, generator)

    def save(step):
        saves[step] = copy.deepcopy({"w": w.detach(), "optimizer": optimizer.state_dict(),
                                     "generator": generator.get_state(), "history": history})

    optimise(optimizer, loss, config, start=start, on_step=lambda step, value, ok: history.append(value.item()),
             save=save, progress=False)
    return w.detach(), history, saves


def test_a_resumed_run_equals_the_uninterrupted_run_bitwise():
    config = FitConfig(steps=10, lr=0.05, warmup=3, checkpoint_every=4)
    w, history, saves = _noisy_fit(config)
    assert sorted(saves) == [4, 8, 10]
    with pytest.raises(KeyboardInterrupt):  # killed during step 9, after the save at 8
        _noisy_fit(config, stop_at=9)
    resumed, resumed_history, resumed_saves = _noisy_fit(config, start=8, state=saves[8])
    assert torch.equal(resumed, w) and resumed_history == history
    assert sorted(resumed_saves) == [10] and torch.equal(resumed_saves[10]["w"], saves[10]["w"])


def test_a_run_with_no_step_left_still_saves_once_and_returns_its_step():
    saves = []
    w = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=1.0)
    end = optimise(optimizer, lambda step: pytest.fail("no step should run"), Constant(steps=10, checkpoint_every=3),
                   start=12, save=saves.append, progress=False)
    assert end == 12 and saves == [12]
    saves.clear()
    optimise(optimizer, lambda step: w.sum(), Constant(steps=7, checkpoint_every=3), save=saves.append, progress=False)
    assert saves == [3, 6, 7]


def test_the_bar_shows_the_postfix_every_log_every_steps(capsys):
    calls = []

    def postfix(step):
        calls.append(step)
        return {"loss": f"{step:.1f}"} if step > 1 else None

    w = torch.zeros(1, requires_grad=True)
    optimise(torch.optim.SGD([w], lr=0.1), lambda step: w.sum(), Constant(steps=6, log_every=2), postfix=postfix,
             desc="toy")
    err = capsys.readouterr().err
    assert calls == [1, 3, 5]
    assert "toy" in err and "loss=5.0" in err


def test_an_error_in_on_step_stops_the_run_without_a_final_save_and_clears_the_gradients():
    w = torch.zeros(2, requires_grad=True)
    saves = []

    def on_step(step, value, ok):
        if step == 1:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        optimise(torch.optim.SGD([w], lr=0.1), lambda step: w.sum(), Constant(steps=5), on_step=on_step,
                 save=saves.append, progress=False)
    assert saves == [] and w.grad is None
