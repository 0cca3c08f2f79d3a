"""The `scoreprior` command: train a prior, score images with it, run the demo.

    scoreprior train --data gaussian-field --out prior.pt
    scoreprior logprob prior.pt images.npy --out logp.csv
    scoreprior demo --out scoreprior-demo
    scoreprior posterior prior.pt --operator blur:1 --truth image.npy --sigma 0.1 --out posterior
    scoreprior posterior blackhole-32 --uvfits m87.uvfits --likelihood closure --out m87

A thin layer over `scoreprior.training`, `scoreprior.density`, `scoreprior.posterior` and `scoreprior.data`.
Wherever a checkpoint is expected, a shipped prior's name (`natural-32`, see
`scoreprior.pretrained.available_priors`) or an exported prior file works too. Errors of the library
(ValueError, TypeError, OSError, RuntimeError such as `FitDiverged`) end the command with a one-line
message on stderr and exit status 2 (bad input) or 1 (a failed run); `--debug` shows the traceback.
OMP_WAIT_POLICY is PASSIVE unless set (see `scoreprior/__init__.py`); `--threads N` sets torch's threads.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from scoreprior import __version__
from scoreprior._checks import integer, number, positive_float, positive_int
from scoreprior.checkpoints import load_checkpoint
from scoreprior.data import DATASETS, builtin_dataset, gaussian_field, load_images
from scoreprior.density import EXACT_MAX_DIM, ODEOptions, ScorePrior, bits_per_dim
from scoreprior.distributed import init_from_env, item_seed, map_sharded
from scoreprior.eht import average_visibilities, read_uvfits
from scoreprior.likelihood import ClosureLikelihood, GaussianLikelihood
from scoreprior.nets import UNet
from scoreprior.noise_prediction import GaussianResidualNet
from scoreprior.operators import (FourierMask, FourierSubsample, GaussianBlur, Identity, Inpainting, LinearOperator,
                                  uas_to_rad)
from scoreprior.posterior import DPI, FitConfig, FitDiverged
from scoreprior.pretrained import load_score_prior
from scoreprior.priors import GaussianPrior, gaussian_posterior, reference_posterior
from scoreprior.samplers import Run, sample_prior
from scoreprior.sde import VESDE, SubVPSDE, VPSDE
from scoreprior.surrogate import SurrogatePrior
from scoreprior.training import LR_SCHEDULES, TIME_SAMPLINGS, TrainConfig, train_score_model

__all__ = ["main"]

_SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}

BPD_NOTE = (
    "bits/dim assumes 8-bit images scaled to [0, 1] and dequantized uniformly; "
    "for other data only log_prob (nats) is meaningful"
)


def _require_positive(args: argparse.Namespace, *names: str, minimum: int = 1) -> None:
    """ValueError naming the option when an integer option is below `minimum`."""
    for name in names:
        integer(getattr(args, name), f"--{name.replace('_', '-')}", low=minimum)


def _check_out(path: str | Path, option: str = "--out") -> Path:
    """Fail before any work when `path` (a file or a folder to create) cannot be written.

    Walks up to the nearest existing ancestor: it must be a folder we may write into; an existing
    `path` must itself be writable. Nothing is created.
    """
    path = Path(path)
    ancestor = path if path.exists() else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if ancestor != path and not ancestor.is_dir():
        raise ValueError(f"{option} {path}: {ancestor} is a file, not a folder")
    target = path if path.exists() else ancestor
    if not os.access(target, os.W_OK):
        raise ValueError(f"{option} {path}: {target} is not writable")
    return path


def _check_device(text: str) -> None:
    """ValueError naming --device for a string torch cannot parse or a CUDA device without CUDA."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r}: expected a torch device such as cpu, cuda or cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"--device {text}: {why}; use --device cpu")


def _load_prior(source: str, option: str, **kwargs) -> ScorePrior:
    """A checkpoint, an exported prior file or a shipped prior's name, as a ScorePrior."""
    try:
        return load_score_prior(source, **kwargs)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{option} {err}") from None


def _check_range(images: Tensor, prior: ScorePrior, what: str) -> None:
    """Refuse images on another scale than the prior's training images (e.g. [0, 255] against [0, 1]):
    values beyond the training range widened by its width on each side."""
    if prior.data_range is None:
        return
    lo, hi = prior.data_range
    width = max(hi - lo, 1e-12)
    low, high = float(images.min()), float(images.max())
    if low < lo - width or high > hi + width:
        raise ValueError(f"{what}: pixel values in [{low:.4g}, {high:.4g}], but the prior was trained on images in "
                         f"[{lo:.4g}, {hi:.4g}]; rescale them (e.g. divide 8-bit values by 255)")


def _channels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 32,64, got {text!r}") from None


def _training_data(args: argparse.Namespace) -> tuple[Tensor, str]:
    """The training images and a provenance string."""
    if args.data in DATASETS:
        generator = torch.Generator().manual_seed(args.seed)
        data = builtin_dataset(args.data, args.n, size=args.size, generator=generator)
        return data, f"builtin:{args.data} n={args.n} size={args.size} seed={args.seed}"
    path = Path(args.data)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: neither a file nor a built-in dataset {list(DATASETS)}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return load_images(path), f"file:{path.resolve()} sha256={digest}"


