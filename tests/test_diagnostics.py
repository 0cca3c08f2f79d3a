import math

import numpy as np
import pytest
import torch

from scoreprior.calibration import ExactGaussianPosterior, run_calibration
from scoreprior.data import gaussian_field
from scoreprior.diagnostics import (
    binomial_band, coverage, credible_interval, linear_fit, rank_uniformity, sbc_ecdf, sbc_ranks, summary_maps,
    tarp_atc, tarp_coverage, to_datatree,
)
from scoreprior.operators import GaussianBlur
from scoreprior.priors import GaussianPrior

azs = pytest.importorskip("arviz_stats")
xr = pytest.importorskip("xarray")
stats = pytest.importorskip("scipy.stats")

LEVELS = [round(0.1 * k, 1) for k in range(1, 10)]


@pytest.fixture(scope="module")
def runs():
    """200 problems on 4x4 Gaussian fields (blur 1 px, noise 0.1), 300 draws each of the exact posterior
    N(m, c Σ) for c = 1 (calibrated), 0.5 (std x 0.71) and 2 (std x 1.41); the same truths for all three."""
    prior = GaussianPrior(*gaussian_field(4, 4))
    problem = dict(seed=3, truth_prior=prior, operator=GaussianBlur(1.0), sigma=0.1, n_samples=300)
    return {name: run_calibration(range(200), posterior=ExactGaussianPosterior(prior, cov_scale=c), **problem)
            for name, c in (("exact", 1.0), ("shrunk", 0.5), ("widened", 2.0))}


def test_problems_depend_only_on_seed_and_index(runs):
    prior = GaussianPrior(*gaussian_field(4, 4))
    part = run_calibration(range(150, 153), seed=3, truth_prior=prior, operator=GaussianBlur(1.0), sigma=0.1,
                           n_samples=300, posterior=ExactGaussianPosterior(prior))
    for key in ("truth", "y", "samples"):
        torch.testing.assert_close(part[key], runs["exact"][key][150:153], rtol=0, atol=0)
    assert torch.equal(runs["shrunk"]["truth"], runs["exact"]["truth"])


def test_exact_posterior_eti_coverage_is_within_the_binomial_band(runs):
    run = runs["exact"]
    empirical = coverage(run["samples"], run["truth"], LEVELS, kind="eti").mean(0)
    lower, upper = binomial_band(200, LEVELS)
    assert bool(((empirical >= lower) & (empirical <= upper)).all()), empirical


@pytest.mark.parametrize("name, scale", [("shrunk", 0.5), ("widened", 2.0)])
def test_scaled_posteriors_cover_as_the_gaussian_closed_form_says(runs, name, scale):
    """A central interval of N(m, c Σ) at level p covers a truth from N(m, Σ) with probability
    2 Φ(√c z_p) - 1, z_p = Φ^{-1}((1 + p) / 2): far from p, and outside the binomial band."""
    run = runs[name]
    empirical = coverage(run["samples"], run["truth"], LEVELS, kind="eti").mean(0).numpy()
    levels = np.array(LEVELS)
    expected = 2 * stats.norm.cdf(math.sqrt(scale) * stats.norm.ppf((1 + levels) / 2)) - 1
    np.testing.assert_allclose(empirical, expected, atol=0.03)
    lower, upper = binomial_band(200, LEVELS)
    outside = (empirical < lower.numpy()) if scale < 1 else (empirical > upper.numpy())
    assert outside[2:].all()  # levels 0.3 ... 0.9; the lowest levels are too close to 0 to tell


def test_hdi_coverage_flags_both_ways(runs):
    by_name = {name: coverage(run["samples"], run["truth"], [0.5, 0.9], kind="hdi").mean(0)
               for name, run in runs.items()}
    assert (by_name["shrunk"] < by_name["exact"] - 0.1).all() and (by_name["widened"] > by_name["exact"] + 0.05).all()
    # the narrowest of many noisy windows is biased narrow: a few points low at 300 draws
    assert (by_name["exact"] - torch.tensor([0.5, 0.9], dtype=torch.float64)).abs().max() < 0.05


