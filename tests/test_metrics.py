"""Tests for scoreprior/metrics.py: PSNR and SSIM against skimage, nxcorr and linear_fit against closed
forms and numpy, the beam-blurred aligned PSNR against closed forms and scipy."""

import math

import numpy as np
import pytest
import torch

from scoreprior.metrics import blurred_psnr, linear_fit, nxcorr, psnr, ssim


def test_linear_fit():
    x = torch.linspace(-1, 3, 20, dtype=torch.float64)
    fit = linear_fit(x, 2 * x + 1)
    assert fit["slope"] == pytest.approx(2) and fit["intercept"] == pytest.approx(1) and fit["r2"] == pytest.approx(1)
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    b = 0.5 * a + rng.normal(size=50)
    fit = linear_fit(a, b)
    slope, intercept = np.polyfit(a, b, 1)
    assert fit["slope"] == pytest.approx(slope) and fit["intercept"] == pytest.approx(intercept)
    assert fit["r2"] == pytest.approx(np.corrcoef(a, b)[0, 1] ** 2)


def test_nxcorr_closed_forms():
    """Invariant to affine maps a -> s a + c (s > 0), -1 for a negated image, 0 for orthogonal centred images."""
    a = torch.tensor([[0.0, 1.0], [2.0, 5.0]])
    assert abs(nxcorr(a, 3 * a + 7) - 1) < 1e-12 and abs(nxcorr(a, -a) + 1) < 1e-12
    assert abs(nxcorr(torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.tensor([1.0, 1.0, -1.0, -1.0]))) < 1e-12
    with pytest.raises(ValueError, match="same size"):
        nxcorr(a, torch.zeros(3))


def test_psnr_and_ssim_match_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    ref = torch.rand(2, 3, 24, 20, generator=torch.Generator().manual_seed(24), dtype=torch.float64)
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(25), dtype=torch.float64)
    x = (ref + 0.1 * noise).clamp(0, 1)
    for i in range(2):
        a, b = x[i].numpy(), ref[i].numpy()
        expected = metrics.structural_similarity(a, b, channel_axis=0, gaussian_weights=True, sigma=1.5,
                                                 use_sample_covariance=False, data_range=1.0)
        assert math.isclose(float(ssim(x, ref)[i]), expected, rel_tol=1e-9)
        assert math.isclose(float(psnr(x, ref)[i]), metrics.peak_signal_noise_ratio(b, a, data_range=1.0),
                            rel_tol=1e-9)
    with pytest.raises(ValueError, match="x, ref"):
        psnr(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match="H, W > 10"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_psnr_and_ssim_take_one_unbatched_image_and_name_mismatched_shapes():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 32, 32, generator=g, dtype=torch.float64)
    x = (ref + 0.1 * torch.randn(1, 32, 32, generator=g, dtype=torch.float64)).clamp(0, 1)
    single = psnr(x, ref)
    assert single.shape == () and single == psnr(x[None], ref[None])[0]
    assert single == 10 * torch.log10(1 / (x - ref).square().mean())
    assert ssim(x, ref).shape == () and ssim(x, ref) == ssim(x[None], ref[None])[0]
    with pytest.raises(ValueError, match=r"expected the same shape, got x \(1, 32, 32\) and ref \(1, 1, 32, 32\)"):
        psnr(x, ref[None])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) or \(C, H, W\), got \(32, 32\)"):
        psnr(x[0], ref[0])


def _blob(n: int, centre: tuple[float, float], sigma: float) -> torch.Tensor:
    """Samples of exp(-|p - centre|^2 / (2 sigma^2)) on an n x n pixel grid (pixel units), float64."""
    i = torch.arange(n, dtype=torch.float64)
    return torch.exp(-((i[:, None] - centre[0]) ** 2 + (i[None, :] - centre[1]) ** 2) / (2 * sigma**2))


def _two_blobs(shift: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """An asymmetric 32 x 32 source (two Gaussian blobs well inside the field), moved by `shift` pixels."""
    dy, dx = shift
    return _blob(32, (15.3 + dy, 16.1 + dx), 2.0) + 0.5 * _blob(32, (12.0 + dy, 18.0 + dx), 1.5)


def test_blurred_psnr_of_identical_images_is_infinite_for_every_shape():
    ref = _two_blobs()
    for x, r in ((ref[None], ref), (ref[None, None], ref[None]), (ref.expand(3, 1, 32, 32), ref[None])):
        out = blurred_psnr(x, r, fov_uas=160.0)
        assert out.shape == (x.shape[0], 3) and out.dtype == torch.float64 and bool(torch.isposinf(out).all())


def test_blurred_psnr_recovers_a_sub_pixel_shift():
    """The same analytic source moved by (0.37, -1.73) px is matched to > 120 dB at every beam (the residual
    is the sampled blobs' tiny departure from band-limited), far above the unaligned value; a search bounded
    below the true shift cannot reach it; a circular integer shift is undone to rounding."""
    ref, moved = _two_blobs(), _two_blobs((0.37, -1.73))
    aligned = blurred_psnr(moved[None], ref, fov_uas=160.0)
    unaligned = blurred_psnr(moved[None], ref, fov_uas=160.0, max_shift_px=0)
    bounded = blurred_psnr(moved[None], ref, fov_uas=160.0, max_shift_px=1.0)
    assert bool((aligned > 120).all()) and bool((unaligned < 30).all()), (aligned, unaligned)
    assert bool((bounded < aligned - 50).all()) and bool((bounded > unaligned).all()), bounded
    rolled = torch.roll(ref, (3, -5), dims=(0, 1))
    assert bool((blurred_psnr(rolled[None], ref, fov_uas=160.0) > 250).all())


def test_blurred_psnr_of_two_gaussians_matches_the_closed_form():
    """Unit-flux Gaussians of stds a (truth) and b (draw, centre off by (0.3712, -0.2087) px, off the search
    grids) blurred by a beam of std c have stds s_r^2 = a^2 + c^2, s_x^2 = b^2 + c^2, so with N pixels
        N MSE = 1 / (4 pi s_x^2) + 1 / (4 pi s_r^2) - 1 / (pi (s_x^2 + s_r^2)),
    and the data range is the truth's peak 1 / (2 pi a^2) (centred on a pixel)."""
    n, pixel_uas, a, b = 64, 2.0, 2.0, 3.0
    fwhms = (10.0, 15.0, 20.0)
    ref = 5.0 * _blob(n, (32.0, 32.0), a)
    x = _blob(n, (32.3712, 31.7913), b)
    out = blurred_psnr(x[None, None], ref[None], fov_uas=n * pixel_uas, fwhm_uas=fwhms)
    c2 = torch.tensor(fwhms, dtype=torch.float64).div(2 * math.sqrt(2 * math.log(2)) * pixel_uas).square()
    sr2, sx2 = a**2 + c2, b**2 + c2
    mse = (1 / (4 * math.pi * sx2) + 1 / (4 * math.pi * sr2) - 1 / (math.pi * (sx2 + sr2))) / n**2
    expected = 10 * torch.log10((1 / (2 * math.pi * a**2)) ** 2 / mse)
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-5)


