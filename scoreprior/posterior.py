"""Deep Probabilistic Imaging: a normalizing-flow variational posterior (Sun & Bouman, AAAI 2021).

DPI fits a RealNVP flow q_phi over flattened images by minimising, with reparameterised samples x ~ q_phi,

    KL(q_phi || p(. | y)) = E_q[-log p(y | x) - log p(x) + log q_phi(x)] + log p(y),

for any prior with a differentiable `log_prob(x) -> (B,)`: the exact probability-flow ODE density of a
score model (`ScorePrior`, Feng et al., ICCV 2023), its ELBO surrogate, or a closed-form prior.

Flow layout (Feng et al.'s port of Sun & Bouman's RealNVP), from a N(0, I) latent z to the image x:
each of `n_flows` steps is ActNorm -> affine coupling -> swap halves -> ActNorm -> affine coupling ->
swap halves, with a fixed random permutation of the pixels between steps, then an output map:
x = c z with a learned scalar c (unconstrained) or x = c softplus(z) (positive images). Layers are
normflows components; `forward`/`sample` run them in the generative direction and `log_prob` through
normflows' inverse pass.

Gaussian reference. With `reference=N(m, S)` (a `GaussianPrior`, typically the exact posterior of a
Gaussian fitted to the prior's images: `gaussian_posterior`), a fixed affine map x = m + L u, S = L L^T,
follows the flow, which starts at the identity (c = 1): the initial q is N(m, S) itself, and the flow
only learns how the posterior departs from it. Without it, the flow has to find the posterior's mean and
scales with Adam steps of size ~lr per parameter: on the 32x32 EHT problem of
`studies/eht_gaussian_posterior.py` (pixel values up to 1, posterior stds near 0.01) 600 steps end with
posterior stds 3.6x too small and a mean 1.3 posterior stds off; from a reference fitted to 256 prior
draws they end within 3 % of the exact mean (in posterior stds) and 0-3 % of its median std.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import normflows as nf
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scoreprior._checks import (
    batch_shape, choice, implements, integer, nonnegative_int, number, positive_float, positive_int,
)
from scoreprior.checkpoints import atomic_save, check_weights, read_checkpoint_file, weights_sha256
from scoreprior.optim import optimise
from scoreprior.priors import GaussianPrior
from scoreprior.protocols import Likelihood, Prior

__all__ = ["DPI", "FitConfig", "FitDiverged"]

_HISTORY_KEYS = ("loss", "nll", "neg_log_prior", "log_q", "flux_penalty", "skipped")
_CHECKPOINT_FORMAT = "scoreprior.DPI/1"


class FitDiverged(RuntimeError):
    """`DPI.fit` stopped or ended in a non-finite state: what diverged, at which step, what to try.

    step: the 1-based step where the divergence shows first (the first of the trailing skipped steps,
    or the last step); history: the per-step history up to there, as `DPI.fit` returns it.
    """

    def __init__(self, message: str, *, step: int, history: dict[str, list[float]]):
        super().__init__(message)
        self.step = step
        self.history = history


@dataclass(frozen=True)
class FitConfig:
    """Options of `DPI.fit`, validated once, on construction (ValueError / TypeError naming the option).

    steps: total number of optimiser steps (a resumed run continues up to it); batch_size: draws per step.
    lr: Adam learning rate, reached by a linear warm-up over `warmup` steps; then kept ("constant",
        as in Feng et al.) or decayed to 0 at `steps` by a half cosine ("cosine": the last steps average
        out the gradient noise, several times smaller mean errors for the same number of steps); see
        `learning_rate`.
    grad_clip: global-norm clipping threshold (None: no clipping).
    data_weight, prior_weight: weights (>= 0) of -log p(y | x) and -log p(x) in the loss (`DPI.fit`).
    flux_weight: weight (>= 0) of the soft flux constraint, used only when the DPI has `flux`; None: the
        default 1 / (2 (0.01 F)^2) of that flux F, i.e. a Gaussian of 1 % of F.
    path_gradient: differentiate log q_phi(x) only through the draw x, phi held fixed in the density
        ("sticking the landing", Roeder, Wu & Duvenaud, NeurIPS 2017): unbiased since E_q[grad_phi log q]
        = 0, and of vanishing variance as q approaches the posterior; costs one inverse pass per step
        (about 1.5x the time). On the 16x16 Gaussian test it cut the std error from 7% to 2% at equal
        steps. False: the plain reparameterisation gradient of Sun & Bouman.
    checkpoint_every: steps between checkpoints when `DPI.fit` is given a checkpoint file (and one at the end).
    max_consecutive_skips: a step whose loss or gradient is NaN/inf is skipped (no parameter or
        optimiser update, counted in history["skipped"]); this many in a row raise `FitDiverged`.
    log_every: steps over which the progress bar's running means are taken.

    Example:
        >>> config = FitConfig(steps=300, lr=1e-2)  # warm-up over 100 steps, then a cosine over 200
        >>> [config.learning_rate(k) for k in (0, 99, 200)]
        [0.0001, 0.01, 0.005]
    """

    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    schedule: str = "cosine"
    grad_clip: float | None = 1.0
    data_weight: float = 1.0
    prior_weight: float = 1.0
    flux_weight: float | None = None
    path_gradient: bool = True
    checkpoint_every: int = 200
    max_consecutive_skips: int = 20
    log_every: int = 10

    def __post_init__(self):
        checked = {
            "steps": positive_int(self.steps, "steps"),
            "batch_size": positive_int(self.batch_size, "batch_size"),
            "lr": positive_float(self.lr, "lr"),
            "warmup": nonnegative_int(self.warmup, "warmup"),
            "schedule": choice(self.schedule, "schedule", ("cosine", "constant")),
            "grad_clip": None if self.grad_clip is None else positive_float(self.grad_clip, "grad_clip"),
            "data_weight": number(self.data_weight, "data_weight", low=0.0, low_open=False),
            "prior_weight": number(self.prior_weight, "prior_weight", low=0.0, low_open=False),
            "flux_weight": (None if self.flux_weight is None
                            else number(self.flux_weight, "flux_weight", low=0.0, low_open=False)),
        }
        if not isinstance(self.path_gradient, bool):
            raise TypeError(f"path_gradient: expected True or False, got {self.path_gradient!r}")
        checked["checkpoint_every"] = positive_int(self.checkpoint_every, "checkpoint_every")
        checked["max_consecutive_skips"] = positive_int(self.max_consecutive_skips, "max_consecutive_skips")
        checked["log_every"] = positive_int(self.log_every, "log_every")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def learning_rate(self, step: int) -> float:
        """lr at 0-based `step`: lr (step + 1) / warmup during the warm-up, then lr ("constant") or
        lr (1 + cos(pi (step - warmup) / max(1, steps - warmup))) / 2 ("cosine")."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "constant":
            return self.lr
        return 0.5 * self.lr * (1.0 + math.cos(math.pi * (step - self.warmup) / max(1, self.steps - self.warmup)))