def _train(args: argparse.Namespace) -> int:
    _require_positive(args, "steps", "batch_size", "n", "size")
    _require_positive(args, "warmup", "checkpoint_every", minimum=0)
    _check_device(args.device)
    out = _check_out(args.out)
    if out.exists() and not args.resume:
        raise ValueError(f"--out {out}: exists; pass --resume to continue training it, or remove it")
    if out.exists():
        done = load_checkpoint(out)["step"]
        if done > args.steps:
            raise ValueError(f"--steps {args.steps}: the checkpoint {out} has already done {done} steps; "
                             f"pass --steps above {done} to train further")
        if done == args.steps:
            print(f"{out} has already done its {done} steps: nothing to train (pass a larger --steps to continue)")
            return 0
    data, provenance = _training_data(args)
    sde = _SDES[args.sde]()
    with torch.random.fork_rng(devices=[]):  # the network's initialisation, without touching the global RNG
        torch.manual_seed(args.seed)
        net = UNet(data.shape[1], channels=args.channels)
    if args.base == "gaussian":
        net = GaussianResidualNet.fit(net, sde, data, floor=args.base_floor)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                         seed=args.seed, checkpoint_every=args.checkpoint_every, time_sampling=args.time_sampling,
                         lr_schedule=args.lr_schedule)
    with init_from_env(args.device) as process:  # under torchrun: DDP, batch_size images per process
        if process.rank == 0:
            print(f"training a U-Net {list(args.channels)} on {tuple(data.shape)} images ({provenance}), "
                  f"{args.sde} SDE, {args.steps} steps, {process.world} process(es)")
        result = train_score_model(net, sde, data, config, checkpoint=out, resume=args.resume,
                                   device=process.device, provenance=provenance)
    if process.rank == 0:
        print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}, {result.wall_time:.1f} s")
        print(f"wrote checkpoint {out}")
    return 0


def _log_probs(
    prior: ScorePrior,
    images: Tensor,
    *,
    batch_size: int,
    desc: str,
    seed: int,
    options: ODEOptions,
    progress: bool = False,
) -> tuple[Tensor, list[int]] | tuple[None, None]:
    """log p of every image in batches, the batches split across the ranks of a process group if any.

    The Hutchinson probes of the batch starting at image i come from a generator seeded with
    item_seed(seed, i): they depend on the batch's position only, not on the rank or the batches before
    it, so any number of processes gives the same values.
    progress: a counter of the solver's function evaluations within each batch.
    Returns, on rank 0, (N,) nats on the CPU and the NFE per batch; (None, None) on the other ranks.
    """
    def one_batch(start: int) -> tuple[Tensor, int]:
        probes = torch.Generator(device=images.device).manual_seed(item_seed(seed, start))
        logp, stats = prior.log_prob(images[start:start + batch_size], options, generator=probes,
                                     return_stats=True, progress=progress)
        return logp.detach().cpu(), stats["nfe"]

    batches = map_sharded(one_batch, range(0, images.shape[0], batch_size), desc=desc)
    if batches is None:
        return None, None
    return torch.cat([logp for logp, _ in batches]), [nfe for _, nfe in batches]


