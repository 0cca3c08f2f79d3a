"""Denoising score matching: the loss, EMA weights, the training loop and its checkpoints.

Networks here predict the noise: with x_t = a(t) x_0 + s(t) z, net(x_t, t) estimates z, and the score
is -net(x_t, t) / s(t) (Ho et al., NeurIPS 2020; Song et al., ICLR 2021; `scoreprior.noise_prediction`);
`dsm_loss` weights times uniformly in t or, for priors used as densities, by the likelihood weighting
(uniform in log(s / a)). `save_checkpoint` writes the training state in the format that
`scoreprior.checkpoints` reads and validates (`load_checkpoint`) and rebuilds priors from (`load_prior`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from scoreprior._checks import choice, nonnegative_int, number, positive_float, positive_int
from scoreprior.checkpoints import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, atomic_save, load_checkpoint, weights_sha256
from scoreprior.distributed import broadcast_from_rank0, gather_ordered, item_seed, rank_and_world
from scoreprior.noise_prediction import GaussianResidualNet
from scoreprior.optim import optimise
from scoreprior.sde import SDE

__all__ = [
    "dsm_loss",
    "EMA",
    "TrainConfig",
    "TrainResult",
    "train_score_model",
    "save_checkpoint",
]

TIME_SAMPLINGS = ("uniform", "likelihood")
LR_SCHEDULES = ("constant", "cosine")


def dsm_loss(
    net: Callable[[Tensor, Tensor], Tensor],
    sde: SDE,
    x0: Tensor,
    *,
    generator: torch.Generator | None = None,
    eps: float = 1e-5,
    reduction: str = "mean",
    time_sampling: str = "uniform",
) -> Tensor:
    """Denoising score-matching loss in noise-prediction form (Vincent 2011; Song et al., ICLR 2021).

    t ~ U(eps, 1), z ~ N(0, I), x_t = a(t) x_0 + s(t) z per sample, and
        loss = E ||net(x_t, t) - z||^2 / d.
    With score = -net / s(t) this is the score-matching objective
    E[s(t)^2 ||score(x_t, t) - grad log p(x_t | x_0)||^2] / d, i.e. the weighting lambda(t) = s(t)^2
    of Song et al. (2021), divided by the dimension d so values are comparable across image sizes.
    A perfect noise predictor scores 1 - s(t)^2 tr((a^2 C + s^2 I)^-1) / d on N(mu, C) data, not 0.

    time_sampling="likelihood" draws tau = log(s / a) uniformly on [tau(eps), tau(1)] instead, t = the time
    at tau. As d tau / dt = g^2 / (2 s^2), this is the likelihood weighting lambda(t) = g(t)^2 by
    importance sampling (Song, Durkan, Murray & Ermon, NeurIPS 2021): the loss is then
    int g^2 E||score - grad log p(x_t | x_0)||^2 dt / (2 d (tau(1) - tau(eps))), whose minimisation bounds
    the KL divergence of the data from the model, and every tau gets the same share of the draws.

    net: noise predictor net(x, t) -> shaped like x; x0: (B, *event_shape) clean data;
    generator: draws t and z (on x0's device); eps: smallest time;
    reduction: "mean" (a scalar) or "none" (the (B,) per-sample losses);
    time_sampling: "uniform" (in t) or "likelihood" (uniform in log(s / a)).
    """
    if x0.ndim < 2 or x0.shape[0] == 0:
        raise ValueError(f"x0: expected a non-empty batch (B, *event_shape), got {tuple(x0.shape)}")
    number(eps, "eps", low=0.0, high=1.0, low_open=False, high_open=True)
    choice(reduction, "reduction", ("mean", "none"))
    choice(time_sampling, "time_sampling", TIME_SAMPLINGS)
    b = x0.shape[0]
    u = torch.rand(b, generator=generator, device=x0.device, dtype=x0.dtype)
    if time_sampling == "uniform":
        t = eps + (1.0 - eps) * u
    else:
        t, _ = sde.times_uniform_in_log_noise_ratio(u, eps)
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    xt = sde.perturb(x0, t, z)
    losses = (net(xt, t) - z).pow(2).reshape(b, -1).mean(1)
    return losses.mean() if reduction == "mean" else losses


class EMA:
    """Exponential moving average of a module's parameters (Polyak averaging).

    shadow <- d shadow + (1 - d) param after each `update()`, with the warm-up
    d = min(decay, (1 + n) / (10 + n)) at update n, so early averages are not dominated by the
    initial weights. Buffers are copied as they are.

    module: the module being trained (kept by reference); decay: the long-run decay in [0, 1).
    """

    def __init__(self, module: nn.Module, decay: float = 0.999):
        self.module = module
        self.decay = number(decay, "decay", low=0.0, high=1.0, low_open=False, high_open=True)
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self._param_names = {name for name, _ in module.named_parameters()}

    @torch.no_grad()
    def update(self) -> None:
        """Move the shadow weights towards the module's current weights."""
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, value in self.module.state_dict().items():
            if name in self._param_names and value.is_floating_point():
                self.shadow[name].lerp_(value, 1.0 - d)
            else:
                self.shadow[name].copy_(value)
        self.num_updates += 1

    def copy_to(self, module: nn.Module) -> None:
        """Load the averaged weights into `module` (same architecture as the tracked one)."""
        module.load_state_dict(self.shadow)

    def state_dict(self) -> dict:
        """{"decay", "num_updates", "shadow": {name: tensor}}."""
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`."""
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)


@dataclass
class TrainConfig:
    """Options of `train_score_model` (a `scoreprior.optim.LoopOptions`).

    steps: total optimiser steps (a resumed run stops at the same total); batch_size: images per step
    and process (distributed training steps on world x batch_size images);
    lr: Adam learning rate after warm-up; warmup: steps of linear learning-rate warm-up from lr/warmup;
    grad_clip: max global gradient norm (None: no clipping); ema_decay: see `EMA`;
    seed: seeds the generator for batch indices, times and noise (rank r of a distributed run uses
    `scoreprior.distributed.item_seed(seed, r)`; network initialisation is the caller's);
    checkpoint_every: steps between checkpoints (0: only at the end);
    log_every: steps between refreshes of the progress bar's running loss;
    time_sampling: how the default loss draws times, see `dsm_loss` ("uniform" or "likelihood");
    lr_schedule: "constant" after warm-up, or "cosine": lr (1 + cos(pi k / steps)) / 2 at step k.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 0
    log_every: int = 10
    time_sampling: str = "uniform"
    lr_schedule: str = "constant"

    def __post_init__(self):
        for name in ("steps", "warmup", "checkpoint_every"):
            nonnegative_int(getattr(self, name), name)
        for name in ("batch_size", "log_every"):
            positive_int(getattr(self, name), name)
        positive_float(self.lr, "lr")
        if self.grad_clip is not None:
            positive_float(self.grad_clip, "grad_clip")
        number(self.ema_decay, "ema_decay", low=0.0, high=1.0, low_open=False, high_open=True)
        choice(self.time_sampling, "time_sampling", TIME_SAMPLINGS)
        choice(self.lr_schedule, "lr_schedule", LR_SCHEDULES)

    def learning_rate(self, step: int) -> float:
        """The learning rate of step `step` (0-based): linear warm-up, then the schedule."""
        decay = 0.5 * (1.0 + math.cos(math.pi * step / self.steps)) if self.lr_schedule == "cosine" else 1.0
        return self.lr * decay * (min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0)


@dataclass
class TrainResult:
    """Outcome of `train_score_model`.

    final_loss: mean loss over the last `log_every` steps (nan if no step was ever taken);
    loss_history: loss of every step since step 0, resumed steps included; steps: total steps done;
    wall_time: seconds spent in this call; ema: the EMA of the weights (`ema.copy_to(net)` to use it).
    """

    final_loss: float
    loss_history: list[float]
    steps: int
    wall_time: float
    ema: EMA = field(repr=False)


def save_checkpoint(
    path: str | Path,
    net: nn.Module,
    sde: SDE,
    *,
    event_shape: tuple[int, ...],
    ema: EMA | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
    generator: torch.Generator | None = None,
    rank_generators: list[Tensor] | None = None,
    loss_history: list[float] | None = None,
    provenance: str | None = None,
    train_config: TrainConfig | None = None,
    data_range: tuple[float, float] | None = None,
) -> Path:
    """Write a training checkpoint atomically (temporary file in the same folder, then os.replace).

    net: a network with `config()` (see `scoreprior.nets.build_net`); sde: its SDE (with `config()`);
    event_shape: shape of one training image, e.g. (1, 16, 16); ema: averaged weights (default: the
    net's current weights); optimizer, generator: stored so that training can resume exactly;
    rank_generators: generator states of every rank of a distributed run, in rank order (`generator`
    is then rank 0's); step: optimiser steps done; loss_history: per-step losses; provenance: where the
    data came from; train_config: the options used; data_range: (min, max) of the training images, which
    `load_prior` hands to the ScorePrior (the CLI refuses images on another scale). The SHA-256 of the net
    and EMA weights is stored under "weights_sha256" and checked by `load_checkpoint`. Returns the path written.
    """
    path = Path(path)
    ema_state = (ema if ema is not None else EMA(net)).state_dict()
    weights = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    shadow = {k: v.cpu() for k, v in ema_state["shadow"].items()}
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "net_config": net.config(),
        "sde_config": sde.config(),
        "event_shape": [int(n) for n in event_shape],
        "net": weights,
        "ema": {**ema_state, "shadow": shadow},
        "weights_sha256": {"net": weights_sha256(weights), "ema": weights_sha256(shadow)},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": int(step),
        "generator": generator.get_state() if generator is not None else None,
        "rank_generators": rank_generators,
        "loss_history": [float(v) for v in (loss_history or [])],
        "provenance": provenance,
        "train_config": dataclasses.asdict(train_config) if train_config is not None else None,
        "data_range": None if data_range is None else [float(v) for v in data_range],
    }
    atomic_save(checkpoint, path)
    return path


def _resume(
    path: Path,
    checkpoint: dict,
    net: nn.Module,
    sde: SDE,
    event_shape: torch.Size,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    rank: int,
    world: int,
) -> tuple[int, list[float]]:
    """Load a checkpoint's state into the training objects of rank `rank` of `world`; returns (step, loss
    history). The generator takes this rank's saved state, so the number of processes must not change."""
    for key, expected in (("net_config", net.config()), ("sde_config", sde.config()),
                          ("event_shape", list(event_shape))):
        if checkpoint[key] != expected:
            raise ValueError(f"checkpoint {path}: {key} {checkpoint[key]} does not match this run's {expected}")
    if checkpoint.get("optimizer") is None or checkpoint.get("generator") is None:
        raise ValueError(f"checkpoint {path}: holds no optimizer or generator state, cannot resume")
    net.load_state_dict(checkpoint["net"])
    ema.load_state_dict(checkpoint["ema"])
    states = checkpoint.get("rank_generators") or [checkpoint["generator"]]
    if len(states) != world:
        raise ValueError(f"checkpoint {path}: written by {len(states)} process(es), cannot resume exactly "
                         f"with {world}")
    optimizer.load_state_dict(checkpoint["optimizer"])
    generator.set_state(states[rank])
    return checkpoint["step"], list(checkpoint["loss_history"])


def train_score_model(
    net: nn.Module,
    sde: SDE,
    data: Tensor,
    config: TrainConfig,
    *,
    checkpoint: str | Path | None = None,
    resume: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
    provenance: str | None = None,
    loss_fn: Callable[[nn.Module, Tensor, torch.Generator], Tensor] | None = None,
    distributed: bool | None = None,
) -> TrainResult:
    """Train a network by denoising score matching (`dsm_loss`, or `loss_fn`), in place.

    Adam with linear warm-up and gradient clipping, in the loop of `scoreprior.optim` (a non-finite loss
    is not skipped but propagates: every rank of a distributed run must take the same steps); an EMA of
    the weights, updated after each optimiser step; batches drawn with replacement. One torch.Generator
    seeded with `config.seed` draws batch indices, times and noise, and its state goes into every
    checkpoint, so a run resumed from a checkpoint continues exactly as the uninterrupted run would
    (bitwise on the same device).

    net: network with `config()` called net(x, t) -> shaped like x; sde: the forward SDE;
    data: (N, *event_shape) training images, cast to the net's dtype; config: see `TrainConfig`.
    checkpoint: file written every `config.checkpoint_every` steps and at the end (None: never);
    resume: if `checkpoint` exists, continue from it (its net and SDE configs must match);
    device: where to train (default: the net's device); progress: show a tqdm bar with the loss;
    provenance: free text recorded in the checkpoint, e.g. the data's source;
    loss_fn: loss_fn(net, x0, generator) -> scalar loss on a (batch_size, *event_shape) batch, drawing
        its randomness from `generator` (default: dsm_loss(net, sde, x0, generator=generator,
        time_sampling=config.time_sampling)); `sde` is
        still the one recorded in checkpoints. Under DDP it receives the DistributedDataParallel wrapper:
        it should call it once per step (the gradient all-reduce hooks on that call) and reach the
        network's attributes through `.module`.
    distributed: train data-parallel over the default process group (default: whenever one is
        initialised, e.g. inside `scoreprior.distributed.init_from_env()` under torchrun).

    Distributed (DistributedDataParallel): every rank holds all of `data` and the same network
    configuration; rank r draws its own batch_size indices, times and noise from a generator seeded with
    `item_seed(config.seed, r)`, so a step sees world x batch_size independent draws with replacement,
    and DDP averages the gradients: in expectation the same step as one process with that global batch
    (the learning rate is not rescaled). The weights are rank 0's at the start and stay equal on every
    rank; the recorded loss is the mean over ranks. Only rank 0 shows the progress bar and writes
    checkpoints, which hold every rank's generator state: a resume needs the same number of processes
    and reads the file on rank 0 only. Rank 0 with one process draws exactly what a non-distributed
    run draws.

    The net is left on `device`, in eval mode, holding the raw (non-averaged) weights.
    """
    if not isinstance(data, Tensor) or data.ndim < 2 or data.shape[0] == 0 or not data.is_floating_point():
        shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"data: expected a non-empty floating-point tensor (N, *event_shape), got {shape}")
    if isinstance(net, GaussianResidualNet) and net.sde.config() != sde.config():
        raise ValueError(f"sde: {sde!r} differs from the {net.sde!r} of the network's Gaussian base")
    param = next(net.parameters())
    device = torch.device(device) if device is not None else param.device
    net.to(device)
    data = data.to(device=device, dtype=param.dtype)
    if loss_fn is None:
        def loss_fn(net: nn.Module, x0: Tensor, generator: torch.Generator) -> Tensor:
            return dsm_loss(net, sde, x0, generator=generator, time_sampling=config.time_sampling)
    event_shape = data.shape[1:]
    data_range = (float(data.min()), float(data.max()))
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed: True needs an initialised default process group, "
                         "see scoreprior.distributed.init_from_env")
    rank, world = rank_and_world() if distributed else (0, 1)

    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    model = DistributedDataParallel(net) if distributed else net  # broadcasts rank 0's weights
    ema = EMA(net, config.ema_decay)
    generator = torch.Generator(device=device).manual_seed(item_seed(config.seed, rank))
    step, history = 0, []
    if checkpoint is not None and resume:
        def read() -> dict | None:
            return load_checkpoint(checkpoint) if checkpoint.exists() else None

        saved = broadcast_from_rank0(read) if distributed else read()
        if saved is not None:
            step, history = _resume(checkpoint, saved, net, sde, event_shape, ema, optimizer, generator,
                                    rank, world)

    def draw_loss(step: int) -> Tensor:
        idx = torch.randint(data.shape[0], (config.batch_size,), generator=generator, device=device)
        return loss_fn(model, data[idx], generator)

    def record(step: int, loss: Tensor, ok: bool) -> None:
        ema.update()
        history.append(_mean_over_ranks(loss.detach(), world).item() if distributed else loss.item())

    def postfix(step: int) -> dict:
        return {"loss": f"{sum(history[-config.log_every:]) / config.log_every:.4f}"}

    def save(step: int) -> None:
        states = gather_ordered([generator.get_state()], [rank], world) if distributed else None
        if rank == 0:
            save_checkpoint(checkpoint, net, sde, event_shape=event_shape, ema=ema, optimizer=optimizer,
                            step=step, generator=generator, rank_generators=states, loss_history=history,
                            provenance=provenance, train_config=config, data_range=data_range)

    start = time.perf_counter()
    net.train()
    step = optimise(optimizer, draw_loss, config, start=step, on_step=record, postfix=postfix,
                    save=None if checkpoint is None else save, progress=progress and rank == 0, desc="training")
    net.eval()
    if checkpoint is not None and distributed:
        dist.barrier()  # the checkpoint is complete when any rank returns
    recent = history[-config.log_every:]
    final = sum(recent) / len(recent) if recent else math.nan
    return TrainResult(final, history, step, time.perf_counter() - start, ema)


def _mean_over_ranks(value: Tensor, world: int) -> Tensor:
    """Mean of a tensor over the ranks of the default process group."""
    total = value.clone()
    dist.all_reduce(total)
    return total / world
