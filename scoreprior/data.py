"""Built-in datasets and image loading.

Images are (N, C, H, W) tensors. The built-in Gaussian random field comes with its exact mean and
covariance, so a prior trained on it can be checked against the closed-form density
(`scoreprior.scores.GaussianScore`).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["DATASETS", "gaussian_field", "sample_gaussian", "load_images", "builtin_dataset"]

DATASETS = ("gaussian-field",)

# Keys looked up, in order, in an .npz archive before falling back to its first array.
_NPZ_KEYS = ("images", "x")


def gaussian_field(
    height: int,
    width: int,
    *,
    length_scale: float | tuple[float, float] = 2.0,
    scale: float = 0.2,
    offset: float = 0.5,
    nugget: float = 1e-2,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """Stationary Gaussian random-field model of (1, height, width) images.

    cov[p, q] = scale^2 exp(-dr^2 / (2 l_r^2) - dc^2 / (2 l_c^2)) + nugget [p = q]
    for pixels p, q at row/column offsets (dr, dc) (squared-exponential kernel, Rasmussen & Williams
    2006, eq. 4.9); mean = offset everywhere. The covariance is dense (neighbouring pixels are
    strongly correlated), and the nugget keeps it well conditioned.

    height, width: image size in pixels.
    length_scale: correlation length in pixels, one number or (rows, columns) for an anisotropic field.
    scale: marginal standard deviation of the smooth part; offset: the constant mean.
    nugget: white-noise variance added on the diagonal (> 0).
    dtype: dtype of the returned tensors (keep float64 for reference densities).

    Returns mean (1, height, width) and cov (d, d), d = height * width, in row-major pixel order.
    """
    if height < 1 or width < 1:
        raise ValueError(f"height, width: expected positive integers, got {height}, {width}")
    l_row, l_col = (length_scale, length_scale) if isinstance(length_scale, (int, float)) else length_scale
    if l_row <= 0 or l_col <= 0:
        raise ValueError(f"length_scale: expected positive values, got {length_scale}")
    if scale <= 0 or nugget <= 0:
        raise ValueError(f"scale, nugget: expected positive numbers, got {scale}, {nugget}")
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=dtype), torch.arange(width, dtype=dtype), indexing="ij"
    )
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    dr = (rows[:, None] - rows[None, :]) / l_row
    dc = (cols[:, None] - cols[None, :]) / l_col
    cov = scale**2 * torch.exp(-0.5 * (dr**2 + dc**2))
    cov = cov + nugget * torch.eye(height * width, dtype=dtype)
    mean = torch.full((1, height, width), float(offset), dtype=dtype)
    return mean, cov


def sample_gaussian(
    mean: Tensor, cov: Tensor, n: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """Draw n samples of N(mean, cov) as mean + L z, with L the Cholesky factor of cov.

    mean: (*event_shape); cov: (d, d) symmetric positive definite, d = mean.numel(), in the
    row-major order of the event. Device and dtype follow `mean`.

    Returns (n, *event_shape).
    """
    d = mean.numel()
    if cov.shape != (d, d):
        raise ValueError(f"cov: expected shape ({d}, {d}) for mean of shape {tuple(mean.shape)}, got {tuple(cov.shape)}")
    if n < 0:
        raise ValueError(f"n: expected a non-negative integer, got {n}")
    chol, info = torch.linalg.cholesky_ex(cov.to(device=mean.device, dtype=mean.dtype))
    if info.item() != 0:
        raise ValueError("cov: expected a positive definite matrix, Cholesky factorisation failed")
    z = torch.randn(n, d, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean.reshape(1, d) + z @ chol.mT).reshape((n,) + mean.shape)


def _read_array(path: Path) -> np.ndarray:
    """The image array stored in an .npy file or an .npz archive."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable .npy or .npz file ({err})") from err
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        if not loaded.files:
            raise ValueError(f"{path}: the .npz archive holds no arrays")
        key = next((k for k in _NPZ_KEYS if k in loaded.files), loaded.files[0])
        return loaded[key]


def load_images(path: str | Path) -> Tensor:
    """Load a stack of images from an .npy file or an .npz archive.

    An .npz archive is read at key "images", else "x", else its first array. Accepted shapes are
    (N, H, W) (a channel axis C = 1 is added) and (N, C, H, W). uint8 data are scaled to [0, 1] by
    1/255; other real types are converted as they are.

    Returns (N, C, H, W) float32.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    array = _read_array(path)
    if array.dtype.kind not in "uif":
        raise ValueError(f"{path}: expected real-valued images, got dtype {array.dtype}")
    if array.ndim not in (3, 4) or array.shape[0] == 0:
        raise ValueError(f"{path}: expected images of shape (N, H, W) or (N, C, H, W), got {array.shape}")
    images = torch.from_numpy(np.ascontiguousarray(array))
    images = images.float() / 255.0 if array.dtype == np.uint8 else images.float()
    if not torch.isfinite(images).all():
        raise ValueError(f"{path}: images contain NaN or inf")
    return images.unsqueeze(1) if images.ndim == 3 else images


def builtin_dataset(
    name: str, n: int, *, size: int = 16, generator: torch.Generator | None = None
) -> Tensor:
    """n images from a built-in dataset, float32 of shape (n, 1, size, size).

    name: one of `DATASETS`:
      "gaussian-field": samples of `gaussian_field(size, size)` with its default parameters, so
        `GaussianScore(*gaussian_field(size, size), sde)` is their exact score.
    generator: CPU torch.Generator for reproducible draws.
    """
    if name not in DATASETS:
        raise ValueError(f"name: expected one of {list(DATASETS)}, got {name!r}")
    if size < 1:
        raise ValueError(f"size: expected a positive integer, got {size}")
    mean, cov = gaussian_field(size, size)
    return sample_gaussian(mean, cov, n, generator=generator).float()
