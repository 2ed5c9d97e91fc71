"""What a check compares: the relative error of two fingerprints, the default tolerances, and the
requests by which a block computes the fingerprint of its input inside its own kernel pass.

The fingerprint itself (random projections of an activation) is an op: :mod:`revgrad.ops.fingerprint`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["FingerprintRequest", "default_tol", "relative_error", "requesting", "take_request"]


def relative_error(rebuilt: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Largest per-sample relative distance between two fingerprints (0-dim tensor; +inf if any is non-finite).

    A sample whose fingerprint is (near) zero is measured against the batch's mean norm instead, so
    an all-zero sample cannot turn rounding noise into a false alarm.
    """
    diff = torch.linalg.vector_norm(rebuilt - stored, dim=1)
    norm = torch.linalg.vector_norm(stored, dim=1)
    floor = norm.mean() * 1e-3 + torch.finfo(norm.dtype).tiny
    err = diff / torch.maximum(norm, floor)
    # A reduction may drop NaN on some backends: NaN becomes +inf first, which any max keeps (and
    # which fails every check as NaN would).
    return err.nan_to_num(nan=math.inf).amax()


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


# --------------------------------------------------------------------------------------------------
# Fused fingerprints: a block whose kernel reads (forward) or writes (backward) the tensor anyway can
# fingerprint it in the same pass. The engine opens a request around the call; the block takes it.


@dataclass
class FingerprintRequest:
    """The engine asks for the fingerprint of ``target`` (forward: the block input; backward: None,
    meaning the input the block rebuilds). A block that computes it stores it in ``value``."""

    target: torch.Tensor | None
    value: torch.Tensor | None = None


_REQUEST: contextvars.ContextVar[FingerprintRequest | None] = contextvars.ContextVar(
    "revgrad_fingerprint_request", default=None
)


@contextlib.contextmanager
def requesting(request: FingerprintRequest | None) -> Iterator[FingerprintRequest | None]:
    """Make ``request`` the one a block call may take (the engine wraps each block call)."""
    token = _REQUEST.set(request)
    try:
        yield request
    finally:
        _REQUEST.reset(token)


def take_request(target: torch.Tensor | None) -> FingerprintRequest | None:
    """For a block: the engine's request if it is for ``target`` (None outside the engine).

    Taking clears it, so sub-networks, and blocks nested in them, never see it.
    """
    request = _REQUEST.get()
    if request is None:
        return None
    _REQUEST.set(None)
    return request if request.target is target else None
