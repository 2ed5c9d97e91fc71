"""Replaying a block evaluation exactly: RNG state, training modes, autocast state, and buffers.

Backward evaluates every block again (its inverse, its forward with grad, and, after a failed check,
its forward from an anchor). Each of those evaluations must see what the forward pass saw:

* the same random numbers (dropout masks), without reseeding or advancing the caller's RNG, also
  when the inverse runs the block's sub-networks in another order than forward;
* the same training modes (``model.eval()`` between forward and backward changes nothing);
* the same autocast state, although backward may run on another thread or inside another context;
* the same buffers, and it must not update them a second time (BatchNorm running statistics must end
  up exactly as plain training leaves them), nor change any state of the module.

The approach follows ``torch.utils.checkpoint``: snapshot the generator states in forward and restore
them, inside a fork, around each replay. Unlike checkpoint, a snapshot that the block never consumed
is dropped at once, so deterministic blocks pay for a few snapshots in forward and nothing in
backward; and every replay checks that it drew the same random numbers.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import BlockError

__all__ = [
    "RNG_LOCK",
    "AutocastState",
    "BlockSlots",
    "BufferGuard",
    "ParamAliases",
    "RandomReplayError",
    "RngTape",
    "claim_tape",
    "owns_hook",
    "recording",
]


def _cuda_index(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


class RandomReplayError(BlockError):
    """Backward could not give a block the random numbers its forward drew (see :class:`RngTape`)."""


@dataclass(frozen=True)
class _RngSnapshot:
    """Generator states as bytes: comparing two is a memcmp (``torch.equal`` on the 5 KB CPU state
    costs several microseconds, and recording compares once per sub-module call)."""

    cpu: bytes
    cuda: bytes | None
    own: tuple[bytes, ...] = ()  # generators the block or the chain's arguments hold (torch.Generator objects)

    def same_as(self, other: _RngSnapshot) -> bool:
        return self.cpu == other.cpu and self.cuda == other.cuda and self.own == other.own


def _state(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


# One lock for every generator: a block's forward and each replay of it in backward hold it, so two
# threads that train with revgrad never draw from the (process-wide) default generators inside each
# other's blocks. Reentrant: a chain may run inside a block of another chain.
RNG_LOCK = threading.RLock()

# Sub-module calls are seen through global module hooks, installed only while a block that needs them
# runs (they slow every module call in the process down while present); a context variable says which
# recorders and replayers the calls of this thread belong to, outermost first (a chain may run inside
# a block of another chain: the outer one sees the inner one's calls too, as its replays will).
_CALLS: contextvars.ContextVar[tuple[_CallRecorder | _CallReplayer, ...]] = contextvars.ContextVar(
    "revgrad_module_calls", default=()
)
_HOOKS_LOCK = threading.Lock()
_HOOKS: list = []  # the two handles while installed
_HOOK_USERS = 0


def _pre_hook(module: nn.Module, args) -> None:
    for handler in _CALLS.get():
        handler.enter(module)


def _post_hook(module: nn.Module, args, output) -> None:
    for handler in reversed(_CALLS.get()):
        handler.leave(module)


def owns_hook(hook) -> bool:
    """Whether a global module hook is one of revgrad's own (engine checks ignore them)."""
    return hook is _pre_hook or hook is _post_hook


@contextlib.contextmanager
def _watching_calls(handler: _CallRecorder | _CallReplayer) -> Iterator[None]:
    global _HOOK_USERS
    with _HOOKS_LOCK:
        if _HOOK_USERS == 0:
            _HOOKS.append(torch.nn.modules.module.register_module_forward_pre_hook(_pre_hook))
            _HOOKS.append(torch.nn.modules.module.register_module_forward_hook(_post_hook, always_call=True))
        _HOOK_USERS += 1
    token = _CALLS.set((*_CALLS.get(), handler))
    try:
        yield
    finally:
        _CALLS.reset(token)
        with _HOOKS_LOCK:
            _HOOK_USERS -= 1
            if _HOOK_USERS == 0:
                for handle in _HOOKS:
                    handle.remove()
                _HOOKS.clear()


