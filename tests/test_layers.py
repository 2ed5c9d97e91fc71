"""Invertible layers (revgrad.blocks.layers): round trips, logdet against a float64 numerical Jacobian,
gradients through revgrad.reversible against plain autograd, ActNorm's data-dependent init,
Lipschitz bounds against the Jacobian's singular values, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import TOL, assert_rel_close, plain_chain, scalar_loss
from torch import nn

import revgrad
from revgrad.blocks.layers import ActNorm, InvertibleConv1x1, Reverse, Shuffle, Squeeze
from revgrad.engine.protocol import BlockError


def _randomized(layer: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb a layer's parameters away from their init (ActNorm: marked initialized)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    if isinstance(layer, ActNorm):
        layer.initialized.fill_(1)
        layer._initialized_host = True
    return layer


# Factories take the channel count; every layer is given its parameters off their initial values.
LAYERS = {
    "actnorm": lambda c: _randomized(ActNorm(c)),
    "conv1x1": lambda c: _randomized(InvertibleConv1x1(c)),
    "conv1x1-lu": lambda c: _randomized(InvertibleConv1x1(c, lu=True)),
    "shuffle": lambda c: Shuffle(c, seed=3),
    "reverse": lambda c: Reverse(),
    "squeeze": lambda c: Squeeze(2),
}
CHANNEL_WISE = [k for k in LAYERS if k != "squeeze"]
SHAPES = {"3x5x6x4": (3, 5, 6, 4), "3x5": (3, 5), "3x5x7": (3, 5, 7)}


def _make(name: str, channels: int, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(1)
    return LAYERS[name](channels).to(dtype)


def _y(out):
    return out[0] if isinstance(out, tuple) else out


def _shape_cases():
    for name in LAYERS:
        for sid, shape in SHAPES.items():
            if name == "squeeze" and len(shape) != 4:
                continue
            yield pytest.param(name, shape, id=f"{name}-{sid}")


@pytest.mark.parametrize(("name", "shape"), list(_shape_cases()))
def test_round_trip(name, shape):
    layer = _make(name, shape[1])
    x = torch.randn(shape, dtype=torch.float64)
    y = _y(layer(x))
    assert_rel_close(layer.inverse(y), x, 1e-12, name="inverse(forward(x))")
    assert_rel_close(_y(layer(layer.inverse(y))), y, 1e-12, name="forward(inverse(y))")
    if name == "squeeze":
        assert y.shape == (3, 20, 3, 2)
    else:
        assert y.shape == x.shape


def _numerical_logdets(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``log|det dy/dx|`` per sample, from the float64 Jacobian of the flattened forward."""
    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: _y(layer(v[None])).flatten(), xi)
        jac = jac.reshape(jac.shape[0], -1)
        assert jac.shape[0] == jac.shape[1]
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


LOGDET_CASES = [pytest.param(n, (2, 3, 2, 4), id=f"{n}-2x3x2x4") for n in LAYERS] + [
    pytest.param(n, (2, 3), id=f"{n}-2x3") for n in CHANNEL_WISE
]


@pytest.mark.parametrize(("name", "shape"), LOGDET_CASES)
def test_logdet_matches_numerical_jacobian(name, shape):
    layer = _make(name, shape[1])
    x = torch.randn(shape, dtype=torch.float64)
    out = layer(x)
    expected = _numerical_logdets(layer, x)
    if isinstance(out, tuple):
        assert out[1].shape == (shape[0],)
        assert_rel_close(out[1], expected, 1e-10, name="logdet")
    else:  # volume-preserving layers return y only
        assert name in ("shuffle", "reverse", "squeeze")
        assert torch.allclose(expected, torch.zeros_like(expected), atol=1e-12)


@pytest.mark.parametrize("name", list(LAYERS))
def test_lipschitz_bounds_match_jacobian_singular_values(name):
    layer = _make(name, 3)
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: _y(layer(v)).flatten(), x).reshape(12, 12)
    sv = torch.linalg.svdvals(jac)  # every layer here is linear in x: J is the whole map
    fwd, inv = layer.lipschitz_bounds()
    assert isinstance(fwd, float) and isinstance(inv, float)
    assert fwd == pytest.approx(sv.max().item(), rel=1e-12)
    assert inv == pytest.approx(1.0 / sv.min().item(), rel=1e-12)
    if name in ("shuffle", "reverse", "squeeze"):
        assert (fwd, inv) == (1.0, 1.0)


