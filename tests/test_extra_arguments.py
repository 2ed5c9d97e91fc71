"""A chain's extra arguments (conditions, masks) against plain autograd.

``chain(x, *args, **kwargs)`` gives the same arguments to every block's forward and inverse and to
every evaluation in backward; tensors among them that require grad get gradients summed over the
blocks. Each test runs the same blocks (deep copies) with plain autograd, passing the same arguments
to each block in turn, and compares outputs and every gradient (tolerances: ``reference.TOL``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from reference import TOL, assert_rel_close, plain_chain, scalar_loss
from torch import nn

import revgrad

CHECKS = ["off", "detect", "correct"]
DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]


# -- blocks and sub-networks that take extra arguments ---------------------------------------------


class CondNet(nn.Module):
    """A cINN conditioner: ``[shift, raw scale]`` from ``x1`` and the condition ``c: [B, c_dim]``."""

    def __init__(self, c_in: int, c_out: int, c_dim: int, hidden: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(c_in + c_dim, hidden)
        self.out = nn.Linear(hidden, c_out)

    def forward(self, x1: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.out(torch.tanh(self.inp(torch.cat([x1, c], dim=1))))


def conditional_chain(channels: int = 6, c_dim: int = 3, depth: int = 4, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    c1, c2 = channels // 2, channels - channels // 2
    blocks: list[nn.Module] = []
    for i in range(depth):
        blocks.append(revgrad.AffineCoupling(CondNet(c1, 2 * c2, c_dim), scale="exp" if i % 2 else "sigmoid"))
        blocks.append(revgrad.Shuffle(channels, seed=i) if i % 2 else revgrad.Reverse())
    return blocks


class Attention(nn.Module):
    """Pre-LN multi-head self-attention on ``[B, T, C]`` with a boolean ``attn_mask`` (True: attend),
    dropout as a sub-module. Written out (not ``scaled_dot_product_attention``) so that forward-mode
    AD, which ``stability_report`` uses, works on CPU."""

    def __init__(self, dim: int, heads: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(c // self.heads)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        elif attn_mask is not None:  # an additive float mask
            scores = scores + attn_mask
        o = torch.softmax(scores, dim=-1) @ v
        return self.drop(self.proj(o.transpose(1, 2).reshape(b, t, c)))


class MLP(nn.Module):
    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(self.norm(x)))))


def transformer_stack(depth: int, dim: int = 8, dropout: float = 0.1, seed: int = 0) -> list[nn.Module]:
    """Two-stream reversible transformer layers: ``AdditiveCoupling(attention, MLP, dim=-1)`` on
    ``[B, T, 2 * dim]`` (each stream ``dim`` features)."""
    torch.manual_seed(seed)
    return [revgrad.AdditiveCoupling(Attention(dim, dropout=dropout), MLP(dim, dropout=dropout), dim=-1)
            for _ in range(depth)]


def causal_mask(t: int) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).tril()


class CondShift(nn.Module):
    """A block without the fused protocol (the engine's generic path): ``y = x + net(c)``, ``x = y - net(c)``."""

    def __init__(self, channels: int, c_dim: int) -> None:
        super().__init__()
        self.net = nn.Linear(c_dim, channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.net(c)) * x.mean(dim=1, keepdim=True)

    def inverse(self, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # y = x + t m(x) with m the mean over channels: m(y) = m(x) (1 + m(t)).
        t = torch.tanh(self.net(c))
        m = y.mean(dim=1, keepdim=True) / (1 + t.mean(dim=1, keepdim=True))
        return y - t * m


class NoArgs(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y / 2


# -- the plain-autograd reference --------------------------------------------------------------------


plain_run = plain_chain


def compare(blocks, x, args=(), kwargs=None, *, check="correct", seed=None, tol=None, **options):
    """Run ``blocks`` with plain autograd and through ``revgrad.reversible``; compare outputs and the
    gradients of ``x``, of every tensor argument that requires grad, and of every parameter."""
    kwargs = kwargs or {}
    tol = TOL[x.dtype] if tol is None else tol
    results = []
    for make in (lambda bs: (lambda h, *args_, **kwargs_: plain_run(bs, h, *args_, **kwargs_)),
                 lambda bs: revgrad.reversible(list(bs), check=check, **options)):
        bs = copy.deepcopy(blocks)
        run = make(bs)
        xx = x.clone().requires_grad_()
        a = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.requires_grad else t
             for t in args]
        k = {n: t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.requires_grad else t
             for n, t in kwargs.items()}
        if seed is not None:
            torch.manual_seed(seed)
        out = run(xx, *a, **k)
        scalar_loss(out).backward()
        grads = [xx.grad] + [t.grad for t in [*a, *k.values()] if isinstance(t, torch.Tensor) and t.requires_grad]
        results.append((out, grads, [p.grad for p in nn.ModuleList(bs).parameters()], run))
    (out_p, g_p, p_p, _), (out_r, g_r, p_r, rev) = results
    pairs = (out_r, out_p) if isinstance(out_r, tuple) else ((out_r,), (out_p,))
    for o_r, o_p in zip(*pairs, strict=True):
        assert_rel_close(o_r, o_p, tol, name="output")
    for i, (a, b) in enumerate(zip(g_r, g_p, strict=True)):
        assert a is not None, f"input {i} got no gradient"
        assert_rel_close(a, b, tol, name=f"gradient of input {i}")
    for i, (a, b) in enumerate(zip(p_r, p_p, strict=True)):
        assert (a is None) == (b is None), f"parameter {i}: gradient {a is None} vs plain {b is None}"
        if a is not None:
            assert_rel_close(a, b, tol, name=f"parameter {i}")
    return rev


# -- conditions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conditional_affine_chain_matches_plain(check, dtype):
    x = torch.randn(8, 6, dtype=dtype)
    c = torch.randn(8, 3, dtype=dtype, requires_grad=True)
    blocks = [b.to(dtype) for b in conditional_chain()]
    rev = compare(blocks, x, (c,), check=check)
    assert rev.last_report is not None and len(rev.last_report.errors) == len(blocks)
    with torch.no_grad():
        y, _ = rev(x, c)
        assert_rel_close(rev.inverse(y, c), x, TOL[dtype], name="inverse(y, c)")
        other = rev.inverse(y, c + 1)
    assert (other - x).abs().max() > 1e-3, "the inverse ignored its condition"


def test_condition_as_keyword_and_with_autograd_grad():
    x = torch.randn(5, 6, dtype=torch.float64)
    c = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)

    class KwNet(CondNet):
        def forward(self, x1, *, cond):
            return super().forward(x1, cond)

    torch.manual_seed(1)
    blocks = [revgrad.AffineCoupling(KwNet(3, 6, 3)).double() for _ in range(3)]
    compare(blocks, x, kwargs={"cond": c})

    # torch.autograd.grad with respect to the condition alone, as plain autograd would give it.
    plain = copy.deepcopy(blocks)
    rev = revgrad.reversible(copy.deepcopy(blocks))
    (g_rev,) = torch.autograd.grad(scalar_loss(rev(x, cond=c)), [c])
    (g_plain,) = torch.autograd.grad(scalar_loss(plain_run(plain, x, cond=c)), [c])
    assert_rel_close(g_rev, g_plain, TOL[torch.float64], name="dL/dc")


def test_condition_needing_grad_alone_still_saves_memory_and_differentiates():
    """Neither x nor parameters need grad, only the condition: the engine must still return dL/dc."""
    x = torch.randn(4, 6, dtype=torch.float64)
    c = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    blocks = [b.double() for b in conditional_chain(depth=2)]
    for p in nn.ModuleList(blocks).parameters():
        p.requires_grad_(False)
    rev = revgrad.reversible(copy.deepcopy(blocks))
    (g_rev,) = torch.autograd.grad(scalar_loss(rev(x, c)), [c])
    (g_plain,) = torch.autograd.grad(scalar_loss(plain_run(blocks, x, c)), [c])
    assert_rel_close(g_rev, g_plain, TOL[torch.float64], name="dL/dc")
    assert rev.last_report is not None, "the chain ran plainly instead of through the engine"


@pytest.mark.parametrize("check", CHECKS)
def test_generic_block_with_condition(check):
    """A block without the fused protocol: backward recomputes it through autograd, with the condition."""
    torch.manual_seed(0)
    blocks = [CondShift(6, 3).double(), revgrad.Reverse(), CondShift(6, 3).double()]
    x = torch.randn(4, 6, dtype=torch.float64)
    c = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    compare(blocks, x, (c,), check=check)


def test_inverse_with_condition_is_differentiable_like_plain():
    """Sampling a conditional flow with grad (``chain.inverse(z, c)``) saves memory and matches plain."""
    blocks = [b.double() for b in conditional_chain(depth=3)]
    z = torch.randn(6, 6, dtype=torch.float64)
    c = torch.randn(6, 3, dtype=torch.float64)

    def plain_inverse(bs, y, c):
        for b in reversed(bs):
            y = b.inverse(y, c)
        return y

    rev = revgrad.reversible(copy.deepcopy(blocks))
    plain = copy.deepcopy(blocks)
    grads = []
    for run, bs in ((lambda y, cc: rev.inverse(y, cc), list(rev)), (lambda y, cc: plain_inverse(plain, y, cc), plain)):
        zz, cc = z.clone().requires_grad_(), c.clone().requires_grad_()
        scalar_loss(run(zz, cc)).backward()
        grads.append([zz.grad, cc.grad, *(p.grad for p in nn.ModuleList(bs).parameters())])
    for a, b in zip(*grads, strict=True):
        assert_rel_close(a, b, TOL[torch.float64], name="inverse gradient")


def test_conditional_freia_sequence_inn_matches_freia():
    Ff = pytest.importorskip("FrEIA.framework")
    Fm = pytest.importorskip("FrEIA.modules")

    def subnet(c_in, c_out):
        return nn.Sequential(nn.Linear(c_in, 16), nn.Tanh(), nn.Linear(16, c_out))

    torch.manual_seed(0)
    inn = Ff.SequenceINN(6)
    for k in range(3):
        inn.append(Fm.GLOWCouplingBlock, cond=k % 2, cond_shape=(3,), subnet_constructor=subnet)
        inn.append(Fm.PermuteRandom, seed=k)
    inn = inn.double()
    reference = copy.deepcopy(inn)
    chain = revgrad.reversible(revgrad.freia_blocks(inn))
    x = torch.randn(5, 6, dtype=torch.float64)
    c0, c1 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    outs = []
    for run in (lambda h, a, b: chain(h, a, b), lambda h, a, b: reference(h, c=[a, b])):
        xx, a, b = x.clone().requires_grad_(), c0.clone().requires_grad_(), c1.clone().requires_grad_()
        z, logdet = run(xx, a, b)
        scalar_loss((z, logdet)).backward()
        outs.append((z, logdet, xx.grad, a.grad, b.grad))  # gradients to the conditions too
    for a, b in zip(*outs, strict=True):
        assert_rel_close(a, b, TOL[torch.float64])
    for (name, p), q in zip(inn.named_parameters(), reference.parameters(), strict=True):
        if p.requires_grad:
            assert_rel_close(p.grad, q.grad, TOL[torch.float64], name=name)
    with torch.no_grad():
        assert_rel_close(chain.inverse(outs[0][0], c0, c1), x, 1e-12, name="x")
    with pytest.raises(revgrad.BlockError, match="conditional"):
        chain(x)


# -- masks and token layouts ----------------------------------------------------------------------------


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_transformer_stack_with_causal_mask_and_dropout(check, dtype):
    blocks = [b.to(dtype).train() for b in transformer_stack(depth=6, dropout=0.1)]
    x = torch.randn(3, 5, 16, dtype=dtype)
    compare(blocks, x, kwargs={"attn_mask": causal_mask(5)}, check=check, seed=7)


def test_two_forwards_with_different_masks_before_one_backward():
    blocks = [b.double().train() for b in transformer_stack(depth=4, dropout=0.1)]
    x1, x2 = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    m1, m2 = causal_mask(5), torch.ones(5, 5, dtype=torch.bool)
    grads = []
    for run in ("plain", "rev"):
        bs = copy.deepcopy(blocks)
        chain = revgrad.reversible(bs) if run == "rev" else (lambda h, bs=bs, **k: plain_run(bs, h, **k))
        torch.manual_seed(3)
        a = chain(x1.clone().requires_grad_(), attn_mask=m1)
        b = chain(x2.clone().requires_grad_(), attn_mask=m2)
        (scalar_loss(a) + 2 * scalar_loss(b)).backward()
        grads.append([p.grad for p in nn.ModuleList(bs).parameters()])
    for a, b in zip(*grads, strict=True):
        assert_rel_close(a, b, TOL[torch.float64])
    # The premise: the two masks give different results (so mixing them up would be seen).
    with torch.no_grad():
        chain = revgrad.reversible(copy.deepcopy(blocks)).eval()
        assert (chain(x1, attn_mask=m1) - chain(x1, attn_mask=m2)).abs().max() > 1e-3


def test_mask_modified_in_place_before_backward_is_refused():
    chain = revgrad.reversible([b.double() for b in transformer_stack(depth=2, dropout=0.0)])
    mask = causal_mask(4)
    out = chain(torch.randn(2, 4, 16, dtype=torch.float64, requires_grad=True), attn_mask=mask)
    mask.fill_(True)
    with pytest.raises(revgrad.BlockError, match="argument 'attn_mask' was modified in place"):
        scalar_loss(out).backward()


def test_arguments_are_held_once_per_call_not_per_block():
    """A large argument costs nothing per block: held bytes with it equal held bytes with a tiny one."""
    from revgrad import MemoryProbe

    torch.manual_seed(0)
    blocks = transformer_stack(depth=12, dropout=0.0)
    chain = revgrad.reversible(blocks, check="off")
    x = torch.randn(2, 64, 16)
    big = torch.zeros(64, 64)  # an additive float mask: 16 KiB, as large as x
    small = torch.zeros(1, 1)
    held = {}
    for name, mask in (("big", big), ("small", small)):
        for _ in range(2):  # the second run is measured (first-call caches warmed)
            with MemoryProbe() as probe:
                out = chain(x.clone().requires_grad_(), attn_mask=mask)
                held[name] = probe.mark("held")
            scalar_loss(out).backward()
            del out
    nbytes = big.numel() * big.element_size()
    assert held["big"] - held["small"] < nbytes / 2, (held, nbytes)


def test_sixteen_token_layers_hold_at_most_twice_four():
    """Flat in depth with dropout on: what grows per layer is the generators' states for replaying
    dropout (about 10 KB per layer on CPU, two 5 KB snapshots), small beside a [4, 128, 128] activation."""
    from revgrad import MemoryProbe

    def held(depth):
        torch.manual_seed(0)
        chain = revgrad.reversible(transformer_stack(depth=depth, dim=64, dropout=0.1), check="off")
        x = torch.randn(4, 128, 128)
        mask = causal_mask(128)
        for _ in range(2):
            with MemoryProbe() as probe:
                out = chain(x.clone().requires_grad_(), attn_mask=mask)
                nbytes = probe.mark("held")
            scalar_loss(out).backward()
            del out
        return nbytes

    four, sixteen = held(4), held(16)
    activation = 4 * 128 * 128 * 4
    assert sixteen <= 2 * four, f"16 layers held {sixteen / activation:.2f} activations, 4 held {four / activation:.2f}"


# -- misuse is named --------------------------------------------------------------------------------------


def test_block_without_extra_arguments_is_named():
    torch.manual_seed(0)
    chain = revgrad.reversible([revgrad.AffineCoupling(CondNet(3, 6, 3)), NoArgs()])
    with pytest.raises(revgrad.BlockError, match=r"block 1 \(NoArgs\)\.forward does not take the chain's extra"):
        chain(torch.randn(2, 6, requires_grad=True), torch.randn(2, 3))


def test_sub_network_without_extra_arguments_is_named():
    chain = revgrad.reversible([revgrad.AdditiveCoupling(nn.Linear(2, 2), nn.Linear(2, 2))])
    with pytest.raises(revgrad.BlockError, match=r"AdditiveCoupling\.f \(Linear\)\.forward does not take"):
        chain(torch.randn(2, 4, requires_grad=True), mask=torch.ones(2))


def test_protocol_keyword_names_are_refused():
    chain = revgrad.reversible([revgrad.AffineCoupling(CondNet(3, 6, 3))])
    for name in ("exact", "params", "tape"):
        with pytest.raises(revgrad.BlockError, match=f"'{name}' is a parameter name of the fused protocol"):
            chain(torch.randn(2, 6, requires_grad=True), **{name: torch.randn(2, 3)})


def test_blocks_without_arguments_still_work_without_them():
    chain = revgrad.reversible([NoArgs(), revgrad.Reverse()])
    x = torch.randn(2, 4, requires_grad=True)
    scalar_loss(chain(x)).backward()
    assert_rel_close(x.grad, (torch.autograd.grad(scalar_loss(2 * x.flip(1)), x)[0]), TOL[torch.float32])


# -- every path of the engine sees the arguments ---------------------------------------------------------


def test_converted_model_passes_arguments_to_its_chain():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Linear(4, 16)
            self.body = nn.Sequential(*transformer_stack(depth=3, dropout=0.0))
            self.head = nn.Linear(16, 2)

        def forward(self, x, mask):
            return self.head(self.body(self.embed(x), attn_mask=mask))

    class PlainChain(nn.Sequential):
        def forward(self, h, **kwargs):
            return plain_run(list(self), h, **kwargs)

    model = Model().double()
    reference = copy.deepcopy(model)
    reference.body.__class__ = PlainChain
    assert revgrad.reversible(model.body) is model.body  # for its effect: converted in place
    assert isinstance(model.body, revgrad.ReversibleSequential)
    x, mask = torch.randn(2, 5, 4, dtype=torch.float64), causal_mask(5)
    scalar_loss(model(x, mask)).backward()
    scalar_loss(reference(x, mask)).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert_rel_close(p.grad, q.grad, TOL[torch.float64], name=name)
    assert set(revgrad.last_reports(model)) == {"body"}


@pytest.mark.parametrize("path", ["graph_budget", "hooks", "probe", "anchors"])
def test_arguments_reach_every_evaluation(path):
    blocks = [b.double() for b in conditional_chain(depth=4)]
    x = torch.randn(4, 6, dtype=torch.float64)
    c = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    options = {
        "graph_budget": {"graph_budget": 10**9},
        "hooks": {},
        "probe": {"probe_every": 1},
        "anchors": {"anchor_every": 1},
    }[path]
    if path == "hooks":  # a block with module hooks takes the two-step path (inverse, then recompute)
        blocks[0].register_forward_hook(lambda m, i, o: None)
    rev = compare(blocks, x, (c,), **options)
    if path == "graph_budget":  # graphs are measured in the first backward, kept from the next step
        compare(blocks, x, (c,), **options)
    assert rev.last_report is not None


def test_stability_report_takes_arguments():
    blocks = [b.double() for b in conditional_chain(depth=2)]
    chain = revgrad.reversible(blocks)
    x, c = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    report = revgrad.stability_report(chain, x, c, iterations=3)
    assert len(report.blocks) == len(blocks)
    assert report.total.recon_error < 1e-12
    assert all(math.isfinite(b.lip_forward) for b in report.blocks)
    tokens = revgrad.reversible(transformer_stack(depth=2, dropout=0.0))
    report = revgrad.stability_report(tokens, torch.randn(2, 5, 16), attn_mask=causal_mask(5), iterations=2)
    assert report.total.recon_error < 1e-5


# -- what cannot be given back exactly is refused, naming it ------------------------------------------------


def test_tensors_needing_grad_hidden_in_objects_are_refused():
    import dataclasses
    import types

    @dataclasses.dataclass
    class Cond:
        c: torch.Tensor

    torch.manual_seed(0)
    chain = revgrad.reversible([revgrad.AffineCoupling(CondNet(3, 6, 3))])
    x = torch.randn(2, 6, requires_grad=True)
    c = torch.randn(2, 3, requires_grad=True)
    for hidden, kind in ((Cond(c), "Cond"), (types.SimpleNamespace(c=c), "SimpleNamespace")):
        with pytest.raises(revgrad.BlockError, match=f"positional argument 0 is a {kind} holding tensors that require"):
            chain(x, hidden)
    with pytest.raises(revgrad.BlockError, match=r"argument 'table' is a module \(Embedding\) with parameters"):
        chain(x, c, table=nn.Embedding(4, 3))
    # Without gradients to lose, objects and frozen modules pass (and reach the blocks as they are).
    seen = []

    class Spy(CondNet):
        def forward(self, x1, c, *, config, table):
            seen.append((config, table))
            return super().forward(x1, c)

    frozen = nn.Embedding(4, 3).requires_grad_(False)
    config = types.SimpleNamespace(width=3)
    chain = revgrad.reversible([revgrad.AffineCoupling(Spy(3, 6, 3))])
    scalar_loss(chain(x, c, config=config, table=frozen)).backward()
    assert seen and all(a is config and b is frozen for a, b in seen)


def test_block_that_changes_an_argument_in_forward_is_refused():
    class Appends(CondNet):
        def forward(self, x1, c, losses):
            out = super().forward(x1, c)
            losses.append(out.square().mean())  # an auxiliary loss: would be lost (no grad in forward)
            return out

    class Updates(CondNet):
        def forward(self, x1, c, state):
            state.add_(1)
            return super().forward(x1, c)

    torch.manual_seed(0)
    x, c = torch.randn(2, 6, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    losses: list = []
    chain = revgrad.reversible([revgrad.AffineCoupling(Appends(3, 6, 3))])
    with pytest.raises(revgrad.BlockError, match=r"block 0 \(AffineCoupling\) changed the chain's arguments' contain"):
        chain(x, c, losses)
    chain = revgrad.reversible([revgrad.AffineCoupling(Updates(3, 6, 3))])
    with pytest.raises(revgrad.BlockError, match="changed the chain's positional argument 1 in its forward"):
        chain(x, c, torch.zeros(()))


def test_blocks_with_an_inverse_set_on_the_instance_take_arguments():
    class Inner(CondShift):
        pass

    class Wrapper(nn.Module):  # exposes its inner block's inverse as an instance attribute
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.inverse = inner.inverse

        def forward(self, x, *args, **kwargs):
            return self.inner(x, *args, **kwargs)

    torch.manual_seed(0)
    blocks = [Wrapper(Inner(6, 3)).double(), CondShift(6, 3).double()]
    x = torch.randn(4, 6, dtype=torch.float64)
    compare(blocks, x, (torch.randn(4, 3, dtype=torch.float64, requires_grad=True),))


def test_fused_closure_returning_too_few_gradients_is_refused():
    class ForgetsArguments(revgrad.AffineCoupling):
        def inverse_for_backward(self, y, tape, params, *args, **kwargs):
            x, vjp = super().inverse_for_backward(y, tape, params, *args, **kwargs)

            def forgetful(gy, gld):
                gx, grads = vjp(gy, gld)
                return gx, grads[:-1]

            return x, forgetful

    torch.manual_seed(0)
    chain = revgrad.reversible([ForgetsArguments(CondNet(3, 6, 3)) for _ in range(2)], check="off")
    out = chain(torch.randn(2, 6, requires_grad=True), torch.randn(2, 3, requires_grad=True))
    with pytest.raises(revgrad.BlockError, match=r"block 1 \(ForgetsArguments\).*returned 4 gradients; it must return"):
        scalar_loss(out).backward()


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches (and its recompile counts per code object) are per process: leave none behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_block_takes_the_fused_path(fresh_dynamo):
    torch.manual_seed(0)
    blocks = [torch.compile(revgrad.AffineCoupling(CondNet(3, 6, 3)).double(), backend="eager") for _ in range(2)]
    rev = compare(blocks, torch.randn(3, 6, dtype=torch.float64), (torch.randn(3, 3, dtype=torch.float64),))
    assert rev.last_report.evaluations == 2  # one per block: the fused protocol through the wrapper


# -- generators of one's own: held by a block, or passed as an argument --------------------------------------


class OwnDropout(nn.Module):
    """Dropout drawing from a ``torch.Generator`` it holds, or from one passed as ``generator=``."""

    def __init__(self, width: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.gen = generator

    def forward(self, h: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        gen = generator if generator is not None else self.gen
        keep = torch.bernoulli(torch.full(h.shape, 0.7, dtype=h.dtype), generator=gen)
        return torch.tanh(self.lin(h * keep / 0.7))


@pytest.mark.parametrize("where", ["block attribute", "argument"])
@pytest.mark.parametrize("check", CHECKS)
def test_own_generators_are_replayed_and_left_as_plain_leaves_them(where, check):
    states = []
    grads = []
    x = torch.randn(4, 6, dtype=torch.float64)
    for mode in ("plain", "rev"):
        gen = torch.Generator().manual_seed(7)
        held = gen if where == "block attribute" else None
        torch.manual_seed(0)
        bs = [revgrad.AdditiveCoupling(OwnDropout(3, held), OwnDropout(3, held)).double() for _ in range(3)]
        kwargs = {} if where == "block attribute" else {"generator": gen}
        xx = x.clone().requires_grad_()
        out = plain_chain(bs, xx, **kwargs) if mode == "plain" else revgrad.reversible(bs, check=check)(xx, **kwargs)
        scalar_loss(out).backward()
        grads.append([xx.grad, *(p.grad for p in nn.ModuleList(bs).parameters())])
        states.append(gen.get_state())
    for a, b in zip(*grads, strict=True):
        assert_rel_close(a, b, TOL[torch.float64])
    assert torch.equal(*states), "the generator was not left where plain autograd leaves it"
