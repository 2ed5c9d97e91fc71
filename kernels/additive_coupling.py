"""Additive coupling kernel: the residual add (forward) or subtract (inverse) with the fingerprint fused.

An additive coupling ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)`` writes each half of its output with one
residual op over a range ``[OFF, OFF + LEN)`` of every flattened sample (``D`` elements)::

    out[b, OFF + k] = a[b, OFF + k] + SIGN * r[b, k]          k < LEN

``a`` and ``out`` are whole block tensors ``[B, D]`` (so no split or concatenation is ever
materialized), ``r`` the sub-network output ``[B, LEN]``. The kernel can fold in the fingerprint of
``a`` (forward: the block input) or of ``out`` as stored (inverse: the rebuilt input) over its range;
programs align to the global 128-element chunks, so the partials of the two halves add up to the
fingerprint of the whole sample. Math in float32. Reference twin: ``revgrad.ops.fused.residual``.
"""

from __future__ import annotations

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

FP_NONE, FP_OF_A, FP_OF_OUT = 0, 1, 2


@triton.jit
def _residual_kernel(
    a_ptr, r_ptr, out_ptr, part_ptr, within_ptr, flips_ptr,
    D, OFF, LEN, blk0, programs, n_flip_rows,
    SUBTRACT: tl.constexpr, FP: tl.constexpr, NCH: tl.constexpr, CHUNK_: tl.constexpr, M: tl.constexpr,
):
    pid = tl.program_id(0)
    b, p = (pid // programs).to(tl.int64), (pid % programs).to(tl.int64)
    blk = blk0 + p
    i = blk * NCH * CHUNK_ + tl.arange(0, NCH)[:, None] * CHUNK_ + tl.arange(0, CHUNK_)[None, :]
    inside = (i >= OFF) & (i < OFF + LEN)
    a = tl.load(a_ptr + b * D + i, mask=inside, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + b * LEN + (i - OFF), mask=inside, other=0.0).to(tl.float32)
    if SUBTRACT:
        out = (a - r).to(out_ptr.dtype.element_ty)
    else:
        out = (a + r).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * D + i, out, mask=inside)
    if FP == 1:
        fp = fingerprint_chunks(a, blk * NCH, within_ptr, flips_ptr, n_flip_rows, NCH, CHUNK_, M)
        tl.store(part_ptr + pid.to(tl.int64) * M + tl.arange(0, M), fp)
    elif FP == 2:
        v = tl.where(inside, out.to(tl.float32), 0.0)
        fp = fingerprint_chunks(v, blk * NCH, within_ptr, flips_ptr, n_flip_rows, NCH, CHUNK_, M)
        tl.store(part_ptr + pid.to(tl.int64) * M + tl.arange(0, M), fp)


def residual(
    a: torch.Tensor,
    r: torch.Tensor,
    out: torch.Tensor,
    offset: int,
    subtract: bool,
    fingerprint_of: int = FP_NONE,
    tables: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """Write ``out[b].flatten()[offset : offset + L] = a[b].flatten()[...] ± r[b].flatten()``.

    Shapes: ``a, out: [B, ...]`` with ``D`` elements per sample, both contiguous (``out`` is written
    in place); ``r: [B, ...]`` with ``L <= D - offset`` elements per sample. Returns the partial
    fingerprint ``[B, M]`` float64 of ``a`` (``FP_OF_A``) or of ``out`` (``FP_OF_OUT``) over the
    range, else None.
    """
    if not (a.is_contiguous() and out.is_contiguous()):
        raise ValueError("residual: a and out must be contiguous whole block tensors")
    if a.shape != out.shape:
        raise ValueError(f"residual: a {tuple(a.shape)} and out {tuple(out.shape)} differ")
    r = r.contiguous()
    batch = a.shape[0]
    dim = a[0].numel() if batch else 0
    length = r[0].numel() if batch else 0
    if r.shape[0] != batch or not 0 <= offset <= dim - length:
        raise ValueError(f"residual: r {tuple(r.shape)} does not fit at offset {offset} of {tuple(a.shape)}")
    m = check_tables(*tables, dim) if fingerprint_of != FP_NONE else 1
    if batch == 0 or length == 0:
        return torch.zeros((batch, m), dtype=torch.float64, device=a.device) if fingerprint_of else None
    block = block_for(dim)
    first = offset // block
    programs = triton.cdiv(offset + length, block) - first
    part = torch.empty((batch, programs, m), dtype=torch.float64, device=a.device) if fingerprint_of else out
    within, flips = tables if fingerprint_of != FP_NONE else (out, out)
    rows = flips.shape[0] if fingerprint_of != FP_NONE else NO_TABLE_ROWS
    _residual_kernel[launch_grid(batch, programs)](
        a, r, out, part, within, flips, dim, offset, length, first, programs, rows,
        SUBTRACT=subtract, FP=fingerprint_of, NCH=block // CHUNK, CHUNK_=CHUNK, M=m, num_warps=4,
    )
    return part.sum(1) if fingerprint_of else None
