"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on the blocks of a chain.

Large models are sharded block by block (``for block in model: fully_shard(block)``, then
``fully_shard(model)``). FSDP2 all-gathers a module's parameters in a forward pre-hook and frees them
in a forward hook; between two calls the module holds its *sharded* parameters (DTensors). Its
backward relies on the graph of forward: a tensor hook on the module's output all-gathers again, the
gradients accumulate into the unsharded parameters' ``.grad``, and an autograd node on the module's
input reduce-scatters them into the sharded parameters' ``.grad`` (``post_backward``).

revgrad keeps no graph and evaluates blocks in backward (the inverse, the recompute, the fused
``inverse_for_backward``, corrections from anchors, probes), mostly without ``__call__``. So the
engine drives FSDP2 itself, through the same calls its hooks make (design (a)):

* **forward** goes through ``__call__`` as usual (FSDP2's hooks unshard and reshard); the evaluations
  that bypass it (the two-part ``forward_halves``, ``inverse`` when the chain runs as its inverse)
  are wrapped in the block's FSDP2 pre- and post-forward, as ``register_fsdp_forward_method`` does;
* **backward**, per block from the top (a *step*): the block's FSDP2 pre-backward (training state,
  backward prefetch of the block below, the root's final callback), an explicit unshard, every
  evaluation of the step on detached aliases of the *unsharded* parameters (``ParamAliases`` with
  substitutes), the gradients accumulated into the unsharded parameters' ``.grad`` as autograd's
  ``AccumulateGrad`` would, then ``post_backward()``: reduce-scatter into the sharded ``.grad`` and
  reshard. FSDP2's hooks still fire where an evaluation goes through ``__call__`` (a recompute), but
  in the pre-backward state they only unshard if needed, as for activation checkpointing;
* an evaluation outside the block's step (a correction from an anchor runs blocks below the current
  one) unshards the block and reshards it afterwards (unless it was unsharded already:
  ``reshard_after_forward=False``, or a prefetch);
* the engine's Function still takes the sharded parameters as inputs (so that backward runs) and
  returns no gradient for them: FSDP2 writes their ``.grad`` itself, as with plain autograd.

Ranks must make the same collectives in the same order. A correction all-gathers the blocks it
evaluates, and whether a block needs one depends on each rank's data; so the checks' decisions
(within tolerance or not, in ``"detect"`` and ``"correct"``) are agreed by an all-reduce (max) of one
flag over the blocks' shard process groups, and adaptive anchors (which would differ per rank) are
off. Deferred checks are off too: a second pass would reduce-scatter twice.

Nothing here runs, and nothing is imported, unless FSDP2 has been applied in the process.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .errors import BlockError
from .protocol import block_name

__all__ = ["ChainShards", "has_own_hooks", "plan", "through_fsdp"]

_FULLY_SHARD = "torch.distributed.fsdp._fully_shard._fully_shard"


def _fsdp():
    """The ``fully_shard`` module when FSDP2 has been applied in this process (None otherwise: then
    no module can be an ``FSDPModule`` and nothing here costs more than this look-up)."""
    mod = sys.modules.get(_FULLY_SHARD)
    if mod is None or not getattr(mod, "cls_to_fsdp_cls", None):
        return None
    return mod


def _state_of(module: nn.Module):
    """The FSDP2 state of ``module`` if it is an ``FSDPModule`` (None otherwise)."""
    mod = _fsdp()
    if mod is None or not isinstance(module, mod.FSDPModule):
        return None
    return module._get_fsdp_state()


def _groups(state) -> list:
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch versions with one group per state
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


def _hook_ids(state) -> set[int]:
    ids: set[int] = set()
    for name in ("_pre_forward_hook_handle", "_post_forward_hook_handle"):
        handle = getattr(state, name, None)
        for h in getattr(handle, "handles", (handle,)):  # _MultiHandle for fully_shard([a, b])
            if h is not None and hasattr(h, "id"):
                ids.add(h.id)
    return ids


