"""Triton kernels (``revgrad.kernels``) against their PyTorch twins (``revgrad.ops.fused``, fingerprint).

Runs on CUDA when present, else on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``,
as the README's test command sets). Shapes are small and odd: the interpreter is slow.

Tolerances (relative L2 error, kernel vs twin; both compute in float32, so differences are a few
float32 ulps from a different but equally exact formula, e.g. ``sigmoid(z)`` vs ``exp(logsigmoid(z))``,
plus one rounding of the stored result):

| dtype    | outputs | why                                                     |
|----------|---------|---------------------------------------------------------|
| float32  | 1e-6    | float32 ulps (eps 1.2e-7) of the elementwise math       |
| float16  | 1e-3    | a stored element may round the other way (eps 9.8e-4)   |
| bfloat16 | 8e-3    | a stored element may round the other way (eps 7.8e-3)   |

Log-determinants and fingerprints are float32/float64 whatever the input dtype: 1e-6 against the
twin. Gradients through the engine with kernels on are held to ``tests/reference.py``'s table.
"""

from __future__ import annotations

import os

import pytest
import torch
from chains import assert_healthy, assert_unstable, exploding_chain
from reference import TOL, assert_rel_close, named_grads, plain_chain, scalar_loss
from torch import nn

import revgrad
from revgrad.engine.checks import relative_error
from revgrad.ops import dispatch, fused
from revgrad.ops.fingerprint import fingerprint_reference, sign_tables

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    DEVICE = None

_UNAVAILABLE = "kernels need CUDA or Triton's interpreter (TRITON_INTERPRET=1) and an importable triton"
if os.environ.get("REVGRAD_REQUIRE_KERNELS") == "1" and (DEVICE is None or dispatch.triton_error()):
    raise RuntimeError(f"REVGRAD_REQUIRE_KERNELS=1: {_UNAVAILABLE} ({dispatch.triton_error()})")
pytestmark = pytest.mark.skipif(DEVICE is None or dispatch.triton_error() is not None, reason=_UNAVAILABLE)

OUT_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
STAT_TOL = 1e-6
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in OUT_TOL]
KINDS = ["sigmoid", "exp", "bounded"]
# (shape, id): odd channel counts (uneven halves), one element per sample, several programs per
# sample with the split inside a chunk, 2-d inputs.
SHAPES = [
    pytest.param((3, 5, 7, 9), id="3x5x7x9"),
    pytest.param((2, 2), id="2x2"),
    pytest.param((2, 3, 1), id="2x3x1"),
    pytest.param((2, 7, 13, 19), id="2x7x13x19-multiblock"),
]


def _k():
    return dispatch.kernels()


