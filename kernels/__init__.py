"""Triton kernels for revgrad, installed as ``revgrad.kernels``.

This package imports only torch and triton, never the rest of revgrad: every kernel here has a
pure-PyTorch twin in ``revgrad/`` that is the CPU path and the test reference
(``revgrad.ops.fused``). Launchers allocate outputs, pick the grid and block size and know nothing of
autograd; ``revgrad.ops.fused`` wraps them in ``torch.autograd.Function``\\ s and dispatches.

Importing this package imports triton; ``revgrad.ops.dispatch`` only does so when kernels are used.
"""

from .additive_coupling import FP_NONE, FP_OF_A, FP_OF_OUT, residual
from .affine_coupling import KINDS, affine_backward, affine_forward, affine_inverse
from .fingerprint import CHUNK, fingerprint

__all__ = [
    "CHUNK",
    "FP_NONE",
    "FP_OF_A",
    "FP_OF_OUT",
    "KINDS",
    "affine_backward",
    "affine_forward",
    "affine_inverse",
    "fingerprint",
    "residual",
]
