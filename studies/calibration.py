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
    surrogate of the exact Gaussian score (--dpi-prior surrogate, VP SDE, t0 = 1e-3): the prior is exact
    (or its exact score), so miscalibration there is DPI's variational error. --dpi-prior trained uses a
    trained network, the shipped `gaussian-16` prior (through its ELBO surrogate), on 16x16 problems whose
    truths come from the Gaussian it was trained on (`pca_gaussian(16)`), same blur and noise.
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
from scoreprior.data import gaussian_field, pca_gaussian
from scoreprior.operators import GaussianBlur
from scoreprior.pretrained import pretrained
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
    p.add_argument("--dpi-prior", choices=("gaussian", "surrogate", "trained"), default="gaussian",
                   help="DPI's log-prior: the closed-form Gaussian, the ELBO surrogate of its exact score, or the "
                        "surrogate of the shipped trained network gaussian-16 (16x16 problems)")
    p.add_argument("--dpi-batch-size", type=int, default=64, help="DPI batch per step")
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
        dpi_truths, shape = prior, (1, SIZE, SIZE)
        if args.dpi_prior == "gaussian":
            log_prior = prior
        elif args.dpi_prior == "surrogate":
            sde = VPSDE()
            score = GaussianScore(prior.mean, prior.cov, sde)
            log_prior = SurrogatePrior(score, sde, t0=1e-3, terminal_log_prob=lambda x: score.log_prob_t(x, sde.T))
        else:
            # the shipped network was trained on samples of pca_gaussian(16): truths come from that Gaussian,
            # whose exact posterior is the reference (the network's own p_theta is only close to it)
            trained = pretrained("gaussian-16", t0=1e-3)
            shape = tuple(trained.event_shape)
            dpi_truths = GaussianPrior(*pca_gaussian(shape[-1]))
            log_prior = SurrogatePrior(trained.score, trained.sde, t0=trained.t0, event_shape=shape)
        dpi = DPIPosterior(log_prior, shape, steps=args.dpi_steps, batch_size=args.dpi_batch_size)
        start = time.perf_counter()
        run = run_calibration(range(args.dpi_problems), posterior=_WithExactDensity(dpi, dpi_truths),
                              n_samples=args.n_samples, progress=True, desc="DPI problems",
                              **dict(problem, truth_prior=dpi_truths))
        seconds = time.perf_counter() - start
        part, paths = write_report(args.out / "dpi", {"dpi": run}, seed=args.seed,
                                   extra={"dpi_prior": args.dpi_prior, "image_shape": list(shape), "steps": args.dpi_steps, "n_flows": dpi.n_flows,
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
