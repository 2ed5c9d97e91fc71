"""Fingerprints: a few random projections per sample that tell a rebuilt activation from the truth.

For an activation ``x`` of shape ``[B, ...]`` flattened to ``[B, D]``, the fingerprint is

    f[b, j] = sum_i s[i, j] * x[b, i],      j < m (default m = 8),  s[i, j] in {-1, +1}

with the signs drawn from a fixed seed. By Johnson–Lindenstrauss, ``||f_b - f'_b|| / ||f_b||``
estimates the relative distance ``||x_b - x'_b|| / ||x_b||`` of a rebuilt sample ``x'_b``; a drift
concentrated in a single element moves every component of ``f_b`` by that element's size. The
forward pass stores ``B * m`` numbers per block.

Precision: every product is exact (a sign times a value) and the sums run in float32 for 16- and
32-bit inputs, float64 for float64. The noise floor this leaves (measured in
``tests/test_fingerprint.py``) sits orders of magnitude below the default tolerances in
:func:`default_tol`. A NaN or Inf anywhere in the rebuilt sample makes its error NaN, and NaN never
passes a check.

The sign matrix ``[D, m]`` is generated once per ``(D, device)`` and shared by every block and
every chain (it is not per-block state); the Triton kernels generate signs in registers instead.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["DEFAULT_DIRECTIONS", "default_tol", "fingerprint", "relative_error", "signs"]

DEFAULT_DIRECTIONS = 8
_SEED = 0x5EED_F1A6


@functools.lru_cache(maxsize=32)
def signs(dim: int, device: torch.device, dtype: torch.dtype, directions: int = DEFAULT_DIRECTIONS) -> torch.Tensor:
    """The ``[dim, directions]`` matrix of ±1 projection directions, from a fixed seed."""
    gen = torch.Generator(device="cpu").manual_seed(_SEED)
    bits = torch.randint(0, 2, (dim, directions), generator=gen, dtype=torch.int8)
    return (bits * 2 - 1).to(device=device, dtype=dtype)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fingerprint(x: torch.Tensor, directions: int = DEFAULT_DIRECTIONS) -> torch.Tensor:
    """Fingerprint of ``x`` (shape ``[B, ...]``): a ``[B, directions]`` tensor (float32 or float64)."""
    acc = _accumulation_dtype(x.dtype)
    flat = x.detach().reshape(x.shape[0], -1)
    if flat.dtype != acc:
        flat = flat.to(acc)
    return flat @ signs(flat.shape[1], flat.device, acc, directions)


def relative_error(rebuilt: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Largest per-sample relative distance between two fingerprints (0-dim tensor; NaN if any non-finite).

    A sample whose fingerprint is (near) zero is measured against the batch's mean norm instead, so
    an all-zero sample cannot turn rounding noise into a false alarm.
    """
    diff = torch.linalg.vector_norm(rebuilt - stored, dim=1)
    norm = torch.linalg.vector_norm(stored, dim=1)
    floor = norm.mean() * 1e-3 + torch.finfo(norm.dtype).tiny
    err = diff / torch.maximum(norm, floor)
    # max() drops NaN on some backends; make any non-finite sample poison the result explicitly.
    return torch.where(torch.isfinite(err).all(), err.max(), err.new_tensor(float("nan")))


_TOL = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.bfloat16: 3e-2,
    torch.float16: 4e-3,
}


def default_tol(dtype: torch.dtype) -> float:
    """Default relative tolerance for a chain computing in ``dtype`` (the autocast dtype when on).

    See ``docs/architecture.md`` ("Tolerances") for the measurement behind these values.
    """
    return _TOL.get(dtype, 1e-5)
