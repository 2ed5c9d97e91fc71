"""``graph_budget``: the top blocks keep their autograd graphs (no recompute) within a byte budget."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from chains import conv_branch
from reference import TOL, assert_rel_close, named_grads, plain_chain, scalar_loss
from torch import nn

import revgrad
from revgrad.tools.memory import MemoryProbe, cpu_counting_available

SHAPE = (4, 16, 8, 8)


def _stage(depth: int, dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    blocks = [revgrad.AdditiveCoupling(conv_branch(8), conv_branch(8)) for _ in range(depth)]
    blocks.insert(depth // 2, revgrad.AffineCoupling(nn.Conv2d(8, 16, 3, padding=1), scale="bounded"))
    return nn.Sequential(*blocks).to(dtype)


def _fits(rev, k: int) -> int:
    """The budget that holds exactly the top ``k`` blocks' graphs (and the boundary activation)."""
    graphs = rev._graphs
    top = sorted(graphs.sizes)[-k:]
    return sum(graphs.sizes[key] for key in top) + graphs.inputs[top[0]]


def _step(model, x, plain: bool):
    model.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_()
    out = plain_chain(list(model), xr) if plain else model(xr)
    scalar_loss(out).backward()
    return xr.grad, named_grads(model)


@pytest.mark.parametrize("budget", [0, 10**9, "three"], ids=["none", "all", "three-blocks"])
def test_gradients_and_buffers_match_plain_autograd_every_step(budget):
    net = _stage(6)
    ref = copy.deepcopy(net)
    rev = revgrad.reversible(copy.deepcopy(net))
    x = torch.randn(*SHAPE, dtype=torch.float64)
    _step(rev, x, plain=False)  # measures the graphs (first step: everything reversible)
    if budget == "three":
        sizes = rev._graphs.sizes if rev._graphs else None
        assert sizes is None
        rev.configure(graph_budget=10**9)
        _step(rev, x, plain=False)
        budget = _fits(rev, 3)
    rev.configure(graph_budget=budget)
    _step(rev, x, plain=False)  # configure() forgets measurements: measure again
    _step(ref, x, plain=True)
    ref.load_state_dict(rev.state_dict())
    expected_kept = {0: [], 10**9: list(range(7))}.get(budget, [4, 5, 6])
    for step in range(2):
        gx, grads = _step(rev, x, plain=False)
        assert rev.kept_blocks == expected_kept
        gx_ref, grads_ref = _step(ref, x, plain=True)
        assert_rel_close(gx, gx_ref, TOL[torch.float64], "dL/dx")
        for name, g in grads.items():
            assert_rel_close(g, grads_ref[name], TOL[torch.float64], name)
        for (name, b), (_, b_ref) in zip(rev.named_buffers(), ref.named_buffers()):
            assert torch.equal(b, b_ref), f"step {step}: buffer {name} differs from plain autograd's"


def test_kept_blocks_cost_no_evaluations_in_backward():
    rev = revgrad.reversible(_stage(6), graph_budget=10**9, probe_every=0)  # no probe evaluations
    x = torch.randn(*SHAPE, dtype=torch.float64)
    _step(rev, x, plain=False)
    assert rev.last_report.evaluations == 7  # fused couplings: one evaluation each
    rev.configure(graph_budget=_fits(rev, 3), probe_every=0)
    _step(rev, x, plain=False)
    _step(rev, x, plain=False)
    assert rev.kept_blocks == [4, 5, 6]
    report = rev.last_report
    assert report.evaluations == 4 and report.num_blocks == 4
    rev.configure(graph_budget=10**9, probe_every=0)
    _step(rev, x, plain=False)
    _step(rev, x, plain=False)
    assert rev.kept_blocks == list(range(7)) and rev.last_report is None


def test_new_batch_shape_measures_again():
    rev = revgrad.reversible(_stage(4), graph_budget=10**9)
    x = torch.randn(*SHAPE, dtype=torch.float64)
    _step(rev, x, plain=False)
    _step(rev, x, plain=False)
    assert rev.kept_blocks == list(range(5))
    _step(rev, x[:2], plain=False)
    assert rev.kept_blocks == [], "a new shape must be measured before anything is kept"
    _step(rev, x[:2], plain=False)
    assert rev.kept_blocks == list(range(5))


@pytest.mark.skipif(not cpu_counting_available(), reason="needs glibc mallinfo2 to count bytes")
def test_held_memory_stays_within_the_budget():
    net = _stage(8, torch.float32)
    x = torch.randn(8, 16, 16, 16)
    activation = x.numel() * 4

    def held(model):
        for _ in range(2):  # measure graphs, then warm up what is lazily created
            scalar_loss(model(x.clone().requires_grad_())).backward()
        gc.collect()
        with MemoryProbe() as probe:
            out = model(x.clone().requires_grad_())
            nbytes = probe.mark("held")
            scalar_loss(out).backward()
            del out
        return nbytes

    base = held(revgrad.reversible(net, check="off"))
    budget = 8 * activation
    kept = revgrad.reversible(net, check="off", graph_budget=budget)
    with_graphs = held(kept)
    assert kept.kept_blocks, "nothing fitted in eight activations' worth of graphs"
    # The budget counts tensor bytes; the allocator adds its chunk headers and page rounding.
    assert base < with_graphs <= base + 1.02 * budget, (base, with_graphs, budget)


def test_bad_budget_is_rejected():
    with pytest.raises(ValueError, match="graph_budget must be a number of bytes >= 0"):
        revgrad.reversible(_stage(2), graph_budget=-1)
