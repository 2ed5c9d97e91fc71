"""Fingerprint kernel: ``M`` ±1 projections per sample, in one pass over the activation.

For ``x`` of shape ``[B, D]`` (any ``[B, ...]`` flattened) and signs
``s[i, j] = within[i % CHUNK, j] * flips[i // CHUNK, j]``::

    f[b, j] = sum_c flips[c, j] * (sum_{i in chunk c} within[i % CHUNK, j] * x[b, i])

Each program owns ``NCH`` consecutive chunks of ``CHUNK = 128`` elements of one sample. The inner
sums (one per chunk and direction) run in float32, as in the reference; the sign-weighted sum over
chunks runs in float64, and the program writes its ``[M]`` partial to a ``[B, programs, stride]``
float64 buffer that the launcher sums. Chunks start at element 0 of every sample, so a kernel that
covers only part of a sample (one half of a coupling) yields partials that add up to the full
fingerprint.

The sign tables come from the caller (``revgrad.fingerprint.sign_tables``): this package never
imports the rest of revgrad.

:func:`fingerprint_chunks` is the building block the coupling kernels fold into their own pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 128
# Elements per program: 8 chunks. Large enough to stream at full bandwidth, small enough that the
# [NCH, CHUNK, M] product of the fingerprint stays in registers.
BLOCK = 1024


@triton.jit
def fingerprint_chunks(
    v,  # [NCH, CHUNK] float32, 0 where masked
    chunk0,  # index of the first chunk
    within_ptr,  # [CHUNK, M] float32
    flips_ptr,  # [n_flip_rows, M] float32
    n_flip_rows,
    NCH: tl.constexpr,
    CHUNK_: tl.constexpr,
    M: tl.constexpr,
):
    rows = tl.arange(0, CHUNK_)
    cols = tl.arange(0, M)
    w = tl.load(within_ptr + rows[:, None] * M + cols[None, :])
    sums = tl.sum(v[:, :, None] * w[None, :, :], axis=1)  # [NCH, M], float32 as in the reference
    c = chunk0 + tl.arange(0, NCH)
    f = tl.load(flips_ptr + c[:, None] * M + cols[None, :], mask=(c < n_flip_rows)[:, None], other=0.0)
    return tl.sum(sums.to(tl.float64) * f.to(tl.float64), axis=0)  # [M] float64


@triton.jit
def _fingerprint_kernel(
    x_ptr,
    part_ptr,
    within_ptr,
    flips_ptr,
    D,
    n_flip_rows,
    NCH: tl.constexpr,
    CHUNK_: tl.constexpr,
    M: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    i = blk * NCH * CHUNK_ + tl.arange(0, NCH)[:, None] * CHUNK_ + tl.arange(0, CHUNK_)[None, :]
    x = tl.load(x_ptr + b * D + i, mask=i < D, other=0.0).to(tl.float32)
    fp = fingerprint_chunks(x, blk * NCH, within_ptr, flips_ptr, n_flip_rows, NCH, CHUNK_, M)
    tl.store(part_ptr + (b * tl.num_programs(0) + blk) * M + tl.arange(0, M), fp)


def block_for(dim: int) -> int:
    """Elements per program for a sample of ``dim`` elements: a multiple of CHUNK, at most BLOCK."""
    return min(BLOCK, CHUNK * triton.next_power_of_2(triton.cdiv(max(dim, 1), CHUNK)))


def check_tables(within: torch.Tensor, flips: torch.Tensor, dim: int) -> int:
    """Validate the sign tables for samples of ``dim`` elements; returns M (directions)."""
    m = within.shape[1]
    if within.shape != (CHUNK, m) or flips.dim() != 2 or flips.shape[1] != m:
        raise ValueError(f"fingerprint tables must be [{CHUNK}, M] and [chunks, M]; got "
                         f"{tuple(within.shape)} and {tuple(flips.shape)}")
    if flips.shape[0] * CHUNK < dim:
        raise ValueError(f"flips has {flips.shape[0]} rows; samples of {dim} elements need {triton.cdiv(dim, CHUNK)}")
    if m & (m - 1):
        raise ValueError(f"the number of directions must be a power of two, got {m}")
    if within.dtype != torch.float32 or flips.dtype != torch.float32:
        raise ValueError("fingerprint tables must be float32")
    return m


def fingerprint(x: torch.Tensor, within: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Fingerprint of ``x`` (``[B, ...]``, float32/16, bfloat16): ``[B, M]`` float64.

    ``within``: ``[CHUNK, M]`` float32 ±1, ``flips``: ``[>= D / CHUNK, M]`` float32 ±1, on x's device.
    """
    x = x.contiguous()
    batch = x.shape[0]
    dim = x.numel() // batch if batch else 0
    m = check_tables(within, flips, dim)
    if batch == 0 or dim == 0:
        return torch.zeros((batch, m), dtype=torch.float64, device=x.device)
    block = block_for(dim)
    programs = triton.cdiv(dim, block)
    part = torch.empty((batch, programs, m), dtype=torch.float64, device=x.device)
    _fingerprint_kernel[(programs, batch)](
        x, part, within, flips, dim, flips.shape[0], NCH=block // CHUNK, CHUNK_=CHUNK, M=m, num_warps=4
    )
    return part.sum(1)
