"""The --quick modes of studies/logprob_gaussian.py and studies/logprob_gradients.py run end to end.

Each takes about a minute on one CPU thread (two under load); both need the shipped gaussian-16 prior.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from scoreprior.pretrained import PRETRAINED_DIR

STUDIES = Path(__file__).resolve().parents[1] / "studies"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (PRETRAINED_DIR / "gaussian-16.pt").is_file(), reason="gaussian-16 prior not shipped"),
]


def run_quick(name: str, tmp_path: Path, monkeypatch) -> dict:
    """Import studies/<name>.py (which may import its sibling studies) and run main(["--quick"]) into tmp_path."""
    monkeypatch.syspath_prepend(str(STUDIES))
    spec = importlib.util.spec_from_file_location(name, STUDIES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path), "--quick", "--seed", "0"])
    return json.loads((tmp_path / "metrics.json").read_text())


def finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def test_logprob_gaussian_quick(tmp_path, monkeypatch):
    metrics = run_quick("logprob_gaussian", tmp_path, monkeypatch)
    in_dist = metrics["in_distribution"]
    assert finite(*(in_dist[key] for key in ("r2", "slope", "intercept", "pearson_r", "offset_mean", "offset_std",
                                             "r2_ceiling_hutchinson")))
    assert -1 <= in_dist["pearson_r"] <= 1 and in_dist["n"] == 8
    assert set(metrics["ood"]) == {"digits", "natural", "constant", "noise"}
    assert all(finite(o["true_mean"], o["net_mean"], o["offset_mean"]) for o in metrics["ood"].values())
    noise = metrics["estimator_noise"]
    assert finite(noise["hutchinson_std"], *noise["exact"], *noise["exact_minus_true"])
    # the exact score through the same solver reproduces the closed form (loose quick tolerances)
    assert max(metrics["solver_check_max_abs_error"].values()) < 2.0
    for png in ("logprob_gaussian.png", "logprob_in_distribution.png"):
        assert (tmp_path / png).stat().st_size > 10_000


def test_logprob_gradients_quick(tmp_path, monkeypatch):
    metrics = run_quick("logprob_gradients", tmp_path, monkeypatch)
    assert set(metrics["results"]) == {"in-distribution", "digits", "natural", "constant", "noise"}
    for result in metrics["results"].values():
        for key in ("cos_ode", "cos_score_t0", "cos_ode_vs_score_t0"):
            assert set(result[key]) == {"mean", "median", "p10", "min"}
            assert all(-1 - 1e-6 <= v <= 1 + 1e-6 for v in result[key].values())
        assert finite(result["norm_ratio_ode"]["median"], result["norm_ratio_score_t0"]["median"])
        # the ODE gradient of the exact score matches the closed-form gradient
        assert result["solver_check_cos_min"] > 0.99
    check = metrics["estimator_check"]
    assert finite(*check["cos_exact_divergence_vs_true"], *(c for row in check["cos_hutchinson_vs_exact_divergence"]
                                                            for c in row))
    assert (tmp_path / "logprob_gradients.png").stat().st_size > 10_000
