"""The studies' --quick modes run end to end and write what they promise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STUDIES = Path(__file__).resolve().parents[1] / "studies"


def run_study(name: str, out: Path, *, timeout: int = 600) -> dict:
    """Run studies/<name>.py --quick into `out` on one thread; returns its metrics.json."""
    proc = subprocess.run([sys.executable, str(STUDIES / f"{name}.py"), "--out", str(out), "--quick"],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(out / "metrics.json") in proc.stdout
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_gaussian_posterior_quick(tmp_path):
    """8x8 quick run of all three priors (about 30 s on one CPU thread): files written, finite errors, and
    the closed-form-prior DPI close to the exact posterior even after 300 steps (measured: mean 1.2 %,
    std 5.5 % relative)."""
    metrics = run_study("gaussian_posterior", tmp_path, timeout=300)
    assert set(metrics["results"]) == {"gaussian", "surrogate", "exact"}
    for r in metrics["results"].values():
        assert r["skipped_steps"] == 0
        assert all(0 <= r[key] < float("inf") for key in ("mean_rel", "mean_z", "std_rel", "seconds_per_step"))
    assert metrics["results"]["gaussian"]["mean_rel"] < 0.05 and metrics["results"]["gaussian"]["std_rel"] < 0.15
    assert (tmp_path / "gaussian_posterior.png").stat().st_size > 10_000


@pytest.mark.slow
def test_calibration_quick(tmp_path):
    """The study's --quick mode (about 70 s on one thread): files written, exact posterior calibrated."""
    results = run_study("calibration", tmp_path)["gaussian"]["results"]
    assert abs(results["exact"]["tarp"]["atc"]) < 0.03
    assert results["shrunk"]["tarp"]["atc"] < -0.05 < 0.05 < results["widened"]["tarp"]["atc"]
    for name in ("gaussian/coverage.png", "gaussian/tarp.png", "gaussian/sbc.png", "dpi/logprob_scatter.png"):
        assert (tmp_path / name).stat().st_size > 10_000


@pytest.mark.slow
def test_toy_posterior_2d_quick(tmp_path):
    """About a minute: every baseline swept, PnP-DM and DAPS, the DPI rows, and the estimator floor below every
    method."""
    metrics = run_study("toy_posterior_2d", tmp_path)
    rows = metrics["rows"]
    assert {r["method"] for r in rows} == {"exact_samples", "dps", "score_ald", "sde_projection", "pnp_dm", "daps",
                                           "dpi_exact", "dpi_closed"}
    floor = next(r["kl"] for r in rows if r["method"] == "exact_samples")
    # exact draws from the gridded posterior: the histogram KL is only the estimator's finite-n bias
    assert 0 < floor < 0.3
    assert all(r["kl"] is None or r["kl"] >= floor - 3 * r["kl_err"] for r in rows)
    assert abs(metrics["problem"]["true_right_mode"] - 0.36) < 0.05
    assert (tmp_path / "toy_posterior_2d.png").stat().st_size > 10_000 and (tmp_path / "table.md").exists()


@pytest.mark.slow
def test_ws_gaussian_quick(tmp_path):
    """About 10 s: every λ rule against the exact Gaussian posterior; the exact posterior mean beats the haze, and
    the covariance data step (the exact posterior score here) has the right spread at 100 reverse-SDE steps
    (variance ratio measured 1.01 over 16 draws) and the smallest mean error of all rules."""
    metrics = run_study("ws_gaussian", tmp_path)
    assert len(metrics["rows"]) == 2 * 2 * 9 + 2
    for row in metrics["rows"]:
        assert row["mean_error"]["mean"] >= 0 and row["variance_ratio"]["mean"] > 0
        assert row["psnr_exact_mean"]["mean"] > metrics["psnr_measurement"]
    sde_100 = {r["rule"]: r for r in metrics["rows"] if r["method"] == "sde" and r["steps"] == 100}
    assert abs(sde_100["covariance, λ=1"]["variance_ratio"]["mean"] - 1) < 0.1
    assert min(sde_100, key=lambda k: sde_100[k]["mean_error"]["mean"]) == "covariance, λ=1"


@pytest.mark.slow
def test_ws_dehaze_quick(tmp_path):
    """About a minute: both priors trained briefly (checkpoints written), every method scored on both test sets (a
    smoke test, not a result), the checkpoints written beside the results."""
    metrics = run_study("ws_dehaze", tmp_path)
    assert metrics["mode"] == "quick" and set(metrics["results"]) == {"rocket", "coins"}
    for tasks in metrics["results"].values():
        assert set(tasks) == {"dehaze", "deblur_dehaze"}
        for task in tasks.values():
            assert all(0 < task[m]["psnr_draw"] < 100 and 0 < task[m]["psnr_mean"] < 100
                       for m in ("measurement", "ws", "ws_auto", "ws_best", "vp", "vp_dps", "ws_fast", "ws_fast_uniform",
                                 "ws_long"))
            assert task["ws_fast"]["evaluations"] < task["ws"]["evaluations"] < task["ws_long"]["evaluations"]
    assert {p.name for p in tmp_path.glob("*.pt")} == {"ws.pt", "vp.pt"}
    assert (tmp_path / "ws_dehaze.png").stat().st_size > 10_000


