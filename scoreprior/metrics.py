"""Image-quality metrics: how close a reconstruction, or each posterior draw, is to a reference image.

Owns PSNR and SSIM (natural images, the whitened-score and denoising studies), the normalised
cross-correlation and the beam-blurred, best-aligned PSNR of the EHT / InverseBench black-hole
comparisons, and the least-squares line with its R² that compares a model's log-densities with the
ground truth's. Posterior calibration (credible intervals, coverage, SBC, TARP) and the ArviZ export
live in `scoreprior.diagnostics`.

Conventions: `psnr` and `ssim` take (B, C, H, W) batches, or one (C, H, W) image each, and return
tensors in the inputs' dtype and device; `blurred_psnr` compares (B, 1, H, W) or (B, H, W) draws with one
truth in float64; `nxcorr` and `linear_fit` return Python floats computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor

from scoreprior._checks import number_list, positive_float, real_tensor

__all__ = ["blurred_psnr", "linear_fit", "nxcorr", "psnr", "ssim"]


def nxcorr(a: object, b: object) -> float:
    """Normalised cross-correlation of two images (the EHT image-comparison metric), in [-1, 1].

    a, b: images of the same shape; each is centred on its mean, then <a, b> / (|a| |b|), in float64.
    """
    a, b = real_tensor(a, "a").flatten().double(), real_tensor(b, "b").flatten().double()
    if a.shape != b.shape:
        raise ValueError(f"a, b: expected images of the same size, got {a.numel()} and {b.numel()} pixels")
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def linear_fit(x: object, y: object) -> dict[str, float]:
    """Least-squares line y ≈ slope x + intercept and its R² = 1 - SS_res / SS_tot (Pearson r²).

    x, y: (N,) with N >= 2, e.g. log-densities of a model against the ground truth's.
    Returns {"slope", "intercept", "r2"}.
    """
    a, b = real_tensor(x, "x").double().reshape(-1), real_tensor(y, "y").double().reshape(-1)
    if a.shape != b.shape or a.numel() < 2:
        raise ValueError(f"y: expected {a.numel()} >= 2 values like x, got {b.numel()}")
    da, db = a - a.mean(), b - b.mean()
    slope = float((da * db).sum() / da.square().sum())
    intercept = float(b.mean() - slope * a.mean())
    residual = b - (slope * a + intercept)
    return {"slope": slope, "intercept": intercept, "r2": float(1 - residual.square().sum() / db.square().sum())}


def psnr(x: Tensor, ref: Tensor, *, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio 10 log10(data_range^2 / mean (x - ref)^2) in dB.

    x, ref: (B, C, H, W) -> (B,), or one image each (C, H, W) -> a 0-d tensor.
    """
    unbatched = _check_pair(x, ref)
    if unbatched:
        return psnr(x[None], ref[None], data_range=data_range)[0]
    mse = (x - ref).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _check_pair(x: object, ref: object) -> bool:
    """Validate two image batches of one shape; returns True for a pair of single (C, H, W) images."""
    def shape(v: object) -> str:
        return str(tuple(v.shape)) if isinstance(v, Tensor) else type(v).__name__

    if not isinstance(x, Tensor) or not isinstance(ref, Tensor) or x.ndim not in (3, 4):
        raise ValueError(f"x, ref: expected two tensors (B, C, H, W) or (C, H, W), got {shape(x)} and {shape(ref)}")
    if x.shape != ref.shape:
        raise ValueError(f"x, ref: expected the same shape, got x {shape(x)} and ref {shape(ref)}")
    return x.ndim == 3