def _with_deprecated_options(config: FitConfig | None, deprecated: dict) -> FitConfig:
    """`config` (default FitConfig()) with the options given the old way, as keyword arguments of `DPI.fit`, and a
    DeprecationWarning that shows the FitConfig call; TypeError for unknown keywords."""
    config = FitConfig() if config is None else config
    if not isinstance(config, FitConfig):
        raise TypeError(f"config: expected a scoreprior.FitConfig, got {type(config).__name__}")
    if not deprecated:
        return config
    names = [f.name for f in dataclasses.fields(FitConfig)]
    unknown = sorted(set(deprecated) - set(names))
    if unknown:
        raise TypeError(f"DPI.fit() got unexpected keyword arguments {unknown}; fit options go in "
                        f"FitConfig({', '.join(names)})")
    call = ", ".join(f"{key}={value!r}" for key, value in deprecated.items())
    warnings.warn(f"dpi.fit(prior, likelihood, {call}) is deprecated: use dpi.fit(prior, likelihood, "
                  f"FitConfig({call}))", DeprecationWarning, stacklevel=3)
    return dataclasses.replace(config, **deprecated)


def _advice(config: FitConfig) -> str:
    """What to try when a fit with these options diverges."""
    return f"try a lower lr (now {config.lr:g}) or a longer warm-up (now {config.warmup} steps)"


