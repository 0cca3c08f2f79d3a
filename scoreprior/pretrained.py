"""Pretrained score priors shipped with the package, loaded offline by name.

The files in `scoreprior/pretrained/` are slim exports of training checkpoints (`export_pretrained`):
only the EMA weights (parameters in float16 by default, which keeps each file near 1 MB), the network
and SDE configs, the event shape, and metadata about the training run (data provenance, steps, wall
time, final loss). `studies/train_priors.py` trains and exports them reproducibly.

    from scoreprior.pretrained import available_priors, pretrained
    prior = pretrained("blackhole-32")          # a ScorePrior on (1, 32, 32) images
    log_p = prior.log_prob(images)              # nats
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scoreprior.density import ScorePrior
from scoreprior.nets import build_net
from scoreprior.sde import sde_from_config
from scoreprior.training import NoisePredictionScore, atomic_save, load_checkpoint, read_checkpoint_file

__all__ = ["PRETRAINED_DIR", "PRETRAINED_FORMAT", "available_priors", "export_pretrained", "load_pretrained",
           "pretrained"]

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
PRETRAINED_FORMAT = "scoreprior-pretrained"
PRETRAINED_VERSION = 1
_REQUIRED_KEYS = ("version", "net_config", "sde_config", "event_shape", "weights", "metadata")


def export_pretrained(
    checkpoint: str | Path,
    path: str | Path,
    *,
    metadata: dict | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write the slim export of a training checkpoint (from `scoreprior.training.save_checkpoint`).

    Keeps the EMA weights only, with the network's parameters cast to `dtype` (buffers such as the
    Fourier frequencies stay as they are), the net and SDE configs and the event shape. metadata:
    JSON-like entries (numbers, strings, lists, dicts) stored with "provenance", "steps" and
    "train_config" read from the checkpoint; entries given here win. Written atomically.
    Returns the path written.
    """
    full = load_checkpoint(checkpoint)
    parameters = {name for name, _ in build_net(full["net_config"]).named_parameters()}
    weights = {name: value.to(dtype) if name in parameters else value
               for name, value in full["ema"]["shadow"].items()}
    info = {"provenance": full.get("provenance"), "steps": full["step"], "train_config": full.get("train_config"),
            **(metadata or {})}
    # A JSON round trip turns str/float subclasses (e.g. torch.__version__) into the plain types that
    # torch.load(weights_only=True) accepts, and rejects anything else early.
    info = json.loads(json.dumps(info))
    slim = {
        "format": PRETRAINED_FORMAT,
        "version": PRETRAINED_VERSION,
        "net_config": full["net_config"],
        "sde_config": full["sde_config"],
        "event_shape": full["event_shape"],
        "weights": weights,
        "metadata": info,
    }
    path = Path(path)
    atomic_save(slim, path)
    return path


def _read(path: Path) -> dict:
    """Read and validate a slim export; ValueError naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"pretrained prior {path}: no such file")
    slim = read_checkpoint_file(path, PRETRAINED_FORMAT)
    if slim.get("version") != PRETRAINED_VERSION:
        raise ValueError(f"pretrained prior {path}: expected version {PRETRAINED_VERSION}, got {slim.get('version')!r}")
    missing = [key for key in _REQUIRED_KEYS if key not in slim]
    if missing:
        raise ValueError(f"pretrained prior {path}: missing keys {missing}")
    return slim


def load_pretrained(
    path: str | Path, *, t0: float = 1e-5, device: torch.device | str | None = None
) -> ScorePrior:
    """The `ScorePrior` of a slim export written by `export_pretrained`.

    The network is rebuilt from its config in float32 with the stored weights, in eval mode with
    gradients off, on `device` (default CPU), and wrapped as
    ScorePrior(NoisePredictionScore(net, sde), sde, t0=t0, event_shape=...).
    """
    slim = _read(Path(path))
    net = build_net(slim["net_config"])
    net.load_state_dict(slim["weights"])
    net.to(device if device is not None else "cpu").eval().requires_grad_(False)
    sde = sde_from_config(slim["sde_config"])
    event_shape = tuple(slim["event_shape"])
    return ScorePrior(NoisePredictionScore(net, sde, event_shape=event_shape), sde, t0=t0, event_shape=event_shape)


def available_priors() -> dict[str, dict]:
    """The pretrained priors in `PRETRAINED_DIR`, by name, sorted.

    Returns {name: {"event_shape", "net_config", "sde_config", "file_bytes", **metadata}}, the metadata
    as stored by `export_pretrained` (for the shipped priors: "provenance", "steps", "wall_time_s",
    "final_loss", "train_config", "seed", "parameters", ...).
    """
    priors = {}
    for path in sorted(PRETRAINED_DIR.glob("*.pt")):
        slim = _read(path)
        priors[path.stem] = {"event_shape": list(slim["event_shape"]), "net_config": slim["net_config"],
                             "sde_config": slim["sde_config"], "file_bytes": path.stat().st_size,
                             **slim["metadata"]}
    return priors


def pretrained(name: str, *, t0: float = 1e-5, device: torch.device | str | None = None) -> ScorePrior:
    """Load the shipped prior `name` (see `available_priors()`) as a `ScorePrior`, offline.

    name: e.g. "blackhole-32" (32 × 32 synthetic black holes, 160 µas field of view), "natural-16",
    "natural-32" (grey natural-image patches), "faces-24" (LFW faces), "gaussian-16" (trained on
    samples of `scoreprior.data.pca_gaussian(16)`, whose exact density is known).
    t0: smallest diffusion time (log p is that of p_t0); device: where the network lives (default CPU).
    Raises ValueError listing the available names when `name` is not one of them.
    """
    path = PRETRAINED_DIR / f"{name}.pt"
    if not isinstance(name, str) or "/" in name or not path.is_file():
        names = sorted(p.stem for p in PRETRAINED_DIR.glob("*.pt"))
        raise ValueError(f"name: expected one of the pretrained priors {names}, got {name!r}")
    return load_pretrained(path, t0=t0, device=device)
