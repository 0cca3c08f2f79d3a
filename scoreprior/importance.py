"""Importance-sampling check of a fitted posterior q(x) against the exact prior density (PSIS).

With draws x_i ~ q and the unnormalised posterior p(y | x) p_theta(x), the importance weights

    log w_i = log p(y | x_i) + log p_theta(x_i) - log q(x_i)                                  (float64)

correct any expectation under q towards the posterior. Pareto-smoothed importance sampling (Vehtari,
Simpson, Gelman, Yao & Gabry, JMLR 2024; Yao et al., ICML 2018 for variational posteriors) fits a
generalised Pareto tail to the largest weights: its shape k̂ says whether the correction can be trusted.
k̂ < min(1 - 1 / log10 S, 0.7) for S draws: the corrected moments converge at a usable rate; above it,
q misses mass that the target has, and neither q's nor the corrected error bars are reliable.

log p_theta may come from a probability-flow ODE with a Hutchinson trace (`ScorePrior`), which is noisy.
Rule: when `log_prob_kwargs["divergence"]` is "hutchinson" (or "auto", for a `ScorePrior`, on images of
more than EXACT_MAX_DIM numbers), log p is evaluated `repeats` times with
independent probes and averaged; its per-draw standard error std / sqrt(repeats) is reported. Any other
prior is evaluated once and taken as deterministic (noise 0). Noise of order 1 nat in log w inflates k̂.
The smoothing itself is arviz-stats' `psislw` (a dependency of scoreprior, imported when first needed).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from scoreprior._checks import positive_int, probability
from scoreprior.density import EXACT_MAX_DIM, ScorePrior
from scoreprior.protocols import Likelihood, Prior

__all__ = ["PosteriorCheck", "check_posterior", "importance_draws"]

SCORE_PRIOR_KWARGS = {"divergence": "hutchinson", "n_probes": 8, "rtol": 1e-4, "atol": 1e-4}
"""log_prob options used for a `ScorePrior` when none are given."""
NOISE_LIMIT = 1.0
"""Median per-draw standard error of log p (nats) above which the check is not trusted."""
MIN_DRAWS = 25
"""PSIS fits its tail to floor(S / 5) >= 5 of the largest weights (S <= 225), so S >= 25."""
NO_LOG_Q = "no log q: importance check not possible for this sampler"


class PosteriorSampler(Protocol):
    """A fitted posterior: `sample(n) -> (x (n, *image_shape), log_q (n,) or None)`, like `DPI.sample`."""

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]: ...


@dataclass(frozen=True, eq=False)
class PosteriorCheck:
    """Verdict of a PSIS check on S = n draws of a fitted posterior.

    khat: Pareto shape of the weights' tail (nan when the sampler gives no log q, -inf when the largest
        weights are all equal); khat_threshold: min(1 - 1 / log10 S, 0.7); ess: 1 / sum w^2 of the smoothed
        normalised weights w; samples: (n, *image_shape) the draws; log_weights: (n,) float64 smoothed
        log w, normalised (logsumexp 0); raw_log_weights: (n,) float64 unsmoothed log w;
        log_prior_noise: (n,) float64 standard error of each draw's log p in nats (nan when not measured);
        mean, std: (*image_shape) importance-corrected moments, samples' dtype.
    Without log q every field but n and samples is None (khat nan) and `verdict` says so.
    """

    n: int
    khat: float
    khat_threshold: float
    samples: Tensor
    ess: float | None = None
    log_weights: Tensor | None = None
    raw_log_weights: Tensor | None = None
    log_prior_noise: Tensor | None = None
    mean: Tensor | None = None
    std: Tensor | None = None

    @property
    def noise_max(self) -> float:
        """Largest per-draw standard error of log p, nats (nan without weights or measurement)."""
        return math.nan if self.log_prior_noise is None else float(self.log_prior_noise.max())

    @property
    def noise_median(self) -> float:
        """Median per-draw standard error of log p, nats: the statistic compared with NOISE_LIMIT."""
        return math.nan if self.log_prior_noise is None else float(self.log_prior_noise.median())

    @property
    def reliable(self) -> bool:
        """khat < khat_threshold and the median log p noise <= NOISE_LIMIT (False when either is nan)."""
        return bool(self.khat < self.khat_threshold and self.noise_median <= NOISE_LIMIT)

    @property
    def log_weight_spread(self) -> float:
        """Standard deviation of the raw log weights over the draws, nats (nan without weights)."""
        finite = None if self.raw_log_weights is None else self.raw_log_weights[torch.isfinite(self.raw_log_weights)]
        return math.nan if finite is None or finite.numel() < 2 else float(finite.std())

    @property
    def verdict(self) -> str:
        """One line: k̂ against its threshold, ESS, and the log p noise set against the spread of log w."""
        if self.log_weights is None:
            return NO_LOG_Q
        k, thr = self.khat, self.khat_threshold
        noisy = not self.noise_median <= NOISE_LIMIT
        if k < thr and not noisy:
            text = f"k̂ = {k:.2f} (< {thr:.2f}): reliable; ESS {self.ess:.0f} of {self.n}"
        elif k < thr:
            text = f"k̂ = {k:.2f} (< {thr:.2f}) but not confirmed: the log p noise is too large; ESS {self.ess:.0f} of {self.n}"
        else:
            head = f"k̂ = {k:.2f} (≥ {thr:.2f})" if k == k else "k̂ not estimable (Pareto fit failed)"
            text = (f"{head}: do not trust these error bars — the posterior misses mass the exact density "
                    f"finds; ESS {self.ess:.0f} of {self.n}")
        if math.isnan(self.noise_median):
            return text + "; log p noise not measured (repeats=1): not trusted"
        if self.noise_max == 0:
            return text + "; log p deterministic"
        text += f"; log p noise ≤ {self.noise_max:.2g} nats (median {self.noise_median:.2g})"
        if noisy:
            rms = float(self.log_prior_noise.square().mean().sqrt())
            spread = self.log_weight_spread
            if k >= thr and spread > 3 * rms:
                text += (f"; log w spreads {spread:.3g} nats over the draws against an RMS noise of {rms:.2g}: "
                         "the noise does not explain k̂")
            else:
                text += (f"; median log p noise > {NOISE_LIMIT:g} nat inflates k̂: use more probes (n_probes) "
                         "or divergence='exact'")
        return text

    def _weights(self) -> Tensor:
        if self.log_weights is None:
            raise ValueError(f"no importance weights: {NO_LOG_Q}")
        return self.log_weights.exp()

    def interval(self, prob: float) -> Tensor:
        """Weighted equal-tailed interval per pixel: the (1 -/+ prob) / 2 weighted quantiles.

        Quantiles interpolate linearly between the sorted draws placed at their mid cumulative weights
        (the Hazen positions (i + 1/2) / n for equal weights). Returns (*image_shape, 2), samples' dtype.
        """
        prob = probability(prob, "prob")
        w = self._weights()
        x = self.samples.reshape(self.n, -1).to(torch.float64).mT  # (P, n)
        xs, order = x.sort(dim=1)
        ws = w.to(x.device)[order]
        mid = ws.cumsum(1) - 0.5 * ws
        levels = torch.tensor([(1 - prob) / 2, (1 + prob) / 2], dtype=x.dtype, device=x.device)
        hi = torch.searchsorted(mid, levels.expand(x.shape[0], 2).contiguous()).clamp(1, self.n - 1)
        lo = hi - 1
        m_lo, m_hi = mid.gather(1, lo), mid.gather(1, hi)
        frac = ((levels - m_lo) / (m_hi - m_lo).clamp_min(1e-300)).clamp(0.0, 1.0)
        q = torch.lerp(xs.gather(1, lo), xs.gather(1, hi), frac)
        return q.reshape(*self.samples.shape[1:], 2).to(self.samples.dtype)

    def resample(self, m: int, *, generator: torch.Generator | None = None) -> Tensor:
        """m draws from `samples` by systematic resampling with the smoothed weights. -> (m, *image_shape).

        generator: for the one uniform offset; must live on samples' device.
        """
        m = positive_int(m, "m")
        cdf = self._weights().to(self.samples.device).cumsum(0)
        offset = torch.rand(1, generator=generator, dtype=cdf.dtype, device=cdf.device)
        u = (offset + torch.arange(m, device=cdf.device)) / m
        idx = torch.searchsorted(cdf, u * cdf[-1]).clamp_max(self.n - 1)
        return self.samples[idx]

    def to_dict(self) -> dict[str, Any]:
        """Scalars for JSON; non-finite numbers become None."""
        def num(v: float | None) -> float | None:
            return v if v is not None and math.isfinite(v) else None

        max_w = None if self.log_weights is None else float(self.log_weights.max().exp())
        return {"n": self.n, "khat": num(self.khat), "khat_threshold": self.khat_threshold,
                "ess": num(self.ess), "max_weight": max_w, "log_prior_noise_max": num(self.noise_max),
                "log_prior_noise_median": num(self.noise_median), "log_weight_spread": num(self.log_weight_spread),
                "reliable": self.reliable,
                "verdict": self.verdict}


def _psislw():
    try:
        from arviz_stats.base import array_stats
    except ImportError as err:
        raise ImportError("check_posterior needs arviz-stats, a dependency of scoreprior: reinstall it "
                          "(pip install scoreprior)") from err
    return array_stats.psislw


def _batched(fn, x: Tensor, batch_size: int, bar, name: str, **kwargs: Any) -> Tensor:
    """fn(x[i:i+batch_size], **kwargs) concatenated, float64 (n,); ValueError naming `name` on bad output."""
    out = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size]
        lp = fn(xb, **kwargs)
        if not isinstance(lp, Tensor) or lp.shape != (xb.shape[0],):
            raise ValueError(f"{name}.log_prob: expected shape ({xb.shape[0]},), got {getattr(lp, 'shape', lp)}")
        out.append(lp.detach().to(torch.float64))
        bar.update(xb.shape[0])
    lp = torch.cat(out)
    bad = torch.isnan(lp) | (lp == math.inf)
    if bool(bad.any()):
        raise ValueError(f"{name}.log_prob: NaN or +inf for {int(bad.sum())} of {lp.numel()} draws")
    return lp


def _smooth(log_w: Tensor) -> tuple[Tensor, float]:
    """PSIS-smoothed normalised log weights (n,) and k̂ from raw log weights (n,) float64."""
    psislw = _psislw()
    try:
        # arviz-stats' psislw follows the PSIS-LOO convention: its input is a log-likelihood and the
        # raw log weights are its negative. Its output is normalised (logsumexp 0).
        with np.errstate(all="ignore"):
            smoothed, khat = psislw((-log_w).cpu().numpy(), r_eff=1, axis=-1)
    except ValueError as err:
        if "tail values are the same" not in str(err):
            raise
        # The largest weights tie: the weights are bounded, which the GPD shape of a point mass, -inf, says.
        return log_w - torch.logsumexp(log_w, 0), -math.inf
    if np.isnan(smoothed).any() or math.isnan(khat):
        # Weights spread over thousands of nats overflow the Pareto fit (psislw then returns NaN weights and
        # a meaningless k̂): the tail is heavier than any fit could show, so k̂ = inf.
        return log_w - torch.logsumexp(log_w, 0), math.inf
    return torch.from_numpy(smoothed).to(log_w.device), float(khat)


def importance_draws(
    samples: Tensor,
    log_q: Tensor | None,
    prior: Prior,
    likelihood: Likelihood,
    *,
    log_prob_kwargs: dict[str, Any] | None = None,
    repeats: int = 2,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> PosteriorCheck:
    """PSIS check of precomputed draws `samples` (n, *image_shape) of q with their log q (n,) in nats.

    log w = log p(y | x) + log p_theta(x) - log q(x), smoothed by arviz-stats' psislw (n >= 25).
    prior: a `Prior` (`scoreprior.protocols`); only `log_prob(x, **log_prob_kwargs) -> (B,)` is called, for a
        ScorePrior with kwargs defaulting to SCORE_PRIOR_KWARGS. With divergence="hutchinson" it runs
        `repeats` times, repeat r with its own probe generator seeded from `generator`, and the mean is used
        (see the module docstring).
    likelihood: a `Likelihood`; only `log_prob(x) -> (B,)` is called. Both run under no_grad in batches of
        `batch_size` draws.
    A draw with log p or log p(y | x) = -inf gets weight 0; NaN or +inf raises ValueError.
    log_q None (a sampler without a density): returns a PosteriorCheck with khat nan and no weights.
    Warns (UserWarning, the verdict) when k̂ >= threshold or the median log p noise exceeds 1 nat.
    """
    if not isinstance(samples, Tensor) or not samples.is_floating_point():
        got = samples.dtype if isinstance(samples, Tensor) else type(samples).__name__
        raise TypeError(f"samples: expected a floating-point tensor, got {got}")
    if samples.ndim < 2 or samples.shape[0] < MIN_DRAWS:
        raise ValueError(f"samples: expected shape (n, *image_shape) with n >= {MIN_DRAWS} draws, "
                         f"got {tuple(samples.shape)}")
    n = samples.shape[0]
    threshold = min(1.0 - 1.0 / math.log10(n), 0.7)
    if log_q is None:
        return PosteriorCheck(n=n, khat=math.nan, khat_threshold=threshold, samples=samples)
    if not isinstance(log_q, Tensor) or log_q.shape != (n,):
        got = tuple(log_q.shape) if isinstance(log_q, Tensor) else type(log_q).__name__
        raise ValueError(f"log_q: expected shape ({n},) for samples of shape {tuple(samples.shape)}, got {got}")
    if not bool(torch.isfinite(log_q).all()):
        raise ValueError(f"log_q: expected finite values, got {int((~torch.isfinite(log_q)).sum())} NaN or inf "
                         f"of {n}")
    repeats = positive_int(repeats, "repeats")
    batch_size = positive_int(batch_size, "batch_size")
    if log_prob_kwargs is None:
        log_prob_kwargs = SCORE_PRIOR_KWARGS if isinstance(prior, ScorePrior) else {}
    kwargs = dict(log_prob_kwargs)
    if isinstance(prior, ScorePrior) and kwargs.get("divergence", "auto") == "auto":
        # resolved here as ScorePrior.log_prob resolves it, so that the noise rule below sees the method
        kwargs["divergence"] = "exact" if samples[0].numel() <= EXACT_MAX_DIM else "hutchinson"
    noisy = kwargs.get("divergence") == "hutchinson"
    reps = repeats if noisy else 1
    x = samples.detach()
    with torch.no_grad(), tqdm(total=n * (reps + 1), desc="importance", disable=not progress) as bar:
        log_lik = _batched(likelihood.log_prob, x, batch_size, bar, "likelihood")
        runs = []
        for r in range(reps):
            if noisy:
                seed = int(torch.randint(0, 2**62, (1,), generator=generator,
                                         device=generator.device if generator is not None else "cpu"))
                kwargs["generator"] = torch.Generator(device=x.device).manual_seed(seed)
            runs.append(_batched(prior.log_prob, x, batch_size, bar, "prior", **kwargs))
    log_p = torch.stack(runs)  # (reps, n)
    if not noisy:
        noise = torch.zeros(n, dtype=torch.float64)
    elif reps == 1:
        noise = torch.full((n,), math.nan, dtype=torch.float64)
    else:
        inside = torch.isfinite(log_p).all(0)
        noise = torch.where(inside, log_p.std(0) / math.sqrt(reps), torch.zeros_like(log_p[0]))
    raw = (log_lik + log_p.mean(0) - log_q.detach().to(torch.float64)).to(x.device)
    if not bool(torch.isfinite(raw).any()):
        raise ValueError(f"samples: all {n} draws have zero weight (log p or log p(y | x) = -inf)")
    log_w, khat = _smooth(raw)
    w = log_w.exp().reshape(n, *([1] * (x.ndim - 1)))
    xd = x.to(torch.float64)
    mean = (w * xd).sum(0)
    std = (w * (xd - mean).square()).sum(0).sqrt()
    check = PosteriorCheck(
        n=n, khat=khat, khat_threshold=threshold, samples=samples, ess=float(1.0 / log_w.exp().square().sum()),
        log_weights=log_w, raw_log_weights=raw, log_prior_noise=noise.to(x.device),
        mean=mean.to(x.dtype), std=std.to(x.dtype),
    )
    if not check.reliable:
        warnings.warn(check.verdict, UserWarning, stacklevel=2)
    return check


def check_posterior(
    q: PosteriorSampler,
    prior: Prior,
    likelihood: Likelihood,
    *,
    n: int = 256,
    log_prob_kwargs: dict[str, Any] | None = None,
    repeats: int = 2,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> PosteriorCheck:
    """Verdict on a fitted posterior q by PSIS with the exact prior density: draw n, weigh, smooth.

    q: `sample(n, *, generator=None) -> (x (n, *image_shape), log_q (n,) or None)` (e.g. `DPI`), called
        under no_grad with `generator`, which then seeds the probe streams. n >= 25 draws.
    The other arguments and the result are those of `importance_draws`.

    Example:
        >>> import torch
        >>> from scoreprior.priors import GaussianPrior
        >>> class Flat:
        ...     def log_prob(self, x): return x.new_zeros(x.shape[0])
        >>> p = GaussianPrior(torch.zeros(1, 2, 2, dtype=torch.float64), torch.eye(4, dtype=torch.float64))
        >>> class Q:
        ...     def sample(self, n, *, generator=None):
        ...         x = p.sample(n, generator=generator)
        ...         return x, p.log_prob(x)
        >>> check_posterior(Q(), p, Flat(), n=100, generator=torch.Generator().manual_seed(0)).reliable
        True
    """
    n = positive_int(n, "n")
    if n < MIN_DRAWS:
        raise ValueError(f"n: expected at least {MIN_DRAWS} draws (PSIS fits its tail to n / 5 >= 5), got {n}")
    with torch.no_grad():
        out = q.sample(n, generator=generator)
    x, log_q = (out, None) if isinstance(out, Tensor) else out
    if isinstance(x, Tensor) and x.shape[:1] != (n,):
        raise ValueError(f"q.sample: expected draws of shape ({n}, *image_shape), got {tuple(x.shape)}")
    return importance_draws(x, log_q, prior, likelihood, log_prob_kwargs=log_prob_kwargs, repeats=repeats,
                            batch_size=batch_size, generator=generator, progress=progress)
