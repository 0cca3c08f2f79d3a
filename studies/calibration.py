"""Calibration of posteriors over many simulated problems: coverage, SBC and TARP.

Problems: 8x8 grey images x from the Gaussian random field of the built-in "gaussian-field" dataset
(`gaussian_field(8, 8)`: squared-exponential kernel, length scale 2 px, scale 0.2, nugget 0.01, mean
0.5), measured through a Gaussian blur (sigma 1 px) with white noise of std 0.1. Problem i of a run
with seed s draws its truth, noise and posterior draws from a generator seeded by (s, i) only
(`scoreprior.calibration.run_problem`), so the loop can be sharded.

(a) The exact Gaussian posterior N(m, Σ) (`gaussian_posterior`) of every problem, sampled directly:
    "exact"     N(m, Σ): must come out calibrated;
    "shrunk"    N(m, 0.5 Σ): covariance halved, i.e. std scaled by √0.5 ≈ 0.71 (over-confident);
    "widened"   N(m, 2 Σ): covariance doubled, std scaled by √2 ≈ 1.41 (under-confident).
(b) DPI (a 4-step RealNVP flow, hidden 64, `scoreprior.calibration.DPIPosterior`) fitted to each
    problem with the closed-form GaussianPrior as its prior (--dpi-prior gaussian, default) or the ELBO
    surrogate of the exact Gaussian score (--dpi-prior surrogate, VP SDE, t0 = 1e-3). No trained
    network: the prior is exact (or its exact score), so miscalibration here is DPI's variational error.
    Also a scatter of the flow's log q against the exact posterior log-density at its draws.

    OMP_NUM_THREADS=1 python studies/calibration.py --out runs/calibration
    OMP_NUM_THREADS=1 python studies/calibration.py --out /tmp/cal --quick   # under 2 minutes

Writes into --out: metrics.json (everything), and per part a folder (gaussian/, dpi/) with its own
metrics.json, coverage.png, tarp.png, sbc.png and summary_<posterior>.png; dpi/logprob_scatter.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from scoreprior import plots
from scoreprior.calibration import DPIPosterior, ExactGaussianPosterior, run_calibration, write_report
from scoreprior.data import gaussian_field
from scoreprior.operators import GaussianBlur
from scoreprior.priors import GaussianPrior, gaussian_posterior
from scoreprior.scores import GaussianScore
from scoreprior.sde import VPSDE
from scoreprior.surrogate import SurrogatePrior

SIZE = 8
BLUR = 1.0
NOISE = 0.1
COV_SCALES = {"exact": 1.0, "shrunk": 0.5, "widened": 2.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--quick", action="store_true", help="fewer problems and a tiny DPI part; under 2 minutes")
    p.add_argument("--seed", type=int, default=0, help="seeds every problem (with its index) and the TARP references")
    p.add_argument("--n-problems", type=int, default=None, help="problems of part (a) (default 500; quick 200)")
    p.add_argument("--n-samples", type=int, default=None, help="posterior draws per problem (default 500; quick 200)")
    p.add_argument("--dpi-problems", type=int, default=None,
                   help="problems of part (b) (default 100; quick 12; 0 skips it)")
    p.add_argument("--dpi-steps", type=int, default=None, help="DPI steps per problem (default 400; quick 150)")
    p.add_argument("--dpi-prior", choices=("gaussian", "surrogate"), default="gaussian",
                   help="DPI's log-prior: the closed-form Gaussian or the ELBO surrogate of its exact score")
    args = p.parse_args(argv)
    args.n_problems = args.n_problems or (200 if args.quick else 500)
    args.n_samples = args.n_samples or (200 if args.quick else 500)
    if args.dpi_problems is None:
        args.dpi_problems = 12 if args.quick else 100
    args.dpi_steps = args.dpi_steps or (150 if args.quick else 400)
    return args


class _WithExactDensity:
    """A posterior wrapper that adds "log_p_exact": the exact Gaussian posterior log-density of the draws."""

    def __init__(self, posterior, prior: GaussianPrior):
        self.posterior, self.prior = posterior, prior

    def __call__(self, likelihood, n, *, generator):
        result = self.posterior(likelihood, n, generator=generator)
        exact = GaussianPrior(*gaussian_posterior(self.prior, likelihood))
        return {**result, "log_p_exact": exact.log_prob(result["samples"].to(exact.mean.dtype))}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    prior = GaussianPrior(*gaussian_field(SIZE, SIZE))
    problem = dict(seed=args.seed, truth_prior=prior, operator=GaussianBlur(BLUR), sigma=NOISE)
    metrics = {"study": "calibration", "quick": args.quick, "seed": args.seed,
               "problem": {"size": SIZE, "prior": "gaussian_field(8, 8) defaults", "operator": f"blur:{BLUR}",
                           "noise_sigma": NOISE},
               "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                           "torch": torch.__version__, "threads": torch.get_num_threads()}}
    written = []

    start = time.perf_counter()
    runs = {name: run_calibration(range(args.n_problems), posterior=ExactGaussianPosterior(prior, cov_scale=scale),
                                  n_samples=args.n_samples, **problem)
            for name, scale in COV_SCALES.items()}
    part, paths = write_report(args.out / "gaussian", runs, seed=args.seed,
                               extra={"cov_scales": COV_SCALES, "n_samples": args.n_samples})
    metrics["gaussian"] = {**part, "seconds": time.perf_counter() - start}
    written += paths
    for name, m in part["results"].items():
        print(f"{name:>8}: ETI coverage at 0.5 / 0.9: {m['coverage_eti'][4]:.3f} / {m['coverage_eti'][8]:.3f}; "
              f"TARP ATC {m['tarp']['atc']:+.4f}; SBC p flux {m['sbc']['pvalues']['flux']:.3g}, "
              f"max {m['sbc']['pvalues']['max']:.3g}", flush=True)

    if args.dpi_problems > 0:
        if args.dpi_prior == "gaussian":
            log_prior = prior
        else:
            sde = VPSDE()
            score = GaussianScore(prior.mean, prior.cov, sde)
            log_prior = SurrogatePrior(score, sde, t0=1e-3, terminal_log_prob=lambda x: score.log_prob_t(x, sde.T))
        dpi = DPIPosterior(log_prior, (1, SIZE, SIZE), steps=args.dpi_steps)
        start = time.perf_counter()
        run = run_calibration(range(args.dpi_problems), posterior=_WithExactDensity(dpi, prior),
                              n_samples=args.n_samples, progress=True, desc="DPI problems", **problem)
        seconds = time.perf_counter() - start
        part, paths = write_report(args.out / "dpi", {"dpi": run}, seed=args.seed,
                                   extra={"dpi_prior": args.dpi_prior, "steps": args.dpi_steps, "n_flows": dpi.n_flows,
                                          "hidden": dpi.hidden, "batch_size": dpi.batch_size, "lr": dpi.lr})
        scatter = plots.logprob_scatter(run["log_p_exact"][0], run["log_q"][0].double(),
                                        xlabel="exact posterior log p(x | y)", ylabel="DPI log q(x)")
        paths.append(args.out / "dpi" / "logprob_scatter.png")
        scatter.savefig(paths[-1], dpi=110)
        metrics["dpi"] = {**part, "seconds": seconds, "seconds_per_problem": seconds / args.dpi_problems,
                          "skipped_steps": int(run["skipped"].sum())}
        written += paths
        m = part["results"]["dpi"]
        print(f"     dpi: {args.dpi_problems} problems x {args.dpi_steps} steps in {seconds:.0f} s; ETI coverage at "
              f"0.5 / 0.9: {m['coverage_eti'][4]:.3f} / {m['coverage_eti'][8]:.3f}; TARP ATC {m['tarp']['atc']:+.4f}",
              flush=True)
    else:
        metrics["dpi"] = {"skipped": "--dpi-problems 0"}

    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    written.append(args.out / "metrics.json")
    print("wrote " + ", ".join(str(p) for p in written))
    return metrics


if __name__ == "__main__":
    main()
