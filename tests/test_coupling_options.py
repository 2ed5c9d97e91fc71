"""Couplings split any dimension, and the additive coupling scales its halves (MEFT's ``lambda``, ``beta``).

Every case compares with plain autograd on deep copies of the same blocks (``reference.TOL``), on the
engine's two-part path (CPU default for additive couplings), its one-tensor path (forced by a module
hook) and, where Triton runs, the kernels (``REVGRAD_KERNELS=triton`` under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from chains import assert_healthy, assert_unstable
from reference import TOL, assert_rel_close, scalar_loss
from torch import nn

import revgrad
from revgrad.ops import dispatch, fused

CHECKS = ["off", "detect", "correct"]


class Mix(nn.Module):
    """A sub-network for any layout: a linear map along ``dim`` (``c_in -> c_out``) and tanh."""

    def __init__(self, c_in: int, c_out: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.lin = nn.Linear(c_in, c_out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(h.movedim(self.dim, -1))).movedim(-1, self.dim) * 0.5


def coupling(kind: str, shape: tuple[int, ...], dim: int, **options) -> nn.Module:
    c = shape[dim]
    c1, c2 = c // 2, c - c // 2
    if kind == "additive":
        return revgrad.AdditiveCoupling(Mix(c2, c1, dim), Mix(c1, c2, dim), dim=dim, **options)
    return revgrad.AffineCoupling(Mix(c1, 2 * c2, dim), scale="exp", dim=dim, **options)


def chain_of(kind, shape, dim, depth=4, seed=0, dtype=torch.float64, **options):
    torch.manual_seed(seed)
    return [coupling(kind, shape, dim, **options).to(dtype) for _ in range(depth)]


def plain_grads(blocks, x):
    bs = copy.deepcopy(blocks)
    xx = x.clone().requires_grad_()
    h, logdet = xx, None
    for b in bs:
        out = b(h)
        h, ld = out if isinstance(out, tuple) else (out, None)
        logdet = ld if logdet is None else (logdet if ld is None else logdet + ld)
    scalar_loss(h if logdet is None else (h, logdet)).backward()
    return [xx.grad, *(p.grad for p in nn.ModuleList(bs).parameters())]


def rev_grads(blocks, x, hook=False, **options):
    bs = copy.deepcopy(blocks)
    if hook:  # a module hook on a block makes the engine take the one-tensor path there
        for b in bs:
            b.register_forward_hook(lambda m, i, o: None)
    rev = revgrad.reversible(bs, **options)
    xx = x.clone().requires_grad_()
    scalar_loss(rev(xx)).backward()
    return [xx.grad, *(p.grad for p in nn.ModuleList(bs).parameters())], rev


LAYOUTS = [
    pytest.param((3, 5, 8), -1, id="BTC-dim-1"),
    pytest.param((3, 5, 8), 2, id="BTC-dim2"),
    pytest.param((3, 6, 4), 1, id="BTC-dim1-tokens"),
    pytest.param((2, 4, 3, 5), 1, id="BCHW-dim1"),
    pytest.param((2, 3, 4, 5), -2, id="BCHW-dim-2"),
    pytest.param((4, 7), -1, id="BC-odd"),
]


@pytest.mark.parametrize("kind", ["additive", "affine"])
@pytest.mark.parametrize(("shape", "dim"), LAYOUTS)
def test_coupling_splits_its_dimension(kind, shape, dim):
    block = coupling(kind, shape, dim).double()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        out = block(x)
        y = out[0] if isinstance(out, tuple) else out
        c1 = shape[dim] // 2
        # The first half along dim passes (affine) or gets f's residual (additive); the split is along dim.
        x1, y1 = x.narrow(dim, 0, c1), y.narrow(dim, 0, c1)
        if kind == "affine":
            assert torch.equal(y1, x1)
        else:
            assert_rel_close(y1, x1 + block.f(x.narrow(dim, c1, shape[dim] - c1)), 1e-12)
        assert_rel_close(block.inverse(y), x, 1e-12, name="inverse(forward(x))")


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("hook", [False, True], ids=["two-part", "one-tensor"])
@pytest.mark.parametrize("kind", ["additive", "affine"])
@pytest.mark.parametrize(("shape", "dim"), LAYOUTS)
def test_any_dimension_matches_plain_autograd(kind, shape, dim, hook, check):
    blocks = chain_of(kind, shape, dim)
    x = torch.randn(shape, dtype=torch.float64)
    got, rev = rev_grads(blocks, x, hook=hook, check=check)
    for a, b in zip(got, plain_grads(blocks, x), strict=True):
        assert_rel_close(a, b, TOL[torch.float64])
    if check != "off":
        assert max(rev.last_report.errors[i] for i in range(1, len(blocks)) if i not in rev.last_report.anchors) < 1e-12


def test_token_split_uses_the_two_part_path(monkeypatch):
    calls = []
    original = revgrad.AdditiveCoupling.inverse_halves_for_backward

    def spy(self, *args, **kwargs):
        calls.append(args[0].dim)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(revgrad.AdditiveCoupling, "inverse_halves_for_backward", spy)
    blocks = chain_of("additive", (2, 3, 8), -1, depth=3)
    rev_grads(blocks, torch.randn(2, 3, 8, dtype=torch.float64))
    assert calls and set(calls) == {2}, calls


@pytest.mark.parametrize("bad", [0, 3, -4])
def test_dimension_out_of_range_or_batch_is_refused(bad):
    block = revgrad.AdditiveCoupling(nn.Identity(), nn.Identity(), dim=bad)
    with pytest.raises(revgrad.BlockError, match=f"splits dim {bad}"):
        block(torch.randn(2, 4, 6))


def test_dimension_of_size_one_is_refused_and_non_int_dim_too():
    with pytest.raises(revgrad.BlockError, match="size >= 2"):
        revgrad.AffineCoupling(nn.Identity(), dim=-1)(torch.randn(2, 4, 1))
    with pytest.raises(TypeError, match="dim must be an int"):
        revgrad.AdditiveCoupling(nn.Identity(), nn.Identity(), dim=1.0)


# -- kernels: a split whose halves are ranges of each sample runs them; a strided split the twins ---------

_INTERPRETED = dispatch.triton_error() is None and dispatch._interpreting()


@pytest.mark.skipif(not _INTERPRETED, reason="needs Triton's interpreter (TRITON_INTERPRET=1) and triton")
@pytest.mark.parametrize(("shape", "dim", "ranges"), [
    pytest.param((3, 1, 10), 2, True, id="B1C-dim2-ranges"),
    pytest.param((3, 4, 10), -1, False, id="BTC-dim-1-strided"),
])
@pytest.mark.parametrize("kind", ["additive", "affine"])
def test_kernels_take_range_splits_and_twins_the_rest(monkeypatch, kind, shape, dim, ranges):
    assert fused.halves_are_ranges(torch.empty(shape), dim % len(shape)) == ranges
    blocks = chain_of(kind, shape, dim, dtype=torch.float32)
    x = torch.randn(shape)
    expected = plain_grads(blocks, x)
    launched = []
    original = dispatch.kernels

    class Counting:  # records which kernel launchers the ops call (fingerprint kernels run for any split)
        def __getattr__(self, name):
            if name.startswith(("affine", "residual")):
                launched.append(name)
            return getattr(original(), name)

    def counting():
        return Counting()

    monkeypatch.setattr(dispatch, "kernels", counting)
    with dispatch.overridden("triton"):
        got, _ = rev_grads(blocks, x, hook=True)  # the one-tensor path, where kernels run
    for a, b in zip(got, expected, strict=True):
        assert_rel_close(a, b, 1e-5)
    assert bool(launched) == ranges, f"kernels launched {len(launched)} times for a split with ranges={ranges}"


# -- scaled additive couplings (MEFT) -----------------------------------------------------------------------


def scaled_chain(scale1, depth, dtype, seed=0, width=8):
    torch.manual_seed(seed)

    def mlp():
        return nn.Sequential(nn.Linear(width, 32), nn.Tanh(), nn.Linear(32, width))

    return [revgrad.AdditiveCoupling(mlp(), mlp(), dim=-1, scale1=scale1).to(dtype) for _ in range(depth)]


@pytest.mark.parametrize("scale1", [1.0, 0.5, 0.1, 0.05])
@pytest.mark.parametrize("check", ["off", "correct"])
def test_scaled_coupling_matches_plain_in_float64(scale1, check):
    blocks = scaled_chain(scale1, depth=4, dtype=torch.float64)
    x = torch.randn(4, 6, 16, dtype=torch.float64)
    got, _ = rev_grads(blocks, x, check=check)
    for a, b in zip(got, plain_grads(blocks, x), strict=True):
        assert_rel_close(a, b, TOL[torch.float64])


def test_scaled_coupling_inverse_divides_by_both_scales():
    torch.manual_seed(0)
    block = revgrad.AdditiveCoupling(nn.Linear(3, 3), nn.Linear(3, 3), scale1=0.1, scale2=-2.0).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
        x1, x2 = x[:, :3], x[:, 3:]
        y1 = 0.1 * x1 + block.f(x2)
        assert_rel_close(y, torch.cat([y1, -2.0 * x2 + block.g(y1)], dim=1), 1e-14)
        assert_rel_close(block.inverse(y), x, 1e-12)
    with pytest.raises(ValueError, match="scale1 must be a finite nonzero number"):
        revgrad.AdditiveCoupling(nn.Identity(), nn.Identity(), scale1=0.0)


@pytest.mark.parametrize("scale1", [1.0, 0.5, 0.1, 0.05])
def test_scaled_coupling_checked_gradients_in_float32(scale1):
    """``check="correct"`` keeps float32 gradients at plain autograd's where small scales make the
    inverse amplify rounding by ``1 / scale1`` per block; unchecked backprop is right only while the
    chain stays healthy."""
    blocks = scaled_chain(scale1, depth=12, dtype=torch.float32)
    x = torch.randn(4, 6, 16)
    tol = revgrad.default_tol(torch.float32)
    expected = plain_grads(blocks, x)
    got, rev = rev_grads(blocks, x, check="correct")
    for a, b in zip(got, expected, strict=True):
        assert_rel_close(a, b, 1e-5)
    if scale1 == 1.0:
        assert_healthy(nn.Sequential(*blocks), x, tol, anchors=None)
        off, _ = rev_grads(blocks, x, check="off")
        for a, b in zip(off, expected, strict=True):
            assert_rel_close(a, b, 1e-5)
    if scale1 <= 0.1:
        # The premise of the corrections: rebuilt from the top without anchors, inputs drift far.
        assert_unstable(nn.Sequential(*blocks), x, tol, anchors=None)
        assert rev.last_report.corrected, "an unstable chain passed every check"