def test_tarp_is_on_the_diagonal_for_the_exact_posterior_and_flags_both_ways(runs):
    g = torch.Generator().manual_seed(0)
    atc = {}
    for name, run in runs.items():
        ecp, alpha = tarp_coverage(run["samples"], run["truth"], n_refs=4, generator=g)
        atc[name] = tarp_atc(ecp, alpha)
        if name == "exact":
            # 800 (problem, reference) pairs; pairs of one problem are dependent, so judge by the 200 problems.
            # Interior levels only: at α = 1 the band is {1}, while E ECP(1) = L / (L + 1) with L draws.
            lower, upper = binomial_band(200, alpha[1:-1], prob=0.99)
            inner = ecp[1:-1]
            assert bool(((inner >= lower) & (inner <= upper)).all())
    assert abs(atc["exact"]) < 0.02
    assert atc["shrunk"] < -0.05 and atc["widened"] > 0.05


def test_tarp_matches_the_tarp_package_with_its_own_references():
    tarp = pytest.importorskip("tarp")
    rng = np.random.default_rng(1)
    n_sims, n_samples, dim = 100, 37, 5
    theta = rng.normal(size=(n_sims, dim))
    samples = theta + rng.normal(scale=1.3, size=(n_samples, n_sims, dim)) + 0.2
    ecp_ref, alpha = tarp.get_tarp_coverage(samples.copy(), theta.copy(), norm=True, num_alpha_bins=10, seed=7)
    np.random.seed(7)  # tarp draws its references with the legacy global generator, right after seeding it
    references = np.random.uniform(low=0, high=1, size=(n_sims, dim))
    ecp, _ = tarp_coverage(torch.from_numpy(samples).transpose(0, 1), torch.from_numpy(theta),
                           references=torch.from_numpy(references)[None], alpha=torch.from_numpy(alpha))
    # f = k / 37 never falls on tarp's bin edges k / 10 except at 0 and 1; at the last edge tarp's histogram
    # counts f = max f as covered, the ball through the farthest draw does not
    np.testing.assert_allclose(ecp.numpy()[:-1], ecp_ref[:-1], rtol=0, atol=1e-12)


def test_tarp_hand_built_case():
    """d = 1, truths 0 and 1 (already the unit box). Problem 0: reference 0.25, the truth at distance 0.25,
    all four draws closer: f = 1. Problem 1: the reference at the truth: no draw closer, f = 0."""
    samples = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.9, 1.2, 2.0, 0.5]], dtype=torch.float64).unsqueeze(-1)
    truths = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    references = torch.tensor([[[0.25], [1.0]]], dtype=torch.float64)
    ecp, alpha = tarp_coverage(samples, truths, references=references, alpha=torch.tensor([0.0, 0.5, 1.0]))
    assert ecp.tolist() == [0.0, 0.5, 0.5] and alpha.dtype == torch.float64
    ecp = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])  # ECP = α: no area
    assert tarp_atc(ecp, torch.linspace(0, 1, 6)) == pytest.approx(0.0, abs=1e-7)
    # ECP = α^2 over [1/2, 1]: ∫ (α^2 - α) dα = -1/12, by the trapezoid rule on a fine grid
    alpha = torch.linspace(0, 1, 2001, dtype=torch.float64)
    assert tarp_atc(alpha**2, alpha) == pytest.approx(-1 / 12, abs=1e-6)


def test_credible_intervals_match_arviz_stats():
    x = torch.randn(499, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[:, 0, 0] = x[:, 0, 0].exp()  # a skewed marginal, where HDI and ETI differ
    array = np.moveaxis(x.numpy(), 0, -1)
    for kind, peer in (("hdi", azs.hdi), ("eti", azs.eti)):
        ours = credible_interval(x, 0.9, kind=kind)
        assert ours.shape == (3, 4, 2)
        np.testing.assert_allclose(ours.numpy(), peer(array, 0.9), rtol=0, atol=1e-12)
    hdi = credible_interval(torch.tensor([0.0, 1.0, 1.5, 2.0, 10.0]), 0.6)  # 3 draws: widths 1.5, 1, 8
    assert hdi.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="kind"):
        credible_interval(x, 0.9, kind="central")