class _CallRecorder:
    """Records, for each call of a sub-module inside one block's forward, the generator states before
    and after it when it drew random numbers (``None`` when it drew none), keyed by module and call
    order; and whether random numbers were drawn outside every sub-module call ("gaps")."""

    __slots__ = ("calls", "gaps", "last", "root", "stack", "tape")

    def __init__(self, tape: RngTape, root: nn.Module) -> None:
        self.tape = tape
        self.root = root
        self.stack: list[tuple[nn.Module, _RngSnapshot]] = []
        self.last = tape._marks[-1]  # the state after the last top-level call (the block's start)
        self.gaps = False
        self.calls: dict[int, tuple[nn.Module, list[tuple[_RngSnapshot, _RngSnapshot] | None]]] = {}

    def enter(self, module: nn.Module) -> None:
        if module is self.root:
            return
        snap = self.tape._snapshot()
        if not self.stack and not snap.same_as(self.last):
            self.gaps = True  # drawn by the block's own code (or a sub-module called through .forward)
        self.stack.append((module, snap))

    def leave(self, module: nn.Module) -> None:
        if module is self.root:
            return
        if not self.stack or self.stack[-1][0] is not module:
            self.gaps = True  # unbalanced calls (an exception inside a sub-module): trust nothing
            return
        _, before = self.stack.pop()
        after = self.tape._snapshot()
        entry = None if before.same_as(after) else (before, after)
        self.calls.setdefault(id(module), (module, []))[1].append(entry)
        if not self.stack:
            self.last = after


_UNRECORDED = object()


class _CallReplayer:
    """Gives every sub-module call in a replay the generator state its forward call started from (the
    k-th call of a module gets the k-th forward call's), and notes any call whose random numbers come
    out differently."""

    __slots__ = ("counts", "problem", "stack", "strict", "tape")

    def __init__(self, tape: RngTape, strict: bool) -> None:
        self.tape = tape
        # A recompute of forward must draw exactly forward's numbers; an inverse may also draw none
        # where forward drew some (an i-ResNet's inverse needs no Hutchinson samples).
        self.strict = strict
        self.counts: dict[int, int] = {}
        self.stack: list[tuple[object, _RngSnapshot | None]] = []
        self.problem: str | None = None

    def enter(self, module: nn.Module) -> None:
        calls = self.tape._calls
        assert calls is not None
        if module is self.tape._root:
            return
        k = self.counts.get(id(module), 0)
        self.counts[id(module)] = k + 1
        recorded = calls.get(id(module))
        if recorded is None or recorded[0] is not module or k >= len(recorded[1]):
            # Forward made no such call: harmless unless it draws random numbers now.
            self.stack.append((_UNRECORDED, self.tape._snapshot()))
            return
        entry = recorded[1][k]
        if entry is not None:
            self.tape._restore(entry[0])
        self.stack.append((entry, None))

    def leave(self, module: nn.Module) -> None:
        if module is self.tape._root or not self.stack:
            return
        entry, before = self.stack.pop()
        if entry is None or self.problem is not None:
            return
        now = self.tape._snapshot()
        if entry is _UNRECORDED:
            if before is not None and not now.same_as(before):
                self.problem = (
                    f"{type(module).__name__} drew random numbers in backward in a call its forward did not make"
                )
        elif not now.same_as(entry[1]) and (self.strict or not now.same_as(entry[0])):  # type: ignore[index]
            self.problem = f"{type(module).__name__} drew other random numbers than in forward"


