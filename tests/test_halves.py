"""The two-part path: the engine hands adjacent couplings their activations as packed halves."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from chains import Flip, assert_healthy
from reference import assert_rel_close, plain_chain, scalar_loss
from torch import nn

import revgrad
from revgrad.engine.halves import Halves, full, split
from revgrad.ops import dispatch
from revgrad.ops.fingerprint import fingerprint, fingerprint_parts


@pytest.mark.parametrize("shape", [(3, 8, 4, 4), (2, 32, 16, 16), (2, 5, 3, 3), (2, 256, 1, 1)],
                         ids=["unaligned", "aligned", "odd-channels", "aligned-1x1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_fingerprint_of_parts_is_the_fingerprint_of_the_whole(shape, dtype):
    x = torch.randn(*shape, dtype=dtype)
    parts = split(x)
    assert torch.equal(full(parts), x)
    assert_rel_close(fingerprint_parts(parts.a, parts.b), fingerprint(x), 1e-12, "fingerprint")


def test_halves_describe_the_whole():
    x = torch.randn(2, 5, 3, 4)
    parts = split(x)
    assert parts.shape == x.shape and parts.dtype == x.dtype and parts.numel() == x.numel()
    assert parts.a.is_contiguous() and parts.b.is_contiguous() and parts.a.shape[1] == 2


def _coupling(channels: int = 6) -> revgrad.AdditiveCoupling:
    half = channels // 2
    return revgrad.AdditiveCoupling(
        nn.Sequential(nn.Conv2d(channels - half, half, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(half, channels - half, 3, padding=1), nn.Tanh()),
    )


def test_forward_halves_is_forward_bit_for_bit():
    torch.manual_seed(0)
    block = _coupling()
    x = torch.randn(3, 6, 5, 5)
    with torch.no_grad():
        y = block(x)
        parts = split(x)
        y1, y2 = block.forward_halves(parts.a, parts.b)
    assert torch.equal(torch.cat([y1, y2], 1), y)


@pytest.fixture
def spies(monkeypatch):
    calls = {"forward_halves": 0, "inverse_halves_for_backward": 0}
    for name in calls:
        original = getattr(revgrad.AdditiveCoupling, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(revgrad.AdditiveCoupling, name, spy)
    return calls


def _mixed_chain() -> nn.Sequential:
    """Runs of additive couplings between blocks that take one tensor."""
    torch.manual_seed(3)
    return nn.Sequential(
        _coupling(), _coupling(), Flip(), _coupling(),
        revgrad.AffineCoupling(nn.Conv2d(3, 6, 3, padding=1), "bounded"), _coupling(), _coupling(),
    ).double()


@pytest.mark.parametrize("check", ["off", "correct", "correct-forced"])
def test_engine_passes_halves_and_matches_plain_autograd(spies, check):
    net = _mixed_chain()
    # probe_every=0: the calls counted below are the engine's own (a probe rebuilds blocks once more)
    options = {"check": "correct", "tol": 1e-300} if check == "correct-forced" else {"check": check}
    options["probe_every"] = 0
    model = revgrad.reversible(copy.deepcopy(net), **options)
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    if check != "correct-forced":  # premise: nothing to correct, so every coupling rebuilds from halves
        assert_healthy(net, x, revgrad.default_tol(torch.float64), anchors=None)
    xr = x.detach().clone().requires_grad_()
    scalar_loss(model(x)).backward()
    scalar_loss(plain_chain(net, xr)).backward()
    assert_rel_close(x.grad, xr.grad, 1e-10, "input grad")
    for (name, p), q in zip(model.named_parameters(), net.parameters()):
        assert_rel_close(p.grad, q.grad, 1e-10, name)
    assert spies["forward_halves"] == 5  # every additive coupling, in forward
    if check == "correct-forced":
        assert model.last_report.corrected  # corrections recompute from anchors through forward()
    else:
        # rebuilt from halves except at anchors of one-tensor blocks; anchored couplings use exact=
        assert spies["inverse_halves_for_backward"] == 5


def test_no_halves_under_a_global_module_hook(spies):
    net = _mixed_chain()
    model = revgrad.reversible(copy.deepcopy(net))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        scalar_loss(model(torch.randn(2, 6, 5, 4, dtype=torch.float64))).backward()
    finally:
        handle.remove()
    assert spies["forward_halves"] == 0


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET") or dispatch.triton_error() is not None,
                    reason="needs Triton's interpreter (TRITON_INTERPRET=1) to force the kernels on CPU")
def test_no_halves_where_the_kernels_run(spies):
    net = _mixed_chain().float()
    model = revgrad.reversible(copy.deepcopy(net))
    with dispatch.overridden("triton"):
        scalar_loss(model(torch.randn(2, 6, 5, 4))).backward()
    assert spies["forward_halves"] == 0 and spies["inverse_halves_for_backward"] == 0


def test_halves_type_is_a_pair():
    a, b = torch.zeros(1, 1), torch.ones(1, 2)
    parts = Halves(a, b)
    assert parts.a is a and parts.b is b and full(parts).shape == (1, 3)
