"""Whitened-score sampling with a data term, and the choice of its weight λ (Alido et al. 2025, Algorithm 1).

`ws_sample` (probability-flow ODE, reverse SDE or ancestral steps), the dehazing measurement model `Haze`,
`power_spectrum` of training images for the covariance data step, and `sweep_lambda` / `choose_lambda`
(discrepancy principle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from collections.abc import Callable, Sequence
from numbers import Real

import torch
from torch import Tensor

from scoreprior._checks import choice, number, positive_int, sampler_options
from scoreprior.likelihood import DiagonalCovariance, FourierDiagonalCovariance, GaussianLikelihood
from scoreprior.metrics import psnr, ssim
from scoreprior.operators import Identity, LinearOperator
from scoreprior.samplers.engine import Run, as_run, integrate
from scoreprior.sde import per_sample
from scoreprior.ws.process import WSProcess, check_spectrum, fourier_filter

__all__ = ["Haze", "power_spectrum", "AutoLambda", "ws_sample", "sweep_lambda", "choose_lambda"]

ModelFn = Callable[[Tensor, Tensor], Tensor]


class Haze:
    """Measurement model y = A x + haze, haze ~ N(0, sigma^2 K K^T) with K of a noise spectrum (dehazing).

    spectrum: kappa (H, W) of the haze filter (e.g. the WS prior's), floored at 1e-12 of its maximum so the
    covariance is invertible; sigma: haze amplitude (> 0), in image units at zero frequency when kappa(0) = 1;
    operator: A (default `Identity`; e.g. `GaussianBlur` for deblurring + dehazing), acting on (B, C, H, W).
    """

    def __init__(self, spectrum: Tensor, sigma: float, operator: LinearOperator | None = None):
        kappa = check_spectrum(spectrum)
        self.spectrum = kappa.clamp_min(1e-12 * float(kappa.max()))
        self.sigma = number(sigma, "sigma", low=0.0)
        self.operator = operator if operator is not None else Identity()

    def covariance(self, channels: int) -> FourierDiagonalCovariance:
        """The haze covariance sigma^2 K K^T on (channels, H, W) measurements."""
        return FourierDiagonalCovariance((self.sigma * self.spectrum) ** 2 * torch.ones(channels, 1, 1,
                                                                                       dtype=torch.float64))

    def sample(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """y = A x + haze. x: (B, C, H, W) -> (B, C, H, W)."""
        ax = self.operator.A(x)
        z = torch.randn(ax.shape, generator=generator, dtype=ax.dtype, device=ax.device)
        return ax + self.covariance(ax.shape[1]).color(z)

    def likelihood(self, y: Tensor) -> GaussianLikelihood:
        """GaussianLikelihood(A, y, sigma^2 K K^T) for one measurement y: (1, C, H, W)."""
        if not isinstance(y, Tensor) or y.ndim != 4:
            raise ValueError(f"y: expected shape (1, C, H, W), got {getattr(y, 'shape', type(y).__name__)}")
        return GaussianLikelihood(self.operator, y, self.covariance(y.shape[1]))


def power_spectrum(images: Tensor) -> Tensor:
    """Mean power per frequency of images about each channel's mean pixel value: (H, W) float64.

    c[p, q] = mean over images and channels of |F(x - mean)[p, q]|^2, F the unitary 2-D DFT (fft2 grid):
    the per-frequency variances of the stationary Gaussian fitted to the images (the `prior_spectrum` of
    `ws_sample`'s covariance data step, and the `cov_spectrum` of `GaussianWhitenedScore`).
    images: (N, C, H, W) real, N >= 2.
    """
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(f"images: expected a real (N, C, H, W) tensor with N >= 2, "
                         f"got {getattr(images, 'shape', type(images).__name__)}")
    x = images.detach().to(torch.float64)
    centred = x - x.mean(dim=(0, 2, 3), keepdim=True)
    return torch.fft.fft2(centred, norm="ortho").abs().square().mean(dim=(0, 1)) * x.shape[0] / (x.shape[0] - 1)


class _CovarianceStep:
    """Per-frequency Gaussian algebra of x_0 | x_t (and y) under a stationary Gaussian prior, for `ws_sample`.

    With x_0 ~ N(m, F^H diag(c) F), x_0 | x_t is Gaussian with mean x̂_0 (Tweedie) and, per frequency,
        Jacobian J = d x̂_0 / d x_t = a c / (a^2 c + s^2 kappa^2),  variance C_t = c s^2 kappa^2 / (a^2 c + s^2 kappa^2),
    so for y = A x_0 + b with circulant A (transfer function h) and stationary noise (spectrum sigma2),
    y | x_t ~ N(A x̂_0, A C_t A^H + Sigma) and, per frequency, the data term (`__call__`) is
        beta kappa^2 grad log p(y | x_t) = beta kappa^2 J conj(h) F(y - A x̂_0) / (|h|^2 C_t + sigma2),
    and Var[x_0 | x_t, y] = 1 / (1 / C_t + |h|^2 / sigma2) (`variance`; C_t without a likelihood).
    Exact for a Gaussian prior; for a network x̂_0 is the network's and J, C_t those of the Gaussian with the
    images' power spectrum c (a second-order approximation, Π-GDM-like, per frequency instead of one scalar).
    likelihood: a `GaussianLikelihood` or None (then only `variance` is used).
    """

    def __init__(self, likelihood: GaussianLikelihood | None, process: WSProcess, prior_spectrum: Tensor,
                 event_shape: tuple[int, int, int]):
        c = prior_spectrum if isinstance(prior_spectrum, Tensor) and prior_spectrum.ndim == 2 else None
        if c is None or tuple(c.shape) != process.size:
            raise ValueError(f"prior_spectrum: expected a (H, W) = {process.size} tensor of per-frequency variances "
                             f"(see power_spectrum), got {getattr(prior_spectrum, 'shape', prior_spectrum)!r}")
        self.c = check_spectrum(c, "prior_spectrum")
        if not bool((self.c > 0).all()):
            raise ValueError("prior_spectrum: expected positive values at every frequency")
        self.process, self.likelihood = process, likelihood
        if likelihood is not None:
            self.transfer = self._transfer_function(likelihood.operator, event_shape)
            self.noise = self._noise_spectrum(likelihood.noise, event_shape)

    @staticmethod
    def _transfer_function(operator: LinearOperator, event_shape: tuple[int, int, int]) -> Tensor:
        """fft2 of A's impulse response, (C, H, W) complex128; TypeError unless A is circulant (checked)."""
        impulse = torch.zeros((1, *event_shape), dtype=torch.float64)
        impulse[..., 0, 0] = 1.0
        probe = torch.randn((1, *event_shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        try:
            transfer = torch.fft.fft2(operator.A(impulse))[0]
            ok = transfer.shape == impulse.shape[1:] and torch.allclose(
                operator.A(probe), torch.fft.ifft2(transfer * torch.fft.fft2(probe)).real, rtol=1e-6, atol=1e-9)
        except (RuntimeError, ValueError):
            ok = False
        if not ok:
            raise TypeError(f"likelihood: the covariance data step needs a circulant operator (a convolution that "
                            f"keeps the image shape, e.g. Identity or GaussianBlur), got {operator!r}")
        return transfer

    @staticmethod
    def _noise_spectrum(noise: object, event_shape: tuple[int, int, int]) -> Tensor:
        """Per-frequency noise variances (C, H, W); TypeError unless the noise is stationary."""
        if isinstance(noise, FourierDiagonalCovariance):
            return noise.spectrum.to(torch.float64).expand(event_shape)
        if isinstance(noise, DiagonalCovariance) and bool((noise.std == noise.std.flatten()[0]).all()):
            return (noise.std.flatten()[0].to(torch.float64) ** 2).expand(event_shape)
        raise TypeError(f"likelihood: the covariance data step needs stationary noise (FourierDiagonalCovariance or "
                        f"one std for every pixel), got {noise!r}")

    def _moments(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(J, C_t) per frequency, (H, W) float64, at the first time of t: (B,)."""
        a, s = (float(v) for v in self.process.marginal(t[:1].double()))
        kappa2 = self.process.spectrum**2
        denominator = a * a * self.c + s * s * kappa2
        return a * self.c / denominator, self.c * s * s * kappa2 / denominator

    def variance(self, t: Tensor) -> Tensor:
        """Var[x_0 | x_t (, y)] per frequency: (H, W), or (C, H, W) with a likelihood; float64."""
        variance = self._moments(t)[1]
        if self.likelihood is None:
            return variance
        return 1 / (1 / variance + self.transfer.abs().square() / self.noise)

    def __call__(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """The data term to add to the whitened score n. x, score: (B, C, H, W); t: (B,) equal times."""
        jacobian, variance = self._moments(t)
        beta = float(self.process.beta(t[:1].double()))
        kappa2 = self.process.spectrum**2
        gain = beta * kappa2 * jacobian * self.transfer.conj() / (self.transfer.abs().square() * variance + self.noise)
        x0 = self.process.tweedie(x, t, score)
        r = self.likelihood.y.to(x) - self.likelihood.operator.A(x0)
        return torch.fft.ifft2(torch.fft.fft2(r.double()) * gain.to(x.device)).real.to(x.dtype)


def _check_grid(grid: object) -> None:
    """ValueError unless grid is a non-empty sequence of numbers >= 0 (the λ values of a discrepancy search)."""
    if not grid or any(isinstance(v, bool) or not isinstance(v, Real) or not v >= 0 for v in grid):
        raise ValueError(f"grid: expected a non-empty sequence of numbers >= 0, got {grid!r}")


RESIDUALS = ("x", "tweedie", "x-gradient", "tweedie-gradient", "covariance")


@dataclass(frozen=True)
class AutoLambda:
    """`ws_sample`'s lam="auto" with its options: λ by the discrepancy principle (`choose_lambda`) over `grid`,
    from pilot runs of `steps` steps (None: the sampler's steps // 4, or the fewest the method allows) with `n`
    samples each. lam="auto" is `AutoLambda()`."""

    grid: Sequence[float] = (0.03, 0.1, 0.3, 1.0, 3.0)
    steps: int | None = None
    n: int = 2

    def __post_init__(self) -> None:
        _check_grid(self.grid)
        if self.steps is not None:
            positive_int(self.steps, "steps")
        positive_int(self.n, "n")


def _data_term(likelihood: GaussianLikelihood | None, process: WSProcess, residual: str,
               gaussian: _CovarianceStep | None) -> Callable[[Tensor, Tensor, Tensor, float], Tensor] | None:
    """The data step of `ws_sample`: term(x, t, n, λ) -> the whitened score with the data term added (None
    without a likelihood). x, n: (B, C, H, W); t: (B,) equal times."""
    if likelihood is None:
        return None
    if residual == "covariance":
        return lambda x, t, n, lam: n + lam * gaussian(x, t, n)

    def term(x: Tensor, t: Tensor, n: Tensor, lam: float) -> Tensor:
        target = process.tweedie(x, t, n) if residual.startswith("tweedie") else x
        d = likelihood.operator.A_adjoint(likelihood.residual(target))
        if residual.endswith("gradient"):
            return n + lam * per_sample(process.beta(t), x) * d
        ratio = n.flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
        return n + lam * per_sample(ratio, x) * d

    return term


def _lambda_schedule(lam: object, likelihood: GaussianLikelihood | None, choose: Callable[[AutoLambda], float]
                     ) -> Callable[[float], float]:
    """lam as a schedule t -> λ: a number, a callable, or "auto" / an `AutoLambda` resolved by `choose`."""
    if isinstance(lam, str):
        if lam != "auto":
            raise ValueError(f"lam: expected a number, a callable, 'auto' or an AutoLambda, got {lam!r}")
        lam = AutoLambda()
    if isinstance(lam, AutoLambda):
        if likelihood is None:
            raise ValueError("lam: 'auto' needs a likelihood")
        lam = choose(lam)
    if callable(lam):
        return lam
    value = number(lam, "lam", low=0.0, low_open=False)
    return lambda t: value


def ws_sample(
    model: ModelFn,
    process: WSProcess,
    n: int,
    event_shape: tuple[int, int, int],
    *,
    likelihood: GaussianLikelihood | None = None,
    lam: float | Callable[[float], float] | str | AutoLambda = 1.0,
    residual: str | None = None,
    prior_spectrum: Tensor | None = None,
    method: str | None = None,
    steps: int = 1000,
    x_init: Tensor | None = None,
    run: Run | None = None,
) -> Tensor:
    """Whitened-score sampling, Algorithm 1 of Alido et al. (2025) with consistent signs.

    Grid t_0 = 1 > ... > t_steps = t0 (the run's `time_grid`), step Δ = t_i - t_{i+1}, n = model(x, t), β = β(t):
      data step (with a likelihood y = A x + b), by `residual`:
        "x" (the paper) / "tweedie": d = A^H(y - A x), or d = A^H(y - A x̂_0) with x̂_0 = (x + s^2 n / β) / a
          (no Jacobian), and n ← n + λ ‖n‖ d / ‖d‖ (Jalal et al.'s normalisation: λ is the ratio of the data step
          to the prior step, norms per sample, λ unitless);
        "x-gradient" / "tweedie-gradient": n ← n + λ β d (for y = A x + b, b ~ N(0, σ^2 K K^T) and A commuting
          with K, β K K^T ∇ log N(y; A x, σ^2 K K^T) = β A^H(y - A x) / σ^2, so λ = 1/σ^2 is the plain likelihood
          gradient; λ has units 1 / σ^2);
        "covariance" (needs `prior_spectrum` c, a circulant A and stationary noise): n ← n + λ n_y with
          n_y = β K K^T ∇ log N(y; A x̂_0, A C_t A^H + Σ), the Jacobian of x̂_0 and C_t = Cov[x_0 | x_t] those of
          the Gaussian prior with power spectrum c (`_CovarianceStep`): the exact posterior whitened score for a
          Gaussian prior, so λ = 1 is Bayes' rule (the default);
      "ode" (Algorithm 1, probability flow): x ← (2 - sqrt(1 - β Δ)) x + n Δ / 2,
      "sde" (reverse SDE):                   x ← (2 - sqrt(1 - β Δ)) x + n Δ + sqrt(β Δ) K z,
    both Euler steps of dx = [-β x / 2 - c n] dt backwards in time (2 - sqrt(1 - βΔ) = 1 + βΔ/2 + O(Δ^2)),
    c = 1/2 (ODE) or 1 (SDE);
      "ancestral" (needs `prior_spectrum`): x_{t'} ~ ∫ q(x_{t'} | x_t, x_0) N(x_0; x̂_0, V) dx_0, DDPM's step with
          structured noise, x̂_0 Tweedie's estimate from n (data step included) and V the per-frequency
          Var[x_0 | x_t, y] of the covariance step's Gaussian (`_ancestral_step`): exact for a Gaussian prior at any
          number of steps.
    Then a final Tweedie step x ← (x + s^2 n / β) / a at t0.

    model: whitened score n(x, t), x (B, C, H, W), t (B,); process: its `WSProcess`; n: samples;
    event_shape: (C, H, W); likelihood: y (1, C', H', W') and A (None: unconditional);
    lam: a number >= 0, a schedule lam(t: float) -> float, or "auto" / an `AutoLambda` (the discrepancy principle);
    residual: the data step above; default "covariance" when `prior_spectrum` is given, else "x";
    prior_spectrum: (H, W) per-frequency variances of the prior's images (`power_spectrum` of training images),
        for residual "covariance" and method "ancestral";
    method: "ode", "sde" or "ancestral" (above); default "ancestral" when `prior_spectrum` is given, else "ode";
    steps: grid steps; "ode" and "sde" need beta(t_i) (t_i - t_{i+1}) < 1 on the grid;
    x_init: (n, C, H, W) start (default x_T = K z, as trained);
    run: `Run` (t0; time_grid, default "log_snr" for "ancestral", else "uniform"; generator for z; dtype and
        device of the samples; progress). Raises FloatingPointError naming the step, t and λ.
    Returns (n, C, H, W).
    """
    run = as_run(run)
    method = method or ("ode" if prior_spectrum is None else "ancestral")
    ts = _check_sampler_options(process, n, event_shape, steps, method, run)
    residual = residual or ("x" if prior_spectrum is None else "covariance")
    choice(residual, "residual", RESIDUALS)
    if prior_spectrum is None and (residual == "covariance" or method == "ancestral"):
        raise ValueError("prior_spectrum: residual='covariance' and method='ancestral' need it (see power_spectrum)")
    if prior_spectrum is not None and residual != "covariance" and method != "ancestral":
        raise ValueError(f"prior_spectrum: only residual='covariance' or method='ancestral' use it, got residual="
                         f"{residual!r} and method={method!r}")

    def choose(auto: AutoLambda) -> float:
        pilot = auto.steps or max(steps // 4, math.floor(process.vp.beta_max) + 1)
        return choose_lambda(model, process, likelihood, event_shape, grid=auto.grid, n=auto.n, steps=pilot,
                             residual=residual, prior_spectrum=prior_spectrum, method=method, run=run)[0]

    schedule = _lambda_schedule(lam, likelihood, choose)
    if x_init is not None and (not isinstance(x_init, Tensor) or tuple(x_init.shape) != (n, *event_shape)):
        raise ValueError(f"x_init: expected shape {(n, *event_shape)}, got {getattr(x_init, 'shape', x_init)}")
    x = process.noise((n, *event_shape), generator=run.generator, device=run.device, dtype=run.dtype) \
        if x_init is None else x_init.to(device=run.device, dtype=run.dtype)
    if likelihood is not None:
        likelihood.validate(tuple(event_shape))
    gaussian = None if prior_spectrum is None else _CovarianceStep(likelihood, process, prior_spectrum,
                                                                   tuple(event_shape))
    data = _data_term(likelihood, process, residual, gaussian)

    def step(x: Tensor, i: int) -> Tensor:
        t, dt = float(ts[i]), float(ts[i] - ts[i + 1])
        tb = torch.full((n,), t, dtype=x.dtype, device=x.device)
        score = model(x, tb)
        if data is not None:
            score = data(x, tb, score, float(schedule(t)))
        if method == "ancestral":
            return _ancestral_step(process, x, tb, float(ts[i + 1]), score, gaussian.variance(tb), run.generator)
        beta = per_sample(process.beta(tb), x)
        if method == "ode":
            return (2 - torch.sqrt(1 - beta * dt)) * x + 0.5 * dt * score
        z = process.apply_K(run.noise(x))
        return (2 - torch.sqrt(1 - beta * dt)) * x + dt * score + torch.sqrt(beta * dt) * z

    weight = f"lam={lam if not callable(lam) else 'schedule'}"
    x = integrate(step, x, ts[:-1], name="ws_sample", weight=weight, progress=run.progress, desc=f"ws_sample[{method}]")
    t0 = torch.full((n,), run.t0, dtype=x.dtype, device=x.device)
    return integrate(lambda x, i: process.tweedie(x, t0, model(x, t0)), x, ts[-1:], name="ws_sample", weight=weight,
                     progress=False)


def _ancestral_step(process: WSProcess, x: Tensor, t: Tensor, t_next: float, score: Tensor, variance: Tensor,
                    generator: torch.Generator | None) -> Tensor:
    """A draw of x_{t'} | x_t, t' = t_next < t, for Gaussian x_0 | x_t with mean x̂_0 (Tweedie, from `score`) and
    per-frequency variance `variance` ((H, W) or (C, H, W), unitary DFT).

    With r = a(t) / a(t'), x_t | x_{t'} ~ N(r x_{t'}, v K K^T), v = s(t)^2 - r^2 s(t')^2, so (DDPM's posterior)
        x_{t'} | x_t, x_0 ~ N(w x_0 + r s(t')^2 / s(t)^2 x_t,  v s(t')^2 / s(t)^2 K K^T),  w = a(t') v / s(t)^2,
    and integrating x_0 out adds w^2 variance per frequency. Exact for a Gaussian prior at any step size.
    x, score: (B, C, H, W); t: (B,) equal times.
    """
    a, s = process.marginal(t)
    a_next, s_next = process.marginal(torch.full_like(t, t_next))
    r = a / a_next
    v = s**2 - r**2 * s_next**2
    w = float(a_next[0] * v[0] / s[0] ** 2)
    mean = w * process.tweedie(x, t, score) + per_sample(r * s_next**2 / s**2, x) * x
    power = float(v[0] * s_next[0] ** 2 / s[0] ** 2) * process.spectrum**2 + w**2 * variance
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return mean + fourier_filter(z, power.sqrt().expand(x.shape[1:]).reshape(1, *x.shape[1:]))


def _check_sampler_options(process: WSProcess, n: int, event_shape: tuple, steps: int, method: str, run: Run
                           ) -> Tensor:
    """Check the options; return the time grid (steps + 1,) float64."""
    sampler_options(n, steps, run.t0, process.T)
    if len(event_shape) != 3 or tuple(event_shape[1:]) != process.size:
        raise ValueError(f"event_shape: expected (C, {process.size[0]}, {process.size[1]}), got {tuple(event_shape)}")
    choice(method, "method", ("ode", "sde", "ancestral"))
    ts = run.times(process.vp, steps, "log_snr" if method == "ancestral" else "uniform")
    largest = float((process.beta(ts[:-1]) * (ts[:-1] - ts[1:])).max())
    if method != "ancestral" and largest >= 1:
        raise ValueError(f"steps: the Euler steps of 'ode' and 'sde' need beta * dt < 1, got {largest:.3g} with {steps} "
                         f"steps on the {run.time_grid or 'uniform'!r} grid (more steps; 'ancestral' takes any number)")
    return ts


def sweep_lambda(
    model: ModelFn,
    process: WSProcess,
    likelihood: GaussianLikelihood,
    event_shape: tuple[int, int, int],
    lams: Sequence[float],
    *,
    n: int = 2,
    truth: Tensor | None = None,
    data_range: float = 1.0,
    run: Run | None = None,
    **sample_options,
) -> list[dict]:
    """Run `ws_sample` for each λ in `lams`; per λ the mean data misfit and, given the truth, PSNR / SSIM.

    Every λ starts from the same seed state of the run's generator (common random numbers), without a progress
    bar. sample_options: passed to `ws_sample` (steps, method, residual, ...). truth: (1, C, H, W) image.
    Returns [{"lam", "misfit": mean_i ||y - A x_i||^2, "noise_energy": E||b||^2, "psnr", "ssim"}], the
    metrics being means over the n samples (None without truth).
    """
    if truth is not None and (not isinstance(truth, Tensor) or tuple(truth.shape) != (1, *event_shape)):
        raise ValueError(f"truth: expected shape {(1, *event_shape)}, got {getattr(truth, 'shape', truth)}")
    run = replace(as_run(run), progress=False)
    state = run.generator.get_state() if run.generator is not None else None
    rows = []
    for lam in lams:
        if state is not None:
            run.generator.set_state(state)
        x = ws_sample(model, process, n, event_shape, likelihood=likelihood, lam=float(lam), run=run,
                      **sample_options)
        misfit = float(likelihood.residual(x).abs().square().flatten(1).sum(1).mean())
        row = {"lam": float(lam), "misfit": misfit, "noise_energy": likelihood.noise_energy(), "psnr": None,
               "ssim": None}
        if truth is not None:
            ref = truth.to(x).expand_as(x)
            row["psnr"] = float(psnr(x, ref, data_range=data_range).mean())
            row["ssim"] = float(ssim(x, ref, data_range=data_range).mean())
        rows.append(row)
    return rows


def choose_lambda(
    model: ModelFn,
    process: WSProcess,
    likelihood: GaussianLikelihood,
    event_shape: tuple[int, int, int],
    *,
    grid: Sequence[float] = (0.03, 0.1, 0.3, 1.0, 3.0),
    n: int = 2,
    **sample_options,
) -> tuple[float, list[dict]]:
    """λ by the discrepancy principle (Morozov): the grid value whose short-run samples have a data misfit
    ||y - A x||^2 closest, in log, to the noise energy E||b||^2 = tr Σ_y.

    A sample that fits the data better than the noise does is over-fitting it; one that fits it worse
    ignores it. sample_options: passed to `sweep_lambda` / `ws_sample` (use few steps: it is a pilot run).
    Returns (λ, the sweep's rows).
    """
    _check_grid(grid)
    rows = sweep_lambda(model, process, likelihood, event_shape, grid, n=n, **sample_options)
    energy = likelihood.noise_energy()
    best = min(rows, key=lambda r: abs(math.log(max(r["misfit"], 1e-300) / energy)))
    return best["lam"], rows
