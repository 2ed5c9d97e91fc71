"""The couplings' elementwise math as fused ops: Triton kernels where :mod:`revgrad.ops.dispatch` says so,
their PyTorch twins everywhere else.

Every op here has one contract for both paths (shapes in each docstring); the twins are the test
references of ``revgrad.kernels`` (``tests/test_kernels.py``). The kernels know nothing of autograd:
:class:`_AffineCouplingFn` gives the affine forward a backward made of the backward kernel when the
forward runs with grad outside the engine (plain autograd on a GPU). Inverse ops run as kernels only
without grad (inside the engine's backward); with grad they take the differentiable PyTorch path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import dispatch
from .fingerprint import fingerprint_reference, sign_tables

FP_NONE, FP_OF_A, FP_OF_OUT = 0, 1, 2  # what residual() fingerprints (values of revgrad.kernels.FP_*)

__all__ = [
    "FP_NONE",
    "FP_OF_A",
    "FP_OF_OUT",
    "affine_backward_reference",
    "affine_coupling",
    "affine_coupling_backward",
    "affine_coupling_backward_reference",
    "affine_coupling_inverse",
    "affine_coupling_inverse_reference",
    "affine_coupling_reference",
    "affine_forward_reference",
    "affine_inverse_reference",
    "halves_are_ranges",
    "residual",
    "residual_reference",
]


# --------------------------------------------------------------------------------------------------
# Affine coupling: the elementwise math in PyTorch (the twins of the kernels' inner loops).


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _log_scale(raw: torch.Tensor, kind: str, bound: float) -> torch.Tensor:
    if kind == "sigmoid":
        return F.logsigmoid(raw + 2.0)
    if kind == "exp":
        return raw
    return math.log(bound) * torch.tanh(raw)


def _dlog_scale(raw: torch.Tensor, kind: str, bound: float) -> torch.Tensor:
    if kind == "sigmoid":
        return torch.sigmoid(-(raw + 2.0))
    if kind == "exp":
        return torch.ones_like(raw)
    t = torch.tanh(raw)
    return math.log(bound) * (1.0 - t * t)


def affine_forward_reference(
    x2: torch.Tensor, shift: torch.Tensor, raw: torch.Tensor, kind: str = "sigmoid", bound: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y2 = (x2 + shift) * s(raw)`` and ``logdet = sum(log s)`` per sample.

    Shapes: ``x2, shift, raw, y2: [B, C2, ...]``; ``logdet: [B]`` (float32, float64 for float64 x2).
    """
    acc = _acc(x2.dtype)
    log_s = _log_scale(raw.to(acc), kind, bound)
    y2 = (x2.to(acc) + shift.to(acc)) * torch.exp(log_s)
    return y2.to(x2.dtype), log_s.flatten(1).sum(1)


def affine_inverse_reference(
    y2: torch.Tensor, shift: torch.Tensor, raw: torch.Tensor, kind: str = "sigmoid", bound: float = 2.0
) -> torch.Tensor:
    """``x2 = y2 / s(raw) - shift``. Shapes as in :func:`affine_forward_reference`."""
    acc = _acc(y2.dtype)
    inv_s = torch.exp(-_log_scale(raw.to(acc), kind, bound))
    return (y2.to(acc) * inv_s - shift.to(acc)).to(y2.dtype)


def affine_backward_reference(
    y2: torch.Tensor,
    raw: torch.Tensor,
    grad_y2: torch.Tensor,
    grad_logdet: torch.Tensor | None,
    kind: str = "sigmoid",
    bound: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx2, dshift, draw)`` from the output ``y2``, ``raw`` and the incoming gradients.

    Shapes: ``y2, raw, grad_y2: [B, C2, ...]``, ``grad_logdet: [B]`` or None. ``dx2`` has ``y2``'s
    dtype, ``dshift`` and ``draw`` ``raw``'s.
    """
    acc = _acc(y2.dtype)
    raw_a = raw.to(acc)
    s = torch.exp(_log_scale(raw_a, kind, bound))
    gy = grad_y2.to(acc)
    d_s = gy * s
    inner = gy * y2.to(acc)
    if grad_logdet is not None:
        inner = inner + grad_logdet.to(acc).view(-1, *([1] * (y2.dim() - 1)))
    d_raw = inner * _dlog_scale(raw_a, kind, bound)
    return d_s.to(y2.dtype), d_s.to(raw.dtype), d_raw.to(raw.dtype)


def _halves(t: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves of ``t`` along ``dim`` (the first ``size // 2``, the rest), as views."""
    c1 = t.shape[dim] // 2
    return t.narrow(dim, 0, c1), t.narrow(dim, c1, t.shape[dim] - c1)