def test_binomial_band_by_hand():
    """Binomial(10, 1/2): F(1) = 11/1024 < 0.025 <= F(2) = 56/1024, F(7) = 968/1024 < 0.975 <= F(8)."""
    cdf = np.cumsum([math.comb(10, k) for k in range(11)]) / 1024
    assert cdf[1] < 0.025 <= cdf[2] and cdf[7] < 0.975 <= cdf[8]
    lower, upper = binomial_band(10, [0.5])
    assert lower.tolist() == [0.2] and upper.tolist() == [0.8]
    with pytest.raises(ValueError, match="levels"):
        binomial_band(10, [1.5])


def test_sbc_ranks_and_uniformity_by_hand():
    samples = torch.tensor([[1.0, 2.0, 3.0]]).reshape(1, 3, 1, 1)
    ranks = sbc_ranks(samples, torch.tensor([[[2.5]]]), {"double": lambda x: 2 * x.flatten(1).sum(1)})
    assert ranks["pixels"].tolist() == [[[2]]] and ranks["double"].tolist() == [2]
    # L = 1, ranks 0 four times: counts (4, 0), expected (2, 2), chi^2 = 4 on 1 dof: p = erfc(sqrt(2))
    p = rank_uniformity(torch.zeros(4, dtype=torch.long), 1, bins=2)
    assert float(p) == pytest.approx(math.erfc(math.sqrt(2)), rel=1e-12)
    # L = 2, counts (4, 1, 1), expected 2 each: chi^2 = 3 on 2 dof: p = exp(-3 / 2)
    p = rank_uniformity(torch.tensor([0, 0, 0, 0, 1, 2]), 2, bins=3)
    assert float(p) == pytest.approx(math.exp(-1.5), rel=1e-12)
    # grouped: L = 3 in 2 bins {0, 1}, {2, 3}; perfectly even counts
    assert float(rank_uniformity(torch.tensor([0, 1, 2, 3, 0, 3]), 3, bins=2)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="ranks"):
        rank_uniformity(torch.tensor([0, 5]), 3)
    with pytest.raises(ValueError, match="functionals"):
        sbc_ranks(samples, torch.tensor([[[2.5]]]), {"bad": lambda x: x})


def test_sbc_pvalues_flag_the_shrunk_posterior(runs):
    p = {name: {key: float(rank_uniformity(r, 300)) for key, r in sbc_ranks(
        run["samples"], run["truth"], {"max": lambda x: x.flatten(1).max(1).values}).items() if key != "pixels"}
        for name, run in runs.items()}
    assert p["exact"]["max"] > 1e-3
    assert p["shrunk"]["max"] < 1e-6 and p["widened"]["max"] < 1e-6


def test_sbc_ecdf_simultaneous_band_holds_whole_ecdfs_at_its_level():
    """Monte Carlo: uniform ranks stay entirely inside the simultaneous 95 % band about 95 % of the time,
    inside the pointwise one far less often."""
    n_problems, n_samples, trials = 50, 19, 400
    g = torch.Generator().manual_seed(0)
    bands = {s: sbc_ecdf(torch.zeros(n_problems, dtype=torch.long), n_samples, simultaneous=s) for s in (True, False)}
    inside = {True: 0, False: 0}
    for _ in range(trials):
        ranks = torch.randint(0, n_samples + 1, (n_problems,), generator=g)
        diff = sbc_ecdf(ranks, n_samples, simultaneous=False)["ecdf_diff"]
        for s, band in bands.items():
            inside[s] += bool(((diff >= band["lower_diff"]) & (diff <= band["upper_diff"])).all())
    assert 0.92 <= inside[True] / trials <= 0.99
    assert inside[False] / trials < 0.85


