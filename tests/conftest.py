"""Shared test helpers: the SDEs and random SPD matrices for closed-form checks."""

import math

import pytest
import torch

import scoreprior


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
