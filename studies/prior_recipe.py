"""What each change of the training recipe brings, at one budget, one seed, one run each (issue 15).

Starting from the recipe of the priors shipped before issue 15 (`train_priors.RECIPE_2026_11`: times
uniform in t, a plain U-Net, constant learning rate, EMA 0.998), the changes of `train_priors.RECIPE` are
added one at a time:
  1. likelihood weighting by importance sampling (times uniform in log(s / a), `dsm_loss`);
  2. the U-Net as a residual on the Wiener denoiser of the training set's Gaussian (`GaussianResidualNet`);
and two more variants of the resulting recipe: with cosine learning-rate decay and EMA decay 0.999 (measured
no gain, not kept), and without change 1, to tell what likelihood weighting does once the base is there.
Each variant is trained from the same initialisation and data for --steps steps on two problems, and scored
on held-out data by a number that cannot flatter it:
  gaussian-16   the score-matching bound on the KL divergence, in nats, against the exact score of the
                Gaussian (`GaussianScore`): J = 1/2 int_{t0}^{1} g^2 E|s_theta - grad log p_t|^2 dt
                = (tau(1) - tau(t0)) E_tau E|eps_theta - eps*|^2 with tau = log(s / a) uniform
                (4096 draws, stratified in tau; t0 = 1e-3). J = 0 for the exact score; with the data's
                Gaussian as a prior, KL(p_data || p_theta) <= J + (terminal mismatch, ~1e-4 nats here).
                Reported too: J of the training set's fitted Gaussian alone, the floor that 20,000 draws
                allow (covariance estimation error, about d^2 / (4 n) = 0.8 nats).
  blackhole-32  the test-set evidence lower bound (`SurrogatePrior`, t0 = 1e-3, 16 stratified times,
                importance sampling) in bits/dim on 512 held-out crescents (higher is better; a bound on
                log phat), and the two-sample KS p-values of diameter, width, position angle and flux
                (`ring_features`, `prior_density.ring_checks`) of 256 prior samples (Euler-Maruyama, 300 steps) against 1000 draws.

    OMP_NUM_THREADS=1 python studies/prior_recipe.py --out runs/prior_recipe               # about 25 min
    OMP_NUM_THREADS=1 python studies/prior_recipe.py --out runs/prior_recipe --only gaussian-16
    OMP_NUM_THREADS=1 python studies/prior_recipe.py --out /tmp/pr --quick                 # a minute

Runs resume: variants already scored at --steps in --out/metrics.json are skipped, training resumes from
--out/checkpoints; metrics.json is rewritten after every variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_priors import (RECIPE, RECIPE_2026_11, SPECS, build_model, datasets, study_arguments, train_model,  # noqa: E402
                          validated_floor, write_json)

from prior_density import ring_checks  # noqa: E402

from scoreprior.data import pca_gaussian, sample_gaussian  # noqa: E402
from scoreprior.samplers import Run, sample_prior  # noqa: E402
from scoreprior.scores import GaussianScore  # noqa: E402
from scoreprior.sde import VPSDE  # noqa: E402
from scoreprior.surrogate import SurrogatePrior  # noqa: E402
from scoreprior.noise_prediction import NoisePredictionScore  # noqa: E402

T0 = 1e-3
GAUSSIAN_ALONE = "the training set's Gaussian alone (no network)"
VARIANTS = {
    "shipped before issue 15": RECIPE_2026_11,
    "+ likelihood weighting": dataclasses.replace(RECIPE_2026_11, time_sampling="likelihood"),
    "+ Gaussian base (= RECIPE)": RECIPE,
    "RECIPE + cosine lr, EMA 0.999 (not kept)": dataclasses.replace(RECIPE, lr_schedule="cosine", ema_decay=0.999),
    "RECIPE without likelihood weighting": dataclasses.replace(RECIPE, time_sampling="uniform"),
}


def kl_bound(net: torch.nn.Module, sde: VPSDE, n: int, seed: int) -> dict:
    """J of the module docstring on n stratified draws, with its standard error, against pca_gaussian(16)."""
    mean, cov = pca_gaussian(16)
    truth = GaussianScore(mean, cov, sde)
    gen = torch.Generator().manual_seed(seed)
    x0 = sample_gaussian(mean, cov, n, generator=gen)
    u = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=gen, dtype=torch.float64)) / n
    t, span = sde.times_uniform_in_log_noise_ratio(u, T0)
    z = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    xt = sde.perturb(x0, t, z)
    _, s = sde.marginal(t)
    with torch.no_grad():
        eps = torch.cat([net(xb.float(), tb.float()).double() for xb, tb in zip(xt.split(256), t.split(256))])
    best = -truth(xt, t) * s[:, None, None, None]
    terms = float(span) * (eps - best).pow(2).reshape(n, -1).sum(1)
    return {"kl_bound_nats": float(terms.mean()), "kl_bound_se": float(terms.std() / math.sqrt(n)), "n": n}


def blackhole_scores(net: torch.nn.Module, sde: VPSDE, test: torch.Tensor, n_samples: int, n_reference: int,
                     seed: int) -> dict:
    """Test ELBO in bits/dim and KS p-values of ring features of prior samples against generator draws."""
    score = NoisePredictionScore(net, sde, event_shape=tuple(test.shape[1:]))
    elbo = SurrogatePrior(score, sde, t0=T0, n_time_samples=16)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bound = torch.cat([elbo.log_prob(x, generator=gen) for x in test.split(64)])
        samples = sample_prior(score, sde, n_samples, tuple(test.shape[1:]), steps=300,
                               run=Run(time_grid="uniform", t0=T0, generator=gen, progress=False))
    d = test[0].numel()
    checks, _, _ = ring_checks(samples, n_reference, gen)
    return {"elbo_bits_per_dim": float(bound.mean() / (d * math.log(2))),
            "elbo_bits_per_dim_se": float(bound.std() / math.sqrt(len(bound)) / (d * math.log(2))),
            "min_pixel": float(samples.min()), **checks}


def run_problem(name: str, args: argparse.Namespace, results: dict, path: Path) -> None:
    """Train every variant on one problem and score it; results[name][variant] filled, metrics.json rewritten."""
    spec = SPECS[name]
    n = 512 if args.quick else spec.n
    train, test, provenance = datasets(spec, n, 16 if args.quick else 512, args.seed)
    sde = VPSDE(0.1, 20.0)
    if name == "gaussian-16":
        # The floor of J at this training set: its fitted Gaussian alone (an untrained residual is zero).
        alone = build_model(RECIPE, train, sde, validated_floor(train))
        results.setdefault(name, {})[GAUSSIAN_ALONE] = kl_bound(alone, sde, 64 if args.quick else 4096, args.seed + 7)
    for label, recipe in VARIANTS.items():
        if results.get(name, {}).get(label, {}).get("steps") == args.steps:
            continue  # scored by an earlier run with this budget
        tag = "".join(c if c.isalnum() else "-" for c in label).strip("-")
        checkpoint = args.out / "checkpoints" / f"{name}-{tag}.pt"
        start = time.perf_counter()
        net, info = train_model(recipe, train, args.steps, spec.batch_size, args.seed, checkpoint, provenance,
                                progress=False)
        net.load_state_dict(torch.load(checkpoint, weights_only=True)["ema"]["shadow"])
        net.eval()
        if name == "gaussian-16":
            score = kl_bound(net, sde, 64 if args.quick else 4096, args.seed + 7)
        else:
            score = blackhole_scores(net, sde, test, 16 if args.quick else 256, 64 if args.quick else 1000,
                                     args.seed + 7)
        results.setdefault(name, {})[label] = {**info, **score, "steps": args.steps, "batch_size": spec.batch_size,
                                               "total_s": round(time.perf_counter() - start, 1)}
        print(f"{name} | {label}: {json.dumps(score)}", flush=True)
        write_json(results, path)


def main(argv: list[str] | None = None) -> int:
    parser = study_arguments(__doc__, "20 steps, tiny scores", "seeds data, initialisation, batches and scores",
                             ["gaussian-16", "blackhole-32"])
    parser.add_argument("--steps", type=int, default=None, help="training steps per variant (default 1500)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (20 if args.quick else 1500)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "metrics.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.update({"python": platform.python_version(), "torch": torch.__version__, "quick": args.quick,
                    "variants": {label: dataclasses.asdict(r) for label, r in VARIANTS.items()}})
    for name in args.only or ("gaussian-16", "blackhole-32"):
        run_problem(name, args, results, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
