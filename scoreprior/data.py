"""Built-in datasets and image loading.

Images are (N, C, H, W) tensors. The Gaussian random field and the PCA Gaussian come with their exact
mean and covariance, so a prior trained on them can be checked against the closed-form density
(`scoreprior.scores.GaussianScore`). Synthetic black holes follow the EHT imaging conventions of
`scoreprior.operators.Interferometer`; natural patches and faces come from scikit-image's bundled
sample images (no download; install the `studies` extra).
"""

from __future__ import annotations

import functools
import math
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from scoreprior._checks import choice, integer, nonnegative_int, positive_float, positive_int

__all__ = [
    "DATASETS",
    "BLACKHOLE_FOV_UAS",
    "NATURAL_IMAGES",
    "ring_features",
    "gaussian_field",
    "sample_gaussian",
    "load_images",
    "blackhole_images",
    "ring_radius",
    "natural_patches",
    "face_images",
    "pca_gaussian",
    "builtin_dataset",
]

DATASETS = ("gaussian-field", "blackhole", "natural", "faces", "pca-gaussian")

# Field of view (image side) of the synthetic black holes: 160 µas, as in DPI's 32 × 32 M87 images
# (Sun & Bouman 2020), i.e. 5 µas per pixel at 32 × 32; the M87 ring (about 42 µas) then spans 8 pixels.
BLACKHOLE_FOV_UAS = 160.0

# scikit-image sample images free of copyright restrictions (CC0 or public domain, per their docstrings).
NATURAL_IMAGES = ("camera", "astronaut", "coffee", "chelsea", "rocket", "brick", "grass", "gravel", "coins")

# Natural images are cut into blocks of this side (after downscaling); a block belongs to the test split
# when (block_row + 2 block_col) % 5 == 0 (about one block in five), and every patch lies in one block.
_NATURAL_BLOCK = 64

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

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
    height, width = positive_int(height, "height"), positive_int(width, "width")
    l_row, l_col = (length_scale, length_scale) if isinstance(length_scale, (int, float)) else length_scale
    l_row, l_col = positive_float(l_row, "length_scale"), positive_float(l_col, "length_scale")
    scale, nugget = positive_float(scale, "scale"), positive_float(nugget, "nugget")
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
    n = nonnegative_int(n, "n")
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


def _bounds(value: float | tuple[float, float], name: str) -> tuple[float, float]:
    """(lo, hi) of a range given as a number (lo = hi) or a pair; ValueError naming it otherwise."""
    lo, hi = (value, value) if isinstance(value, (int, float)) else value
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"{name}: expected a number or a range (lo, hi) with lo <= hi, got {value!r}")
    return float(lo), float(hi)


def _centred_coords(size: int, step: float, dtype: torch.dtype) -> Tensor:
    """Coordinates (size/2 - 1/2 - j) * step of pixel centres j = 0..size-1 (east/north positive)."""
    return (size / 2 - 0.5 - torch.arange(size, dtype=dtype)) * step