def test_blurred_psnr_without_alignment_matches_scipy_gaussian_filter():
    """max_shift_px = 0 is the plain PSNR of unit-flux images blurred by a sampled Gaussian kernel (scipy,
    periodic edges), data range the truth's peak; beams of >= 2 px std make the two blurs agree."""
    ndimage = pytest.importorskip("scipy.ndimage")
    g = torch.Generator().manual_seed(5)
    ref = torch.rand(32, 32, generator=g, dtype=torch.float64)
    x = torch.rand(4, 32, 32, generator=g, dtype=torch.float64)
    out = blurred_psnr(x, ref, fov_uas=64.0, fwhm_uas=(10.0, 20.0), max_shift_px=0)
    r = ref / ref.sum()
    for k, fwhm in enumerate((10.0, 20.0)):
        sigma = fwhm / (2 * math.sqrt(2 * math.log(2))) / 2.0

        def blur(img):
            return torch.from_numpy(ndimage.gaussian_filter(img.numpy(), sigma, mode="wrap", truncate=12.0))

        expected = [float(psnr(blur(d / d.sum())[None], blur(r)[None], data_range=float(r.max()))) for d in x]
        torch.testing.assert_close(out[:, k], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)


def test_blurred_psnr_ignores_flux_scale_and_grows_with_the_beam():
    """Unit-flux rescaling makes x -> s x (and ref -> s ref) leave it unchanged; a wider beam damps every
    Fourier mode of the residual at every shift, so PSNR increases with the FWHM (noisy draws)."""
    g = torch.Generator().manual_seed(7)
    ref = _two_blobs()
    x = (ref + 0.05 * torch.randn(16, 1, 32, 32, generator=g, dtype=torch.float64)).clamp(min=0)
    fwhms = (5.0, 10.0, 15.0, 20.0, 30.0)
    out = blurred_psnr(x, ref, fov_uas=160.0, fwhm_uas=fwhms)
    assert bool((out.diff(dim=1) > 0).all()), out
    torch.testing.assert_close(blurred_psnr(37.0 * x, 0.2 * ref, fov_uas=160.0, fwhm_uas=fwhms), out,
                               rtol=1e-9, atol=0)
    assert blurred_psnr(x.float(), ref.float(), fov_uas=160.0).dtype == torch.float64


def test_blurred_psnr_names_bad_arguments():
    ref, x = _two_blobs(), _two_blobs()[None]
    cases = [
        (dict(x=ref), r"x: expected shape \(B, 1, H, W\) or \(B, H, W\) with B >= 1, got \(32, 32\)"),
        (dict(x=x.expand(2, 2, 32, 32)), r"x: expected shape .* got \(2, 2, 32, 32\)"),
        (dict(ref=ref[:, :31]), r"ref: expected shape \(1, H, W\) or \(H, W\) with \(H, W\) = \(32, 32\) like x "
                                r"\(1, 32, 32\), got \(32, 31\)"),
        (dict(ref=ref.expand(2, 32, 32)), r"ref: expected .* got \(2, 32, 32\)"),
        (dict(ref=torch.zeros(32, 32)), "ref: expected a positive total flux"),
        (dict(x=torch.cat([x, -x])), r"x: expected every draw to have a positive total flux, .* draws \[1\]"),
        (dict(fov_uas=0.0), "fov_uas: expected a finite positive number, got 0.0"),
        (dict(fov_uas=-160.0), "fov_uas"),
        (dict(fwhm_uas=(10.0, 0.0)), r"fwhm_uas\[1\]: expected a finite positive number, got 0.0"),
        (dict(fwhm_uas=()), "fwhm_uas: expected at least one value"),
        (dict(max_shift_px=-1.0), "max_shift_px: expected a finite number of pixels >= 0 or None, got -1.0"),
    ]
    for change, message in cases:
        args = dict(x=x, ref=ref, fov_uas=160.0) | change
        with pytest.raises(ValueError, match=message):
            blurred_psnr(args.pop("x"), args.pop("ref"), **args)
    with pytest.raises(TypeError, match="x"):
        blurred_psnr([[1.0]], ref, fov_uas=160.0)
