import math

import numpy as np
import pytest
import torch

from scoreprior.data import DATASETS, builtin_dataset, gaussian_field, load_images, sample_gaussian


def test_gaussian_field_covariance_is_the_squared_exponential_kernel():
    mean, cov = gaussian_field(3, 4, length_scale=(1.0, 2.0), scale=0.3, offset=0.4, nugget=0.05)
    assert mean.shape == (1, 3, 4) and cov.shape == (12, 12) and cov.dtype == torch.float64
    assert torch.all(mean == 0.4)
    torch.testing.assert_close(cov, cov.mT)
    assert torch.linalg.eigvalsh(cov).min() >= 0.05 - 1e-12  # the nugget bounds the spectrum below
    torch.testing.assert_close(cov.diagonal(), torch.full((12,), 0.09 + 0.05, dtype=torch.float64))
    # Pixel (0, 0) is index 0; (0, 1) is index 1 (one column over), (1, 0) is index 4 (one row down).
    assert cov[0, 1].item() == pytest.approx(0.09 * math.exp(-1 / 8))
    assert cov[0, 4].item() == pytest.approx(0.09 * math.exp(-1 / 2))
    assert cov[0, 5].item() == pytest.approx(0.09 * math.exp(-1 / 2 - 1 / 8))


def test_gaussian_field_validates():
    with pytest.raises(ValueError, match="length_scale"):
        gaussian_field(4, 4, length_scale=0.0)
    with pytest.raises(ValueError, match="nugget"):
        gaussian_field(4, 4, nugget=0.0)


def test_sample_gaussian_matches_mean_and_covariance():
    mean, cov = gaussian_field(2, 3, length_scale=1.5)
    n = 20000
    x = sample_gaussian(mean, cov, n, generator=torch.Generator().manual_seed(0))
    assert x.shape == (n, 1, 2, 3) and x.dtype == torch.float64
    flat = x.reshape(n, -1)
    var = cov.diagonal()
    # Standard errors of the sample mean and of each sample covariance entry (Gaussian data).
    assert torch.all((flat.mean(0) - mean.reshape(-1)).abs() < 5 * (var / n).sqrt())
    se_cov = ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
    assert torch.all((torch.cov(flat.T) - cov).abs() < 5 * se_cov)


def test_sample_gaussian_is_reproducible_and_validates():
    mean, cov = gaussian_field(2, 2)
    a = sample_gaussian(mean, cov, 3, generator=torch.Generator().manual_seed(1))
    b = sample_gaussian(mean, cov, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"cov: expected shape \(4, 4\).*got \(3, 3\)"):
        sample_gaussian(mean, cov[:3, :3], 2)
    with pytest.raises(ValueError, match="positive definite"):
        sample_gaussian(mean, -cov, 2)


def test_load_images_round_trips_npy_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    stack = rng.random((5, 4, 6)).astype(np.float64)
    np.save(tmp_path / "a.npy", stack)
    images = load_images(tmp_path / "a.npy")
    assert images.shape == (5, 1, 4, 6) and images.dtype == torch.float32
    np.testing.assert_allclose(images[:, 0].numpy(), stack, rtol=1e-6)

    colour = rng.integers(0, 256, size=(3, 2, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "b.npz", other=np.zeros(3), images=colour)
    images = load_images(tmp_path / "b.npz")
    assert images.shape == (3, 2, 4, 4)
    np.testing.assert_allclose(images.numpy(), colour / 255.0, rtol=1e-6)
    assert images.min() >= 0 and images.max() <= 1

    np.savez(tmp_path / "c.npz", stack)  # stored as arr_0
    assert load_images(tmp_path / "c.npz").shape == (5, 1, 4, 6)
    np.savez(tmp_path / "d.npz", x=stack, y=np.zeros(2))
    assert load_images(tmp_path / "d.npz").shape == (5, 1, 4, 6)


def test_load_images_rejects_bad_files_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_images(tmp_path / "missing.npy")
    text = tmp_path / "notes.npy"
    text.write_text("not an array")
    with pytest.raises(ValueError, match="notes.npy"):
        load_images(text)
    np.save(tmp_path / "flat.npy", np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"flat.npy.*\(N, H, W\) or \(N, C, H, W\).*\(4, 5\)"):
        load_images(tmp_path / "flat.npy")
    np.save(tmp_path / "nan.npy", np.full((1, 2, 2), np.nan))
    with pytest.raises(ValueError, match="nan.npy"):
        load_images(tmp_path / "nan.npy")
    np.save(tmp_path / "text.npy", np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="text.npy.*dtype"):
        load_images(tmp_path / "text.npy")


def test_builtin_dataset():
    assert "gaussian-field" in DATASETS
    a = builtin_dataset("gaussian-field", 4, size=8, generator=torch.Generator().manual_seed(0))
    b = builtin_dataset("gaussian-field", 4, size=8, generator=torch.Generator().manual_seed(0))
    assert a.shape == (4, 1, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="gaussian-field"):
        builtin_dataset("mnist", 4)
