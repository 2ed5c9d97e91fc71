"""Affine coupling kernels: forward, inverse and backward, each one pass over memory.

Per sample, the block input ``x`` is flattened to ``D = C * S`` elements (``S`` = product of the
trailing dims); its first ``SPLIT = C1 * S`` elements are ``x1``, the rest ``x2`` (``D2 = D - SPLIT``).
The conditioner output ``h = net(x1)``, ``[B, 2 * C2, ...]``, holds ``shift`` (first ``D2``
elements of a sample) and ``raw`` (last ``D2``). With ``s = scale(raw)``::

    forward:   y = [x1, (x2 + shift) * s],     logdet = sum(log s),   fp = fingerprint(x)
    inverse:   x = [y1, y2 / s - shift],       fp = fingerprint(x)    (of x as stored, rounded)
    backward:  gx = [gy1, gy2 * s],            dh = [gy2 * s, (gy2 * y2 + dlogdet) * dlog(s)/draw]

Scales (``KIND``): 0 ``sigmoid(raw + 2)`` (Glow), 1 ``exp(raw)`` (RealNVP),
2 ``exp(log_bound * tanh(raw))`` (bounded). All math in float32 whatever the storage dtype.

Each program owns ``BLOCK`` elements of one sample (``B * programs`` programs on one grid axis, see
:func:`.fingerprint.launch_grid`): the copy of the pass-through half, the elementwise math, the
per-program partial of the log-determinant and of the fingerprint (see :mod:`.fingerprint`), summed
by the launcher in float64. The reference twins are ``revgrad.ops.fused.affine_coupling*_reference``
(``revgrad.ops.fused.affine_*_reference`` for the elementwise part).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .fingerprint import (
    CHUNK,
    NO_TABLE_ROWS,
    block_for,
    check_tables,
    fingerprint_chunks,
    launch_grid,
)

KINDS = {"sigmoid": 0, "exp": 1, "bounded": 2}


@triton.jit
def _log_scale(raw, KIND: tl.constexpr, log_bound):
    if KIND == 0:
        z = raw + 2.0
        # log sigmoid(z) = min(z, 0) - log(1 + exp(-|z|)): no overflow for either sign of z
        log_s = tl.minimum(z, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(z)))
    elif KIND == 1:
        log_s = raw
    else:
        log_s = log_bound * (2.0 * tl.sigmoid(2.0 * raw) - 1.0)  # log_bound * tanh(raw)
    return log_s


@triton.jit
def _scale(raw, log_s, KIND: tl.constexpr):
    if KIND == 0:
        s = tl.sigmoid(raw + 2.0)
    else:
        s = tl.exp(log_s)
    return s


@triton.jit
def _inv_scale(raw, log_s, KIND: tl.constexpr):
    if KIND == 0:
        inv = 1.0 + tl.exp(-(raw + 2.0))
    else:
        inv = tl.exp(-log_s)
    return inv


@triton.jit
def _dlog_scale(raw, KIND: tl.constexpr, log_bound):
    if KIND == 0:
        d = tl.sigmoid(-(raw + 2.0))
    elif KIND == 1:
        d = tl.full(raw.shape, 1.0, tl.float32)
    else:
        t = 2.0 * tl.sigmoid(2.0 * raw) - 1.0
        d = log_bound * (1.0 - t * t)
    return d


@triton.jit
def _tile(blk, NCH: tl.constexpr, CHUNK_: tl.constexpr):
    return blk * NCH * CHUNK_ + tl.arange(0, NCH)[:, None] * CHUNK_ + tl.arange(0, CHUNK_)[None, :]


@triton.jit
def _operands(t_ptr, h_ptr, b, blk, D, SPLIT, NCH: tl.constexpr, CHUNK_: tl.constexpr):
    """One program's tile of a block tensor ``t`` and, over its second half, ``shift`` and ``raw``."""
    D2 = D - SPLIT
    i = _tile(blk, NCH, CHUNK_)
    inside = i < D
    second = inside & (i >= SPLIT)
    k = i - SPLIT
    t = tl.load(t_ptr + b * D + i, mask=inside, other=0.0).to(tl.float32)
    hb = h_ptr + b * 2 * D2
    shift = tl.load(hb + k, mask=second, other=0.0).to(tl.float32)
    raw = tl.load(hb + D2 + k, mask=second, other=0.0).to(tl.float32)
    return i, inside, second, t, shift, raw


