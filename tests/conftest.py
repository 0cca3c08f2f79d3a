"""Shared test helpers: the SDEs, random SPD matrices for closed-form checks, and the imaging operators."""

import os

# Before anything imports torch: OpenMP threads that spin while waiting made the suite 10x slower beside
# another busy process (libgomp reads the policy once, when torch loads it). `import scoreprior` sets the
# same default, but pytest may import torch first through another test module or plugin.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import scoreprior  # noqa: E402
from scoreprior import operators


SDES = {
    "vp": scoreprior.VPSDE(),
    "subvp": scoreprior.SubVPSDE(),
    "ve": scoreprior.VESDE(sigma_min=0.01, sigma_max=50.0),
}


@pytest.fixture(params=list(SDES))
def sde(request):
    return SDES[request.param]


def random_spd(d: int, seed: int) -> torch.Tensor:
    """A random symmetric positive-definite (d, d) float64 matrix with spread eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    return 0.5 * a @ a.T + 0.01 * torch.eye(d, dtype=torch.float64)


OPERATOR_KINDS = ("identity", "blur", "fourier_subsample", "inpainting", "fourier_mask", "interferometer")
"""Every kind of operator in scoreprior.operators, by the name `make_operator` takes."""


def operator_image_shape(kind: str, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The (C, H, W) images `kind` acts on near image_shape: itself, or (1, H, H) for the interferometer."""
    return (1, image_shape[1], image_shape[1]) if kind == "interferometer" else tuple(image_shape)


def make_operator(
    kind: str,
    image_shape: tuple[int, int, int],
    generator: torch.Generator,
    *,
    sigma: float = 1.0,
    kernel_size: int | None = None,
    k: int | None = None,
    per_channel: bool = False,
    n_baselines: int | None = None,
) -> operators.LinearOperator:
    """An operator of `kind` (one of OPERATOR_KINDS) for images of image_shape (C, H, W).

    Random parts come from generator: masks keep about 60 % of the pixels or frequencies; the
    interferometer (C = 1, H = W) has n_baselines (default H + 1) uniform (u, v) points up to 0.75 of
    the pixel grid's Nyquist frequency, over a 120 µas field.
    sigma, kernel_size: blur width and support in pixels. k: Fourier subsample size, default
    min(H, W) // 2 + 1. per_channel: an inpainting mask (C, H, W) of 0/1 floats instead of (H, W) bools.
    """
    c, h, w = image_shape
    if kind == "identity":
        return operators.Identity()
    if kind == "blur":
        return operators.GaussianBlur(sigma, kernel_size=kernel_size)
    if kind == "fourier_subsample":
        return operators.FourierSubsample(k or min(h, w) // 2 + 1, image_size=(h, w))
    if kind == "inpainting":
        mask = torch.rand((c, h, w) if per_channel else (h, w), generator=generator) > 0.4
        return operators.Inpainting(mask.float() if per_channel else mask)
    if kind == "fourier_mask":
        return operators.FourierMask(torch.rand((h, w), generator=generator) > 0.4)
    if kind == "interferometer":
        if c != 1 or h != w:
            raise ValueError(f"image_shape: expected (1, H, H) for the interferometer, got {tuple(image_shape)}")
        fov = operators.uas_to_rad(120.0)
        u_max = 0.75 * h / (2 * fov)
        uv = (2 * torch.rand((n_baselines or h + 1, 2), generator=generator, dtype=torch.float64) - 1) * u_max
        return operators.Interferometer(uv, h, fov)
    raise ValueError(f"kind: expected one of {OPERATOR_KINDS}, got {kind!r}")


def closure_problem(sde: scoreprior.SDE):
    """A Gaussian prior on 1 x 6 x 6 images around a blob (its exact score under `sde`) and the closures of one of
    its draws seen by three EHT 2017 scans: (GaussianScore, ClosureLikelihood)."""
    from scoreprior import eht
    from scoreprior.likelihood import ClosureLikelihood

    cover = eht.uv_coverage(eht.load_array("EHT2017"), 12.5137, 12.3911, 57854)
    keep = np.isin(cover.time, np.unique(cover.time)[[20, 30, 60]])
    operator = operators.Interferometer(cover.uv[keep], 6, operators.uas_to_rad(120.0))
    grid = torch.arange(6, dtype=torch.float64) - 2.5
    mean = torch.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / 4).reshape(1, 6, 6)
    cov = 0.01 * torch.eye(36, dtype=torch.float64)
    truth = scoreprior.GaussianPrior(mean, cov).sample(1, generator=torch.Generator().manual_seed(5))
    vis = operator.A(truth)[0].numpy()
    sigma = 0.05 * np.abs(vis).mean() * np.ones(len(vis))
    columns = cover.time[keep], cover.t1[keep], cover.t2[keep], vis, sigma
    lik = ClosureLikelihood(operator, eht.closure_phases(*columns), eht.log_closure_amplitudes(*columns))
    return scoreprior.GaussianScore(mean, cov, sde), lik
