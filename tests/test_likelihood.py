"""Tests for scoreprior/likelihood.py: densities against torch.distributions, gradients against
autograd, noise sampling statistics, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from conftest import OPERATOR_KINDS, make_operator, operator_image_shape
from scoreprior import eht
from scoreprior.likelihood import (
    ClosureLikelihood,
    DiagonalCovariance,
    FourierDiagonalCovariance,
    GaussianLikelihood,
)
from scoreprior.operators import (
    FourierSubsample,
    GaussianBlur,
    Identity,
    Interferometer,
    uas_to_rad,
)

SHAPE = (2, 6, 5)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# name -> image shape (C, H, W): every operator kind, on SHAPE where it can act on it.
OPERATORS = {kind: operator_image_shape(kind, SHAPE) for kind in OPERATOR_KINDS}


def _spectrum(shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """A random positive Hermitian-symmetric per-frequency variance (C, H, W), float64."""
    s = torch.rand(shape, generator=_gen(seed), dtype=torch.float64) + 0.2
    mirrored = torch.roll(torch.flip(s, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))
    return 0.5 * (s + mirrored)


def _dft_matrix(n: int) -> torch.Tensor:
    """The unitary DFT matrix (n, n), complex128."""
    return torch.fft.fft(torch.eye(n, dtype=torch.complex128), norm="ortho")


def _dense_fourier_cov(spectrum: torch.Tensor) -> torch.Tensor:
    """Dense block-diagonal (C H W, C H W) Σ = F^H diag(spectrum) F with F the unitary 2-D DFT matrix."""
    c, h, w = spectrum.shape
    f = torch.kron(_dft_matrix(h), _dft_matrix(w))
    blocks = [(f.conj().T @ torch.diag(s.reshape(-1).to(f.dtype)) @ f) for s in spectrum]
    assert max(b.imag.abs().max().item() for b in blocks) < 1e-12
    return torch.block_diag(*[b.real for b in blocks])


def _likelihood(name: str, sigma_kind: str, seed: int = 0) -> tuple[GaussianLikelihood, tuple[int, ...]]:
    """A likelihood for operator `name` with data from a random image and the given kind of noise."""
    shape = OPERATORS[name]
    op = make_operator(name, shape, _gen(seed + 4), sigma=1.1)
    x_true = torch.rand((1, *shape), generator=_gen(seed), dtype=torch.float64)
    clean = op.A(x_true)
    if sigma_kind == "scalar":
        sigma = 0.3
    elif sigma_kind == "vector":
        sigma = 0.1 + torch.rand(clean.shape, generator=_gen(seed + 1), dtype=torch.float64)
    else:
        sigma = FourierDiagonalCovariance(_spectrum(tuple(clean.shape[1:]), seed + 2))
    y = GaussianLikelihood(op, clean, sigma).sample(x_true, generator=_gen(seed + 3))
    lik = GaussianLikelihood(op, y, sigma)
    lik.validate(shape)
    return lik, shape


def _images(shape: tuple[int, ...], batch: int, seed: int) -> torch.Tensor:
    return torch.randn((batch, *shape), generator=_gen(seed), dtype=torch.float64)


# --- densities -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_kind", ["scalar", "vector", "vector_unbatched"])
def test_log_prob_real_matches_normal(sigma_kind):
    op = GaussianBlur(1.0)
    x = _images(SHAPE, 3, 0)
    y = _images(SHAPE, 1, 1)
    std = 0.1 + torch.rand(y.shape, generator=_gen(2), dtype=torch.float64)
    sigma = {"scalar": 0.25, "vector": std, "vector_unbatched": std[0]}[sigma_kind]
    lik = GaussianLikelihood(op, y, sigma)
    expected = Normal(op.A(x), torch.as_tensor(sigma, dtype=torch.float64)).log_prob(y).flatten(1).sum(1)
    torch.testing.assert_close(lik.log_prob(x), expected)


def test_log_prob_fourier_covariance_matches_dense_mvn():
    op = GaussianBlur(0.8)
    spectrum = _spectrum(SHAPE, 3)
    x, y = _images(SHAPE, 3, 4), _images(SHAPE, 1, 5)
    lik = GaussianLikelihood(op, y, FourierDiagonalCovariance(spectrum))
    mvn = MultivariateNormal(op.A(x).reshape(3, -1), covariance_matrix=_dense_fourier_cov(spectrum))
    torch.testing.assert_close(lik.log_prob(x), mvn.log_prob(y.reshape(1, -1)))


@pytest.mark.parametrize("name", ["fourier_subsample", "fourier_mask", "interferometer"])
@pytest.mark.parametrize("sigma_kind", ["scalar", "vector"])
def test_log_prob_complex_matches_stacked_real_gaussian(name, sigma_kind):
    lik, shape = _likelihood(name, sigma_kind)
    x = _images(shape, 4, 6)
    sigma = lik.noise.std
    ax, y = lik.operator.A(x), lik.y
    # circular complex noise of std σ: independent real and imaginary parts of std σ/√2
    part_std = sigma / math.sqrt(2)
    expected = Normal(ax.real, part_std).log_prob(y.real) + Normal(ax.imag, part_std).log_prob(y.imag)
    expected = expected.flatten(1).sum(1)
    torch.testing.assert_close(lik.log_prob(x), expected)


def test_log_prob_follows_input_dtype():
    lik, shape = _likelihood("fourier_subsample", "scalar")
    x = _images(shape, 2, 7)
    lp32 = lik.log_prob(x.float())
    assert lp32.dtype == torch.float32
    torch.testing.assert_close(lp32.double(), lik.log_prob(x), rtol=1e-4, atol=1e-3)


# --- gradients -------------------------------------------------------------------------------------------


# Fourier-diagonal noise needs image-shaped measurements, which visibilities are not.
GRAD_CASES = [(name, kind) for name in OPERATORS for kind in ("scalar", "vector", "fourier")
              if (name, kind) != ("interferometer", "fourier")]


@pytest.mark.parametrize(("name", "sigma_kind"), GRAD_CASES)
def test_grad_log_prob_matches_autograd(name, sigma_kind):
    lik, shape = _likelihood(name, sigma_kind)
    x = _images(shape, 3, 8).requires_grad_(True)
    (auto,) = torch.autograd.grad(lik.log_prob(x).sum(), x)
    closed = lik.grad_log_prob(x.detach())
    assert closed.shape == x.shape and closed.dtype == x.dtype
    torch.testing.assert_close(closed, auto)


def test_log_prob_gradcheck():
    lik, shape = _likelihood("interferometer", "vector")
    x = _images(shape, 1, 9).requires_grad_(True)
    assert torch.autograd.gradcheck(lik.log_prob, (x,))


# --- sampling --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["blur", "fourier_subsample", "interferometer"])
def test_sample_noise_statistics(name):
    lik, shape = _likelihood(name, "vector")
    n = 20000
    x = _images(shape, 1, 10).expand(n, *shape)
    noise = lik.sample(x, generator=_gen(11)) - lik.operator.A(x)
    std = lik.noise.std
    tol = 5 / math.sqrt(n)
    if noise.is_complex():
        parts = torch.stack([noise.real, noise.imag])
        zeros, ones = torch.zeros_like(parts[:, 0]), torch.ones_like(parts[:, 0])
        torch.testing.assert_close(parts.mean(1) / (std / math.sqrt(2)), zeros, rtol=0, atol=tol)
        torch.testing.assert_close(parts.var(1) / (std**2 / 2), ones, rtol=0, atol=tol * 2)
        correlation = (noise.real * noise.imag).mean(0) / std**2
        torch.testing.assert_close(correlation, torch.zeros_like(std), rtol=0, atol=tol)
    else:
        torch.testing.assert_close(noise.mean(0) / std, torch.zeros_like(std), rtol=0, atol=tol)
        torch.testing.assert_close(noise.var(0) / std**2, torch.ones_like(std), rtol=0, atol=tol * 2)
    energy = noise.abs().square().flatten(1).sum(1).mean()
    assert lik.noise_energy() == pytest.approx((std**2).sum().item())
    assert energy.item() == pytest.approx(lik.noise_energy(), rel=0.02)


def test_sample_fourier_covariance_matches_dense():
    shape = (1, 4, 3)
    spectrum = _spectrum(shape, 12)
    n = 40000
    y = torch.zeros(1, *shape, dtype=torch.float64)
    lik = GaussianLikelihood(Identity(), y, FourierDiagonalCovariance(spectrum))
    noise = lik.sample(torch.zeros(n, *shape, dtype=torch.float64), generator=_gen(13)).reshape(n, -1)
    assert not noise.is_complex()
    empirical = noise.T @ noise / n
    dense = _dense_fourier_cov(spectrum)
    torch.testing.assert_close(empirical, dense, rtol=0, atol=6 * dense.diagonal().max().item() / math.sqrt(n))
    assert lik.noise_energy() == pytest.approx(dense.trace().item())


def test_sample_is_reproducible_and_follows_dtype():
    lik, shape = _likelihood("fourier_mask", "scalar")
    x = _images(shape, 2, 14).float()
    a, b = (lik.sample(x, generator=_gen(15)) for _ in range(2))
    assert a.dtype == torch.complex64
    torch.testing.assert_close(a, b)


def test_whiten_color_solve_are_consistent():
    cov = FourierDiagonalCovariance(_spectrum((2, 5, 4), 16))
    r = _images((2, 5, 4), 3, 17)
    torch.testing.assert_close(cov.whiten(cov.color(r)), r)
    torch.testing.assert_close(cov.solve(r), cov.whiten(cov.whiten(r)))
    dense = _dense_fourier_cov(cov.spectrum)
    torch.testing.assert_close(cov.solve(r).reshape(3, -1), torch.linalg.solve(dense, r.reshape(3, -1).T).T)
    torch.testing.assert_close(cov.log_det(), torch.logdet(dense))


# --- validation ------------------------------------------------------------------------------------------


def test_validate_rejects_wrong_y_shape():
    op = FourierSubsample(3, image_size=SHAPE[1:])
    y = torch.zeros(1, SHAPE[0], 4, 4, dtype=torch.complex128)
    lik = GaussianLikelihood(op, y, 0.1)
    with pytest.raises(ValueError, match=r"^y: .*\(1, 2, 3, 3\).*\(1, 2, 4, 4\)"):
        lik.validate(SHAPE)


def test_validate_rejects_wrong_kind_and_missing_image_size():
    class Mislabelled(Identity):
        is_complex = True

    lik = GaussianLikelihood(Mislabelled(), torch.zeros(1, *SHAPE, dtype=torch.complex128), 0.1)
    with pytest.raises(ValueError, match=r"^y: expected a real tensor"):
        lik.validate(SHAPE)
    lik = GaussianLikelihood(FourierSubsample(3), torch.zeros(1, 2, 3, 3, dtype=torch.complex128), 0.1)
    with pytest.raises(ValueError, match=r"^image_size"):
        lik.validate(SHAPE)


ZEROS = torch.zeros(1, *SHAPE)


@pytest.mark.parametrize(
    ("y", "sigma", "match"),
    [
        (ZEROS, -0.1, r"^sigma: expected a finite positive"),
        (ZEROS, 0.0, r"^sigma: expected a finite positive"),
        (ZEROS, torch.full((1, *SHAPE), 0.1).index_fill(1, torch.tensor([0]), 0.0), r"^sigma: expected finite positive"),
        (ZEROS, torch.full((1, 2, 6, 4), 0.1), r"^sigma: expected .*\(1, 2, 6, 5\).*got \(1, 2, 6, 4\)"),
        (ZEROS, FourierDiagonalCovariance(torch.ones(1, 6, 5)), r"^sigma: expected .*\(2, 6, 5\).*got \(1, 6, 5\)"),
        (torch.zeros(1, *SHAPE).index_fill(2, torch.tensor([1]), float("nan")), 0.1, r"^y: expected finite"),
        (torch.zeros(1, *SHAPE).index_fill(2, torch.tensor([1]), float("inf")), 0.1, r"^y: expected finite"),
        (torch.zeros(*SHAPE), 0.1, r"^y: expected shape \(1, \*measurement_shape\)"),
        (torch.zeros(1, *SHAPE, dtype=torch.complex64), 0.1, r"^y: expected a real"),
    ],
)
def test_constructor_rejects_bad_inputs(y, sigma, match):
    with pytest.raises(ValueError, match=match):
        GaussianLikelihood(Identity(), y, sigma)


def test_constructor_rejects_bad_types():
    with pytest.raises(TypeError, match=r"^sigma"):
        GaussianLikelihood(Identity(), torch.zeros(1, *SHAPE), "0.1")
    with pytest.raises(TypeError, match=r"^sigma"):
        GaussianLikelihood(Identity(), torch.zeros(1, *SHAPE), torch.ones(1, *SHAPE, dtype=torch.complex64))


def test_fourier_covariance_rejects_bad_spectrum():
    with pytest.raises(ValueError, match=r"^spectrum: expected Hermitian"):
        FourierDiagonalCovariance(torch.arange(1.0, 13.0).reshape(1, 3, 4))
    with pytest.raises(ValueError, match=r"^spectrum: expected shape \(C, H, W\)"):
        FourierDiagonalCovariance(torch.ones(4, 4))
    with pytest.raises(ValueError, match=r"^spectrum: expected finite positive"):
        FourierDiagonalCovariance(-torch.ones(1, 4, 4))


def test_diagonal_covariance_is_accepted_directly():
    y = _images(SHAPE, 1, 18)
    std = 0.1 + torch.rand(SHAPE, generator=_gen(19), dtype=torch.float64)
    x = _images(SHAPE, 2, 20)
    a = GaussianLikelihood(Identity(), y, DiagonalCovariance(std)).log_prob(x)
    torch.testing.assert_close(a, GaussianLikelihood(Identity(), y, std).log_prob(x))


# --- closure quantities ----------------------------------------------------------------------------------


def _closure_problem(covariance: str = "full", **options) -> tuple[ClosureLikelihood, eht.UVCoverage, torch.Tensor]:
    """Three scans of the EHT 2017 M87 coverage (4-7 stations), a 6 x 6 float64 image, noisy closures."""
    cover = eht.uv_coverage(eht.load_array("EHT2017"), 12.5137, 12.3911, 57854)
    keep = np.isin(cover.time, np.unique(cover.time)[[20, 30, 60]])
    cover = eht.UVCoverage(*(getattr(cover, f)[keep] for f in ("time", "t1", "t2", "u", "v", "w", "sigma")))
    operator = Interferometer(cover.uv, 6, uas_to_rad(120.0))
    truth = _images((1, 6, 6), 1, 30).abs()
    clean = operator.A(truth)[0].numpy()
    sigma = 0.02 * np.abs(clean).mean() * np.ones(len(cover))
    rng = np.random.default_rng(0)
    vis = clean + sigma * (rng.standard_normal(len(cover)) + 1j * rng.standard_normal(len(cover)))
    phases = eht.closure_phases(cover.time, cover.t1, cover.t2, vis, sigma)
    amplitudes = eht.log_closure_amplitudes(cover.time, cover.t1, cover.t2, vis, sigma)
    return ClosureLikelihood(operator, phases, amplitudes, covariance=covariance, **options), cover, truth


def test_closure_log_prob_matches_dense_gaussian():
    """Full covariance: N(e; 0, C) with C the dense block-diagonal covariance, e = (2 sin(Δψ/2), Δ log CA)."""
    lik, cover, truth = _closure_problem("full", weights=(0.7, 1.3))
    x = torch.cat([truth, _images((1, 6, 6), 1, 31).abs()])
    expected = torch.zeros(2, dtype=torch.float64)
    for (closures, weight, _), wrap in zip(lik.terms, (True, False)):
        cov = np.zeros((len(closures), len(closures)))
        for index, block in closures.covariance():
            cov[np.ix_(index, index)] = block
        for b in range(2):
            model = eht.closure_phases if wrap else eht.log_closure_amplitudes
            table = model(cover.time, cover.t1, cover.t2, lik.operator.A(x[b : b + 1])[0].detach().numpy(),
                          cover.sigma)
            assert np.array_equal(table.rows, closures.rows)
            diff = closures.value - table.value
            e = 2 * np.sin(np.angle(np.exp(1j * diff)) / 2) if wrap else diff
            dist = MultivariateNormal(torch.zeros(len(e), dtype=torch.float64), torch.as_tensor(cov))
            expected[b] += weight * dist.log_prob(torch.as_tensor(e))
    torch.testing.assert_close(lik.log_prob(x), expected)


def test_closure_log_prob_diagonal_is_ehtim_misfit_and_chi2():
    lik, cover, truth = _closure_problem("diagonal")
    x = _images((1, 6, 6), 1, 32).abs()
    vis = lik.operator.A(x)[0].detach().numpy()
    phases = eht.closure_phases(cover.time, cover.t1, cover.t2, vis, cover.sigma)
    amplitudes = eht.log_closure_amplitudes(cover.time, cover.t1, cover.t2, vis, cover.sigma)
    cp, lca = (c for c, _, _ in lik.terms)
    chi_cp = 2 * (1 - np.cos(cp.value - phases.value)) / cp.sigma**2
    chi_lca = ((lca.value - amplitudes.value) / lca.sigma) ** 2
    expected = (-0.5 * chi_cp - np.log(cp.sigma) - 0.5 * math.log(2 * math.pi)).sum() + (
        -0.5 * chi_lca - np.log(lca.sigma) - 0.5 * math.log(2 * math.pi)).sum()
    torch.testing.assert_close(lik.log_prob(x), torch.tensor([expected], dtype=torch.float64))
    chi2 = lik.reduced_chi2(x)
    torch.testing.assert_close(chi2["closure_phase"], torch.tensor([chi_cp.mean()], dtype=torch.float64))
    torch.testing.assert_close(chi2["log_closure_amplitude"], torch.tensor([chi_lca.mean()], dtype=torch.float64))
    assert 0.5 < float(lik.reduced_chi2(truth)["closure_phase"]) < 2  # the truth fits at the noise level


def test_closure_likelihood_is_immune_to_gains_scale_and_shift():
    lik, cover, truth = _closure_problem(flux=None)
    rng = np.random.default_rng(7)
    gains = {(t, s): rng.uniform(0.8, 1.2) * np.exp(1j * rng.uniform(-np.pi, np.pi))
             for t in np.unique(cover.time) for s in cover.stations}
    g1 = np.array([gains[t, s] for t, s in zip(cover.time, cover.t1)])
    g2 = np.array([gains[t, s] for t, s in zip(cover.time, cover.t2)])
    cp, lca = (c for c, _, _ in lik.terms)
    vis = lik.operator.A(truth)[0].numpy() * (1 + 0.1j)
    columns = cover.time, cover.t1, cover.t2
    corrupted = ClosureLikelihood(lik.operator, eht.closure_phases(*columns, g1 * np.conj(g2) * vis, cover.sigma *
                                  np.abs(g1 * g2)), eht.log_closure_amplitudes(*columns, g1 * np.conj(g2) * vis,
                                  cover.sigma * np.abs(g1 * g2)))
    plain = ClosureLikelihood(lik.operator, eht.closure_phases(*columns, vis, cover.sigma),
                              eht.log_closure_amplitudes(*columns, vis, cover.sigma))
    x = _images((1, 6, 6), 2, 33).abs()
    torch.testing.assert_close(corrupted.log_prob(x), plain.log_prob(x))
    # Closures fix neither the flux scale nor (for a one-pixel shift, an exact symmetry here) the position.
    padded = truth.clone()
    padded[..., -1] = 0
    shifted = torch.roll(padded, 1, dims=-1)
    torch.testing.assert_close(plain.log_prob(3 * padded), plain.log_prob(padded))
    torch.testing.assert_close(plain.log_prob(shifted), plain.log_prob(padded))


def test_closure_gradcheck_and_residual():
    lik, _, truth = _closure_problem(flux=(3.0, 0.5), weights=(0.5, 2.0))
    x = (truth + 0.1 * _images((1, 6, 6), 1, 34)).requires_grad_(True)
    assert torch.autograd.gradcheck(lik.log_prob, (x,))
    many = _images((1, 6, 6), 3, 35).abs()
    offset = -0.5 * lik.residual(many).square().sum(1) - lik.log_prob(many)
    torch.testing.assert_close(offset, offset[:1].expand(3))  # ||r||^2 = -2 log p + a constant
    assert lik.forward(many).shape == (3, lik.num_measurements - 1)


def test_closure_likelihood_errors():
    lik, cover, _ = _closure_problem()
    cp, lca = (c for c, _, _ in lik.terms)
    with pytest.raises(ValueError, match="at least one set"):
        ClosureLikelihood(lik.operator)
    with pytest.raises(TypeError, match="phases: expected a scoreprior.eht.ClosurePhases"):
        ClosureLikelihood(lik.operator, lca)
    with pytest.raises(ValueError, match="covariance: expected 'full' or 'diagonal'"):
        ClosureLikelihood(lik.operator, cp, covariance="dense")
    with pytest.raises(ValueError, match="weights"):
        ClosureLikelihood(lik.operator, cp, weights=(1.0, -1.0))
    with pytest.raises(ValueError, match="flux"):
        ClosureLikelihood(lik.operator, cp, flux=(1.0, 0.0))
    short = ClosureLikelihood(Interferometer(cover.uv[:5], 6, uas_to_rad(120.0)), cp)
    with pytest.raises(ValueError, match="operator: expected A\\(x\\) of shape"):
        short.validate((1, 6, 6))
    lik.validate((1, 6, 6))