def _accepts_generator(log_prob: object) -> bool:
    """Whether a log_prob method takes a `generator` keyword (SurrogatePrior, ScorePrior do)."""
    try:
        parameter = inspect.signature(log_prob).parameters.get("generator")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


class _CouplingNet(nn.Module):
    """Shift and bounded log-scale of an affine coupling, interleaved as normflows' AffineCoupling reads them.

    Dense(hidden) -> LeakyReLU(0.01) -> Dense(hidden) -> LeakyReLU(0.01) -> Dense(2 d_out), the last layer
    zero-initialised so the coupling starts as the identity; log-scale = tanh(raw), so one coupling scales
    a pixel by a factor in (1/e, e) and deep stacks cannot blow up early in training. Feng et al.'s
    BatchNorm after each hidden layer is left out: batch statistics would make a draw's x and log q depend
    on the rest of its batch (and on train/eval mode), so `sample` and `log_prob` would disagree.
    x1: (B, d_in) -> (B, 2 d_out) with shift at even and log-scale at odd columns.
    """

    def __init__(self, d_in: int, d_out: int, hidden: int):
        super().__init__()
        self.mlp = nf.nets.MLP([d_in, hidden, hidden, 2 * d_out], leaky=0.01, init_zeros=True)

    def forward(self, x1: Tensor) -> Tensor:
        raw = self.mlp(x1)
        return torch.stack((raw[:, 0::2], torch.tanh(raw[:, 1::2])), dim=2).flatten(1)


class _SoftplusScale(nf.flows.Flow):
    """x = c softplus(z) elementwise, c = exp(log_scale) a learned scalar: positive images.

    log |det dx/dz| = sum_i log sigmoid(z_i) + d log c. z, x: (B, d).
    """

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        log_det = F.logsigmoid(z).sum(1) + z.shape[1] * self.log_scale
        return F.softplus(z) * self.log_scale.exp(), log_det

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u = x * (-self.log_scale).exp()
        z = u + torch.log(-torch.expm1(-u))  # softplus^{-1}(u), stable for small and large u
        return z, -(F.logsigmoid(z).sum(1) + z.shape[1] * self.log_scale)


class _AffineReference(nf.flows.Flow):
    """x = m + L u with a fixed mean m (d,) and lower-triangular L (d, d): a Gaussian reference N(m, L L^T).

    log |det dx/du| = sum log diag L. u, x: (B, d).
    """

    def __init__(self, mean: Tensor, scale_tril: Tensor):
        super().__init__()
        self.register_buffer("mean", mean.reshape(1, -1).clone())
        self.register_buffer("scale_tril", scale_tril.clone())

    def _log_det(self) -> Tensor:
        return self.scale_tril.diagonal().log().sum()

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        return self.mean + u @ self.scale_tril.mT, self._log_det().expand(u.shape[0])

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u = torch.linalg.solve_triangular(self.scale_tril, (x - self.mean).mT, upper=False).mT
        return u, -self._log_det().expand(x.shape[0])


