"""The main job: image a simulated EHT 2017 observation of a black hole with the shipped prior.

`run_demo` takes the shipped `blackhole-32` score prior, simulates an EHT 2017 observation of a held-apart
crescent at M87's coordinates (thermal noise of every baseline), fits the DPI posterior with the
surrogate (ELBO) prior, checks a few posterior draws with the exact probability-flow ODE log-density,
and writes a PNG report, the draws as NetCDF and a JSON of metrics. `scoreprior demo` calls it.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from scoreprior.data import BLACKHOLE_FOV_UAS, blackhole_images, ring_radius
from scoreprior.diagnostics import credible_interval, nxcorr, to_datatree
from scoreprior.eht import load_array, uv_coverage
from scoreprior.likelihood import GaussianLikelihood
from scoreprior.operators import Interferometer, uas_to_rad
from scoreprior.posterior import DPI
from scoreprior.pretrained import pretrained
from scoreprior.surrogate import SurrogatePrior

__all__ = ["M87", "DemoConfig", "simulate_observation", "run_demo"]

# EHT 2017 M87 campaign (REFERENCES: RA 12.5137 h, Dec 12.3911 deg, MJD 57854, 230 GHz), total flux ~0.6 Jy.
M87 = {"ra_hours": 12.5137, "dec_deg": 12.3911, "mjd": 57854.0, "rf": 230e9, "flux_jy": 0.6}


@dataclass
class DemoConfig:
    """Settings of `run_demo`.

    prior: name of a shipped prior (`scoreprior.pretrained`); seed: seeds the truth, noise, flow, draws;
    steps, batch_size, lr: the DPI fit (Adam, warm-up, cosine decay); n_flows: RealNVP steps;
    time_samples: importance-sampled times per surrogate evaluation; n_samples: posterior draws written;
    n_checked: draws whose exact ODE log-density is computed; probes: Hutchinson probes for that check;
    prob: credible level of the coverage map; tint: integration time per scan in s.
    """

    prior: str = "blackhole-32"
    seed: int = 0
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    n_flows: int = 8
    time_samples: int = 2
    n_samples: int = 256
    n_checked: int = 4
    probes: int = 4
    prob: float = 0.9
    tint: float = 60.0

    @classmethod
    def quick(cls, seed: int = 0) -> DemoConfig:
        """A smoke-test configuration: the whole pipeline in well under a minute, unconverged."""
        return cls(seed=seed, steps=60, batch_size=8, n_flows=4, time_samples=1, n_samples=32, n_checked=2,
                   probes=1)


def simulate_observation(
    truth: Tensor, *, fov_uas: float, seed: int, tint: float = 60.0
) -> tuple[GaussianLikelihood, dict]:
    """An EHT 2017 observation of `truth` at M87's coordinates, with thermal noise.

    truth: (1, 1, N, N) image in the prior's brightness units, taken to carry M87's 0.6 Jy in total, so
    a noise of s Jy is s · sum(truth) / 0.6 in image units. The thermal noise σ of `uv_coverage` is
    the std of the real and of the imaginary part of a visibility (eht-imaging's convention), hence
    a complex std of √2 σ in `GaussianLikelihood`'s convention.
    Returns the likelihood (y and the per-visibility noise) and a dict describing the observation.
    """
    array = load_array("EHT2017")
    cover = uv_coverage(array, M87["ra_hours"], M87["dec_deg"], M87["mjd"], rf=M87["rf"], tint=tint)
    npix = truth.shape[-1]
    operator = Interferometer(cover.uv, npix, uas_to_rad(fov_uas))
    jy_per_unit = M87["flux_jy"] / float(truth.sum())
    sigma = torch.as_tensor(cover.sigma * math.sqrt(2) / jy_per_unit, dtype=truth.dtype)[None]
    clean = operator.A(truth)
    noise = GaussianLikelihood(operator, clean, sigma).sample(truth, generator=torch.Generator().manual_seed(seed))
    likelihood = GaussianLikelihood(operator, noise, sigma)
    baseline = torch.as_tensor(cover.uv).norm(dim=1)
    info = {"stations": cover.stations, "n_visibilities": len(cover), "max_baseline_glambda": float(baseline.max()) / 1e9,
            "median_thermal_sigma_jy": float(torch.as_tensor(cover.sigma).median()), "jy_per_image_unit": jy_per_unit,
            "median_snr": float((clean.abs() / sigma).median())}
    return likelihood, info


def _flux_estimate(likelihood: GaussianLikelihood) -> float:
    """Total flux from the shortest baseline's amplitude (intra-site baselines see the whole source)."""
    uv = likelihood.operator.uv
    return float(likelihood.y[0, uv.norm(dim=1).argmin()].abs())


def _coverage_map(samples: Tensor, truth: Tensor, prob: float) -> Tensor:
    interval = credible_interval(samples, prob, kind="eti")
    return ((truth >= interval[..., 0]) & (truth <= interval[..., 1])).to(samples.dtype)


def run_demo(out: str | Path, config: DemoConfig | None = None, *, progress: bool = True) -> dict:
    """Run the demo and write report.png, samples.nc and metrics.json into `out`; returns the metrics."""
    from scoreprior.plots import demo_report_figure

    config = config or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    prior = pretrained(config.prior, t0=1e-3)
    image_shape = tuple(prior.event_shape)
    fov = BLACKHOLE_FOV_UAS
    # Training images came from generators seeded 0..; the demo's truth comes from a separate stream.
    truth, params = blackhole_images(1, image_shape[-1], generator=torch.Generator().manual_seed(10_000 + config.seed),
                                     return_params=True)
    likelihood, observation = simulate_observation(truth, fov_uas=fov, seed=config.seed, tint=config.tint)
    flux = _flux_estimate(likelihood)
    print(f"demo: {config.prior} prior; EHT 2017 observation of a crescent at M87's position: "
          f"{observation['n_visibilities']} visibilities on {len(observation['stations'])} stations "
          f"({', '.join(observation['stations'])}), median SNR {observation['median_snr']:.0f}; "
          f"flux from the shortest baseline {flux:.2f} (truth {float(truth.sum()):.2f})", flush=True)

    surrogate = SurrogatePrior(prior.score, prior.sde, t0=prior.t0, n_time_samples=config.time_samples,
                               event_shape=image_shape)
    dpi = DPI(image_shape, n_flows=config.n_flows, positive=True, flux=flux, seed=config.seed)
    torch.manual_seed(config.seed)  # the surrogate's times and noises come from the global RNG
    tick = time.perf_counter()
    history = dpi.fit(surrogate, likelihood, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                      warmup=max(1, config.steps // 10), progress=progress)
    seconds["dpi_fit"] = time.perf_counter() - tick

    with torch.no_grad():
        samples, log_q = dpi.sample(config.n_samples, generator=torch.Generator().manual_seed(config.seed + 1))
    mean, std = samples.mean(0), samples.std(0)
    covered = _coverage_map(samples, truth[0], config.prob)
    diameter = ring_radius(samples, fov_uas=fov) * 2
    true_diameter = float(params["diameter_uas"][0])
    measured_truth_diameter = float(ring_radius(truth, fov_uas=fov)[0]) * 2

    tick = time.perf_counter()
    checked = torch.cat([truth, samples[: config.n_checked]])
    generator = torch.Generator().manual_seed(config.seed + 2)
    exact = prior.log_prob(checked, divergence="hutchinson", n_probes=config.probes, rtol=1e-3, atol=1e-3,
                           generator=generator).detach()
    torch.manual_seed(config.seed + 3)
    elbo = SurrogatePrior(prior.score, prior.sde, t0=prior.t0, n_time_samples=64,
                          event_shape=image_shape).log_prob(checked).detach()
    seconds["exact_check"] = time.perf_counter() - tick

    tree = to_datatree(samples, truth=truth[0], measurement=likelihood.y)
    tree.to_netcdf(out / "samples.nc")
    dirty = likelihood.operator.A_adjoint(likelihood.y)[0]
    dirty = dirty * (float(truth.sum()) / float(dirty.clamp_min(0).sum()))
    metrics = {
        "config": asdict(config),
        "observation": observation,
        "truth": {key: float(value[0]) for key, value in params.items() if key != "fov_uas"} | {"fov_uas": fov},
        "flux_estimate": flux,
        "posterior": {
            "coverage": {"level": config.prob, "kind": "eti", "fraction_of_pixels": float(covered.mean())},
            "nxcorr_mean_truth": nxcorr(mean, truth[0]),
            "rmse_over_peak": float((mean - truth[0]).square().mean().sqrt() / truth.max()),
            "ring_diameter_uas": {"truth_model": true_diameter, "truth_measured": measured_truth_diameter,
                                  "posterior_mean": float(diameter.mean()), "posterior_std": float(diameter.std()),
                                  "posterior_eti90": credible_interval(diameter[:, None], 0.9, kind="eti")[0].tolist()},
            "flux": {"truth": float(truth.sum()), "posterior_mean": float(samples.sum((1, 2, 3)).mean()),
                     "posterior_std": float(samples.sum((1, 2, 3)).std())},
        },
        "exact_logp_check": {
            "what": "log p_t0 (nats) by the probability-flow ODE (Hutchinson, rtol = atol = 1e-3) vs the "
                    "surrogate ELBO with 64 time samples; row 0 is the truth, then posterior draws",
            "ode": exact.tolist(), "elbo": elbo.tolist(),
            "elbo_minus_ode": (elbo - exact).tolist(),
        },
        "dpi": {"final_loss": history["loss"][-1], "skipped_steps": int(sum(history["skipped"]))},
        "seconds": seconds,
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
    }
    fig = demo_report_figure(truth=truth[0], dirty=dirty, mean=mean, std=std, samples=samples[:4],
                             covered=covered, metrics=metrics)
    fig.savefig(out / "report.png", dpi=110)
    seconds["total"] = time.perf_counter() - start
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    post = metrics["posterior"]
    print(f"posterior: {post['coverage']['fraction_of_pixels']:.1%} of pixels inside the {config.prob:.0%} interval; "
          f"nxcorr(mean, truth) {post['nxcorr_mean_truth']:.3f}; ring diameter "
          f"{post['ring_diameter_uas']['posterior_mean']:.1f} ± {post['ring_diameter_uas']['posterior_std']:.1f} µas "
          f"(truth {measured_truth_diameter:.1f} measured the same way, model {true_diameter:.1f})")
    print("exact ODE log p vs surrogate ELBO (nats), truth then draws: "
          + "; ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(exact.tolist(), elbo.tolist())))
    print(f"time: DPI {seconds['dpi_fit']:.0f} s, exact check {seconds['exact_check']:.0f} s, "
          f"total {seconds['total']:.0f} s")
    print(f"wrote {out / 'report.png'}, {out / 'samples.nc'}, {out / 'metrics.json'}")
    return metrics
