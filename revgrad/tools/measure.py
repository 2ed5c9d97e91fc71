"""Measuring training steps: bytes held and peak, interleaved step times, the largest batch that fits a
byte budget, and the machine they ran on.

Memory (:func:`step_memory`): bytes that forward leaves allocated until backward (``held``) and the
largest allocation above the level before the step (``peak``), both counted by the allocator:
glibc's count on CPU (:class:`revgrad.tools.memory.MemoryProbe`, the peak read between ATen operators),
``torch.cuda.memory_allocated`` / ``max_memory_allocated`` on CUDA. The input and the weights exist
before counting starts.

Time (:func:`time_interleaved`): these machines are shared and noisy, so every round runs every
provider in turn (the order rotating from round to round) and ratios are taken per round against
plain autograd measured in the same round, then the median over rounds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib.metadata
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .memory import MemoryProbe

__all__ = [
    "MemoryStats",
    "Timings",
    "available_cores",
    "cpu_model",
    "is_out_of_memory",
    "largest_batch",
    "load_average",
    "machine_info",
    "paired_ratio",
    "pin_malloc",
    "quantile",
    "step_memory",
    "time_interleaved",
]


class Step(Protocol):
    """A training step: :meth:`prepare` (untimed: a fresh input), :meth:`run` (the step);
    :meth:`forward` and :meth:`backward` split the step for the memory probe; :meth:`prime` makes
    what the first step would create once (the upstream gradients) without a whole step."""

    def prepare(self) -> None: ...

    def prime(self) -> None: ...

    def run(self) -> None: ...

    def forward(self) -> Any: ...

    def backward(self, outputs: Any) -> None: ...


# --------------------------------------------------------------------------------------------------
# Memory.


@dataclass(frozen=True)
class MemoryStats:
    """Bytes of one training step, above the level before it (input and weights already allocated).

    ``held_bytes``: allocated by forward and still held when backward starts (activations the graph
    keeps, the output). ``peak_bytes``: the largest allocation during forward and backward (None on CPU
    without glibc's ``mallinfo2``).
    """

    held_bytes: int
    peak_bytes: int | None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_memory(step: Step, device: torch.device | str = "cpu", warmup: bool = True) -> MemoryStats:
    """Held and peak bytes of one ``step`` on ``device`` (see :class:`MemoryStats`).

    ``warmup`` runs one step first: lazily created state (fingerprint signs, BLAS and allocator
    caches, the upstream gradients) is not the step's memory. Without it (a module that already ran
    steps at another batch size) the step is only primed (:meth:`Step.prime`).
    """
    device = torch.device(device)
    if warmup:
        step.prepare()
        step.run()
    else:
        step.prime()
    step.prepare()
    with MemoryProbe(device, track_peak=True) as probe:
        outputs = step.forward()
        held = probe.mark("held")
        step.backward(outputs)
        del outputs
    return MemoryStats(held, probe.peak)


def largest_batch(fits: Callable[[int], bool], *, start: int = 1, limit: int = 1 << 20,
                  tolerance: float = 0.0, on_probe: Callable[[int, bool], None] | None = None) -> int:
    """The largest batch ``b <= limit`` with ``fits(b)``, assuming ``fits`` is monotone (true up to
    some batch, false above); 0 when ``fits(start)`` is false.

    Doubles from ``start`` until a batch does not fit, then bisects between the last batch that fit
    and the first that did not, until they are adjacent or ``hi - lo <= tolerance * lo`` (a coarser,
    cheaper answer: the true largest batch is then below ``lo * (1 + tolerance)``). ``on_probe(b,
    fitted)`` is called after each probe.
    """
    if start < 1 or limit < start:
        raise ValueError(f"revgrad.tools.measure: largest_batch needs 1 <= start <= limit, got {start}, {limit}")

    def probe(b: int) -> bool:
        ok = fits(b)
        if on_probe is not None:
            on_probe(b, ok)
        return ok

    if not probe(start):
        return 0
    lo = start
    while True:
        hi = min(2 * lo, limit)
        if hi == lo:
            return lo
        if not probe(hi):
            break
        lo = hi
    while hi - lo > max(1, tolerance * lo):
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory error (or a CPU allocation failure)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


# --------------------------------------------------------------------------------------------------
# Time.


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (``0 < q < 1``, percent resolution) of ``values``, inclusive method."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def paired_ratio(rounds: Sequence[Mapping[str, float]], num: str, den: str) -> float:
    """Median over rounds of ``num``'s round median divided by ``den``'s round median."""
    return statistics.median(r[num] / r[den] for r in rounds)


@dataclass
class Timings:
    """Step times of interleaved providers: every step (seconds) and every round's median per provider."""

    times: dict[str, list[float]] = field(default_factory=dict)
    rounds: list[dict[str, float]] = field(default_factory=list)

    def median_ms(self, provider: str) -> float:
        return statistics.median(self.times[provider]) * 1e3

    def quantile_ms(self, provider: str, q: float) -> float:
        return quantile(self.times[provider], q) * 1e3

    def ratio(self, provider: str, reference: str = "plain") -> float | None:
        """Paired ratio of step times to ``reference`` (:func:`paired_ratio`); None without it."""
        if reference not in self.times or not self.rounds:
            return None
        return paired_ratio(self.rounds, provider, reference)