class RngTape:
    """Generator states recorded in forward, restored around replays in backward.

    Three ways to record, by kind of block:

    * a *fused* block marks before each part that may draw random numbers (:meth:`mark`; a coupling
      marks before each sub-network, because its inverse runs them in reverse order) and replays
      part ``k`` with :meth:`replay`;
    * for any other block the engine marks once before the block and, when the block has
      sub-modules, records the state around every sub-module call (:meth:`recording_calls`), keyed
      by module and call order: when backward's inverse calls them in another order than forward
      (``g`` before ``f``), each call still gets the random numbers its forward call drew;
    * :meth:`close` drops everything when nothing was drawn.

    Every replay checks that the random numbers came out the same: the state after a replayed part
    must be the state forward reached there. When it is not (another thread drew from the same
    generator while the block ran outside revgrad's lock, or the inverse draws in a call forward did
    not make), the replay raises :class:`RandomReplayError` instead of letting a gradient be wrong.
    """

    __slots__ = (
        "_calls", "_cuda", "_end", "_generators", "_marks", "_owner", "_previous", "_recorder", "_root", "consumed",
        "gaps",
    )

    def __init__(
        self,
        device: torch.device,
        owner: str | None = None,
        previous: RngTape | None = None,
        generators: tuple[torch.Generator, ...] = (),
    ) -> None:
        self._cuda = _cuda_index(device)
        # Generator objects of the block's own (module attributes) or among the chain's arguments:
        # replayed like the default generators.
        self._generators = generators
        # The previous block's end state: where nothing drew in between, this block's first mark is
        # the same state, and keeps the same object (a CPU generator's state is 5 KB per snapshot).
        self._previous = previous._end if previous is not None else None
        self._marks: list[_RngSnapshot] = []
        self._end: _RngSnapshot | None = None
        self._calls: dict[int, tuple[nn.Module, list]] | None = None
        self._recorder: _CallRecorder | None = None
        self._root: nn.Module | None = None  # the block whose sub-module calls were recorded
        self._owner = owner or "a block"
        self.consumed = True
        # Whether random numbers were drawn where no sub-module call keys them (None: not recorded).
        self.gaps: bool | None = None

    def _snapshot(self) -> _RngSnapshot:
        cuda = torch.cuda.get_rng_state(self._cuda).numpy().tobytes() if self._cuda is not None else None
        own = tuple(g.get_state().numpy().tobytes() for g in self._generators)
        return _RngSnapshot(torch.get_rng_state().numpy().tobytes(), cuda, own)

    def _restore(self, snap: _RngSnapshot) -> None:
        torch.set_rng_state(_state(snap.cpu))
        if snap.cuda is not None:
            torch.cuda.set_rng_state(_state(snap.cuda), self._cuda)
        for g, raw in zip(self._generators, snap.own):
            g.set_state(_state(raw))

    def mark(self) -> None:
        snap = self._snapshot()
        if not self._marks and self._previous is not None and snap.same_as(self._previous):
            snap = self._previous
        self._previous = None
        self._marks.append(snap)

    @contextlib.contextmanager
    def recording_calls(self, root: nn.Module) -> Iterator[None]:
        """Record the sub-module calls of ``root``'s forward (after :meth:`mark`)."""
        recorder = _CallRecorder(self, root)
        with _watching_calls(recorder):
            yield
        self._recorder = recorder
        self._root = root

    def close(self) -> None:
        """Forget the snapshots when the generators did not move since the first mark (or none was made)."""
        end = self._snapshot()
        recorder, self._recorder = self._recorder, None
        if not self._marks or self._marks[0].same_as(end):
            self._marks.clear()
            self.consumed = False
            return
        self._end = end
        if recorder is not None:
            self.gaps = recorder.gaps or bool(recorder.stack) or not recorder.last.same_as(end)
            drew = {k: v for k, v in recorder.calls.items() if any(e is not None for e in v[1])}
            self._calls = drew or None
        if self._calls is None:
            self._root = None

    def _fail(self, problem: str) -> RandomReplayError:
        return RandomReplayError(
            f"revgrad: {self._owner} drew random numbers in forward that backward could not replay: "
            f"{problem}. This happens when another thread draws from the same generator while the block "
            "runs (outside revgrad), or when the block's inverse draws random numbers where its forward "
            "did not. Use preserve_rng_state=False only for blocks without randomness."
        )

    @contextlib.contextmanager
    def replay(self, mark: int = 0) -> Iterator[None]:
        """For a fused block: run part ``mark`` with the generators as they were at that mark; the
        part must leave them as forward did at the next mark (or the end). Restores the caller's."""
        if not self.consumed:
            yield
            return
        expect = self._marks[mark + 1] if mark + 1 < len(self._marks) else self._end
        with RNG_LOCK, self._forked():
            self._restore(self._marks[mark])
            yield
            if expect is not None and not self._snapshot().same_as(expect):
                raise self._fail(f"part {mark} of its forward came out differently")

    @contextlib.contextmanager
    def replay_block(self, same_order: bool) -> Iterator[None]:
        """For the engine: run a whole evaluation of the block with forward's random numbers.

        ``same_order``: the body runs the block's forward again (a recompute), so it must end where
        forward ended; otherwise (its inverse) each sub-module call is checked on its own.
        """
        if not self.consumed:
            yield
            return
        with RNG_LOCK, self._forked():
            self._restore(self._marks[0])
            replayer = _CallReplayer(self, strict=same_order) if self._calls else None
            with _watching_calls(replayer) if replayer is not None else contextlib.nullcontext():
                yield
            problem = replayer.problem if replayer is not None else None
            if problem is None and same_order and self._end is not None and not self._snapshot().same_as(self._end):
                problem = "its recompute ended with the generators in another state than its forward"
            if problem is not None:
                raise self._fail(problem)

    @contextlib.contextmanager
    def _forked(self) -> Iterator[None]:
        """Put the caller's generator states back afterwards (the global ones and the block's own)."""
        devices = [self._cuda] if self._cuda is not None else []
        own = [g.get_state() for g in self._generators]
        with torch.random.fork_rng(devices=devices, enabled=True):
            try:
                yield
            finally:
                for g, state in zip(self._generators, own):
                    g.set_state(state)


