"""Whitened-score sampling with a data term, and the choice of its weight λ (Alido et al. 2025, Algorithm 1).

`ws_sample` (probability-flow ODE, reverse SDE or ancestral steps), the dehazing measurement model `Haze`,
`power_spectrum` of training images for the covariance data step, and `sweep_lambda` / `choose_lambda`
(discrepancy principle).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real

import torch
from torch import Tensor
from tqdm.auto import tqdm

from scoreprior._checks import choice, number, sampler_options
from scoreprior.likelihood import DiagonalCovariance, FourierDiagonalCovariance, GaussianLikelihood
from scoreprior.metrics import psnr, ssim
from scoreprior.operators import Identity, LinearOperator
from scoreprior.samplers import _Guard
from scoreprior.sde import per_sample
from scoreprior.ws.process import WSProcess, check_spectrum, fourier_filter

__all__ = ["Haze", "power_spectrum", "ws_sample", "sweep_lambda", "choose_lambda"]

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


def _per_sample_norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1)


def ws_sample(
    model: ModelFn,
    process: WSProcess,
    n: int,
    event_shape: tuple[int, int, int],
    *,
    likelihood: GaussianLikelihood | None = None,
    lam: float | Callable[[float], float] | str = 1.0,
    normalize: bool | None = None,
    residual: str | None = None,
    prior_spectrum: Tensor | None = None,
    method: str | None = None,
    steps: int = 1000,
    t0: float = 1e-3,
    time_grid: str | None = None,
    init: str = "structured",
    x_init: Tensor | None = None,
    tweedie: bool = True,
    auto_grid: Sequence[float] = (0.03, 0.1, 0.3, 1.0, 3.0),
    auto_steps: int | None = None,
    auto_n: int = 2,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Tensor:
    """Whitened-score sampling, Algorithm 1 of Alido et al. (2025) with consistent signs.

    Grid t_0 = 1 > ... > t_steps = t0 (`time_grid`), step Δ = t_i - t_{i+1}, n = model(x, t), β = β(t):
      data step (with a likelihood y = A x + b): d = A^H(y - A x) (residual "x", the paper) or
          d = A^H(y - A x̂_0), x̂_0 = (x + s^2 n / β) / a (residual "tweedie", no Jacobian), and n is replaced by
          n + λ ‖n‖ d / ‖d‖   (normalize, the default for these two, Jalal et al.: λ is the ratio of the data
                                 step to the prior step, norms per sample, λ unitless), or
          n + λ β d             (normalize=False: for y = A x + b, b ~ N(0, σ^2 K K^T) and A commuting with K,
                                 β K K^T ∇ log N(y; A x, σ^2 K K^T) = β A^H(y - A x) / σ^2, so λ = 1/σ^2 is the
                                 plain likelihood gradient; λ has units 1 / σ^2);
          or (residual "covariance", needs `prior_spectrum` c, a circulant A and stationary noise) n + λ n_y with
          n_y = β K K^T ∇ log N(y; A x̂_0, A C_t A^H + Σ), the Jacobian of x̂_0 and C_t = Cov[x_0 | x_t] those of
          the Gaussian prior with power spectrum c (`_CovarianceStep`): the exact posterior whitened score for a
          Gaussian prior, so λ = 1 is Bayes' rule (the default); never normalised;
      "ode" (Algorithm 1, probability flow): x ← (2 - sqrt(1 - β Δ)) x + n Δ / 2,
      "sde" (reverse SDE):                   x ← (2 - sqrt(1 - β Δ)) x + n Δ + sqrt(β Δ) K z,
    both Euler steps of dx = [-β x / 2 - c n] dt backwards in time (2 - sqrt(1 - βΔ) = 1 + βΔ/2 + O(Δ^2)),
    c = 1/2 (ODE) or 1 (SDE);
      "ancestral" (needs `prior_spectrum`): x_{t'} ~ ∫ q(x_{t'} | x_t, x_0) N(x_0; x̂_0, V) dx_0, DDPM's step with
          structured noise, x̂_0 Tweedie's estimate from n (data step included) and V the per-frequency
          Var[x_0 | x_t, y] of the covariance step's Gaussian (`_ancestral_step`): exact for a Gaussian prior at any
          number of steps.
    Then a final Tweedie step x ← (x + s^2 n / β) / a at t0, if `tweedie`.

    model: whitened score n(x, t), x (B, C, H, W), t (B,); process: its `WSProcess`; n: samples;
    event_shape: (C, H, W); likelihood: y (1, C', H', W') and A (None: unconditional);
    method: "ode", "sde" or "ancestral" (above); default "ancestral" when `prior_spectrum` is given, else "ode";
    time_grid: the times t_0 > ... > t_steps (`_time_grid`): "uniform" in t, "log_snr" (uniform in log(s / a), the
        default for "ancestral") or "edm"; "ode" and "sde" need beta(t_i) (t_i - t_{i+1}) < 1 on it;
    residual: "x", "tweedie" or "covariance" (above); default "covariance" when `prior_spectrum` is given, else "x";
    prior_spectrum: (H, W) per-frequency variances of the prior's images (`power_spectrum` of training images),
        for residual "covariance" only;
    lam: a number >= 0, a schedule lam(t: float) -> float, or "auto" (`choose_lambda` over `auto_grid` with
        `auto_steps` steps, default steps // 4 or the fewest allowed, and `auto_n` samples);
    init: "structured" (x_T = K z, as trained) or "white" (x_T = z); x_init: (n, C, H, W) start instead;
    generator: for z; dtype, device: of the samples. Raises FloatingPointError naming the step, t and λ.
    Returns (n, C, H, W).
    """
    if method is None:
        method = "ode" if prior_spectrum is None else "ancestral"
    if time_grid is None:
        time_grid = "log_snr" if method == "ancestral" else "uniform"
    ts = _check_sampler_options(process, n, event_shape, steps, t0, method, time_grid)
    if residual is None:
        residual = "x" if prior_spectrum is None else "covariance"
    choice(residual, "residual", ("x", "tweedie", "covariance"))
    if residual == "covariance" and normalize:
        raise ValueError("normalize: the covariance data step is the likelihood score itself (λ = 1 is Bayes' rule) "
                         "and is never normalised; leave normalize unset")
    if prior_spectrum is None and (residual == "covariance" or method == "ancestral"):
        raise ValueError("prior_spectrum: residual='covariance' and method='ancestral' need it (see power_spectrum)")
    if prior_spectrum is not None and residual in ("x", "tweedie") and method != "ancestral":
        raise ValueError(f"prior_spectrum: only residual='covariance' or method='ancestral' use it, got residual="
                         f"{residual!r} and method={method!r}")
    normalize = residual != "covariance" if normalize is None else normalize
    choice(init, "init", ("structured", "white"))
    if isinstance(lam, str):
        if lam != "auto":
            raise ValueError(f"lam: expected a number, a callable or 'auto', got {lam!r}")
        if likelihood is None:
            raise ValueError("lam: 'auto' needs a likelihood")
        pilot_steps = auto_steps or max(steps // 4, math.floor(process.vp.beta_max) + 1)
        lam, _ = choose_lambda(model, process, likelihood, event_shape, grid=auto_grid, n=auto_n, steps=pilot_steps,
                               t0=t0, normalize=normalize, residual=residual, prior_spectrum=prior_spectrum,
                               method=method, init=init, generator=generator, dtype=dtype, device=device)
    if not callable(lam):
        number(lam, "lam", low=0.0, low_open=False)
    schedule = lam if callable(lam) else (lambda t, value=float(lam): value)
    if x_init is not None:
        if not isinstance(x_init, Tensor) or tuple(x_init.shape) != (n, *event_shape):
            raise ValueError(f"x_init: expected shape {(n, *event_shape)}, got {getattr(x_init, 'shape', x_init)}")
        x = x_init.to(device=device, dtype=dtype)
    else:
        z = torch.randn((n, *event_shape), generator=generator, device=device, dtype=dtype)
        x = process.apply_K(z) if init == "structured" else z
    if likelihood is not None:
        likelihood.validate(tuple(event_shape))
    gaussian = None if prior_spectrum is None else _CovarianceStep(likelihood, process, prior_spectrum,
                                                                   tuple(event_shape))
    covariance_step = gaussian if residual == "covariance" and likelihood is not None else None
    guard = _Guard("ws_sample", x, steps, f"lam={lam if not callable(lam) else 'schedule'}")
    for i in tqdm(range(steps), desc=f"ws_sample[{method}]", disable=not progress):
        t = float(ts[i])
        dt = float(ts[i] - ts[i + 1])
        tb = torch.full((n,), t, dtype=x.dtype, device=x.device)
        beta = per_sample(process.beta(tb), x)
        with torch.no_grad():
            score = model(x, tb)
            if likelihood is not None:
                weight = float(schedule(t))
                if covariance_step is not None:
                    score = score + weight * covariance_step(x, tb, score)
                else:
                    target = process.tweedie(x, tb, score) if residual == "tweedie" else x
                    d = likelihood.operator.A_adjoint(likelihood.residual(target))
                    if normalize:
                        ratio = _per_sample_norm(score) / _per_sample_norm(d).clamp_min(torch.finfo(x.dtype).tiny)
                        score = score + weight * per_sample(ratio, x) * d
                    else:
                        score = score + weight * beta * d
            if method == "ancestral":
                x = _ancestral_step(process, x, tb, float(ts[i + 1]), score, gaussian.variance(tb), generator)
            elif method == "ode":
                x = (2 - torch.sqrt(1 - beta * dt)) * x + 0.5 * dt * score
            else:
                x = (2 - torch.sqrt(1 - beta * dt)) * x
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                x = x + dt * score + torch.sqrt(beta * dt) * process.apply_K(z)
        guard(x, i, t)
    if tweedie:
        tb = torch.full((n,), t0, dtype=x.dtype, device=x.device)
        with torch.no_grad():
            x = process.tweedie(x, tb, model(x, tb))
        guard(x, steps - 1, t0)
    return x


def _time_grid(process: WSProcess, steps: int, t0: float, kind: str) -> Tensor:
    """Times T = t_0 > ... > t_steps = t0, (steps + 1,) float64: uniform in t, uniform in log(s / a) ("log_snr"), or
    EDM's (Karras et al. 2022) sigma_i^(1/7) uniform, sigma = s / a ("edm")."""
    choice(kind, "time_grid", ("uniform", "log_snr", "edm"))
    if kind == "uniform":
        return torch.linspace(process.T, t0, steps + 1, dtype=torch.float64)
    tau = process.vp.log_noise_ratio(torch.tensor([process.T, t0], dtype=torch.float64))
    u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    if kind == "log_snr":
        taus = tau[0] + u * (tau[1] - tau[0])
    else:
        rho = 7.0
        ends = tau.exp() ** (1 / rho)
        taus = torch.log((ends[0] + u * (ends[1] - ends[0])) ** rho)
    times = process.vp.time_at_log_noise_ratio(taus)
    times[0], times[-1] = process.T, t0
    return times


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


def _check_sampler_options(process: WSProcess, n: int, event_shape: tuple, steps: int, t0: float,
                           method: str, time_grid: str) -> Tensor:
    """Check the options; return the time grid (steps + 1,) float64."""
    sampler_options(n, steps, t0, process.T)
    if len(event_shape) != 3 or tuple(event_shape[1:]) != process.size:
        raise ValueError(f"event_shape: expected (C, {process.size[0]}, {process.size[1]}), got {tuple(event_shape)}")
    choice(method, "method", ("ode", "sde", "ancestral"))
    ts = _time_grid(process, steps, t0, time_grid)
    largest = float((process.beta(ts[:-1]) * (ts[:-1] - ts[1:])).max())
    if method != "ancestral" and largest >= 1:
        raise ValueError(f"steps: the Euler steps of 'ode' and 'sde' need beta * dt < 1, got {largest:.3g} with {steps} "
                         f"steps on the {time_grid!r} grid (more steps; 'ancestral' takes any number)")
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
    generator: torch.Generator | None = None,
    **sample_options,
) -> list[dict]:
    """Run `ws_sample` for each λ in `lams`; per λ the mean data misfit and, given the truth, PSNR / SSIM.

    Every λ starts from the same seed state of `generator` (common random numbers). sample_options: passed
    to `ws_sample` (steps, method, normalize, residual, ...). truth: (1, C, H, W) image.
    Returns [{"lam", "misfit": mean_i ||y - A x_i||^2, "noise_energy": E||b||^2, "psnr", "ssim"}], the
    metrics being means over the n samples (None without truth).
    """
    if truth is not None and (not isinstance(truth, Tensor) or tuple(truth.shape) != (1, *event_shape)):
        raise ValueError(f"truth: expected shape {(1, *event_shape)}, got {getattr(truth, 'shape', truth)}")
    state = generator.get_state() if generator is not None else None
    rows = []
    for lam in lams:
        if generator is not None:
            generator.set_state(state)
        x = ws_sample(model, process, n, event_shape, likelihood=likelihood, lam=float(lam), generator=generator,
                      progress=False, **sample_options)
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
    if not grid or any(not isinstance(v, Real) or not v >= 0 for v in grid):
        raise ValueError(f"grid: expected a non-empty sequence of numbers >= 0, got {grid!r}")
    rows = sweep_lambda(model, process, likelihood, event_shape, grid, n=n, **sample_options)
    energy = likelihood.noise_energy()
    best = min(rows, key=lambda r: abs(math.log(max(r["misfit"], 1e-300) / energy)))
    return best["lam"], rows
