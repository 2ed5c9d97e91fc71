"""The engine: memory-saving backprop through a chain of blocks, with checked reconstruction.

Forward (one ``torch.autograd.Function``, blocks run under ``no_grad``) keeps only the chain's output,
per block a fingerprint of its input (``check != "off"``), RNG snapshots when the block drew random
numbers, the buffers it wrote, and the anchors (exact block inputs; ``check="correct"`` only: the
chain's input, adaptive anchors, and every k-th block's with ``anchor_every=k``).

Backward, for block ``i`` from the top, with ``y`` its (trusted) output and ``gy = dL/dy``:

1. ``x`` = the stored anchor, or the exact input from an earlier correction, else ``x`` rebuilt by the
   block's inverse (fused couplings also return the recompute graph: one sub-network evaluation);
2. a rebuilt ``x`` is compared with its fingerprint before anything uses it; a relative error above
   ``tol`` (or NaN/Inf) raises :class:`ReconstructionError` (``"detect"``), or (``"correct"``) the
   chain runs forward again from the nearest anchor below, laying the regular anchors on the way and
   keeping the exact inputs above the last one for the blocks below, and uses the exact ``x``;
3. the VJP of the block at ``x`` (recomputed with grad, RNG and autocast replayed, buffers shielded)
   gives ``dL/dx`` and the block's parameter gradients, which ``backward`` returns through autograd.

Gradients therefore reach parameters as outputs of ``backward``: ``torch.autograd.grad``, hooks and
DDP see them as they would with plain autograd.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import numbers
import os
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..ops import dispatch
from ..ops.fingerprint import fingerprint, fingerprint_parts
from . import halves, sensitivity, sharding
from .anchors import DRIFT, AdaptiveAnchors, regular_anchors
from .arguments import NO_ARGS, CallArgs, check_accepts
from .checks import MEASURED_EXACTLY, FingerprintRequest, FingerprintStore, default_tol, relative_error, requesting
from .graph_budget import GraphBudget, SavedBytes
from .halves import Halves
from .protocol import (
    VJP,
    BlockError,
    ReconstructionError,
    block_name,
    block_type,
    check_inverse_output,
    split_output,
)
from .replay import (
    NULL_TAPE,
    RNG_LOCK,
    AutocastState,
    BlockSlots,
    BufferGuard,
    ParamAliases,
    RngTape,
    owns_hook,
    recording,
)
from .report import BackwardReport
from .sensitivity import BUDGET, DEFAULT_PROBE_EVERY, Sensitivity, perturbed, relative_change

__all__ = ["CHECK_MODES", "EngineConfig", "run_chain", "run_plain"]

logger = logging.getLogger("revgrad")

CheckMode = Literal["off", "detect", "correct"]
CHECK_MODES: tuple[str, ...] = ("off", "detect", "correct")


@dataclass
class EngineConfig:
    """How a chain runs backward.

    Attributes:
        check: ``"off"`` (classic reversible backprop), ``"detect"`` (raise on a drifted
            reconstruction) or ``"correct"`` (replace it by an exact recomputation from an anchor).
        tol: relative reconstruction error allowed; ``None`` picks :func:`default_tol` of the
            compute dtype (the autocast dtype when autocast is on).
        anchor_every: ``None``: forward stores only the chain's input, and a correction lays regular
            anchors every ``ceil(sqrt(N))`` blocks as it recomputes; ``k``: forward stores every k-th
            block input (more memory held, cheaper corrections).
        preserve_rng_state: replay the generators' states in backward (dropout masks).
        warn: emit a ``RuntimeWarning`` and a ``logging`` record on each correction.
        graph_budget: bytes of autograd graphs the last blocks of a chain may keep instead of being
            recomputed in backward (:mod:`revgrad.engine.graph_budget`); 0 keeps none.
        probe_every: measure the VJPs' sensitivity to their activations in the first backward and
            then every so many (twice as late after each probe that found them stable, up to 8x:
            :mod:`revgrad.engine.sensitivity`); 0 checks activations against ``tol`` only.
    """

    check: CheckMode = "correct"
    tol: float | None = None
    anchor_every: int | None = None
    preserve_rng_state: bool = True
    warn: bool = False
    graph_budget: int = 0
    probe_every: int = DEFAULT_PROBE_EVERY

    def __post_init__(self) -> None:
        if self.check not in CHECK_MODES:
            raise ValueError(f"revgrad: check must be one of {CHECK_MODES}, got {self.check!r}")
        if self.tol is not None:
            if not _is_number(self.tol):
                raise TypeError(f"revgrad: tol must be a positive number or None, got {self.tol!r}")
            if not self.tol > 0:  # NaN fails this too; inf is allowed (measure, never correct)
                raise ValueError(f"revgrad: tol must be a positive number, got {self.tol!r}")
        if self.anchor_every is not None and (not _is_int(self.anchor_every) or self.anchor_every < 1):
            raise ValueError(f"revgrad: anchor_every must be a positive integer or None, got {self.anchor_every!r}")
        if not _is_int(self.graph_budget) or self.graph_budget < 0:
            raise ValueError(f"revgrad: graph_budget must be a number of bytes >= 0, got {self.graph_budget!r}")
        if not _is_int(self.probe_every) or self.probe_every < 0:
            raise ValueError(f"revgrad: probe_every must be an integer >= 0 (0: no probes), got {self.probe_every!r}")
        for name in ("preserve_rng_state", "warn"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"revgrad: {name} must be True or False, got {getattr(self, name)!r}")


def _is_int(value: object) -> bool:
    """An integer, but not a bool (``anchor_every=True`` is a mistake, not 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------------
# Directions: the chain runs forward (forward, rebuilt by inverse) or as its inverse (the reverse).


def _has_hooks(block: nn.Module) -> bool:
    if not (block._forward_hooks or block._forward_pre_hooks or block._backward_hooks or block._backward_pre_hooks):
        return False
    return sharding.has_own_hooks(block)  # FSDP2's own forward hooks do not count: the engine drives FSDP2


def _accepts(block: nn.Module, keyword: str) -> bool:
    """Whether a fused block's ``inverse_for_backward`` accepts ``keyword``: ``grad_y`` (the incoming
    gradient, known before the check) or ``exact`` (the block's exact input, when one is stored)."""
    if inspect.isfunction(inspect.getattr_static(type(block), "inverse_for_backward", None)):
        return _class_accepts(type(block), keyword)
    # Delegated (torch.compile's OptimizedModule forwards attributes to the module it wraps) or set
    # on the instance: ask the bound method.
    return _parameter_named(getattr(block, "inverse_for_backward", None), keyword)


@functools.cache
def _class_accepts(cls: type, keyword: str) -> bool:
    return _parameter_named(cls.inverse_for_backward, keyword)


def _parameter_named(fn, keyword: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    # Taken by name only: a **kwargs catch-all is for the chain's extra arguments, not the protocol's.
    return keyword in params and params[keyword].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                          inspect.Parameter.KEYWORD_ONLY)


# Blocks whose forward needs autograd inside it (FrEIA's IResNetLayer takes its log-determinant with
# torch.autograd.grad): the engine evaluates them with grad enabled on a detached input and keeps no
# graph. Learned the first time such a block fails under no_grad.
_GRAD_INSIDE: weakref.WeakSet[nn.Module] = weakref.WeakSet()

# Why a rank whose own rebuild passed raises with check="detect" (FSDP2: ranks decide together).
_ANOTHER_RANK = "another rank's rebuild of this block's input failed its check, and FSDP2's ranks decide together"

# A tolerance below this fraction of the default is under the fingerprint's noise floor (5.6e-7 of
# 1e-5 in float32, docs/architecture.md, "Tolerances"): an adaptive anchor there is used as exact.
_UNRESOLVABLE = 1 / 20


def _detached(out):
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, (tuple, list)):
        return type(out)(o.detach() if isinstance(o, torch.Tensor) else o for o in out)
    return out


