"""Where the coupling math runs: Triton kernels (``revgrad.kernels``) or their PyTorch twins.

One decision, made here for every fused op: :func:`use_kernels`. ``REVGRAD_KERNELS`` overrides it:

* ``auto`` (default): kernels for CUDA tensors when Triton imports; the PyTorch path otherwise;
* ``triton``: kernels always; on CPU tensors this needs ``TRITON_INTERPRET=1`` (Triton's
  interpreter: how CI tests the kernels without a GPU), and is an error otherwise;
* ``torch``: never kernels.

Kernels compute in float32 and take float32, float16 and bfloat16 tensors; float64 always runs the
PyTorch path, whatever the setting, and so do ``torch.func`` transforms (``jvp``, ``vmap``: the
diagnostics use them) and code traced by ``torch.compile`` (the compiler fuses the twin itself).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch

__all__ = ["ENV", "KERNEL_DTYPES", "MODES", "kernels", "mode", "overridden", "triton_error", "use_kernels"]

ENV = "REVGRAD_KERNELS"
MODES = ("auto", "triton", "torch")
KERNEL_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})


def mode() -> str:
    """The current ``REVGRAD_KERNELS`` setting (read on every call, so tests and users may change it)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"revgrad: {ENV}={os.environ[ENV]!r} is not one of {MODES}")
    return value


@contextlib.contextmanager
def overridden(value: str) -> Iterator[None]:
    """Run a block of code with ``REVGRAD_KERNELS=value`` (restored after; benchmarks and tests)."""
    if value not in MODES:
        raise ValueError(f"revgrad: {ENV} must be one of {MODES}, got {value!r}")
    old = os.environ.get(ENV)
    os.environ[ENV] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


@functools.lru_cache(maxsize=1)
def triton_error() -> str | None:
    """Why ``revgrad.kernels`` cannot be imported (None when it can)."""
    try:
        importlib.import_module("revgrad.kernels")
    except Exception as exc:  # ImportError, or a Triton that fails to initialise
        return f"{type(exc).__name__}: {exc}"
    return None


def kernels() -> ModuleType:
    """The ``revgrad.kernels`` module (imports Triton on first use)."""
    return importlib.import_module("revgrad.kernels")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _traced(tensors: tuple[torch.Tensor, ...]) -> bool:
    # torch.func transforms wrap tensors (no storage a kernel could read; jvp/vmap need the twin's
    # autograd), and under torch.compile the twin is what the compiler fuses.
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return torch.compiler.is_compiling() or any(wrapped(t) for t in tensors)


def use_kernels(*tensors: torch.Tensor) -> bool:
    """Whether an op on ``tensors`` runs as a Triton kernel (see the module docstring)."""
    chosen = mode()
    on_cuda = all(t.is_cuda for t in tensors)
    if chosen == "torch" or (chosen == "auto" and not on_cuda):  # the common CPU case, decided cheaply
        return False
    if any(t.dtype not in KERNEL_DTYPES for t in tensors) or _traced(tensors):
        return False
    if chosen == "auto":
        return triton_error() is None
    error = triton_error()
    if error is not None:
        raise RuntimeError(f"revgrad: {ENV}=triton but revgrad.kernels cannot be imported ({error})")
    if not on_cuda and not _interpreting():
        raise RuntimeError(
            f"revgrad: {ENV}=triton on CPU tensors needs Triton's interpreter (TRITON_INTERPRET=1); "
            f"use {ENV}=auto or torch to run the PyTorch path"
        )
    return True
