"""Tests for scoreprior/operators.py: adjointness, closed forms, conventions, gradients, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import OPERATOR_KINDS, make_operator, operator_image_shape
from scoreprior.operators import (
    RAD_PER_UAS,
    FourierMask,
    FourierSubsample,
    GaussianBlur,
    Identity,
    Inpainting,
    Interferometer,
    LinearOperator,
    uas_to_rad,
)

FOV = uas_to_rad(160.0)


def _uv(m: int, seed: int, *, max_uv: float = 8e9) -> np.ndarray:
    """(m, 2) random baselines in wavelengths, up to EHT-like lengths."""
    return np.random.default_rng(seed).uniform(-max_uv, max_uv, size=(m, 2))


def _mask(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.4


# name -> (kind, image shape (C, H, W), options of make_operator); H != W and odd sizes where the operator
# allows.
CASES = {
    "identity": ("identity", (2, 9, 7), {}),
    "blur": ("blur", (2, 16, 11), dict(sigma=1.3)),
    "blur_wider_than_image": ("blur", (1, 8, 7), dict(sigma=3.0)),
    "fourier_subsample_even_k": ("fourier_subsample", (2, 16, 11), dict(k=6)),
    "fourier_subsample_odd_k": ("fourier_subsample", (1, 9, 12), dict(k=5)),
    "inpainting_hw_mask": ("inpainting", (3, 10, 12), {}),
    "inpainting_chw_mask": ("inpainting", (3, 10, 12), dict(per_channel=True)),
    "fourier_mask": ("fourier_mask", (2, 12, 9), {}),
    "interferometer": ("interferometer", (1, 16, 16), dict(n_baselines=300)),
}


def _case(name: str) -> tuple[LinearOperator, tuple[int, int, int]]:
    kind, image_shape, options = CASES[name]
    return make_operator(kind, image_shape, torch.Generator().manual_seed(3), **options), image_shape


def test_cases_cover_every_operator_kind():
    assert {kind for kind, _, _ in CASES.values()} == set(OPERATOR_KINDS)


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Real inner product Re sum a conj(b), accumulated in double precision."""
    a = a.to(torch.complex128) if a.is_complex() else a.double()
    b = b.to(torch.complex128) if b.is_complex() else b.double()
    return (a * b.conj()).real.sum() if (a.is_complex() or b.is_complex()) else (a * b).sum()


def _random_measurement(op: LinearOperator, image_shape, batch: int, dtype, gen) -> torch.Tensor:
    shape = (batch, *op.measurement_shape(image_shape))
    if op.is_complex:
        return torch.randn(shape, dtype=dtype.to_complex(), generator=gen)
    return torch.randn(shape, dtype=dtype, generator=gen)


