"""Fingerprints: a few random projections per sample that tell a rebuilt activation from the truth.

For an activation ``x`` of shape ``[B, ...]`` flattened to ``[B, D]``, the fingerprint is

    f[b, j] = sum_i s[i, j] * x[b, i],      j < m (default m = 8)

with continuous random weights ``s`` drawn from a fixed seed. By Johnson–Lindenstrauss,
``||f_b - f'_b|| / ||f_b||`` estimates the relative distance ``||x_b - x'_b|| / ||x_b||`` of a
rebuilt sample ``x'_b``; a drift concentrated in a single element moves every component of ``f_b``
by that element's size times its weight. The forward pass stores ``B * m`` numbers per block.

Why continuous weights: a rebuilt sample that differs from the truth by swapping two elements
``a`` and ``b`` moves the fingerprint by ``(x_b - x_a) * (s[a] - s[b])``, so two elements with the
same weight row are a blind spot. With ±1 weights one pair in 2^m = 256 had the same row, and such a
swap passed silently. Now every weight is a product of two factors, each a random sign times a
magnitude uniform in ``[0.5, 1.5]``; no two rows coincide, and the question is only how close two
come. The closest are pairs sharing a factor (same chunk, or same offset in different chunks): a
swap of a typical sample is measured at less than 1/10 of its true distance for about one such pair
in 1e5 and at less than 1/20 for about one in 1e7 (the fixed tables: at least 0.05 for every such
pair up to ``D = 3e5``; ``tests/test_fingerprint.py`` tests swaps). Magnitudes bounded away from 0 matter: a
standard normal factor can be near 0 in several directions at once, and then two elements at the
same offset of two chunks with similar scales look alike (below 1/20 for one pair in 5e4). They also
mean every direction sees every element with a weight of at least 0.25.

The weights are never stored as a ``[D, m]`` matrix: ``s[i, j] = within[i % 128, j] * flips[i // 128, j]``
with a random ``128 x m`` pattern ``within`` and a random scale per chunk and direction ``flips``
(both as above), generated once per shape and device, in float32 on the CPU (the float64 path uses
the same values), and shared by every block; see :func:`signs` and :func:`sign_tables`.

Precision: for 16- and 32-bit inputs partial sums over chunks of 128 elements run in float32 and are
combined in float64 (float64 inputs: float64 throughout), never under autocast. Each product rounds
once in float32, as the chunk sums do; the noise floor this leaves (measured in
``tests/test_fingerprint.py``: at most 1e-6 relative in float32) sits more than 10x below the default
tolerances of :func:`default_tol`.
A NaN or Inf anywhere in the rebuilt sample makes its error NaN, and NaN never passes a check.
"""

from __future__ import annotations

import functools
import math

import torch

from . import dispatch

__all__ = [
    "CHUNK",
    "DEFAULT_DIRECTIONS",
    "fingerprint",
    "fingerprint_parts",
    "fingerprint_reference",
    "sign_tables",
    "signs",
]

DEFAULT_DIRECTIONS = 8
_SEED = 0x5EED_F1A6


# Sums of more than a few hundred float32 terms lose too much (a sequential sum of D terms errs by
# about eps * sqrt(D) relative: 3e-5 at D = 3e5, above the float32 tolerance). Partial sums over
# chunks of CHUNK elements stay near eps * sqrt(CHUNK) and are combined in float64.
CHUNK = 128