def ssim(x: Tensor, ref: Tensor, *, data_range: float = 1.0, sigma: float = 1.5) -> Tensor:
    """Structural similarity with a Gaussian window (Wang, Bovik, Sheikh & Simoncelli 2004).

    Local means, variances and covariance under a normalised Gaussian window of std sigma truncated at
    radius r = int(3.5 sigma + 0.5) (11 x 11 for sigma = 1.5), population (not sample) statistics,
        SSIM = (2 mu_x mu_y + C1)(2 cov_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2)),
    C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = data_range, averaged over the windows lying fully inside the
    image and over channels: skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=L). x, ref: (B, C, H, W), H, W > 2 r -> (B,), or one image
    each (C, H, W) -> a 0-d tensor.
    """
    if _check_pair(x, ref):
        return ssim(x[None], ref[None], data_range=data_range, sigma=sigma)[0]
    r = int(3.5 * sigma + 0.5)
    if min(x.shape[-2:]) <= 2 * r:
        raise ValueError(f"x: expected H, W > {2 * r} for sigma = {sigma}, got shape {tuple(x.shape)}")
    offsets = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-0.5 * (offsets / sigma) ** 2)
    g = g / g.sum()
    c = x.shape[1]
    window = (g[:, None] * g[None, :]).expand(5 * c, 1, -1, -1)
    stack = torch.cat([x, ref, x * x, ref * ref, x * ref], dim=1)
    mx, my, mxx, myy, mxy = F.conv2d(stack, window, groups=5 * c).split(c, dim=1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vx, vy, cxy = mxx - mx * mx, myy - my * my, mxy - mx * my
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


_FWHM_PER_SIGMA = 2 * math.sqrt(2 * math.log(2))
_SHIFT_STEPS = (0.1, 0.01, 0.001)
"""Refinement steps in pixels; each stage searches ±10 steps about the previous optimum (±1 px first)."""


def blurred_psnr(
    x: Tensor,
    ref: Tensor,
    *,
    fov_uas: float,
    fwhm_uas: Sequence[float] = (10.0, 15.0, 20.0),
    max_shift_px: float | None = None,
) -> Tensor:
    """PSNR of draws against the truth after both are blurred by a circular Gaussian beam and each draw
    is shifted to its best sub-pixel alignment: the EHT / InverseBench black-hole image metric.

        PSNR_k(x) = max_{|dy|, |dx| <= max_shift_px} 10 log10( max(r)^2 / mean (G_k * S_d x' - G_k * r)^2 )

    with r = ref / sum(ref) and x' = x / sum(x) (both at unit total flux, so the value does not depend on
    the flux scale of either), G_k the unit-sum circular Gaussian of FWHM fwhm_uas[k] (std
    FWHM / (2 sqrt(2 ln 2)) / pixel size), S_d the shift by d = (dy, dx) pixels, and the data range the
    peak of the unblurred truth.

    Definition. InverseBench (Zheng et al. 2025, github.com/devzhk/InverseBench: `eval.py`
    `BlackHoleEvaluator`, `inverse_problems/blackhole.py` `BlackHoleImaging.evaluate_psnr`) scales the
    truth to a peak of 1, keeps the draws in those units, clips both to [0, 1], picks one shift per draw
    maximising the *unblurred* PSNR over a 30 x 30 grid of translations of ±(W - 1) / 4 px applied by
    bilinear interpolation (`grid_sample`, steps of about 1 px), blurs both with ehtim's
    `Image.blur_circ(FWHM)` (scipy `gaussian_filter`, reflecting edges) and reports piq's
    PSNR(data_range=1) = -10 log10(MSE + 1e-8), capped at 80 dB, at FWHM 10, 15 and 20 µas, keeping the
    best draw. Here, the same data range (the truth's peak) and beams, but: the draws are rescaled to the
    truth's total flux, not clipped (closure quantities do not fix the flux; InverseBench also rescales
    flux before its chi-square); the shift is the best one for each beam, found to ±0.0005 px by the
    Fourier shift theorem (integer-pixel FFT cross-correlation, then grids of 0.1, 0.01 and 0.001 px), as
    the blur and a Fourier shift commute; blur and shift act on the periodic image (FFT), the same as
    convolution with reflecting or zero edges when the flux lies well inside the field (a beam-width
    margin); no cap, so identical images give +inf, a sub-pixel shifted copy of a smooth source > 100 dB; every draw
    is returned (take `.max(0)` for InverseBench's best-of-draws number or `.mean(0)`).

    Arguments:
        x: (B, 1, H, W) or (B, H, W) draws, e.g. posterior samples, each with positive total flux.
        ref: (1, H, W) or (H, W) the true image, positive total flux.
        fov_uas: field of view across the W columns in µas; pixel size fov_uas / W (square pixels).
        fwhm_uas: K beam FWHMs in µas, each > 0.
        max_shift_px: largest |dy| and |dx| searched, in pixels, >= 0; default a quarter of min(H, W),
            about InverseBench's range. 0 disables the alignment.

    Returns:
        (B, K) PSNRs in dB, float64 on x's device.
    """
    x, ref = _check_draws_and_truth(x, ref)
    fov = positive_float(fov_uas, "fov_uas")
    fwhms = [positive_float(v, f"fwhm_uas[{i}]") for i, v in enumerate(number_list(fwhm_uas, "fwhm_uas"))]
    h, w = ref.shape
    if max_shift_px is None:
        limit = min(h, w) / 4
    elif isinstance(max_shift_px, Real) and not isinstance(max_shift_px, bool) and 0 <= max_shift_px < math.inf:
        limit = float(max_shift_px)
    else:
        raise ValueError(f"max_shift_px: expected a finite number of pixels >= 0 or None, got {max_shift_px!r}")
    images = torch.cat([x, ref[None]])  # one code path for both, so x == ref gives bitwise equal spectra
    images = images / images.sum((-2, -1), keepdim=True)
    sigma_px = torch.tensor(fwhms, dtype=x.dtype, device=x.device) / _FWHM_PER_SIGMA / (fov / w)
    fy, fx = torch.fft.fftfreq(h, dtype=x.dtype, device=x.device), torch.fft.fftfreq(w, dtype=x.dtype, device=x.device)
    beam = torch.exp(-2 * math.pi**2 * sigma_px[:, None, None] ** 2 * (fy[:, None] ** 2 + fx**2))  # (K, H, W)
    spectra = torch.fft.fft2(images)[:, None] * beam  # (B + 1, K, H, W)
    xf, rf = spectra[:-1], spectra[-1]
    dy, dx = _best_shift(xf, rf, limit)
    aligned = torch.fft.ifft2(xf * _shift_factors(dy, h)[..., :, None] * _shift_factors(dx, w)[..., None, :]).real
    blurred_ref = torch.fft.ifft2(rf).real.expand_as(aligned)
    peak = float(images[-1].max())
    return psnr(aligned.reshape(-1, 1, h, w), blurred_ref.reshape(-1, 1, h, w), data_range=peak).reshape(xf.shape[:2])


def _check_draws_and_truth(x: object, ref: object) -> tuple[Tensor, Tensor]:
    """x (B, 1, H, W) or (B, H, W) and ref (1, H, W) or (H, W) -> float64 (B, H, W) and (H, W) on x's device."""
    x, ref = real_tensor(x, "x"), real_tensor(ref, "ref")
    if not (x.ndim == 3 or (x.ndim == 4 and x.shape[1] == 1)) or x.shape[0] < 1:
        raise ValueError(f"x: expected shape (B, 1, H, W) or (B, H, W) with B >= 1, got {tuple(x.shape)}")
    x = x.reshape(x.shape[0], *x.shape[-2:]).to(torch.float64)
    if tuple(ref.shape) not in (tuple(x.shape[-2:]), (1, *x.shape[-2:])):
        size = tuple(x.shape[-2:])
        raise ValueError(f"ref: expected shape (1, H, W) or (H, W) with (H, W) = {size} like x "
                         f"{tuple(x.shape)}, got {tuple(ref.shape)}")
    ref = ref.reshape(x.shape[-2:]).to(device=x.device, dtype=torch.float64)
    if not float(ref.sum()) > 0 or not float(ref.max()) > 0:
        raise ValueError(f"ref: expected a positive total flux and peak, got sum {float(ref.sum())!r} "
                         f"and max {float(ref.max())!r}")
    flux = x.sum((-2, -1))
    if not bool((flux > 0).all()):
        bad = torch.nonzero(~(flux > 0)).flatten()[:5].tolist()
        raise ValueError(f"x: expected every draw to have a positive total flux, got sum <= 0 or NaN for draws {bad}")
    return x, ref



def _shift_factors(shift: Tensor, n: int) -> Tensor:
    """DFT factors of a shift by `shift` (...,) pixels along an axis of n pixels -> (..., n) complex.

    exp(-2 pi i k s / n) at the integer frequencies k of `fftfreq`; for even n the Nyquist bin gets its real
    part cos(pi s), which keeps a shifted real image real (the real part of the complex shift).
    """
    k = torch.fft.fftfreq(n, d=1 / n, dtype=shift.dtype, device=shift.device)
    factors = torch.polar(torch.ones_like(shift[..., None] * k), -2 * math.pi * shift[..., None] * k / n)
    if n % 2 == 0:
        factors[..., n // 2] = torch.cos(math.pi * shift).to(factors.dtype)
    return factors


def _best_shift(xf: Tensor, rf: Tensor, limit: float) -> tuple[Tensor, Tensor]:
    """Shift (dy, dx), each (B, K), minimising |S_d x - r|^2 within |dy|, |dx| <= limit, from spectra
    xf (B, K, H, W) and rf (K, H, W).

    By Parseval, H W |S_d x - r|^2 = sum_k |X_k f_k(d)|^2 - 2 Re sum_k X_k f_k(d) conj(R_k) + const, with
    f the separable shift factors. At integer d, |f| = 1 and the cross term is fft2(X conj R)[d], so the
    coarse optimum is its largest value; the refinements evaluate both terms on (2 n + 1)^2 grids as
    matrix products E_y P E_x^T (Guizar-Sicairos, Thurman & Fienup 2008, matrix-multiply DFT).
    """
    h, w = rf.shape[-2:]
    cross = xf * rf.conj()
    power = xf.abs().square()
    ny = torch.fft.fftfreq(h, d=1 / h, dtype=xf.real.dtype, device=xf.device)
    nx = torch.fft.fftfreq(w, d=1 / w, dtype=xf.real.dtype, device=xf.device)
    outside = (ny.abs()[:, None] > limit) | (nx.abs()[None, :] > limit)
    corr = torch.fft.fft2(cross).real.masked_fill(outside, -math.inf).flatten(-2)
    best = corr.argmax(-1)
    dy, dx = ny[best // w], nx[best % w]
    offsets = torch.arange(-10, 11, dtype=ny.dtype, device=ny.device)
    for step in _SHIFT_STEPS:
        gy, gx = dy[..., None] + step * offsets, dx[..., None] + step * offsets  # (B, K, J)
        ey, ex = _shift_factors(gy, h), _shift_factors(gx, w)  # (B, K, J, H), (B, K, J, W)
        term = ey.abs().square() @ power @ ex.abs().square().mT - 2 * (ey @ cross @ ex.mT).real  # (B, K, J, J)
        outside = (gy.abs() > limit + 1e-9)[..., :, None] | (gx.abs() > limit + 1e-9)[..., None, :]
        term = term.masked_fill(outside, math.inf)
        best = term.flatten(-2).argmin(-1, keepdim=True)
        dy, dx = gy.gather(-1, best // offsets.numel())[..., 0], gx.gather(-1, best % offsets.numel())[..., 0]
    return dy, dx
