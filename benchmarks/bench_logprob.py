"""Cost of ScorePrior.log_prob relative to the score network it calls.

For each image size: the score of a Gaussian random field (`scoreprior.data.gaussian_field`) plus an
untrained U-Net noise-prediction score. The U-Net's final layer is zero-initialised, so it adds nothing
to the score but all of its cost: the flow, and so the NFE, are those of a well-trained prior of that
data, and the timings those of a network of this size. On a batch of field samples:
- unit: median time of one batched score forward + VJP (what one Hutchinson evaluation needs);
- Hutchinson solves (dopri5): NFE, seconds per image, overhead ratio = wall / (NFE x unit);
- exact divergence: the cost of one evaluation (a one-step Euler solve, NFE = 1) in units of
  d x unit ("jvp-equivalents": d basis vectors, each a forward + VJP), and a full exact solve where
  d is small enough (--exact-solve-max).
Targets (issue 2): Hutchinson overhead <= 1.3; exact evaluation <= 1.5 d jvp-equivalents.

    python benchmarks/bench_logprob.py [--sizes 8,16,32] [--batch 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import scoreprior  # noqa: F401  (first: it sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)
import torch

from common import write_json
from scoreprior import GaussianScore, ODEOptions, ScorePrior, VPSDE
from scoreprior.data import gaussian_field, sample_gaussian
from scoreprior.nets import UNet
from scoreprior.noise_prediction import NoisePredictionScore


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _FieldPlusNet(torch.nn.Module):
    """score(x, t) = Gaussian-field score + untrained U-Net noise-prediction score (zero output)."""

    def __init__(self, size: int):
        super().__init__()
        sde = VPSDE()
        mean, cov = gaussian_field(size, size, dtype=torch.float32)
        self.field = GaussianScore(mean, cov, sde)
        self.net = NoisePredictionScore(UNet(1, channels=(32, 64)).eval().requires_grad_(False), sde)
        self.sde = sde
        self.event_shape = torch.Size((1, size, size))

    def forward(self, x, t):
        return self.field(x, t) + self.net(x, t)


def bench_size(size: int, batch: int, repeats: int, exact_solve_max: int, t0: float, tol: float) -> list[dict]:
    score = _FieldPlusNet(size)
    prior = ScorePrior(score, score.sde, t0=t0)
    x = sample_gaussian(score.field.mean, score.field.cov, batch, generator=torch.Generator().manual_seed(0))
    d = x[0].numel()
    t = torch.full((batch,), 0.5)
    probe = torch.randn_like(x).sign()

    def forward_vjp():
        _, vjp_fn = torch.func.vjp(lambda z: score(z, t), x)
        vjp_fn(probe)

    unit = _median_time(forward_vjp, repeats)
    rows = []

    def solve(divergence: str, n_probes: int = 1):
        options = ODEOptions(solver="adaptive", divergence=divergence, n_probes=n_probes, rtol=tol, atol=tol)
        start = time.perf_counter()
        _, stats = prior.log_prob(x, options, return_stats=True, generator=torch.Generator().manual_seed(1))
        return time.perf_counter() - start, stats["nfe"]

    for n_probes in (1, 4):
        wall, nfe = solve("hutchinson", n_probes)
        rows.append({
            "size": f"{size}x{size}", "d": d, "divergence": f"hutchinson({n_probes})", "nfe": nfe,
            "s_per_image": wall / batch, "overhead_ratio": wall / (nfe * unit), "unit_s": unit,
        })
    euler = ODEOptions(solver="adaptive", divergence="exact", method="euler")  # one step: one evaluation
    one_eval = _median_time(lambda: prior.log_prob(x, euler), max(1, repeats // 2))
    row = {
        "size": f"{size}x{size}", "d": d, "divergence": "exact", "unit_s": unit,
        "exact_eval_in_d_units": one_eval / (d * unit),
    }
    if d <= exact_solve_max:
        wall, nfe = solve("exact")
        row.update(nfe=nfe, s_per_image=wall / batch, overhead_ratio=wall / (nfe * unit))
    rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="8,16,32", help="comma-separated image sizes")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--exact-solve-max", type=int, default=64, help="largest d with a full exact solve")
    parser.add_argument("--t0", type=float, default=1e-3)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"batch {args.batch}, rtol=atol={args.tol}, t0={args.t0}")
    print(f"{'size':>6} {'divergence':>14} {'NFE':>5} {'s/image':>9} {'overhead':>9} {'exact eval/(d unit)':>20}",
          flush=True)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for r in bench_size(size, args.batch, args.repeats, args.exact_solve_max, args.t0, args.tol):
            fmt = lambda key, spec: format(r[key], spec) if key in r else "-"
            print(f"{r['size']:>6} {r['divergence']:>14} {fmt('nfe', 'd'):>5} {fmt('s_per_image', '.3f'):>9} "
                  f"{fmt('overhead_ratio', '.2f'):>9} {fmt('exact_eval_in_d_units', '.3f'):>20}", flush=True)
            rows.append(r)
    write_json(args.json, args, rows)
    return rows


if __name__ == "__main__":
    main()