def _evaluate(block: nn.Module, fn, h: torch.Tensor, call: CallArgs):
    """``fn(h, *call.args, **call.kwargs)`` in the caller's grad mode; under ``no_grad`` (the engine's
    forward, inverse and corrections), a block that needs autograd inside runs with grad on a detached
    ``h`` (and arguments) and its outputs are detached: no graph is kept."""
    if block not in _GRAD_INSIDE or torch.is_grad_enabled():
        return fn(h, *call.args, **call.kwargs)
    call = call.detached()
    with torch.enable_grad():
        return _detached(fn(h.detach(), *call.args, **call.kwargs))


# Whether a block drew random numbers in its last forward. Recording its sub-module calls costs a
# few microseconds per call, so a block seen deterministic is not recorded; if it draws again (after
# model.train(), say), that forward keeps its input instead (see _record) and the next one records.
_DREW: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _recording_calls(tape: RngTape, block: nn.Module) -> contextlib.AbstractContextManager[None]:
    """For a block that is not fused: record its sub-module calls (the inverse may make them in
    another order than forward), unless it has none or drew no random numbers last time."""
    if block._modules and _DREW.get(block, True):
        return tape.recording_calls(block)
    return contextlib.nullcontext()


class _Forward:
    name = "forward"

    @staticmethod
    def fused(block: nn.Module) -> bool:
        # A block with module hooks of its own takes the two-step path, where backward recomputes it
        # through __call__ and its hooks see the recomputation as they would see plain autograd.
        return callable(getattr(block, "inverse_for_backward", None)) and not _has_hooks(block)

    @staticmethod
    def record(block: nn.Module, label: int, h: torch.Tensor, call: CallArgs, tape: RngTape | None, fused: bool):
        if tape is None or fused:  # fused blocks mark before each of their sub-networks themselves
            with recording(tape):
                out = block(h, *call.args, **call.kwargs)
        else:
            tape.mark()
            # recording(None): a fused block nested inside draws in sequence, seen by the call records.
            with recording(None), _recording_calls(tape, block):
                out = _evaluate(block, block, h, call)
        return split_output(out, label, block, h)

    @staticmethod
    def run(block: nn.Module, label: int, h: torch.Tensor, call: CallArgs):
        return split_output(_evaluate(block, block, h, call), label, block, h)

    @staticmethod
    def undo(block: nn.Module, label: int, y: torch.Tensor, call: CallArgs, rec: _Record) -> torch.Tensor:
        return check_inverse_output(_evaluate(block, block.inverse, y, call), label, block, rec.shape, rec.dtype)


class _Inverse:
    name = "inverse"

    @staticmethod
    def fused(block: nn.Module) -> bool:
        return False

    @staticmethod
    def _call(block: nn.Module, label: int, h: torch.Tensor, call: CallArgs):
        """``block.inverse(h)`` as ``(x, the logdet it returned as (x, logdet), or None)``."""
        out = _evaluate(block, sharding.through_fsdp(block, block.inverse), h, call)
        ld = None
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            ld = out[1] if len(out) == 2 else None
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != h.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise BlockError(
                f"revgrad: {block_name(label, block)}.inverse maps {tuple(h.shape)} to {shape}; "
                "expected a tensor with the same batch dimension"
            )
        return out, ld

    @classmethod
    def run(cls, block: nn.Module, label: int, h: torch.Tensor, call: CallArgs):
        return cls._call(block, label, h, call)[0], None

    @classmethod
    def record(cls, block: nn.Module, label: int, h: torch.Tensor, call: CallArgs, tape: RngTape | None, fused: bool):
        if tape is None:
            return cls.run(block, label, h, call)
        tape.mark()
        with recording(None), _recording_calls(tape, block):
            return cls.run(block, label, h, call)

    @staticmethod
    def undo(block: nn.Module, label: int, y: torch.Tensor, call: CallArgs, rec: _Record) -> torch.Tensor:
        x, _ = split_output(_evaluate(block, block, y, call), label, block, y)
        if x.shape != rec.shape:
            raise BlockError(
                f"revgrad: {block_name(label, block)} maps {tuple(y.shape)} to {tuple(x.shape)}, but its "
                f"inverse was given {tuple(rec.shape)}; forward(inverse(y)) must have y's shape"
            )
        return x if x.dtype == rec.dtype else x.to(rec.dtype)


class _InverseWithLogdet(_Inverse):
    """The inverse direction keeping log-determinants (``chain.inverse(y, with_logdet=True)``).

    A block's inverse logdet is the one its ``inverse`` returns as ``(x, logdet)``; for a block whose
    inverse returns ``x`` only (revgrad's couplings and layers, FrEIABlock), minus its forward's logdet
    at the rebuilt input, ``log|det dx/dy| = -log|det dy/dx|(x)``: one more forward evaluation of the
    block (no logdet from forward: volume-preserving, none). The engine differentiates ``(x, logdet)``
    as it does a forward block's ``(y, logdet)``."""

    @classmethod
    def run(cls, block: nn.Module, label: int, h: torch.Tensor, call: CallArgs):
        x, ld = cls._call(block, label, h, call)
        if ld is not None:
            return split_output((x, ld), label, block, x)
        with requesting(None):  # a fused forward must not answer the engine's fingerprint request
            _, ld = split_output(_evaluate(block, block, x, call), label, block, x)
        return x, (None if ld is None else -ld)


_DIRECTIONS = {"forward": _Forward, "inverse": _Inverse}


# --------------------------------------------------------------------------------------------------


@dataclass
class _Record:
    """What forward keeps about one block's input (its fingerprint is a saved tensor of the Function)."""

    shape: torch.Size
    dtype: torch.dtype
    nbytes: int
    tape: RngTape | None
    buffers: BufferGuard
    modes: tuple[bool, ...]  # the training flag of each of the block's modules (BlockSlots.modules)
    has_logdet: bool
    fused: bool
    two_part: bool = False  # forward handed this block its input as halves (revgrad.engine.halves)
    split_dim: int = 1  # the dimension a two-part block splits

    def replay(self, same_order: bool = True) -> contextlib.AbstractContextManager[None]:
        """Forward's random numbers for an evaluation of the block: its forward again
        (``same_order``) or its inverse."""
        return self.tape.replay_block(same_order) if self.tape is not None else contextlib.nullcontext()


@dataclass
class _Chain:
    """One call's static plan: blocks, their parameters, and the engine settings."""

    blocks: list[nn.Module]
    labels: list[int]  # each block's position in the user's container, for messages and reports
    direction: type[_Forward] | type[_Inverse]
    config: EngineConfig
    params: list[torch.Tensor]
    block_params: list[list[int]]
    slots: list[BlockSlots]  # per block: its parameter and buffer slots, found once per call
    owner: object | None
    adaptive: AdaptiveAnchors | None
    graphs: GraphBudget | None = None  # measures graph sizes in backward for the kept-graph budget
    shape: tuple[int, ...] = ()  # the chain input's shape (graph sizes are per shape)
    kept_above: list[int] = field(default_factory=list)  # labels of the kept blocks after this chain
    sensitivity: Sensitivity | None = None  # gradient-aware tolerances (revgrad.engine.sensitivity)
    call: CallArgs = NO_ARGS  # the chain's extra arguments, passed to every block (revgrad.engine.arguments)
    sharding: sharding.ChainShards | None = None  # FSDP2 states inside the blocks (revgrad.engine.sharding)


