"""Bytes held between forward and backward, counted by the allocator (glibc mallinfo2), not trusted."""

from __future__ import annotations

import gc

import pytest
import torch
from chains import conv_branch
from torch import nn

import revgrad
from revgrad.tools.memory import MemoryProbe, cpu_counting_available

pytestmark = pytest.mark.skipif(not cpu_counting_available(), reason="needs glibc mallinfo2 to count bytes")

SHAPE = (8, 16, 32, 32)  # one activation: 512 KiB in float32
ACTIVATION = 8 * 16 * 32 * 32 * 4


def _stage(depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[revgrad.AdditiveCoupling(conv_branch(8), conv_branch(8)) for _ in range(depth)])


def held_activations(model: nn.Module, x: torch.Tensor) -> float:
    """Activations' worth of bytes that a forward pass leaves allocated until backward."""
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        model(x)  # first call allocates lazily created state (fingerprint signs, BLAS buffers)
    gc.collect()
    with MemoryProbe() as probe:
        out = model(x)
        held = probe.mark("held")
        out.sum().backward()
        del out
    model.zero_grad(set_to_none=True)
    return held / ACTIVATION


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(*SHAPE, requires_grad=True)


def test_check_off_holds_about_one_activation_at_32_blocks(x):
    net = _stage(32)
    plain = held_activations(net, x)
    off = held_activations(revgrad.reversible(net, check="off"), x)
    assert off <= 1.5, f"check='off' held {off:.2f} activations"
    assert plain >= 20, f"plain autograd held only {plain:.2f} activations: the measurement is broken"


def test_check_off_is_flat_in_depth(x):
    small = held_activations(revgrad.reversible(_stage(4), check="off"), x)
    large = held_activations(revgrad.reversible(_stage(32), check="off"), x)
    assert large - small <= 0.5, f"held {small:.2f} activations at 4 blocks, {large:.2f} at 32"


def test_checked_memory_grows_sublinearly_and_stays_small(x):
    held = {}
    for depth in (8, 32):
        net = _stage(depth)
        if depth == 32:
            plain = held_activations(net, x)  # before reversible(), which converts net in place
        held[depth] = held_activations(revgrad.reversible(net, check="correct"), x)
    assert held[32] <= 3 * held[8], f"8 blocks: {held[8]:.2f}, 32 blocks: {held[32]:.2f} activations"
    assert held[32] <= 0.15 * plain, f"checked chain held {held[32]:.2f} vs plain {plain:.2f} activations"


def test_check_off_step_peak(x):
    """The step's peak (forward and backward) of a 16-block stage with ``check="off"``.

    7.1 activations measured: the input's gradient, the output and its gradient, one block's
    recompute graph (~4 activations) and the block's input and its gradient. It was 9.7 before the
    engine dropped each block's output once its input was rebuilt, 8.1 before it passed couplings
    their halves (revgrad.engine.halves): the bound catches either regression.
    """
    model = revgrad.reversible(_stage(16), check="off")
    model(x).sum().backward()  # lazily created state is not the step's memory
    model.zero_grad(set_to_none=True)
    x.grad = None
    gc.collect()
    with MemoryProbe(track_peak=True) as probe:
        out = model(x)
        out.sum().backward()
        del out
    x.grad = None
    peak = probe.peak / ACTIVATION
    assert 4 <= peak <= 7.6, f"check='off' step peak {peak:.2f} activations"
