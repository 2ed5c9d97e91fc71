"""Low precision: under CPU bf16 autocast the checked engine is as close to plain autograd
as plain autograd's own bf16 noise, while unchecked reversible backprop is not."""

from __future__ import annotations

import pytest
import torch
from chains import assert_unstable, exploding_chain, healthy_chain
from reference import flat_grads_bf16, rel_error

import revgrad

BF16_TOL = revgrad.default_tol(torch.bfloat16)
# The milder exploding chain (bias -6: scales 0.018): rebuilt between the engine's anchors its inputs
# stay within the bf16 tolerance (~1e-4), so "correct" has nothing to correct, while rebuilt from the
# top without anchors (check="off") they blow up (~1e308). The default chain (scales 6e-6) would bring
# one-step errors of ~6e-3 near the bf16 tolerance and its bf16 noise (3e-4) near the 1e-4 floor below.
CASES = {
    "healthy-48": (lambda: healthy_chain(48, channels=6, seed=1), 6),
    "exploding-12": (lambda: exploding_chain(12, bias=-6.0), 4),
}


@pytest.mark.parametrize("case", sorted(CASES), ids=sorted(CASES))
def test_checked_bf16_gradients_within_plain_bf16_noise(case):
    build, channels = CASES[case]
    net = build()
    torch.manual_seed(0)
    x = torch.randn(4, channels, 6, 6)
    if case.startswith("exploding"):  # premise: unchecked, the inputs rebuilt from the top blow up
        assert_unstable(net, x, BF16_TOL, anchors=None, autocast=torch.bfloat16)
    truth, _ = flat_grads_bf16(net, x, autocast=False, check=None)  # float32, no autocast
    plain_bf16, _ = flat_grads_bf16(net, x, autocast=True, check=None)
    checked, model = flat_grads_bf16(net, x, autocast=True, check="correct")
    noise = rel_error(plain_bf16, truth)
    assert noise > 1e-4, "autocast did not lower the precision: the test is void"
    assert model.last_report.tol == revgrad.default_tol(torch.bfloat16)
    assert rel_error(checked, truth) <= 1.1 * noise
    assert rel_error(checked, plain_bf16) <= noise


def test_unchecked_bf16_breaks_on_exploding_chain():
    net, _ = CASES["exploding-12"]
    net = net()
    torch.manual_seed(0)
    x = torch.randn(4, 4, 6, 6)
    # Premise: without anchors (check="off"), the inputs rebuilt under bf16 autocast are off by
    # >= 100x the bf16 tolerance.
    assert_unstable(net, x, BF16_TOL, anchors=None, autocast=torch.bfloat16)
    plain_bf16, _ = flat_grads_bf16(net, x, autocast=True, check=None)
    off, _ = flat_grads_bf16(net, x, autocast=True, check="off")
    error = rel_error(off, plain_bf16)
    assert not error <= 1.0, f"check='off' gradients were within {error:.3g} of plain bf16 autograd"
