"""Counting the bytes a training step holds: exact on CPU (glibc), from the allocator on CUDA.

On CPU, glibc's ``mallinfo2()`` reports the bytes currently allocated by ``malloc`` (``uordblks``
for the heap plus ``hblkhd`` for large blocks served by ``mmap``), and PyTorch's CPU allocator
takes every tensor's storage from ``malloc``. The difference between two readings is therefore the
memory that tensors created in between still hold. On CUDA, ``torch.cuda.memory_allocated`` and
``max_memory_allocated`` give the same numbers from the caching allocator.

Typical use::

    with MemoryProbe(device) as probe:
        out = model(x)                 # graph built
        probe.mark("held")             # bytes held between forward and backward
        out.sum().backward()
    probe.held["held"], probe.peak     # peak: CUDA only (None on CPU)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import torch

__all__ = ["MemoryProbe", "allocated_bytes", "cpu_counting_available"]


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]


def _load_mallinfo2():
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    try:
        libc = ctypes.CDLL(path)
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _load_mallinfo2()


def cpu_counting_available() -> bool:
    """True where glibc's ``mallinfo2`` exists (glibc >= 2.33), so CPU bytes can be counted."""
    return _MALLINFO2 is not None


def allocated_bytes(device: torch.device | str = "cpu") -> int:
    """Bytes currently allocated: glibc's count on CPU, the caching allocator's on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    if _MALLINFO2 is None:
        raise RuntimeError("revgrad.memory: glibc mallinfo2() is not available; cannot count CPU bytes")
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


class MemoryProbe:
    """Bytes allocated since entering, read at named marks (and the CUDA peak)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.held: dict[str, int] = {}
        self.peak: int | None = None
        self._base = 0

    def __enter__(self) -> MemoryProbe:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._base = allocated_bytes(self.device)
        return self

    def mark(self, name: str) -> int:
        self.held[name] = allocated_bytes(self.device) - self._base
        return self.held[name]

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
