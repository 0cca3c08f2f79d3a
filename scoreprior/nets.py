"""Neural score networks called as `net(x, t) -> shaped like x`, with t: (B,) times in [0, 1].

Nothing here knows about SDEs or noise schedules. Every network treats each sample on its own
(GroupNorm, never BatchNorm), has no in-place updates, no `.item()` and no data-dependent
control flow, so `torch.func.vmap` over `torch.func.vjp` / `torch.func.jvp` gives exact
Jacobian-vector products and double backward works for the adjoint method. Attention is written
as an explicit matmul + softmax because fused attention kernels are not twice differentiable.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scoreprior._checks import batch_shape, choice, integer, number, positive_int

__all__ = ["FourierEmbedding", "SinusoidalEmbedding", "UNet", "MLP", "build_net", "register_net"]

# Fixed seed for the random Fourier frequencies: two nets built from one config are identical
# before training, whatever the global RNG state.
_FOURIER_SEED = 0


def _even(value: object, name: str) -> int:
    """An even integer >= 2: an embedding size, half sines and half cosines."""
    value = integer(value, name, low=2)
    if value % 2:
        raise ValueError(f"{name}: expected an even integer >= 2, got {value}")
    return value


class FourierEmbedding(nn.Module):
    """Random Fourier features of time (Tancik et al., NeurIPS 2020; Song et al., ICLR 2021).

    emb(t) = [sin(2 pi t w), cos(2 pi t w)], w ~ N(0, scale^2) drawn once from a fixed seed and
    stored as a (non-trainable) buffer.

    dim: even embedding size; scale: standard deviation of the frequencies w.
    Call: t (B,) -> (B, dim).
    """

    def __init__(self, dim: int, *, scale: float = 16.0):
        super().__init__()
        dim = _even(dim, "dim")
        generator = torch.Generator().manual_seed(_FOURIER_SEED)
        self.register_buffer("freqs", torch.randn(dim // 2, generator=generator) * scale)

    def forward(self, t: Tensor) -> Tensor:
        angles = 2 * math.pi * t[:, None] * self.freqs
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class SinusoidalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of time (Vaswani et al., 2017; Ho et al., NeurIPS 2020).

    emb(t) = [sin(1000 t f_k), cos(1000 t f_k)], f_k = max_period^(-k / (dim / 2)),
    k = 0 .. dim/2 - 1; the factor 1000 maps t in [0, 1] to the usual discrete step range.

    dim: even embedding size. Call: t (B,) -> (B, dim).
    """

    def __init__(self, dim: int, *, max_period: float = 10000.0):
        super().__init__()
        half = _even(dim, "dim") // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        angles = 1000.0 * t[:, None] * self.freqs
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


