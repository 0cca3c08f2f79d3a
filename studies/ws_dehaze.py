"""Whitened-score (WS) prior vs a conventional VP prior for dehazing and deblurring + dehazing.

Data: 32 x 32 grey patches (pixel values in [0, 1]) of scikit-image's bundled photographs, downscaled 2x
(`scoreprior.data.natural_patches`); training patches from camera, astronaut, coffee and chelsea (and
their mirror images), test patches from rocket (a held-apart image).
Priors: two UNets of the same size, trained the same number of steps on CPU with `train_score_model`:
  ws  WS diffusion (`ws_loss`) with Gaussian low-pass noise of width 3 px (the paper's demo kernel) mixed
      with a small white part, `WSProcess({"type": "gaussian", "width": 3, "white": WHITE})`;
  vp  the ordinary VP-SDE with `dsm_loss`.
Measurements: haze ~ N(0, sigma^2 K K^T) with K the WS prior's Gaussian low-pass of width 3 px without the
white part (`Haze`, sigma = HAZE: haze pixel std about 0.19), on the image (dehaze) or after a 1 px Gaussian
blur (deblur_dehaze).
Reconstructions, one sample per test image, clipped to [0, 1] before scoring:
  ws_auto   `ws_sample` (reverse-SDE variant, normalised data step) with lam="auto" (discrepancy principle);
            the probability flow (Algorithm 1) amplifies the errors of briefly trained nets (tests/test_ws.py);
  ws_best   the same with the grid value of lam of best mean PSNR over the test set (an oracle);
  vp_dps    `scoreprior.samplers.dps` with the VP prior (zeta = 1);
  vp_ws     the VP prior run through `ws_sample` as a WS model with K = I, lam="auto".

    OMP_NUM_THREADS=1 python studies/ws_dehaze.py --out runs/ws_dehaze
    OMP_NUM_THREADS=1 python studies/ws_dehaze.py --out /tmp/wsd --quick   # tiny nets, 4 images, ~2 min

Writes metrics.json, results.md and ws_dehaze.png into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from scoreprior.data import natural_patches
from scoreprior.diagnostics import psnr, ssim
from scoreprior.nets import UNet
from scoreprior.operators import GaussianBlur
from scoreprior.samplers import dps
from scoreprior.sde import VPSDE
from scoreprior.training import NoisePredictionScore, TrainConfig, train_score_model
from scoreprior.ws import Haze, WhitenedScore, WSProcess, gaussian_spectrum, ws_loss, ws_sample

TRAIN_IMAGES = ("camera", "astronaut", "coffee", "chelsea")
TEST_IMAGE = "rocket"
SIZE = 32
WIDTH, WHITE = 3.0, 0.05
HAZE = 2.0
BLUR = 1.0
METHODS = ("ws_auto", "ws_best", "vp_dps", "vp_ws")
LABELS = {"ws_auto": "WS, auto λ", "ws_best": "WS, best λ (oracle)", "vp_dps": "VP + DPS",
          "vp_ws": "VP + WS sampler, auto λ"}

SETTINGS = {
    "quick": dict(channels=(8, 16), train_steps=150, batch_size=32, n_train=512, n_test=4, steps=50,
                  dps_steps=50, lam_grid=(0.1, 0.5, 2.0)),
    "full": dict(channels=(16, 32), train_steps=2000, batch_size=32, n_train=2048, n_test=16, steps=200,
                 dps_steps=200, lam_grid=(0.1, 0.3, 1.0, 3.0)),
}


def train(process, data_: torch.Tensor, s: dict, seed: int, loss_fn=None) -> tuple[UNet, dict]:
    torch.manual_seed(seed)
    net = UNet(1, channels=s["channels"], groups=8)
    config = TrainConfig(steps=s["train_steps"], batch_size=s["batch_size"], lr=2e-3, warmup=50, ema_decay=0.99,
                         seed=seed)
    result = train_score_model(net, process, data_, config, progress=False, loss_fn=loss_fn)
    result.ema.copy_to(net)
    net.eval().requires_grad_(False)
    first = sum(result.loss_history[:20]) / min(20, len(result.loss_history))
    return net, {"first_loss": first, "final_loss": result.final_loss, "wall_s": result.wall_time}


def reconstruct(method: str, models: dict, lik, seed: int, s: dict, lam=None) -> torch.Tensor:
    """One reconstruction (1, 1, SIZE, SIZE) of the measurement in `lik`, clipped to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, SIZE, SIZE)
    if method == "vp_dps":
        x = dps(models["vp_score"], VPSDE(), lik, 1, shape, steps=s["dps_steps"], generator=g, progress=False)
    else:
        model, process = models["ws"] if method.startswith("ws") else models["vp_as_ws"]
        x = ws_sample(model, process, 1, shape, likelihood=lik, lam="auto" if lam is None else lam,
                      steps=s["steps"], method="sde", auto_grid=s["lam_grid"], auto_n=1, generator=g,
                      progress=False)
    return x.clamp(0, 1)


def scores(x: torch.Tensor, truth: torch.Tensor) -> dict:
    p, q = psnr(x, truth), ssim(x, truth)
    return {"psnr": p.tolist(), "ssim": q.tolist(), "psnr_mean": float(p.mean()), "psnr_std": float(p.std()),
            "ssim_mean": float(q.mean()), "ssim_std": float(q.std())}