class DPI(nn.Module):
    """RealNVP variational posterior over images (Deep Probabilistic Imaging).

    image_shape: shape of one image, e.g. (C, H, W); the flow acts on the d = prod(image_shape) pixels.
    n_flows: number of flow steps (each holds two affine couplings and two ActNorms).
    hidden: width of the coupling networks' two hidden layers; default max(64, d // 8) (d / 8 as in
        Feng et al., with a floor so small images still get an expressive flow).
    seed: seeds the initial weights and the fixed permutations (the global RNG is left untouched).
    positive: images x = c softplus(z) > 0 (astronomy), with the softplus Jacobian in log q.
    flux: total flux F = sum x the images should carry, in image units; sets the initial output scale
        (below) and enables the soft flux penalty in `fit`.
    init_scale: initial output scale c. Default: F / (0.8 d) when positive and flux is given, since
        E softplus(z) = 0.806 for z ~ N(0, 1) makes the initial mean flux F (Sun & Bouman's rule); else 1.
    reference: a `GaussianPrior` N(m, S) on images of `image_shape` (see the module docstring): x = m + L
        (flow output), so the flow starts at q = N(m, S) when init_scale is 1 (its default here). Not
        with positive=True. Its mean and Cholesky factor are stored with the flow (buffers).
    device, dtype: where the flow's parameters live; samples come out with these.

    The ActNorm layers start at the identity (normflows' data-dependent initialisation is switched off):
    on the generative side it would only standardise N(0, I) draws, and would make the first call to
    `sample` change the parameters. With zero-initialised couplings the initial q is exactly
    N(0, c^2 I) (unconstrained) or the law of c softplus(z) (positive).
    """

    def __init__(
        self,
        image_shape: tuple[int, ...],
        *,
        n_flows: int = 16,
        hidden: int | None = None,
        seed: int = 0,
        positive: bool = False,
        flux: float | None = None,
        init_scale: float | None = None,
        reference: GaussianPrior | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not isinstance(image_shape, (tuple, list, torch.Size)) or len(image_shape) == 0:
            raise ValueError(f"image_shape: expected a non-empty tuple of positive integers, got {image_shape!r}")
        self.image_shape = tuple(positive_int(s, "image_shape") for s in image_shape)
        d = math.prod(self.image_shape)
        if d < 2:
            raise ValueError(f"image_shape: expected at least 2 pixels, got {self.image_shape}")
        self.n_flows = positive_int(n_flows, "n_flows")
        self.hidden = max(64, d // 8) if hidden is None else positive_int(hidden, "hidden")
        self.seed = integer(seed, "seed")
        self.positive = bool(positive)
        self.flux = None if flux is None else positive_float(flux, "flux")
        if init_scale is None:
            init_scale = self.flux / (0.8 * d) if (self.positive and self.flux is not None) else 1.0
        init_scale = positive_float(init_scale, "init_scale")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
        self.dim = d

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            flows: list[nf.flows.Flow] = []
            for k in range(self.n_flows):
                if k > 0:
                    flows.append(nf.flows.Permute(d, mode="shuffle"))
                for _ in range(2):
                    flows += [self._actnorm(d), self._coupling(d), nf.flows.Permute(d, mode="swap")]
        # AffineConstFlow over shape (1,) is one scalar log-scale s shared by all pixels: log det = d s.
        output = _SoftplusScale() if self.positive else nf.flows.AffineConstFlow((1,), shift=False)
        flows.append(output)
        self.reference = reference is not None
        if self.reference:
            flows.append(self._reference_layer(reference))
        base = nf.distributions.DiagGaussian(d, trainable=False)
        self.flow = nf.NormalizingFlow(base, flows)
        self.to(device=torch.device("cpu") if device is None else torch.device(device), dtype=dtype)
        with torch.no_grad():  # after the cast, so log c is exact in the flow's dtype
            (output.log_scale if self.positive else output.s).fill_(math.log(init_scale))

    def _reference_layer(self, reference: GaussianPrior) -> _AffineReference:
        if not isinstance(reference, GaussianPrior):
            raise TypeError(f"reference: expected a scoreprior.GaussianPrior, got {type(reference).__name__}")
        if tuple(reference.event_shape) != self.image_shape:
            raise ValueError(f"reference: expected a Gaussian on images of shape {self.image_shape}, got event "
                             f"shape {tuple(reference.event_shape)}")
        if self.positive:
            raise ValueError("reference: a Gaussian reference cannot be combined with positive=True")
        return _AffineReference(reference.mean.reshape(-1), reference.scale_tril)

    @staticmethod
    def _actnorm(d: int) -> nf.flows.ActNorm:
        layer = nf.flows.ActNorm((d,))
        layer.data_dep_init_done.fill_(1.0)
        return layer

    def _coupling(self, d: int) -> nf.flows.AffineCouplingBlock:
        d_in, d_out = (d + 1) // 2, d // 2  # torch.chunk puts the odd pixel in the first half
        return nf.flows.AffineCouplingBlock(_CouplingNet(d_in, d_out, self.hidden), scale_map="exp",
                                            split_mode="channel")

    @property
    def device(self) -> torch.device:
        """Device of the flow's parameters."""
        return self.flow.q0.loc.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point dtype of the flow's parameters."""
        return self.flow.q0.loc.dtype

    def _config(self) -> dict:
        return {"image_shape": list(self.image_shape), "n_flows": self.n_flows, "hidden": self.hidden,
                "positive": self.positive, "flux": self.flux, "reference": self.reference}

    def __repr__(self) -> str:
        return (f"DPI(image_shape={self.image_shape}, n_flows={self.n_flows}, hidden={self.hidden}, "
                f"positive={self.positive}, flux={self.flux}, reference={self.reference})")

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Push latents through the flow. z: (n, d) -> x (n, *image_shape), log |det dx/dz| (n,)."""
        if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z: expected shape (n, {self.dim}), got {tuple(getattr(z, 'shape', ()))}")
        log_det = z.new_zeros(z.shape[0])
        for layer in self.flow.flows:
            z, step = layer(z)
            log_det = log_det + step
        return z.reshape(-1, *self.image_shape), log_det

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n draws x ~ q_phi with their exact log-density, differentiable in the flow's parameters.

        log q(x) = log N(z; 0, I) - log |det dx/dz|, every layer's Jacobian included (couplings, ActNorms,
        output scale, softplus). Call under torch.no_grad() when no gradient is wanted.
        generator: for reproducible draws; must live on the flow's device.
        Returns x (n, *image_shape) and log_q (n,), in nats, the flow's dtype and device.
        """
        n = positive_int(n, "n")
        z = torch.randn(n, self.dim, generator=generator, device=self.device, dtype=self.dtype)
        x, log_det = self(z)
        return x, self.flow.q0.log_prob(z) - log_det

    def log_prob(self, x: Tensor) -> Tensor:
        """log q_phi(x) by the inverse flow (normflows' pass). x: (B, *image_shape) -> (B,), in nats.

        x is moved to the flow's device and dtype, and so is the result. With positive=True, images with
        any pixel <= 0 are outside the support: log q = -inf.
        """
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got {type(x).__name__}")
        batch_shape(x, "x", self.image_shape)
        flat = x.reshape(x.shape[0], -1).to(device=self.device, dtype=self.dtype)
        if not self.positive:
            return self.flow.log_prob(flat)
        outside = (flat <= 0).any(1)
        log_q = self.flow.log_prob(torch.where(flat > 0, flat, torch.ones_like(flat)))
        return log_q.masked_fill(outside, -math.inf)

    @torch.no_grad()
    def posterior_stats(
        self, *, n: int = 1024, batch_size: int = 256, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Pixelwise posterior mean and standard deviation (unbiased) from n draws of q_phi.

        Accumulated in float64 around the first batch's mean, in batches of `batch_size` draws.
        Returns mean, std: (*image_shape) each, the flow's dtype.
        """
        n = positive_int(n, "n")
        batch_size = positive_int(batch_size, "batch_size")
        if n < 2:
            raise ValueError(f"n: expected at least 2 draws for a standard deviation, got {n}")
        shift = None
        total = sq = None
        for start in range(0, n, batch_size):
            x = self.sample(min(batch_size, n - start), generator=generator)[0].double()
            if shift is None:
                shift = x.mean(0)
                total, sq = torch.zeros_like(shift), torch.zeros_like(shift)
            total += (x - shift).sum(0)
            sq += (x - shift).square().sum(0)
        mean = total / n
        var = (sq - n * mean.square()) / (n - 1)
        return (shift + mean).to(self.dtype), var.clamp_min(0).sqrt().to(self.dtype)

    def fit(
        self,
        prior: Prior,
        likelihood: Likelihood,
        config: FitConfig | None = None,
        *,
        prior_kwargs: dict | None = None,
        generator: torch.Generator | None = None,
        checkpoint: str | os.PathLike | None = None,
        resume: bool = True,
        progress: bool = True,
        **deprecated,
    ) -> dict[str, list[float]]:
        """Train q_phi by minimising the reverse KL to p(x | y) ∝ p(y | x) p(x) with Adam (`scoreprior.optim`).

        Per step, on a batch x ~ q_phi (reparameterised):
            loss = mean[data_weight (-log p(y | x)) + prior_weight (-log p(x)) + log q_phi(x)] + flux term,
        the flux term (only when the DPI has `flux`) being flux_weight · mean[(sum x - F)^2], a soft
        constraint outside the KL; flux_weight defaults to 1 / (2 (0.01 F)^2), i.e. a Gaussian of 1% of F.
        With unit weights the loss is KL(q || p(. | y)) - log p(y).

        prior: a `Prior` (`scoreprior.protocols`), `log_prob(x) -> (B,)` differentiable in x: (B, *image_shape);
            its `event_shape` must equal image_shape unless it is None.
        likelihood: a `Likelihood`, `log_prob(x) -> (B,)`; `likelihood.validate(image_shape)` is called first
            (e.g. GaussianLikelihood checks y against A).
        config: the optimisation options, a `FitConfig` (steps, batch size, learning-rate schedule,
            clipping, loss weights, path gradient, checkpoint and skip settings); default FitConfig(). They were
            keyword arguments before (dpi.fit(prior, lik, steps=4000, lr=1e-3)); that still works, with a
            DeprecationWarning that shows the FitConfig call.
        prior_kwargs: keyword arguments for every `prior.log_prob` call, e.g. for a ScorePrior
            dict(divergence="hutchinson", n_probes=1, adjoint=True, rtol=1e-3, atol=1e-3) (Feng et al.'s
            training set-up). When `prior.log_prob` takes a `generator` keyword (SurrogatePrior's times and
            noises, ScorePrior's Hutchinson probes) and prior_kwargs has none, it gets `generator` below,
            so the fit does not touch the global RNG.
        generator: draws the latents, and the prior's randomness (see prior_kwargs); default a
            torch.Generator seeded with the DPI's seed: DPI(seed=s).fit(...) is then reproducible.
        checkpoint: file written atomically every `config.checkpoint_every` steps and at the end (weights,
            Adam state, step, history, generator and global RNG states). With resume=True and an existing
            file, training continues from it, restoring both RNG states, so the result equals an
            uninterrupted run (priors that draw from the global RNG included).
        progress: show a tqdm bar with running means of -log p(y|x), -log p(x), log q over `config.log_every`
            steps.

        A step whose loss or gradient is NaN/inf is skipped (see `FitConfig.max_consecutive_skips`);
        FitDiverged (a RuntimeError) is raised after that many in a row, and also at the end when the fitted
        flow is not usable: non-finite parameters, non-finite draws (256 or batch_size, from a generator
        seeded with the DPI's seed), or, when the last step was skipped, a non-finite loss on a fresh check
        batch.

        Everything is validated before the first step. Returns the history, a dict of per-step lists:
        loss, nll, neg_log_prior, log_q, flux_penalty (batch means; NaN where not computed) and
        skipped (0 or 1).
        """
        config = _with_deprecated_options(config, deprecated)
        implements(prior, "prior", Prior)
        implements(likelihood, "likelihood", Likelihood)
        if prior.event_shape is not None and tuple(prior.event_shape) != self.image_shape:
            raise ValueError(f"prior: event_shape {tuple(prior.event_shape)} does not match the DPI image_shape "
                             f"{self.image_shape}")
        likelihood.validate(self.image_shape)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(self.seed)
        elif not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        path = None if checkpoint is None else Path(checkpoint)
        prior_kwargs = self._prior_options(prior, prior_kwargs, generator)

        optimizer = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=config.lr)
        history: dict[str, list[float]] = {key: [] for key in _HISTORY_KEYS}
        start = 0
        if path is not None and resume and path.exists():
            start, history = self._load_checkpoint(path, optimizer, generator)
        terms: dict[str, Tensor] = {}
        consecutive = 0

        def loss(step: int) -> Tensor:
            terms.update(self._loss_terms(prior, likelihood, config, generator, prior_kwargs))
            return (config.data_weight * terms["nll"] + config.prior_weight * terms["neg_log_prior"]
                    + terms["log_q"] + terms["flux_penalty"]).mean()

        def record(step: int, value: Tensor, ok: bool) -> None:
            nonlocal consecutive
            row = {key: float(term.detach().mean()) for key, term in terms.items()}
            row.update(loss=float(value.detach()), skipped=0 if ok else 1)
            for key in _HISTORY_KEYS:
                history[key].append(row[key])
            consecutive = 0 if ok else consecutive + 1
            if consecutive >= config.max_consecutive_skips:
                raise FitDiverged(f"fit diverged: {consecutive} consecutive steps (steps {step + 2 - consecutive}"
                                  f" to {step + 1}) had a non-finite loss or gradient; {_advice(config)}, or check "
                                  "the prior and the likelihood", step=step + 2 - consecutive, history=history)

        def postfix(step: int) -> dict | None:
            """Means over the steps of this run since the last refresh that were not skipped."""
            kept = [k for k in range(max(start, step + 1 - config.log_every), step + 1) if not history["skipped"][k]]
            if not kept:
                return None
            means = {key: f"{sum(history[key][k] for k in kept) / len(kept):.4g}"
                     for key in ("nll", "neg_log_prior", "log_q")}
            return {**means, "skipped": int(sum(history["skipped"]))}

        def save(step: int) -> None:
            self._save_checkpoint(path, optimizer, generator, step, history)

        optimise(optimizer, loss, config, start=start, on_step=record, postfix=postfix,
                 save=None if path is None else save, skip_nonfinite=True, progress=progress, desc="DPI")
        self._check_fitted(history, config, prior, likelihood, prior_kwargs)
        return history

    def _prior_options(self, prior: Prior, prior_kwargs: dict | None, generator: torch.Generator) -> dict:
        """prior_kwargs, with `generator` added when prior.log_prob takes one and none was given."""
        options = dict(prior_kwargs or {})
        if "generator" not in options and _accepts_generator(prior.log_prob):
            options["generator"] = generator
        return options

    def _check_fitted(
        self, history: dict[str, list[float]], config: FitConfig, prior: Prior, likelihood: Likelihood,
        prior_kwargs: dict,
    ) -> None:
        """Raise FitDiverged when the fitted flow is not usable (see `fit`); the user's generator is not used."""
        advice = _advice(config)
        skipped = history["skipped"]
        steps = len(skipped)
        trailing = next((k for k, s in enumerate(reversed(skipped)) if not s), steps)
        since = steps - trailing + 1 if trailing else steps
        where = (f"since step {since} (the last {trailing} of {steps} steps were skipped)" if trailing
                 else f"after step {steps}")
        bad = [name for name, p in self.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise FitDiverged(f"fit diverged: {len(bad)} flow parameter tensor(s) ({', '.join(bad[:3])}) are not "
                              f"finite {where}; {advice}", step=since, history=history)
        local = torch.Generator(device=self.device).manual_seed(self.seed)
        n = max(256, config.batch_size)
        with torch.no_grad():
            x, log_q = self.sample(n, generator=local)
        finite = torch.isfinite(x.flatten(1)).all(1) & torch.isfinite(log_q)
        if not bool(finite.all()):
            raise FitDiverged(f"fit diverged: {int((~finite).sum())} of {n} draws from the fitted flow are not "
                              f"finite {where}; {advice}", step=since, history=history)
        if trailing:
            options = self._prior_options(prior, {k: v for k, v in prior_kwargs.items() if k != "generator"}, local)
            terms = self._loss_terms(prior, likelihood, config, local, options)
            values = {key: float(value.detach().mean()) for key, value in terms.items()}
            broken = [key for key, value in values.items() if not math.isfinite(value)]
            if broken:
                raise FitDiverged(f"fit diverged: the loss of the fitted flow is not finite ({', '.join(broken)}) "
                                  f"{where}; {advice}", step=since, history=history)

    def _log_prob_through_sample(self, x: Tensor) -> Tensor:
        """log q_phi(x) with phi held fixed: its gradient reaches phi only through the draw x. x: (B, *image_shape)."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        try:
            return self.log_prob(x)
        finally:
            for p in trainable:
                p.requires_grad_(True)

    def _loss_terms(
        self, prior: Prior, likelihood: Likelihood, config: FitConfig, generator: torch.Generator, prior_kwargs: dict,
    ) -> dict[str, Tensor]:
        """Per-sample loss terms on a fresh batch of config.batch_size draws, each (B,); NaN-filled when the
        flow's draws are not finite."""
        batch_size = config.batch_size
        x, log_q = self.sample(batch_size, generator=generator)
        nan = torch.full_like(log_q, math.nan)
        flux_penalty = torch.zeros_like(log_q)
        if not bool(torch.isfinite(x).all()):
            # Priors may reject non-finite input outright; the step is skipped either way.
            return {"nll": nan, "neg_log_prior": nan, "log_q": log_q, "flux_penalty": nan}
        if config.path_gradient:
            log_q = self._log_prob_through_sample(x)
        nll = -likelihood.log_prob(x)
        neg_log_prior = -prior.log_prob(x, **prior_kwargs)
        for value, name in ((nll, "likelihood"), (neg_log_prior, "prior")):
            if value.shape != (batch_size,):
                raise ValueError(f"{name}: expected log_prob to return shape ({batch_size},) for a batch of "
                                 f"{batch_size} images, got {tuple(value.shape)}")
        if self.flux is not None:
            weight = 1.0 / (2.0 * (0.01 * self.flux) ** 2) if config.flux_weight is None else config.flux_weight
            flux_penalty = weight * (x.flatten(1).sum(1) - self.flux).square()
        return {"nll": nll, "neg_log_prior": neg_log_prior, "log_q": log_q, "flux_penalty": flux_penalty}

    def _rng_states(self, generator: torch.Generator) -> dict[str, Tensor]:
        states = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        return states

    def _save_checkpoint(
        self, path: Path, optimizer: torch.optim.Optimizer, generator: torch.Generator, step: int,
        history: dict[str, list[float]],
    ) -> None:
        """Write the training state to `path` atomically: a temporary file in the same folder, then os.replace."""
        model = self.state_dict()
        state = {"format": _CHECKPOINT_FORMAT, "config": self._config(), "model": model,
                 "weights_sha256": {"flow": weights_sha256(model)}, "optimizer": optimizer.state_dict(),
                 "step": step, "history": history, "rng": self._rng_states(generator)}
        atomic_save(state, path)

    def _load_checkpoint(
        self, path: Path, optimizer: torch.optim.Optimizer, generator: torch.Generator
    ) -> tuple[int, dict[str, list[float]]]:
        """Restore weights, optimiser, RNG states from `path`; return (step, history). ValueError names the file."""
        state = read_checkpoint_file(path, _CHECKPOINT_FORMAT)
        check_weights(path, {"flow": state["model"]}, state.get("weights_sha256"))
        if state["config"] != self._config():
            raise ValueError(f"checkpoint: {str(path)!r} was written by a flow with config {state['config']}, "
                             f"this one has {self._config()}")
        self.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng = state["rng"]
        generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        history = {key: list(state["history"][key]) for key in _HISTORY_KEYS}
        return int(state["step"]), history
