"""The optimiser loop shared by every fit in the package: `DPI.fit` and `train_score_model`.

Step k (0-based) of `optimise`:
    lr_k = options.learning_rate(k) in every parameter group;  L = loss_fn(k);
    g = grad L, clipped to global norm options.grad_clip (torch.nn.utils.clip_grad_norm_);  optimizer.step().
With skip_nonfinite, a step whose L or |g| is NaN or inf makes no update: the parameters and the optimiser's
state stay as they were, and `on_step` hears ok=False. Around the steps: a tqdm bar whose postfix a callback
supplies every `options.log_every` steps, a `save` callback every `options.checkpoint_every` steps and at the
end (the callers write atomically with `scoreprior.checkpoints.atomic_save`), and a resume from a `start`
step whose state the caller has restored.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["LoopOptions", "optimise"]


class LoopOptions(Protocol):
    """What `optimise` reads of a configuration (`scoreprior.FitConfig` and `scoreprior.TrainConfig` are ones).

    steps: total optimiser steps; grad_clip: global-norm threshold (None: no clipping); checkpoint_every:
    steps between saves (0: only at the end); log_every: steps between refreshes of the bar's postfix.
    """

    steps: int
    grad_clip: float | None
    checkpoint_every: int
    log_every: int

    def learning_rate(self, step: int) -> float:
        """The learning rate of 0-based step `step`."""


def _update(
    optimizer: torch.optim.Optimizer, params: list[Tensor], loss: Tensor, grad_clip: float | None,
    skip_nonfinite: bool,
) -> bool:
    """Backward, clip and step; returns False, with no update made, for a skipped non-finite step."""
    optimizer.zero_grad(set_to_none=True)
    if skip_nonfinite and not bool(torch.isfinite(loss)):
        return False
    loss.backward()
    if grad_clip is not None or skip_nonfinite:
        norm = torch.nn.utils.clip_grad_norm_(params, math.inf if grad_clip is None else grad_clip)
        if skip_nonfinite and not bool(torch.isfinite(norm)):
            return False
    optimizer.step()
    return True


def optimise(
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[int], Tensor],
    options: LoopOptions,
    *,
    start: int = 0,
    on_step: Callable[[int, Tensor, bool], None] | None = None,
    postfix: Callable[[int], dict | None] | None = None,
    save: Callable[[int], None] | None = None,
    skip_nonfinite: bool = False,
    progress: bool = True,
    desc: str | None = None,
) -> int:
    """Run steps start, ..., options.steps - 1 of `optimizer` on the scalar loss_fn(step) (see the module docstring).

    optimizer: holds the parameters (all of its groups are clipped together); its state, and the callers',
        must already be at step `start` when resuming.
    loss_fn(step) -> 0-d tensor, differentiable in the parameters.
    on_step(step, loss, ok): after each step (ok: an update was made); an exception raised there stops the run.
    postfix(step) -> the bar's postfix {name: value} after steps log_every, 2 log_every, ... (None: keep it).
    save(n): called with the number of steps done after steps checkpoint_every, 2 checkpoint_every, ... and
        once at the end, n = max(start, options.steps), even when no step was left to run.
    skip_nonfinite: skip, rather than take, a step whose loss or gradient norm is not finite.
    progress, desc: show a tqdm bar (on stderr) with this label.

    The gradients are cleared before each backward and after the run. Returns max(start, options.steps).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    every = options.checkpoint_every
    bar = tqdm(total=options.steps, initial=min(start, options.steps), disable=not progress, desc=desc,
               dynamic_ncols=True)
    try:
        for step in range(start, options.steps):
            for group in optimizer.param_groups:
                group["lr"] = options.learning_rate(step)
            loss = loss_fn(step)
            ok = _update(optimizer, params, loss, options.grad_clip, skip_nonfinite)
            if on_step is not None:
                on_step(step, loss, ok)
            bar.update(1)
            if postfix is not None and (step + 1) % options.log_every == 0:
                values = postfix(step)
                if values:
                    bar.set_postfix(**values)
            if save is not None and every and (step + 1) % every == 0 and step + 1 < options.steps:
                save(step + 1)
    finally:
        optimizer.zero_grad(set_to_none=True)
        bar.close()
    end = max(start, options.steps)
    if save is not None:
        save(end)
    return end
