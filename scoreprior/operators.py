"""Linear forward models y = A x for imaging inverse problems, with their adjoints.

Every operator is a plain object with deepinv's `LinearPhysics` names: `A(x)`, `A_adjoint(y)`, and
`op(x) == op.A(x)`. Code that consumes an operator should use only `A` and `A_adjoint`, so a deepinv
physics object can stand in for one of these.

Conventions shared by all operators:
- Images x are real, (B, C, H, W), float32 or float64; outputs follow x's device and dtype.
- Complex measurements (`is_complex = True`) are complex tensors: complex64 for float32 images,
  complex128 for float64 images.
- The adjoint is taken for the real inner products <x, x'> = sum x x' on images and
  Re<y, y'> = Re sum y conj(y') on measurements: Re<A x, y> = <x, A_adjoint(y)>. For a complex
  operator this makes A_adjoint(y) = Re(A^H y), a real image.
- Everything is built from differentiable torch operations, so autograd flows through A and A_adjoint.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

from scoreprior._checks import format_shape, height_width, positive_float, positive_int

__all__ = [
    "RAD_PER_UAS",
    "FourierMask",
    "FourierSubsample",
    "GaussianBlur",
    "Identity",
    "Inpainting",
    "Interferometer",
    "LinearOperator",
    "uas_to_rad",
]

RAD_PER_UAS = math.pi / 180.0 / 3600.0 / 1e6
"""One micro-arcsecond in radians."""


def uas_to_rad(x: float | Tensor | np.ndarray) -> float | Tensor | np.ndarray:
    """Convert angles from micro-arcseconds to radians. x: any shape, in µas -> same shape, in rad."""
    return x * RAD_PER_UAS


def _check_tensor(t: object, name: str, expected: tuple[int | str, ...], *, is_complex: bool) -> None:
    """Raise unless t is a tensor of the right kind whose shape matches `expected`.

    Integer entries of `expected` must match exactly; string entries (e.g. "B") match any size.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if is_complex and not t.is_complex():
        raise TypeError(f"{name}: expected a complex tensor, got dtype {t.dtype}")
    if not is_complex and not t.is_floating_point():
        raise TypeError(f"{name}: expected a real floating-point tensor, got dtype {t.dtype}")
    if t.ndim != len(expected) or any(
        isinstance(e, int) and s != e for s, e in zip(t.shape, expected)
    ):
        raise ValueError(f"{name}: expected shape {format_shape(expected)}, got {tuple(t.shape)}")


