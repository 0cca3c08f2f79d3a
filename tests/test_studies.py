"""The studies' --quick modes run end to end and write what they promise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STUDIES = Path(__file__).resolve().parents[1] / "studies"


@pytest.mark.slow
def test_gaussian_posterior_quick(tmp_path):
    """8x8 quick run of all three priors (about 30 s on one CPU thread): files written, finite errors, and
    the closed-form-prior DPI close to the exact posterior even after 300 steps (measured: mean 1.2 %,
    std 5.5 % relative)."""
    proc = subprocess.run([sys.executable, str(STUDIES / "gaussian_posterior.py"), "--out", str(tmp_path), "--quick"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert str(tmp_path / "metrics.json") in proc.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["results"]) == {"gaussian", "surrogate", "exact"}
    for r in metrics["results"].values():
        assert r["skipped_steps"] == 0
        assert all(0 <= r[key] < float("inf") for key in ("mean_rel", "mean_z", "std_rel", "seconds_per_step"))
    assert metrics["results"]["gaussian"]["mean_rel"] < 0.05 and metrics["results"]["gaussian"]["std_rel"] < 0.15
    assert (tmp_path / "gaussian_posterior.png").stat().st_size > 10_000