def _adjoint_errors(op: LinearOperator, image_shape, dtype) -> tuple[float, float]:
    """(normalised, plain) relative errors of Re<A x, y> = <x, A_adjoint y> for random x, y.

    normalised: |lhs - rhs| / max(|A x| |y|, |x| |A_adjoint y|), the error on the scale of the terms
    summed (Cauchy-Schwarz bounds |lhs| by it); plain: |lhs - rhs| / |lhs|, which grows like sqrt(n)
    for random, nearly orthogonal x and y even with an exact adjoint.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((3, *image_shape), dtype=dtype, generator=gen)
    y = _random_measurement(op, image_shape, 3, dtype, gen)
    ax, aty = op.A(x), op.A_adjoint(y)
    lhs, rhs = _inner(ax, y), _inner(x, aty)
    scale = max(_inner(ax, ax).sqrt() * _inner(y, y).sqrt(), _inner(x, x).sqrt() * _inner(aty, aty).sqrt())
    return float((lhs - rhs).abs() / scale), float((lhs - rhs).abs() / lhs.abs())


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("name", list(CASES))
def test_adjointness(name, dtype, tol):
    op, image_shape = _case(name)
    normalised, plain = _adjoint_errors(op, image_shape, dtype)
    assert normalised <= tol
    # With random vectors the plain ratio is noisier; it still has to be small.
    assert plain <= 100 * tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CASES))
def test_shapes_dtypes_and_call(name, dtype):
    op, image_shape = _case(name)
    x = torch.randn((2, *image_shape), dtype=dtype, generator=torch.Generator().manual_seed(1))
    y = op(x)
    assert y.shape == (2, *op.measurement_shape(image_shape))
    assert y.dtype == (dtype.to_complex() if op.is_complex else dtype)
    assert torch.equal(y, op.A(x))
    back = op.A_adjoint(y)
    assert back.shape == x.shape and back.dtype == dtype
    torch.testing.assert_close(op.A_normal(x), back)


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_adjoint(name):
    """d/dx sum |A x|^2 = 2 A^H A x, and d/dy <A_adjoint y, z> = A z (PyTorch's complex gradient)."""
    op, image_shape = _case(name)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn((2, *image_shape), dtype=torch.float64, generator=gen).requires_grad_()
    (op.A(x).abs() ** 2).sum().backward()
    torch.testing.assert_close(x.grad, 2 * op.A_normal(x.detach()), rtol=1e-10, atol=1e-10)

    z = torch.randn((2, *image_shape), dtype=torch.float64, generator=gen)
    y = _random_measurement(op, image_shape, 2, torch.float64, gen).requires_grad_()
    (op.A_adjoint(y) * z).sum().backward()
    torch.testing.assert_close(y.grad, op.A(z), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_gradcheck(kind):
    """Autograd against finite differences (fast mode: random directions, seconds cheaper for FFTs)."""
    image_shape = operator_image_shape(kind, (1, 5, 4))
    op = make_operator(kind, image_shape, torch.Generator().manual_seed(5), sigma=0.8, kernel_size=3)
    x = torch.randn((2, *image_shape), dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert torch.autograd.gradcheck(op.A, (x.requires_grad_(),), fast_mode=True)


# ---- Gaussian blur -------------------------------------------------------------------------------


@pytest.mark.parametrize("h, w, i0, j0", [(16, 13, 1, 11), (5, 4, 0, 3)])
def test_blur_delta_gives_circularly_centred_kernel(h, w, i0, j0):
    """A delta at (i0, j0) maps to the normalised Gaussian centred there, wrapped periodically.

    The first case wraps across both edges; in the second the 9 × 9 kernel is wider than the image,
    so its periodic copies overlap and add up.
    """
    sigma = 1.2
    op = GaussianBlur(sigma)
    assert op.kernel_size == 2 * math.ceil(3 * sigma) + 1 == 9
    offsets = range(-4, 5)
    norm = sum(math.exp(-(a * a + b * b) / (2 * sigma**2)) for a in offsets for b in offsets)
    kernel = torch.tensor([[math.exp(-(a * a + b * b) / (2 * sigma**2)) / norm for b in offsets] for a in offsets],
                          dtype=torch.float64)
    torch.testing.assert_close(op.kernel(), kernel, rtol=0, atol=1e-15)

    expected = torch.zeros(h, w, dtype=torch.float64)
    for a in offsets:
        for b in offsets:
            expected[(i0 + a) % h, (j0 + b) % w] += kernel[a + 4, b + 4]
    x = torch.zeros(1, 1, h, w, dtype=torch.float64)
    x[0, 0, i0, j0] = 1.0
    torch.testing.assert_close(op.A(x)[0, 0], expected, rtol=0, atol=1e-14)


def test_blur_preserves_flux_and_is_self_adjoint():
    op = GaussianBlur(2.0, kernel_size=9)
    x = torch.rand(2, 3, 12, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(op.A(x).sum((-2, -1)), x.sum((-2, -1)), rtol=1e-13, atol=0)
    torch.testing.assert_close(op.A_adjoint(x), op.A(x), rtol=0, atol=1e-14)


# ---- Fourier subsampling ------------------------------------------------------------------------


@pytest.mark.parametrize("k, h, w", [(6, 16, 11), (5, 9, 12), (4, 4, 7)])
def test_fourier_subsample_matches_explicit_dft_coefficients(k, h, w):
    x = torch.randn(2, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = FourierSubsample(k).A(x)
    spectrum = torch.fft.fft2(x)
    for a in range(k):
        for b in range(k):
            torch.testing.assert_close(y[..., a, b], spectrum[..., (a - k // 2) % h, (b - k // 2) % w])
    # Same thing described another way: the centre crop of the fftshift-ed spectrum.
    shifted = torch.fft.fftshift(spectrum, dim=(-2, -1))
    r0, c0 = h // 2 - k // 2, w // 2 - k // 2
    torch.testing.assert_close(y, shifted[..., r0 : r0 + k, c0 : c0 + k])
    torch.testing.assert_close(y[..., k // 2, k // 2], x.sum((-2, -1)).to(y.dtype))


@pytest.mark.parametrize("k, h, w", [(6, 16, 12), (5, 15, 16)])
def test_fourier_subsample_normal_operator_on_band_limited_image(k, h, w):
    """A^H A x = H W x when x's spectrum lies in the kept block (F^H F = H W I for the unnormalised DFT).

    A real image has a Hermitian spectrum, so it must use frequencies |f| <= (k - 1) // 2 to fit in
    the block -floor(k/2) .. ceil(k/2) - 1 (for even k the lone -k/2 has no +k/2 partner).
    """
    gen = torch.Generator().manual_seed(5)
    band = torch.arange(-((k - 1) // 2), (k - 1) // 2 + 1)
    spectrum = torch.zeros(2, 1, h, w, dtype=torch.complex128)
    spectrum[..., band[:, None] % h, band[None, :] % w] = torch.randn(
        2, 1, len(band), len(band), dtype=torch.complex128, generator=gen)
    x = torch.fft.ifft2(spectrum).real  # its spectrum is (Z(f) + conj Z(-f)) / 2, still inside the band
    op = FourierSubsample(k)
    torch.testing.assert_close(op.A_normal(x) / (h * w), x, rtol=0, atol=1e-14)
    torch.testing.assert_close(op.A_adjoint(op.A(x), image_size=(h, w)) / (h * w), x, rtol=0, atol=1e-14)
    # A generic image is not band-limited, so the identity fails there.
    noise = torch.randn(1, 1, h, w, dtype=torch.float64, generator=gen)
    assert (op.A_normal(noise) / (h * w) - noise).abs().max() > 0.1


def test_fourier_subsample_full_block_is_the_dft():
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    op = FourierSubsample(6)
    torch.testing.assert_close(op.A_normal(x), 36 * x)


# ---- Fourier mask (MRI-like) ---------------------------------------------------------------------


def test_fourier_mask_is_masked_orthonormal_dft():
    mask = _mask((8, 6), 7)
    x = torch.randn(2, 1, 8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    op = FourierMask(mask.numpy().astype(np.float32))
    y = op.A(x)
    torch.testing.assert_close(y, torch.fft.fft2(x, norm="ortho") * mask)
    torch.testing.assert_close(y[..., 0, 0], mask[0, 0] * x.sum((-2, -1)).to(y.dtype) / math.sqrt(48))
    torch.testing.assert_close(FourierMask(torch.ones(8, 6)).A_normal(x), x)  # unitary when nothing is masked


# ---- Inpainting ---------------------------------------------------------------------------------


def test_inpainting_zeroes_missing_pixels():
    mask = torch.tensor([[1, 0, 1], [0, 1, 1]])
    x = torch.arange(1.0, 13.0).reshape(1, 2, 2, 3)
    y = Inpainting(mask).A(x)
    torch.testing.assert_close(y, x * mask)
    assert (y[:, :, mask == 0] == 0).all()
    per_channel = Inpainting(torch.stack([mask, 1 - mask]).bool())
    torch.testing.assert_close(per_channel.A(x)[0, 1], x[0, 1] * (1 - mask))


# ---- Interferometer -----------------------------------------------------------------------------


def _response(uv: torch.Tensor, pixel: float) -> torch.Tensor:
    return (torch.sinc(uv[:, 0] * pixel) * torch.sinc(uv[:, 1] * pixel)) ** 2


def _pixel_centre(n: int, npix: int, pixel: float) -> float:
    return (npix / 2 - 0.5 - n) * pixel


def test_uas_to_rad():
    assert RAD_PER_UAS == pytest.approx(math.pi / 180 / 3600 / 1e6, rel=1e-15)
    assert uas_to_rad(1e6 * 3600.0) == pytest.approx(math.pi / 180, rel=1e-15)
    torch.testing.assert_close(uas_to_rad(torch.tensor([2.0], dtype=torch.float64)),
                               torch.tensor([2 * RAD_PER_UAS], dtype=torch.float64))


def test_interferometer_attributes():
    uv = torch.tensor(_uv(5, 8), dtype=torch.float32)
    op = Interferometer(uv, 32, FOV)
    assert op.pixel_size == pytest.approx(FOV / 32)
    assert op.uv.shape == (5, 2) and op.uv.dtype == torch.float64
    torch.testing.assert_close(op.uv, uv.double())
    assert op.measurement_shape((1, 32, 32)) == (5,)


def test_interferometer_single_pixel_closed_form():
    npix, (i, j) = 16, (3, 11)
    uv = torch.tensor(_uv(200, 9, max_uv=4e10), dtype=torch.float64)  # |u| Δ up to 1.9, past P's first null
    op = Interferometer(uv, npix, FOV)
    x = torch.zeros(1, 1, npix, npix, dtype=torch.float64)
    x[0, 0, i, j] = 1.0
    pixel = FOV / npix
    l, m = _pixel_centre(j, npix, pixel), _pixel_centre(i, npix, pixel)
    expected = _response(uv, pixel) * torch.exp(2j * math.pi * (uv[:, 0] * l + uv[:, 1] * m))
    torch.testing.assert_close(op.A(x)[0], expected, rtol=0, atol=1e-13)


def test_interferometer_gaussian_matches_continuous_fourier_transform():
    """A pixel-sampled Gaussian gives V = F P(u, v) exp(-2 pi^2 s^2 |uv|^2) exp(2 pi i (u l0 + v m0)).

    Tolerance: the pixel sum of the sampled Gaussian is the trapezoid rule for the Fourier integral.
    By Poisson summation its error is (i) aliases of the transform at (u + a/Δ, v + b/Δ), relative
    size <= exp(-2 pi^2 (s/Δ)^2 (1 - 2 |u| Δ)) ~ e^-71 for s = 3Δ and |u| Δ <= 0.3, plus (ii) the
    flux outside the field: the centre is >= 9 s from every edge, ~1e-19. Both are far below float64
    round-off in the phase sums (measured ~1e-15 of the flux), so the check can be much tighter than
    1e-3: 1e-10 of the flux (absolute, all points) and 1e-9 relative on the low-|uv| points
    (|V| >= 0.05 F, |uv| Δ <~ 0.13, where the transform is not tiny).
    """
    npix, flux = 64, 0.6
    pixel = FOV / npix  # 2.5 µas
    s, l0, m0 = 3.0 * pixel, 4.3 * pixel, -2.7 * pixel
    coords = torch.tensor([_pixel_centre(n, npix, pixel) for n in range(npix)], dtype=torch.float64)
    r2 = (coords[None, :] - l0) ** 2 + (coords[:, None] - m0) ** 2  # [i, j]: (l_j - l0)^2 + (m_i - m0)^2
    image = flux * pixel**2 / (2 * math.pi * s**2) * torch.exp(-r2 / (2 * s**2))

    uv = torch.tensor(_uv(400, 10, max_uv=2.4e10), dtype=torch.float64)  # |u| Δ <= 0.3
    op = Interferometer(uv, npix, FOV)
    v_model = op.A(image[None, None])[0]
    u, v = uv[:, 0], uv[:, 1]
    v_true = (flux * _response(uv, pixel) * torch.exp(-2 * math.pi**2 * s**2 * (u**2 + v**2))
              * torch.exp(2j * math.pi * (u * l0 + v * m0)))

    assert (v_model - v_true).abs().max() <= 1e-10 * flux
    low = v_true.abs() >= 0.05 * flux
    assert low.sum() >= 20
    assert ((v_model - v_true).abs()[low] / v_true.abs()[low]).max() <= 1e-9


def test_interferometer_zero_spacing_and_hermitian_symmetry():
    npix = 16
    uv = torch.tensor(_uv(50, 11), dtype=torch.float64)
    uv = torch.cat([torch.zeros(1, 2, dtype=torch.float64), uv, -uv])
    op = Interferometer(uv, npix, FOV)
    x = torch.rand(3, 1, npix, npix, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    vis = op.A(x)
    torch.testing.assert_close(vis[:, 0], x.sum((1, 2, 3)).to(vis.dtype), rtol=1e-14, atol=0)
    torch.testing.assert_close(vis[:, 51:], vis[:, 1:51].conj(), rtol=0, atol=1e-13)


def test_interferometer_sign_convention_east_left_north_up():
    npix = 32
    pixel = FOV / npix
    u = 0.01 / pixel
    op = Interferometer(np.array([[u, 0.0], [0.0, u]]), npix, FOV)

    def phases(i: int, j: int) -> torch.Tensor:
        x = torch.zeros(1, 1, npix, npix, dtype=torch.float64)
        x[0, 0, i, j] = 1.0
        return op.A(x)[0].angle()

    east = phases(16, 4)  # left half of the image: l > 0
    l_east = _pixel_centre(4, npix, pixel)
    assert l_east > 0 and east[0] > 0
    assert float(east[0]) == pytest.approx(2 * math.pi * u * l_east, rel=1e-12)
    assert phases(16, 27)[0] < 0  # right half: west, l < 0

    north = phases(4, 16)  # top rows: m > 0
    m_north = _pixel_centre(4, npix, pixel)
    assert m_north > 0 and north[1] > 0
    assert float(north[1]) == pytest.approx(2 * math.pi * u * m_north, rel=1e-12)


def test_interferometer_on_grid_frequencies_agree_with_fft():
    """At u = p / fov, v = q / fov the direct sum is a phase-shifted DFT coefficient (independent method).

    V = P exp(2 pi i (p + q)(npix/2 - 1/2) / npix) fft2(I)[q mod npix, p mod npix].
    """
    npix = 12
    pq = torch.tensor([[p, q] for p in range(-5, 6) for q in range(-5, 6)], dtype=torch.float64)
    uv = pq / FOV
    op = Interferometer(uv, npix, FOV)
    x = torch.randn(2, 1, npix, npix, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    spectrum = torch.fft.fft2(x[:, 0])
    p, q = pq[:, 0].long(), pq[:, 1].long()
    shift = torch.exp(2j * math.pi * (pq[:, 0] + pq[:, 1]) * (npix / 2 - 0.5) / npix)
    expected = _response(uv, FOV / npix) * shift * spectrum[:, q % npix, p % npix]
    torch.testing.assert_close(op.A(x), expected, rtol=0, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(CASES))
def test_operators_follow_the_device(name):
    op, image_shape = _case(name)
    x = torch.randn((2, *image_shape), generator=torch.Generator().manual_seed(16)).cuda()
    y = op.A(x)
    assert y.device == x.device and op.A_adjoint(y).device == x.device
    torch.testing.assert_close(y.cpu(), op.A(x.cpu()), rtol=1e-4, atol=1e-4)


# ---- Validation ---------------------------------------------------------------------------------


def _x(*shape):
    return torch.zeros(shape)


def _y(*shape):
    return torch.zeros(shape, dtype=torch.complex64)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: GaussianBlur(0.0), ValueError, r"^sigma:"),
        (lambda: GaussianBlur(-1.0), ValueError, r"^sigma:"),
        (lambda: GaussianBlur(float("nan")), ValueError, r"^sigma:"),
        (lambda: GaussianBlur("1"), TypeError, r"^sigma:"),
        (lambda: GaussianBlur(1.0, kernel_size=4), ValueError, r"^kernel_size:"),
        (lambda: GaussianBlur(1.0, kernel_size=0), ValueError, r"^kernel_size:"),
        (lambda: GaussianBlur(1.0, kernel_size=3.0), TypeError, r"^kernel_size:"),
        (lambda: FourierSubsample(0), ValueError, r"^k:"),
        (lambda: FourierSubsample(2.5), TypeError, r"^k:"),
        (lambda: FourierSubsample(8, image_size=(4, 16)), ValueError, r"^image_size:"),
        (lambda: FourierSubsample(2, image_size=(4,)), ValueError, r"^image_size:"),
        (lambda: Inpainting(torch.tensor([[0.0, 0.5]])), ValueError, r"^mask:"),
        (lambda: Inpainting(torch.ones(4)), ValueError, r"^mask: expected shape \(H, W\) or \(C, H, W\)"),
        (lambda: Inpainting([[1, 0]]), TypeError, r"^mask:"),
        (lambda: FourierMask(torch.ones(1, 4, 4)), ValueError,
         r"^mask: expected shape \(H, W\), got \(1, 4, 4\)"),
        (lambda: FourierMask(torch.full((4, 4), 2.0)), ValueError, r"^mask:"),
        (lambda: Interferometer(np.zeros((5, 3)), 8, FOV), ValueError, r"^uv: expected shape \(M, 2\)"),
        (lambda: Interferometer(np.zeros((0, 2)), 8, FOV), ValueError, r"^uv:"),
        (lambda: Interferometer(np.array([[0.0, np.nan]]), 8, FOV), ValueError, r"^uv:"),
        (lambda: Interferometer([[0.0, 1.0]], 8, FOV), TypeError, r"^uv:"),
        (lambda: Interferometer(np.zeros((5, 2), complex), 8, FOV), TypeError, r"^uv:"),
        (lambda: Interferometer(np.zeros((5, 2)), 0, FOV), ValueError, r"^npix:"),
        (lambda: Interferometer(np.zeros((5, 2)), 8.0, FOV), TypeError, r"^npix:"),
        (lambda: Interferometer(np.zeros((5, 2)), 8, 0.0), ValueError, r"^fov:"),
        (lambda: Interferometer(np.zeros((5, 2)), 8, -FOV), ValueError, r"^fov:"),
    ],
)
def test_constructor_validation(make, error, match):
    with pytest.raises(error, match=match):
        make()


INTERFEROMETER = Interferometer(np.zeros((5, 2)), 8, FOV)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: Identity().A(_x(3, 4, 4)), ValueError, r"^x: expected shape \(B, C, H, W\), got \(3, 4, 4\)"),
        (lambda: Identity().A(np.zeros((1, 1, 4, 4))), TypeError, r"^x: expected a torch.Tensor"),
        (lambda: GaussianBlur(1.0).A(torch.zeros(1, 1, 4, 4, dtype=torch.complex64)), TypeError, r"^x:"),
        (lambda: GaussianBlur(1.0).A(torch.zeros(1, 1, 4, 4, dtype=torch.long)), TypeError, r"^x:"),
        (lambda: GaussianBlur(1.0).A_adjoint(_x(4, 4)), ValueError, r"^y: expected shape"),
        (lambda: FourierSubsample(8).A(_x(1, 1, 4, 16)), ValueError, r"^x: expected H >= k and W >= k"),
        (lambda: FourierSubsample(2, image_size=(4, 4)).A(_x(1, 1, 4, 5)), ValueError,
         r"^x: expected shape \(B, C, 4, 4\), got \(1, 1, 4, 5\)"),
        (lambda: FourierSubsample(2).A_adjoint(_y(1, 1, 2, 2)), ValueError,
         r"^image_size:"),
        (lambda: FourierSubsample(2).A_adjoint(_y(1, 1, 2, 2), image_size=(1, 4)), ValueError, r"^image_size:"),
        (lambda: FourierSubsample(2).A_adjoint(_y(1, 1, 3, 2), image_size=(4, 4)),
         ValueError, r"^y: expected shape \(B, C, 2, 2\), got \(1, 1, 3, 2\)"),
        (lambda: FourierSubsample(2).A_adjoint(_x(1, 1, 2, 2), image_size=(4, 4)), TypeError,
         r"^y: expected a complex tensor"),
        (lambda: FourierSubsample(2).measurement_shape((1, 1, 4)), ValueError, r"^image_shape:"),
        (lambda: Inpainting(torch.ones(4, 5)).A(_x(1, 2, 5, 4)), ValueError,
         r"^x: expected shape \(B, C, 4, 5\), got \(1, 2, 5, 4\)"),
        (lambda: Inpainting(torch.ones(3, 4, 5)).A(_x(1, 2, 4, 5)), ValueError,
         r"^x: expected shape \(B, 3, 4, 5\), got \(1, 2, 4, 5\)"),
        (lambda: Inpainting(torch.ones(3, 4, 5)).A_adjoint(_x(1, 2, 4, 5)), ValueError, r"^y: expected shape"),
        (lambda: FourierMask(torch.ones(4, 4)).A(_x(1, 1, 4, 5)), ValueError, r"^x: expected shape"),
        (lambda: FourierMask(torch.ones(4, 4)).A_adjoint(_x(1, 1, 4, 4)), TypeError, r"^y: expected a complex"),
        (lambda: INTERFEROMETER.A(_x(2, 3, 8, 8)), ValueError,
         r"^x: expected shape \(B, 1, 8, 8\), got \(2, 3, 8, 8\)"),
        (lambda: INTERFEROMETER.A(_x(2, 1, 8, 9)), ValueError, r"^x: expected shape"),
        (lambda: INTERFEROMETER.A_adjoint(_y(2, 4)), ValueError,
         r"^y: expected shape \(B, 5\), got \(2, 4\)"),
        (lambda: INTERFEROMETER.A_adjoint(_x(2, 5)), TypeError, r"^y: expected a complex"),
        (lambda: INTERFEROMETER.measurement_shape((1, 8, 9)), ValueError, r"^image_shape:"),
    ],
)
def test_call_validation(call, error, match):
    with pytest.raises(error, match=match):
        call()