def _check_image_shape(image_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Validate a single-image shape (C, H, W) of integers >= 1 and return it as a tuple of ints."""
    image_shape = tuple(image_shape)
    if len(image_shape) != 3:
        raise ValueError(f"image_shape: expected (C, H, W), got {image_shape}")
    return tuple(positive_int(s, "image_shape") for s in image_shape)


def _binary_mask(mask: object, name: str, shapes: dict[int, str]) -> Tensor:
    """Validate a 0/1 mask (bool or numeric, tensor or array) and return it as a bool tensor.

    shapes: allowed numbers of dimensions, each with its description for the error message.
    """
    if not isinstance(mask, (Tensor, np.ndarray)):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(mask).__name__}")
    mask = torch.as_tensor(mask).detach()
    if mask.is_complex():
        raise TypeError(f"{name}: expected a bool or real tensor, got dtype {mask.dtype}")
    if mask.ndim not in shapes:
        raise ValueError(f"{name}: expected shape {' or '.join(shapes.values())}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        bad = mask[(mask != 0) & (mask != 1)]
        if bad.numel() > 0:
            raise ValueError(f"{name}: expected only 0/1 values, got {bad.numel()} others, e.g. {bad[0].item()}")
        mask = mask != 0
    return mask


class LinearOperator(ABC):
    """A linear forward model y = A x on batches of real images x: (B, C, H, W).

    Subclasses implement `A`, `A_adjoint` and `measurement_shape`; `is_complex` says whether y is
    a complex tensor. See the module docstring for the dtype and inner-product conventions.
    """

    is_complex: bool = False

    @abstractmethod
    def A(self, x: Tensor) -> Tensor:
        """Forward model. x: (B, C, H, W) real -> y: (B, *measurement_shape((C, H, W)))."""

    @abstractmethod
    def A_adjoint(self, y: Tensor) -> Tensor:
        """Adjoint for the real inner product, Re<A x, y> = <x, A_adjoint(y)>. y -> (B, C, H, W) real."""

    @abstractmethod
    def measurement_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of y for one image of shape (C, H, W), without the batch dimension."""

    def __call__(self, x: Tensor) -> Tensor:
        """Same as `A(x)`."""
        return self.A(x)

    def A_normal(self, x: Tensor) -> Tensor:
        """A_adjoint(A(x)), i.e. Re(A^H A) x. x: (B, C, H, W) -> (B, C, H, W)."""
        return self.A_adjoint(self.A(x))


class Identity(LinearOperator):
    """y = x (denoising). x, y: (B, C, H, W) real."""

    def A(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> x itself."""
        _check_tensor(x, "x", ("B", "C", "H", "W"), is_complex=False)
        return x

    def A_adjoint(self, y: Tensor) -> Tensor:
        """y: (B, C, H, W) -> y itself."""
        _check_tensor(y, "y", ("B", "C", "H", "W"), is_complex=False)
        return y

    def measurement_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(C, H, W) -> (C, H, W)."""
        return _check_image_shape(image_shape)

    def __repr__(self) -> str:
        return "Identity()"


class GaussianBlur(LinearOperator):
    """Convolution with a sum-normalised Gaussian point-spread function, CIRCULAR boundary.

    y = k ⊛ x, with ⊛ the 2-D circular (periodic) convolution over (H, W) computed with FFTs and
    k(a, b) ∝ exp(-(a^2 + b^2) / (2 sigma^2)) at integer offsets |a|, |b| <= kernel_size // 2,
    normalised so that sum k = 1 (total flux is preserved). A kernel wider than the image wraps
    around, as circular convolution requires. The kernel is symmetric, so A_adjoint (correlation with
    k) equals A up to round-off.

    sigma: PSF standard deviation in pixels, > 0.
    kernel_size: odd support width in pixels; default 2 * ceil(3 sigma) + 1.
    x, y: (B, C, H, W) real.
    """

    def __init__(self, sigma: float, kernel_size: int | None = None) -> None:
        self.sigma = positive_float(sigma, "sigma")
        if kernel_size is None:
            kernel_size = 2 * math.ceil(3 * self.sigma) + 1
        self.kernel_size = positive_int(kernel_size, "kernel_size")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd int, got {self.kernel_size}")

    def kernel(
        self, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> Tensor:
        """The sum-normalised PSF, (kernel_size, kernel_size), centred at index kernel_size // 2."""
        r = self.kernel_size // 2
        offsets = torch.arange(-r, r + 1, dtype=dtype, device=device)
        g = torch.exp(-0.5 * (offsets / self.sigma) ** 2)
        k = torch.outer(g, g)
        return k / k.sum()

    def _transfer_function(self, x: Tensor) -> Tensor:
        """rfft2 of the PSF embedded circularly in an (H, W) grid with its centre at (0, 0)."""
        h, w = x.shape[-2:]
        r = self.kernel_size // 2
        offsets = torch.arange(-r, r + 1, device=x.device)
        psf = x.new_zeros(h, w)
        kernel = self.kernel(dtype=x.dtype, device=x.device)
        psf.index_put_((offsets[:, None] % h, offsets[None, :] % w), kernel, accumulate=True)
        return torch.fft.rfft2(psf)

    def A(self, x: Tensor) -> Tensor:
        """Blur. x: (B, C, H, W) real -> (B, C, H, W) real."""
        _check_tensor(x, "x", ("B", "C", "H", "W"), is_complex=False)
        otf = self._transfer_function(x)
        return torch.fft.irfft2(torch.fft.rfft2(x) * otf, s=x.shape[-2:])

    def A_adjoint(self, y: Tensor) -> Tensor:
        """Circular correlation with the PSF. y: (B, C, H, W) real -> (B, C, H, W) real."""
        _check_tensor(y, "y", ("B", "C", "H", "W"), is_complex=False)
        otf = self._transfer_function(y)
        return torch.fft.irfft2(torch.fft.rfft2(y) * otf.conj(), s=y.shape[-2:])

    def measurement_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(C, H, W) -> (C, H, W)."""
        return _check_image_shape(image_shape)

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={self.sigma}, kernel_size={self.kernel_size})"


class FourierSubsample(LinearOperator):
    """The lowest k × k coefficients of the unnormalised 2-D DFT (the "deblurring" of Feng et al. 2023).

    X[p, q] = sum_{i, j} x[i, j] exp(-2 pi i (p i / H + q j / W))   (torch.fft.fft2, norm="backward")
    y[a, b] = X[f_a mod H, f_b mod W],  f_a = a - floor(k / 2),  a, b = 0 .. k - 1.
    The kept frequencies per axis are -floor(k/2) .. ceil(k/2) - 1 cycles per image (fftfreq's order,
    so for even k the -k/2 frequency is kept and +k/2 is not), and y is stored CENTRED: zero frequency
    at y[..., k // 2, k // 2]. This equals the centre crop of fftshift(fft2(x)).

    Adjoint: zero-fill the kept coefficients into an (H, W) grid and apply the adjoint of the
    unnormalised DFT, H W ifft2 (= ifft2 with norm="forward"), keeping the real part. For x whose
    spectrum lies inside the kept block, A_adjoint(A(x)) = H W x.

    k: block size, 1 <= k <= min(H, W) (checked when called).
    image_size: (H, W), optional. A_adjoint cannot infer H, W from y; give them here or to A_adjoint.
    x: (B, C, H, W) real; y: (B, C, k, k) complex.
    """

    is_complex = True

    def __init__(self, k: int, *, image_size: tuple[int, int] | None = None) -> None:
        self.k = positive_int(k, "k")
        if image_size is not None:
            image_size = height_width(image_size, "image_size")
            self._check_k(image_size, "image_size")
        self.image_size = image_size

    def _check_k(self, size: tuple[int, ...], name: str) -> None:
        h, w = size[-2:]
        if self.k > h or self.k > w:
            raise ValueError(f"{name}: expected H >= k and W >= k with k = {self.k}, got shape {tuple(size)}")

    def _indices(self, n: int, device: torch.device) -> Tensor:
        """DFT indices (in fft2 order) of the kept frequencies along an axis of length n, shape (k,)."""
        return (torch.arange(self.k, device=device) - self.k // 2) % n

    def A(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) real -> y: (B, C, k, k) complex (complex64 for float32, complex128 for float64)."""
        expected = ("B", "C") + (self.image_size if self.image_size is not None else ("H", "W"))
        _check_tensor(x, "x", expected, is_complex=False)
        self._check_k(x.shape, "x")
        h, w = x.shape[-2:]
        spectrum = torch.fft.fft2(x)
        rows, cols = self._indices(h, x.device), self._indices(w, x.device)
        return spectrum.index_select(-2, rows).index_select(-1, cols)

    def A_adjoint(self, y: Tensor, *, image_size: tuple[int, int] | None = None) -> Tensor:
        """y: (B, C, k, k) complex -> (B, C, H, W) real, with (H, W) = image_size or the constructor's."""
        _check_tensor(y, "y", ("B", "C", self.k, self.k), is_complex=True)
        if image_size is None:
            image_size = self.image_size
        if image_size is None:
            raise ValueError("image_size: A_adjoint needs the image size (H, W); pass image_size to "
                             "FourierSubsample(...) or to A_adjoint, got None")
        h, w = height_width(image_size, "image_size")
        self._check_k((h, w), "image_size")
        b, c = y.shape[:2]
        rows = y.new_zeros(b, c, self.k, w).index_copy(-1, self._indices(w, y.device), y)
        full = y.new_zeros(b, c, h, w).index_copy(-2, self._indices(h, y.device), rows)
        return torch.fft.ifft2(full, norm="forward").real

    def A_normal(self, x: Tensor) -> Tensor:
        """A_adjoint(A(x)) at x's own size. x: (B, C, H, W) -> (B, C, H, W)."""
        return self.A_adjoint(self.A(x), image_size=tuple(x.shape[-2:]))

    def measurement_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(C, H, W) -> (C, k, k)."""
        c, h, w = _check_image_shape(image_shape)
        self._check_k((h, w), "image_shape")
        return (c, self.k, self.k)

    def __repr__(self) -> str:
        return f"FourierSubsample(k={self.k}, image_size={self.image_size})"


class Inpainting(LinearOperator):
    """y = mask * x: observed pixels kept, missing pixels set to zero.

    mask: (H, W) (shared by all channels) or (C, H, W), bool or 0/1 numbers, 1 = observed.
    x, y: (B, C, H, W) real.
    """

    def __init__(self, mask: Tensor | np.ndarray) -> None:
        self.mask = _binary_mask(mask, "mask", {2: "(H, W)", 3: "(C, H, W)"})

    def _expected(self) -> tuple[int | str, ...]:
        return ("B", "C") + tuple(self.mask.shape) if self.mask.ndim == 2 else ("B",) + tuple(self.mask.shape)

    def A(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) real -> (B, C, H, W) real."""
        _check_tensor(x, "x", self._expected(), is_complex=False)
        return x * self.mask.to(device=x.device, dtype=x.dtype)

    def A_adjoint(self, y: Tensor) -> Tensor:
        """y: (B, C, H, W) real -> (B, C, H, W) real (A is a projection, so A_adjoint = A)."""
        _check_tensor(y, "y", self._expected(), is_complex=False)
        return y * self.mask.to(device=y.device, dtype=y.dtype)

    def measurement_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(C, H, W) -> (C, H, W)."""
        c, h, w = _check_image_shape(image_shape)
        if tuple(self.mask.shape[-2:]) != (h, w) or (self.mask.ndim == 3 and self.mask.shape[0] != c):
            raise ValueError(f"image_shape: expected {format_shape(self._expected()[1:])}, got {(c, h, w)}")
        return (c, h, w)

    def __repr__(self) -> str:
        return f"Inpainting(mask of shape {tuple(self.mask.shape)}, {int(self.mask.sum())} observed)"


class FourierMask(LinearOperator):
    """Masked orthonormal 2-D DFT (MRI-like, single coil): y = mask * fft2(x, norm="ortho").

    fft2 with norm="ortho" is unitary, X[p, q] = (H W)^(-1/2) sum x[i, j] exp(-2 pi i (p i/H + q j/W)),
    so A_adjoint(y) = Re(ifft2(mask * y, norm="ortho")).

    mask: (H, W), bool or 0/1 numbers, in torch.fft.fft2 ORDER (zero frequency at [0, 0], not centred;
        apply torch.fft.ifftshift to a centred mask first).
    x: (B, C, H, W) real; y: (B, C, H, W) complex, zero where mask is 0.
    """

    is_complex = True

    def __init__(self, mask: Tensor | np.ndarray) -> None:
        self.mask = _binary_mask(mask, "mask", {2: "(H, W)"})

    def A(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) real -> (B, C, H, W) complex (complex64 for float32, complex128 for float64)."""
        _check_tensor(x, "x", ("B", "C") + tuple(self.mask.shape), is_complex=False)
        return torch.fft.fft2(x, norm="ortho") * self.mask.to(device=x.device, dtype=x.dtype)

    def A_adjoint(self, y: Tensor) -> Tensor:
        """y: (B, C, H, W) complex -> (B, C, H, W) real."""
        _check_tensor(y, "y", ("B", "C") + tuple(self.mask.shape), is_complex=True)
        masked = y * self.mask.to(device=y.device, dtype=y.real.dtype)
        return torch.fft.ifft2(masked, norm="ortho").real

    def measurement_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(C, H, W) -> (C, H, W)."""
        c, h, w = _check_image_shape(image_shape)
        if (h, w) != tuple(self.mask.shape):
            expected = format_shape(("C", *self.mask.shape))
            raise ValueError(f"image_shape: expected {expected}, got {(c, h, w)}")
        return (c, h, w)

    def __repr__(self) -> str:
        return f"FourierMask(mask of shape {tuple(self.mask.shape)}, {int(self.mask.sum())} kept)"


class Interferometer(LinearOperator):
    """Radio-interferometric visibilities of a square image by direct (non-uniform) Fourier summation.

    V(u, v) = P(u, v) sum_{i, j} I[i, j] exp(+2 pi i (u l_j + v m_i)),
    P(u, v) = sinc^2(u Δ) sinc^2(v Δ)  (triangle-pulse pixel response, sinc(t) = sin(pi t) / (pi t)),
    l_j = (npix/2 - 1/2 - j) Δ,  m_i = (npix/2 - 1/2 - i) Δ,  Δ = fov / npix,
    the EHT imaging convention (eht-imaging): column j = 0 is east (l > 0, image left), row i = 0 is
    north (m > 0, image top). I is the flux per pixel, so V(0, 0) is the total flux.

    The (M, npix^2) matrix is precomputed in float64 and cast once per dtype/device, which suits up to
    a few thousand visibilities at 64 × 64.

    uv: (M, 2) baseline coordinates (u, v) in wavelengths, numpy or torch, finite.
    npix: image side in pixels.
    fov: field of view (image side) in radians; see `uas_to_rad`.
    x: (B, 1, npix, npix) real; y: (B, M) complex (complex64 for float32, complex128 for float64).
    """

    is_complex = True

    def __init__(self, uv: Tensor | np.ndarray, npix: int, fov: float) -> None:
        if not isinstance(uv, (Tensor, np.ndarray)):
            raise TypeError(f"uv: expected a torch.Tensor or numpy array, got {type(uv).__name__}")
        uv = torch.as_tensor(uv).detach()
        if uv.is_complex() or uv.dtype == torch.bool:
            raise TypeError(f"uv: expected real coordinates, got dtype {uv.dtype}")
        if uv.ndim != 2 or uv.shape[1] != 2 or uv.shape[0] == 0:
            raise ValueError(f"uv: expected shape (M, 2) with M >= 1, got {tuple(uv.shape)}")
        self.uv = uv.to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(self.uv).all()):
            raise ValueError("uv: expected finite values, got NaN or inf")
        self.npix = positive_int(npix, "npix")
        self.fov = positive_float(fov, "fov")
        self.pixel_size = self.fov / self.npix
        self._matrix = self._build_matrix()
        self._cache: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def _build_matrix(self) -> Tensor:
        """Real and imaginary parts of the measurement matrix stacked, (2, M, npix^2), float64."""
        centre = self.npix / 2 - 0.5
        coords = (centre - torch.arange(self.npix, dtype=torch.float64)) * self.pixel_size
        u, v = self.uv[:, 0], self.uv[:, 1]
        # l_j and m_i share the same pixel-centre coordinates; phase[m, i, j] = 2 pi (u_m l_j + v_m m_i).
        ul, vm = u[:, None] * coords, v[:, None] * coords
        phase = 2 * math.pi * (ul[:, None, :] + vm[:, :, None])
        response = (torch.sinc(u * self.pixel_size) * torch.sinc(v * self.pixel_size)) ** 2
        phase = phase.reshape(len(u), -1)
        return torch.stack([torch.cos(phase), torch.sin(phase)]) * response[None, :, None]

    def _matrix_like(self, t: Tensor) -> Tensor:
        key = (t.dtype, t.device)
        if key not in self._cache:
            self._cache[key] = self._matrix.to(device=t.device, dtype=t.dtype)
        return self._cache[key]

    @property
    def num_visibilities(self) -> int:
        """M, the number of (u, v) points."""
        return self.uv.shape[0]

    def A(self, x: Tensor) -> Tensor:
        """Visibilities. x: (B, 1, npix, npix) real -> (B, M) complex."""
        _check_tensor(x, "x", ("B", 1, self.npix, self.npix), is_complex=False)
        matrix = self._matrix_like(x)
        flat = x.reshape(x.shape[0], -1)
        return torch.complex(flat @ matrix[0].T, flat @ matrix[1].T)

    def A_adjoint(self, y: Tensor) -> Tensor:
        """Re(F^H y), the dirty-image back-projection. y: (B, M) complex -> (B, 1, npix, npix) real."""
        _check_tensor(y, "y", ("B", self.num_visibilities), is_complex=True)
        matrix = self._matrix_like(y.real)
        flat = y.real @ matrix[0] + y.imag @ matrix[1]
        return flat.reshape(y.shape[0], 1, self.npix, self.npix)

    def measurement_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(1, npix, npix) -> (M,)."""
        if _check_image_shape(image_shape) != (1, self.npix, self.npix):
            raise ValueError(f"image_shape: expected (1, {self.npix}, {self.npix}), got {tuple(image_shape)}")
        return (self.num_visibilities,)

    def __repr__(self) -> str:
        return f"Interferometer(M={self.num_visibilities}, npix={self.npix}, fov={self.fov:.4g} rad)"