def _collect_params(blocks: list[nn.Module]) -> tuple[list[torch.Tensor], list[list[int]], list[BlockSlots]]:
    index: dict[int, int] = {}
    params: list[torch.Tensor] = []
    per_block: list[list[int]] = []
    slots = [BlockSlots(block) for block in blocks]
    for found in slots:
        mine: list[int] = []
        for p in found.trainable:
            j = index.get(id(p))
            if j is None:
                j = index[id(p)] = len(params)
                params.append(p)
            mine.append(j)
        per_block.append(mine)
    return params, per_block, slots


def _compute_dtype(x: torch.Tensor, autocast: AutocastState) -> torch.dtype:
    low = autocast.compute_dtype(x.device)
    if low is not None and torch.finfo(low).eps > torch.finfo(x.dtype).eps:
        return low
    return x.dtype


_BACKWARD_HOOKS = ("_global_backward_hooks", "_global_backward_pre_hooks")
_ALL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", *_BACKWARD_HOOKS)


def _global_module_hooks(kinds: tuple[str, ...] = _ALL_HOOKS) -> bool:
    """Whether hooks registered for every module (``register_module_*_hook``) of these kinds exist."""
    from torch.nn.modules import module as _module

    return any(not owns_hook(hook) for name in kinds for hook in getattr(_module, name, {}).values())


def _two_part(direction, block: nn.Module, fused: bool, h: torch.Tensor | Halves) -> int | None:
    """The dimension along which forward hands ``block`` its input as halves, or None: a fused two-part
    block (``forward_halves``), called without module hooks (the halves path bypasses ``__call__``),
    where no kernel writes whole tensors in one pass (on GPUs the coupling kernels are faster on whole
    tensors)."""
    if direction is not _Forward or not callable(getattr(block, "forward_halves", None)):
        return None
    dim = getattr(block, "dim", 1)
    ndim = len(h.shape)
    if not isinstance(dim, int) or not -ndim <= dim < ndim or dim % ndim == 0 or h.shape[dim] < 2:
        return None  # the block's own checks report the bad input
    first = h.a if isinstance(h, Halves) else h
    if not fused or dispatch.use_kernels(first) or _global_module_hooks():
        return None
    return dim % ndim


def _nbytes(h: torch.Tensor | Halves) -> int:
    parts = (h.a, h.b) if isinstance(h, Halves) else (h,)
    return sum(t.numel() * t.element_size() for t in parts)


def _fingerprint(x: torch.Tensor | Halves) -> torch.Tensor:
    """The fingerprint of ``x`` as one tensor (the halves' partial fingerprints add up to it for a split
    of dim 1, whose halves are consecutive ranges of each sample)."""
    if isinstance(x, Halves):
        return fingerprint_parts(x.a, x.b) if x.dim == 1 else fingerprint(x.full())
    return fingerprint(x)


def _versions(h: torch.Tensor | Halves) -> tuple[int | None, ...]:
    parts = (h.a, h.b) if isinstance(h, Halves) else (h,)
    return tuple(None if t.is_inference() else t._version for t in parts)


def _record(
    chain: _Chain, i: int, h: torch.Tensor | Halves, call: CallArgs, fused: bool, two_part: bool, want_fp: bool,
    buffers, previous: RngTape | None = None,
):
    """Run block ``i`` in forward: ``(y, logdet or None, fingerprint of h or None, RNG tape or None)``.

    Holds :data:`RNG_LOCK` while the block runs so that no other thread training with revgrad draws
    random numbers inside it. A block that needs autograd inside its forward is run again with grad,
    after its buffers and the generators are put back as they were.
    """
    block, label = chain.blocks[i], chain.labels[i]
    direction = chain.direction
    rng = chain.config.preserve_rng_state
    for attempt in range(2):
        generators = chain.slots[i].generators + call.generators
        tape = RngTape(h.device, block_name(label, block), previous, generators) if rng else None
        try:
            with RNG_LOCK if rng else contextlib.nullcontext():
                if two_part:
                    with recording(tape):  # forward_halves bypasses __call__: FSDP2's hooks are made to fire
                        halves_fn = sharding.through_fsdp(block, block.forward_halves)
                        y, ld = Halves(*halves_fn(h.a, h.b, *call.args, **call.kwargs), h.dim), None
                    fp = _fingerprint(h) if want_fp else None
                else:
                    # A fused block fingerprints its input inside its own kernel pass; others get it here.
                    request = FingerprintRequest(h) if want_fp else None
                    with requesting(request):
                        y, ld = direction.record(block, label, h, call, tape, fused)
                    fp = None if request is None else (request.value if request.value is not None else fingerprint(h))
                if tape is not None:
                    tape.close()
                    if not fused:
                        _DREW[block] = tape.consumed
        except BlockError as error:
            if f"block {label} (" in str(error):
                raise
            raise BlockError(f"revgrad: {block_name(label, block)}: {str(error).removeprefix('revgrad: ')}") from error
        except RuntimeError as error:
            if attempt or fused or block in _GRAD_INSIDE or "does not require grad" not in str(error):
                raise
            # The block differentiates something inside its forward (a log-determinant by autograd,
            # say): undo what the failed attempt did to its buffers and the generators, run it with grad.
            _GRAD_INSIDE.add(block)
            with torch.no_grad():
                for module, name, buf, _, saved in buffers:
                    module._buffers[name] = buf
                    buf.copy_(saved)
            if tape is not None and tape._marks:
                tape._restore(tape._marks[0])
            continue
        return y, ld, fp, (tape if tape is not None and tape.consumed else None)
    raise AssertionError("unreachable")


def _warn_unkeyed_randomness(block: nn.Module) -> None:
    warnings.warn(
        f"revgrad: blocks of type {block_type(block)} draw random numbers outside their sub-modules' calls "
        "(in their own forward code, or in a sub-module called through .forward()), so backward cannot "
        "give their inverse the same random numbers if it draws them in another order; revgrad keeps the "
        "input of such blocks instead (one activation each). Call random parts as sub-modules to avoid it.",
        RuntimeWarning,
        stacklevel=4,
    )