def test_summary_maps():
    x = torch.randn(499, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 + 1
    truth = torch.zeros(1, 3, 3, dtype=torch.float64)
    maps = summary_maps(x, truth, prob=0.9)
    torch.testing.assert_close(maps["mean"], x.mean(0))
    torch.testing.assert_close(maps["std"], x.std(0))
    hdi = azs.hdi(np.moveaxis(x.numpy(), 0, -1), 0.9)
    np.testing.assert_allclose(maps["hdi_width"].numpy(), hdi[..., 1] - hdi[..., 0], atol=1e-12)
    torch.testing.assert_close(maps["error"], x.mean(0) - truth)
    torch.testing.assert_close(maps["zscore"], (x.mean(0) - truth) / x.std(0))
    assert set(summary_maps(x.float())) == {"mean", "std", "hdi_width"}
    with pytest.raises(ValueError, match="truth"):
        summary_maps(x, truth[0])


def test_datatree_round_trip_through_netcdf(tmp_path):
    x = torch.randn(2, 50, 1, 4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    truth = torch.zeros(1, 4, 3, dtype=torch.float64)
    y = torch.randn(1, 5, dtype=torch.complex128, generator=torch.Generator().manual_seed(1))
    tree = to_datatree(x, truth=truth, measurement=y, sample_dims=("chain", "draw"))
    path = tmp_path / "posterior.nc"
    tree.to_netcdf(path)
    back = xr.open_datatree(path)
    post = back["posterior"]["x"]
    assert post.dims == ("chain", "draw", "channel", "row", "col")
    np.testing.assert_array_equal(post.values, x.numpy())
    np.testing.assert_array_equal(back["truth"]["x"].values, truth.numpy())
    np.testing.assert_array_equal(back["observed_data"]["y"].values, y[0].numpy())
    hdi = azs.hdi(back, prob=0.9)["x"]
    assert hdi.dims == ("channel", "row", "col", "ci_bound") and hdi.shape == (1, 4, 3, 2)
    assert azs.eti(back, prob=0.9)["x"].shape == (1, 4, 3, 2)
    assert np.isfinite(azs.rhat(back)["x"].values).all() and np.isfinite(azs.ess(back)["x"].values).all()


def test_datatree_independent_draws_are_one_chain():
    x = torch.randn(40, 4, 3, generator=torch.Generator().manual_seed(0))
    tree = to_datatree(x)
    assert dict(tree["posterior"].sizes) == {"chain": 1, "draw": 40, "row": 4, "col": 3}
    assert len(azs.summary(tree)) == 12
    with pytest.raises(ValueError, match="samples"):
        to_datatree(torch.zeros(5))
    with pytest.raises(ValueError, match="truth"):
        to_datatree(x, truth=torch.zeros(3, 4))


def test_missing_arviz_says_it_is_a_dependency(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "arviz_base", None)
    with pytest.raises(ImportError, match=r"needs arviz_base: a dependency of scoreprior; reinstall"):
        to_datatree(torch.zeros(3, 2, 2))


def test_linear_fit():
    x = torch.linspace(-1, 3, 20, dtype=torch.float64)
    fit = linear_fit(x, 2 * x + 1)
    assert fit["slope"] == pytest.approx(2) and fit["intercept"] == pytest.approx(1) and fit["r2"] == pytest.approx(1)
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    b = 0.5 * a + rng.normal(size=50)
    fit = linear_fit(a, b)
    slope, intercept = np.polyfit(a, b, 1)
    assert fit["slope"] == pytest.approx(slope) and fit["intercept"] == pytest.approx(intercept)
    assert fit["r2"] == pytest.approx(np.corrcoef(a, b)[0, 1] ** 2)


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match=r"truths: expected shape \(2, 3, 3\)"):
        coverage(torch.zeros(2, 5, 3, 3), torch.zeros(2, 3, 4), [0.5])
    with pytest.raises(ValueError, match="levels"):
        coverage(torch.zeros(2, 5, 3, 3), torch.zeros(2, 3, 3), [1.5])
    with pytest.raises(TypeError, match="samples"):
        coverage([[1.0]], torch.zeros(1), [0.5])


def test_calibrate_command_writes_its_report(tmp_path):
    from scoreprior.cli import main

    out = tmp_path / "cal"
    status = main(["calibrate", "gaussian", "--operator", "blur:1", "--sigma", "0.1", "--method", "exact",
                   "--n-problems", "30", "--n-samples", "40", "--size", "4", "--out", str(out)])
    assert status == 0
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    result = metrics["results"]["exact"]
    assert result["n_problems"] == 30 and len(result["coverage_eti"]) == 9
    for name in ("coverage.png", "tarp.png", "sbc.png", "summary_exact.png", "samples.npz"):
        assert (out / name).stat().st_size > 1000
    with np.load(out / "samples.npz") as f:
        assert f["samples"].shape == (30, 40, 1, 4, 4) and f["truths"].shape == (30, 1, 4, 4)
    assert main(["calibrate", str(tmp_path / "prior.pt"), "--operator", "blur:1", "--sigma", "0.1",
                 "--method", "exact", "--out", str(out)]) == 2


def test_nxcorr_closed_forms():
    """Invariant to affine maps a -> s a + c (s > 0), -1 for a negated image, 0 for orthogonal centred images."""
    from scoreprior.diagnostics import nxcorr

    a = torch.tensor([[0.0, 1.0], [2.0, 5.0]])
    assert abs(nxcorr(a, 3 * a + 7) - 1) < 1e-12 and abs(nxcorr(a, -a) + 1) < 1e-12
    assert abs(nxcorr(torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.tensor([1.0, 1.0, -1.0, -1.0]))) < 1e-12
    with pytest.raises(ValueError, match="same size"):
        nxcorr(a, torch.zeros(3))


def test_psnr_and_ssim_match_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    from scoreprior.diagnostics import psnr, ssim

    ref = torch.rand(2, 3, 24, 20, generator=torch.Generator().manual_seed(24), dtype=torch.float64)
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(25), dtype=torch.float64)
    x = (ref + 0.1 * noise).clamp(0, 1)
    for i in range(2):
        a, b = x[i].numpy(), ref[i].numpy()
        expected = metrics.structural_similarity(a, b, channel_axis=0, gaussian_weights=True, sigma=1.5,
                                                 use_sample_covariance=False, data_range=1.0)
        assert math.isclose(float(ssim(x, ref)[i]), expected, rel_tol=1e-9)
        assert math.isclose(float(psnr(x, ref)[i]), metrics.peak_signal_noise_ratio(b, a, data_range=1.0),
                            rel_tol=1e-9)
    with pytest.raises(ValueError, match="x, ref"):
        psnr(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match="H, W > 10"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_psnr_and_ssim_take_one_unbatched_image_and_name_mismatched_shapes():
    from scoreprior.diagnostics import psnr, ssim

    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 32, 32, generator=g, dtype=torch.float64)
    x = (ref + 0.1 * torch.randn(1, 32, 32, generator=g, dtype=torch.float64)).clamp(0, 1)
    single = psnr(x, ref)
    assert single.shape == () and single == psnr(x[None], ref[None])[0]
    assert single == 10 * torch.log10(1 / (x - ref).square().mean())
    assert ssim(x, ref).shape == () and ssim(x, ref) == ssim(x[None], ref[None])[0]
    with pytest.raises(ValueError, match=r"expected the same shape, got x \(1, 32, 32\) and ref \(1, 1, 32, 32\)"):
        psnr(x, ref[None])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) or \(C, H, W\), got \(32, 32\)"):
        psnr(x[0], ref[0])


