"""Tests for scoreprior/nets.py: shapes, batch independence, functorch and double-backward
compatibility, config round trips, time conditioning and input validation."""

import json

import pytest
import torch
from torch.func import jacrev, jvp, vjp, vmap

from scoreprior.nets import MLP, UNet, build_net


def perturbed(net: torch.nn.Module, *, scale: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """The net with every parameter shifted by seeded noise, so zero-initialised layers matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return net


def tiny_unet(**kwargs) -> UNet:
    options = dict(channels=(4, 8), groups=2, embed_dim=8, attention_levels=(1,))
    options.update(kwargs)
    return perturbed(UNet(1, **options)).double()


def tiny_mlp() -> MLP:
    return perturbed(MLP(3, hidden=16, depth=2, embed_dim=8)).double()


def inputs(shape: tuple[int, ...], *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    t = torch.rand(shape[0], generator=generator, dtype=torch.float64)
    return x, t


@pytest.mark.parametrize(
    "in_channels, options, size",
    [
        (1, dict(), (16, 16)),
        (1, dict(), (32, 32)),
        (3, dict(channels=(8,), groups=4), (5, 7)),
        (2, dict(channels=(8, 16, 16), groups=4, attention_levels=(2,)), (8, 12)),
        (1, dict(channels=(8, 16), groups=4, attention_levels=(0, 1), num_res_blocks=2), (8, 6)),
        (1, dict(channels=(8, 16), groups=4, time_embedding="transformer"), (12, 12)),
        (1, dict(channels=(8, 16), groups=4, dropout=0.1, embed_dim=16), (4, 4)),
    ],
)
def test_unet_output_shape(in_channels, options, size):
    x = torch.randn(3, in_channels, *size)
    assert UNet(in_channels, **options)(x, torch.rand(3)).shape == x.shape


def test_mlp_output_shape():
    x = torch.randn(5, 7)
    assert MLP(7, hidden=32, depth=1)(x, torch.rand(5)).shape == (5, 7)


@pytest.mark.parametrize("net", [UNet(1, channels=(8, 16), groups=4), MLP(4)])
def test_untrained_output_is_zero(net):
    x = torch.randn(2, 1, 8, 8) if isinstance(net, UNet) else torch.randn(2, 4)
    assert torch.equal(net(x, torch.rand(2)), torch.zeros_like(x))


def test_default_unet_is_compact():
    assert sum(p.numel() for p in UNet().parameters()) < 500_000


@pytest.mark.parametrize("make, shape", [(tiny_unet, (3, 1, 2, 4)), (tiny_mlp, (3, 3))])
def test_samples_are_independent(make, shape):
    net = make()
    x, t = inputs(shape)
    jac = jacrev(lambda x: net(x, t))(x).reshape(shape[0], -1, shape[0], x[0].numel())
    for b in range(shape[0]):
        for c in range(shape[0]):
            block = jac[b, :, c]
            if b == c:
                assert block.abs().max() > 0
            else:
                assert torch.equal(block, torch.zeros_like(block))


# torch 2.13's forward-mode AD scripts its decompositions with torch.jit.script on first use, which warns
# from inside torch; the filter keeps `-W error::DeprecationWarning` (the check of our own calls) usable.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("make, shape", [(tiny_unet, (2, 1, 4, 4)), (tiny_mlp, (2, 3))])
def test_exact_trace_by_vmap_matches_full_jacobian(make, shape):
    net = make()
    x, t = inputs(shape)
    n = x[0].numel()

    def f(x):
        return net(x, t)

    # One basis vector per event dimension, set in every sample at once: valid because samples
    # are independent, and how the package computes exact per-sample divergences.
    basis = torch.eye(n, dtype=x.dtype).reshape(n, 1, *shape[1:]).expand(n, *shape)
    _, pullback = vjp(f, x)
    rows = vmap(pullback)(basis)[0]
    trace_vjp = torch.einsum("nb...,nb...->b", rows, basis)
    cols = vmap(lambda v: jvp(f, (x,), (v,))[1])(basis)
    trace_jvp = torch.einsum("nb...,nb...->b", cols, basis)

    jac = jacrev(f)(x).reshape(shape[0], n, shape[0], n)
    trace_full = torch.stack([jac[b, :, b].diagonal().sum() for b in range(shape[0])])
    torch.testing.assert_close(trace_vjp, trace_full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(trace_jvp, trace_full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make, shape", [(tiny_unet, (1, 1, 4, 4)), (tiny_mlp, (2, 3))])
def test_input_gradients(make, shape):
    net = make()
    x, t = inputs(shape)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: net(x, t), (x,))
    assert torch.autograd.gradgradcheck(lambda x: net(x, t), (x,))


def test_time_gradient():
    net = tiny_unet(time_embedding="transformer")
    x, t = inputs((2, 1, 4, 4))
    t = (0.01 * t).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: net(x, t), (t,))


def test_gradient_of_exact_divergence():
    """Double backward through vmap(vjp), as the adjoint method needs, checked numerically."""
    net = tiny_unet()
    x, t = inputs((1, 1, 4, 4))
    basis = torch.eye(16, dtype=x.dtype).reshape(16, 1, 1, 4, 4)

    def divergence(x):
        _, pullback = vjp(lambda x: net(x, t), x)
        return torch.einsum("nb...,nb...->b", vmap(pullback)(basis)[0], basis)

    x.requires_grad_(True)
    assert torch.autograd.gradcheck(divergence, (x,))
    (grad64,) = torch.autograd.grad(divergence(x).sum(), x)

    net.float()
    x32 = x.detach().float().requires_grad_(True)
    _, pullback = vjp(lambda x: net(x, t.float()), x32)
    div32 = torch.einsum("nb...,nb...->b", vmap(pullback)(basis.float())[0], basis.float())
    (grad32,) = torch.autograd.grad(div32.sum(), x32)
    assert grad32.dtype == torch.float32
    torch.testing.assert_close(grad32.double(), grad64, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "net",
    [
        UNet(2, channels=(8, 16), groups=4, attention_levels=(1,), time_embedding="transformer"),
        UNet(1, channels=(8, 16, 16), groups=4, num_res_blocks=2, embed_dim=12),
        MLP(5, hidden=32, depth=2, embed_dim=16, fourier_scale=4.0),
    ],
)
def test_config_round_trip(net):
    perturbed(net)
    config = json.loads(json.dumps(net.config()))
    rebuilt = build_net(config)
    assert rebuilt.config() == net.config()
    rebuilt.load_state_dict(net.state_dict())
    shape = (3, *((5,) if isinstance(net, MLP) else (net.in_channels, 8, 8)))
    x, t = inputs(shape)
    x, t = x.float(), t.float()
    assert torch.equal(rebuilt(x, t), net(x, t))


def test_fourier_features_are_reproducible():
    torch.manual_seed(1)
    a = UNet(1, channels=(8,), groups=4)
    torch.manual_seed(2)
    b = UNet(1, channels=(8,), groups=4)
    assert torch.equal(a.time_embed[0].freqs, b.time_embed[0].freqs)
    assert not any(name.endswith("freqs") for name, _ in a.named_parameters())


@pytest.mark.parametrize(
    "net, shape",
    [
        (UNet(1, channels=(8, 16), groups=4), (1, 1, 8, 8)),
        (UNet(1, channels=(8, 16), groups=4, time_embedding="transformer"), (1, 1, 8, 8)),
        (MLP(3, hidden=16), (1, 3)),
    ],
)
def test_time_conditions_the_output(net, shape):
    perturbed(net)
    x = torch.randn(shape).expand(3, *shape[1:])
    out = net(x, torch.tensor([0.1, 0.5, 0.9]))
    assert (out[0] - out[1]).abs().max() > 1e-3
    assert (out[1] - out[2]).abs().max() > 1e-3


def test_dtype_follows_input():
    net = UNet(1, channels=(8, 16), groups=4).double()
    assert net.time_embed[0].freqs.dtype == torch.float64
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    assert net(x, torch.rand(2)).dtype == torch.float64


def test_dropout_is_off_in_eval_mode():
    net = perturbed(UNet(1, channels=(8, 16), groups=4, dropout=0.5)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    assert torch.equal(net(x, t), net(x, t))


@pytest.mark.parametrize(
    "x_shape, t_shape, name",
    [
        ((2, 8, 8), (2,), "x:"),
        ((2, 3, 8, 8), (2,), "x:"),
        ((2, 1, 8, 6), (2,), "divisible by 4"),
        ((2, 1, 8, 8), (3,), "t:"),
        ((2, 1, 8, 8), (2, 1), "t:"),
    ],
)
def test_unet_rejects_bad_shapes(x_shape, t_shape, name):
    net = UNet(1, channels=(8, 8, 8), groups=4)
    with pytest.raises(ValueError, match=name):
        net(torch.randn(x_shape), torch.rand(t_shape))


@pytest.mark.parametrize("x_shape, t_shape, name", [((2, 4), (2,), "x:"), ((2, 3), (), "t:")])
def test_mlp_rejects_bad_shapes(x_shape, t_shape, name):
    with pytest.raises(ValueError, match=name):
        MLP(3)(torch.randn(x_shape), torch.rand(t_shape))


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: UNet(1, channels=(6,), groups=4), "channels"),
        (lambda: UNet(1, channels=(8,), groups=0), "groups"),
        (lambda: UNet(1, channels=(8,), groups=4, attention_levels=(1,)), "attention_levels"),
        (lambda: UNet(1, channels=(8,), groups=4, time_embedding="learned"), "time_embedding"),
        (lambda: UNet(1, channels=(8,), groups=4, embed_dim=7), "embed_dim"),
        (lambda: MLP(3, depth=0), "depth"),
        (lambda: build_net({"kind": "Transformer"}), "config"),
    ],
)
def test_rejects_bad_options(make, name):
    with pytest.raises(ValueError, match=name):
        make()