class _RevBackprop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chain: _Chain, x: torch.Tensor, *inputs: torch.Tensor):  # type: ignore[override]
        # inputs: the chain's parameters, then the extra arguments' tensors that require grad.
        ctx.set_materialize_grads(False)  # a None gradient stays None: parameters it misses get None
        cfg = chain.config
        call = chain.call  # the blocks run without grad: the caller's own arguments, checked after each block
        call.record_versions()
        direction = chain.direction
        autocast = AutocastState.capture(x.device)
        checking = cfg.check != "off"
        n = len(chain.blocks)
        # By default regular anchors are laid lazily: forward keeps only the chain's input (block 0's
        # anchor, the input itself) and a correction lays the others as it recomputes
        # (_Backward._correct). anchor_every=k asks for them in forward.
        regular = regular_anchors(n, cfg.anchor_every) if cfg.check == "correct" else frozenset()
        adaptive = chain.adaptive.indices if (cfg.check == "correct" and chain.adaptive) else frozenset()
        drift = chain.adaptive.drift_indices if (cfg.check == "correct" and chain.adaptive) else frozenset()
        stored = (regular if cfg.anchor_every is not None else regular & {0}) | adaptive | drift

        tol = cfg.tol if cfg.tol is not None else default_tol(_compute_dtype(x, autocast))
        records: list[_Record] = []
        anchor_at: list[int] = []
        anchor_tensors: list[torch.Tensor] = []
        fp_at: list[int] = []
        fp_tensors: list[torch.Tensor] = []
        fp_tols: list[float] = []  # the tolerance each check has now: it sets the grid fingerprints are kept on
        sens = chain.sensitivity if checking else None
        logdet: torch.Tensor | None = None
        h: torch.Tensor | Halves = x
        last_tape: RngTape | None = None  # the last block that drew: its end state may start the next
        for i, block in enumerate(chain.blocks):
            if i in stored:  # before any split: the chain's input is anchored as itself, not a copy
                anchor_at.append(i)
                anchor_tensors.append(halves.full(h))
            fused = direction.fused(block)
            split_dim = _two_part(direction, block, fused, h)
            two_part = split_dim is not None
            h = halves.split(h, split_dim) if two_part else halves.full(h)
            slots = chain.slots[i]
            modes = slots.modes()
            buffers = BufferGuard.before(slots)
            versions = _versions(h)
            y, ld, fp, tape = _record(chain, i, h, call, fused, two_part, checking and i not in stored, buffers,
                                      last_tape)
            last_tape = tape if tape is not None else last_tape
            if call:
                call.check_unchanged(functools.partial(block_name, chain.labels[i], block))
            if _versions(h) != versions:
                raise BlockError(
                    f"revgrad: {block_name(chain.labels[i], block)} modified its input in place in forward "
                    "(an in-place first operation, such as nn.ReLU(inplace=True) first in a sub-network?); a "
                    "block must leave its input as it was, or its inverse cannot give that input back"
                )
            if tape is not None and not fused and tape.gaps is not False and i not in stored:
                # Random numbers drawn where no sub-module call keys them (or calls not recorded: the
                # block was deterministic last time): an inverse that draws them in another order
                # could not be replayed. Keep this block's input instead.
                if tape.gaps or not block._modules:
                    _warn_unkeyed_randomness(block)
                anchor_at.append(i)
                anchor_tensors.append(halves.full(h))
                fp = None
            if fp is not None:
                fp_at.append(i)
                fp_tensors.append(fp)
                fp_tols.append(tol if sens is None else sens.tol(i, tol))
            records.append(
                _Record(h.shape, h.dtype, _nbytes(h), tape, BufferGuard.after(buffers, keep_after=not fused), modes,
                        ld is not None, fused, two_part, split_dim or 1)
            )
            if ld is not None:
                logdet = ld if logdet is None else logdet + ld
            h = y
        h = halves.full(h)

        ctx.chain = chain
        ctx.records = records
        ctx.autocast = autocast
        ctx.anchor_at = anchor_at
        ctx.fp_at = fp_at
        # Fingerprints as residues on a grid set by each check's tolerance (17 bytes per sample and
        # block, see checks.py), encoded together once forward is done.
        ctx.fp_store = FingerprintStore.encode(fp_tensors, fp_tols)
        fp_tensors = ctx.fp_store.take_tensors()
        ctx.adaptive_at = adaptive
        ctx.drift_used = drift
        ctx.regular = regular
        ctx.has_logdet = logdet is not None
        # Parameters changed in place before backward would be recomputed with their new values.
        ctx.param_versions = [p._version for p in chain.params]
        ctx.tol = tol
        # Everything backward needs goes through save_for_backward: an in-place change to the output or
        # an anchor is an autograd error, saved-tensor hooks see it all, and it is freed after backward.
        ctx.save_for_backward(h, *anchor_tensors, *fp_tensors)
        if logdet is None:
            return h
        return h, logdet

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor | None, *rest: torch.Tensor | None):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "revgrad: a reversible chain cannot be differentiated twice (backward with "
                "create_graph=True, or torch.autograd.grad(..., create_graph=True)). Run the "
                "chain's blocks without revgrad.reversible for higher-order gradients."
            )
        saved = ctx.saved_tensors  # raises if the graph was already freed or y was modified in place
        k = 1 + len(ctx.anchor_at)
        y, anchors, fingerprints = saved[0], dict(zip(ctx.anchor_at, saved[1:k])), ctx.fp_store.put_tensors(saved[k:])
        chain: _Chain = ctx.chain
        _refuse_changed_state(chain, ctx.records, ctx.param_versions, "between forward and backward")
        engine = _Backward(ctx, chain, dict(anchors), fingerprints, deferred=_defer_checks(chain))
        grad_logdet = rest[0] if ctx.has_logdet else None
        with ctx.autocast.replay():
            try:
                grad_x, grads, arg_grads = engine.run(y, grad_y, grad_logdet, ctx.needs_input_grad[1])
                clean = engine.settle()
            except ReconstructionError:
                raise
            except Exception:
                # A deferred pass goes on with every rebuilt input as if it passed: one that failed
                # (NaN from a broken inverse) can make a block below raise (anomaly mode, a block that
                # validates its input). A failed check is then the cause: run the pass again per block.
                # If every check so far passed, the error is the block's own.
                if not engine.deferred or engine.settle():
                    raise
                clean = False
            if not clean:
                # A deferred check failed: what was derived below that block is wrong. Run the pass
                # again with a check per block, which corrects from the anchors.
                spent = engine.report.evaluations
                engine = _Backward(ctx, chain, dict(anchors), fingerprints, deferred=False)
                engine.report.evaluations, engine.report.deferred, engine.report.rerun = spent, True, True
                grad_x, grads, arg_grads = engine.run(y, grad_y, grad_logdet, ctx.needs_input_grad[1])
        if engine.sens is not None:
            engine.sens.finish(engine.probing, corrected=bool(engine.report.corrected))
        if chain.adaptive is not None and chain.config.check == "correct":
            held = chain.adaptive.sizes.keys() & range(len(ctx.records))
            chain.adaptive.refresh({i: ctx.records[i].nbytes for i in held}, _regular_bytes(ctx.records, ctx.regular))
            chain.adaptive.tick(ctx.drift_used, ctx.adaptive_at)
        engine.publish()
        return (None, grad_x, *grads, *arg_grads)


def _regular_bytes(records: list[_Record], regular: frozenset[int]) -> int:
    """Bytes the regular anchors above block 0 hold (stored or laid): what the adaptive budget scales with."""
    return sum(records[a].nbytes for a in regular if a > 0)


def _refuse_changed_state(
    chain: _Chain, records: list[_Record], versions: list[int], when: str, only: int | None = None
) -> None:
    """Raise if a parameter or a read-only buffer of the chain's blocks (or of block ``only``) was
    modified in place since forward: backward would evaluate the block with values forward did not
    use. Plain autograd refuses the same (for the tensors its graph saved)."""
    where = chain.call.changed() if only is None else None
    if where is not None:
        raise BlockError(
            f"revgrad: the chain's {where} was modified in place {when}; backward would evaluate the "
            "blocks with values their forward did not use."
        )
    for i in range(len(chain.blocks)) if only is None else (only,):
        block = chain.blocks[i]
        for j in chain.block_params[i]:
            p = chain.params[j]
            if p._version != versions[j]:
                name = chain.slots[i].param_name(p, block)
                raise BlockError(
                    f"revgrad: {block_name(chain.labels[i], block)}: its parameter '{name}' was modified in place "
                    f"{when} (an optimizer step or an in-place update); backward would evaluate the block with "
                    "values its forward did not use. Run backward before changing parameters."
                )
        buffer = records[i].buffers.changed()
        if buffer is not None:
            name = next((n for n, b in block.named_buffers(remove_duplicate=False) if b is buffer), "?")
            raise BlockError(
                f"revgrad: {block_name(chain.labels[i], block)}: its buffer '{name}' was modified in place "
                f"{when}; backward would evaluate the block with values its forward did not use."
            )