@triton.jit
def _affine_fwd_kernel(
    x_ptr, h_ptr, y_ptr, part_ptr, within_ptr, flips_ptr,
    D, SPLIT, programs, n_flip_rows, log_bound,
    KIND: tl.constexpr, WANT_FP: tl.constexpr, NCH: tl.constexpr, CHUNK_: tl.constexpr, M: tl.constexpr,
):
    pid = tl.program_id(0)
    b, blk = (pid // programs).to(tl.int64), (pid % programs).to(tl.int64)
    i, inside, second, x, shift, raw = _operands(x_ptr, h_ptr, b, blk, D, SPLIT, NCH, CHUNK_)
    log_s = _log_scale(raw, KIND, log_bound)
    y = tl.where(second, (x + shift) * _scale(raw, log_s, KIND), x)
    tl.store(y_ptr + b * D + i, y.to(y_ptr.dtype.element_ty), mask=inside)
    pbase = part_ptr + pid.to(tl.int64) * (M + 1)
    tl.store(pbase + M, tl.sum(tl.sum(tl.where(second, log_s, 0.0), axis=1), axis=0).to(tl.float64))
    if WANT_FP:
        tl.store(pbase + tl.arange(0, M), fingerprint_chunks(x, blk * NCH, within_ptr, flips_ptr, n_flip_rows,
                                                            NCH, CHUNK_, M))


@triton.jit
def _affine_inv_kernel(
    y_ptr, h_ptr, x_ptr, part_ptr, within_ptr, flips_ptr,
    D, SPLIT, programs, n_flip_rows, log_bound,
    KIND: tl.constexpr, WANT_FP: tl.constexpr, NCH: tl.constexpr, CHUNK_: tl.constexpr, M: tl.constexpr,
):
    pid = tl.program_id(0)
    b, blk = (pid // programs).to(tl.int64), (pid % programs).to(tl.int64)
    i, inside, second, y, shift, raw = _operands(y_ptr, h_ptr, b, blk, D, SPLIT, NCH, CHUNK_)
    log_s = _log_scale(raw, KIND, log_bound)
    x = tl.where(second, y * _inv_scale(raw, log_s, KIND) - shift, y).to(x_ptr.dtype.element_ty)
    tl.store(x_ptr + b * D + i, x, mask=inside)
    if WANT_FP:
        # Fingerprint what is stored: the check compares it with the fingerprint of the true input.
        fp = fingerprint_chunks(tl.where(inside, x.to(tl.float32), 0.0), blk * NCH, within_ptr, flips_ptr,
                                n_flip_rows, NCH, CHUNK_, M)
        tl.store(part_ptr + pid.to(tl.int64) * M + tl.arange(0, M), fp)


@triton.jit
def _affine_bwd_kernel(
    y_ptr, h_ptr, gy_ptr, gld_ptr, gx_ptr, dh_ptr,
    D, SPLIT, programs, log_bound,
    KIND: tl.constexpr, HAS_GLD: tl.constexpr, NCH: tl.constexpr, CHUNK_: tl.constexpr,
):
    pid = tl.program_id(0)
    b, blk = (pid // programs).to(tl.int64), (pid % programs).to(tl.int64)
    D2 = D - SPLIT
    i = _tile(blk, NCH, CHUNK_)
    inside = i < D
    second = inside & (i >= SPLIT)
    k = i - SPLIT
    gy = tl.load(gy_ptr + b * D + i, mask=inside, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * D + i, mask=second, other=0.0).to(tl.float32)
    hb = h_ptr + b * 2 * D2
    raw = tl.load(hb + D2 + k, mask=second, other=0.0).to(tl.float32)
    log_s = _log_scale(raw, KIND, log_bound)
    d_s = gy * _scale(raw, log_s, KIND)
    tl.store(gx_ptr + b * D + i, tl.where(second, d_s, gy).to(gx_ptr.dtype.element_ty), mask=inside)
    inner = gy * y
    if HAS_GLD:
        inner += tl.load(gld_ptr + b).to(tl.float32)
    d_raw = inner * _dlog_scale(raw, KIND, log_bound)
    db = dh_ptr + b * 2 * D2
    tl.store(db + k, d_s.to(dh_ptr.dtype.element_ty), mask=second)
    tl.store(db + D2 + k, d_raw.to(dh_ptr.dtype.element_ty), mask=second)


# --------------------------------------------------------------------------------------------------
# Launchers: allocate, check shapes, pick grid and block size. No autograd here.


def _geometry(t: torch.Tensor, h: torch.Tensor) -> tuple[int, int, int]:
    """``(B, D, SPLIT)`` for a block tensor ``[B, C, ...]`` and conditioner output ``[B, 2 * C2, ...]``."""
    if t.dim() < 2 or t.shape[1] < 2:
        raise ValueError(f"affine coupling needs [B, C >= 2, ...], got {tuple(t.shape)}")
    c1 = t.shape[1] // 2
    want = (t.shape[0], 2 * (t.shape[1] - c1), *t.shape[2:])
    if tuple(h.shape) != want:
        raise ValueError(f"conditioner output must be {want} for an input {tuple(t.shape)}, got {tuple(h.shape)}")
    batch = t.shape[0]
    dim = math.prod(t.shape[1:])
    return batch, dim, c1 * (dim // t.shape[1])


def _launch_grid(dim: int, batch: int) -> tuple[int, int, tuple[int]]:
    """``(elements per program, programs per sample, grid)``."""
    block = block_for(dim)
    programs = triton.cdiv(dim, block)
    return block, programs, launch_grid(batch, programs)


def _log_bound(kind: str, bound: float) -> float:
    if kind not in KINDS:
        raise ValueError(f"scale must be one of {tuple(KINDS)}, got {kind!r}")
    return math.log(bound) if kind == "bounded" else 0.0


def affine_forward(
    x: torch.Tensor,
    h: torch.Tensor,
    kind: str,
    bound: float,
    tables: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(y [B, C, ...] in x's dtype, logdet [B] float32, fingerprint of x [B, M] float64 or None)``.

    ``h``: conditioner output ``[B, 2 * C2, ...]``; ``tables``: ``(within, flips)`` weight tables, or
    None for no fingerprint.
    """
    log_bound = _log_bound(kind, bound)
    x, h = x.contiguous(), h.contiguous()
    batch, dim, split = _geometry(x, h)
    m = check_tables(*tables, dim) if tables is not None else 1
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    block, programs, grid = _launch_grid(dim, batch)
    part = torch.empty((batch, programs, m + 1), dtype=torch.float64, device=x.device)
    within, flips = tables if tables is not None else (part, part)
    rows = flips.shape[0] if tables is not None else NO_TABLE_ROWS
    _affine_fwd_kernel[grid](
        x, h, y, part, within, flips, dim, split, programs, rows, log_bound,
        KIND=KINDS[kind], WANT_FP=tables is not None, NCH=block // CHUNK, CHUNK_=CHUNK, M=m, num_warps=4,
    )
    sums = part.sum(1)
    return y, sums[:, m].to(torch.float32), (sums[:, :m] if tables is not None else None)


def affine_inverse(
    y: torch.Tensor,
    h: torch.Tensor,
    kind: str,
    bound: float,
    tables: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x [B, C, ...] in y's dtype, fingerprint of x [B, M] float64 or None)``."""
    log_bound = _log_bound(kind, bound)
    y, h = y.contiguous(), h.contiguous()
    batch, dim, split = _geometry(y, h)
    m = check_tables(*tables, dim) if tables is not None else 1
    x = torch.empty_like(y, memory_format=torch.contiguous_format)
    block, programs, grid = _launch_grid(dim, batch)
    part = torch.empty((batch, programs, m), dtype=torch.float64, device=y.device) if tables is not None else x
    within, flips = tables if tables is not None else (x, x)
    rows = flips.shape[0] if tables is not None else NO_TABLE_ROWS
    _affine_inv_kernel[grid](
        y, h, x, part, within, flips, dim, split, programs, rows, log_bound,
        KIND=KINDS[kind], WANT_FP=tables is not None, NCH=block // CHUNK, CHUNK_=CHUNK, M=m, num_warps=4,
    )
    return x, (part.sum(1) if tables is not None else None)


def affine_backward(
    y: torch.Tensor,
    h: torch.Tensor,
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor | None,
    kind: str,
    bound: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gx, dh)``: ``gx = [gy1, gy2 * s]`` (grad_y's dtype; the caller adds net's VJP to the first
    half) and ``dh = [dshift, draw]`` (h's dtype, h's shape)."""
    log_bound = _log_bound(kind, bound)
    y, h, grad_y = y.contiguous(), h.contiguous(), grad_y.contiguous()
    batch, dim, split = _geometry(y, h)
    if grad_y.shape != y.shape:
        raise ValueError(f"grad_y must have y's shape {tuple(y.shape)}, got {tuple(grad_y.shape)}")
    gld = grad_logdet.contiguous() if grad_logdet is not None else None
    if gld is not None and gld.shape != (batch,):
        raise ValueError(f"grad_logdet must be [{batch}], got {tuple(gld.shape)}")
    gx = torch.empty_like(grad_y, memory_format=torch.contiguous_format)
    dh = torch.empty_like(h, memory_format=torch.contiguous_format)
    block, programs, grid = _launch_grid(dim, batch)
    _affine_bwd_kernel[grid](
        y, h, grad_y, gld if gld is not None else gx, gx, dh, dim, split, programs, log_bound,
        KIND=KINDS[kind], HAS_GLD=gld is not None, NCH=block // CHUNK, CHUNK_=CHUNK, num_warps=4,
    )
    return gx, dh
