"""Counting the bytes a training step holds: exact on CPU (glibc), from the allocator on CUDA.

On CPU, glibc's ``mallinfo2()`` reports the bytes currently allocated by ``malloc`` (``uordblks``
for the heap plus ``hblkhd`` for large blocks served by ``mmap``), and PyTorch's CPU allocator
takes every tensor's storage from ``malloc``. The difference between two readings is therefore the
memory that tensors created in between still hold. On CUDA, ``torch.cuda.memory_allocated`` and
``max_memory_allocated`` give the same numbers from the caching allocator.

glibc keeps no peak, so on CPU ``MemoryProbe(track_peak=True)`` reads the count after every ATen
operator (a ``TorchDispatchMode``) and keeps the largest reading: the peak between operators.
Temporaries that one operator allocates and frees inside itself (a convolution's workspace) are not
seen, unlike on CUDA. It slows a step down (tens to hundreds of microseconds per operator: ``mallinfo2``
walks glibc's free lists), so it is for measuring, not timing.

Typical use::

    with MemoryProbe(device, track_peak=True) as probe:
        out = model(x)                 # graph built
        probe.mark("held")             # bytes held between forward and backward
        out.sum().backward()
    probe.held["held"], probe.peak     # peak: always on CUDA; on CPU with track_peak (else None)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
        raise RuntimeError("revgrad.tools.memory: glibc mallinfo2() is not available; cannot count CPU bytes")
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


class _CpuPeak(TorchDispatchMode):
    """Reads glibc's count after every ATen operator and keeps the largest reading."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = allocated_bytes("cpu")

    def sample(self) -> int:
        now = allocated_bytes("cpu")
        if now > self.largest:
            self.largest = now
        return now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.sample()
        return out


_CPU_PEAK_WARM = False


def _warm_cpu_peak() -> None:
    """The first dispatch mode of a process imports and caches ~25 MiB for good: not the probe's."""
    global _CPU_PEAK_WARM
    if not _CPU_PEAK_WARM:
        with _CpuPeak():
            torch.zeros(2).add_(1)
        _CPU_PEAK_WARM = True


class MemoryProbe:
    """Bytes allocated since entering, read at named marks, and the peak.

    ``peak`` (bytes above the level at entry, set on exit): always on CUDA
    (``max_memory_allocated``); on CPU only with ``track_peak=True`` (see the module docstring),
    else None.
    """

    def __init__(self, device: torch.device | str = "cpu", *, track_peak: bool = False) -> None:
        self.device = torch.device(device)
        self.held: dict[str, int] = {}
        self.peak: int | None = None
        self._base = 0
        self._cpu_peak: _CpuPeak | None = None
        self._track_cpu_peak = track_peak and self.device.type == "cpu"

    def __enter__(self) -> MemoryProbe:
        if self._track_cpu_peak:
            _warm_cpu_peak()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._base = allocated_bytes(self.device)
        if self._track_cpu_peak:
            self._cpu_peak = _CpuPeak()
            self._cpu_peak.__enter__()
        return self

    def mark(self, name: str) -> int:
        now = allocated_bytes(self.device) if self._cpu_peak is None else self._cpu_peak.sample()
        self.held[name] = now - self._base
        return self.held[name]

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._cpu_peak is not None:
            self._cpu_peak.__exit__(*exc)
            self.peak = self._cpu_peak.largest - self._base
            self._cpu_peak = None