def test_lipschitz_bounds_from_parameters():
    an = _make("actnorm", 4)
    s = an.log_scale.detach().exp()
    assert an.lipschitz_bounds() == pytest.approx((s.max().item(), 1.0 / s.min().item()), rel=1e-12)
    for lu in (False, True):
        conv = _randomized(InvertibleConv1x1(4, lu=lu)).double()
        sv = torch.linalg.svdvals(conv.matrix().detach())
        assert conv.lipschitz_bounds() == pytest.approx((sv[0].item(), 1.0 / sv[-1].item()), rel=1e-12)


def test_lu_conv_starts_orthogonal_and_logdet_is_sum_log_s():
    torch.manual_seed(0)
    for lu in (False, True):
        w = InvertibleConv1x1(5, lu=lu).double().matrix().detach()
        assert_rel_close(w @ w.T, torch.eye(5, dtype=torch.float64), 1e-6, name=f"W W^T (lu={lu})")
    conv = _randomized(InvertibleConv1x1(5, lu=True)).double()
    assert_rel_close(conv.log_abs_det(), torch.linalg.slogdet(conv.matrix())[1], 1e-12, name="log|det W|")
    names = {n for n, _ in conv.named_buffers()}
    assert names == {"perm", "sign_s"}


# --------------------------------------------------------------------------------------------------
# Gradients through revgrad.reversible against plain autograd.


def _chain_4d(c: int) -> list[nn.Module]:
    """ActNorm (fresh: initialized on the first forward) and every channel-wise layer, plus couplings."""
    c1, c2 = c // 2, c - c // 2
    return [
        ActNorm(c),
        InvertibleConv1x1(c),
        revgrad.AffineCoupling(nn.Sequential(nn.Conv2d(c1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 2 * c2, 1))),
        Shuffle(c, seed=1),
        InvertibleConv1x1(c, lu=True),
        revgrad.AdditiveCoupling(nn.Conv2d(c2, c1, 3, padding=1), nn.Conv2d(c1, c2, 3, padding=1)),
        Reverse(),
    ]


def _chain_squeeze(c: int) -> list[nn.Module]:
    cs = 4 * c
    c1, c2 = cs // 2, cs - cs // 2
    return [
        ActNorm(c),
        Squeeze(2),
        InvertibleConv1x1(cs, lu=True),
        revgrad.AffineCoupling(nn.Sequential(nn.Conv2d(c1, 2 * c2, 3, padding=1)), scale="bounded"),
        ActNorm(cs),
        Shuffle(cs),
    ]


def _chain_flat(c: int) -> list[nn.Module]:
    c1, c2 = c // 2, c - c // 2
    return [
        ActNorm(c),
        InvertibleConv1x1(c, lu=True),
        revgrad.AffineCoupling(nn.Sequential(nn.Linear(c1, 16), nn.Tanh(), nn.Linear(16, 2 * c2)), scale="exp"),
        Reverse(),
        InvertibleConv1x1(c),
    ]


CHAINS = {
    "channelwise-3x5x6x4": (_chain_4d, (3, 5, 6, 4)),
    "squeeze-3x5x6x4": (_chain_squeeze, (3, 5, 6, 4)),
    "flat-3x5": (_chain_flat, (3, 5)),
}
DTYPES = {"fp64": torch.float64, "fp32": torch.float32}