# Deferred checks: "auto" defers while the chain's previous backward was clean. On CUDA reading each
# error back would stall the host until the device catches up, once per block; on CPU the reads are
# free, but measuring every block's error in one vectorised comparison at the end saves the per-op
# overhead of a comparison per block, which is most of a check's cost on small samples. "always" and
# "never" (environment variable REVGRAD_DEFER_CHECKS) are for tests and measurements.
DEFER_CHECKS = os.environ.get("REVGRAD_DEFER_CHECKS", "auto").strip().lower() or "auto"
if DEFER_CHECKS not in ("auto", "always", "never"):
    raise ValueError(f"revgrad: REVGRAD_DEFER_CHECKS must be auto, always or never, got {DEFER_CHECKS!r}")


def _defer_checks(chain: _Chain) -> bool:
    if chain.config.check == "off" or DEFER_CHECKS == "never" or chain.sharding is not None:
        return False  # FSDP2: a second pass after a failed deferred check would reduce-scatter twice
    if chain.sensitivity is not None and chain.sensitivity.probing():
        return False  # a probe decides per block
    # Module backward hooks inside the blocks must fire once per step, as in plain autograd; a
    # second pass after a failed deferred check would fire them again.
    if any(s.backward_hooks for s in chain.slots) or _global_module_hooks(_BACKWARD_HOOKS):
        return False
    # After a backward where a check failed (a correction), the next one may fail too: check per
    # block rather than pay for a second pass. (An adaptive anchor's failed rebuild does not count:
    # its stored input is used in any case, and no pass reruns for it.)
    last = getattr(chain.owner, "last_report", None)
    return last is None or not (last.rerun or last.corrected)