def blackhole_images(
    n: int,
    size: int = 32,
    *,
    fov_uas: float = BLACKHOLE_FOV_UAS,
    diameter_uas: float | tuple[float, float] = (35.0, 50.0),
    width_uas: float | tuple[float, float] = (5.0, 15.0),
    asymmetry: float | tuple[float, float] = (0.0, 1.0),
    position_angle_deg: float | tuple[float, float] = (0.0, 360.0),
    blur_uas: float | tuple[float, float] = (0.0, 20.0),
    peak: float | tuple[float, float] = (0.5, 1.0),
    supersample: int = 4,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    return_params: bool = False,
) -> Tensor | tuple[Tensor, dict]:
    """Synthetic black-hole images: blurred crescents ("m-ring" models of the EHT, m = 1).

    In polar sky coordinates (r, phi) about the image centre, phi the position angle east of north,
        I(r, phi) = exp(-(r - D/2)^2 / (2 w^2)) (1 + A cos(phi - phi_0)),  w = width / 2.355,
    a ring of diameter D and radial FWHM `width` whose brightness peaks at position angle phi_0, with
    contrast A in [0, 1] (A = 0: uniform ring). I is sampled on a grid of `supersample` × `supersample`
    points per pixel, convolved with a Gaussian of FWHM `blur_uas` (flux-preserving), averaged over each
    pixel, and scaled so that the brightest pixel equals `peak`. Pixel axes follow `scoreprior.operators.
    Interferometer` (eht-imaging): column j = 0 is east (left), row i = 0 is north (top), pixel centres
    at l_j = (size/2 - 1/2 - j) * fov_uas / size, so the ring is centred between the four middle pixels
    and `Interferometer(uv, size, uas_to_rad(fov_uas))` measures these images directly.

    Values are brightness per pixel on a [0, 1] scale (peak <= 1), non-negative; total flux (the pixel
    sum) varies with peak, diameter, width, contrast and blur and is reported in the parameters. To
    work in Jy, multiply an image by flux_jy / params["flux"][k].

    Every model parameter is a number (fixed) or a range (lo, hi) drawn uniformly per image; the
    defaults span the EHT M87/Sgr A* range: diameter 35–50 µas (M87 2017: about 42 µas), radial FWHM
    5–15 µas, contrast 0–1, any orientation, blur FWHM 0–20 µas (the EHT nominal resolution is about
    20 µas), peak 0.5–1.
    n: number of images; size: image side in pixels; fov_uas: field of view (image side) in µas.
    supersample: sub-pixel samples per pixel side (the blur and pixel averaging act on them).
    generator: CPU torch.Generator for reproducible draws; dtype: dtype of the images.
    return_params: also return a dict of (n,) float64 tensors "diameter_uas", "radius_px",
        "width_uas", "asymmetry", "position_angle_deg", "blur_uas", "peak", "flux" (pixel sum of the
        returned image), and the float "fov_uas".

    Returns images (n, 1, size, size), or (images, params) with return_params.
    """
    n, size = nonnegative_int(n, "n"), integer(size, "size", low=2)
    fov_uas, supersample = positive_float(fov_uas, "fov_uas"), positive_int(supersample, "supersample")
    ranges = {"diameter_uas": diameter_uas, "width_uas": width_uas, "asymmetry": asymmetry,
              "position_angle_deg": position_angle_deg, "blur_uas": blur_uas, "peak": peak}
    bounds = {name: _bounds(value, name) for name, value in ranges.items()}
    for name, ok, expected in (("diameter_uas", lambda v: v > 0, "positive values"),
                               ("width_uas", lambda v: v > 0, "positive values"),
                               ("peak", lambda v: v > 0, "positive values"),
                               ("asymmetry", lambda v: 0 <= v <= 1, "values in [0, 1]"),
                               ("blur_uas", lambda v: v >= 0, "non-negative values")):
        if not all(ok(v) for v in bounds[name]):
            raise ValueError(f"{name}: expected {expected}, got {ranges[name]!r}")
    u = torch.rand(n, len(bounds), generator=generator, dtype=torch.float64)
    params = {name: lo + (hi - lo) * u[:, i] for i, (name, (lo, hi)) in enumerate(bounds.items())}

    pixel = fov_uas / size
    fine = _centred_coords(size * supersample, pixel / supersample, torch.float64)
    l, m = fine[None, :], fine[:, None]  # l east (columns), m north (rows)
    radius, angle = torch.hypot(l, m), torch.atan2(l, m)
    # The blur acts on the sub-pixel grid, before pixel averaging: a Gaussian sampled at pixel spacing
    # would lose most of the variance of a sub-pixel blur.
    offsets = _centred_coords(size * supersample, 1.0, torch.float64)
    images = []
    for chunk in torch.arange(n).split(128):
        ring = params["diameter_uas"][chunk, None, None] / 2
        w = params["width_uas"][chunk, None, None] / _FWHM_PER_SIGMA
        pa = torch.deg2rad(params["position_angle_deg"][chunk, None, None])
        image = torch.exp(-0.5 * ((radius - ring) / w) ** 2) \
            * (1 + params["asymmetry"][chunk, None, None] * torch.cos(angle - pa))
        # Separable blur K X K^T with columns of K summing to one, so the total flux is unchanged.
        sigma = (params["blur_uas"][chunk] / _FWHM_PER_SIGMA / (pixel / supersample)).clamp_min(1e-3)
        kernel = torch.exp(-0.5 * ((offsets[:, None] - offsets[None, :]) / sigma[:, None, None]) ** 2)
        kernel = kernel / kernel.sum(1, keepdim=True)
        image = F.avg_pool2d((kernel @ image @ kernel.mT)[:, None], supersample)[:, 0]
        images.append(image * (params["peak"][chunk] / image.amax((1, 2)))[:, None, None])
    images = torch.cat(images) if images else torch.zeros(0, size, size, dtype=torch.float64)
    params["radius_px"] = params["diameter_uas"] / 2 / pixel
    params["flux"] = images.sum((1, 2))
    images = images[:, None].to(dtype)
    return (images, {**params, "fov_uas": float(fov_uas)}) if return_params else images