def _blob(n: int, centre: tuple[float, float], sigma: float) -> torch.Tensor:
    """Samples of exp(-|p - centre|^2 / (2 sigma^2)) on an n x n pixel grid (pixel units), float64."""
    i = torch.arange(n, dtype=torch.float64)
    return torch.exp(-((i[:, None] - centre[0]) ** 2 + (i[None, :] - centre[1]) ** 2) / (2 * sigma**2))


def _two_blobs(shift: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """An asymmetric 32 x 32 source (two Gaussian blobs well inside the field), moved by `shift` pixels."""
    dy, dx = shift
    return _blob(32, (15.3 + dy, 16.1 + dx), 2.0) + 0.5 * _blob(32, (12.0 + dy, 18.0 + dx), 1.5)


def test_blurred_psnr_of_identical_images_is_infinite_for_every_shape():
    from scoreprior.diagnostics import blurred_psnr

    ref = _two_blobs()
    for x, r in ((ref[None], ref), (ref[None, None], ref[None]), (ref.expand(3, 1, 32, 32), ref[None])):
        out = blurred_psnr(x, r, fov_uas=160.0)
        assert out.shape == (x.shape[0], 3) and out.dtype == torch.float64 and bool(torch.isposinf(out).all())


def test_blurred_psnr_recovers_a_sub_pixel_shift():
    """The same analytic source moved by (0.37, -1.73) px is matched to > 120 dB at every beam (the residual
    is the sampled blobs' tiny departure from band-limited), far above the unaligned value; a search bounded
    below the true shift cannot reach it; a circular integer shift is undone to rounding."""
    from scoreprior.diagnostics import blurred_psnr

    ref, moved = _two_blobs(), _two_blobs((0.37, -1.73))
    aligned = blurred_psnr(moved[None], ref, fov_uas=160.0)
    unaligned = blurred_psnr(moved[None], ref, fov_uas=160.0, max_shift_px=0)
    bounded = blurred_psnr(moved[None], ref, fov_uas=160.0, max_shift_px=1.0)
    assert bool((aligned > 120).all()) and bool((unaligned < 30).all()), (aligned, unaligned)
    assert bool((bounded < aligned - 50).all()) and bool((bounded > unaligned).all()), bounded
    rolled = torch.roll(ref, (3, -5), dims=(0, 1))
    assert bool((blurred_psnr(rolled[None], ref, fov_uas=160.0) > 250).all())


def test_blurred_psnr_of_two_gaussians_matches_the_closed_form():
    """Unit-flux Gaussians of stds a (truth) and b (draw, centre off by (0.3712, -0.2087) px, off the search
    grids) blurred by a beam of std c have stds s_r^2 = a^2 + c^2, s_x^2 = b^2 + c^2, so with N pixels
        N MSE = 1 / (4 pi s_x^2) + 1 / (4 pi s_r^2) - 1 / (pi (s_x^2 + s_r^2)),
    and the data range is the truth's peak 1 / (2 pi a^2) (centred on a pixel)."""
    from scoreprior.diagnostics import blurred_psnr

    n, pixel_uas, a, b = 64, 2.0, 2.0, 3.0
    fwhms = (10.0, 15.0, 20.0)
    ref = 5.0 * _blob(n, (32.0, 32.0), a)
    x = _blob(n, (32.3712, 31.7913), b)
    out = blurred_psnr(x[None, None], ref[None], fov_uas=n * pixel_uas, fwhm_uas=fwhms)
    c2 = torch.tensor(fwhms, dtype=torch.float64).div(2 * math.sqrt(2 * math.log(2)) * pixel_uas).square()
    sr2, sx2 = a**2 + c2, b**2 + c2
    mse = (1 / (4 * math.pi * sx2) + 1 / (4 * math.pi * sr2) - 1 / (math.pi * (sx2 + sr2))) / n**2
    expected = 10 * torch.log10((1 / (2 * math.pi * a**2)) ** 2 / mse)
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-5)


