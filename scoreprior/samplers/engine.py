"""The sampler engine: what every sampler shares, so that a sampler is only its step.

`Run` (the options every sampler takes: end time, time grid, generator, dtype, device, progress), `time_grid`,
`integrate` (the loop: x ← step(x, i), under no_grad, checked by `Guard` after every step, with a progress
bar), `euler_step` (reverse SDE / probability flow), `tweedie` (E[x_0 | x_t]) and `check_likelihood`.
A sampler builds its initial state and a `step(x, i) -> x` closure over its time grid and data term, and
hands both to `integrate` (see `scoreprior.samplers.prior` for the smallest one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from scoreprior._checks import choice, implements, number
from scoreprior.likelihood import GaussianLikelihood
from scoreprior.protocols import Likelihood
from scoreprior.sde import SDE, per_sample

__all__ = ["Run", "as_run", "CountedScore", "Guard", "time_grid", "integrate", "euler_step", "tweedie", "check_likelihood",
           "conjugate_gradients", "TIME_GRIDS"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]
TIME_GRIDS = ("uniform", "log_snr", "edm")


@dataclass(frozen=True)
class Run:
    """How a sampler runs: the options every sampler shares, validated here once.

    t0: the time the run ends at, 0 < t0 < T (each sampler says whether it takes a final denoising step);
    time_grid: the times T = t_0 > ... > t_steps = t0 (`time_grid`): "uniform" in t, "log_snr" (uniform in
        log(s / a)) or "edm"; None: the sampler's own default ("uniform", except `sample_prior`: "log_snr", and `ws_sample`'s
        ancestral sampler);
    generator: draws the initial state and every noise (None: the global RNG);
    dtype, device: of the samples; progress: show a tqdm bar.
    Example: `dps(score, sde, likelihood, 16, (1, 32, 32), run=Run(generator=g, progress=False))`.
    """

    t0: float = 1e-3
    time_grid: str | None = None
    generator: torch.Generator | None = None
    dtype: torch.dtype = torch.float32
    device: torch.device | str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        number(self.t0, "t0", low=0.0)
        if self.time_grid is not None:
            choice(self.time_grid, "time_grid", TIME_GRIDS)
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(self.generator).__name__}")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point or self.dtype.is_complex:
            raise TypeError(f"dtype: expected a real floating-point torch.dtype, got {self.dtype!r}")
        if not isinstance(self.progress, bool):
            raise TypeError(f"progress: expected True or False, got {self.progress!r}")

    def noise(self, like: Tensor) -> Tensor:
        """z ~ N(0, I) shaped like `like`, from the generator."""
        return torch.randn(like.shape, generator=self.generator, dtype=like.dtype, device=like.device)

    def initial(self, sde: SDE, shape: tuple[int, ...]) -> Tensor:
        """x_T ~ the SDE's reference density, (n, *event_shape), in the run's dtype and device."""
        return sde.prior_sample(shape, generator=self.generator, device=self.device, dtype=self.dtype)

    def times(self, sde: SDE, steps: int, default: str = "uniform") -> Tensor:
        """The grid T = t_0 > ... > t_steps = t0 of `time_grid` (this run's kind, else `default`), (steps + 1,) float64."""
        return time_grid(sde, steps, self.t0, self.time_grid or default)


def as_run(run: object) -> Run:
    """run, or the default `Run()` for None; TypeError for anything else."""
    if run is None:
        return Run()
    if not isinstance(run, Run):
        raise TypeError(f"run: expected a scoreprior.samplers.Run or None, got {type(run).__name__}")
    return run


def time_grid(sde: SDE, steps: int, t0: float, kind: str = "uniform", *, start: float | None = None) -> Tensor:
    """Times start = t_0 > ... > t_steps = t0, (steps + 1,) float64 (start: default the SDE's T).

    kind: "uniform" in t; "log_snr": uniform in tau = log(s / a) (`SDE.log_noise_ratio`), so each step removes the
    same factor of noise-to-signal; "edm": sigma_i^(1/7) uniform, sigma = s / a (Karras et al., NeurIPS 2022).
    sde: anything with T, `log_noise_ratio` and `time_at_log_noise_ratio` (every `SDE`).
    """
    choice(kind, "time_grid", TIME_GRIDS)
    start = sde.T if start is None else start
    if kind == "uniform":
        return torch.linspace(start, t0, steps + 1, dtype=torch.float64)
    tau = sde.log_noise_ratio(torch.tensor([start, t0], dtype=torch.float64))
    u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    if kind == "log_snr":
        taus = tau[0] + u * (tau[1] - tau[0])
    else:
        rho = 7.0
        ends = tau.exp() ** (1 / rho)
        taus = torch.log((ends[0] + u * (ends[1] - ends[0])) ** rho)
    times = sde.time_at_log_noise_ratio(taus)
    times[0], times[-1] = start, t0
    return times


def conjugate_gradients(apply: Callable[[Tensor], Tensor], rhs: Tensor, x: Tensor, *, iters: int,
                        rtol: float) -> Tensor:
    """Solve P u = rhs for a symmetric positive semi-definite P per sample, by batched conjugate gradients from u = x.

    apply: u -> P u on (B, ...) real tensors; rhs, x: (B, ...). A chain stops moving once its residual norm is
    below rtol times its initial one; the loop ends when all have, or after `iters` iterations. Started at 0 on a
    singular P (A^H A), the iterates stay in P's range and tend to the minimum-norm solution. Returns (B, ...).
    """
    tiny = torch.finfo(rhs.dtype).tiny
    u = x.clone()
    res = rhs - apply(u)
    p = res.clone()
    rr = res.flatten(1).square().sum(1)
    stop = rtol**2 * rr
    for _ in range(iters):
        active = rr > stop
        if not bool(active.any()):
            break
        q = apply(p)
        pq = (p * q).flatten(1).sum(1)
        alpha = torch.where(active, rr / pq.clamp_min(tiny), torch.zeros_like(rr))
        u = u + per_sample(alpha, u) * p
        res = res - per_sample(alpha, res) * q
        rr_new = res.flatten(1).square().sum(1)
        p = res + per_sample(rr_new / rr.clamp_min(tiny), p) * p
        rr = torch.where(active, rr_new, rr)
    return u


class CountedScore:
    """A score model that counts its calls: the network evaluations a sampler makes (one call evaluates a whole
    batch, so `calls` is the evaluations per sample). score: any `score(x, t)`; calls the wrapped model unchanged."""

    def __init__(self, score: ScoreFn) -> None:
        self.score, self.calls = score, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.score(x, t)


class Guard:
    """Stops a sampler whose state stops being finite or blows up, naming the step, time and weight.

    A state whose largest magnitude exceeds `factor` times that of the initial draw (at least 1) is
    taken as diverged: no sampler of a normalised prior legitimately moves that far, and an unstable
    linear recursion (Langevin with too large a step) reaches it long before overflowing to inf.
    name: the sampler's; x0: its initial state; total: its number of steps; weight: its guidance options, as text.
    """

    factor = 1e6

    def __init__(self, name: str, x0: Tensor, total: int, weight: str) -> None:
        self.name, self.total, self.weight = name, total, weight
        self.limit = self.factor * max(1.0, float(x0.detach().abs().max()))

    def __call__(self, x: Tensor, step: int, t: float) -> None:
        """Raise FloatingPointError unless x (after 0-based step `step`, at time t) is finite and bounded."""
        where = f"at step {step + 1}/{self.total}, t = {t:.4g}, with {self.weight}"
        advice = "lower the weight/step size or check the score model"
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise FloatingPointError(f"{self.name}: state became non-finite ({bad} NaN/inf entries) {where}; "
                                     f"{advice}")
        largest = float(x.abs().max())
        if largest > self.limit:
            raise FloatingPointError(f"{self.name}: state diverged (max |x| = {largest:.3g} > {self.limit:.3g}, "
                                     f"{self.factor:.0e} times the initial draw's) {where}; {advice}")


def integrate(step: Callable[[Tensor, int], Tensor], x: Tensor, times: Tensor, *, name: str, weight: str,
              progress: bool, desc: str | None = None) -> Tensor:
    """The loop of every sampler: x ← step(x, i) for i = 0, ..., len(times) - 1, without autograd (a step that
    needs gradients enables them itself), checking the state after each step (`Guard`).

    times: (total,) the time of each step, for the messages; name, weight: for the messages (see `Guard`);
    progress: a tqdm bar labelled `desc` (default: name). Returns the final state.
    """
    total = len(times)
    guard = Guard(name, x, total, weight)
    with torch.no_grad():
        for i in tqdm(range(total), desc=desc or name, disable=not progress):
            x = step(x, i)
            guard(x, i, float(times[i]))
    return x


def euler_step(sde: SDE, x: Tensor, t: Tensor, dt: float, score: Tensor, z: Tensor | None) -> Tensor:
    """One Euler(-Maruyama) step of the reverse SDE (z given) or probability-flow ODE (z None), dt < 0.

    SDE: x + [f(x, t) - g(t)^2 s] dt + g(t) sqrt(-dt) z;  ODE: x + [f(x, t) - g(t)^2 s / 2] dt.
    x, score, z: (B, *event_shape); t: (B,).
    """
    if z is None:
        return x + sde.ode_drift(x, t, score) * dt
    g = per_sample(sde.diffusion(t), x)
    drift = per_sample(sde.drift_coeff(t), x) * x - g * g * score
    return x + drift * dt + g * (-dt) ** 0.5 * z


def tweedie(sde: SDE, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
    """E[x_0 | x_t] = (x_t + s(t)^2 score) / a(t) (Tweedie's formula). x, score: (B, *event_shape); t: (B,)."""
    a, std = sde.marginal(t)
    return (x + per_sample(std * std, x) * score) / per_sample(a, x)


def check_likelihood(likelihood: Likelihood, event_shape: tuple[int, ...], *, linear: str | None = None) -> None:
    """TypeError unless likelihood is a `Likelihood`; ValueError naming event_shape when the likelihood's y
    does not match A on images of that shape.

    linear: the sampler's name when it needs a linear-Gaussian likelihood (TypeError for any other).
    """
    if linear is not None and not isinstance(likelihood, GaussianLikelihood):
        raise TypeError(f"likelihood: {linear} needs a linear operator and Gaussian noise (a GaussianLikelihood), "
                        f"got {type(likelihood).__name__}; use dps or DPI for non-linear data such as closures")
    implements(likelihood, "likelihood", Likelihood)
    if not isinstance(event_shape, (tuple, list, torch.Size)) or not all(isinstance(s, int) and s > 0
                                                                      for s in event_shape):
        raise ValueError(f"event_shape: expected a tuple of positive ints like (1, 32, 32), got {event_shape!r}")
    try:
        likelihood.validate(tuple(event_shape))
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"event_shape {tuple(event_shape)} does not match the likelihood: {err}") from None