def _inputs(shape, dtype, noncontiguous=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    c2 = shape[1] - shape[1] // 2
    h = torch.randn((shape[0], 2 * c2, *shape[2:]), generator=gen) * 0.5
    x, h = x.to(DEVICE, dtype), h.to(DEVICE, dtype)
    if noncontiguous:  # same values, transposed storage: the launcher must make them contiguous
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
        h = h.transpose(0, -1).contiguous().transpose(0, -1)
    return x, h


def _tables(t):
    return sign_tables(t[0].numel(), t.device)


def _check(actual, expected, tol, name):
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert_rel_close(actual, expected, tol, name)


# --------------------------------------------------------------------------------------------------
# Each kernel against its twin.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fingerprint_kernel(shape, dtype):
    x, _ = _inputs(shape, dtype)
    got = _k().fingerprint(x, *_tables(x))
    _check(got, fingerprint_reference(x), STAT_TOL, "fingerprint")
    # A wrong sign table must show: the comparison can fail.
    within, flips = _tables(x)
    assert relative_error(_k().fingerprint(x, -within, flips), fingerprint_reference(x)) > 1.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_affine_forward_kernel(shape, dtype, kind):
    x, h = _inputs(shape, dtype, noncontiguous=len(shape) == 4)
    y, logdet, fp = _k().affine_forward(x, h, kind, 1.7, _tables(x))
    y_ref, logdet_ref, fp_ref = fused.affine_coupling_reference(x, h, kind, 1.7, want_fingerprint=True)
    _check(y, y_ref, OUT_TOL[dtype], "y")
    _check(logdet, logdet_ref, STAT_TOL, "logdet")
    _check(fp, fp_ref, STAT_TOL, "fingerprint of x")
    y2, logdet2, none = _k().affine_forward(x, h, kind, 1.7, None)
    assert none is None and torch.equal(y2, y) and torch.equal(logdet2, logdet)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_affine_inverse_kernel(shape, dtype, kind):
    y, h = _inputs(shape, dtype, noncontiguous=len(shape) == 4, seed=1)
    x, fp = _k().affine_inverse(y, h, kind, 1.7, _tables(y))
    x_ref, fp_ref = fused.affine_coupling_inverse_reference(y, h, kind, 1.7, want_fingerprint=True)
    _check(x, x_ref, OUT_TOL[dtype], "x")
    # The fingerprint is of x as stored (rounded to its dtype): equal to the twin's fingerprint of x.
    _check(fp, fingerprint_reference(x), STAT_TOL, "fingerprint of rebuilt x")
    if dtype == torch.float32:
        _check(fp, fp_ref, STAT_TOL, "fingerprint vs twin")
    # Round trip through the forward kernel.
    back, _, _ = _k().affine_forward(x, h, kind, 1.7, None)
    _check(back, y, 10 * OUT_TOL[dtype], "forward(inverse(y))")


@pytest.mark.parametrize("with_logdet", [True, False], ids=["dlogdet", "no-dlogdet"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_affine_backward_kernel(shape, dtype, kind, with_logdet):
    y, h = _inputs(shape, dtype, seed=2)
    gy, _ = _inputs(shape, dtype, noncontiguous=len(shape) == 4, seed=3)
    gld = torch.randn(shape[0], device=DEVICE) if with_logdet else None
    gx, dh = _k().affine_backward(y, h, gy, gld, kind, 1.7)
    gx_ref, dh_ref = fused.affine_coupling_backward_reference(y, h, gy, gld, kind, 1.7)
    _check(gx, gx_ref, OUT_TOL[dtype], "gx")
    _check(dh, dh_ref, OUT_TOL[dtype], "dh")


@pytest.mark.parametrize("fp_of", [0, 1, 2], ids=["no-fp", "fp-of-a", "fp-of-out"])
@pytest.mark.parametrize("subtract", [False, True], ids=["add", "sub"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_residual_kernel(shape, dtype, subtract, fp_of):
    a, _ = _inputs(shape, dtype, seed=4)
    c1 = shape[1] // 2
    split = a[0, :c1].numel()
    r_first = torch.randn((shape[0], c1, *shape[2:]), device=DEVICE).to(dtype)
    r_second = torch.randn((shape[0], shape[1] - c1, *shape[2:]), device=DEVICE).to(dtype)
    out, out_ref = torch.full_like(a, float("nan")), torch.full_like(a, float("nan"))
    fps = []
    for r, offset in ((r_first, 0), (r_second, split)):
        got = _k().residual(a, r, out, offset, subtract, fp_of, _tables(a) if fp_of else None)
        want = fused.residual_reference(a, r, out_ref, offset, subtract, fp_of)
        if fp_of == 2 and dtype != torch.float32:
            # Of out as the kernel stored it (an element may round the other way than the twin's).
            want = fused.residual_reference(out, torch.zeros_like(r), torch.empty_like(out), offset, False, 1)
        if fp_of:
            _check(got, want, STAT_TOL, f"partial fingerprint at {offset}")
            fps.append(got)
        else:
            assert got is None
    _check(out, out_ref, OUT_TOL[dtype], "out")
    assert torch.isfinite(out.float()).all(), "a range was left unwritten"
    if fp_of:
        whole = fingerprint_reference(a if fp_of == 1 else out)
        _check(fps[0] + fps[1], whole, STAT_TOL, "sum of the halves' fingerprints")


def test_launchers_reject_bad_input():
    x, h = _inputs((2, 4, 3), torch.float32)
    with pytest.raises(ValueError, match="conditioner output must be"):
        _k().affine_forward(x, h[:, :2], "sigmoid", 2.0, None)
    with pytest.raises(ValueError, match="scale must be one of"):
        _k().affine_forward(x, h, "tanh", 2.0, None)
    with pytest.raises(ValueError, match="flips has"):
        _k().fingerprint(torch.randn(2, 300, device=DEVICE), *_tables(x))
    with pytest.raises(ValueError, match="does not fit"):
        _k().residual(x, x, torch.empty_like(x), 5, False)


# --------------------------------------------------------------------------------------------------
# Dispatch.


def test_dispatch_modes(monkeypatch):
    cpu32 = torch.zeros(2, 2)
    monkeypatch.setenv(dispatch.ENV, "torch")
    assert not dispatch.use_kernels(cpu32)
    monkeypatch.setenv(dispatch.ENV, "auto")
    assert dispatch.use_kernels(cpu32) is False  # CPU tensors: the PyTorch path
    monkeypatch.setenv(dispatch.ENV, "triton")
    assert dispatch.use_kernels(cpu32.to(DEVICE))
    assert not dispatch.use_kernels(cpu32.double().to(DEVICE)), "float64 never runs as a kernel"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.use_kernels(cpu32)
    monkeypatch.setenv(dispatch.ENV, "cuda")
    with pytest.raises(ValueError, match="REVGRAD_KERNELS='cuda' is not one of"):
        dispatch.use_kernels(cpu32)


def test_kernel_dispatch_reaches_the_launchers(monkeypatch):
    calls = []
    real = _k().affine_forward
    monkeypatch.setattr(_k(), "affine_forward", lambda *a: calls.append(1) or real(*a))
    x, h = _inputs((2, 4, 3), torch.float32)
    with dispatch.overridden("torch"):
        fused.affine_coupling(x, h, "sigmoid", 2.0)
    assert not calls
    with dispatch.overridden("triton"):
        fused.affine_coupling(x, h, "sigmoid", 2.0)
    assert calls


# --------------------------------------------------------------------------------------------------
# Autograd through the kernels, and the engine with kernels on.


@pytest.mark.parametrize("kind", KINDS)
def test_affine_function_gradients_match_autograd(kind):
    x, h = _inputs((3, 5, 7, 9), torch.float32, seed=5)
    gy, _ = _inputs((3, 5, 7, 9), torch.float32, seed=6)
    gld = torch.randn(3, device=DEVICE)
    grads = {}
    for mode in ("torch", "triton"):
        xr, hr = x.clone().requires_grad_(), h.clone().requires_grad_()
        with dispatch.overridden(mode):
            y, logdet, _ = fused.affine_coupling(xr, hr, kind, 1.7)
        torch.autograd.backward([y, logdet], [gy, gld])
        grads[mode] = (xr.grad, hr.grad)
    assert_rel_close(grads["triton"][0], grads["torch"][0], name="dL/dx")
    assert_rel_close(grads["triton"][1], grads["torch"][1], name="dL/dh")


def _glow_stage(channels: int, depth: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    blocks: list[nn.Module] = []
    for i in range(depth):
        c1, c2 = channels // 2, channels - channels // 2
        net = nn.Sequential(nn.Conv2d(c1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 2 * c2, 3, padding=1))
        nn.init.normal_(net[2].weight, std=0.05)
        blocks += [revgrad.ActNorm(channels), revgrad.InvertibleConv1x1(channels, lu=i % 2 == 0)]
        blocks.append(revgrad.AffineCoupling(net, scale=KINDS[i % 3], bound=1.7))
        if i % 2:
            half = channels // 2
            blocks.append(revgrad.AdditiveCoupling(nn.Conv2d(channels - half, half, 3, padding=1),
                                                   nn.Conv2d(half, channels - half, 3, padding=1)))
    return nn.Sequential(*blocks).to(DEVICE)


@pytest.mark.parametrize("check", ["off", "correct"])
def test_glow_stage_trains_with_kernels_like_plain_autograd(check):
    """Three SGD steps of a reversible float32 stage with kernels on; at every step its gradients
    match plain autograd in float64 at the same parameters (copied over before each step, so the
    two runs cannot drift apart through the optimizer)."""
    import copy

    stage = _glow_stage(5, 3, seed=7)
    plain = copy.deepcopy(stage).double()
    rev = revgrad.reversible(copy.deepcopy(stage), check=check)
    opt = torch.optim.SGD(rev.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(8)
    for step in range(3):
        plain.load_state_dict(rev.state_dict())
        x = torch.randn(3, 5, 7, 9, generator=gen).to(DEVICE)
        if step == 0:  # premise: rebuilt from the top, every input within tol / 10 (check="off" is exact)
            with dispatch.overridden("triton"):
                assert_healthy(stage, x, revgrad.default_tol(torch.float32), anchors=None)
        with dispatch.overridden("torch"):
            xp = x.double().requires_grad_()
            scalar_loss(plain_chain(list(plain), xp)).backward()
        with dispatch.overridden("triton"):
            xr = x.clone().requires_grad_()
            scalar_loss(rev(xr)).backward()
        assert_rel_close(xr.grad, xp.grad, TOL[torch.float32], f"step {step} dL/dx")
        ref = named_grads(plain)
        for name, g in named_grads(rev).items():
            assert_rel_close(g, ref[name], TOL[torch.float32], f"step {step} {name}")
        if check == "correct":
            report = rev.last_report
            assert not report.corrected and report.max_error < 1e-5, report
        opt.step()
        opt.zero_grad()
        plain.zero_grad()


def test_fused_blocks_fingerprint_inside_their_kernels(monkeypatch):
    """With kernels on, the engine never fingerprints a coupling's input itself."""
    import revgrad.engine.backprop as engine

    calls = []
    real, real_parts = engine.fingerprint, engine.fingerprint_parts
    monkeypatch.setattr(engine, "fingerprint", lambda t: calls.append(t.shape) or real(t))
    monkeypatch.setattr(engine, "fingerprint_parts", lambda *ts: calls.append(len(ts)) or real_parts(*ts))
    torch.manual_seed(9)
    blocks = [revgrad.AffineCoupling(nn.Conv2d(2, 6, 3, padding=1)) for _ in range(4)]
    blocks += [revgrad.AdditiveCoupling(nn.Conv2d(3, 2, 1), nn.Conv2d(2, 3, 1)) for _ in range(4)]
    rev = revgrad.reversible(nn.Sequential(*blocks).to(DEVICE), check="detect")
    x = torch.randn(2, 5, 4, 6, device=DEVICE, requires_grad=True)
    with dispatch.overridden("triton"):
        assert_healthy(rev, x, revgrad.default_tol(torch.float32), anchors=None)  # premise: errors < 1e-6
        y, logdet = rev(x)
        (y.square().sum() + logdet.sum()).backward()
    assert calls == []
    assert max(rev.last_report.errors[1:]) < 1e-6
    with dispatch.overridden("torch"):  # the control: on the PyTorch path additive couplings leave it to the engine
        y, logdet = rev(x)
        (y.square().sum() + logdet.sum()).backward()
    assert len(calls) == 2 * 4  # forward and backward, 4 additive couplings (of their halves: calls == [2] * 8)


def test_kernel_fingerprints_catch_an_exploding_inverse():
    """The exploding chain of test_verified: kernel fingerprints flag it, correction fixes gradients."""
    chain = exploding_chain(seed=0).to(DEVICE)
    torch.manual_seed(1)
    x = torch.randn(3, 4, 5, 7).to(DEVICE)
    with dispatch.overridden("triton"):  # premise: inputs rebuilt by the kernels are off by >= 100 tol
        assert_unstable(chain, x, revgrad.default_tol(torch.float32))
    xp = x.clone().requires_grad_()
    with dispatch.overridden("torch"):
        scalar_loss(plain_chain(list(chain), xp)).backward()
    ref = named_grads(chain)
    chain.zero_grad()
    rev = revgrad.reversible(chain, check="correct")
    xr = x.clone().requires_grad_()
    with dispatch.overridden("triton"):
        scalar_loss(rev(xr)).backward()
    assert rev.last_report.corrected, "the drift went unnoticed"
    assert_rel_close(xr.grad, xp.grad, 1e-4, "dL/dx")
    for name, g in named_grads(rev).items():
        assert_rel_close(g, ref[name], 1e-4, name)


def test_functorch_transforms_take_the_pytorch_path():
    """torch.func (the diagnostics' jvp/vjp) cannot run kernels: it must get the twin, same numbers."""
    torch.manual_seed(10)
    block = revgrad.AffineCoupling(nn.Conv2d(2, 6, 3, padding=1)).to(DEVICE)
    x = torch.randn(2, 5, 4, 6, device=DEVICE)
    v = torch.randn_like(x)
    results = []
    for mode in ("triton", "torch"):
        with dispatch.overridden(mode):
            results.append(torch.func.jvp(lambda t: block(t)[0], (x,), (v,))[1])
    assert_rel_close(results[0], results[1], TOL[torch.float32], "J v")
