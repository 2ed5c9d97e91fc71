"""The engine on a GPU: gradients vs plain autograd, correction, RNG replay, autocast, memory.

Marked ``cuda`` and skipped without a GPU (``bench/gpu_suite.sh`` runs them whenever one is lent).
``REVGRAD_TEST_DEVICE=cpu`` (with ``TRITON_INTERPRET=1``) runs the same tests on the CPU, to check
the tests themselves where no GPU is at hand, through the code path CUDA takes: ``tests/conftest.py``
forces the kernels (through the interpreter: one tensor per block, fingerprints inside the kernels)
and deferred checks, which CPU tensors would otherwise not take. Kernels are on by default on CUDA
(``REVGRAD_KERNELS=auto``), so these tests also cover the kernels inside the engine. Float32
convolutions run in IEEE float32 (``tests/conftest.py``; cuDNN's default is TF32).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from chains import assert_healthy, assert_unstable, exploding_chain, gradient_sensitive_chain, healthy_chain
from reference import TOL, assert_rel_close, named_grads, plain_chain, rel_error, scalar_loss
from torch import nn

import revgrad

TOL32 = revgrad.default_tol(torch.float32)
DEVICE = "cuda" if torch.cuda.is_available() else os.environ.get("REVGRAD_TEST_DEVICE")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE is None, reason="needs a CUDA device (or REVGRAD_TEST_DEVICE=cpu for a dry run)"),
]


def _grads_vs_plain_fp64(chain: nn.Sequential, x: torch.Tensor, check: str, tol: float, steps: int = 1, **options):
    """``steps`` backward passes of one model (the first probes the VJPs' sensitivity, the next ones
    do not), each compared with plain autograd in float64."""
    plain = copy.deepcopy(chain).double()
    xp = x.double().requires_grad_()
    scalar_loss(plain_chain(list(plain), xp)).backward()
    ref = named_grads(plain)
    rev = revgrad.reversible(chain, check=check, **options)
    for _ in range(steps):
        rev.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        scalar_loss(rev(xr)).backward()
        assert_rel_close(xr.grad, xp.grad, tol, "dL/dx")
        for name, g in named_grads(rev).items():
            assert_rel_close(g, ref[name], tol, name)
    return rev


@pytest.mark.parametrize("check", ["off", "detect", "correct"])
def test_healthy_chain_matches_plain_autograd(check):
    chain = healthy_chain(9, channels=6, seed=3).to(DEVICE)
    chain.eval()  # BatchNorm in eval: the float64 reference computes the same function
    x = torch.randn(4, 6, 8, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    # Premise, on this device's rounding (its convolutions, the kernels' exp2): rebuilt from the top
    # without anchors, every input is within tol / 10, so no check fails and check="off" is exact too.
    assert_healthy(chain, x, TOL32, anchors=None)
    rev = _grads_vs_plain_fp64(chain, x, check, 5 * TOL[torch.float32], steps=2)
    if check != "off":
        assert not rev.last_report.corrected
        assert rev.last_report.max_error < 1e-5
        # On CUDA the checks are settled with one host sync per backward, not one per block (the
        # CPU dry run forces the same, tests/conftest.py), except in a backward that probes the
        # VJPs' sensitivity (the first, here).
        assert rev.last_report.deferred and not rev.last_report.probed


def test_exploding_chain_is_corrected():
    chain = exploding_chain(depth=12).to(DEVICE)
    torch.manual_seed(1)
    x = torch.randn(3, 4, 5, 7).to(DEVICE)
    assert_unstable(chain, x, TOL32)  # premise, on this device's rounding: checks fail, by >= 100x
    rev = _grads_vs_plain_fp64(chain, x, "correct", 1e-4, probe_every=0)  # the first backward defers
    assert rev.last_report.corrected
    # Checks are deferred on CUDA (and on the CPU dry run, which forces them): the deferred pass
    # failed and ran again with a check per block.
    assert rev.last_report.deferred and rev.last_report.rerun


def test_gradient_sensitive_chain_is_corrected():
    """The VJP-sensitivity probe on the device's code path (kernels, deferred checks): every check
    passes, the gradient of unchecked backprop is far off, the default engine's is not."""
    chain = gradient_sensitive_chain().to(DEVICE)
    torch.manual_seed(3)
    x = torch.randn(4, 4, 8, 8).to(DEVICE)
    assert_healthy(chain, x, TOL32, margin=5, anchors=10)
    plain = copy.deepcopy(chain)
    xp = x.clone().requires_grad_()
    scalar_loss(plain_chain(list(plain), xp)).backward()
    ref = torch.cat([xp.grad.flatten(), *(p.grad.flatten() for p in plain.parameters())])
    errors = {}
    for name, options in {"off": {"check": "off"}, "default": {"anchor_every": 10}}.items():
        rev = revgrad.reversible(copy.deepcopy(chain), **options)
        for _ in range(2):
            rev.zero_grad(set_to_none=True)
            xr = x.clone().requires_grad_()
            scalar_loss(rev(xr)).backward()
            got = torch.cat([xr.grad.flatten(), *(p.grad.flatten() for p in rev.parameters())])
            errors[name] = max(errors.get(name, 0.0), rel_error(got, ref))
    assert errors["off"] >= 1e-3, f"premise: unchecked backprop should be far off ({errors['off']:.3g})"
    assert errors["default"] <= 1e-5, errors


