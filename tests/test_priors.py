"""Tests for scoreprior/priors.py: the Gaussian prior against torch.distributions, and the exact
posterior against an independent Kalman-form computation and a Newton step on the joint log-density."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from conftest import make_operator, random_spd
from scoreprior.likelihood import FourierDiagonalCovariance, GaussianLikelihood
from scoreprior.operators import Identity
from scoreprior.priors import GaussianPrior, gaussian_posterior, reference_posterior

SHAPE = (1, 4, 4)
D = 16


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _prior(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> GaussianPrior:
    d = math.prod(shape)
    mean = torch.rand(shape, generator=_gen(seed), dtype=torch.float64)
    return GaussianPrior(mean, random_spd(d, seed))


def _spectrum(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A random positive Hermitian-symmetric per-frequency variance (C, H, W), float64."""
    s = torch.rand(shape, generator=_gen(seed), dtype=torch.float64) + 0.2
    return 0.5 * (s + torch.roll(torch.flip(s, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1)))


def _dense_fourier_cov(spectrum: torch.Tensor) -> torch.Tensor:
    """Dense Σ = F^H diag(spectrum) F for one channel, F the unitary 2-D DFT over (H, W)."""
    (s,) = spectrum
    image_basis = torch.eye(s.numel(), dtype=torch.float64).reshape(-1, *s.shape)
    return torch.fft.ifft2(torch.fft.fft2(image_basis, norm="ortho") * s, norm="ortho").real.reshape(s.numel(), -1)


# name -> (operator kind, noise kind); images are SHAPE.
CASES = {
    "blur_scalar": ("blur", "scalar"),
    "inpainting_vector": ("inpainting", "vector"),
    "identity_fourier": ("identity", "fourier"),
    "fourier_subsample_scalar": ("fourier_subsample", "scalar"),
    "fourier_mask_vector": ("fourier_mask", "vector"),
    "interferometer_vector": ("interferometer", "vector"),
}


def _likelihood(name: str, prior: GaussianPrior) -> GaussianLikelihood:
    operator_kind, kind = CASES[name]
    op = make_operator(operator_kind, SHAPE, _gen(1), sigma=0.9)
    x_true = prior.sample(1, generator=_gen(4))
    clean = op.A(x_true)
    if kind == "scalar":
        sigma = 0.4
    elif kind == "vector":
        sigma = 0.2 + torch.rand(clean.shape, generator=_gen(5), dtype=torch.float64)
    else:
        sigma = FourierDiagonalCovariance(_spectrum(clean.shape[1:], 6))
    return GaussianLikelihood(op, GaussianLikelihood(op, clean, sigma).sample(x_true, generator=_gen(7)), sigma)


# --- prior -----------------------------------------------------------------------------------------------


def test_prior_log_prob_matches_mvn():
    prior = _prior((2, 3, 2), seed=8)
    x = torch.randn(5, 2, 3, 2, generator=_gen(9), dtype=torch.float64)
    mvn = MultivariateNormal(prior.mean.reshape(-1), covariance_matrix=prior.cov)
    torch.testing.assert_close(prior.log_prob(x), mvn.log_prob(x.reshape(5, -1)))
    lp32 = prior.log_prob(x.float())
    assert lp32.dtype == torch.float32
    torch.testing.assert_close(lp32.double(), mvn.log_prob(x.reshape(5, -1)), rtol=1e-5, atol=1e-4)


def test_prior_log_prob_gradcheck():
    prior = _prior(seed=10)
    x = torch.randn(2, *SHAPE, generator=_gen(11), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(prior.log_prob, (x,))


def test_prior_sample_moments_and_reproducibility():
    prior = _prior((1, 2, 3), seed=12)
    n = 40000
    draws = prior.sample(n, generator=_gen(13))
    assert draws.shape == (n, 1, 2, 3) and draws.dtype == torch.float64
    flat = draws.reshape(n, -1)
    scale = prior.cov.diagonal().max().sqrt().item()
    torch.testing.assert_close(flat.mean(0), prior.mean.reshape(-1), rtol=0, atol=5 * scale / math.sqrt(n))
    torch.testing.assert_close(flat.T.cov(), prior.cov, rtol=0, atol=6 * scale**2 / math.sqrt(n))
    torch.testing.assert_close(prior.sample(3, generator=_gen(14)), prior.sample(3, generator=_gen(14)))


@pytest.mark.parametrize(
    ("mean", "cov", "match"),
    [
        (torch.zeros(2, 2), torch.eye(3), r"^cov: expected shape \(4, 4\)"),
        (torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]), r"^cov: expected a symmetric"),
        (torch.zeros(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]), r"^cov: expected a positive-definite"),
        (torch.tensor([0.0, float("nan")]), torch.eye(2), r"^mean: expected finite"),
        (torch.zeros(2), torch.eye(2) * float("inf"), r"^cov: expected finite"),
    ],
)
def test_prior_rejects_bad_inputs(mean, cov, match):
    with pytest.raises(ValueError, match=match):
        GaussianPrior(mean, cov)


def test_prior_rejects_wrong_x_shape():
    with pytest.raises(ValueError, match=r"^x: expected shape \(B, 1, 4, 4\)"):
        _prior().log_prob(torch.zeros(2, 1, 4, 5, dtype=torch.float64))


