import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("skimage")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_logprob_compare import main, reference_log_prob  # noqa: E402
from scoreprior import GaussianScore, ODEOptions, ScorePrior, VPSDE  # noqa: E402
from scoreprior.data import gaussian_field, sample_gaussian  # noqa: E402
from scoreprior.traces import draw_probes  # noqa: E402


def test_reference_algorithm_agrees_with_scoreprior():
    """The benchmark's re-implementation of the reference (RK45 in t, one probe per solve) is a peer
    computation: over 32 probes it agrees with scoreprior's exact trace within 4 standard errors, and with
    the same probe it gives scoreprior's Hutchinson value to solver tolerance."""
    sde = VPSDE()
    mean, cov = gaussian_field(4, 4, dtype=torch.float64)
    prior = ScorePrior(GaussianScore(mean, cov, sde), sde, t0=1e-3)
    x = sample_gaussian(mean, cov, 2, generator=torch.Generator().manual_seed(0))
    exact = prior.log_prob(x, ODEOptions(divergence="exact", rtol=1e-7, atol=1e-7))
    probes = draw_probes("rademacher", 32, x, torch.Generator().manual_seed(1))  # the probes scoreprior draws
    runs = torch.stack([reference_log_prob(prior, x, p, 1e-6)[0] for p in probes])
    se = runs.std(0) / 32**0.5
    assert ((runs.mean(0) - exact).abs() < 4 * se + 1e-3).all()
    ours = prior.log_prob(x, ODEOptions(divergence="hutchinson", probe="rademacher", rtol=1e-7, atol=1e-7),
                          generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, runs[0], rtol=0, atol=1e-3)


@pytest.mark.slow
def test_quick_comparison_runs(tmp_path):
    result = main(["--quick", "--cache", str(tmp_path / "exact.pt"), "--json", str(tmp_path / "out.json")])
    assert {r["method"] for r in result["rows"]} == {"reference", "scoreprior", "scoreprior+cv"}
    assert (tmp_path / "out.json").is_file() and (tmp_path / "exact.pt").is_file()
    assert result["exact_trace"][0]["speedup"] > 0


@pytest.mark.slow
def test_solver_benchmark_runs(tmp_path):
    from bench_logprob_solvers import main as solvers

    result = solvers(["--quick", "--json", str(tmp_path / "solvers.json")])
    solvers_seen = {r["solver"] for r in result["rows"]}
    assert solvers_seen == {"adaptive", "gaussian base"} and (tmp_path / "solvers.json").is_file()
    assert all(r["nfe"] > 0 and r["max_abs_error"] >= r["mean_abs_error"] for r in result["rows"])


@pytest.mark.slow
def test_exact_dpi_benchmark_runs(tmp_path):
    from bench_exact_dpi import main as exact_dpi

    rows = exact_dpi(["--quick", "--json", str(tmp_path / "dpi.json")])["rows"]
    assert len(rows) == 2 and all(r["s_per_step"] > 0 for r in rows)
    assert [r["time_vs_adaptive_backprop"] for r in rows if r["row"].startswith("adaptive")] == [1.0]