class _Backward:
    """One backward pass through a chain (state that lives only while it runs)."""

    def __init__(
        self, ctx, chain: _Chain, anchors: dict[int, torch.Tensor], fingerprints: FingerprintStore,
        deferred: bool = False,
    ) -> None:
        self.chain = chain
        self.deferred = deferred
        # Deferred checks: (block, rebuilt fingerprint, False) or, for an adaptive anchor, (block, its
        # rebuild's error as a 0-dim tensor, True); settled at the end.
        self.pending: list[tuple[int, torch.Tensor, bool]] = []
        self.records: list[_Record] = ctx.records
        self.param_versions: list[int] = ctx.param_versions
        self.anchors = anchors
        self.fingerprints = fingerprints
        self.fp_row = {i: k for k, i in enumerate(ctx.fp_at)}  # block -> its row in the store
        self.adaptive_at: frozenset[int] = ctx.adaptive_at
        self.regular: frozenset[int] = ctx.regular
        self.tol: float = ctx.tol
        self.exact: dict[int, torch.Tensor] = {}
        self.laid: set[int] = set()  # anchors a correction laid in this pass (freed once used)
        # The extra arguments: detached for evaluations without grad; with fresh leaves standing for
        # the tensors that require grad for the VJPs (their gradients are summed over the blocks).
        self.call_nograd = chain.call.detached()
        self.call, self.arg_leaves = chain.call.for_grad()
        n = len(chain.blocks)
        self.trusted: set[int] = {n}  # activations known exact in this pass (index of the block taking them)
        self.sens = chain.sensitivity if chain.config.check != "off" else None
        self.probing = self.sens is not None and self.sens.probing()
        self.report = BackwardReport(
            errors=[math.nan] * n, check=chain.config.check, tol=self.tol, anchors=sorted(anchors),
            deferred=deferred, probed=self.probing, sensitivity=[math.nan] * n if self.probing else [],
        )
        # FSDP2 on the blocks: each block's step unshards it and hands its gradients to FSDP2.
        self.shards = chain.sharding.backward() if chain.sharding is not None else None

    def _tol(self, i: int) -> float:
        """The tolerance of block ``i``'s input: ``tol``, tightened by its VJPs' sensitivity."""
        return self.tol if self.sens is None else self.sens.tol(i, self.tol)

    def _check_tol(self, i: int) -> float:
        """The tolerance block ``i``'s rebuilt input is checked against its stored fingerprint with: its
        tolerance, but never looser than what the grid forward stored it on measures exactly (a probe
        in this pass may have loosened it)."""
        row = self.fp_row.get(i)
        tol = self._tol(i)
        return tol if row is None else min(tol, self.fingerprints.limit(row))

    def run(self, y: torch.Tensor, grad_y: torch.Tensor | None, grad_logdet: torch.Tensor | None, need_x: bool):
        chain = self.chain
        param_grads: list[torch.Tensor | None] = [None] * len(chain.params)
        arg_grads: list[torch.Tensor | None] = [None] * len(self.arg_leaves)
        h: torch.Tensor | Halves = y
        gy: torch.Tensor | Halves | None = grad_y
        shards = self.shards
        for i in reversed(range(len(chain.blocks))):
            block, rec = chain.blocks[i], self.records[i]
            form = self._form(rec)  # how this block takes y and dL/dy: whole, or as halves
            h, gy = form(h), (None if gy is None else form(gy))
            gld = grad_logdet if rec.has_logdet else None
            if shards is not None:
                shards.begin_step(i)
            if gy is None and gld is None:
                # No gradient flows through this block; its input is still needed below.
                h = self._input_of(i, block, rec, halves.full(h), None, None)[0]
                if shards is not None:
                    shards.end_step(i)
                continue
            bparams = [chain.params[j] for j in chain.block_params[i]]
            meter = self._meter(i, block)
            with meter if meter is not None else contextlib.nullcontext():
                x, vjp = self._input_of(i, block, rec, h, bparams, gy)
                fused_vjp = vjp is not None  # a closure built from the output; else a recompute from x
                y_kept = h if self.probing else None
                h = None  # y is rebuilt into x: below the saved output, nothing else holds it
                if vjp is not None:
                    gx, gps = self._closure_result(i, block, vjp(gy, gld), len(bparams))
                    vjp = None  # its sub-network outputs and leaves must not live into the next block
                else:
                    gx, gps = self._recompute_vjp(
                        i, block, rec, halves.full(x), halves.full(gy), gld, bparams, i > 0 or need_x
                    )
                if self.probing:
                    x, gx, gps = self._probe(i, block, rec, y_kept, x, fused_vjp, gy, gld, bparams, gx, gps,
                                             i > 0 or need_x)
                    y_kept = None
            if meter is not None:
                chain.graphs.record(chain.labels[i], chain.shape, meter.total, rec.nbytes)
            if shards is not None:  # FSDP2-managed parameters: to the unsharded .grad, reduce-scattered
                gps = shards.hand_over(i, chain.block_params[i], gps)
                shards.end_step(i)
            nb = len(chain.block_params[i])
            for j, g in zip(chain.block_params[i], gps[:nb]):
                if g is not None:
                    param_grads[j] = g if param_grads[j] is None else param_grads[j] + g
            for j, g in enumerate(gps[nb:]):
                if g is not None:
                    arg_grads[j] = g if arg_grads[j] is None else arg_grads[j] + g
            h, gy = x, gx
        return (halves.full(gy) if need_x and gy is not None else None), param_grads, arg_grads

    def _closure_result(self, i: int, block: nn.Module, out, nparams: int):
        """A fused block's VJP result ``(grad_x, grads)``, refused unless it has one gradient (or None)
        per tensor the block was given to differentiate: a missing one would be a lost gradient."""
        grads = out[1] if isinstance(out, tuple) and len(out) == 2 else None
        expected = nparams + len(self.arg_leaves)
        if grads is None or len(grads) != expected:
            got = "no (grad_x, grads) pair" if grads is None else f"{len(grads)} gradients"
            raise BlockError(
                f"revgrad: {block_name(self.chain.labels[i], block)}: the VJP closure of inverse_for_backward "
                f"returned {got}; it must return (grad_x, grads) with one gradient (or None) per tensor in "
                f"params ({expected}: the block's {nparams} parameters that require grad, then "
                f"{len(self.arg_leaves)} of the chain's extra arguments)"
            )
        return out

    @staticmethod
    def _form(rec: _Record):
        """How block ``rec`` takes its output and gradient: as halves of its split dimension, or whole."""
        return functools.partial(halves.split, dim=rec.split_dim) if rec.two_part else halves.full

    @contextlib.contextmanager
    def _as_in_forward(self, i: int, after: bool = False):
        """Block ``i`` as its forward saw it, for one evaluation: forward's training modes, and its
        buffers as forward found them (``after``: as forward left them, for the inverse). Raises
        afterwards if the evaluation changed a parameter or a read-only buffer in place."""
        rec = self.records[i]
        unsharded = self.shards.evaluating(i) if self.shards is not None else contextlib.nullcontext()
        with unsharded, self.chain.slots[i].modes_as(rec.modes), rec.buffers.shield(after):
            yield
        _refuse_changed_state(self.chain, self.records, self.param_versions, "by backward's evaluation of the block",
                              only=i)

    def _block_params(self, i: int) -> list[torch.Tensor]:
        return [self.chain.params[j] for j in self.chain.block_params[i]]

    def _aliases(self, i: int, params: list[torch.Tensor], grad: bool = True):
        """Block i's parameters swapped for detached aliases (of the unsharded ones under FSDP2)."""
        substitutes = self.shards.substitutes(i) if self.shards is not None else None
        return ParamAliases(self.chain.slots[i], substitutes).swap(params, grad=grad)

    def _failed(self, failed: bool) -> bool:
        """A check's decision; under FSDP2 agreed by all ranks (a correction all-gathers blocks)."""
        return self.shards.agree(failed) if self.shards is not None else failed

    def _meter(self, i: int, block: nn.Module) -> SavedBytes | None:
        chain = self.chain
        if chain.graphs is None:
            return None
        return chain.graphs.meter(chain.labels[i], chain.shape, chain.labels[i + 1 :] + chain.kept_above, block)

    # -- step 1 and 2: the block's input, rebuilt and checked, or exact ---------------------------

    def _input_of(self, i, block, rec, y, bparams, gy) -> tuple[torch.Tensor, VJP | None]:
        exact = self.anchors.pop(i) if i in self.laid else self.anchors.get(i)
        if exact is None:
            exact = self.exact.pop(i, None)
        measure = i in self.adaptive_at and self.chain.adaptive.measuring(i)
        if exact is not None and (not measure or self._tol(i) < _UNRESOLVABLE * self.tol):
            # A regular anchor; an adaptive one not measured in this step; or one whose tolerance
            # (tightened by its VJPs' sensitivity) is below what a fingerprint resolves: a rebuild
            # would fail its check anyway.
            if measure:
                self.chain.adaptive.observe(i, False)
            self.trusted.add(i)
            if rec.fused and bparams is not None and _accepts(block, "exact"):
                # The block differentiates at the exact input in its own fused pass, which is
                # cheaper than the generic recompute of the whole block through autograd.
                return self._rebuild(i, block, rec, y, bparams, gy, exact)[:2]
            return exact, None

        x, vjp, fp = self._rebuild(i, block, rec, y, bparams, gy)
        if exact is not None:
            # An adaptive anchor: its rebuild is measured against the truth itself, to decide when to
            # release it; what the VJP uses is the stored input. A rebuild within its tolerance can
            # still be off along a direction the VJP is sensitive to (a probe moves the activation in
            # random directions; rebuild errors follow the inverse's ill-conditioned ones), and the
            # exact input also restarts the rebuild of the blocks below from exact values.
            error = relative_error(_fingerprint(x) if fp is None else fp, _fingerprint(self._form(rec)(exact)))
            if self.deferred:
                self.pending.append((i, error, True))
            else:
                err = self._measure(error, i)
                clean = err <= self._tol(i)
                self.chain.adaptive.observe(i, clean)
                if not clean:
                    self.report.from_adaptive.append(i)
            x = vjp = None
            self.trusted.add(i)
            if rec.fused and bparams is not None and _accepts(block, "exact"):
                return self._rebuild(i, block, rec, y, bparams, gy, exact)[:2]
            return exact, None
        row = self.fp_row.get(i)
        if row is None:
            return x, vjp
        if fp is None:
            fp = _fingerprint(x)
        if self.deferred:
            self.pending.append((i, fp, False))  # go on as if clean; settle() measures all at once
            return x, vjp
        err = self._measure(self.fingerprints.error(row, fp), i)
        tol = self._check_tol(i)
        if not self._failed(not err <= tol):
            self._note_drift(i, err, tol)
            return x, vjp
        if self.chain.config.check == "detect":
            raise ReconstructionError(self.chain.labels[i], block_type(block), err, tol,
                                      None if not err <= tol else _ANOTHER_RANK)
        exact = self._correct(i, err, tol, fp)
        return exact, None

    def _rebuild(
        self, i, block, rec, y, bparams, gy, exact=None
    ) -> tuple[torch.Tensor, VJP | None, torch.Tensor | None]:
        """Rebuild block i's input from its output: ``(x, fused VJP or None, x's fingerprint or None)``.

        With ``exact`` (a fused block that accepts it), the block returns that input and its VJP there.
        """
        self.report.evaluations += 1
        label = self.chain.labels[i]
        if rec.fused and bparams is not None:
            wanted = exact is None and (i in self.fp_row or i in self.adaptive_at)
            request = FingerprintRequest(None) if wanted else None
            aliasing = self._aliases(i, bparams)
            call = self.call
            tape = rec.tape if rec.tape is not None else NULL_TAPE
            with self._as_in_forward(i), aliasing as aliases, requesting(request):
                # The closure differentiates with respect to the parameters' aliases and the leaves
                # standing for the extra arguments that require grad, in that order.
                wrt = [*aliases, *self.arg_leaves]
                if rec.two_part:  # y and gy come as halves (run() converts them per record)
                    parts = None if exact is None else halves.split(exact, rec.split_dim)
                    x, vjp = block.inverse_halves_for_backward(
                        y, tape, wrt, *call.args, grad_y=gy, exact=parts, **call.kwargs
                    )
                else:
                    extra = {} if exact is None else {"exact": exact}
                    if gy is not None and _accepts(block, "grad_y"):
                        extra["grad_y"] = gy
                    x, vjp = block.inverse_for_backward(y, tape, wrt, *call.args, **extra, **call.kwargs)
            if x.shape != rec.shape:
                raise BlockError(
                    f"revgrad: {block_name(label, block)} rebuilt an input of shape {tuple(x.shape)}; its "
                    f"forward input had shape {tuple(rec.shape)}"
                )
            if x.dtype != rec.dtype:
                return halves.full(x).to(rec.dtype), vjp, None
            return x, vjp, (request.value if request is not None else None)
        # The inverse sees the block as forward left it, on aliases of its parameters (an inverse
        # that initialises them from data changes the aliases, never the parameters).
        aliasing = self._aliases(i, self._block_params(i), grad=False)
        with torch.no_grad(), self._as_in_forward(i, after=True), aliasing, rec.replay(same_order=False):
            return self.chain.direction.undo(block, label, halves.full(y), self.call_nograd, rec), None, None

    def settle(self) -> bool:
        """Read the deferred errors back (one host sync) and record them; False if any check failed.

        ``check="detect"`` raises for the failed block nearest the output, as the per-block checks would.
        """
        if not self.pending:
            return True
        # The rebuilt fingerprints against the stored ones, all at once; then the adaptive anchors'
        # errors (measured against their stored inputs). One read for both.
        checked = [(i, v, adaptive) for i, v, adaptive in self.pending if not adaptive]
        measured = [(i, v, adaptive) for i, v, adaptive in self.pending if adaptive]
        parts = [torch.stack([e.to(torch.float64) for _, e, _ in measured])] if measured else []
        if checked:
            rows, fps = [self.fp_row[i] for i, _, _ in checked], [f for _, f, _ in checked]
            parts.insert(0, self.fingerprints.errors(rows, fps))
        values = (torch.cat(parts) if len(parts) > 1 else parts[0]).tolist()
        self.pending = checked + measured
        failed = []
        for (i, _, adaptive), value in zip(self.pending, values):
            value = math.inf if math.isnan(value) else value
            self.report.errors[i] = value
            if not adaptive and not value <= self._check_tol(i):  # an adaptive anchor's input was used
                failed.append(i)
        if failed and self.chain.config.check == "detect":
            i = max(failed)
            raise ReconstructionError(
                self.chain.labels[i], block_type(self.chain.blocks[i]), self.report.errors[i], self._check_tol(i)
            )
        if failed:
            return False
        for i, _, adaptive in self.pending:
            if adaptive:
                clean = self.report.errors[i] <= self._tol(i)
                self.chain.adaptive.observe(i, clean)
                if not clean:
                    self.report.from_adaptive.append(i)
            else:
                self._note_drift(i, self.report.errors[i], self._check_tol(i))
        return True

    def _note_drift(self, i: int, err: float, tol: float) -> None:
        """A rebuilt input that passed with more than DRIFT of its tolerance: store it from the next step
        on, so the rebuild restarts from exact values there (``anchors.DRIFT``)."""
        adaptive = self.chain.adaptive
        if adaptive is None or self.chain.config.check != "correct" or not err > DRIFT * tol:
            return
        if self.report.drifted:
            # One per pass: the errors below a drifted activation grow from it; with an anchor there
            # the next step measures them again, rebuilt from exact values, and places the next one.
            return
        if adaptive.drifted(i, self.records[i].nbytes, _regular_bytes(self.records, self.regular)):
            self.report.drifted.append(i)

    def _measure(self, err: torch.Tensor, i: int) -> float:
        value = float(err)  # one host sync per checked block: the decision needs it
        if math.isnan(value):
            value = math.inf
        self.report.errors[i] = value
        return value

    def _correct(self, i: int, err: float, tol: float, rebuilt_fp: torch.Tensor | None = None) -> torch.Tensor:
        """Recompute block i's exact input from the nearest anchor below, laying the regular anchors
        on the way (forward did not store them, by default); cache the segment above the last one."""
        self.trusted.add(i)
        chain = self.chain
        start = max(a for a in self.anchors if a < i)
        h = self.anchors[start]
        laid = {a for a in self.regular if start < a < i}
        segment = max(laid, default=start)
        with torch.no_grad():
            for j in range(start, i):
                aliasing = self._aliases(j, self._block_params(j), grad=False)
                with self._as_in_forward(j), aliasing, self.records[j].replay():
                    h, _ = chain.direction.run(chain.blocks[j], chain.labels[j], h, self.call_nograd)
                if j + 1 in laid:
                    self.anchors[j + 1] = h
                    self.laid.add(j + 1)
                elif j + 1 > segment:
                    self.exact[j + 1] = h
        if rebuilt_fp is not None and err > MEASURED_EXACTLY * tol:
            # Above that range a stored fingerprint measures a wrapped residue (a lower bound, checks.py):
            # with the exact input at hand, report the true error.
            err = float(relative_error(rebuilt_fp, _fingerprint(self._form(self.records[i])(self.exact[i]))))
            self.report.errors[i] = math.inf if math.isnan(err) else err
        evals = i - start
        self.report.evaluations += evals
        self.report.correction_evaluations += evals
        self.report.corrected.append(i)
        if chain.adaptive is not None:
            chain.adaptive.promote(i, self.records[i].nbytes, _regular_bytes(self.records, self.regular))
            if i in self.report.drifted:  # laid for drift earlier in this pass, now for a failure
                self.report.drifted.remove(i)
        if chain.config.warn:
            msg = (
                f"revgrad: {block_name(chain.labels[i], chain.blocks[i])} rebuilt its input with relative "
                f"error {err:.3g} > tol {tol:.3g}; recomputed it from the anchor at block "
                f"{chain.labels[start]}"
            )
            # Once: to the log where logging is set up for revgrad (or the root logger), else as a warning.
            if logger.hasHandlers():
                logger.warning(msg)
            else:
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return self.exact.pop(i)

    # -- gradient-aware checks: a probe of the VJP's sensitivity (revgrad.engine.sensitivity) -----------

    def _probe(self, i, block, rec, y, x, fused_vjp, gy, gld, bparams, gx, gps, need_gx):
        """Measure how far block i's VJP moves when the activation it is computed from moves as far as
        this pass's rebuild of it is off; if that is too far, use the exact activation instead.
        Returns ``(x, gx, gps)``, corrected where needed."""
        n = len(self.chain.blocks)
        # A fused closure is built from the output (the input is rebuilt from it), a recompute from x.
        key = i + 1 if fused_vjp else i
        # Activations stored for good (regular anchors, inputs kept for their randomness) are always
        # exact; the others are measured even when exact in this pass (an adaptive anchor), so that
        # their tolerance is known when they are rebuilt again.
        if key >= n or (key in self.anchors and key not in self.adaptive_at):
            return x, gx, gps
        if self.chain.slots[i].hooks or _has_hooks(block) or _global_module_hooks():
            return x, gx, gps  # a probe evaluates the block again: its hooks must fire once
        rebuilt = key not in self.trusted
        err = self.report.errors[key] if rebuilt else math.nan
        # The move: as large as this pass's measured error of the activation (the scale whose effect
        # matters; ReLU networks' VJPs jump where a larger move crosses kinks), at least a rounding's.
        eps = max(0.0 if math.isnan(err) else err, self.tol * sensitivity.SMALLEST_MOVE)
        base = [None if gx is None else halves.full(gx), *gps]
        if not sensitivity.all_finite(base):
            # Overflowed gradients (an fp16 step a GradScaler will skip): nothing to measure here.
            self.sens.skip()
            self._failed(False)  # FSDP2: take part in the decision the other ranks make below
            return x, gx, gps
        # Random directions of the actual error's size, the largest change (sensitivity.DIRECTIONS).
        moves = []
        for d in range(sensitivity.DIRECTIONS):
            seed = self.sens.steps * sensitivity.DIRECTIONS + d
            if fused_vjp:
                moved = perturbed(halves.full(y), eps, seed)
                exact = x if i in self.trusted and _accepts(block, "exact") else None
                _, vjp, _ = self._rebuild(i, block, rec, self._form(rec)(moved), bparams, gy,
                                          None if exact is None else halves.full(exact))
                got = self._closure_result(i, block, vjp(gy, gld), len(bparams))
            else:
                got = self._recompute_vjp(i, block, rec, perturbed(halves.full(x), eps, seed), halves.full(gy), gld,
                                          bparams, need_gx)
            moves.append(relative_change([None if got[0] is None else halves.full(got[0]), *got[1]], base))
        s = max(moves) / eps
        self.sens.observe(key, s)
        self.report.sensitivity[i] = s
        bound = self.tol * min(1.0, BUDGET / s) if s > 0 else self.tol
        if key in self.fp_row:  # never looser than the grid its fingerprint was stored on measures
            bound = min(bound, self.fingerprints.limit(self.fp_row[key]))
        if not self._failed(rebuilt and not math.isnan(err) and not err <= bound):
            return x, gx, gps
        chain = self.chain
        if chain.config.check == "detect":
            raise ReconstructionError(
                chain.labels[key], block_type(chain.blocks[key]), err, bound,
                f"the VJP of {block_name(chain.labels[i], block)} moves {s:.3g} times as much (relative) as this "
                "activation, so the gradient would be off by far more than the tolerance",
            )
        exact = self._correct(key, err, bound)
        if not fused_vjp:
            return exact, *self._recompute_vjp(i, block, rec, exact, halves.full(gy), gld, bparams, need_gx)
        # Block i's output was rebuilt too far off for its VJP: rebuild block i from the exact one.
        x, vjp = self._input_of(i, block, rec, self._form(rec)(exact), bparams, gy)
        if vjp is None:
            return x, *self._recompute_vjp(i, block, rec, halves.full(x), halves.full(gy), gld, bparams, need_gx)
        return x, *self._closure_result(i, block, vjp(gy, gld), len(bparams))

    # -- step 3: the VJP at the (trusted) input ---------------------------------------------------

    def _recompute_vjp(self, i, block, rec, x, gy, gld, bparams, need_gx):
        self.report.evaluations += 1
        x_ = x.detach().requires_grad_(need_gx)
        aliasing = self._aliases(i, bparams)
        with self._as_in_forward(i), aliasing as aliases, torch.enable_grad(), rec.replay():
            y_, ld_ = self.chain.direction.run(block, self.chain.labels[i], x_, self.call)
        pairs = [(o, g) for o, g in ((y_, gy), (ld_, gld)) if o is not None and g is not None and o.requires_grad]
        inputs = ([x_] if need_gx else []) + aliases + self.arg_leaves
        if not pairs or not inputs:
            return None, [None] * (len(bparams) + len(self.arg_leaves))
        grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
        if need_gx:
            return grads[0], grads[1:]
        return None, grads

    def publish(self) -> None:
        owner = self.chain.owner
        if owner is not None:
            owner.last_report = self.report


