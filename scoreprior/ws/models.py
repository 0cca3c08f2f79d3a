"""Whitened-score networks and their training loss: `WhitenedScore`, `WidthConditionedNet`, `ws_loss`.

A network predicts the structured noise K z of x_t = a x_0 + s K z; the whitened score is
n(x, t) = -beta(t) net(x, t) / s(t) (the maths is in the `scoreprior.ws` docstring).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from scoreprior._checks import choice, number
from scoreprior.checkpoints import load_checkpoint
from scoreprior.nets import build_net
from scoreprior.noise_prediction import NoisePredictionScore
from scoreprior.sde import batch_times, per_sample, sde_from_config
from scoreprior.ws.process import WSProcess

__all__ = ["WhitenedScore", "WidthConditionedNet", "build_ws_net", "load_ws_model", "ws_loss"]


class WhitenedScore(nn.Module):
    """The whitened score of a network trained by `ws_loss`: n(x, t) = -beta(t) net(x, t) / s(t).

    net predicts the structured noise K z of x_t = a x_0 + s K z. process: its `WSProcess`.
    Call: x (B, C, H, W), t scalar or (B,) -> (B, C, H, W).
    """

    def __init__(self, net: nn.Module, process: WSProcess):
        super().__init__()
        self.noise_score = NoisePredictionScore(net, process)
        self.process = process

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = batch_times(t, x)
        return per_sample(self.process.beta(t), x) * self.noise_score(x, t)


class WidthConditionedNet(nn.Module):
    """A network conditioned on the Gaussian noise width w through an extra constant input channel.

    net: a network for C + 1 channels (e.g. UNet(C + 1, ...)) called net(x, t); its input gets the channel
    (w - lo) / (hi - lo), and its first C output channels are returned. widths: (lo, hi) training range in
    pixels; width: the width used when called without one (sampling), default the midpoint.
    Call: x (B, C, H, W), t (B,), optional width -> (B, C, H, W).
    """

    def __init__(self, net: nn.Module, *, widths: tuple[float, float], width: float | None = None):
        super().__init__()
        lo, hi = (number(w, "widths", low=0.0) for w in widths)
        if not lo < hi:
            raise ValueError(f"widths: expected lo < hi, got {widths}")
        self.net, self.widths = net, (lo, hi)
        self.width = 0.5 * (lo + hi) if width is None else number(width, "width", low=0.0)

    def forward(self, x: Tensor, t: Tensor, width: float | None = None) -> Tensor:
        lo, hi = self.widths
        w = self.width if width is None else width
        level = x.new_full((x.shape[0], 1, *x.shape[2:]), (w - lo) / (hi - lo))
        return self.net(torch.cat([x, level], dim=1), t)[:, : x.shape[1]]

    def config(self) -> dict:
        """{"kind": "WidthConditionedNet", "net": inner config, "widths", "width"}; see `build_ws_net`."""
        return {"kind": "WidthConditionedNet", "net": self.net.config(), "widths": list(self.widths),
                "width": self.width}


def build_ws_net(config: dict) -> nn.Module:
    """Rebuild a network from its `config()`: `WidthConditionedNet` here, anything else by `build_net`."""
    if config.get("kind") == "WidthConditionedNet":
        return WidthConditionedNet(build_ws_net(config["net"]), widths=tuple(config["widths"]), width=config["width"])
    return build_net(config)


def load_ws_model(path: str | Path, *, use_ema: bool = True, device: torch.device | str | None = None,
                  width: float | None = None) -> WhitenedScore:
    """The trained whitened score of a checkpoint written by `train_score_model` with `ws_loss`.

    Network rebuilt by `build_ws_net` with the EMA (or raw) weights, eval mode, gradients off; width: for a
    `WidthConditionedNet`, the noise width to sample with (the process is rebuilt with that width).
    Returns WhitenedScore(net, process); the process is `model.process`.
    """
    checkpoint = load_checkpoint(path)
    process = sde_from_config(checkpoint["sde_config"])
    if not isinstance(process, WSProcess):
        raise ValueError(f"checkpoint {path}: expected a WSProcess checkpoint, got {checkpoint['sde_config']['kind']}")
    net = build_ws_net(checkpoint["net_config"])
    net.load_state_dict(checkpoint["ema"]["shadow"] if use_ema else checkpoint["net"])
    net.to(device if device is not None else "cpu").eval().requires_grad_(False)
    if width is not None:
        if not isinstance(net, WidthConditionedNet):
            raise ValueError(f"width: the checkpoint's net is not width-conditioned ({type(net).__name__})")
        net.width = number(width, "width", low=0.0)
        process = process.with_width(width)
    return WhitenedScore(net, process)


def ws_loss(
    net: Callable[..., Tensor],
    process: WSProcess,
    x0: Tensor,
    *,
    generator: torch.Generator | None = None,
    eps: float = 1e-5,
    widths: tuple[float, float] | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Whitened-score matching loss, structured-noise prediction form (Alido et al. 2025).

    t ~ U(eps, 1), z ~ N(0, I), x_t = a x_0 + s K z, and
        loss = E ||net(x_t, t) - K z||^2 / (d mean(kappa^2)),
    minimised by net = E[K z | x_t], i.e. by WhitenedScore(net) = -beta E[K z | x_t] / s = the whitened
    score beta K K^T grad log p_t (the regression target of n is -beta K z / s). Dividing by the mean noise
    power keeps the loss O(1) for any K; with K = I it is `dsm_loss` exactly (same draws).
    Usable as `train_score_model(..., loss_fn=lambda net, x0, g: ws_loss(net, process, x0, generator=g))`.

    net: net(x, t) -> (B, C, H, W) (called net(x, t, width=w) when `widths` is given);
    x0: (B, C, H, W) clean images; generator: draws w, t and z; eps: smallest time;
    widths: (lo, hi): per batch draw w ~ U(lo, hi), noise from process.with_width(w) (random-spectrum
        training of a `WidthConditionedNet`); reduction: "mean" or "none" ((B,) per-sample losses).
    """
    process.check_images(x0, "x0")
    number(eps, "eps", low=0.0, high=1.0, low_open=False, high_open=True)
    choice(reduction, "reduction", ("mean", "none"))
    kwargs = {}
    if widths is not None:
        lo, hi = widths
        u = float(torch.rand((), generator=generator, device=x0.device, dtype=torch.float64))
        kwargs["width"] = lo + (hi - lo) * u
        process = process.with_width(kwargs["width"])
    b = x0.shape[0]
    t = eps + (1.0 - eps) * torch.rand(b, generator=generator, device=x0.device, dtype=x0.dtype)
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    kz = process.apply_K(z)
    xt = process.vp.perturb(x0, t, kz)
    power = float(process.spectrum.pow(2).mean())
    losses = (net(xt, t, **kwargs) - kz).pow(2).reshape(b, -1).mean(1) / power
    return losses.mean() if reduction == "mean" else losses