def time_interleaved(
    steps: Mapping[str, Step],
    rounds: int,
    per_round: int = 1,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    on_step: Callable[[], None] | None = None,
) -> Timings:
    """Wall time of every step of every provider, providers interleaved.

    ``warmup`` untimed steps per provider first; then ``rounds`` rounds of ``per_round`` timed steps
    per provider, the provider order rotating by one every round so that a noisy machine slows all
    alike. A fresh input is made before each step, outside the timed region; on CUDA the device is
    synchronized before and after each step. ``on_step`` is called after each step (progress bars).
    """
    device = torch.device(device)
    names = list(steps)
    timings = Timings({p: [] for p in names})

    def one(p: str) -> float:
        step = steps[p]
        step.prepare()
        _sync(device)
        t0 = time.perf_counter()
        step.run()
        _sync(device)
        elapsed = time.perf_counter() - t0
        if on_step is not None:
            on_step()
        return elapsed

    for p in names:
        for _ in range(warmup):
            one(p)
    for r in range(rounds):
        k = r % len(names)
        medians: dict[str, float] = {}
        for p in names[k:] + names[:k]:
            gc.collect()
            measured = [one(p) for _ in range(per_round)]
            timings.times[p] += measured
            medians[p] = statistics.median(measured)
        timings.rounds.append(medians)
    return timings


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def pin_malloc() -> bool:
    """Keep freed memory in glibc's heap between steps (``mallopt``); True when it took effect.

    By default glibc returns freed memory to the kernel (heap trimming, and ``mmap`` for blocks above
    a threshold that adapts to what was freed last), so a step may touch megabytes of fresh pages
    again, depending on what ran before it. On the VM this benchmark was written on a page fault costs
    tens of microseconds: one provider measured 240 ms per step with warm pages and 360 ms when
    re-faulting 10 MB per step. Pinning the thresholds (trim above 1 GiB, ``mmap`` only above
    32 MiB, the largest value glibc accepts) makes every provider run on warm pages. It does not
    change what :class:`revgrad.tools.memory.MemoryProbe` counts (bytes allocated, not bytes mapped).
    """
    path = ctypes.util.find_library("c")
    if path is None:
        return False
    try:
        mallopt = ctypes.CDLL(path).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30)) and bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20))


# --------------------------------------------------------------------------------------------------
# The machine.


def cpu_model() -> str:
    """The CPU's model name as ``/proc/cpuinfo`` gives it (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where unknown)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_revision(root: Path | None = None) -> str | None:
    """``git describe --always --dirty`` of the checkout holding revgrad, plus the revgrad files
    changed since; None when revgrad is not run from a git checkout."""
    root = root or Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", "revgrad", "kernels"], cwd=root,
                                capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return rev + (f" (uncommitted: {', '.join(changed)})" if changed else "")


def machine_info(device: torch.device | str = "cpu", command: str | None = None) -> dict[str, Any]:
    """What a result was measured on: CPU model and cores, torch threads, the GPU when ``device`` is
    CUDA, torch / triton / Python / peer versions, revgrad's version and checkout, load average and the
    command line."""
    from .. import __version__

    device = torch.device(device)
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": available_cores(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memcnn": _version("memcnn"),
        "revlib": _version("revlib"),
        "revgrad": __version__,
        "revision": git_revision(),
        "loadavg_start": load_average(),
        "command": command,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