def _warn_functorch(name: str) -> None:
    warnings.warn(
        f"revgrad: {name} runs its blocks with plain autograd inside torch.func transforms (grad, vjp, "
        "vmap): gradients are exact, memory is not saved there. Call the model outside torch.func to save "
        "memory.",
        RuntimeWarning,
        stacklevel=4,
    )


def run_plain(blocks: list[nn.Module], labels: list[int], x: torch.Tensor, call: CallArgs = NO_ARGS):
    """Run ``blocks`` forward with plain autograd: ``y`` or ``(y, logdet)`` like :func:`run_chain`."""
    _check_signatures(blocks, labels, _Forward, call)
    return _plain(blocks, labels, _Forward, x, call)


def _plain(blocks: list[nn.Module], labels: list[int], direction, x: torch.Tensor, call: CallArgs):
    logdet = None
    h = x
    for label, block in zip(labels, blocks):
        h, ld = direction.run(block, label, h, call)
        if ld is not None:
            logdet = ld if logdet is None else logdet + ld
    return h if logdet is None else (h, logdet)


def run_chain(
    blocks: list[nn.Module],
    x: torch.Tensor,
    config: EngineConfig,
    *,
    direction: Literal["forward", "inverse"] = "forward",
    owner: object | None = None,
    adaptive: AdaptiveAnchors | None = None,
    name: str = "ReversibleSequential",
    labels: list[int] | None = None,
    graphs: GraphBudget | None = None,
    shape: tuple[int, ...] = (),
    kept_above: list[int] | None = None,
    sensitivity: Sensitivity | None = None,
    call: CallArgs = NO_ARGS,
    with_logdet: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run ``blocks`` on ``x`` (shape ``[B, ...]``) with memory-saving backprop.

    Returns ``y``, or ``(y, logdet)`` with ``logdet`` of shape ``[B]`` (the sum over blocks) when any
    block returns one. Without grad mode, or when neither ``x`` nor any parameter needs a gradient,
    the blocks simply run in order: no fingerprints, snapshots or anchors. ``labels`` names each
    block in messages (default: its position in ``blocks``). ``graphs`` measures the blocks' graph
    sizes in backward for a kept-graph budget (``shape``: the key they are stored under;
    ``kept_above``: labels of the blocks kept after this chain, whose sizes count first).
    ``sensitivity``: the run's gradient-aware tolerances, kept across calls (None: checks against
    ``tol`` only). ``call``: extra arguments given to every block's ``forward`` and ``inverse``
    (:mod:`revgrad.engine.arguments`); those of its tensors that require grad receive gradients.
    ``with_logdet`` (``direction="inverse"`` only): keep the blocks' inverse log-determinants
    (:class:`_InverseWithLogdet`), returned as in forward; a forward chain keeps them anyway.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"revgrad: {name} expects a tensor input, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"revgrad: {name} expects a floating-point input, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"revgrad: {name} expects an input with a batch dimension, got a 0-dim tensor")
    steps = _InverseWithLogdet if with_logdet and direction == "inverse" else _DIRECTIONS[direction]
    if not blocks:
        return x
    labels = list(range(len(blocks))) if labels is None else labels
    _check_signatures(blocks, labels, steps, call)
    if not torch.is_grad_enabled() or x.numel() == 0:
        # Nothing to save memory on: an empty batch runs (and differentiates) as plain autograd does.
        return _plain(blocks, labels, steps, x, call)
    if torch._C._are_functorch_transforms_active():
        # torch.func (grad, vjp, vmap, jacrev) differentiates through the blocks' own operations;
        # the engine's Function has no functorch rules, so the blocks run plainly (same values and
        # gradients, without the memory saving).
        _warn_functorch(name)
        return _plain(blocks, labels, steps, x, call)
    params, per_block, slots = _collect_params(blocks)
    if not x.requires_grad and not params and not call.grad_tensors:
        return _plain(blocks, labels, steps, x, call)
    shards = sharding.plan(blocks, labels, slots, params, per_block)
    if shards is not None:
        adaptive = None  # promoted per rank's data: ranks would rebuild (and all-gather) different blocks
    if adaptive is not None:
        adaptive.forget_beyond(len(blocks))
    chain = _Chain(blocks, labels, steps, config, params, per_block, slots, owner, adaptive, graphs, shape,
                   list(kept_above or []), sensitivity, call, shards)
    return _RevBackprop.apply(chain, x, *params, *call.grad_tensors)