def ring_radius(
    images: Tensor, *, fov_uas: float = BLACKHOLE_FOV_UAS, n_rays: int = 64, step_px: float = 0.05
) -> Tensor:
    """Radius of a centred ring, from where the brightness peaks along rays from the image centre.

    Along each of `n_rays` rays at equally spaced angles the brightness is interpolated (bicubic) every
    `step_px` pixels out to half the image side; the radius of its maximum is averaged over rays,
    weighted by the maximum brightness (so the faint side of a crescent counts little).
    For a ring I(r) = f(r - R) with f peaked at 0 (unblurred `blackhole_images`) it returns R; a
    Gaussian blur of width s moves the peak inwards by about s^2 / (2 R).

    images: (B, 1, H, W) or (B, H, W), non-negative, the ring centred as in `blackhole_images`;
    fov_uas: field of view (image side) in µas, so pixels are fov_uas / W µas wide.
    Returns (B,) radii in µas, float64.
    """
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or images.shape[-1] < 4 or images.shape[-2] < 4:
        raise ValueError(f"images: expected shape (B, 1, H, W) or (B, H, W), got {tuple(images.shape)}")
    n_rays, step_px = positive_int(n_rays, "n_rays"), positive_float(step_px, "step_px")
    h, w = images.shape[-2:]
    x = images.detach().to(device="cpu", dtype=torch.float64)[:, None]
    radii = torch.arange(0.0, min(h, w) / 2 - 1, step_px, dtype=torch.float64)
    angles = torch.arange(n_rays, dtype=torch.float64) * (2 * math.pi / n_rays)
    # Pixel offsets from the centre ((W-1)/2, (H-1)/2) to normalised grid_sample coordinates in [-1, 1].
    cols = radii[None, :] * torch.cos(angles)[:, None] * 2 / (w - 1)
    rows = radii[None, :] * torch.sin(angles)[:, None] * 2 / (h - 1)
    grid = torch.stack([cols, rows], -1).expand(x.shape[0], -1, -1, -1)
    profiles = F.grid_sample(x, grid, mode="bicubic", align_corners=True)[:, 0]  # (B, rays, radii)
    best, index = profiles.max(-1)
    weights = best.clamp_min(0)
    return (weights * radii[index]).sum(-1) / weights.sum(-1) * (fov_uas / w)