# --- posterior -------------------------------------------------------------------------------------------


def _stacked_model(lik: GaussianLikelihood) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The likelihood as a real Gaussian: dense H (N, D) from autograd, data (N,), noise covariance (N, N).

    Complex measurements become [Re; Im] with variance σ^2 / 2 per part.
    """
    def stacked(x: torch.Tensor) -> torch.Tensor:
        ax = lik.operator.A(x).reshape(-1)
        return torch.cat([ax.real, ax.imag]) if ax.is_complex() else ax

    h = torch.autograd.functional.jacobian(stacked, torch.zeros(1, *SHAPE, dtype=torch.float64)).reshape(-1, D)
    y = lik.y.reshape(-1)
    if isinstance(lik.noise, FourierDiagonalCovariance):
        return h, y, _dense_fourier_cov(lik.noise.spectrum)
    var = lik.noise.std.reshape(-1) ** 2
    if y.is_complex():
        return h, torch.cat([y.real, y.imag]), torch.diag(torch.cat([var, var]) / 2)
    return h, y, torch.diag(var)


@pytest.mark.parametrize("name", list(CASES))
def test_posterior_matches_kalman_update(name):
    prior = _prior(seed=15)
    lik = _likelihood(name, prior)
    mean, cov = gaussian_posterior(prior, lik)
    assert mean.shape == SHAPE and cov.shape == (D, D)
    h, y, noise_cov = _stacked_model(lik)
    m0, c0 = prior.mean.reshape(-1), prior.cov
    gain = c0 @ h.T @ torch.linalg.inv(h @ c0 @ h.T + noise_cov)
    torch.testing.assert_close(mean.reshape(-1), m0 + gain @ (y - h @ m0))
    torch.testing.assert_close(cov, c0 - gain @ h @ c0)


@pytest.mark.parametrize("name", list(CASES))
def test_posterior_is_consistent_with_joint_density(name):
    """log p(x) + log p(y | x) - log N(x; mean, cov) = log p(y) for every x, and a Newton step is exact."""
    prior = _prior(seed=16)
    lik = _likelihood(name, prior)
    mean, cov = gaussian_posterior(prior, lik)

    def joint(x: torch.Tensor) -> torch.Tensor:
        return prior.log_prob(x) + lik.log_prob(x)

    xs = torch.randn(6, *SHAPE, generator=_gen(17), dtype=torch.float64)
    post = MultivariateNormal(mean.reshape(-1), covariance_matrix=cov).log_prob(xs.reshape(6, -1))
    evidence = joint(xs) - post
    torch.testing.assert_close(evidence, evidence[:1].expand(6), rtol=0, atol=1e-8)

    x0 = xs[:1]
    hessian = torch.autograd.functional.hessian(lambda x: joint(x).sum(), x0).reshape(D, D)
    torch.testing.assert_close(torch.linalg.inv(-hessian), cov)
    x0 = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(joint(x0).sum(), x0)
    newton = x0.detach().reshape(-1) + cov @ grad.reshape(-1)
    torch.testing.assert_close(newton, mean.reshape(-1))


def test_posterior_validates_image_shape():
    lik = GaussianLikelihood(Identity(), torch.zeros(1, 1, 4, 5, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match=r"^y: expected .*\(1, 1, 4, 4\).*got .*\(1, 1, 4, 5\)"):
        gaussian_posterior(_prior(), lik)


def test_fit_gives_the_sample_moments_plus_the_floor():
    """GaussianPrior.fit: mean and covariance of the images (unbiased), floor added to the diagonal."""
    images = torch.randn(50, 1, 2, 3, generator=torch.Generator().manual_seed(0)) * 2 + 1
    prior = GaussianPrior.fit(images, floor=0.25)
    flat = images.reshape(50, 6).double()
    centred = flat - flat.mean(0)
    assert prior.mean.dtype == torch.float64 and prior.event_shape == (1, 2, 3)
    assert torch.allclose(prior.mean.reshape(-1), flat.mean(0))
    assert torch.allclose(prior.cov, centred.T @ centred / 49 + 0.25 * torch.eye(6, dtype=torch.float64))
    # images spanning one direction: the floor makes the covariance positive definite
    line = torch.linspace(0, 1, 10)[:, None, None, None] * torch.ones(1, 1, 2, 2)
    assert torch.linalg.eigvalsh(GaussianPrior.fit(line, floor=1e-3).cov).min() > 0.9e-3
    with pytest.raises(ValueError, match="floor"):
        GaussianPrior.fit(images, floor=0.0)
    with pytest.raises(ValueError, match="images"):
        GaussianPrior.fit(images[:1], floor=0.1)


def test_reference_posterior_is_the_posterior_of_the_fitted_gaussian():
    images = torch.randn(40, 1, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lik = GaussianLikelihood(Identity(), torch.zeros(1, 1, 3, 3, dtype=torch.float64), 0.5)
    reference = reference_posterior(images, lik, floor=0.1)
    mean, cov = gaussian_posterior(GaussianPrior.fit(images, floor=0.1), lik)
    assert torch.equal(reference.mean, mean) and torch.equal(reference.cov, cov)
