import json
import math

import numpy as np
import pytest
import torch

from scoreprior.calibration import DPIPosterior, ExactGaussianPosterior, run_calibration
from scoreprior.data import gaussian_field
from scoreprior.diagnostics import (
    binomial_band, coverage, credible_interval, rank_uniformity, sbc_ecdf, sbc_ranks, summary_maps, tarp_atc,
    tarp_coverage, to_datatree,
)
from scoreprior.operators import GaussianBlur
from scoreprior.likelihood import GaussianLikelihood
from scoreprior.priors import GaussianPrior, gaussian_posterior

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


def test_dpi_posterior_starts_from_its_reference():
    """With a reference, the flow maps N(0, I) through x = m + L u: a flow at its identity start (the default
    init_scale 1 with a reference; one step at lr 1e-12) draws the reference, here the exact posterior N(m, S) of a 3x3 blur problem; the
    reference function gets the problem's likelihood. 4000 draws: mean within 4.5 standard errors, covariance
    within 6 standard errors of its entries. Not callable: TypeError."""
    prior = GaussianPrior(*gaussian_field(3, 3))
    truth = prior.sample(1, generator=torch.Generator().manual_seed(0))
    likelihood = GaussianLikelihood(GaussianBlur(1.0), GaussianBlur(1.0).A(truth), 0.1)
    seen = []

    def reference(lik):
        seen.append(lik)
        return GaussianPrior(*gaussian_posterior(prior, lik))

    posterior = DPIPosterior(prior, (1, 3, 3), steps=1, lr=1e-12, reference=reference)
    draws = posterior(likelihood, 4000, generator=torch.Generator().manual_seed(1))["samples"].double().reshape(4000, 9)
    mean, cov = gaussian_posterior(prior, likelihood)
    assert seen == [likelihood]
    se = (cov.diagonal() / 4000).sqrt()
    assert ((draws.mean(0) - mean.reshape(-1)) / se).abs().max() < 4.5
    scale = cov.diagonal().max().item()
    torch.testing.assert_close(torch.cov(draws.T), cov, atol=6 * math.sqrt(2 / 4000) * scale, rtol=0)
    with pytest.raises(TypeError, match="reference: expected None or a function"):
        DPIPosterior(prior, (1, 3, 3), reference=GaussianPrior(*gaussian_field(3, 3)))


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


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match=r"truths: expected shape \(2, 3, 3\)"):
        coverage(torch.zeros(2, 5, 3, 3), torch.zeros(2, 3, 4), [0.5])
    with pytest.raises(ValueError, match="levels"):
        coverage(torch.zeros(2, 5, 3, 3), torch.zeros(2, 3, 3), [1.5])
    with pytest.raises(TypeError, match="samples"):
        coverage([[1.0]], torch.zeros(1), [0.5])


def test_calibrate_starts_dpi_from_the_reference_that_posterior_uses(tmp_path):
    """`calibrate gaussian --method dpi` starts each flow at the exact posterior (the reference, by default) and
    after one DPI step the draws are still that posterior: 90 % ETI coverage near 0.9 over 30 blur problems.
    With --reference-samples 0 the flow starts at N(0, 0.1^2 I): coverage far below."""
    from scoreprior.cli import main

    common = ["calibrate", "gaussian", "--operator", "blur:1", "--sigma", "0.1", "--n-problems", "30",
              "--n-samples", "40", "--size", "4", "--dpi-steps", "1"]
    coverage = {}
    for name, extra in (("reference", []), ("none", ["--reference-samples", "0"])):
        assert main([*common, "--out", str(tmp_path / name), *extra]) == 0
        result = json.loads((tmp_path / name / "metrics.json").read_text())["results"]["dpi"]
        coverage[name] = result["coverage_eti"][-1]
    assert abs(coverage["reference"] - 0.9) < 0.08 and coverage["none"] < 0.5, coverage


def test_calibrate_command_writes_its_report(tmp_path):
    from scoreprior.cli import main

    out = tmp_path / "cal"
    status = main(["calibrate", "gaussian", "--operator", "blur:1", "--sigma", "0.1", "--method", "exact",
                   "--n-problems", "30", "--n-samples", "40", "--size", "4", "--out", str(out)])
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    result = metrics["results"]["exact"]
    assert result["n_problems"] == 30 and len(result["coverage_eti"]) == 9
    for name in ("coverage.png", "tarp.png", "sbc.png", "summary_exact.png", "samples.npz"):
        assert (out / name).stat().st_size > 1000
    with np.load(out / "samples.npz") as f:
        assert f["samples"].shape == (30, 40, 1, 4, 4) and f["truths"].shape == (30, 1, 4, 4)
    assert main(["calibrate", str(tmp_path / "prior.pt"), "--operator", "blur:1", "--sigma", "0.1",
                 "--method", "exact", "--out", str(out)]) == 2