def figure(truth, measured: dict, recon: dict, path: Path) -> None:
    tasks = list(measured)
    cols = ["truth", "y", *METHODS]
    fig = Figure(figsize=(2 * len(cols), 2 * 2 * len(tasks)))
    axes = fig.subplots(2 * len(tasks), len(cols), squeeze=False)
    for ti, task in enumerate(tasks):
        for k in range(2):
            row = axes[2 * ti + k]
            panels = [truth[k], measured[task][k], *(recon[task][m][k] for m in METHODS)]
            for ax, img, name in zip(row, panels, cols):
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([]), ax.set_yticks([])
                if k == 0:
                    ax.set_title(f"{task}\n{LABELS.get(name, name)}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny nets, few steps, 4 test images (~2 min)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    s = SETTINGS["quick" if args.quick else "full"]
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed)
    train_data = natural_patches(s["n_train"], SIZE, images=TRAIN_IMAGES, generator=g)
    train_data = torch.cat([train_data, train_data.flip(-1)])
    truth = natural_patches(s["n_test"], SIZE, images=(TEST_IMAGE,), split="test", generator=g)

    process = WSProcess({"type": "gaussian", "size": [SIZE, SIZE], "width": WIDTH, "white": WHITE})
    ws_net, ws_train = train(process, train_data, s, args.seed,
                             loss_fn=lambda net, x0, g: ws_loss(net, process, x0, generator=g))
    vp_net, vp_train = train(VPSDE(), train_data, s, args.seed)
    identity = WSProcess(torch.ones(SIZE, SIZE, dtype=torch.float64))
    models = {"ws": (WhitenedScore(ws_net, process), process), "vp_score": NoisePredictionScore(vp_net, VPSDE()),
              "vp_as_ws": (WhitenedScore(vp_net, identity), identity)}

    haze_spectrum = gaussian_spectrum((SIZE, SIZE), WIDTH)
    tasks = {"dehaze": Haze(haze_spectrum, HAZE), "deblur_dehaze": Haze(haze_spectrum, HAZE, GaussianBlur(BLUR))}
    results, measured, recon = {}, {}, {}
    for task, haze in tasks.items():
        g = torch.Generator().manual_seed(args.seed + 1)
        ys = haze.sample(truth.double(), generator=g).float()
        liks = [haze.likelihood(ys[i : i + 1]) for i in range(len(ys))]
        measured[task] = ys.clamp(0, 1)
        out = {"measurement": scores(measured[task], truth)}
        task_recon = {}
        sweep = {}
        for lam in s["lam_grid"]:
            x = torch.cat([reconstruct("ws_best", models, lik, args.seed + i, s, lam) for i, lik in enumerate(liks)])
            sweep[lam] = (x, scores(x, truth))
        best = max(sweep, key=lambda lam: sweep[lam][1]["psnr_mean"])
        task_recon["ws_best"], out["ws_best"] = sweep[best][0], {**sweep[best][1], "lam": best}
        out["ws_lambda_sweep"] = {str(lam): {k: v for k, v in r[1].items() if k.endswith(("mean", "std"))}
                                  for lam, r in sweep.items()}
        for method in ("ws_auto", "vp_dps", "vp_ws"):
            t = time.perf_counter()
            x = torch.cat([reconstruct(method, models, lik, args.seed + i, s) for i, lik in enumerate(liks)])
            task_recon[method] = x
            out[method] = {**scores(x, truth), "wall_s": time.perf_counter() - t}
        results[task], recon[task] = out, task_recon
        print(f"{task}: " + ", ".join(f"{m} {out[m]['psnr_mean']:.2f} dB" for m in ("measurement", *METHODS)))

    figure(truth, measured, recon, args.out / "ws_dehaze.png")
    metrics = {
        "mode": "quick" if args.quick else "full", "seed": args.seed, "settings": {k: list(v) if isinstance(v, tuple)
                                                                                    else v for k, v in s.items()},
        "problem": {"size": SIZE, "train_images": TRAIN_IMAGES, "test_image": TEST_IMAGE, "ws_width": WIDTH,
                    "ws_white": WHITE, "haze_sigma": HAZE, "blur_sigma": BLUR},
        "training": {"ws": ws_train, "vp": vp_train}, "results": results,
        "wall_s": time.perf_counter() - start, "torch": torch.__version__, "python": platform.python_version(),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    lines = ["| task | method | PSNR (dB) | SSIM |", "|---|---|---|---|"]
    for task, out in results.items():
        for m in ("measurement", *METHODS):
            r = out[m]
            label = LABELS.get(m, m) + (f" (λ = {r['lam']})" if "lam" in r else "")
            lines.append(f"| {task} | {label} | {r['psnr_mean']:.2f} ± {r['psnr_std']:.2f} | "
                         f"{r['ssim_mean']:.3f} ± {r['ssim_std']:.3f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out / 'metrics.json'}, {args.out / 'results.md'}, {args.out / 'ws_dehaze.png'} "
          f"in {metrics['wall_s']:.0f} s")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