def _check_times(t: Tensor, x: Tensor) -> Tensor:
    """t as a (B,) tensor on x's device and dtype; raises ValueError naming t otherwise."""
    if not isinstance(t, Tensor):
        raise ValueError(f"t: expected a tensor of shape ({x.shape[0]},), got {type(t).__name__}")
    if t.shape != (x.shape[0],):
        raise ValueError(f"t: expected shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t.to(device=x.device, dtype=x.dtype)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between, plus a skip path."""

    def __init__(self, in_ch: int, out_ch: int, embed_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(embed_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class _Attention(nn.Module):
    """Single-head self-attention over the H*W positions of one sample; residual, zero-init proj."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)
        out = (v @ weights.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj(out)


class _Level(nn.Module):
    """Residual blocks at one resolution, each followed by attention when asked."""

    def __init__(self, in_ch: int, out_ch: int, n: int, embed_dim: int, groups: int,
                 dropout: float, attention: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            _ResBlock(in_ch if i == 0 else out_ch, out_ch, embed_dim, groups, dropout)
            for i in range(n)
        )
        self.attns = nn.ModuleList(
            _Attention(out_ch, groups) if attention else nn.Identity() for _ in range(n)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for block, attn in zip(self.blocks, self.attns):
            x = attn(block(x, emb))
        return x


class UNet(nn.Module):
    """Compact time-conditioned U-Net score network for images (Ronneberger 2015; Ho et al. 2020).

    Level i works at resolution (H / 2^i, W / 2^i) with channels[i] channels. The encoder keeps one
    skip connection per level and downsamples with stride-2 convs; a middle block sits at the
    lowest resolution; the decoder concatenates the skips and upsamples with nearest + conv. The
    time embedding (Fourier or sinusoidal, then an MLP) is added inside every residual block. The
    final conv is zero-initialised, so an untrained net returns zeros.

    in_channels: C of the (B, C, H, W) input.
    channels: channels per level; each divisible by `groups`. H and W must be divisible by
        2^(len(channels) - 1).
    num_res_blocks: residual blocks per level (encoder and decoder).
    attention_levels: level indices (into `channels`) that get self-attention after each block;
        meant for low resolutions, attention costs (H W)^2 per sample.
    groups: GroupNorm groups.
    embed_dim: time-embedding width; default 4 * channels[0].
    time_embedding: "fourier" (random Fourier features) or "transformer" (sinusoidal).
    fourier_scale: standard deviation of the Fourier frequencies.
    dropout: dropout rate inside residual blocks; use 0 or eval mode for exact divergences.

    Call: x (B, C, H, W), t (B,) in [0, 1] -> (B, C, H, W).
    """

    def __init__(
        self,
        in_channels: int = 1,
        *,
        channels: tuple[int, ...] = (32, 64),
        num_res_blocks: int = 1,
        attention_levels: tuple[int, ...] = (),
        groups: int = 8,
        embed_dim: int | None = None,
        time_embedding: str = "fourier",
        fourier_scale: float = 16.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        attention_levels = tuple(int(i) for i in attention_levels)
        in_channels, groups = positive_int(in_channels, "in_channels"), positive_int(groups, "groups")
        if not channels or any(c < 1 or c % groups for c in channels):
            raise ValueError(
                f"channels: expected a non-empty tuple of positive multiples of groups={groups}, "
                f"got {channels}"
            )
        num_res_blocks = positive_int(num_res_blocks, "num_res_blocks")
        if any(not 0 <= i < len(channels) for i in attention_levels):
            raise ValueError(
                f"attention_levels: expected indices in [0, {len(channels)}), "
                f"got {attention_levels}"
            )
        choice(time_embedding, "time_embedding", ("fourier", "transformer"))
        number(dropout, "dropout", low=0.0, high=1.0, low_open=False, high_open=True)
        embed_dim = _even(4 * channels[0] if embed_dim is None else embed_dim, "embed_dim")

        self._config = {
            "kind": "UNet",
            "in_channels": in_channels,
            "channels": list(channels),
            "num_res_blocks": num_res_blocks,
            "attention_levels": list(attention_levels),
            "groups": groups,
            "embed_dim": embed_dim,
            "time_embedding": time_embedding,
            "fourier_scale": fourier_scale,
            "dropout": dropout,
        }
        self.in_channels = in_channels
        self.factor = 2 ** (len(channels) - 1)

        if time_embedding == "fourier":
            embedding = FourierEmbedding(embed_dim, scale=fourier_scale)
        else:
            embedding = SinusoidalEmbedding(embed_dim)
        self.time_embed = nn.Sequential(
            embedding, nn.Linear(embed_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim)
        )

        def level(i: int, in_ch: int) -> _Level:
            return _Level(in_ch, channels[i], num_res_blocks, embed_dim, groups, dropout,
                          i in attention_levels)

        last = len(channels) - 1
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down = nn.ModuleList(level(i, channels[max(i - 1, 0)]) for i in range(len(channels)))
        self.downsample = nn.ModuleList(
            nn.Conv2d(c, c, 3, stride=2, padding=1) for c in channels[:-1]
        )
        self.middle = level(last, channels[last])
        # Decoder input at every level: the upsampled features concatenated with the level's skip.
        self.up = nn.ModuleList(level(i, 2 * channels[i]) for i in range(len(channels)))
        self.upsample = nn.ModuleList(
            nn.Conv2d(channels[i], channels[i - 1], 3, padding=1) for i in range(1, len(channels))
        )
        self.norm_out = nn.GroupNorm(groups, channels[0])
        self.conv_out = nn.Conv2d(channels[0], in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x: expected shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(
                f"x: expected H and W divisible by {self.factor}, got shape {tuple(x.shape)}"
            )
        emb = self.time_embed(_check_times(t, x))

        h = self.conv_in(x)
        skips = []
        for i, level in enumerate(self.down):
            h = level(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.middle(h, emb)
        for i in reversed(range(len(self.up))):
            h = self.up[i](torch.cat([h, skips[i]], dim=1), emb)
            if i > 0:
                h = self.upsample[i - 1](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))

    def config(self) -> dict:
        """Constructor arguments as a JSON-serialisable dict, "kind": "UNet"; see `build_net`."""
        return copy.deepcopy(self._config)


class MLP(nn.Module):
    """Time-conditioned MLP score network for vectors.

    h_0 = x; h_{l+1} = SiLU(W_l h_l + P_l e(t)) for l < depth; out = W_out h_depth (zero-init),
    with e(t) = SiLU(Linear(FourierEmbedding(t))).

    dim: size of the vectors; hidden: hidden width; depth: number of hidden layers;
    embed_dim: even time-embedding width; fourier_scale: std of the Fourier frequencies.

    Call: x (B, dim), t (B,) in [0, 1] -> (B, dim).
    """

    def __init__(
        self,
        dim: int,
        *,
        hidden: int = 256,
        depth: int = 3,
        embed_dim: int = 64,
        fourier_scale: float = 16.0,
    ):
        super().__init__()
        dim, hidden, depth = positive_int(dim, "dim"), positive_int(hidden, "hidden"), positive_int(depth, "depth")
        embed_dim = _even(embed_dim, "embed_dim")
        self._config = {
            "kind": "MLP",
            "dim": dim,
            "hidden": hidden,
            "depth": depth,
            "embed_dim": embed_dim,
            "fourier_scale": fourier_scale,
        }
        self.dim = dim
        self.time_embed = nn.Sequential(
            FourierEmbedding(embed_dim, scale=fourier_scale),
            nn.Linear(embed_dim, embed_dim),
            nn.SiLU(),
        )
        self.layers = nn.ModuleList(
            nn.Linear(dim if i == 0 else hidden, hidden) for i in range(depth)
        )
        self.time_proj = nn.ModuleList(nn.Linear(embed_dim, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        batch_shape(x, "x", (self.dim,))
        emb = self.time_embed(_check_times(t, x))
        h = x
        for layer, proj in zip(self.layers, self.time_proj):
            h = F.silu(layer(h) + proj(emb))
        return self.out(h)

    def config(self) -> dict:
        """Constructor arguments as a JSON-serialisable dict with "kind": "MLP"; see `build_net`."""
        return copy.deepcopy(self._config)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_net(kind: str, builder: Callable[..., nn.Module]) -> None:
    """Let `build_net` rebuild configs whose "kind" is `kind`: builder(**config without "kind") -> network.

    For networks defined in modules that know more than this one, e.g. `scoreprior.training.GaussianResidualNet`.
    """
    _BUILDERS[kind] = builder


def build_net(config: dict) -> nn.Module:
    """Rebuild a network from its `config()` dict (e.g. read back from JSON).

    config: {"kind": "UNet" | "MLP" | a kind registered with `register_net`, **constructor arguments}.
    Returns a freshly initialised network; load a state_dict into it to restore trained weights.
    """
    kwargs = dict(config)
    kind = kwargs.pop("kind", None)
    if kind == "UNet":
        for key in ("channels", "attention_levels"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return UNet(**kwargs)
    if kind == "MLP":
        return MLP(**kwargs)
    if kind in _BUILDERS:
        return _BUILDERS[kind](**kwargs)
    raise ValueError(f"config: expected kind 'UNet', 'MLP' or one of {sorted(_BUILDERS)}, got {kind!r}")