def test_cuda_tests_run_in_ieee_float32_and_on_the_cuda_code_path(monkeypatch):
    """The conditions the other tests assume: IEEE float32 convolutions (not TF32), and on the CPU dry
    run the kernels and deferred checks, as on CUDA: an additive chain runs its residual kernels."""
    from conftest import IEEE_FLOAT32, float32_precision

    from revgrad.engine import backprop as engine
    from revgrad.ops import dispatch

    assert float32_precision() == IEEE_FLOAT32
    assert dispatch.use_kernels(torch.zeros(2, device=DEVICE))
    assert engine.DEFER_CHECKS == "always" or torch.device(DEVICE).type == "cuda"
    calls = []
    real = dispatch.kernels().residual
    monkeypatch.setattr(dispatch.kernels(), "residual", lambda *a: calls.append(a[5]) or real(*a))
    torch.manual_seed(2)
    rev = revgrad.reversible(nn.Sequential(*[
        revgrad.AdditiveCoupling(nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)) for _ in range(3)
    ]).to(DEVICE), probe_every=0)  # a probed backward checks per block
    x = torch.randn(2, 4, 5, 5, device=DEVICE, requires_grad=True)
    rev(x).square().sum().backward()
    assert rev.last_report.deferred
    # Residual kernels ran with the fingerprint folded in, in forward (of a) and backward (of out).
    assert 1 in calls and 2 in calls, calls


def test_dropout_masks_replayed():
    torch.manual_seed(4)
    blocks = [
        revgrad.AdditiveCoupling(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Dropout(0.3)),
                                 nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Dropout(0.3)))
        for _ in range(5)
    ]
    chain = nn.Sequential(*blocks).to(DEVICE)
    ref = copy.deepcopy(chain)
    x0 = torch.randn(2, 6, 8, 8, device=DEVICE)
    grads = []
    for model in (revgrad.reversible(chain), ref):
        torch.manual_seed(5)
        x = x0.clone().requires_grad_()
        out = model(x) if model is not ref else plain_chain(list(ref), x)
        torch.rand(3, device=DEVICE)  # the caller draws between forward and backward
        scalar_loss(out).backward()
        grads.append((x.grad, named_grads(model)))
    assert_rel_close(grads[0][0], grads[1][0], name="dL/dx")
    for name, g in grads[0][1].items():
        assert_rel_close(g, grads[1][1][name], name=name)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 autocast on CUDA")
def test_bf16_autocast_matches_plain_autocast():
    chain = healthy_chain(6, channels=6, seed=6).to(DEVICE).eval()
    ref = copy.deepcopy(chain)
    x0 = torch.randn(4, 6, 8, 8, device=DEVICE)
    results = []
    for model in (revgrad.reversible(chain), None):
        x = x0.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x) if model is not None else plain_chain(list(ref), x)
        scalar_loss(out).backward()
        results.append((x.grad, named_grads(model if model is not None else ref)))
    assert_rel_close(results[0][0], results[1][0], TOL[torch.bfloat16], "dL/dx")
    for name, g in results[0][1].items():
        assert_rel_close(g, results[1][1][name], TOL[torch.bfloat16], name)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA allocator statistics")
def test_held_memory_flat_in_depth():
    held = {}
    for depth in (4, 16):
        torch.manual_seed(0)
        chain = nn.Sequential(*[
            revgrad.AdditiveCoupling(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
            for _ in range(depth)
        ]).to(DEVICE)
        rev = revgrad.reversible(chain, check="off")
        x = torch.randn(8, 16, 32, 32, device=DEVICE, requires_grad=True)
        rev(x).sum().backward()  # warm-up: lazily created state
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        y = rev(x)
        held[depth] = torch.cuda.memory_allocated() - before
        y.sum().backward()
    activation = 8 * 16 * 32 * 32 * 4
    assert held[16] <= held[4] + activation // 4, held
    assert held[16] <= 2 * activation, held