@pytest.mark.parametrize("check", ["off", "detect", "correct"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("chain", list(CHAINS))
def test_gradients_match_plain_autograd(chain, dtype, check):
    make, shape = CHAINS[chain]
    torch.manual_seed(0)
    blocks = [b.to(dtype) for b in make(shape[1])]
    plain = copy.deepcopy(blocks)
    model = revgrad.reversible(blocks, check=check)
    x = torch.randn(shape, dtype=dtype) * 2.0 + 0.5
    xr, xp = x.clone().requires_grad_(), x.clone().requires_grad_()

    out_r, out_p = model(xr), plain_chain(plain, xp)
    after_forward = [p.detach().clone() for p in model.parameters()]
    scalar_loss(out_r).backward()
    scalar_loss(out_p).backward()

    assert_rel_close(out_r[0], out_p[0], name="y")
    assert_rel_close(out_r[1], out_p[1], name="logdet")
    assert_rel_close(xr.grad, xp.grad, name="grad x")
    for (n, pr), pp in zip(model.named_parameters(), (p for b in plain for p in b.parameters())):
        assert_rel_close(pr.grad, pp.grad, name=f"grad {n}")
    # backward replays each forward with the buffers as forward found them: ActNorm must not re-init
    for before, p in zip(after_forward, model.parameters()):
        assert torch.equal(before, p.detach())
    assert all(bool(m.initialized) for m in model.modules() if isinstance(m, ActNorm))


def test_gradients_second_step_match_plain_autograd():
    """After an optimizer step (initialized ActNorm, moved parameters) gradients still agree."""
    torch.manual_seed(0)
    blocks = _chain_4d(5)
    plain = copy.deepcopy(blocks)
    model = revgrad.reversible(blocks, check="detect")
    params_r = list(model.parameters())
    params_p = [p for b in plain for p in b.parameters()]
    for step in range(2):
        x = torch.randn(3, 5, 6, 4) + step
        xr, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        scalar_loss(model(xr)).backward()
        scalar_loss(plain_chain(plain, xp)).backward()
        assert_rel_close(xr.grad, xp.grad, TOL[torch.float32], name=f"grad x, step {step}")
        with torch.no_grad():  # plain SGD, lr 1e-3 (torch.optim's first step costs seconds of imports)
            for p in params_r + params_p:
                p -= 1e-3 * p.grad
                p.grad = None
    for pr, pp in zip(params_r, params_p):
        assert_rel_close(pr.detach(), pp.detach(), name="parameters after two steps")


# --------------------------------------------------------------------------------------------------
# ActNorm's data-dependent init.


def _channel_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0, *range(2, y.dim())]
    return y.mean(dim=dims), y.std(dim=dims, correction=0)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_actnorm_first_batch_is_normalized(shape):
    layer = ActNorm(shape[1]).double()
    assert not bool(layer.initialized)
    spread = torch.linspace(0.5, 3.0, shape[1], dtype=torch.float64).view(1, -1, *[1] * (len(shape) - 2))
    x = torch.randn(shape, dtype=torch.float64) * spread + 4.0
    y, logdet = layer(x)
    mean, std = _channel_stats(y)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-12)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-5)  # eps = 1e-6 in the denominator
    assert bool(layer.initialized)
    positions = x[0, 0].numel()
    assert_rel_close(logdet, (positions * layer.log_scale.sum()).expand(shape[0]), 1e-14, name="logdet")


def test_actnorm_second_call_does_not_reinit():
    layer = ActNorm(5).double()
    layer(torch.randn(3, 5, 6, 4, dtype=torch.float64) * 3 + 1)
    state = copy.deepcopy(layer.state_dict())
    y, _ = layer(torch.randn(3, 5, 6, 4, dtype=torch.float64) * 0.1 - 7)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert _channel_stats(y)[0].abs().min() > 1.0  # not normalized: the second batch did not re-init


def test_actnorm_eval_mode_does_not_init():
    layer = ActNorm(5).double().eval()
    x = torch.randn(3, 5, 6, 4, dtype=torch.float64)
    y, logdet = layer(x)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(3, dtype=torch.float64))
    assert not bool(layer.initialized)


def test_actnorm_state_dict_round_trip_keeps_it_initialized():
    layer = ActNorm(5).double()
    layer(torch.randn(3, 5, 6, 4, dtype=torch.float64) * 2 + 3)
    state = layer.state_dict()
    assert set(state) == {"bias", "log_scale", "initialized"}

    fresh = ActNorm(5).double()
    fresh.load_state_dict(state)
    assert bool(fresh.initialized)
    x = torch.randn(3, 5, 6, 4, dtype=torch.float64) - 5
    assert torch.equal(fresh(x)[0], layer(x)[0])
    assert torch.equal(fresh.bias, layer.bias) and torch.equal(fresh.log_scale, layer.log_scale)

    # and the other way: loading an uninitialized state makes the next training forward initialize
    layer.load_state_dict(ActNorm(5).double().state_dict())
    mean, _ = _channel_stats(layer(x)[0])
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Bad input: a BlockError that names the layer.