_RECORDING: contextvars.ContextVar[RngTape | None] = contextvars.ContextVar("revgrad_tape", default=None)


@contextlib.contextmanager
def recording(tape: RngTape | None) -> Iterator[None]:
    """Make ``tape`` the one a fused block's forward claims (the engine wraps each block call)."""
    token = _RECORDING.set(tape)
    try:
        yield
    finally:
        _RECORDING.reset(token)


class NullTape:
    """The tape of a call outside the engine, or of a block that drew no random numbers: marking and
    replaying do nothing. A fused block's code never needs to test for it."""

    __slots__ = ()

    def mark(self) -> None:
        pass

    def replay(self, mark: int = 0) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


NULL_TAPE = NullTape()


@contextlib.contextmanager
def claim_tape() -> Iterator[RngTape | NullTape]:
    """For a fused block's forward: the engine's RNG tape for this call (a :class:`NullTape` outside
    the engine). Call ``tape.mark()`` before each part that may draw random numbers (each
    sub-network); ``inverse_for_backward`` then replays part ``k`` inside ``tape.replay(k)``.

    Sub-networks called inside do not see it, so a block nested in a block cannot add marks.
    """
    token = _RECORDING.set(None)
    try:
        claimed = token.old_value if token.old_value is not contextvars.Token.MISSING else None
        yield NULL_TAPE if claimed is None else claimed
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


# Names of a module's attributes that hold a torch.Generator, found by scanning its __dict__ again
# only when the number of attributes changed (a scan per module and forward cost ~2 us, a third of
# the walk below); the values are read afresh each time.
_GENERATOR_ATTRS: weakref.WeakKeyDictionary[nn.Module, tuple[int, tuple[str, ...]]] = weakref.WeakKeyDictionary()


def _generator_attributes(module: nn.Module) -> tuple[str, ...]:
    d = module.__dict__
    known = _GENERATOR_ATTRS.get(module)
    if known is not None and known[0] == len(d):
        return known[1]
    names = tuple(k for k, v in d.items() if type(v) is torch.Generator)
    _GENERATOR_ATTRS[module] = (len(d), names)
    return names


