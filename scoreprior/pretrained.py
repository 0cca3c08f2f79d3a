"""Pretrained score priors shipped with the package, loaded offline by name.

The files in `scoreprior/pretrained/` are slim exports of training checkpoints (`export_pretrained`):
only the EMA weights (parameters in float16 by default; buffers such as a `GaussianResidualNet`'s
Gaussian stay float32: 1 MB at 16 × 16, 5 MB at 32 × 32), the network and SDE configs, the event shape,
and metadata about the training run (data provenance, steps, wall time, final loss, recipe, and the
held-out test NLL added by `record_metadata`). `studies/train_priors.py` trains and exports them
reproducibly. Exports hold the SHA-256 of their weights, checked on load with their finiteness (the files
shipped before digests were stored are checked for finiteness only): a damaged file is refused with its name.

    import torch
    from scoreprior.pretrained import available_priors, pretrained
    prior = pretrained("blackhole-32")          # a ScorePrior on (1, 32, 32) images in [0, 1]
    images = torch.rand(2, 1, 32, 32)
    log_p = prior.log_prob(images, generator=torch.Generator().manual_seed(0))   # (2,) nats, ~5 s per image
    # 32 x 32 is above EXACT_MAX_DIM: divergence="auto" takes Hutchinson's trace (seeded by the generator);
    # n_probes=4 lowers its noise, rtol=atol=1e-3 halves the time.

`load_score_prior` takes a shipped prior's name, an export or a training checkpoint alike (the CLI uses it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scoreprior.checkpoints import (
    CHECKPOINT_FORMAT,
    atomic_save,
    check_weights,
    load_checkpoint,
    load_prior,
    prior_from_checkpoint,
    read_checkpoint_file,
    weights_sha256,
)
from scoreprior.density import ScorePrior
from scoreprior.nets import build_net

__all__ = ["PRETRAINED_DIR", "PRETRAINED_FORMAT", "available_priors", "export_pretrained", "load_pretrained",
           "load_score_prior", "pretrained", "record_metadata"]

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
PRETRAINED_FORMAT = "scoreprior-pretrained"
PRETRAINED_VERSION = 1
_REQUIRED_KEYS = ("version", "net_config", "sde_config", "event_shape", "weights", "metadata")
# Exports written before data ranges were recorded: every shipped prior was trained on images in [0, 1]
# (the PCA Gaussian's draws reach [-0.75, 1.37]).
_DEFAULT_DATA_RANGE = (0.0, 1.0)


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
    JSON-like entries (numbers, strings, lists, dicts) stored with "provenance", "steps",
    "train_config" and "data_range" read from the checkpoint; entries given here win. The weights'
    SHA-256 is stored under "weights_sha256" and checked on load. Written atomically.
    Returns the path written.
    """
    full = load_checkpoint(checkpoint)
    parameters = {name for name, _ in build_net(full["net_config"]).named_parameters()}
    weights = {name: value.to(dtype) if name in parameters else value
               for name, value in full["ema"]["shadow"].items()}
    info = {"provenance": full.get("provenance"), "steps": full["step"], "train_config": full.get("train_config"),
            **({"data_range": full["data_range"]} if full.get("data_range") is not None else {}), **(metadata or {})}
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
        "weights_sha256": weights_sha256(weights),
        "metadata": info,
    }
    path = Path(path)
    atomic_save(slim, path)
    return path


def record_metadata(path: str | Path, entries: dict) -> Path:
    """Add JSON-like `entries` (e.g. measured test likelihoods) to the metadata of the slim export `path`,
    written atomically; the weights and their SHA-256 are unchanged. Returns the path."""
    path = Path(path)
    slim = _read(path)
    slim["metadata"] = {**slim["metadata"], **json.loads(json.dumps(entries))}
    atomic_save(slim, path)
    return path


def _read(path: Path) -> dict:
    """Read and validate a slim export, damaged weights included (`check_weights`); ValueError naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"pretrained prior {path}: no such file")
    slim = read_checkpoint_file(path, PRETRAINED_FORMAT)
    if slim.get("version") != PRETRAINED_VERSION:
        raise ValueError(f"pretrained prior {path}: expected version {PRETRAINED_VERSION}, got {slim.get('version')!r}")
    missing = [key for key in _REQUIRED_KEYS if key not in slim]
    if missing:
        raise ValueError(f"pretrained prior {path}: missing keys {missing}")
    digest = slim.get("weights_sha256")
    check_weights(path, {"prior": slim["weights"]}, None if digest is None else {"prior": digest})
    return slim


def load_pretrained(
    path: str | Path, *, t0: float = 1e-5, device: torch.device | str | None = None
) -> ScorePrior:
    """The `ScorePrior` of a slim export written by `export_pretrained`.

    Rebuilt by `scoreprior.checkpoints.prior_from_checkpoint` (the network in float32 with the stored
    weights, on `device`, default CPU), data_range from the metadata (default (0, 1), the range of every
    shipped prior's training images).
    """
    slim = _read(Path(path))
    return prior_from_checkpoint(slim, slim["weights"], t0=t0, device=device,
                                 data_range=tuple(slim["metadata"].get("data_range") or _DEFAULT_DATA_RANGE))


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


def load_score_prior(
    source: str | Path, *, t0: float = 1e-5, device: torch.device | str | None = None, use_ema: bool = True
) -> ScorePrior:
    """The `ScorePrior` of a shipped prior's name, a slim export or a training checkpoint.

    source: a name of `available_priors()` (when no file of that name exists), or a file written by
    `export_pretrained` (e.g. one in PRETRAINED_DIR) or by `scoreprior.training.save_checkpoint`, told
    apart by their "format" entry. t0, device: as `pretrained`; use_ema: training checkpoints only
    (exports hold the EMA weights alone: False raises ValueError).
    FileNotFoundError lists the shipped names when `source` is neither a file nor one of them.
    """
    path = Path(source)
    names = sorted(p.stem for p in PRETRAINED_DIR.glob("*.pt"))
    if not path.exists() and str(source) in names:
        path = PRETRAINED_DIR / f"{source}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{source}: neither a file nor a shipped prior {names}")
    fmt = read_checkpoint_file(path, (PRETRAINED_FORMAT, CHECKPOINT_FORMAT))["format"]
    if fmt == CHECKPOINT_FORMAT:
        return load_prior(path, t0=t0, device=device, use_ema=use_ema)
    if not use_ema:
        raise ValueError(f"use_ema: {path} is a pretrained export, which holds the EMA weights only")
    return load_pretrained(path, t0=t0, device=device)