def test_blurred_psnr_without_alignment_matches_scipy_gaussian_filter():
    """max_shift_px = 0 is the plain PSNR of unit-flux images blurred by a sampled Gaussian kernel (scipy,
    periodic edges), data range the truth's peak; beams of >= 2 px std make the two blurs agree."""
    ndimage = pytest.importorskip("scipy.ndimage")
    from scoreprior.diagnostics import blurred_psnr, psnr

    g = torch.Generator().manual_seed(5)
    ref = torch.rand(32, 32, generator=g, dtype=torch.float64)
    x = torch.rand(4, 32, 32, generator=g, dtype=torch.float64)
    out = blurred_psnr(x, ref, fov_uas=64.0, fwhm_uas=(10.0, 20.0), max_shift_px=0)
    r = ref / ref.sum()
    for k, fwhm in enumerate((10.0, 20.0)):
        sigma = fwhm / (2 * math.sqrt(2 * math.log(2))) / 2.0

        def blur(img):
            return torch.from_numpy(ndimage.gaussian_filter(img.numpy(), sigma, mode="wrap", truncate=12.0))

        expected = [float(psnr(blur(d / d.sum())[None], blur(r)[None], data_range=float(r.max()))) for d in x]
        torch.testing.assert_close(out[:, k], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)