def has_own_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has module hooks other than FSDP2's own forward hooks (which the engine
    replaces by driving FSDP2 itself, so they do not send a block down the two-step path)."""
    if module._backward_hooks or module._backward_pre_hooks:
        return True
    if not (module._forward_hooks or module._forward_pre_hooks):
        return False
    state = _state_of(module)
    if state is None:
        return True
    ids = _hook_ids(state)
    return any(k not in ids for k in module._forward_pre_hooks) or any(k not in ids for k in module._forward_hooks)


def through_fsdp(block: nn.Module, fn: Callable) -> Callable:
    """``fn`` (a method of ``block`` that bypasses ``__call__``) wrapped in the block's FSDP2 pre- and
    post-forward, as ``register_fsdp_forward_method`` would; ``fn`` itself for any other block."""
    mod = sys.modules.get(_FULLY_SHARD)
    if mod is None or not isinstance(block, mod.FSDPModule):
        return fn
    state = block._get_fsdp_state()

    def call(*args, **kwargs):
        args, kwargs = state._pre_forward(block, args, kwargs)
        return state._post_forward(block, args, fn(*args, **kwargs))

    return call


class ChainShards:
    """The FSDP2 states inside a chain's blocks, found once per call (:func:`plan`).

    ``states[i]``: the states of block ``i``'s modules (the block's own, then nested ones);
    ``managed``: index in the chain's parameter list -> the ``FSDPParam`` that shards it;
    ``last``: each state's lowest block position (its gradients are final after that step);
    ``groups``: the shard process groups, for agreeing on the checks' decisions.
    """

    __slots__ = ("device", "last", "managed", "process_groups", "states")

    def __init__(self, states, managed, last, process_groups, device) -> None:
        self.states = states
        self.managed = managed
        self.last = last
        self.process_groups = process_groups
        self.device = device

    def backward(self) -> BackwardShards:
        return BackwardShards(self)


def plan(blocks: list[nn.Module], labels: list[int], slots, params: list[torch.Tensor],
         block_params: list[list[int]]) -> ChainShards | None:
    """Find the FSDP2 states inside the blocks (None when there are none: the engine runs as without
    FSDP2), refuse what is unsupported, and put each FSDP2-managed parameter in ``params`` as its
    sharded parameter (the slots may hold the unsharded one when the block was unsharded at the call)."""
    mod = _fsdp()
    if mod is None:
        return None
    fsdp_module = mod.FSDPModule
    per_block: list[tuple] = []
    found = False
    for i, s in enumerate(slots):
        states: list = []
        for m in s.modules:
            if isinstance(m, fsdp_module):
                state = m._get_fsdp_state()
                if not any(state is t for t in states):
                    states.append(state)
        if states:
            found = True
            _validate(blocks[i], labels[i], s, states)
        per_block.append(tuple(states))
    if not found:
        return None
    by_id: dict[int, object] = {}
    last: dict[int, int] = {}
    process_groups: dict[int, object] = {}
    device = None
    for i, states in enumerate(per_block):
        for state in states:
            last.setdefault(id(state), i)  # blocks run top-down in backward: the lowest position is last
            for group in _groups(state):
                device = group.device if device is None else device
                pg = getattr(group.mesh_info, "shard_process_group", None)
                if pg is not None:
                    process_groups.setdefault(id(pg), pg)
                for fp in group.fsdp_params:
                    by_id[id(fp.sharded_param)] = fp
                    unsharded = getattr(fp, "_unsharded_param", None)
                    if unsharded is not None:
                        by_id[id(unsharded)] = fp
    managed = {}
    for j, p in enumerate(params):
        fp = by_id.get(id(p))
        if fp is not None:
            managed[j] = fp
            params[j] = fp.sharded_param
    for i, states in enumerate(per_block):
        if states:  # FSDP2's own forward hooks do not count as the block's hooks (probes skip blocks with hooks)
            s = slots[i]
            s.hooks = s.backward_hooks or any(has_own_hooks(m) for m in s.modules)
    return ChainShards(per_block, managed, last, list(process_groups.values()), device)


def _validate(block: nn.Module, label: int, slots, states) -> None:
    inside = {id(m) for m in slots.modules}
    who = block_name(label, block)
    for state in states:
        modules = getattr(state, "_modules", ())
        if any(id(m) not in inside for m in modules):
            raise BlockError(
                f"revgrad: {who}: an FSDP2 group (fully_shard([...]) of several modules) reaches outside this "
                "block; revgrad drives each block's FSDP2 state in backward, so shard each block (and modules "
                "inside it) on its own: fully_shard(block)"
            )
        for group in _groups(state):
            if not getattr(group, "unshard_in_backward", True):
                raise BlockError(
                    f"revgrad: {who}: set_unshard_in_backward(False) is not supported on a reversible block; "
                    "backward evaluates the block again (its inverse), which needs its parameters"
                )
            mp = group.mp_policy
            for fp in group.fsdp_params:
                dtype = fp.sharded_param.dtype
                for option in ("param_dtype", "output_dtype"):
                    wanted = getattr(mp, option, None)
                    if wanted is not None and wanted != dtype and dtype.is_floating_point:
                        raise BlockError(
                            f"revgrad: {who}: FSDP2 MixedPrecisionPolicy({option}={wanted}) on a reversible block "
                            f"is not supported (its parameters are {dtype}): the block's inverse and fused backward "
                            "bypass FSDP2's casts. Use torch.autocast for low-precision compute (revgrad replays "
                            "it), and MixedPrecisionPolicy(reduce_dtype=...) alone if wanted"
                        )


class BackwardShards:
    """FSDP2 during one backward pass of a chain: steps, evaluations, gradients, agreed decisions."""

    __slots__ = ("_active", "_plan", "_substitutes")

    def __init__(self, chain_plan: ChainShards) -> None:
        self._plan = chain_plan
        self._active: set[int] = set()  # states held unsharded for the current step
        self._substitutes: dict[int, dict[int, torch.Tensor] | None] = {}

    def substitutes(self, i: int) -> dict[int, torch.Tensor] | None:
        """For block ``i``'s parameter aliases: id of a sharded parameter (or of its unsharded
        parameter, which a slot may hold) -> the unsharded parameter."""
        if i not in self._substitutes:
            sub: dict[int, torch.Tensor] = {}
            for state in self._plan.states[i]:
                for group in _groups(state):
                    for fp in group.fsdp_params:
                        unsharded = fp.unsharded_param
                        sub[id(fp.sharded_param)] = unsharded
                        sub[id(unsharded)] = unsharded
            self._substitutes[i] = sub or None
        return self._substitutes[i]

    def begin_step(self, i: int) -> None:
        """Block ``i``'s step begins: FSDP2's pre-backward for its states (as the tensor hook on its
        output would fire), then an unshard (a correction may have resharded it meanwhile)."""
        for state in self._plan.states[i]:
            state._pre_backward(None)
            for group in _groups(state):
                group.unshard(group.unshard_async_op)
                group.wait_for_unshard()
            self._active.add(id(state))

    def hand_over(self, i: int, block_params: list[int], grads) -> list:
        """Accumulate block ``i``'s gradients of FSDP2-managed parameters into the unsharded
        parameters' ``.grad`` (as ``AccumulateGrad`` would); return ``grads`` with None in their place
        (the sharded parameters get theirs from the reduce-scatter)."""
        grads = list(grads)
        managed = self._plan.managed
        for k, j in enumerate(block_params):
            fp = managed.get(j)
            if fp is None or grads[k] is None:
                continue
            unsharded = fp.unsharded_param
            g = grads[k]
            unsharded.grad = g if unsharded.grad is None else unsharded.grad + g
            grads[k] = None
        return grads

    def end_step(self, i: int) -> None:
        """Block ``i``'s step is over: for each of its states whose gradients are final (its lowest
        position), FSDP2's post-backward: reduce-scatter, reshard."""
        for state in self._plan.states[i]:
            if self._plan.last[id(state)] == i:
                for group in reversed(_groups(state)):
                    group.post_backward()
                self._active.discard(id(state))

    @contextlib.contextmanager
    def evaluating(self, i: int) -> Iterator[None]:
        """Around an evaluation of block ``i``: nothing within its step (unsharded already); outside it
        (a correction), unshard its states and reshard those that were sharded, in FSDP2's
        pre-backward state (so that hooks firing inside only unshard, as for a recompute)."""
        states = [s for s in self._plan.states[i] if id(s) not in self._active]
        if not states:
            yield
            return
        pre_backward = _training_state("PRE_BACKWARD")
        held = []
        for state in states:
            held.append((state, state._training_state))
            state._training_state = pre_backward
        unsharded = []
        try:
            for state in states:
                for group in _groups(state):
                    if group.is_unsharded:
                        continue
                    sharded = group._all_gather_result is None  # not a prefetch under way
                    group.unshard()
                    group.wait_for_unshard()
                    if sharded:
                        unsharded.append(group)
            yield
        finally:
            for group in unsharded:
                group.reshard()
            for state, previous in held:
                state._training_state = previous

    def agree(self, failed: bool) -> bool:
        """Whether any rank failed a check here: one all-reduce (max) over the blocks' shard process
        groups, so that every rank corrects (or raises) together and makes the same all-gathers."""
        groups = self._plan.process_groups
        if not groups:
            return failed
        import torch.distributed as dist

        flag = torch.tensor([1.0 if failed else 0.0], device=self._plan.device)
        for pg in groups:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=pg)
        return bool(flag.item())


def _training_state(name: str):
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    return TrainingState[name]
