"""Fingerprint kernel: ``M`` random projections per sample, in one pass over the activation.

For ``x`` of shape ``[B, D]`` (any ``[B, ...]`` flattened) and weights
``s[i, j] = within[i % CHUNK, j] * flips[i // CHUNK, j]``::

    f[b, j] = sum_c flips[c, j] * (sum_{i in chunk c} within[i % CHUNK, j] * x[b, i])

Each program owns ``NCH`` consecutive chunks of ``CHUNK = 128`` elements of one sample. The inner
sums (one per chunk and direction) run in float32, as in the reference; the weighted sum over chunks
runs in float64, and the program writes its ``[M]`` partial to a ``[B, programs, stride]`` float64
buffer that the launcher sums. Chunks start at element 0 of every sample, so a kernel that covers
only part of a sample (one half of a coupling) yields partials that add up to the full fingerprint.

The weight tables come from the caller (``revgrad.ops.fingerprint.sign_tables``; any float32 values, the
kernels assume nothing of them): this package never imports the rest of revgrad.

Grid: one axis, ``B * programs`` programs (:func:`launch_grid`); program ``pid`` is block
``pid % programs`` of sample ``pid // programs``, and its partial sits at ``pid`` in the buffer.
CUDA allows 2**31 - 1 programs on axis x but only 65535 on y and z, so the batch never gets an
axis of its own.

:func:`fingerprint_chunks` is the building block the coupling kernels fold into their own pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 128
# Elements per program: 8 chunks. Large enough to stream at full bandwidth.
BLOCK = 1024
GRID_X_MAX = 2**31 - 1  # CUDA's limit on grid axis x (y and z: 65535)
NO_TABLE_ROWS = 0  # n_flip_rows when no fingerprint is computed: a constant, so no recompile per batch


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
    """``[M]`` float64: this tile's share of the fingerprint.

    Half the directions at a time (even, then odd): the ``[NCH, CHUNK, M / 2]`` product with those
    columns of ``within``, its float32 sums per chunk, then their float64 sum over chunks weighted by
    ``flips``; ``join`` interleaves the halves back into direction order. The whole ``[NCH, CHUNK, M]``
    product at once held 64 floats per thread (up to 96 registers with Triton 3.9, 168 and a spill with
    3.6); a half holds 32 (64 registers). One direction at a time gets to 40-48, but takes 16 ``tl.sum``
    calls, each ~5 ms in the interpreter the tests run on (``bench/RESULTS.md``, kernels).
    """
    cols = tl.arange(0, M)[None, :]
    c = chunk0 + tl.arange(0, NCH)[:, None]
    w_even, w_odd = tl.split(tl.reshape(tl.load(within_ptr + tl.arange(0, CHUNK_)[:, None] * M + cols),
                                        [CHUNK_, M // 2, 2]))
    f_even, f_odd = tl.split(tl.reshape(tl.load(flips_ptr + c * M + cols, mask=c < n_flip_rows, other=0.0),
                                        [NCH, M // 2, 2]))
    sums = tl.sum(v[:, :, None] * w_even[None, :, :], axis=1)  # [NCH, M / 2]
    even = tl.sum(sums.to(tl.float64) * f_even.to(tl.float64), axis=0)
    sums = tl.sum(v[:, :, None] * w_odd[None, :, :], axis=1)
    odd = tl.sum(sums.to(tl.float64) * f_odd.to(tl.float64), axis=0)
    return tl.reshape(tl.join(even, odd), [M])


@triton.jit
def _fingerprint_kernel(
    x_ptr,
    part_ptr,
    within_ptr,
    flips_ptr,
    D,
    programs,
    n_flip_rows,
    NCH: tl.constexpr,
    CHUNK_: tl.constexpr,
    M: tl.constexpr,
):
    pid = tl.program_id(0)
    b, blk = (pid // programs).to(tl.int64), (pid % programs).to(tl.int64)
    i = blk * NCH * CHUNK_ + tl.arange(0, NCH)[:, None] * CHUNK_ + tl.arange(0, CHUNK_)[None, :]
    x = tl.load(x_ptr + b * D + i, mask=i < D, other=0.0).to(tl.float32)
    fp = fingerprint_chunks(x, blk * NCH, within_ptr, flips_ptr, n_flip_rows, NCH, CHUNK_, M)
    tl.store(part_ptr + pid.to(tl.int64) * M + tl.arange(0, M), fp)


def launch_grid(batch: int, programs: int) -> tuple[int]:
    """The grid for ``programs`` programs per sample: ``(batch * programs,)`` on axis x.

    A pure function (tested without a GPU): CUDA caps axes y and z at 65535, so the batch is folded
    into axis x, whose limit (2**31 - 1 programs, 2**41 elements at 1024 per program) no tensor reaches.
    """
    total = batch * programs
    if not 0 <= total <= GRID_X_MAX:  # an empty grid launches nothing
        raise ValueError(f"grid of {batch} samples x {programs} programs: more than {GRID_X_MAX} programs")
    return (total,)


def block_for(dim: int) -> int:
    """Elements per program for a sample of ``dim`` elements: a multiple of CHUNK, at most BLOCK."""
    return min(BLOCK, CHUNK * triton.next_power_of_2(triton.cdiv(max(dim, 1), CHUNK)))


def check_tables(within: torch.Tensor, flips: torch.Tensor, dim: int) -> int:
    """Validate the weight tables for samples of ``dim`` elements; returns M (directions)."""
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

    ``within``: ``[CHUNK, M]`` float32, ``flips``: ``[>= D / CHUNK, M]`` float32 weights, on x's device.
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
    _fingerprint_kernel[launch_grid(batch, programs)](
        x, part, within, flips, dim, programs, flips.shape[0], NCH=block // CHUNK, CHUNK_=CHUNK, M=m, num_warps=4
    )
    return part.sum(1)