class BlockSlots:
    """Where a block keeps its state, found in one walk over its modules (once per forward call).

    ``params``: every ``(module, name, parameter)`` slot holding a trainable parameter (a parameter
    shared by two modules has two slots); ``trainable``: those parameters, each once, in
    ``block.parameters()`` order; ``buffers``: every ``(module, name)`` slot holding a buffer;
    ``modules``: the block's modules, each once (their training modes are replayed in backward);
    ``backward_hooks``: whether any of its modules has a backward (pre-)hook; ``hooks``: any hook;
    ``generators``: ``torch.Generator`` objects its modules hold as attributes. One walk serves the
    engine's parameter list, the buffer snapshots, the modes and the parameter aliases: walking the
    module tree with ``modules()``/``parameters()`` several times per block and step was a visible
    part of the engine's per-block overhead on small blocks.
    """

    __slots__ = ("backward_hooks", "buffers", "generators", "hooks", "modules", "params", "trainable")

    def __init__(self, block: nn.Module) -> None:
        params: list[tuple[nn.Module, str, torch.Tensor]] = []
        buffers: list[tuple[nn.Module, str]] = []
        trainable: list[torch.Tensor] = []
        modules: list[nn.Module] = []
        seen_params: set[int] = set()
        seen: set[int] = set()
        hooks = any_hooks = False
        generators: dict[int, torch.Generator] = {}
        stack = [block]
        while stack:  # pre-order, children in registration order, each module once: modules()' order
            module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            modules.append(module)
            for name, p in module._parameters.items():
                if p is not None and p.requires_grad:
                    params.append((module, name, p))
                    if id(p) not in seen_params:
                        seen_params.add(id(p))
                        trainable.append(p)
            for name, b in module._buffers.items():
                if b is not None:
                    buffers.append((module, name))
            for name in _generator_attributes(module):  # drawn from in forward, maybe: replayed too
                value = module.__dict__.get(name)
                if type(value) is torch.Generator:
                    generators[id(value)] = value
            hooks = hooks or bool(module._backward_hooks or module._backward_pre_hooks)
            any_hooks = any_hooks or bool(module._forward_hooks or module._forward_pre_hooks)
            stack.extend(reversed([c for c in module._modules.values() if c is not None]))
        self.params = params
        self.buffers = buffers
        self.trainable = trainable
        self.modules = modules
        self.backward_hooks = hooks
        self.hooks = hooks or any_hooks
        self.generators = tuple(generators.values())

    def modes(self) -> tuple[bool, ...]:
        """The training flag of every module, in ``modules`` order."""
        return tuple(m.training for m in self.modules)

    def param_name(self, p: torch.Tensor, block: nn.Module) -> str:
        """``p``'s name relative to the block (for messages)."""
        for name, q in block.named_parameters(remove_duplicate=False):
            if q is p:
                return name
        return next((name for _, name, q in self.params if q is p), "?")

    @contextlib.contextmanager
    def modes_as(self, modes: tuple[bool, ...]) -> Iterator[None]:
        """Run the body with the modules in ``modes`` (forward's), whatever ``.train()``/``.eval()``
        the user called since; put the current modes back afterwards."""
        changed = [m for m, t in zip(self.modules, modes) if m.training != t]
        for m in changed:
            m.training = not m.training
        try:
            yield
        finally:
            for m in changed:
                m.training = not m.training