BAD = {
    "squeeze-odd-height": (lambda: Squeeze(2), "forward", (3, 4, 5, 4), r"Squeeze\(factor=2\).*\(3, 4, 5, 4\)"),
    "squeeze-odd-width": (lambda: Squeeze(2), "forward", (3, 4, 6, 3), r"Squeeze.*divisible by 2"),
    "squeeze-3d": (lambda: Squeeze(2), "forward", (3, 4, 6), r"Squeeze.*\[B, C, H, W\]"),
    "squeeze-inverse-channels": (lambda: Squeeze(2), "inverse", (3, 6, 2, 2), r"Squeeze.*divisible by 4"),
    "actnorm-channels": (lambda: ActNorm(5), "forward", (3, 4, 6, 4), r"ActNorm expects .*\[B, 5, \.\.\.\]"),
    "actnorm-inverse-channels": (lambda: ActNorm(5), "inverse", (3, 6), r"ActNorm .*\(3, 6\)"),
    "conv1x1-channels": (lambda: InvertibleConv1x1(5), "forward", (3, 4, 6, 4), r"InvertibleConv1x1 expects"),
    "conv1x1-lu-inverse-channels": (
        lambda: InvertibleConv1x1(5, lu=True), "inverse", (3, 4), r"InvertibleConv1x1 .*\[B, 5"),
    "shuffle-channels": (lambda: Shuffle(5), "forward", (3, 4, 2), r"Shuffle expects"),
    "shuffle-1d": (lambda: Shuffle(5), "forward", (5,), r"Shuffle expects"),
    "reverse-1d": (lambda: Reverse(), "inverse", (5,), r"Reverse flips dim 1"),
}


@pytest.mark.parametrize(("make", "method", "shape", "match"), list(BAD.values()), ids=list(BAD))
def test_bad_input_names_the_layer(make, method, shape, match):
    layer = make()
    state = copy.deepcopy(layer.state_dict())
    with pytest.raises(BlockError, match=match):
        getattr(layer, method)(torch.randn(shape))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed by a rejected input"


def test_bad_input_through_reversible_names_the_layer():
    model = revgrad.reversible([ActNorm(4), Squeeze(2)], check="detect")
    x = torch.randn(3, 4, 5, 4, requires_grad=True)
    with pytest.raises(BlockError, match=r"Squeeze"):
        model(x)


@pytest.mark.parametrize(
    "make",
    [lambda: ActNorm(0), lambda: InvertibleConv1x1(0), lambda: Shuffle(0), lambda: Squeeze(0), lambda: Squeeze(1.5)],
    ids=["actnorm-0", "conv1x1-0", "shuffle-0", "squeeze-0", "squeeze-1.5"],
)
def test_bad_arguments(make):
    with pytest.raises(ValueError, match="revgrad: "):
        make()


def test_shuffle_is_a_fixed_seeded_permutation():
    a, b, c = Shuffle(7, seed=0), Shuffle(7, seed=0), Shuffle(7, seed=1)
    assert torch.equal(a.perm, b.perm) and not torch.equal(a.perm, c.perm)
    assert sorted(a.perm.tolist()) == list(range(7))
    x = torch.arange(7.0).view(1, 7)
    assert torch.equal(a(x)[0], a.perm.to(x.dtype))
    assert torch.equal(Reverse()(x)[0], torch.arange(6.0, -1.0, -1.0))


def test_squeeze_layout():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = Squeeze(2)(x)
    # y[c*4 + i*2 + j, h, w] = x[c, 2h + i, 2w + j]
    assert torch.equal(y[0, 0], torch.tensor([[0.0, 2.0], [8.0, 10.0]]))
    assert torch.equal(y[0, 1], torch.tensor([[1.0, 3.0], [9.0, 11.0]]))
    assert torch.equal(y[0, 2], torch.tensor([[4.0, 6.0], [12.0, 14.0]]))