@functools.lru_cache(maxsize=64)
def _weights(rows: int, directions: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[rows, m]`` random weights: a random sign times a magnitude uniform in ``[0.5, 1.5]``.

    One uniform draw per entry gives both (sign: which half; magnitude: distance from the middle), so
    the rows of a shorter table are the first rows of a longer one. Drawn in float32 on the CPU, so
    every dtype and device gets the same values.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.rand(rows, directions, generator=gen, dtype=torch.float32) * 2 - 1  # exact in float32
    return (torch.where(v < 0, -1.0, 1.0) * (0.5 + v.abs())).to(device=device, dtype=dtype)


def _chunk_weights(dim: int, directions: int, device: torch.device, dtype: torch.dtype):
    within = _weights(CHUNK, directions, _SEED, device, dtype)  # [CHUNK, m]: the offsets in a chunk
    flips = _weights(dim // CHUNK + 1, directions, _SEED + 1, device, dtype)  # [chunks, m]: chunk scales
    return within, flips


@functools.lru_cache(maxsize=64)
def _one_chunk_weights(dim: int, directions: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[dim, m]`` weights of a sample of at most one chunk: ``within[:dim] * flips[0]``."""
    within, flips = _chunk_weights(dim, directions, device, dtype)
    return (within[:dim] * flips[0]).contiguous()


@functools.lru_cache(maxsize=64)
def _one_chunk_part_weights(
    sizes: tuple[int, ...], directions: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """The rows of :func:`_one_chunk_weights` that multiply each part of a sample of parts ``sizes``."""
    weights = _one_chunk_weights(sum(sizes), directions, device, dtype)
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return tuple(weights[a : a + n].contiguous() for a, n in zip(starts, sizes))


def sign_tables(
    dim: int, device: torch.device, directions: int = DEFAULT_DIRECTIONS
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight tables ``(within [CHUNK, m], flips [dim // CHUNK + 1, m])`` as float32 on ``device``:
    what kernels take (the name is older than the continuous weights)."""
    return _chunk_weights(dim, directions, device, torch.float32)


def signs(dim: int, directions: int = DEFAULT_DIRECTIONS, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The ``[dim, directions]`` weight matrix the fingerprint projects on (materialized for tests only;
    the name is older than the continuous weights).

    ``s[i, j] = within[i % CHUNK, j] * flips[i // CHUNK, j]``: a random ``CHUNK x m`` pattern times a
    random scale per chunk and direction, every entry of both a random sign times a magnitude uniform
    in ``[0.5, 1.5]``, so the stored state is ``(CHUNK + D / CHUNK) * m`` numbers.
    """
    within, flips = _chunk_weights(dim, directions, torch.device("cpu"), torch.float64)
    idx = torch.arange(dim)
    return (within[idx % CHUNK] * flips[idx // CHUNK]).to(dtype)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fingerprint(x: torch.Tensor, directions: int = DEFAULT_DIRECTIONS) -> torch.Tensor:
    """Fingerprint of ``x`` (shape ``[B, ...]``): a ``[B, directions]`` float64 tensor.

    Runs as the Triton kernel ``revgrad.kernels.fingerprint`` where :mod:`revgrad.ops.dispatch` says so.
    """
    if x.dim() > 0 and x.shape[0] > 0 and dispatch.use_kernels(x):
        dim = x[0].numel()
        return dispatch.kernels().fingerprint(x.detach(), *sign_tables(dim, x.device, directions))
    return fingerprint_reference(x, directions)


def fingerprint_parts(*parts: torch.Tensor, directions: int = DEFAULT_DIRECTIONS) -> torch.Tensor:
    """Fingerprint of ``torch.cat(parts, dim=1)`` (each ``[B, ...]``), without concatenating when the
    parts hold one chunk (128 elements) per sample in all, or when every part but the last holds a whole
    number of chunks (else it concatenates)."""
    sizes = [math.prod(p.shape[1:]) for p in parts]
    total = sum(sizes)
    kernels = dispatch.use_kernels(*parts)
    if (total <= CHUNK and not kernels and all(p.dtype == parts[0].dtype for p in parts)
            and not torch.is_autocast_enabled(parts[0].device.type)):
        # One chunk in all (small samples, checked at every block of a small flow): one product per
        # part with its rows of the combined weights, accumulated in place, no concatenation.
        acc = _accumulation_dtype(parts[0].dtype)
        out = None
        for p, w in zip(parts, _one_chunk_part_weights(tuple(sizes), directions, parts[0].device, acc)):
            flat = p.detach().reshape(p.shape[0], -1)
            flat = flat if flat.dtype == acc else flat.to(acc)
            out = flat @ w if out is None else torch.addmm(out, flat, w)
        assert out is not None
        return out.to(torch.float64)
    if any(n % CHUNK for n in sizes[:-1]) or kernels:
        return fingerprint(torch.cat([p.detach().reshape(p.shape[0], -1) for p in parts], dim=1), directions)
    first, out = 0, None
    for p, n in zip(parts, sizes):
        partial = fingerprint_reference(p, directions, first_chunk=first // CHUNK, dim_total=total)
        out = partial if out is None else out + partial
        first += n
    assert out is not None
    return out


def fingerprint_reference(
    x: torch.Tensor, directions: int = DEFAULT_DIRECTIONS, first_chunk: int = 0, dim_total: int | None = None
) -> torch.Tensor:
    """The PyTorch twin of the fingerprint kernel (same result up to float32 rounding of chunk sums).

    ``first_chunk``/``dim_total``: ``x`` is the part of a longer per-sample vector (``dim_total``
    elements) that starts at chunk ``first_chunk``; the result is that part's share of its fingerprint.
    """
    if torch.is_autocast_enabled(x.device.type):
        # Autocast would run the products below in bf16/fp16 (x and the weights rounded, chunk sums
        # rounded): 3e-3 relative noise, and a fingerprint that depends on the caller's autocast state.
        with torch.autocast(x.device.type, enabled=False):
            return fingerprint_reference(x, directions, first_chunk, dim_total)
    acc = _accumulation_dtype(x.dtype)
    flat = x.detach().reshape(x.shape[0], -1)
    if flat.dtype != acc:
        flat = flat.to(acc)
    batch, dim = flat.shape
    if first_chunk == 0 and dim_total is None and dim <= CHUNK:
        # One chunk: one product with the combined weights. Small activations are checked often
        # (every block of a small flow), and there the per-op overhead of the chunked path showed.
        return (flat @ _one_chunk_weights(dim, directions, flat.device, acc)).to(torch.float64)
    # Flips in the accumulation dtype: the product rounds once in float32 (half an ulp, less than the
    # chunk sum it scales already did), and sum(dtype=float64) widens on the fly, so no float64 copy
    # of the partial sums is made.
    within, flips = _chunk_weights(dim if dim_total is None else dim_total, directions, flat.device, acc)
    flips = flips[first_chunk:]
    chunks, rest = divmod(dim, CHUNK)
    out: torch.Tensor | None = None
    if chunks:
        head = flat[:, : chunks * CHUNK].reshape(batch * chunks, CHUNK)  # a view unless rest > 0
        # [m, CHUNK] @ [CHUNK, B*chunks]: BLAS runs this skinny product ~3x faster than head @ within.
        partial = (within.t() @ head.t()).view(directions, batch, chunks)
        out = (partial * flips[:chunks].t().unsqueeze(1)).sum(2, dtype=torch.float64)
    if rest:
        tail = (within[:rest].t() @ flat[:, chunks * CHUNK :].t()) * flips[chunks].unsqueeze(1)  # [m, B]
        out = tail.to(torch.float64) if out is None else out + tail
    assert out is not None  # dim >= 1: chunks or rest
    return out.t()