@pytest.mark.slow
def test_sampler_calibration_quick(tmp_path):
    """A few minutes: every method on every Gaussian problem and every sampler on the black holes (a smoke test, not a
    result); the exact posterior's own draws sit at the Monte Carlo floor, so the metrics are right."""
    metrics = run_study("sampler_calibration", tmp_path)
    gaussian, blackhole = metrics["gaussian"], metrics["blackhole"]
    problems = ("denoise", "blur", "fourier", "eht")
    assert set(gaussian) == {f"{p}/{m}" for p in problems for m in
                             ("exact", "dpi_exact", "dpi_surrogate", "dpi_reference", "dps", "score_ald", "projection",
                              "pnp_dm", "daps", "ws")}
    for problem in problems:  # 64 exact draws: mean error ~ 1/8 of a posterior std, std ratio ~ 1 +- 0.09
        exact = gaussian[f"{problem}/exact"]
        assert exact["mean_error_stds"] < 0.25 and abs(exact["std_ratio"] - 1) < 0.2 and exact["coverage90"] > 0.75
    assert "circulant" in gaussian["fourier/ws"]["skipped"] and "skipped" not in gaussian["blur/ws"]
    assert {m for m, r in blackhole.items() if "skipped" not in r} == {"dps", "projection", "pnp_dm", "daps"}
    assert all(r["nominal_range_coverage"] == 1 / 3 and r["truths"] == 2
               and all(0 <= r[f"range_coverage{region}"] <= 1 for region in ("", "_ring", "_background"))
               for r in blackhole.values() if "skipped" not in r)
    assert (tmp_path / "figure.png").stat().st_size > 10_000 and (tmp_path / "table.md").exists()


@pytest.mark.slow
def test_train_priors_quick(tmp_path):
    """About a minute: every shipped prior trained 20 steps and exported under --out, the package untouched."""
    metrics = run_study("train_priors", tmp_path)
    assert set(metrics["priors"]) == {"blackhole-32", "gaussian-16", "natural-16", "natural-32", "faces-24"}
    for name, prior in metrics["priors"].items():
        assert prior["provenance"] and prior["wall_time_s"] > 0
        assert (tmp_path / "pretrained" / f"{name}.pt").is_file()


@pytest.mark.slow
def test_eht_gaussian_posterior_quick(tmp_path):
    """16x16 quick run (about 30 s on one thread): the reference flow is close to the exact posterior after
    150 steps where the plain flow has collapsed (measured: 0.04 vs 4.5 posterior stds, std ratio 1.02 vs
    0.47), and a second run resumes from the written fits."""
    metrics = run_study("eht_gaussian_posterior", tmp_path)
    rows = {f"{r['flow']}_{r['prior']}": r for r in metrics["rows"]}
    ref, plain = rows["reference_gaussian"], rows["plain_gaussian"]
    assert ref["mean_z"] < 0.2 and 0.9 < ref["std_ratio_median"] < 1.1
    assert plain["mean_z"] > 5 * ref["mean_z"] and plain["std_ratio_median"] < 0.7
    assert len(list((tmp_path / "fits").glob("*.json"))) == 4
    assert run_study("eht_gaussian_posterior", tmp_path)["rows"] == metrics["rows"]
    assert (tmp_path / "eht_gaussian_posterior.png").stat().st_size > 10_000


@pytest.mark.slow
def test_blackhole_calibration_quick(tmp_path):
    """Four problems of the demo's pipeline with 60 steps (about 30 s on one thread): per-problem files, both
    truth sets scored, the SBC functionals present."""
    metrics = run_study("blackhole_calibration", tmp_path)
    assert metrics["n_problems"] == 4 and len(list((tmp_path / "problems").glob("*.pt"))) == 4
    for label in ("model_truths", "clean_truths"):
        result = metrics["results"][label]
        assert set(result["sbc"]["pvalues"]) == {"flux", "ring_diameter"}
        assert all(0 <= c <= 1 for c in result["coverage_eti"])
        assert (tmp_path / label / "coverage.png").stat().st_size > 10_000


@pytest.mark.slow
def test_prior_recipe_quick(tmp_path):
    """About a minute: every recipe variant trained 20 steps on both problems and scored. Even this short,
    the Gaussian base must lower the KL bound against the exact score by 10x (measured: 1600 -> 19 nats)."""
    metrics = run_study("prior_recipe", tmp_path)
    g16 = metrics["gaussian-16"]
    assert set(g16) - set(metrics["variants"]) == {"the training set's Gaussian alone (no network)"}
    assert set(metrics["variants"]) == set(metrics["blackhole-32"])
    assert g16["+ Gaussian base (= RECIPE)"]["kl_bound_nats"] < 0.1 * g16["shipped before issue 15"]["kl_bound_nats"]
    for row in metrics["blackhole-32"].values():
        assert set(row["ks_pvalues"]) == {"diameter_uas", "width_uas", "position_angle_deg", "flux"}


@pytest.mark.slow
def test_prior_density_quick(tmp_path):
    """About four minutes: test NLL, Gaussian baseline and sample checks of every shipped prior."""
    metrics = run_study("prior_density", tmp_path, timeout=900)
    assert set(metrics["priors"]) == {"blackhole-32", "gaussian-16", "natural-16", "natural-32", "faces-24"}
    for prior in metrics["priors"].values():
        assert all(abs(prior[k]["nats_per_dim"]) < 20 for k in ("prior", "gaussian"))
    assert "ks_pvalues" in metrics["priors"]["blackhole-32"]["samples"]
    assert (tmp_path / "prior_density.png").stat().st_size > 10_000
