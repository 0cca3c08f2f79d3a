import math

import numpy as np
import pytest
import torch

from scoreprior.data import (
    BLACKHOLE_FOV_UAS,
    DATASETS,
    blackhole_images,
    builtin_dataset,
    ring_features,
    face_images,
    gaussian_field,
    load_images,
    natural_patches,
    pca_gaussian,
    ring_radius,
    sample_gaussian,
)


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


def _ring_flux_over_peak(radius_px: float, w_px: float) -> float:
    """Integral of exp(-(r - R)^2 / (2 w^2)) over the plane, in pixel units (peak value 1)."""
    radial = w_px**2 * math.exp(-radius_px**2 / (2 * w_px**2)) \
        + radius_px * w_px * math.sqrt(math.pi / 2) * (1 + math.erf(radius_px / (math.sqrt(2) * w_px)))
    return 2 * math.pi * radial


def _second_moment(x):
    """Sum of I (l^2 + m^2) / sum of I about the image centre, in pixels^2, for (B, 1, H, W)."""
    size = x.shape[-1]
    c = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    x = x[:, 0].double()
    return (x * r2).sum((1, 2)) / x.sum((1, 2))


def test_blackhole_images_shapes_scale_and_parameters():
    x, p = blackhole_images(64, 32, generator=torch.Generator().manual_seed(0), return_params=True)
    assert x.shape == (64, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    torch.testing.assert_close(x.amax((1, 2, 3)).double(), p["peak"], rtol=1e-6, atol=0)
    torch.testing.assert_close(x.sum((1, 2, 3)).double(), p["flux"], rtol=1e-5, atol=0)
    assert p["fov_uas"] == BLACKHOLE_FOV_UAS
    torch.testing.assert_close(p["radius_px"], p["diameter_uas"] / 2 / (BLACKHOLE_FOV_UAS / 32))
    for name, (lo, hi) in {"diameter_uas": (35, 50), "width_uas": (5, 15), "asymmetry": (0, 1),
                           "position_angle_deg": (0, 360), "blur_uas": (0, 20), "peak": (0.5, 1)}.items():
        assert p[name].shape == (64,) and p[name].min() >= lo and p[name].max() <= hi


def test_blackhole_images_are_reproducible_with_a_generator():
    a = blackhole_images(5, 16, generator=torch.Generator().manual_seed(3))
    b = blackhole_images(5, 16, generator=torch.Generator().manual_seed(3))
    c = blackhole_images(5, 16, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_blackhole_flux_over_peak_matches_the_ring_integral():
    # A crescent of contrast A has the ring's flux (cos integrates to 0) and a peak 1 + A times higher.
    # Fine pixels (0.625 µas) so that the brightest pixel sits on the ring; averaging the radial
    # Gaussian over a unit pixel (variance 1/12 in any direction) lowers that pixel to 1 - 1/(24 w^2).
    size, fov, width = 256, 160.0, 10.0
    pixel = fov / size
    w_px = width / (2 * math.sqrt(2 * math.log(2))) / pixel
    common = dict(fov_uas=fov, diameter_uas=40.0, width_uas=width, blur_uas=0.0, peak=1.0,
                  position_angle_deg=30.0, dtype=torch.float64)
    ring = blackhole_images(1, size, asymmetry=0.0, **common)
    crescent = blackhole_images(1, size, asymmetry=0.6, **common)
    expected = _ring_flux_over_peak(20.0 / pixel, w_px) / (1 - 1 / (24 * w_px**2))
    assert ring.sum().item() == pytest.approx(expected, rel=5e-4)
    assert crescent.sum().item() == pytest.approx(expected / 1.6, rel=5e-4)


def test_blackhole_blur_adds_its_variance_to_the_second_moment():
    # Convolution with a Gaussian of standard deviation s adds 2 s^2 to E[l^2 + m^2] (s^2 per axis).
    fwhm = 2 * math.sqrt(2 * math.log(2))
    common = dict(diameter_uas=40.0, width_uas=8.0, asymmetry=0.5, position_angle_deg=120.0,
                  dtype=torch.float64)
    sharp = blackhole_images(1, 32, blur_uas=0.0, **common)
    for blur in (5.0, 15.0):
        blurred = blackhole_images(1, 32, blur_uas=blur, **common)
        s_px = blur / fwhm / (BLACKHOLE_FOV_UAS / 32)
        diff = (_second_moment(blurred) - _second_moment(sharp)).item()
        assert diff == pytest.approx(2 * s_px**2, rel=1e-3)


def test_blackhole_crescent_is_brightest_at_its_position_angle():
    # Position angle east of north; east is the image left (column 0), north the top (row 0).
    common = dict(asymmetry=0.8, blur_uas=0.0, diameter_uas=40.0, width_uas=8.0)
    north = blackhole_images(1, 32, position_angle_deg=0.0, **common)[0, 0]
    east = blackhole_images(1, 32, position_angle_deg=90.0, **common)[0, 0]
    assert north[:16].sum() > 2 * north[16:].sum()
    assert east[:, :16].sum() > 2 * east[:, 16:].sum()
    torch.testing.assert_close(north[:, :16], north[:, 16:].flip(-1))  # symmetric about the north axis


def test_ring_radius_of_an_independently_drawn_ring():
    size, radius_px = 32, 5.3
    c = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    rho = torch.hypot(c[:, None], c[None, :])
    image = torch.exp(-0.5 * ((rho - radius_px) / 0.8) ** 2)[None, None]
    pixel = BLACKHOLE_FOV_UAS / size
    assert ring_radius(image).item() == pytest.approx(radius_px * pixel, abs=0.1 * pixel)
    with pytest.raises(ValueError, match="images"):
        ring_radius(torch.zeros(2, 3, 8, 8))


def test_blackhole_ring_radius_measured_from_images_matches_the_parameter():
    # Unblurred rings peak at the requested radius along every ray; a fifth of a pixel of tolerance.
    x, p = blackhole_images(32, 32, blur_uas=0.0, generator=torch.Generator().manual_seed(5), return_params=True)
    measured = ring_radius(x, fov_uas=p["fov_uas"])
    pixel = p["fov_uas"] / 32
    assert (measured - p["diameter_uas"] / 2).abs().max() < 0.2 * pixel


def test_blackhole_images_validate():
    with pytest.raises(ValueError, match="asymmetry"):
        blackhole_images(2, asymmetry=1.5)
    with pytest.raises(ValueError, match="diameter_uas"):
        blackhole_images(2, diameter_uas=(50.0, 40.0))
    with pytest.raises(ValueError, match="size"):
        blackhole_images(2, 1)
    with pytest.raises(ValueError, match="blur_uas"):
        blackhole_images(2, blur_uas=-1.0)


def test_natural_patches_are_crops_of_the_downscaled_image():
    skimage_data = pytest.importorskip("skimage.data")
    camera = skimage_data.camera().astype(np.float64) / 255.0
    x, loc = natural_patches(20, 16, images=("camera",), generator=torch.Generator().manual_seed(0),
                             return_locations=True)
    assert x.shape == (20, 1, 16, 16) and x.dtype == torch.float32 and loc.shape == (20, 3)
    for patch, (k, r, c) in zip(x[:, 0], loc.tolist()):
        block = camera[2 * r:2 * (r + 16), 2 * c:2 * (c + 16)].reshape(16, 2, 16, 2).mean((1, 3))
        assert k == 0
        np.testing.assert_allclose(patch.numpy(), block, atol=1e-6)


def test_natural_patches_splits_never_share_a_pixel():
    pytest.importorskip("skimage")
    names = ("camera", "coffee", "coins")
    covered = {}
    for split in ("train", "test"):
        x, loc = natural_patches(3000, 32, images=names, split=split, generator=torch.Generator().manual_seed(1),
                                 return_locations=True)
        assert x.min() >= 0 and x.max() <= 1
        masks = [np.zeros((400, 600), bool) for _ in names]
        for k, r, c in loc.tolist():
            masks[k][r:r + 32, c:c + 32] = True
        covered[split] = masks
    for train, test in zip(covered["train"], covered["test"]):
        assert test.any() and train.any()
        assert not (train & test).any()


def test_natural_patches_reproducible_and_validate():
    pytest.importorskip("skimage")
    a = natural_patches(4, 8, generator=torch.Generator().manual_seed(2))
    b = natural_patches(4, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="split"):
        natural_patches(4, 8, split="validation")
    with pytest.raises(ValueError, match="size"):
        natural_patches(4, 65)
    with pytest.raises(ValueError, match="images"):
        natural_patches(4, 8, images=("lena",))


def test_face_images():
    skimage_data = pytest.importorskip("skimage.data")
    faces = face_images(25, flip=True)
    assert faces.shape == (200, 1, 25, 25) and faces.dtype == torch.float32
    # At the native 25 x 25 size the faces are the first 100 images of the LFW subset, unchanged.
    np.testing.assert_allclose(faces[:100, 0].numpy(), skimage_data.lfw_subset()[:100], atol=1e-6)
    assert torch.equal(faces[100:], faces[:100].flip(-1))
    small = face_images(16)
    assert small.shape == (100, 1, 16, 16) and small.min() >= 0 and small.max() <= 1


def test_pca_gaussian_is_the_sample_covariance_plus_the_floor():
    pytest.importorskip("skimage")
    mean, cov = pca_gaussian(8)
    x = face_images(8, flip=True).reshape(200, 64).double().numpy()
    assert mean.shape == (1, 8, 8) and cov.shape == (64, 64) and cov.dtype == torch.float64
    np.testing.assert_allclose(mean.reshape(-1).numpy(), x.mean(0), atol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(x.T) + 0.01 * np.eye(64), atol=1e-12)
    assert torch.equal(cov, cov.T)
    assert torch.linalg.eigvalsh(cov).min() >= 0.01 - 1e-10


def test_pca_gaussian_keeps_the_top_components_above_the_floor():
    pytest.importorskip("skimage")
    _, cov = pca_gaussian(8, n_components=10, eigenvalue_floor=0.02)
    x = face_images(8, flip=True).reshape(200, 64).double().numpy()
    top = np.linalg.eigvalsh(np.cov(x.T))[-10:]
    expected = np.sort(np.concatenate([np.full(54, 0.02), top + 0.02]))
    np.testing.assert_allclose(torch.linalg.eigvalsh(cov).numpy(), expected, atol=1e-10)
    mean, cov = pca_gaussian(8, source="natural")
    assert torch.linalg.eigvalsh(cov).min() >= 0.01 - 1e-10 and 0 < mean.mean() < 1
    with pytest.raises(ValueError, match="n_components"):
        pca_gaussian(8, n_components=65)
    with pytest.raises(ValueError, match="source"):
        pca_gaussian(8, source="celeba")


def test_pca_gaussian_samples_have_its_covariance():
    pytest.importorskip("skimage")
    mean, cov = pca_gaussian(6)
    n = 20000
    flat = sample_gaussian(mean, cov, n, generator=torch.Generator().manual_seed(0)).reshape(n, -1)
    var = cov.diagonal()
    assert torch.all((flat.mean(0) - mean.reshape(-1)).abs() < 5 * (var / n).sqrt())
    se_cov = ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
    assert torch.all((torch.cov(flat.T) - cov).abs() < 5 * se_cov)


def test_builtin_dataset():
    assert "gaussian-field" in DATASETS
    a = builtin_dataset("gaussian-field", 4, size=8, generator=torch.Generator().manual_seed(0))
    b = builtin_dataset("gaussian-field", 4, size=8, generator=torch.Generator().manual_seed(0))
    assert a.shape == (4, 1, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="gaussian-field"):
        builtin_dataset("mnist", 4)


@pytest.mark.parametrize("name", ["blackhole", "natural", "faces", "pca-gaussian"])
def test_builtin_dataset_image_sets(name):
    pytest.importorskip("skimage")
    a = builtin_dataset(name, 150, size=8, generator=torch.Generator().manual_seed(0))
    b = builtin_dataset(name, 150, size=8, generator=torch.Generator().manual_seed(0))
    assert name in DATASETS and a.shape == (150, 1, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b)
    if name == "faces":  # 150 <= 200 draws: distinct images of the 100 faces and their mirrors
        assert len(torch.unique(a.reshape(150, -1), dim=0)) == 150
        assert builtin_dataset(name, 450, size=8).shape == (450, 1, 8, 8)


def test_ring_features_recover_the_generator_parameters():
    images, params = blackhole_images(100, 32, blur_uas=0.0, asymmetry=(0.5, 1.0), width_uas=(8.0, 12.0),
                                      generator=torch.Generator().manual_seed(0), return_params=True)
    found = ring_features(images)
    # A crescent's brightness centroid lies in the direction of its brightest point.
    error = (found["position_angle_deg"] - params["position_angle_deg"] + 180.0) % 360.0 - 180.0
    assert error.abs().max() < 0.01
    torch.testing.assert_close(found["flux"], params["flux"], rtol=1e-6, atol=1e-6)
    assert (found["diameter_uas"] / params["diameter_uas"] - 1).abs().mean() < 0.02
    # Half-pixel radial shells of 5 µas pixels: the width is a coarse measurement, right on average.
    assert abs(float((found["width_uas"] / params["width_uas"]).mean()) - 1.0) < 0.15
    with pytest.raises(ValueError, match="images: expected shape"):
        ring_features(torch.zeros(2, 3, 32, 32))