def _write_table(path: Path, rows: list[dict], meta: dict) -> None:
    """Rows as CSV (by suffix .csv) or as JSON {**meta, "images": rows}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text(json.dumps({**meta, "images": rows}, indent=2))


def _logprob(args: argparse.Namespace) -> int:
    _require_positive(args, "batch_size", "n_probes", "ode_steps")
    _check_device(args.device)
    out = _check_out(args.out)
    if out.suffix not in (".csv", ".json"):
        raise ValueError(f"--out {out}: expected a .csv or .json file name")
    with init_from_env(args.device) as process:
        prior = _load_prior(args.checkpoint, "checkpoint", t0=args.t0, device=process.device,
                            use_ema=not args.no_ema)
        images = load_images(args.images).to(process.device)
        if images.shape[1:] != prior.event_shape:
            shape = ", ".join(map(str, prior.event_shape))
            raise ValueError(f"{args.images}: expected images of shape (N, {shape}) for checkpoint "
                             f"{args.checkpoint}, got {tuple(images.shape)}")
        _check_range(images, prior, str(args.images))
        options = prior.resolve(ODEOptions(solver=args.solver, steps=args.ode_steps, divergence=args.divergence,
                                           n_probes=args.n_probes, rtol=args.rtol, atol=args.atol), images)
        logp, nfes = _log_probs(prior, images, batch_size=args.batch_size, desc="log p", seed=args.seed,
                                options=options, progress=process.rank == 0)
    if process.rank != 0:
        return 0
    bpd = bits_per_dim(logp, images[0].numel())
    rows = [{"index": i, "log_prob_nats": lp, "bits_per_dim": b}
            for i, (lp, b) in enumerate(zip(logp.tolist(), bpd.tolist()))]
    meta = {"checkpoint": str(args.checkpoint), "images_file": str(args.images), "t0": args.t0,
            **asdict(options), "nfe_per_batch": nfes, "note": BPD_NOTE}
    _write_table(out, rows, meta)
    print(f"{len(rows)} images: mean log p {logp.mean().item():.2f} nats, "
          f"mean {bpd.mean().item():.3f} bits/dim ({BPD_NOTE})")
    print(f"wrote {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from scoreprior.demo import DemoConfig, run_demo

    _check_out(args.out)
    config = DemoConfig.quick(args.seed) if args.quick else DemoConfig(seed=args.seed)
    if args.steps is not None:
        _require_positive(args, "steps")
        config.steps = args.steps
    run_demo(args.out, config)
    return 0


OPERATOR_SPECS = "identity, blur:SIGMA, fourier:K, inpaint:FRACTION, fourier-mask:FRACTION"


def _parse_operator(spec: str) -> tuple[str, float | int | None]:
    """'blur:1.5' -> ('blur', 1.5); ValueError naming --operator on anything else than OPERATOR_SPECS."""
    kind, _, value = spec.partition(":")
    fail = ValueError(f"--operator {spec!r}: expected one of {OPERATOR_SPECS}")
    if kind == "identity":
        if value:
            raise fail
        return kind, None
    if kind not in ("blur", "fourier", "inpaint", "fourier-mask") or not value:
        raise fail
    try:
        parsed = int(value) if kind == "fourier" else float(value)
    except ValueError:
        raise ValueError(f"--operator {spec!r}: expected {'an integer' if kind == 'fourier' else 'a number'} "
                         f"after '{kind}:', got {value!r}") from None
    if kind == "blur":
        return kind, positive_float(parsed, f"--operator {spec!r} (blur sigma in pixels)")
    if kind == "fourier":
        return kind, positive_int(parsed, f"--operator {spec!r} (block size K)")
    return kind, number(parsed, f"--operator {spec!r} (fraction of kept pixels)", low=0.0, high=1.0)


def _random_mask(size: tuple[int, int], fraction: float, generator: torch.Generator) -> Tensor:
    """(H, W) bool mask with round(fraction H W) (at least 1) entries True, chosen uniformly."""
    h, w = size
    kept = max(1, round(fraction * h * w))
    mask = torch.zeros(h * w, dtype=torch.bool)
    mask[torch.randperm(h * w, generator=generator)[:kept]] = True
    return mask.reshape(h, w)


def _build_operator(spec: str, image_shape: tuple[int, ...], generator: torch.Generator) -> LinearOperator:
    """The operator of an --operator spec for (C, H, W) images; random masks are drawn from `generator`."""
    kind, value = _parse_operator(spec)
    size = tuple(image_shape[-2:])
    try:
        if kind == "identity":
            return Identity()
        if kind == "blur":
            return GaussianBlur(value)
        if kind == "fourier":
            return FourierSubsample(value, image_size=size)
        mask = _random_mask(size, value, generator)
        return Inpainting(mask) if kind == "inpaint" else FourierMask(mask)
    except ValueError as err:
        raise ValueError(f"--operator {spec!r} for images of shape {tuple(image_shape)}: {err}") from None


def _measurement(args: argparse.Namespace, operator: LinearOperator, image_shape: tuple[int, ...],
                 truth: Tensor | None, generator: torch.Generator) -> GaussianLikelihood:
    """The likelihood of the observed y: simulated from --truth, or read from --data (checked against A)."""
    if truth is not None:
        y = GaussianLikelihood(operator, operator.A(truth), args.sigma).sample(truth, generator=generator)
        return GaussianLikelihood(operator, y, args.sigma)
    path = Path(args.data)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    array = np.load(path, allow_pickle=False)
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "iufc":
        raise ValueError(f"--data {path}: expected one numeric array in an .npy file")
    y = torch.from_numpy(np.ascontiguousarray(array))
    y = y.to(torch.complex64) if y.is_complex() else y.float()
    if tuple(y.shape) == tuple(operator.measurement_shape(image_shape)):
        y = y.unsqueeze(0)
    try:
        likelihood = GaussianLikelihood(operator, y, args.sigma)
        likelihood.validate(image_shape)
    except ValueError as err:
        raise ValueError(f"--data {path}: {err}") from None
    return likelihood


def _finite_or_none(values: list[float]) -> list[float | None]:
    """JSON has no NaN: missing values (skipped steps) become null."""
    return [v if math.isfinite(v) else None for v in values]


def _posterior(args: argparse.Namespace) -> int:
    from scoreprior import plots  # optional dependency, needed before the (long) fit, not by other commands

    _check_posterior_options(args)
    out = _check_out(args.out)
    prior = _load_prior(args.checkpoint, "checkpoint", t0=args.t0)
    image_shape = tuple(prior.event_shape)
    truth, likelihood, operator, what = _posterior_problem(args, prior)
    if args.prior == "exact":
        log_prior = prior
        prior_kwargs = {"options": _exact_fit_options(prior, args.ode_steps)}
    else:
        log_prior = SurrogatePrior(prior.score, prior.sde, t0=prior.t0, n_time_samples=4,
                                   event_shape=image_shape)
        prior_kwargs = None
    reference = _reference(prior, likelihood, args)
    dpi = DPI(image_shape, n_flows=args.n_flows, seed=args.seed, reference=reference)
    print(f"fitting a DPI posterior ({args.n_flows} flow steps) for {what}, "
          f"{args.prior} prior from {args.checkpoint}, {args.steps} steps of {args.batch_size} draws")
    start = time.perf_counter()
    config = FitConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=min(args.warmup, args.steps))
    history = dpi.fit(log_prior, likelihood, config, prior_kwargs=prior_kwargs,
                      generator=torch.Generator().manual_seed(args.seed))
    if args.exact_steps:
        from scoreprior.demo import refine_exact

        print(f"fitting further against the exact ODE density: {args.exact_steps} steps at lr {args.exact_lr:g}")
        exact = refine_exact(dpi, prior, likelihood, steps=args.exact_steps, batch_size=args.batch_size,
                             lr=args.exact_lr, ode_steps=args.ode_steps)
        history = {key: history[key] + exact[key] for key in history}
    seconds = time.perf_counter() - start

    with torch.no_grad():
        samples, log_q = dpi.sample(args.n_samples, generator=torch.Generator().manual_seed(args.seed + 1))
    mean, std = samples.mean(0), samples.std(0)
    arrays = dict(samples=samples.numpy(), log_q=log_q.numpy(), mean=mean.numpy(), std=std.numpy())
    if isinstance(likelihood, ClosureLikelihood):
        measurement_image, label = None, ""
        chi2 = {key: value.numpy() for key, value in likelihood.reduced_chi2(samples.double()).items()}
        arrays |= {f"reduced_chi2_{key}": value for key, value in chi2.items()}
        print("reduced χ² of the draws (median, 5-95 %): " + "; ".join(
            f"{key.replace('_', ' ')} {np.median(v):.2f} ({np.quantile(v, 0.05):.2f}-{np.quantile(v, 0.95):.2f})"
            for key, v in chi2.items()))
        if not args.check:
            print("warning: closures leave the flux scale to the prior, and closure-only DPI posteriors were "
                  "over-confident in studies/eht_closures.py (exact-density k̂ 2-7); weigh and correct the draws "
                  "with --check 128 before trusting their spread")
    else:
        y = likelihood.y
        measurement_image, label = (y[0], "y") if isinstance(operator, Identity) else (operator.A_adjoint(y)[0], "A^H y")
        arrays |= dict(y=y[0].numpy(), operator=np.array(args.operator), sigma=np.array(args.sigma))

    out.mkdir(parents=True, exist_ok=True)
    if truth is not None:
        arrays["truth"] = truth[0].numpy()
    np.savez(out / "samples.npz", **arrays)
    fig = plots.posterior_figure(truth=None if truth is None else truth[0], measurement_image=measurement_image,
                                 measurement_label=label, mean=mean, std=std, samples=samples)
    fig.savefig(out / "posterior.png", dpi=120)
    (out / "history.json").write_text(json.dumps({key: _finite_or_none(values) for key, values in history.items()}))

    skipped = int(sum(history["skipped"]))
    print(f"done in {seconds:.1f} s: final loss {history['loss'][-1]:.4g} nats, {skipped} skipped steps")
    if truth is not None:
        rmse = (mean - truth[0]).square().mean().sqrt().item()
        print(f"posterior mean RMSE to the truth {rmse:.4g}, mean posterior std {std.mean().item():.4g}")
    print(f"wrote {out / 'samples.npz'}, {out / 'posterior.png'} and {out / 'history.json'}")
    if args.check:
        _correct_draws(args, dpi, prior, likelihood, out)
    return 0


def _exact_fit_options(prior: ScorePrior, steps: int) -> ODEOptions:
    """Solver options of a DPI fit against the exact ODE density: the Gaussian-base solver (`steps` RK4 steps,
    one probe per evaluation, backpropagated) where the prior has a base, else the adaptive solver with the
    adjoint at tolerances 1e-3 (Feng et al.'s set-up)."""
    if prior.gaussian_base is not None:
        return ODEOptions(solver="gaussian", steps=steps, divergence="hutchinson", n_probes=1)
    return ODEOptions(solver="adaptive", divergence="hutchinson", adjoint=True, rtol=1e-3, atol=1e-3)


def _check_reference_options(args: argparse.Namespace) -> None:
    """--reference-samples: 0 or at least 2 draws; --reference-steps >= 1."""
    if args.reference_samples == 1 or args.reference_samples < 0:
        raise ValueError(f"--reference-samples: expected 0 (no reference) or at least 2 draws, got "
                         f"{args.reference_samples}")
    _require_positive(args, "reference_steps")


def _check_posterior_options(args: argparse.Namespace) -> None:
    """The `posterior` command's checks that need no file: the data source and the counts."""
    _check_posterior_source(args)
    if args.n_samples < 2:
        raise ValueError(f"--n-samples: expected at least 2 draws for a standard deviation, got {args.n_samples}")
    if args.check and args.check < 25:
        raise ValueError(f"--check: expected 0 or at least 25 draws (PSIS needs 25), got {args.check}")
    _check_reference_options(args)
    _require_positive(args, "steps", "batch_size", "n_flows", "ode_steps", "check_ode_steps")
    _require_positive(args, "warmup", "exact_steps", minimum=0)
    positive_float(args.exact_lr, "--exact-lr")


def _posterior_problem(args: argparse.Namespace, prior: ScorePrior
                       ) -> tuple[Tensor | None, GaussianLikelihood | ClosureLikelihood, LinearOperator, str]:
    """The `posterior` command's truth (or None), likelihood, operator and a description of them."""
    generator = torch.Generator().manual_seed(args.seed)
    image_shape = tuple(prior.event_shape)
    truth = None
    if args.truth is not None:
        truth = load_images(args.truth)[:1]
        if tuple(truth.shape[1:]) != image_shape:
            raise ValueError(f"--truth {args.truth}: expected images of shape (N, {', '.join(map(str, image_shape))}) "
                             f"for checkpoint {args.checkpoint}, got {tuple(truth.shape)}")
        _check_range(truth, prior, f"--truth {args.truth}")
    if args.uvfits is not None:
        likelihood = _closure_likelihood(args, image_shape)
        return truth, likelihood, likelihood.operator, f"{likelihood!r}"
    operator = _build_operator(args.operator, image_shape, generator)
    likelihood = _measurement(args, operator, image_shape, truth, generator)
    return truth, likelihood, operator, f"{operator!r}, sigma {args.sigma}"


def _correct_draws(args: argparse.Namespace, dpi: DPI, prior: ScorePrior,
                   likelihood: GaussianLikelihood | ClosureLikelihood, out: Path) -> None:
    """--check N: weigh N fresh draws of the flow with the exact ODE density (PSIS) and, where they fail, correct
    them by tempered SMC (`scoreprior.correction`); write check.json and corrected.npz, print the verdict."""
    from scoreprior.correction import SMCConfig, correct_posterior, score_prior_options

    shape = tuple(prior.event_shape)
    print(f"weighing {args.check} draws with the exact ODE density ({args.check_ode_steps} RK4 steps, two sets of "
          "coloured probes); tempered SMC if the PSIS check fails" + ("" if args.correct else " (--no-correct: no SMC)"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the verdict is printed below
        result = correct_posterior(dpi, prior, likelihood, SMCConfig(particles=args.check, smc=args.correct),
                                   **score_prior_options(shape, steps=args.check_ode_steps),
                                   generator=torch.Generator().manual_seed(args.seed + 2), progress=True)
    (out / "check.json").write_text(json.dumps(result.to_dict(), indent=2))
    samples = result.samples
    np.savez(out / "corrected.npz", samples=samples.numpy(), mean=samples.mean(0).numpy(), std=samples.std(0).numpy())
    print(f"exact-density check of the flow: {result.check.verdict}")
    print(f"correction: {result.summary()}")
    print(f"wrote {out / 'check.json'} and {out / 'corrected.npz'} (the corrected draws)")


def _check_posterior_source(args: argparse.Namespace) -> None:
    """ValueError naming the option when --uvfits, --likelihood, --operator and --sigma do not fit together."""
    if args.uvfits is not None:
        if args.likelihood != "closure":
            raise ValueError("--likelihood: real interferometric data (--uvfits) carry station gains; use "
                             "--likelihood closure (closure phases and log closure amplitudes)")
        for option in ("operator", "sigma"):
            if getattr(args, option) is not None:
                raise ValueError(f"--{option}: not used with --uvfits (the operator and noise come from the file)")
        positive_float(args.fov_uas, "--fov-uas")
        number(args.average, "--average", low=0.0, low_open=False)
        return
    if args.likelihood == "closure":
        raise ValueError("--likelihood closure: needs --uvfits (closure quantities of real visibilities)")
    for option in ("operator", "sigma"):
        if getattr(args, option) is None:
            raise ValueError(f"--{option}: required with --data or --truth")
    _parse_operator(args.operator)  # a bad spec fails before anything is loaded


def _closure_likelihood(args: argparse.Namespace, image_shape: tuple[int, ...]) -> ClosureLikelihood:
    """Closure phases and log closure amplitudes of --uvfits, averaged per --average window, on the prior's grid."""
    if image_shape[0] != 1 or image_shape[1] != image_shape[2]:
        raise ValueError(f"--uvfits: needs a prior of square single-channel images, got event shape {image_shape}")
    path = Path(args.uvfits)
    if not path.is_file():
        raise FileNotFoundError(f"--uvfits {path}: no such file")
    data = read_uvfits(path)
    scans = average_visibilities(data, args.average) if args.average > 0 else data
    likelihood = ClosureLikelihood.from_observation(scans, image_shape[-1], uas_to_rad(args.fov_uas))
    likelihood.validate(image_shape)
    print(f"{path.name}: {len(data)} records, {len(scans)} rows after averaging over {args.average:g} s, "
          f"{likelihood.num_measurements} closure quantities; image {image_shape[-1]}² over {args.fov_uas:g} µas")
    return likelihood


def _reference_draws(prior: ScorePrior, args: argparse.Namespace) -> tuple[Tensor, float] | None:
    """--reference-samples unconditional draws of the prior in x_0's units and the eigenvalue floor of their
    Gaussian (`reference_posterior`), or None for --reference-samples 0."""
    if not args.reference_samples:
        return None
    start = time.perf_counter()
    draws = sample_prior(prior.score, prior.sde, args.reference_samples, tuple(prior.event_shape),
                         steps=args.reference_steps,
                         run=Run(t0=prior.t0, generator=torch.Generator().manual_seed(args.seed + 3)))
    a0 = float(prior.sde.marginal(torch.tensor([prior.t0], dtype=torch.float64))[0])
    print(f"Gaussian reference from {args.reference_samples} prior draws ({args.reference_steps} sampler steps) "
          f"in {time.perf_counter() - start:.0f} s")
    # Draws of p_t0 / a0 carry half the smoothing of the density the surrogate bounds; the floor adds the rest.
    return draws / a0, SurrogatePrior(prior.score, prior.sde, t0=prior.t0).smoothing / 2


def _reference(
    prior: ScorePrior, likelihood: GaussianLikelihood | ClosureLikelihood, args: argparse.Namespace
) -> GaussianPrior | None:
    """The flow's Gaussian reference from --reference-samples unconditional draws of the prior, or None:
    their Gaussian's exact posterior for a GaussianLikelihood, their Gaussian itself for closures."""
    drawn = _reference_draws(prior, args)
    return None if drawn is None else reference_posterior(drawn[0], likelihood, floor=drawn[1])


def _calibration_reference(
    args: argparse.Namespace, truth_prior: GaussianPrior, score_prior: ScorePrior | None
) -> Callable[[GaussianLikelihood], GaussianPrior] | None:
    """The Gaussian reference each DPI fit of `calibrate` starts from, as `posterior`'s does, or None
    (--reference-samples 0: the flow starts at N(0, I)). For the prior 'gaussian' the exact posterior, the
    limit of the Gaussian fitted to many prior draws; for a score prior the posterior of the Gaussian of
    --reference-samples draws (`_reference_draws`)."""
    if not args.reference_samples:
        return None
    if score_prior is None:
        return lambda likelihood: GaussianPrior(*gaussian_posterior(truth_prior, likelihood))
    draws, floor = _reference_draws(score_prior, args)
    return functools.partial(reference_posterior, draws, floor=floor)


def _calibrate(args: argparse.Namespace) -> int:
    from scoreprior.calibration import DPIPosterior, ExactGaussianPosterior, run_calibration, write_report
    from scoreprior.priors import GaussianPrior

    _parse_operator(args.operator)  # a bad spec fails before anything is loaded
    _require_positive(args, "n_problems", "n_samples", minimum=2)
    _require_positive(args, "first", "seed", minimum=0)
    _require_positive(args, "dpi_steps", "size")
    _check_reference_options(args)
    _check_out(args.out)
    score_prior = None
    if args.prior == "gaussian":
        image_shape = (1, args.size, args.size)
        truth_prior = log_prior = GaussianPrior(*gaussian_field(args.size, args.size))
    else:
        if args.method == "exact":
            raise ValueError("--method exact: the exact posterior needs the prior 'gaussian', not a checkpoint")
        score_prior = _load_prior(args.prior, "prior", t0=args.t0)
        image_shape = tuple(score_prior.event_shape)
        if image_shape[0] != 1:
            raise ValueError(f"{args.prior}: expected a prior of grey images (1, H, W), got {image_shape}")
        truth_prior = GaussianPrior(*gaussian_field(image_shape[1], image_shape[2]))
        log_prior = SurrogatePrior(score_prior.score, score_prior.sde, t0=score_prior.t0, n_time_samples=4,
                                   event_shape=image_shape)
    operator = _build_operator(args.operator, image_shape, torch.Generator().manual_seed(args.seed))
    if args.method == "exact":
        posterior = ExactGaussianPosterior(truth_prior, cov_scale=args.cov_scale)
    else:
        posterior = DPIPosterior(log_prior, image_shape, steps=args.dpi_steps,
                                 reference=_calibration_reference(args, truth_prior, score_prior))
    indices = range(args.first, args.first + args.n_problems)
    with init_from_env("cpu") as process:  # under torchrun the problems are split across the processes
        if process.rank == 0:
            print(f"calibrating the {args.method} posterior of the {args.prior} prior on {args.n_problems} "
                  f"problems (indices {indices.start}..{indices.stop - 1}, seed {args.seed}), {operator!r}, "
                  f"sigma {args.sigma}, {process.world} process(es)")
        run = run_calibration(indices, seed=args.seed, truth_prior=truth_prior, operator=operator,
                              sigma=args.sigma, posterior=posterior, n_samples=args.n_samples, progress=True)
    if process.rank != 0:
        return 0
    out = Path(args.out)
    extra = {"prior": args.prior, "method": args.method, "operator": args.operator, "sigma": args.sigma,
             "seed": args.seed, "indices": [indices.start, indices.stop], "truths": "gaussian_field defaults"}
    metrics, paths = write_report(out, {args.method: run}, seed=args.seed, extra=extra)
    np.savez(out / "samples.npz", samples=run["samples"].numpy(), truths=run["truth"].numpy(),
             log_q=run["log_q"].numpy())
    result = metrics["results"][args.method]
    print(f"ETI coverage at levels {result['levels']}: {[round(c, 3) for c in result['coverage_eti']]}")
    print(f"TARP ATC {result['tarp']['atc']:+.4f}; SBC p-values {result['sbc']['pvalues']}")
    print("wrote " + ", ".join(str(p) for p in [*paths, out / "samples.npz"]))
    return 0


PRIOR_HELP = ("checkpoint written by `scoreprior train`, an exported prior file, or a shipped prior's name "
              "(blackhole-32, natural-16, natural-32, faces-24, gaussian-16)")


def _add_train(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the `train` command: score-model training."""
    defaults = argparse.ArgumentDefaultsHelpFormatter
    train = sub.add_parser("train", help="train a U-Net score prior by denoising score matching",
                           formatter_class=defaults, parents=[common])
    train.add_argument("--data", required=True,
                       help=f"images (.npy/.npz, (N, H, W) or (N, C, H, W)) or a built-in dataset {list(DATASETS)}")
    train.add_argument("--out", required=True, help="checkpoint file to write")
    train.add_argument("--sde", choices=sorted(_SDES), default="vp", help="forward SDE")
    train.add_argument("--steps", type=int, default=2000, help="total optimiser steps")
    train.add_argument("--batch-size", type=int, default=64, help="images per step")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    train.add_argument("--warmup", type=int, default=100, help="steps of linear learning-rate warm-up")
    train.add_argument("--seed", type=int, default=0, help="seeds the network, the batches and the noise")
    train.add_argument("--channels", type=_channels, default=(32, 64), help="U-Net channels per level")
    train.add_argument("--base", choices=("gaussian", "none"), default="gaussian",
                       help="gaussian: the U-Net learns a residual on the Wiener denoiser of the data's Gaussian "
                            "(GaussianResidualNet, default); none: a plain U-Net")
    train.add_argument("--base-floor", type=float, default=1e-4,
                       help="eigenvalue floor of the base Gaussian's covariance, in squared image units")
    train.add_argument("--time-sampling", choices=TIME_SAMPLINGS, default="likelihood",
                       help="times of the loss: uniform in log(s/a) (likelihood weighting, default) or in t")
    train.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                       help="after the warm-up (cosine decay measured no gain for the shipped priors)")
    train.add_argument("--size", type=int, default=16, help="image size of a built-in dataset")
    train.add_argument("--n", type=int, default=2048, help="number of images of a built-in dataset")
    train.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    train.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    train.add_argument("--device", default="cpu", help="torch device to train on")
    train.set_defaults(run=_train)


def _add_logprob(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the `logprob` command: log-densities of images."""
    defaults = argparse.ArgumentDefaultsHelpFormatter
    logprob = sub.add_parser("logprob", help="log-density of images under a trained prior",
                             description=f"Per-image log p (nats) and bits/dim; {BPD_NOTE}.",
                             formatter_class=defaults, parents=[common])
    logprob.add_argument("checkpoint", help=PRIOR_HELP)
    logprob.add_argument("images", help=".npy/.npz images shaped like the training data")
    logprob.add_argument("--out", required=True, help="results file, .csv or .json")
    logprob.add_argument("--divergence", choices=("auto", "exact", "hutchinson"), default="auto",
                         help="exact Jacobian trace (C H W backward passes per step), Hutchinson's estimate "
                              f"(n-probes passes), or auto: exact up to {EXACT_MAX_DIM} pixels per image, "
                              "Hutchinson above (exact at 32x32 takes over 15 min per image)")
    logprob.add_argument("--n-probes", type=int, default=1, help="Hutchinson probes per image")
    logprob.add_argument("--solver", choices=("adaptive", "gaussian", "auto"), default="adaptive",
                         help="adaptive: the reference ODE solver at --rtol / --atol; gaussian: the fixed-grid "
                              "solver on the prior's Gaussian base (--ode-steps RK4 steps; several times fewer "
                              "evaluations on prior and posterior draws, but hundreds to thousands of nats off on clean "
                              "held-out images, see docs/results.md); auto: gaussian where the prior has a base")
    logprob.add_argument("--ode-steps", type=int, default=8, help="RK4 steps of the gaussian solver")
    logprob.add_argument("--rtol", type=float, default=1e-5, help="adaptive solver's relative tolerance")
    logprob.add_argument("--atol", type=float, default=1e-5, help="adaptive solver's absolute tolerance")
    logprob.add_argument("--t0", type=float, default=1e-5, help="smallest time; log p is that of p_t0")
    logprob.add_argument("--batch-size", type=int, default=16, help="images per ODE solve")
    logprob.add_argument("--seed", type=int, default=0, help="seed of the Hutchinson probes")
    logprob.add_argument("--no-ema", action="store_true", help="use the raw instead of the EMA weights")
    logprob.add_argument("--device", default="cpu", help="torch device to run on")
    logprob.set_defaults(run=_logprob)


def _add_demo(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the `demo` command."""
    defaults = argparse.ArgumentDefaultsHelpFormatter
    demo = sub.add_parser("demo", help="image a simulated EHT observation of a black hole with the shipped prior",
                          description="With the shipped blackhole-32 score prior, simulate an EHT 2017 observation "
                                      "of a held-apart crescent at M87's coordinates, fit the DPI posterior with "
                                      "the surrogate prior, then against the exact ODE log-density, correct its draws "
                                      "with the exact density (PSIS, then tempered SMC if needed), and write "
                                      "report.png, samples.nc and metrics.json. About 11 minutes on two CPU cores.",
                          formatter_class=defaults, parents=[common])
    demo.add_argument("--out", default="scoreprior-demo", help="output folder")
    demo.add_argument("--steps", type=int, default=None,
                      help="DPI steps of the surrogate stage (default 400, --quick 60)")
    demo.add_argument("--quick", action="store_true", help="a smoke test of the whole pipeline, unconverged")
    demo.add_argument("--seed", type=int, default=0, help="seeds the truth, the noise, the flow and the draws")
    demo.set_defaults(run=_demo)


def _reference_arguments(parser: argparse.ArgumentParser, note: str = "") -> None:
    """--reference-samples and --reference-steps, shared by `posterior` and `calibrate`."""
    parser.add_argument("--reference-samples", type=int, default=128,
                        help="unconditional prior draws whose Gaussian posterior the flow starts from (0: none, the "
                             "flow starts at N(0, I) and tends to collapse on large images)" + note)
    parser.add_argument("--reference-steps", type=int, default=100, help="sampler steps for those draws")


def _add_posterior(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the `posterior` command: a DPI fit."""
    defaults = argparse.ArgumentDefaultsHelpFormatter
    posterior = sub.add_parser("posterior", help="fit a DPI variational posterior p(x | y) under a trained prior",
                               description="Fit a normalizing-flow posterior (Deep Probabilistic Imaging) to a "
                                           "measurement y = A x + noise, or to the closure quantities of real "
                                           "interferometric data (--uvfits), under a trained score prior; write "
                                           "samples.npz, posterior.png and history.json into --out.",
                               formatter_class=defaults, parents=[common])
    posterior.add_argument("checkpoint", help=PRIOR_HELP)
    posterior.add_argument("--operator",
                           help=f"forward model A, one of {OPERATOR_SPECS} (random masks seeded by --seed; "
                                "fourier-mask masks are in fft2 order); required with --data or --truth")
    source = posterior.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help=".npy measurement y, shape A(x) with or without the batch axis of 1; "
                                       "complex for Fourier operators")
    source.add_argument("--truth", help="image file (.npy/.npz); y is simulated from its first image")
    source.add_argument("--uvfits", help="real interferometric data (Stokes I of a uvfits file; needs astropy), "
                                         "imaged from its closure quantities (--likelihood closure)")
    posterior.add_argument("--sigma", type=float, help="noise std per measurement, units of y; required with "
                                                       "--data or --truth")
    posterior.add_argument("--likelihood", choices=("gaussian", "closure"), default="gaussian",
                           help="gaussian: y = A x + noise; closure: closure phases and log closure amplitudes of "
                                "--uvfits (immune to station gains; full first-order covariance, no flux term)")
    posterior.add_argument("--fov-uas", type=float, default=160.0, help="with --uvfits: image side in µas")
    posterior.add_argument("--average", type=float, default=600.0,
                           help="with --uvfits: coherent averaging window in s, never across a scan gap of more "
                                "than 60 s (0: every record)")
    posterior.add_argument("--out", required=True, help="output folder")
    posterior.add_argument("--prior", choices=("surrogate", "exact"), default="surrogate",
                           help="log p(x) by the ELBO surrogate (fast) or the probability-flow ODE (Hutchinson; "
                                "the Gaussian-base solver with --ode-steps RK4 steps where the prior has a base, "
                                "about 2 s per step of 16 draws at 32x32 on 2 cores; else adaptive with the adjoint)")
    posterior.add_argument("--ode-steps", type=int, default=4, help="RK4 steps of the exact prior's solver in the fit")
    posterior.add_argument("--exact-steps", type=int, default=0,
                           help="after the fit, this many more steps against the exact ODE density (the demo's "
                                "second stage; with --prior surrogate)")
    posterior.add_argument("--exact-lr", type=float, default=3e-4, help="learning rate of those steps")
    posterior.add_argument("--t0", type=float, default=1e-3, help="smallest diffusion time of the prior")
    posterior.add_argument("--steps", type=int, default=500, help="optimiser steps")
    posterior.add_argument("--batch-size", type=int, default=32, help="flow draws per step")
    posterior.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    posterior.add_argument("--warmup", type=int, default=100, help="steps of linear learning-rate warm-up")
    posterior.add_argument("--n-flows", type=int, default=16, help="flow steps of the RealNVP posterior")
    posterior.add_argument("--n-samples", type=int, default=256, help="posterior draws written and summarised")
    posterior.add_argument("--seed", type=int, default=0, help="seeds masks, simulated noise, flow and draws")
    _reference_arguments(posterior)
    posterior.add_argument("--check", type=int, default=0, metavar="N",
                           help="weigh N >= 25 fresh draws with the exact ODE density (PSIS k̂ with its bootstrap "
                                "error, ESS, verdict) and, if they fail, correct them by tempered SMC: check.json and "
                                "corrected.npz (0: no check; 128 recommended, a few minutes at 32x32)")
    posterior.add_argument("--check-ode-steps", type=int, default=6, help="RK4 steps of that check's log-density")
    posterior.add_argument("--no-correct", dest="correct", action="store_false",
                           help="with --check: weigh and resample only, no SMC")
    posterior.set_defaults(run=_posterior)


def _add_calibrate(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the `calibrate` command: coverage, SBC and TARP over problems."""
    defaults = argparse.ArgumentDefaultsHelpFormatter
    calibrate = sub.add_parser("calibrate", help="coverage, SBC and TARP of a posterior over many simulated problems",
                               description="Simulate problems (truth from the gaussian-field model of the image "
                                           "size, y = A x + noise), draw the posterior of each (exact Gaussian "
                                           "or DPI, started like `posterior`'s from a Gaussian reference unless --reference-samples is 0), and "
                                           "write metrics.json, coverage.png, tarp.png, sbc.png, "
                                           "summary_<method>.png and samples.npz into --out. Problem i depends "
                                           "on (--seed, i) only, so runs over disjoint --first ranges can be "
                                           "merged.",
                               formatter_class=defaults, parents=[common])
    calibrate.add_argument("prior", help="'gaussian' (the gaussian-field model, closed form), or a checkpoint, "
                                         "exported prior or shipped prior of grey images (DPI with its surrogate; "
                                         "the truths are gaussian-field images)")
    calibrate.add_argument("--operator", required=True, help=f"forward model A, one of {OPERATOR_SPECS}")
    calibrate.add_argument("--sigma", type=float, required=True, help="noise std per measurement, units of y")
    calibrate.add_argument("--out", required=True, help="output folder")
    calibrate.add_argument("--method", choices=("exact", "dpi"), default="dpi",
                           help="the exact Gaussian posterior (prior 'gaussian' only) or a DPI fit per problem")
    calibrate.add_argument("--cov-scale", type=float, default=1.0,
                           help="exact method: multiply the posterior covariance (< 1 over-, > 1 under-confident)")
    calibrate.add_argument("--n-problems", type=int, default=100, help="simulated problems")
    calibrate.add_argument("--first", type=int, default=0, help="index of the first problem (for sharding)")
    calibrate.add_argument("--n-samples", type=int, default=200, help="posterior draws per problem")
    calibrate.add_argument("--size", type=int, default=8, help="image side for the prior 'gaussian'")
    calibrate.add_argument("--dpi-steps", type=int, default=300, help="DPI optimiser steps per problem")
    _reference_arguments(calibrate, " (prior 'gaussian': the exact posterior, whatever the number)")
    calibrate.add_argument("--t0", type=float, default=1e-3, help="smallest diffusion time of a checkpoint prior")
    calibrate.add_argument("--seed", type=int, default=0, help="seeds masks, problems and TARP references")
    calibrate.set_defaults(run=_calibrate)

def _parser() -> argparse.ArgumentParser:
    # --debug and --threads go before or after the command. The parsers share these actions: with a
    # SUPPRESS default, a subcommand leaves a value given before it alone (main reads them with getattr).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error instead of a one-line message")
    common.add_argument("--threads", type=int, default=argparse.SUPPRESS, metavar="N",
                        help="torch intra-op threads (default: torch's, one per core; 1 is often as fast for "
                             "these small tensors and never slowed down by other busy processes)")
    parser = argparse.ArgumentParser(prog="scoreprior", description=__doc__.split("\n")[0], parents=[common])
    parser.add_argument("--version", action="version", version=f"scoreprior {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    for add in (_add_train, _add_logprob, _add_demo, _add_posterior, _add_calibrate):
        add(sub, common)
    return parser

_BAD_INPUT = (ValueError, TypeError, OSError, ImportError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `scoreprior` command; returns the exit status.

    A library error becomes one line on stderr: status 2 for bad input (ValueError, TypeError, OSError
    such as FileNotFoundError, ImportError), 1 for a failed run (RuntimeError, `FitDiverged` among them).
    With --debug the exception propagates with its traceback.
    """
    args = _parser().parse_args(argv)
    threads = getattr(args, "threads", None)
    try:
        if threads is not None:
            torch.set_num_threads(positive_int(threads, "--threads"))
        return args.run(args)
    except (*_BAD_INPUT, RuntimeError) as err:
        if getattr(args, "debug", False):
            raise
        status = 2 if isinstance(err, _BAD_INPUT) else 1
        text = " ".join(str(err).split()) or type(err).__name__
        kind = "" if isinstance(err, (ValueError, FileNotFoundError, FitDiverged)) else f"{type(err).__name__}: "
        hint = " (--debug shows the traceback)" if status == 1 else ""
        print(f"scoreprior {args.command}: error: {kind}{text}{hint}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