def ring_features(images: Tensor, *, fov_uas: float = BLACKHOLE_FOV_UAS) -> dict[str, Tensor]:
    """Diameter, width, brightness position angle and flux of centred rings (EHT ring characterisation).

    diameter_uas: 2 `ring_radius`; width_uas: full width at half maximum of the azimuthally averaged
    radial profile about its peak (linear interpolation of the half-maximum crossings), which includes
    the blur and pixel size; position_angle_deg: arg(sum I (m + i l)) in degrees in [0, 360), east of
    north, the angle of the brightness centroid's offset as in `blackhole_images`; flux: pixel sum.

    images: (B, 1, H, W) or (B, H, W), the ring centred as in `blackhole_images`; fov_uas: image side in µas.
    Returns {name: (B,) float64}.
    """
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or images.shape[-1] < 4 or images.shape[-2] < 4:
        raise ValueError(f"images: expected shape (B, 1, H, W) or (B, H, W), got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    x = images.detach().to(device="cpu", dtype=torch.float64)
    pixel = fov_uas / w
    l, m = _centred_coords(w, pixel, torch.float64)[None, :], _centred_coords(h, pixel, torch.float64)[:, None]
    r = torch.hypot(l, m).reshape(-1)
    edges = torch.arange(0.0, min(h, w) / 2 * pixel + pixel / 2, pixel / 2, dtype=torch.float64)
    shell = torch.bucketize(r, edges).clamp_max(len(edges) - 1) - 1
    counts = torch.zeros(len(edges) - 1, dtype=torch.float64).index_add_(0, shell.clamp_min(0), (shell >= 0).double())
    flat = x.reshape(x.shape[0], -1) * (shell >= 0)
    sums = torch.zeros(x.shape[0], len(edges) - 1, dtype=torch.float64).index_add_(1, shell.clamp_min(0), flat)
    profile = sums / counts.clamp_min(1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    widths = torch.stack([_fwhm(row, centres) for row in profile]) if len(profile) else torch.zeros(0, dtype=x.dtype)
    angle = torch.rad2deg(torch.atan2((x * l).sum((1, 2)), (x * m).sum((1, 2)))) % 360.0
    return {"diameter_uas": 2 * ring_radius(x, fov_uas=fov_uas), "width_uas": widths,
            "position_angle_deg": angle, "flux": x.sum((1, 2))}


def _fwhm(profile: Tensor, centres: Tensor) -> Tensor:
    """Full width at half maximum of a 1-D profile about its peak, half-maximum crossings interpolated linearly."""
    peak = int(profile.argmax())
    half = 0.5 * profile[peak]

    def crossing(indices: range) -> Tensor:
        previous = peak
        for i in indices:
            if profile[i] < half:
                frac = (profile[previous] - half) / (profile[previous] - profile[i])
                return centres[previous] + frac * (centres[i] - centres[previous])
            previous = i
        return centres[previous]

    return crossing(range(peak + 1, len(profile))) - crossing(range(peak - 1, -1, -1))


def _skimage():
    """The scikit-image package, or an ImportError naming the extra that installs it."""
    try:
        import skimage.color
        import skimage.data
        import skimage.transform
    except ImportError as err:
        raise ImportError("scikit-image is needed for the bundled image datasets: "
                          "pip install 'scoreprior[studies]'") from err
    return skimage


@functools.lru_cache(maxsize=None)
def _grey_image(name: str, downscale: int) -> np.ndarray:
    """scikit-image sample `name` in grey levels [0, 1], block-averaged by `downscale` (read-only)."""
    skimage = _skimage()
    image = getattr(skimage.data, name)()
    if image.ndim == 3:
        image = skimage.color.rgb2gray(image[..., :3])
    else:
        image = image / 255.0 if image.dtype == np.uint8 else image.astype(np.float64)
    h, w = (s - s % downscale for s in image.shape)
    image = skimage.transform.downscale_local_mean(image[:h, :w], (downscale, downscale))
    image.setflags(write=False)
    return image


def natural_patches(
    n: int,
    size: int,
    *,
    images: tuple[str, ...] = NATURAL_IMAGES,
    split: str = "train",
    downscale: int = 2,
    generator: torch.Generator | None = None,
    return_locations: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Grey square patches of scikit-image's bundled photographs, in [0, 1].

    The images (default `NATURAL_IMAGES`: camera, astronaut, coffee, chelsea, rocket, brick, grass,
    gravel, coins; CC0 or public domain) are converted to grey (ITU-R 601 luma), block-averaged by
    `downscale`, and cut into 64 × 64 blocks; block (r, c) is in the test split when (r + 2 c) % 5 == 0
    (about 20 % of blocks) and in the train split otherwise. A patch lies inside one block, so train and
    test patches never share a pixel, whatever their size. Blocks are drawn uniformly among those of the
    split, then the patch position uniformly inside the block.

    n: number of patches; size: patch side in pixels, at most 64; images: scikit-image sample names;
    split: "train" or "test"; downscale: integer block-averaging factor applied first;
    generator: CPU torch.Generator for reproducible draws;
    return_locations: also return (n, 3) long (image index into `images`, top row, left column) of each
        patch in the downscaled image.

    Returns (n, 1, size, size) float32, or (patches, locations).
    """
    n, size = nonnegative_int(n, "n"), integer(size, "size", low=1, high=_NATURAL_BLOCK)
    choice(split, "split", ("train", "test"))
    downscale = positive_int(downscale, "downscale")
    unknown = [name for name in images if name not in NATURAL_IMAGES]
    if unknown or not images:
        raise ValueError(f"images: expected a non-empty tuple of names from {list(NATURAL_IMAGES)}, got {images!r}")
    grey = [_grey_image(name, downscale) for name in images]
    blocks = [
        (k, r * _NATURAL_BLOCK, c * _NATURAL_BLOCK)
        for k, image in enumerate(grey)
        for r in range(image.shape[0] // _NATURAL_BLOCK)
        for c in range(image.shape[1] // _NATURAL_BLOCK)
        if ((r + 2 * c) % 5 == 0) == (split == "test")
    ]
    if not blocks:
        raise ValueError(f"images: {images!r} hold no {split} block of {_NATURAL_BLOCK} pixels at downscale {downscale}")
    chosen = torch.randint(len(blocks), (n,), generator=generator)
    offsets = torch.randint(_NATURAL_BLOCK - size + 1, (n, 2), generator=generator)
    locations = torch.tensor([blocks[i] for i in chosen.tolist()], dtype=torch.long).reshape(n, 3)
    locations[:, 1:] += offsets
    patches = np.stack([grey[k][r:r + size, c:c + size] for k, r, c in locations.tolist()]) if n else \
        np.zeros((0, size, size))
    patches = torch.from_numpy(patches).float()[:, None]
    return (patches, locations) if return_locations else patches


def face_images(size: int = 24, *, flip: bool = False) -> Tensor:
    """The 100 face images of scikit-image's LFW subset (Labeled Faces in the Wild), grey, in [0, 1].

    `skimage.data.lfw_subset()` holds 200 grey 25 × 25 crops: the first 100 are faces, the rest are
    not; only those 100 faces exist, so a prior trained on them sees few images. They are resized to
    size × size with anti-aliasing (bilinear).
    size: output side in pixels; flip: append the 100 horizontal mirror images (200 in all).
    Returns (100, 1, size, size) float32, or (200, 1, size, size) with flip.
    """
    size = positive_int(size, "size")
    skimage = _skimage()
    faces = skimage.data.lfw_subset()[:100]
    resized = np.stack([
        skimage.transform.resize(face, (size, size), order=1, anti_aliasing=size < face.shape[0])
        for face in faces
    ])
    images = torch.from_numpy(resized).float()[:, None].clamp(0.0, 1.0)
    return torch.cat([images, images.flip(-1)]) if flip else images


def pca_gaussian(
    size: int = 16,
    *,
    source: str = "faces",
    n_components: int | None = None,
    eigenvalue_floor: float = 0.01,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """The "Gaussian ground truth" of Feng et al. (ICCV 2023): N(mean, cov) fitted by PCA to images.

    mean = the sample mean; cov = U_k diag(lambda_k) U_k^T + floor I, with (lambda_k, U_k) the top
    `n_components` eigenpairs of the sample covariance, i.e. the PCA eigenvalues plus `floor` (0.01 in
    the paper, which took 256 components of 16 × 16 face images; with k = d it is S + floor I).
    source: "faces" (the paper's choice, with what is bundled: the 100 `face_images(size)` and their
        mirror images, 200 images, so at most 199 eigenvalues exceed the floor) or "natural" (20,000
        `natural_patches(size)` of the train split, drawn with seed 0).
    size: image side; n_components: k in [1, size^2] (default size^2); eigenvalue_floor: > 0.
    Returns mean (1, size, size) and cov (d, d), d = size^2, row-major, in `dtype`; every eigenvalue of
    cov is at least the floor. Sample it with `sample_gaussian(mean, cov, n)`.
    """
    size = positive_int(size, "size")
    d = size * size
    choice(source, "source", ("faces", "natural"))
    k = d if n_components is None else integer(n_components, "n_components", low=1, high=d)
    eigenvalue_floor = positive_float(eigenvalue_floor, "eigenvalue_floor")
    if source == "faces":
        images = face_images(size, flip=True)
    else:
        images = natural_patches(20000, size, generator=torch.Generator().manual_seed(0))
    x = images.reshape(images.shape[0], d).double()
    mean = x.mean(0)
    eigvals, eigvecs = torch.linalg.eigh(torch.cov(x.T))
    top_vals, top_vecs = eigvals[-k:].clamp_min(0.0), eigvecs[:, -k:]
    cov = (top_vecs * top_vals) @ top_vecs.T
    cov = 0.5 * (cov + cov.T) + eigenvalue_floor * torch.eye(d, dtype=torch.float64)
    return mean.reshape(1, size, size).to(dtype), cov.to(dtype)


def builtin_dataset(
    name: str, n: int, *, size: int = 16, generator: torch.Generator | None = None
) -> Tensor:
    """n images from a built-in dataset, float32 of shape (n, 1, size, size).

    name: one of `DATASETS`:
      "gaussian-field": samples of `gaussian_field(size, size)` with its default parameters, so
        `GaussianScore(*gaussian_field(size, size), sde)` is their exact score.
      "blackhole": `blackhole_images(n, size)` with its default parameters (fov 160 µas, peak <= 1).
      "natural": `natural_patches(n, size)` of the train split, in [0, 1].
      "faces": n draws from the 100 `face_images(size)` and their mirror images, in successive random
        permutations of the 200 (all distinct while n <= 200).
      "pca-gaussian": samples of `pca_gaussian(size)`, the exact Gaussian fitted to faces.
    generator: CPU torch.Generator for reproducible draws.
    """
    choice(name, "name", DATASETS)
    size, n = positive_int(size, "size"), nonnegative_int(n, "n")
    if name == "blackhole":
        return blackhole_images(n, size, generator=generator)
    if name == "natural":
        return natural_patches(n, size, generator=generator)
    if name == "faces":
        faces = face_images(size, flip=True)
        order = torch.cat([torch.randperm(len(faces), generator=generator) for _ in range(-(-n // len(faces)))])
        return faces[order[:n]]
    mean, cov = gaussian_field(size, size) if name == "gaussian-field" else pca_gaussian(size)
    return sample_gaussian(mean, cov, n, generator=generator).float()
