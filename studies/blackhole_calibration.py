"""Calibration of the main job: `scoreprior demo`'s pipeline on many simulated EHT observations.

Each problem i is the demo with another truth: a crescent of `blackhole_images` (seeded 50,000 + i, apart
from the prior's training images, the demo's truths and the references), observed like the demo
(`simulate_observation`: EHT 2017 at M87, thermal noise seeded 50,000 + i) and fitted with the demo's
pipeline (`scoreprior.demo.fit_posterior`: DPI from a Gaussian reference with the surrogate prior,
`DemoConfig()` settings), then `--n-samples` posterior draws.

Which truth. The prior is the network's density at t0 = 1e-3; the surrogate bounds the density
phat = p_0 * N(0, 2 s0^2 / a0^2 I) (`scoreprior.surrogate`; s0 / a0 = 0.0105), whose draws are crescents
with a faint white noise of std 0.0148. Simulation-based calibration needs truths drawn from the prior
the posterior assumes, so the sky of problem i is crescent + that noise ("model truths", the primary
test). The noiseless crescents are scored too ("clean truths"): in their empty background every interval
of a noisy-background posterior holds the truth, so their pixel coverage is high by construction, and
TARP, which scales each pixel by the truths' range (about 0 there), is not meaningful for them.

With --truths prior the skies are draws of the network prior itself (`sample_prior`, 300 steps on the log-SNR
grid down to t0 = 1e-3, seeded 50,000 + i): the truths the exact-density pipeline assumes. With --pipeline
exact every problem runs the demo's whole pipeline: the surrogate fit, `DemoConfig.exact_steps` steps against
the exact ODE density (`refine_exact`) and the exact-density correction of `DemoConfig.particles` draws
(`correct_posterior`: PSIS, then tempered SMC), whose corrected draws are the posterior samples scored.

Metrics (`scoreprior.calibration.calibration_metrics`): per-pixel ETI coverage at 0.1 ... 0.9 with the
95 % binomial band of P problems, TARP (ECP, ATC), SBC ranks of the total flux and of the ring diameter
(`ring_radius`), with chi-square uniformity p-values.

Each problem is written to --out/problems/<i>.pt when done and skipped when present: the run resumes,
and shards (--shard K/N: the problems with i % N == K) can run as separate processes into one folder;
the report is written by whichever process finds every problem done (or by --report-only).

    OMP_NUM_THREADS=1 python studies/blackhole_calibration.py --out runs/bhcal --shard 0/2 &
    OMP_NUM_THREADS=1 python studies/blackhole_calibration.py --out runs/bhcal --shard 1/2
    OMP_NUM_THREADS=1 python studies/blackhole_calibration.py --out /tmp/bhcal --quick   # ~2 min
    python studies/blackhole_calibration.py --out runs/bhcal_exact --truths prior --pipeline exact --n-problems 30
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import torch

from scoreprior.calibration import FUNCTIONALS, write_report
from scoreprior.data import BLACKHOLE_FOV_UAS, blackhole_images, ring_radius
from scoreprior.correction import SMCConfig, correct_posterior, score_prior_options
from scoreprior.demo import DemoConfig, fit_posterior, refine_exact, simulate_observation
from scoreprior.pretrained import pretrained
from scoreprior.samplers import Run, sample_prior
from scoreprior.surrogate import SurrogatePrior
from scoreprior.checkpoints import atomic_save

TRUTH_SEED = 50_000
SBC_FUNCTIONALS = {"flux": FUNCTIONALS["flux"],
                   "ring_diameter": lambda x: 2 * ring_radius(x, fov_uas=BLACKHOLE_FOV_UAS).to(x.dtype)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (finished problems are kept)")
    p.add_argument("--quick", action="store_true", help="4 problems, 60 DPI steps: a smoke test, ~2 minutes")
    p.add_argument("--seed", type=int, default=0, help="seeds the TARP references (problems are seeded by index)")
    p.add_argument("--n-problems", type=int, default=50)
    p.add_argument("--n-samples", type=int, default=256, help="posterior draws per problem")
    p.add_argument("--steps", type=int, default=None, help="DPI steps per problem (default: the demo's)")
    p.add_argument("--shard", default="0/1", help="K/N: run the problems with index %% N == K")
    p.add_argument("--truths", choices=("crescents", "prior"), default="crescents",
                   help="crescents + the surrogate's noise, or draws of the network prior (sample_prior)")
    p.add_argument("--pipeline", choices=("surrogate", "exact"), default="surrogate",
                   help="the surrogate DPI fit alone, or the demo's whole exact-density pipeline")
    p.add_argument("--report-only", action="store_true", help="write the report from the problems done so far")
    args = p.parse_args(argv)
    k, _, n = args.shard.partition("/")
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        p.error(f"--shard: expected K/N with 0 <= K < N, got {args.shard!r}")
    args.shard = (int(k), int(n))
    args.config = DemoConfig.quick() if args.quick else DemoConfig()
    if args.steps is not None:
        args.config = replace(args.config, steps=args.steps)
    if args.quick:
        args.n_problems, args.n_samples = 4, 64
    return args


def truths(index: int, prior, kind: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(sky, clean image, crescent parameters) of problem `index`: a crescent with the surrogate's noise and the
    crescent itself, or a draw of the network prior (twice; no parameters)."""
    generator = torch.Generator().manual_seed(TRUTH_SEED + index)
    if kind == "prior":
        draw = sample_prior(prior.score, prior.sde, 1, tuple(prior.event_shape), steps=300,
                            run=Run(t0=prior.t0, generator=generator))
        return draw, draw, {}
    smoothing = SurrogatePrior(prior.score, prior.sde, t0=prior.t0).smoothing
    clean, params = blackhole_images(1, prior.event_shape[-1], generator=generator, return_params=True)
    truth = clean + smoothing**0.5 * torch.randn(clean.shape, generator=generator)
    return truth, clean, {key: float(value[0]) for key, value in params.items() if key != "fov_uas"}