def halves_are_ranges(t: torch.Tensor, dim: int) -> bool:
    """Whether the halves along ``dim`` are two consecutive ranges of each (contiguous) sample: every
    dimension between the batch and ``dim`` has size 1. The kernels take only that layout; a split of
    the last dimension of ``[B, T, C]`` (strided halves) runs on the PyTorch twins."""
    return math.prod(t.shape[1:dim]) == 1


def _channels_view(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` as ``[B, size of dim, rest]`` for the kernels (which split dim 1); a layout where
    :func:`halves_are_ranges` holds."""
    return t if dim == 1 else t.reshape(t.shape[0], t.shape[dim], -1)


def _tables(t: torch.Tensor, want: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    return sign_tables(t[0].numel(), t.device) if want else None


class _AffineCouplingFn(torch.autograd.Function):
    """``(y, logdet) = affine coupling(x, h)`` with the forward and backward kernels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, h: torch.Tensor, kind: str, bound: float):  # type: ignore[override]
        y, logdet, _ = dispatch.kernels().affine_forward(x, h, kind, bound, None)
        ctx.save_for_backward(y, h)
        ctx.kind, ctx.bound = kind, bound
        return y, logdet

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor, grad_logdet: torch.Tensor):  # type: ignore[override]
        y, h = ctx.saved_tensors
        gx, dh = dispatch.kernels().affine_backward(y, h, grad_y, grad_logdet, ctx.kind, ctx.bound)
        return gx, dh, None, None


def affine_coupling(
    x: torch.Tensor, h: torch.Tensor, kind: str, bound: float, want_fingerprint: bool = False, dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``y = [x1, (x2 + shift) * s(raw)]``, ``logdet = sum(log s)`` and (optionally) the fingerprint of x.

    Shapes (split along ``dim >= 1``, ``C`` its size): ``x, y: [B, ..., C, ...]``;
    ``h = [shift, raw]: x's shape with 2 * (C - C//2) along dim``; ``logdet: [B]`` (float32; float64
    for float64 ``x``); fingerprint ``[B, 8]`` float64 or None. Differentiable.
    """
    if dispatch.use_kernels(x, h) and halves_are_ranges(x, dim):
        xv, hv = _channels_view(x, dim), _channels_view(h, dim)
        if torch.is_grad_enabled() and (x.requires_grad or h.requires_grad):
            y, logdet = _AffineCouplingFn.apply(xv, hv, kind, bound)
            return y.view(x.shape), logdet, (fingerprint_reference(x) if want_fingerprint else None)
        y, logdet, fp = dispatch.kernels().affine_forward(xv, hv, kind, bound, _tables(x, want_fingerprint))
        return y.view(x.shape), logdet, fp
    return affine_coupling_reference(x, h, kind, bound, want_fingerprint, dim)


def affine_coupling_reference(
    x: torch.Tensor, h: torch.Tensor, kind: str, bound: float, want_fingerprint: bool = False, dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """PyTorch twin of :func:`affine_coupling` (and of ``revgrad.kernels.affine_forward``)."""
    x1, x2 = _halves(x, dim)
    shift, raw = h.chunk(2, dim=dim)
    y2, logdet = affine_forward_reference(x2, shift, raw, kind, bound)
    fp = fingerprint_reference(x) if want_fingerprint else None
    return torch.cat([x1, y2], dim=dim), logdet, fp


def affine_coupling_inverse(
    y: torch.Tensor, h: torch.Tensor, kind: str, bound: float, want_fingerprint: bool = False, dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x = [y1, y2 / s(raw) - shift]`` and (optionally) the fingerprint of ``x`` as stored.

    Shapes as in :func:`affine_coupling`. Differentiable (the kernel runs only when nothing needs grad).
    """
    needs_grad = torch.is_grad_enabled() and (y.requires_grad or h.requires_grad)
    if not needs_grad and dispatch.use_kernels(y, h) and halves_are_ranges(y, dim):
        x, fp = dispatch.kernels().affine_inverse(
            _channels_view(y, dim), _channels_view(h, dim), kind, bound, _tables(y, want_fingerprint)
        )
        return x.view(y.shape), fp
    return affine_coupling_inverse_reference(y, h, kind, bound, want_fingerprint, dim)


def affine_coupling_inverse_reference(
    y: torch.Tensor, h: torch.Tensor, kind: str, bound: float, want_fingerprint: bool = False, dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PyTorch twin of :func:`affine_coupling_inverse` (and of ``revgrad.kernels.affine_inverse``)."""
    y1, y2 = _halves(y, dim)
    shift, raw = h.chunk(2, dim=dim)
    x = torch.cat([y1, affine_inverse_reference(y2, shift, raw, kind, bound)], dim=dim)
    return x, (fingerprint_reference(x) if want_fingerprint else None)


def affine_coupling_backward(
    y: torch.Tensor,
    h: torch.Tensor,
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor | None,
    kind: str,
    bound: float,
    dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gx, dh)`` of the affine coupling at output ``y`` (no grad; used inside backward).

    ``gx = [gy1, gy2 * s]`` (``grad_y``'s shape; the conditioner's VJP for ``x1`` is added by the
    caller) and ``dh = [dshift, draw]`` (``h``'s shape and dtype). ``grad_logdet``: ``[B]`` or None.
    """
    if dispatch.use_kernels(y, h, grad_y) and halves_are_ranges(y, dim):
        gx, dh = dispatch.kernels().affine_backward(
            _channels_view(y, dim), _channels_view(h, dim), _channels_view(grad_y, dim), grad_logdet, kind, bound
        )
        return gx.view(grad_y.shape), dh.view(h.shape)
    return affine_coupling_backward_reference(y, h, grad_y, grad_logdet, kind, bound, dim)


def affine_coupling_backward_reference(
    y: torch.Tensor,
    h: torch.Tensor,
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor | None,
    kind: str,
    bound: float,
    dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch twin of :func:`affine_coupling_backward` (and of ``revgrad.kernels.affine_backward``)."""
    gy1, gy2 = _halves(grad_y, dim)
    _, raw = h.chunk(2, dim=dim)
    dx2, dshift, draw = affine_backward_reference(_halves(y, dim)[1], raw, gy2, grad_logdet, kind, bound)
    return torch.cat([gy1, dx2.to(grad_y.dtype)], dim=dim), torch.cat([dshift, draw], dim=dim)


def residual_reference(
    a: torch.Tensor, r: torch.Tensor, out: torch.Tensor, offset: int, subtract: bool, fingerprint_of: int = 0
) -> torch.Tensor | None:
    """Twin of ``revgrad.kernels.residual``: ``out.flat[offset : offset + L] = a.flat[...] ± r`` per
    sample (float32 math), and the fingerprint of ``a`` (1) or ``out`` (2) restricted to that range."""
    batch = a.shape[0]
    length = r[0].numel()
    span = slice(offset, offset + length)
    a_flat, out_flat = a.reshape(batch, -1), out.view(batch, -1)
    r_flat = r.reshape(batch, -1).float()
    value = a_flat[:, span].float() - r_flat if subtract else a_flat[:, span].float() + r_flat
    out_flat[:, span] = value.to(out.dtype)
    if not fingerprint_of:
        return None
    source = a_flat if fingerprint_of == 1 else out_flat
    masked = torch.zeros_like(source)
    masked[:, span] = source[:, span]
    return fingerprint_reference(masked)


def residual(
    a: torch.Tensor, r: torch.Tensor, out: torch.Tensor, offset: int, subtract: bool, fingerprint_of: int = 0
) -> torch.Tensor | None:
    """``out.flat[offset:offset+L] = a.flat[offset:offset+L] ± r.flat`` per sample, in place.

    Shapes: ``a, out: [B, ...]`` contiguous with ``D`` elements per sample, ``r: [B, ...]`` with
    ``L`` elements per sample. ``fingerprint_of``: 0 none, 1 of ``a``, 2 of ``out``, over the range only
    (``[B, 8]`` float64; the two halves' partials add up to the whole fingerprint). No autograd.
    """
    if dispatch.use_kernels(a, r, out):
        tables = _tables(a, bool(fingerprint_of))
        return dispatch.kernels().residual(a, r, out, offset, subtract, fingerprint_of, tables)
    return residual_reference(a, r, out, offset, subtract, fingerprint_of)
