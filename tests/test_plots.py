import io
import math

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
from matplotlib.figure import Figure  # noqa: E402

from scoreprior.diagnostics import sbc_ecdf, summary_maps  # noqa: E402
from scoreprior.plots import (  # noqa: E402
    coverage_figure, logprob_scatter, loss_figure, posterior_figure, sample_grid, sbc_ecdf_figure, summary_figure,
    tarp_figure,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _samples(n: int, c: int = 1) -> torch.Tensor:
    return torch.randn(n, c, 6, 6, generator=torch.Generator().manual_seed(0))


def test_posterior_figure_has_a_panel_per_image_and_three_colour_bars(tmp_path):
    samples = _samples(5)
    mean, std = samples.mean(0), samples.std(0)
    fig = posterior_figure(truth=samples[0], measurement_image=samples[1], mean=mean, std=std, samples=samples)
    assert isinstance(fig, Figure)
    # truth, A^H y, mean, std, 3 samples; colour bars beside A^H y, mean and std
    assert len(fig.axes) == 7 + 3
    titles = [ax.get_title() for ax in fig.axes]
    assert "A^H y" in titles and "truth" in titles and "sample 3" in titles
    path = tmp_path / "posterior.png"
    fig.savefig(path)
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000


def test_posterior_figure_without_truth_or_measurement():
    samples = _samples(2).numpy()
    fig = posterior_figure(mean=samples.mean(0), std=samples.std(0), samples=samples)
    assert len(fig.axes) == (2 + 2) + 2  # mean, std, the 2 samples there are; 2 colour bars
    with pytest.raises(ValueError, match="samples"):
        posterior_figure(mean=samples[0], std=samples[0], samples=samples[0])


def test_loss_figure_plots_the_loss_and_its_nonzero_terms():
    steps = 30
    history = {"loss": list(np.linspace(10, 1, steps)), "nll": [1.0] * steps, "neg_log_prior": [2.0] * steps,
               "log_q": [-1.0] * (steps - 1) + [math.nan], "flux_penalty": [0.0] * steps, "skipped": [0] * steps}
    fig = loss_figure(history)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert len(fig.axes[0].lines) == 1 and len(fig.axes[1].lines) == 3  # flux penalty, all zero, left out


def test_sample_grid_has_one_axes_per_image():
    fig = sample_grid(_samples(10), ncols=4)
    assert isinstance(fig, Figure) and len(fig.axes) == 10
    assert len(sample_grid(_samples(3, c=3), ncols=8).axes) == 3
    with pytest.raises(ValueError, match="ncols"):
        sample_grid(_samples(2), ncols=0)


def test_summary_figure_has_a_panel_and_colour_bar_per_map():
    samples = _samples(50).double()
    fig = summary_figure(summary_maps(samples, samples[0]), truth=samples[0])
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * 6  # truth, mean, std, HDI width, error, z-score
    assert "(mean - truth) / std" in [ax.get_title() for ax in fig.axes]
    assert len(summary_figure(summary_maps(samples)).axes) == 2 * 3
    with pytest.raises(ValueError, match="hdi_width"):
        summary_figure({"mean": samples[0], "std": samples[0]})


def test_coverage_and_tarp_figures_draw_curves_and_bands():
    levels = [0.1 * k for k in range(1, 10)]
    fig = coverage_figure(levels, {"exact": levels, "shrunk": [0.8 * v for v in levels]}, n=100)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert len(fig.axes[0].lines) == 3 and len(fig.axes[0].collections) == 1  # diagonal + 2 curves; the band
    with pytest.raises(ValueError, match="curves"):
        coverage_figure(levels, {"bad": levels[:3]})
    alpha = np.linspace(0, 1, 21)
    fig = tarp_figure({"a": (alpha, alpha), "b": (alpha**2, alpha)}, n=50)
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) == 3 and len(fig.axes[0].collections) == 1


def test_sbc_ecdf_figure_has_one_axes_per_entry():
    ranks = torch.randint(0, 20, (40,), generator=torch.Generator().manual_seed(0))
    ecdf = sbc_ecdf(ranks, 19, n_simulations=100)
    fig = sbc_ecdf_figure({"flux": ecdf, "max": ecdf, "mean": ecdf}, ncols=2)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    with pytest.raises(ValueError, match="ecdfs"):
        sbc_ecdf_figure({})