def run_problem(index: int, prior, args: argparse.Namespace) -> dict:
    """Truths, fit and draws of problem `index`: a dict of tensors and numbers."""
    config = args.config
    truth, clean, params = truths(index, prior, args.truths)
    likelihood, _ = simulate_observation(truth, fov_uas=BLACKHOLE_FOV_UAS, seed=TRUTH_SEED + index, tint=config.tint)
    start = time.perf_counter()
    dpi, history = fit_posterior(prior, likelihood, config, seed=TRUTH_SEED + index, progress=False)
    extra = {}
    if args.pipeline == "exact":
        refine_exact(dpi, prior, likelihood, steps=config.exact_steps, batch_size=config.batch_size,
                     lr=config.exact_lr, ode_steps=config.exact_ode_steps, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the verdict is recorded
            corrected = correct_posterior(
                dpi, prior, likelihood, SMCConfig(particles=config.particles, moves=config.smc_moves,
                                                  max_stages=config.smc_stages),
                **score_prior_options(tuple(prior.event_shape), steps=config.check_ode_steps),
                generator=torch.Generator().manual_seed(TRUTH_SEED + index))
        samples = corrected.samples
        extra = {"correction": {key: value for key, value in corrected.to_dict().items() if key != "stages"}}
    else:
        with torch.no_grad():
            samples, _ = dpi.sample(args.n_samples, generator=torch.Generator().manual_seed(TRUTH_SEED + index))
    seconds = time.perf_counter() - start
    return {"index": index, "truth": truth[0], "clean": clean[0], "samples": samples, "seconds": seconds,
            "final_loss": history["loss"][-1], "skipped": int(sum(history["skipped"])), "params": params, **extra}


def report(args: argparse.Namespace, results: list[dict]) -> dict:
    samples = torch.stack([r["samples"] for r in results])
    extra = {"study": "blackhole_calibration", "quick": args.quick, "n_problems": len(results),
             "truths": args.truths, "pipeline": args.pipeline,
             "converged": sum(r.get("correction", {}).get("converged", True) for r in results),
             "config": asdict(args.config), "fit_seconds_mean": sum(r["seconds"] for r in results) / len(results),
             "skipped_steps": sum(r["skipped"] for r in results),
             "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                         "threads": torch.get_num_threads()}}
    out = {}
    labels = (("model_truths", "truth"),) if args.truths == "prior" else (("model_truths", "truth"), ("clean_truths", "clean"))
    for label, key in labels:
        truths = torch.stack([r[key] for r in results])
        document, _ = write_report(args.out / label, {"dpi": {"samples": samples, "truth": truths}}, seed=args.seed,
                                   extra=extra, functionals=SBC_FUNCTIONALS)
        m = document["results"]["dpi"]
        out[label] = m
        band = (m["band95"]["lower"][-1], m["band95"]["upper"][-1])
        print(f"{label}: ETI coverage at 0.5 {m['coverage_eti'][4]:.3f}, at 0.9 {m['coverage_eti'][-1]:.3f} "
              f"(band {band[0]:.3f}-{band[1]:.3f}); TARP ATC {m['tarp']['atc']:+.3f}; SBC p flux "
              f"{m['sbc']['pvalues']['flux']:.3g}, ring diameter {m['sbc']['pvalues']['ring_diameter']:.3g}")
    document = {**extra, "results": out}
    (args.out / "metrics.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out / 'metrics.json'}")
    return document


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    folder = args.out / "problems"
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    prior = pretrained(args.config.prior, t0=args.config.t0)
    k, n = args.shard
    for index in range(args.n_problems):
        path = folder / f"{index}.pt"
        if args.report_only or index % n != k or path.exists():
            continue
        result = run_problem(index, prior, args)
        atomic_save(result, path)
        print(f"problem {index}: fit {result['seconds']:.0f} s, final loss {result['final_loss']:.1f}", flush=True)
    done = [folder / f"{i}.pt" for i in range(args.n_problems) if (folder / f"{i}.pt").exists()]
    if len(done) < args.n_problems and not args.report_only:
        print(f"{len(done)} of {args.n_problems} problems done; the report waits for the rest")
        return None
    return report(args, [torch.load(path, weights_only=True) for path in done])


if __name__ == "__main__":
    main()
