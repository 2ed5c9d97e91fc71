"""Replaying a block evaluation exactly: RNG state, autocast state, and buffers.

Backward evaluates every block again (its inverse, its forward with grad, and, after a failed check,
its forward from an anchor). Each of those evaluations must see what the forward pass saw:

* the same random numbers (dropout masks), without reseeding or advancing the caller's RNG;
* the same autocast state, although backward may run on another thread or inside another context;
* the same buffers, and it must not update them a second time (BatchNorm running statistics must end
  up exactly as plain training leaves them).

The approach follows ``torch.utils.checkpoint``: snapshot the generator states in forward and restore
them, inside a fork, around each replay. Unlike checkpoint, a snapshot that the block never consumed
is dropped at once, so deterministic blocks pay for two ``get_rng_state`` calls in forward and nothing
in backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["AutocastState", "BufferGuard", "RngTape"]


def _cuda_index(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


@dataclass(frozen=True)
class _RngSnapshot:
    cpu: torch.Tensor
    cuda: torch.Tensor | None

    def same_as(self, other: _RngSnapshot) -> bool:
        if not torch.equal(self.cpu, other.cpu):
            return False
        if self.cuda is None or other.cuda is None:
            return self.cuda is other.cuda
        return torch.equal(self.cuda, other.cuda)


class RngTape:
    """Generator states recorded at marks in forward, restored around replays in backward.

    A block calls :meth:`mark` before each part that may draw random numbers (the engine marks once
    before the whole block; a coupling marks before each of its sub-networks, because its inverse
    runs them in reverse order). :meth:`close` drops the snapshots when nothing was drawn.
    """

    __slots__ = ("_cuda", "_marks", "consumed")

    def __init__(self, device: torch.device) -> None:
        self._cuda = _cuda_index(device)
        self._marks: list[_RngSnapshot] = []
        self.consumed = True

    def _snapshot(self) -> _RngSnapshot:
        cuda = torch.cuda.get_rng_state(self._cuda) if self._cuda is not None else None
        return _RngSnapshot(torch.get_rng_state(), cuda)

    def mark(self) -> None:
        self._marks.append(self._snapshot())

    def close(self) -> None:
        """Forget the snapshots when the generators did not move since the first mark."""
        if self._marks and self._marks[0].same_as(self._snapshot()):
            self._marks.clear()
            self.consumed = False

    @contextlib.contextmanager
    def replay(self, mark: int = 0) -> Iterator[None]:
        """Run the body with the generators as they were at ``mark``; restore the caller's after."""
        if not self.consumed:
            yield
            return
        snap = self._marks[mark]
        devices = [self._cuda] if self._cuda is not None else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(snap.cpu)
            if snap.cuda is not None:
                torch.cuda.set_rng_state(snap.cuda, self._cuda)
            yield


@dataclass(frozen=True)
class AutocastState:
    """Autocast settings of the forward pass, replayed around every evaluation in backward."""

    settings: tuple[tuple[str, bool, torch.dtype], ...]
    cache_enabled: bool

    @classmethod
    def capture(cls, device: torch.device) -> AutocastState:
        kinds = ["cpu"] if device.type == "cpu" else ["cpu", device.type]
        settings = tuple(
            (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) for kind in kinds
        )
        return cls(settings, torch.is_autocast_cache_enabled())

    @property
    def enabled(self) -> bool:
        return any(enabled for _, enabled, _ in self.settings)

    def compute_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype that applies to ``device``, or None when autocast is off there."""
        for kind, enabled, dtype in self.settings:
            if kind == device.type and enabled:
                return dtype
        return None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for kind, enabled, dtype in self.settings:
                stack.enter_context(
                    torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=self.cache_enabled)
                )
            yield


class BufferGuard:
    """The buffers a block may write to; replays in backward write to throwaway copies of them.

    Those are the buffers of every submodule in training mode (BatchNorm updates its running
    statistics inside the kernel, without bumping the tensors' version counters), plus any buffer
    whose version counter moved during forward. A block in eval mode without such writes costs a
    loop over its buffers in forward and nothing in backward.
    """

    __slots__ = ("_slots",)

    def __init__(self, slots: list[tuple[nn.Module, str]]) -> None:
        self._slots = slots

    @staticmethod
    def versions(block: nn.Module) -> list[tuple[nn.Module, str, int]]:
        return [
            (module, name, buf._version)
            for module in block.modules()
            for name, buf in module._buffers.items()
            if buf is not None
        ]

    @classmethod
    def written_since(cls, before: list[tuple[nn.Module, str, int]]) -> BufferGuard:
        slots = [
            (module, name)
            for module, name, version in before
            if module.training
            or (module._buffers[name] is not None and module._buffers[name]._version != version)
        ]
        return cls(slots)

    def __bool__(self) -> bool:
        return bool(self._slots)

    @contextlib.contextmanager
    def shield(self) -> Iterator[None]:
        if not self._slots:
            yield
            return
        originals = [(module, name, module._buffers[name]) for module, name in self._slots]
        for module, name, buf in originals:
            module._buffers[name] = buf.clone()
        try:
            yield
        finally:
            for module, name, buf in originals:
                module._buffers[name] = buf