class BufferGuard:
    """Buffers as the block's forward found and left them, for its evaluations in backward.

    A replay of the block's forward (a recompute) must see the values forward started from, and an
    evaluation of its inverse the values forward left (an inverse called after forward sees the
    module as forward left it: a data-dependent initialisation flag is set, say). Neither may change
    the module's state: BatchNorm statistics are updated once per step, by forward.

    Kept: the pre-forward values of the buffers forward may have written (every buffer of a
    submodule in training mode: BatchNorm updates its running statistics inside the kernel without
    bumping version counters; any buffer whose version counter moved; any buffer forward replaced),
    and their post-forward values when the block's inverse will run (``keep_after``). Evaluations
    run on copies of those. Every other buffer is only read: backward uses forward's tensor and
    :meth:`changed` tells whether it was modified in place since.
    """

    __slots__ = ("_read", "_written")

    def __init__(self, written: list, read: list) -> None:
        self._written = written  # (module, name, before, after or None)
        self._read = read  # (module, name, tensor, version)

    @staticmethod
    def before(slots: BlockSlots) -> list[tuple[nn.Module, str, torch.Tensor, int, torch.Tensor]]:
        """Snapshot every buffer of a block (``slots``; cheap: buffers are small) before its forward."""
        snapshot = []
        for module, name in slots.buffers:
            buf = module._buffers[name]
            snapshot.append((module, name, buf, buf._version, buf.clone()))
        return snapshot

    @classmethod
    def after(cls, snapshot, keep_after: bool = False) -> BufferGuard:
        written, read = [], []
        for module, name, buf, version, saved in snapshot:
            now = module._buffers.get(name)
            if module.training or now is not buf or (now is not None and now._version != version):
                after = now.clone() if keep_after and now is not None else None
                written.append((module, name, saved, after))
            else:
                read.append((module, name, buf, version))
        return cls(written, read)

    def __bool__(self) -> bool:
        return bool(self._written or self._read)

    def changed(self) -> torch.Tensor | None:
        """A read-only buffer modified in place since forward (None if none)."""
        for _, _, buf, version in self._read:
            if buf._version != version:
                return buf
        return None

    @contextlib.contextmanager
    def shield(self, after: bool = False) -> Iterator[None]:
        """Run the body on forward's buffers: copies of the values before (or, with ``after``, after)
        forward for the written ones, forward's tensors for the read ones; put back what the
        modules hold now afterwards."""
        if not self._written and not self._read:
            yield
            return
        live = [(module, name, module._buffers.get(name)) for module, name, *_ in self._written]
        live += [(module, name, module._buffers.get(name)) for module, name, *_ in self._read]
        for module, name, before, post in self._written:
            value = post if after and post is not None else before
            module._buffers[name] = value.clone()
        for module, name, buf, _ in self._read:
            module._buffers[name] = buf
        try:
            yield
        finally:
            for module, name, buf in live:
                module._buffers[name] = buf


class ParamAliases:
    """Detached aliases of a block's parameters, swapped in while backward evaluates it.

    Backward differentiates each block with ``torch.autograd.grad``. Asked for the parameters
    themselves, that fires hooks registered on them, and they fire again when the gradients leave the
    engine's Function: a hook that rescales a gradient would apply twice. Differentiating with respect
    to aliases (same storage, fresh leaves) leaves the parameters' hooks to fire exactly once. An
    inverse evaluated without grad also runs on aliases: a block that reassigns ``p.data`` there
    (a data-dependent initialisation) changes the alias, never the parameter.

    ``substitutes`` (FSDP2, :mod:`revgrad.engine.sharding`): id of a parameter -> the tensor to alias in
    its place (a sharded parameter's unsharded one); a slot holding either gets the alias.
    """

    __slots__ = ("_slots", "_substitutes")

    def __init__(self, slots: BlockSlots, substitutes: dict[int, torch.Tensor] | None = None) -> None:
        self._slots = slots.params
        self._substitutes = substitutes

    @contextlib.contextmanager
    def swap(self, params: list[torch.Tensor], grad: bool = True) -> Iterator[list[torch.Tensor]]:
        """Yield aliases of ``params`` (in order) while the block's modules hold them."""
        if not self._slots:
            yield list(params)
            return
        if self._substitutes:
            alias = {}
            for p in params:
                q = self._substitutes.get(id(p), p)
                alias[id(p)] = alias[id(q)] = q.detach().requires_grad_() if grad else q.detach()
        else:
            alias = {id(p): (p.detach().requires_grad_() if grad else p.detach()) for p in params}
        # The slots were found in forward and the evaluation must see forward's parameters, as plain
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
