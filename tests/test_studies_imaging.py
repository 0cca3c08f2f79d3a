"""The imaging studies' --quick modes run end to end and write finite metrics and their figures."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scoreprior.pretrained import PRETRAINED_DIR

STUDIES = Path(__file__).resolve().parents[1] / "studies"


def run_quick(study: str, out: Path, priors: tuple[str, ...]) -> dict:
    """Run `study --quick` into `out` on one thread (skip when a prior is not shipped); returns metrics.json."""
    missing = [name for name in priors if not (PRETRAINED_DIR / f"{name}.pt").is_file()]
    if missing:
        pytest.skip(f"pretrained priors {missing} not in {PRETRAINED_DIR}")
    proc = subprocess.run([sys.executable, str(STUDIES / study), "--out", str(out), "--quick"], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert str(out / "metrics.json") in proc.stdout
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_denoise_deblur_quick(tmp_path):
    """2 patches x 3 tasks, 60 DPI steps each (about 20 s of CPU)."""
    metrics = run_quick("denoise_deblur.py", tmp_path, ("natural-16",))
    assert set(metrics["results"]) == {"denoise-0.1", "denoise-0.2", "deblur"}
    for entry in metrics["results"].values():
        assert len(entry["images"]) == 2
        for image in entry["images"]:
            assert image["skipped_steps"] == 0
            assert 0 <= image["coverage_90"] <= 1
            assert all(math.isfinite(image[key]) for key in ("psnr_mean", "psnr_measurement", "rmse_mean",
                                                             "mean_posterior_std"))
        assert all(math.isfinite(v["mean"]) and math.isfinite(v["std"]) for v in entry["summary"].values())
    assert (tmp_path / "denoise_deblur.png").stat().st_size > 10_000


@pytest.mark.slow
def test_blackhole_interferometry_quick(tmp_path):
    """3 and 7 stations, two priors, 40 DPI steps per fit, and the real M87 data when present (about 30 s of CPU)."""
    metrics = run_quick("blackhole_interferometry.py", tmp_path, ("blackhole-32", "faces-24"))
    assert set(metrics["subsets"]) == {"3", "7"}
    assert metrics["subsets"]["3"]["n_visibilities"] < metrics["subsets"]["7"]["n_visibilities"]
    fits = [fit for entry in metrics["priors"].values() for fit in entry["fits"].values()]
    assert len(fits) == 4
    if "m87_2017" in metrics:
        fits.append(metrics["m87_2017"])
        assert (tmp_path / "m87_2017.png").is_file()
    for fit in fits:
        assert fit["skipped_steps"] == 0
        values = [fit["chi2_per_visibility_of_mean"], fit["ring_diameter_uas"]["mean"], fit["ring_diameter_uas"]["std"],
                  fit["flux"]["mean"], fit["position_angle_deg_of_mean"]]
        assert all(math.isfinite(v) for v in values)
    for entry in metrics["priors"].values():
        assert all(-1 <= fit["nxcorr_mean_truth"] <= 1 for fit in entry["fits"].values())
        # the truth's brightness centroid lies at the crescent's position angle: the sky orientation is kept
        assert abs(entry["truth_position_angle_deg"] - metrics["truth"]["position_angle_deg"]) < 1.0
    for name in ("stations.png", "stations_metrics.png"):
        assert (tmp_path / name).stat().st_size > 10_000


@pytest.mark.slow
def test_eht_closures_quick(tmp_path):
    """Gain robustness (3 DPI fits + DPS) on the demo problem and the real M87 data when present (about 30 s)."""
    metrics = run_quick("eht_closures.py", tmp_path, ("blackhole-32", "faces-24"))
    simulated = metrics["simulated"]
    # The closures of the gain-corrupted data are those of the calibrated data: the truth fits them.
    assert all(0.5 < value < 2 for value in simulated["truth_reduced_chi2"].values())
    fits = simulated["fits"]
    assert len(fits) == 5
    for fit in fits.values():
        assert -1 <= fit["nxcorr_mean_truth"] <= 1 and 0 <= fit["pixels_inside_90"] <= 1
        ring = fit["ring"]["diameter_uas"]
        assert ring["eti95"][0] <= ring["mean"] <= ring["eti95"][1]
        assert all(math.isfinite(v["median"]) for v in fit["blurred_psnr_db"].values())
    # Even unconverged, trusting corrupted gains ruins the image that closures keep.
    assert fits["DPI (60 steps): visibilities, gain-corrupted"]["nxcorr_mean_truth"] < 0.5
    assert fits["DPI (60 steps): closures, gain-corrupted"]["nxcorr_mean_truth"] > 0.8
    if "m87_2017" in metrics:
        assert metrics["m87_2017"]["time_stamps"] == 22
        for entry in metrics["m87_2017"]["priors"].values():
            assert all(math.isfinite(v["median"]) for v in entry["reduced_chi2"].values())
        assert (tmp_path / "m87_closures.png").stat().st_size > 10_000
    assert (tmp_path / "gains.png").stat().st_size > 10_000