def test_blurred_psnr_ignores_flux_scale_and_grows_with_the_beam():
    """Unit-flux rescaling makes x -> s x (and ref -> s ref) leave it unchanged; a wider beam damps every
    Fourier mode of the residual at every shift, so PSNR increases with the FWHM (noisy draws)."""
    from scoreprior.diagnostics import blurred_psnr

    g = torch.Generator().manual_seed(7)
    ref = _two_blobs()
    x = (ref + 0.05 * torch.randn(16, 1, 32, 32, generator=g, dtype=torch.float64)).clamp(min=0)
    fwhms = (5.0, 10.0, 15.0, 20.0, 30.0)
    out = blurred_psnr(x, ref, fov_uas=160.0, fwhm_uas=fwhms)
    assert bool((out.diff(dim=1) > 0).all()), out
    torch.testing.assert_close(blurred_psnr(37.0 * x, 0.2 * ref, fov_uas=160.0, fwhm_uas=fwhms), out,
                               rtol=1e-9, atol=0)
    assert blurred_psnr(x.float(), ref.float(), fov_uas=160.0).dtype == torch.float64


def test_blurred_psnr_names_bad_arguments():
    from scoreprior.diagnostics import blurred_psnr

    ref, x = _two_blobs(), _two_blobs()[None]
    cases = [
        (dict(x=ref), r"x: expected shape \(B, 1, H, W\) or \(B, H, W\) with B >= 1, got \(32, 32\)"),
        (dict(x=x.expand(2, 2, 32, 32)), r"x: expected shape .* got \(2, 2, 32, 32\)"),
        (dict(ref=ref[:, :31]), r"ref: expected shape \(1, H, W\) or \(H, W\) with \(H, W\) = \(32, 32\) like x "
                                r"\(1, 32, 32\), got \(32, 31\)"),
        (dict(ref=ref.expand(2, 32, 32)), r"ref: expected .* got \(2, 32, 32\)"),
        (dict(ref=torch.zeros(32, 32)), "ref: expected a positive total flux"),
        (dict(x=torch.cat([x, -x])), r"x: expected every draw to have a positive total flux, .* draws \[1\]"),
        (dict(fov_uas=0.0), "fov_uas: expected a finite positive number, got 0.0"),
        (dict(fov_uas=-160.0), "fov_uas"),
        (dict(fwhm_uas=(10.0, 0.0)), r"fwhm_uas\[1\]: expected a finite positive number, got 0.0"),
        (dict(fwhm_uas=()), "fwhm_uas: expected at least one value"),
        (dict(max_shift_px=-1.0), "max_shift_px: expected a finite number of pixels >= 0 or None, got -1.0"),
    ]
    for change, message in cases:
        args = dict(x=x, ref=ref, fov_uas=160.0) | change
        with pytest.raises(ValueError, match=message):
            blurred_psnr(args.pop("x"), args.pop("ref"), **args)
    with pytest.raises(TypeError, match="x"):
        blurred_psnr([[1.0]], ref, fov_uas=160.0)
