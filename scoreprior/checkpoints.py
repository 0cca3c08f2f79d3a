"""Checkpoint files: atomic writes, validated reads, and the prior a checkpoint holds.

A checkpoint is a plain dict of tensors, numbers, strings and lists with a "format" entry (and a format
"version"), so it loads with `torch.load(..., weights_only=True)`. Files are written to a temporary file
beside the target and renamed over it (`atomic_save`): an interrupted write leaves the previous file.
Checkpoints hold the SHA-256 of their weights (`weights_sha256`), checked on load with their finiteness
(`check_weights`): a damaged file is refused with its name instead of giving non-finite scores downstream.
`prior_from_checkpoint` rebuilds the `ScorePrior` of a training checkpoint (`load_prior`) or of a slim
export (`scoreprior.pretrained.load_pretrained`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from scoreprior.density import ScorePrior
from scoreprior.nets import build_net
from scoreprior.noise_prediction import NoisePredictionScore, base_gaussian
from scoreprior.sde import SDE, sde_from_config

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "atomic_save", "read_checkpoint_file", "weights_sha256",
    "check_weights", "load_checkpoint", "prior_from_checkpoint", "load_prior",
]

CHECKPOINT_FORMAT = "scoreprior-checkpoint"
CHECKPOINT_VERSION = 1
_REQUIRED_KEYS = (
    "format", "version", "net_config", "sde_config", "event_shape", "net", "ema", "step", "loss_history",
)


def atomic_save(obj: dict, path: Path) -> None:
    """torch.save to a temporary file in the target folder, then rename it over `path`.

    The file gets the permissions of an ordinary new file (0666 less the umask), not mkstemp's 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_checkpoint_file(path: Path, fmt: str | tuple[str, ...]) -> dict:
    """torch.load a checkpoint dict (weights only) whose "format" entry is `fmt` (or one of them);
    ValueError naming the file and the format found otherwise."""
    formats = (fmt,) if isinstance(fmt, str) else tuple(fmt)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path}: not a readable torch file ({type(err).__name__}: {err})") from err
    found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    if found not in formats:
        expected = " or ".join(map(repr, formats))
        raise ValueError(f"checkpoint {path}: not a scoreprior checkpoint of format {expected}"
                         + (f" (its format is {found!r})" if isinstance(found, str) else ""))
    return checkpoint


def weights_sha256(weights: Mapping[str, Tensor]) -> str:
    """SHA-256 hex digest of a state dict: each tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_weights(path: str | Path, groups: Mapping[str, Mapping[str, Tensor]], digests: Mapping | None) -> None:
    """Refuse damaged weights read from `path`: ValueError naming the file when a floating-point tensor of
    a group holds NaN/inf, or when a group's `weights_sha256` differs from its entry in `digests`.

    groups: {group name: state dict}, e.g. {"net": ..., "ema": ...}; digests: {group name: hex digest} as
    stored at export (None or a missing entry: files written before digests were stored, only the
    finiteness is checked).
    """
    for group, weights in groups.items():
        bad = [name for name, value in weights.items()
               if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]
        if bad:
            count = sum(int((~torch.isfinite(weights[name])).sum()) for name in bad)
            raise ValueError(f"checkpoint {path}: damaged file, {count} non-finite {group} weights (in "
                             f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); restore or re-export it")
        expected = (digests or {}).get(group)
        if expected is not None and weights_sha256(weights) != expected:
            raise ValueError(f"checkpoint {path}: damaged file, the {group} weights do not match the SHA-256 "
                             "stored when it was written; restore or re-export it")


def load_checkpoint(path: str | Path) -> dict:
    """Read and validate a checkpoint written by `scoreprior.training.save_checkpoint`, tensors on the CPU.

    Raises FileNotFoundError if `path` does not exist, ValueError naming the file if it is not a torch
    file, is not a scoreprior checkpoint, has another format version, lacks keys, or holds damaged
    weights (non-finite, or not matching the stored SHA-256: `check_weights`).
    Returns the checkpoint dict (keys listed in `scoreprior.training.save_checkpoint`, plus "format" and "version").
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    checkpoint = read_checkpoint_file(path, CHECKPOINT_FORMAT)
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint {path}: expected format version {CHECKPOINT_VERSION}, got {checkpoint.get('version')!r}"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint {path}: missing keys {missing}")
    check_weights(path, {"net": checkpoint["net"], "ema": checkpoint["ema"]["shadow"]}, checkpoint.get("weights_sha256"))
    return checkpoint


def prior_from_checkpoint(
    checkpoint: Mapping,
    weights: Mapping[str, Tensor],
    *,
    t0: float = 1e-5,
    device: torch.device | str | None = None,
    data_range: tuple[float, float] | None = None,
) -> ScorePrior:
    """The `ScorePrior` of a checkpoint dict (a training checkpoint or a slim export).

    checkpoint: holds "net_config", "sde_config" and "event_shape"; weights: the network's state dict
    (the EMA or raw weights of a training checkpoint, the weights of an export), loaded into the network
    rebuilt from its config in eval mode with gradients off, on `device` (default CPU), and wrapped in
    `NoisePredictionScore`. Returns ScorePrior(score, sde, t0=t0, event_shape=..., data_range=data_range,
    gaussian_base=...) (gaussian_base: the base Gaussian of a `GaussianResidualNet`, on which `log_prob` solves
    the flow fastest). ValueError when the checkpoint holds a whitened-score model, not one of an SDE.
    """
    net = build_net(checkpoint["net_config"])
    net.load_state_dict(weights)
    net.to(device if device is not None else "cpu").eval().requires_grad_(False)
    sde = sde_from_config(checkpoint["sde_config"])
    if not isinstance(sde, SDE):
        raise ValueError(f"checkpoint: holds a {type(sde).__name__} model, not a score model of an SDE; "
                         "load whitened-score checkpoints with scoreprior.ws.load_ws_model")
    event_shape = tuple(checkpoint["event_shape"])
    score = NoisePredictionScore(net, sde, event_shape=event_shape)
    return ScorePrior(score, sde, t0=t0, event_shape=event_shape,
                      data_range=None if data_range is None else tuple(data_range), gaussian_base=base_gaussian(net))


def load_prior(
    path: str | Path,
    *,
    t0: float = 1e-5,
    device: torch.device | str | None = None,
    use_ema: bool = True,
) -> ScorePrior:
    """Rebuild the trained prior of a checkpoint written by `scoreprior.training.save_checkpoint`.

    The EMA weights (or the raw weights if not use_ema) go to `prior_from_checkpoint`, with the training
    images' (min, max) as data_range when the checkpoint records it. device: where the network lives
    (default CPU). Errors: as `load_checkpoint` and `prior_from_checkpoint`.
    """
    checkpoint = load_checkpoint(path)
    return prior_from_checkpoint(checkpoint, checkpoint["ema"]["shadow"] if use_ema else checkpoint["net"],
                                 t0=t0, device=device, data_range=checkpoint.get("data_range"))