def test_logprob_scatter_annotates_the_fit():
    x = np.linspace(-10, 0, 30)
    fig = logprob_scatter(x, 2 * x + 1)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert fig.axes[0].get_title() == "R² = 1.000, slope = 2.000"


def test_missing_matplotlib_says_it_is_a_dependency(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.delitem(sys.modules, "scoreprior.plots")
    with pytest.raises(ImportError, match=r"needs matplotlib, a dependency of scoreprior: reinstall"):
        importlib.import_module("scoreprior.plots")


def test_loss_figure_is_not_flattened_by_one_huge_spike():
    """One 450,000-nat step among losses near -350: the axis keeps the bulk readable and marks the spike."""
    steps = 600
    loss = list(-350 + 50 * np.exp(-np.arange(steps) / 50) + np.random.default_rng(0).normal(0, 2, steps))
    loss[300] = 450_000.0
    terms = {"nll": [10.0] * steps, "neg_log_prior": [v + 5 for v in loss], "log_q": [-15.0] * steps}
    fig = loss_figure({"loss": loss, **terms, "skipped": [0] * steps})
    fig.savefig(io.BytesIO(), format="png")
    for ax in fig.axes:
        assert ax.get_position().width > 0.3  # the layout kept both panels (the edge markers once squeezed them)
        low, high = ax.get_ylim()
        assert high - low < 4_500  # under 1 % of the spike, which would otherwise stretch the axis to 450,000
        assert any("off scale" in text.get_text() and "e+05" in text.get_text() for text in ax.texts)


def test_demo_report_has_a_microarcsecond_scale_bar():
    from scoreprior.plots import demo_report_figure

    samples = _samples(6)
    image = samples[0]
    metrics = {
        "truth": {"fov_uas": 160.0},
        "observation": {"n_visibilities": 800, "stations": list("ABCDEFG")},
        "posterior": {"coverage": {"level": 0.9, "fraction_of_pixels": 0.8}, "nxcorr_mean_truth": 0.9,
                      "ring_diameter_uas": {"posterior_mean": 40.0, "posterior_std": 1.0,
                                            "posterior_eti95": [38.0, 42.0], "truth_measured": 40.5},
                      "flux": {"posterior_mean": 1.0, "posterior_std": 0.1, "truth": 1.0}},
        "exact_check": {"khat": 0.4, "reliable": True, "ess": 20.0, "n": 25, "log_prior_noise_median": 0.5},
        "correction": {"method": "importance", "ess": 20.0, "particles": 25, "stages": [], "converged": True,
                       "trusted": True},
    }
    fig = demo_report_figure(truth=image, dirty=image, mean=image, std=image, samples=samples,
                             covered=(image > 0.5).float(), metrics=metrics)
    assert "confirmed" in fig._suptitle.get_text()
    metrics["exact_check"]["reliable"] = False
    metrics["correction"] = {"method": "smc", "ess": 12.0, "particles": 25, "unique": 20, "lineages": 9, "stages": [{}, {}],
                             "converged": False, "trusted": False}
    failed = demo_report_figure(truth=image, dirty=image, mean=image, std=image, samples=samples,
                                covered=(image > 0.5).float(), metrics=metrics)
    assert failed._suptitle.get_text().startswith("do not trust these error bars")
    metrics["correction"]["converged"] = True  # reached beta = 1, but from 9 of 25 draws (< MIN_LINEAGES)
    few = demo_report_figure(truth=image, dirty=image, mean=image, std=image, samples=samples,
                             covered=(image > 0.5).float(), metrics=metrics)
    assert few._suptitle.get_text().startswith("error bars uncertain") and "only 9 of the flow's" in few._suptitle.get_text()
    labelled = [ax for ax in fig.axes if any(t.get_text() == "50 µas" for t in ax.texts)]
    assert len(labelled) == 2  # truth and coverage panels: 160 µas over the image width, bar of 50 µas
    bar = labelled[0].lines[0].get_xdata()
    width = image.shape[-1]
    assert math.isclose(bar[1] - bar[0], 50.0 / (160.0 / width))
    fig.savefig(io.BytesIO(), format="png")
