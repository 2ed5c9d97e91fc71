"""The fused coupling ops, each in three providers, with the bytes each must move.

Providers compute the same outputs, extra outputs included (fingerprints, log-determinants):

* ``triton``: the kernels of ``revgrad.kernels`` (their launchers, no autograd);
* ``eager``: the PyTorch twins in ``revgrad.ops.fused`` / ``revgrad.fingerprint``, op by op;
* ``compile``: ``torch.compile`` of the same twins (what the compiler makes of the same math): one
  compiled function per op, dtype and shape, each with its own code object, so that no function
  collects more than one compiled graph (dynamo keeps its cache per code object and, past
  ``recompile_limit`` entries, 8, would run the rest eager: that silently timed eager as "compile"
  for 2 of the 10 op x dtype variants). A variant that compiles no graph, or that would fall back
  to eager later, raises (:func:`compiled_graphs` counts the graphs).

Bandwidth is reported as the minimum bytes an op has to read and write (its inputs once, its outputs
once) divided by the time: the number that a one-pass kernel can bring close to the device's copy
bandwidth and an op-by-op implementation cannot.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from revgrad.ops import fused
from revgrad.ops.fingerprint import fingerprint_reference, sign_tables

OPS = ("fingerprint", "affine_forward", "affine_inverse", "affine_backward", "residual")
PROVIDERS = ("triton", "eager", "compile")


@dataclass
class Case:
    """One op on one input: ``run()`` computes it, ``nbytes`` is the traffic it needs at least."""

    op: str
    provider: str
    run: Callable[[], object]
    nbytes: int


@dataclass
class Inputs:
    """Block tensors for one shape ``[B, C, ...]``: the input/output ``x``, the conditioner output ``h``
    (``[B, 2 * C2, ...]``), an incoming gradient ``gy``, a logdet gradient ``gld`` ``[B]``, a residual
    ``r`` (``[B, C2, ...]``) and ``split`` (elements per sample in the first half)."""

    x: torch.Tensor
    h: torch.Tensor
    gy: torch.Tensor
    gld: torch.Tensor
    r: torch.Tensor
    split: int


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> Inputs:
    """Seeded :class:`Inputs` for ``shape = [B, C, ...]``."""
    gen = torch.Generator().manual_seed(0)
    batch, channels = shape[0], shape[1]
    c1, c2 = channels // 2, channels - channels // 2

    def rand(*s: int) -> torch.Tensor:
        return torch.randn(s, generator=gen).to(device, dtype)

    x = rand(*shape)
    return Inputs(x, rand(batch, 2 * c2, *shape[2:]) * 0.5, rand(*shape), torch.randn(batch, generator=gen).to(device),
                  rand(batch, c2, *shape[2:]), x[0, :c1].numel())


def _eager(op: str, t: Inputs) -> Callable[[], object]:
    if op == "fingerprint":
        return lambda: fingerprint_reference(t.x)
    if op == "affine_forward":
        return lambda: fused.affine_coupling_reference(t.x, t.h, "sigmoid", 2.0, True)
    if op == "affine_inverse":
        return lambda: fused.affine_coupling_inverse_reference(t.x, t.h, "sigmoid", 2.0, True)
    if op == "affine_backward":
        return lambda: fused.affine_coupling_backward_reference(t.x, t.h, t.gy, t.gld, "sigmoid", 2.0)
    out = torch.empty_like(t.x)
    return lambda: fused.residual_reference(t.x, t.r, out, t.split, False, fused.FP_OF_A)


def _triton(op: str, t: Inputs) -> Callable[[], object]:
    from revgrad import kernels

    tables = sign_tables(t.x[0].numel(), t.x.device)
    if op == "fingerprint":
        return lambda: kernels.fingerprint(t.x, *tables)
    if op == "affine_forward":
        return lambda: kernels.affine_forward(t.x, t.h, "sigmoid", 2.0, tables)
    if op == "affine_inverse":
        return lambda: kernels.affine_inverse(t.x, t.h, "sigmoid", 2.0, tables)
    if op == "affine_backward":
        return lambda: kernels.affine_backward(t.x, t.h, t.gy, t.gld, "sigmoid", 2.0)
    out = torch.empty_like(t.x)
    return lambda: kernels.residual(t.x, t.r, out, t.split, False, kernels.FP_OF_A, tables)


# The compile provider's backend ("eager" makes the tests cheap: dynamo still traces and caches).
COMPILE_BACKEND = "inductor"
_GRAPHS: dict[tuple, int] = {}


def compiled_graphs(op: str, t: Inputs) -> int:
    """How many graphs torch.compile built for ``op`` on inputs like ``t`` (0: it ran eager)."""
    return _GRAPHS.get(_variant(op, t), 0)


def _variant(op: str, t: Inputs) -> tuple:
    return op, t.split, t.x.dtype, tuple(t.x.shape), t.x.device.type


@functools.cache
def _compiled(variant: tuple) -> Callable[..., object]:
    op, split = variant[:2]

    def twin(x, h, gy, gld, r):
        return _eager(op, Inputs(x, h, gy, gld, r, split))()

    # A code object of its own: dynamo's cache (and its recompile limit) is per code object.
    twin.__code__ = twin.__code__.replace(co_name=f"twin_{abs(hash(variant))}")
    backend = torch._dynamo.lookup_backend(COMPILE_BACKEND)

    def counting(gm, example_inputs):
        _GRAPHS[variant] = _GRAPHS.get(variant, 0) + 1
        return backend(gm, example_inputs)

    return torch.compile(twin, backend=counting, dynamic=False)


def _compile(op: str, t: Inputs) -> Callable[[], object]:
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):  # raise rather than run eager
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    variant = _variant(op, t)
    fn = _compiled(variant)
    fn(t.x, t.h, t.gy, t.gld, t.r)
    if not _GRAPHS.get(variant):
        raise RuntimeError(f"torch.compile built no graph for {variant}: it would time eager as 'compile'")
    return lambda: fn(t.x, t.h, t.gy, t.gld, t.r)


def traffic(op: str, t: Inputs) -> int:
    """Bytes the op must read and write at least (tables and per-sample outputs are negligible)."""
    elt = t.x.element_size()
    d = t.x.numel()
    d2 = t.r.numel()
    return elt * {
        "fingerprint": d,
        "affine_forward": 2 * d + 2 * d2,  # read x, h; write y
        "affine_inverse": 2 * d + 2 * d2,
        "affine_backward": 2 * d + 4 * d2,  # read gy, y2, raw; write gx, dh
        "residual": 3 * d2,  # read a and r over the range, write out
    }[op]


def case(op: str, provider: str, t: Inputs) -> Case:
    """The ``op`` for ``provider`` on inputs ``t`` (from :func:`make_inputs`)."""
    builder = {"triton": _triton, "eager": _eager, "compile": _compile}[provider]
    return Case(op, provider, builder(op, t), traffic(op, t))


def outputs_agree(op: str, t: Inputs, provider: str) -> float:
    """Largest relative L2 error of ``provider``'s outputs against eager's (benchmarks refuse to
    report a provider whose math differs)."""
    def flat(v):
        if isinstance(v, torch.Tensor):
            return [v]
        return [u for item in v if item is not None for u in flat(item)]

    got = flat(case(op, provider, t).run())
    want = flat(case(op, "eager", t).run())
    worst = 0.0
    for a, b in zip(got, want):
        a64, b64 = a.double(), b.double()
        worst = max(worst, float((a64 - b64).norm() / b64.norm().clamp_min(1e-30)))
    return worst