# Names of the fused protocol's inverse_for_backward parameters; a chain's extra arguments cannot use them.
_PROTOCOL_KEYWORDS = ("y", "tape", "params", "grad_y", "exact")


def _check_signatures(blocks: list[nn.Module], labels: list[int], direction, call: CallArgs) -> None:
    """Refuse, naming the block, extra arguments a block's methods cannot take (before anything runs)."""
    if not call:
        return
    seen: set[int] = set()
    for label, block in zip(labels, blocks):
        if id(block) in seen:
            continue
        seen.add(id(block))
        who = functools.partial(block_name, label, block)
        first, second = ("forward", "inverse") if direction is _Forward else ("inverse", "forward")
        check_accepts(block, first, 1, call, who)
        check_accepts(block, second, 1, call, who)
        if direction is _Forward and callable(getattr(block, "inverse_for_backward", None)):
            clash = [k for k in _PROTOCOL_KEYWORDS if k in call.kwargs]
            if clash:
                raise BlockError(
                    f"revgrad: {who()}: the chain's keyword argument {clash[0]!r} is a parameter name of the "
                    f"fused protocol (inverse_for_backward: {', '.join(_PROTOCOL_KEYWORDS)}); rename it"
                )
            check_accepts(block, "inverse_for_backward", 3, call, who)
            if callable(getattr(block, "forward_halves", None)):
                check_accepts(block, "forward_halves", 2, call, who)
