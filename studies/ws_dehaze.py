"""Whitened-score (WS) prior vs a conventional VP prior for dehazing and deblurring + dehazing.

Data: 32 x 32 grey patches (pixel values in [0, 1]) of scikit-image's bundled photographs, downscaled 2x
(`scoreprior.data.natural_patches`); training patches from camera, astronaut, coffee and chelsea (and
their mirror images); two test sets from held-apart images: rocket, and coins (a second set nothing was
tuned on), test split, 16 patches each.
Priors: two UNets of the same size, trained the same number of steps on CPU with `train_score_model`
(checkpointed every 250 steps, resumable; `--train-only ws|vp` trains one, so the two can run in parallel):
  ws  WS diffusion (`ws_loss`) with Gaussian low-pass noise of width 3 px (the paper's demo kernel) mixed
      with a small white part, `WSProcess({"type": "gaussian", "width": 3, "white": WHITE})`;
  vp  the ordinary VP-SDE with `dsm_loss`.
Measurements: haze ~ N(0, sigma^2 K K^T) with K the WS prior's Gaussian low-pass of width 3 px without the
white part (`Haze`, sigma = HAZE: haze pixel std about 0.19), on the image (dehaze) or after a 1 px Gaussian
blur (deblur_dehaze).
Reconstructions, `draws` posterior draws per test image, clipped to [0, 1] before scoring; PSNR / SSIM of single
draws and of the draws' mean, mean ± standard error over the images; calibration: the fraction of pixels whose
truth lies within the range of the draws ((n - 1) / (n + 1) for a calibrated posterior):
  ws        `ws_sample` with the training patches' `power_spectrum`: the covariance data step and the ancestral
            sampler (its defaults then), λ = 1 (Bayes' rule: nothing tuned), `steps` steps;
  ws_auto   the same with lam="auto": the discrepancy principle over λ in {1, grid} (`choose_lambda`, pilot runs
            of steps / 4 counted in the evaluations);
  ws_best   the same at the grid value of λ with the best PSNR over the test set (an oracle);
  vp        the VP prior through the same sampler and data step (a WS model with K = I): the prior compared
            alone;
  vp_dps    `scoreprior.samplers.dps` with the VP prior (ζ = 1);
  ws_fast / ws_long   `ws` with `fast_steps` (100 network evaluations with the final Tweedie step) /
            `long_steps` (1001); ws_fast_uniform: ws_fast on a time grid uniform in t instead of log(s / a).
Score-ALD is not run: its annealed likelihood needs white noise of one std (`score_ald` refuses haze).

    OMP_NUM_THREADS=1 python studies/ws_dehaze.py --out runs/ws_dehaze --train-only ws &   # the priors,
    OMP_NUM_THREADS=1 python studies/ws_dehaze.py --out runs/ws_dehaze --train-only vp &   # in parallel
    OMP_NUM_THREADS=1 python studies/ws_dehaze.py --out runs/ws_dehaze                     # loads them
    (or --checkpoints runs/ws_dehaze --out runs/wsd_rocket --sets rocket, and coins, in two processes)
    OMP_NUM_THREADS=1 python studies/ws_dehaze.py --out /tmp/wsd --quick   # tiny nets, 3 images per set

Writes metrics.json, results.md and ws_dehaze.png into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from matplotlib.figure import Figure

from scoreprior.data import natural_patches
from scoreprior.metrics import psnr, ssim
from scoreprior.nets import UNet
from scoreprior.operators import GaussianBlur
from scoreprior.samplers import Run, dps
from scoreprior.samplers.engine import CountedScore
from scoreprior.sde import VPSDE
from scoreprior.noise_prediction import NoisePredictionScore
from scoreprior.training import TrainConfig, train_score_model
from scoreprior.ws import (
    AutoLambda, Haze, WhitenedScore, WSProcess, gaussian_spectrum, power_spectrum, ws_loss, ws_sample,
)

TRAIN_IMAGES = ("camera", "astronaut", "coffee", "chelsea")
TEST_SETS = ("rocket", "coins")
SIZE = 32
WIDTH, WHITE = 3.0, 0.05
HAZE = 2.0
BLUR = 1.0
METHODS = ("ws", "ws_auto", "ws_best", "vp", "vp_dps", "ws_fast", "ws_fast_uniform", "ws_long")
LABELS = {"ws": "WS, covariance step, λ = 1", "ws_auto": "WS, covariance step, λ = auto",
          "ws_best": "WS, covariance step, best λ (oracle)",
          "vp": "VP, covariance step, λ = 1", "vp_dps": "VP + DPS (ζ = 1)", "ws_fast": "WS, λ = 1, fast",
          "ws_fast_uniform": "WS, λ = 1, fast, uniform time grid", "ws_long": "WS, λ = 1, long"}

SETTINGS = {
    "quick": dict(channels=(8, 16), train_steps=150, ema_decay=0.99, batch_size=32, n_train=512, n_test=3, draws=2,
                  steps=50, fast_steps=24, long_steps=100, dps_steps=50, lam_grid=(0.5, 2.0)),
    "full": dict(channels=(16, 32), train_steps=6000, ema_decay=0.999, batch_size=32, n_train=2048, n_test=16,
                 draws=8, steps=200, fast_steps=99, long_steps=1000, dps_steps=200, lam_grid=(0.25, 0.5, 2.0, 4.0)),
}


def train(process, data_: torch.Tensor, s: dict, seed: int, checkpoint: Path, loss_fn=None) -> tuple[UNet, dict]:
    """Train (or resume from / load) the prior at `checkpoint`; returns the EMA net in eval mode."""
    torch.manual_seed(seed)
    net = UNet(1, channels=s["channels"], groups=8)
    config = TrainConfig(steps=s["train_steps"], batch_size=s["batch_size"], lr=2e-3, warmup=50,
                         ema_decay=s["ema_decay"], seed=seed, checkpoint_every=250, lr_schedule="cosine")
    result = train_score_model(net, process, data_, config, checkpoint=checkpoint, progress=False, loss_fn=loss_fn)
    result.ema.copy_to(net)
    net.eval().requires_grad_(False)
    first = sum(result.loss_history[:20]) / min(20, len(result.loss_history))
    return net, {"first_loss": first, "final_loss": result.final_loss, "wall_s": result.wall_time}


def reconstruct(method: str, models: dict, lik, seed: int, s: dict, lam: float = 1.0) -> tuple[torch.Tensor, int]:
    """`s["draws"]` posterior draws (draws, 1, SIZE, SIZE) for the measurement in `lik`, clipped to [0, 1], and the
    network evaluations they took (counted, pilot runs of lam="auto" included)."""
    run = Run(generator=torch.Generator().manual_seed(seed), progress=False)
    shape = (1, SIZE, SIZE)
    if method == "vp_dps":
        score = CountedScore(models["vp_score"])
        x = dps(score, VPSDE(), lik, s["draws"], shape, steps=s["dps_steps"], run=run)
        return x.clamp(0, 1), score.calls
    steps = {"ws_fast": s["fast_steps"], "ws_fast_uniform": s["fast_steps"], "ws_long": s["long_steps"]}.get(
        method, s["steps"])
    model, process = models["vp_as_ws"] if method == "vp" else models["ws"]
    model = CountedScore(model)
    if method == "ws_auto":
        lam = AutoLambda(grid=(1.0, *s["lam_grid"]), n=s["draws"])
    if method == "ws_fast_uniform":
        run = replace(run, time_grid="uniform")
    x = ws_sample(model, process, s["draws"], shape, likelihood=lik, lam=lam, prior_spectrum=models["spectrum"],
                  steps=steps, run=run)
    return x.clamp(0, 1), model.calls


def scores(draws: list[torch.Tensor], truth: torch.Tensor) -> dict:
    """PSNR / SSIM per image of single draws (averaged over draws) and of the draws' mean; means and standard
    errors over images; with n > 1 draws, the fraction of pixels whose truth lies within the draws' range, which
    is (n - 1) / (n + 1) for a calibrated posterior (truth and draws exchangeable), less for an over-confident
    one. draws: one (n, 1, H, W) tensor per image; truth: (images, 1, H, W)."""
    out = {}
    for kind in ("draw", "mean"):
        x = [d if kind == "draw" else d.mean(0, keepdim=True) for d in draws]
        for name, metric in (("psnr", psnr), ("ssim", ssim)):
            per_image = torch.stack([metric(xi, truth[i : i + 1].expand_as(xi)).mean() for i, xi in enumerate(x)])
            out[f"{name}_{kind}"] = float(per_image.mean())
            out[f"{name}_{kind}_se"] = float(per_image.std() / len(per_image) ** 0.5)
            out[f"{name}_{kind}_per_image"] = per_image.tolist()
    n = draws[0].shape[0]
    if n > 1:
        inside = torch.stack([((d.amin(0) <= truth[i]) & (truth[i] <= d.amax(0))).double().mean()
                              for i, d in enumerate(draws)])
        out["range_coverage"], out["range_coverage_expected"] = float(inside.mean()), (n - 1) / (n + 1)
    return out


def figure(truths: dict, measured: dict, recon: dict, path: Path) -> None:
    """Per test set and task, two images: truth, measurement and the first draw of each method."""
    cols = ["truth", "y", *METHODS]
    rows = [(name, task, k) for name in measured for task in measured[name] for k in range(2)]
    fig = Figure(figsize=(1.6 * len(cols), 1.7 * len(rows)))
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    for r, (row, (name, task, k)) in enumerate(zip(axes, rows)):
        panels = [truths[name][k], measured[name][task][k], *(recon[name][task][m][k][0] for m in METHODS)]
        for ax, img, col in zip(row, panels, cols):
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if col == "truth":
                ax.set_ylabel(f"{name}\n{task}", fontsize=7)
            if r == 0:
                ax.set_title(LABELS.get(col, col), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def evaluate(models: dict, truth: torch.Tensor, haze: Haze, s: dict, seed: int) -> tuple[dict, torch.Tensor, dict]:
    """Every method on the hazy measurements of `truth`: (results, clipped measurements, draws per method)."""
    ys = haze.sample(truth.double(), generator=torch.Generator().manual_seed(seed + 1)).float()
    liks = [haze.likelihood(ys[i : i + 1]) for i in range(len(ys))]
    measured = ys.clamp(0, 1)
    out = {"measurement": scores([m[None] for m in measured], truth)}
    draws, runs = {}, {}
    for method in ("ws", "ws_auto", "vp", "vp_dps", "ws_fast", "ws_fast_uniform", "ws_long"):
        start = time.perf_counter()
        runs[method] = [reconstruct(method, models, lik, seed + i, s) for i, lik in enumerate(liks)]
        draws[method] = [x for x, _ in runs[method]]
        out[method] = {**scores(draws[method], truth), "evaluations": runs[method][0][1],
                       "seconds_per_image": (time.perf_counter() - start) / len(liks)}
    sweep = {1.0: (draws["ws"], out["ws"])}
    for lam in s["lam_grid"]:
        x = [reconstruct("ws", models, lik, seed + i, s, lam)[0] for i, lik in enumerate(liks)]
        sweep[lam] = (x, scores(x, truth))
    best = max(sweep, key=lambda lam: sweep[lam][1]["psnr_draw"])
    draws["ws_best"], out["ws_best"] = sweep[best][0], {**sweep[best][1], "lam": best,
                                                        "evaluations": out["ws"]["evaluations"],
                                                        "seconds_per_image": out["ws"]["seconds_per_image"]}
    out["lambda_sweep"] = {str(lam): {k: v for k, v in r[1].items() if not k.endswith("per_image")}
                           for lam, r in sorted(sweep.items())}
    return out, measured, draws


def table(results: dict) -> list[str]:
    lines = ["| test set | task | method | PSNR draw (dB) | PSNR mean of draws | SSIM draw | truth in draws' range | "
             "network evaluations | s / image |", "|---|---|---|---|---|---|---|---|---|"]
    for name, tasks in results.items():
        for task, out in tasks.items():
            for m in ("measurement", *METHODS):
                r = out[m]
                label = LABELS.get(m, m) + (f" (λ = {r['lam']:g})" if "lam" in r else "")
                cost = f"{r['evaluations']} | {r['seconds_per_image']:.1f}" if "evaluations" in r else " | "
                coverage = (f"{r['range_coverage']:.1%} (calibrated {r['range_coverage_expected']:.1%})"
                            if "range_coverage" in r else "")
                lines.append(f"| {name} | {task} | {label} | {r['psnr_draw']:.2f} ± {r['psnr_draw_se']:.2f} | "
                             f"{r['psnr_mean']:.2f} ± {r['psnr_mean_se']:.2f} | {r['ssim_draw']:.3f} ± "
                             f"{r['ssim_draw_se']:.3f} | {coverage} | {cost} |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny nets, few steps, 3 test images per set (~2 min)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoints", type=Path, help="folder of the priors' checkpoints ws.pt and vp.pt "
                        "(default --out); training resumes from them, or is skipped when they are complete")
    parser.add_argument("--sets", nargs="+", choices=TEST_SETS, default=list(TEST_SETS),
                        help="test sets to run (one per process runs them in parallel; the priors are shared)")
    parser.add_argument("--train-only", choices=("ws", "vp"), help="train (or resume) one prior and stop (run the "
                        "two in parallel processes, then the study loads them)")
    args = parser.parse_args(argv)
    s = SETTINGS["quick" if args.quick else "full"]
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed)
    train_data = natural_patches(s["n_train"], SIZE, images=TRAIN_IMAGES, generator=g)
    train_data = torch.cat([train_data, train_data.flip(-1)])
    truths = {name: natural_patches(s["n_test"], SIZE, images=(name,), split="test", generator=g) for name in TEST_SETS}
    truths = {name: truths[name] for name in args.sets}

    process = WSProcess({"type": "gaussian", "size": [SIZE, SIZE], "width": WIDTH, "white": WHITE})
    checkpoints = args.checkpoints or args.out
    checkpoints.mkdir(parents=True, exist_ok=True)
    if args.train_only in ("ws", "vp"):
        loss_fn = (lambda net, x0, g: ws_loss(net, process, x0, generator=g)) if args.train_only == "ws" else None
        _, record = train(process if args.train_only == "ws" else VPSDE(), train_data, s, args.seed,
                          checkpoints / f"{args.train_only}.pt", loss_fn=loss_fn)
        return {"training": {args.train_only: record}}
    ws_net, ws_train = train(process, train_data, s, args.seed, checkpoints / "ws.pt",
                             loss_fn=lambda net, x0, g: ws_loss(net, process, x0, generator=g))
    vp_net, vp_train = train(VPSDE(), train_data, s, args.seed, checkpoints / "vp.pt")
    identity = WSProcess(torch.ones(SIZE, SIZE, dtype=torch.float64))
    models = {"ws": (WhitenedScore(ws_net, process), process), "vp_score": NoisePredictionScore(vp_net, VPSDE()),
              "vp_as_ws": (WhitenedScore(vp_net, identity), identity), "spectrum": power_spectrum(train_data)}

    haze_spectrum = gaussian_spectrum((SIZE, SIZE), WIDTH)
    tasks = {"dehaze": Haze(haze_spectrum, HAZE), "deblur_dehaze": Haze(haze_spectrum, HAZE, GaussianBlur(BLUR))}
    results, measured, recon = {}, {}, {}
    for name, truth in truths.items():
        results[name], measured[name], recon[name] = {}, {}, {}
        for task, haze in tasks.items():
            out, measured[name][task], recon[name][task] = evaluate(models, truth, haze, s, args.seed)
            results[name][task] = out
            print(f"{name} {task}: " + ", ".join(f"{m} {out[m]['psnr_draw']:.2f}" for m in ("measurement", *METHODS)),
                  flush=True)

    figure(truths, measured, recon, args.out / "ws_dehaze.png")
    metrics = {
        "mode": "quick" if args.quick else "full", "seed": args.seed, "settings": {k: list(v) if isinstance(v, tuple)
                                                                                    else v for k, v in s.items()},
        "problem": {"size": SIZE, "train_images": TRAIN_IMAGES, "test_sets": list(truths), "ws_width": WIDTH,
                    "ws_white": WHITE, "haze_sigma": HAZE, "blur_sigma": BLUR},
        "training": {"ws": ws_train, "vp": vp_train}, "results": results,
        "wall_s": time.perf_counter() - start, "torch": torch.__version__, "python": platform.python_version(),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    lines = table(results)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out / 'metrics.json'}, {args.out / 'results.md'}, {args.out / 'ws_dehaze.png'} "
          f"in {metrics['wall_s']:.0f} s")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
