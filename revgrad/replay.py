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
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["AutocastState", "BlockSlots", "BufferGuard", "ParamAliases", "RngTape", "claim_tape", "recording"]


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
        """Forget the snapshots when the generators did not move since the first mark (or none was made)."""
        if not self._marks or self._marks[0].same_as(self._snapshot()):
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


_RECORDING: contextvars.ContextVar[RngTape | None] = contextvars.ContextVar("revgrad_tape", default=None)


@contextlib.contextmanager
def recording(tape: RngTape | None) -> Iterator[None]:
    """Make ``tape`` the one a fused block's forward claims (the engine wraps each block call)."""
    token = _RECORDING.set(tape)
    try:
        yield
    finally:
        _RECORDING.reset(token)


@contextlib.contextmanager
def claim_tape() -> Iterator[RngTape | None]:
    """For a fused block's forward: the engine's tape for this call (None outside the engine).

    Sub-networks called inside do not see it, so a block nested in a block cannot add marks.
    """
    token = _RECORDING.set(None)
    try:
        yield token.old_value if token.old_value is not contextvars.Token.MISSING else None
    finally:
        _RECORDING.reset(token)


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


class BlockSlots:
    """Where a block keeps its state, found in one walk over its modules (once per forward call).

    ``params``: every ``(module, name, parameter)`` slot holding a trainable parameter (a parameter
    shared by two modules has two slots); ``trainable``: those parameters, each once, in
    ``block.parameters()`` order; ``buffers``: every ``(module, name)`` slot holding a buffer;
    ``backward_hooks``: whether any of its modules has a backward (pre-)hook. One
    walk serves the engine's parameter list, the buffer snapshots and the parameter aliases: walking
    the module tree with ``modules()``/``parameters()`` three times per block and step was a visible
    part of the engine's per-block overhead on small blocks.
    """

    __slots__ = ("backward_hooks", "buffers", "params", "trainable")

    def __init__(self, block: nn.Module) -> None:
        params: list[tuple[nn.Module, str, torch.Tensor]] = []
        buffers: list[tuple[nn.Module, str]] = []
        trainable: list[torch.Tensor] = []
        seen_params: set[int] = set()
        seen: set[int] = set()
        hooks = False
        stack = [block]
        while stack:  # pre-order, children in registration order, each module once: modules()' order
            module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            for name, p in module._parameters.items():
                if p is not None and p.requires_grad:
                    params.append((module, name, p))
                    if id(p) not in seen_params:
                        seen_params.add(id(p))
                        trainable.append(p)
            for name, b in module._buffers.items():
                if b is not None:
                    buffers.append((module, name))
            hooks = hooks or bool(module._backward_hooks or module._backward_pre_hooks)
            stack.extend(reversed([c for c in module._modules.values() if c is not None]))
        self.params = params
        self.buffers = buffers
        self.trainable = trainable
        self.backward_hooks = hooks


class BufferGuard:
    """Buffers as the block's forward found them; replays in backward run on copies of those values.

    Kept: the buffers of every submodule in training mode (BatchNorm updates its running statistics
    inside the kernel, without bumping version counters) and any buffer whose version counter moved
    during forward. A replay sees the values forward started from (a block reading a buffer it also
    updates recomputes exactly), and whatever it writes is thrown away, so statistics are updated
    once per step. A block in eval mode that writes nothing keeps nothing.
    """

    __slots__ = ("_slots",)

    def __init__(self, slots: list[tuple[nn.Module, str, torch.Tensor]]) -> None:
        self._slots = slots

    @staticmethod
    def before(slots: BlockSlots) -> list[tuple[nn.Module, str, int, torch.Tensor]]:
        """Snapshot every buffer of a block (``slots``; cheap: buffers are small) before its forward."""
        snapshot = []
        for module, name in slots.buffers:
            buf = module._buffers[name]
            snapshot.append((module, name, buf._version, buf.clone()))
        return snapshot

    @classmethod
    def after(cls, snapshot: list[tuple[nn.Module, str, int, torch.Tensor]]) -> BufferGuard:
        slots = [
            (module, name, saved)
            for module, name, version, saved in snapshot
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
        live = [(module, name, module._buffers[name]) for module, name, _ in self._slots]
        for module, name, saved in self._slots:
            module._buffers[name] = saved.clone()
        try:
            yield
        finally:
            for module, name, buf in live:
                module._buffers[name] = buf


class ParamAliases:
    """Detached aliases of a block's parameters, swapped in while backward rebuilds its graph.

    Backward differentiates each block with ``torch.autograd.grad``. Asked for the parameters
    themselves, that fires hooks registered on them, and they fire again when the gradients leave the
    engine's Function: a hook that rescales a gradient would apply twice. Differentiating with respect
    to aliases (same storage, fresh leaves) leaves the parameters' hooks to fire exactly once.
    """

    __slots__ = ("_slots",)

    def __init__(self, slots: BlockSlots) -> None:
        self._slots = slots.params

    @contextlib.contextmanager
    def swap(self, params: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
        """Yield aliases of ``params`` (in order) while the block's modules hold them."""
        if not self._slots:
            yield list(params)
            return
        alias = {id(p): p.detach().requires_grad_() for p in params}
        # The slots were found in forward and the recompute must see forward's parameters, as plain
        # autograd's saved graph would; what a slot holds now (the user may have replaced a
        # parameter since) is put back afterwards.
        missing = object()
        swapped = []
        for module, name, p in self._slots:
            a = alias.get(id(p))
            if a is not None:
                swapped.append((module, name, module._parameters.get(name, missing)))
                module._parameters[name] = a
        try:
            yield [alias[id(p)] for p in params]
        finally:
            for module, name, held in reversed(swapped):
                if held is missing:
                    del module._parameters[name]
                else:
                    module._parameters[name] = held
