"""A chain's extra per-call arguments: conditions, masks, position information.

``chain(x, *args, **kwargs)`` passes the same ``args`` and ``kwargs`` to every block's ``forward`` and
``inverse`` and to every evaluation in backward. They are held once per call (by the call's
autograd node), so two forwards with different masks before one backward each use their own.
Tensors among them (at any depth of lists, tuples and dicts) that require grad are inputs of the
engine's ``autograd.Function`` and receive gradients summed over the blocks; backward differentiates
each block with respect to fresh leaves standing for them (as it does for parameters).

What cannot be given back exactly is refused, naming the argument: a module whose parameters need
gradients, or an object that is not a list, tuple or dict holding tensors that need gradients (their
gradients would be lost silently); and a block that changes an argument in forward (appends to a
list, updates a tensor in place), since backward evaluates every block again.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import BlockError

__all__ = ["NO_ARGS", "CallArgs"]


class CallArgs:
    """``(args, kwargs)`` of one chain call, with the tensors among them found once.

    Attributes:
        args, kwargs: as given.
        grad_tensors: the tensors among them that require grad, in flattening order (each once).
    """

    __slots__ = ("_grad_slots", "_leaves", "_spec", "_versions", "args", "generators", "grad_tensors", "kwargs")

    def __init__(self, args: tuple = (), kwargs: dict[str, Any] | None = None) -> None:
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        with_paths, self._spec = pytree.tree_flatten_with_path((self.args, self.kwargs))
        self._leaves = [leaf for _, leaf in with_paths]
        for path, leaf in with_paths:
            if not isinstance(leaf, torch.Tensor):
                _refuse_hidden_gradients(leaf, path)
        seen: dict[int, int] = {}
        self._grad_slots: list[int] = []  # per leaf position: index into grad_tensors, or -1
        self.grad_tensors: list[torch.Tensor] = []
        for leaf in self._leaves:
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                j = seen.get(id(leaf))
                if j is None:
                    j = seen[id(leaf)] = len(self.grad_tensors)
                    self.grad_tensors.append(leaf)
                self._grad_slots.append(j)
            else:
                self._grad_slots.append(-1)
        self._versions: list[int | None] = []
        # Generators among the arguments: the blocks may draw from them, so backward replays them.
        self.generators = tuple({id(g): g for g in self._leaves if type(g) is torch.Generator}.values())

    def __bool__(self) -> bool:
        return bool(self.args or self.kwargs)

    def describe(self) -> str:
        parts = []
        if self.args:
            parts.append(f"{len(self.args)} positional")
        if self.kwargs:
            parts.append("keywords " + ", ".join(repr(k) for k in self.kwargs))
        return " and ".join(parts) or "none"

    def _rebuilt(self, leaves: list[Any]) -> CallArgs:
        out = CallArgs.__new__(CallArgs)
        out.args, out.kwargs = pytree.tree_unflatten(leaves, self._spec)
        out._leaves, out._spec, out._grad_slots, out.grad_tensors, out._versions = leaves, self._spec, [], [], []
        out.generators = self.generators
        return out

    def detached(self) -> CallArgs:
        """The same arguments with every tensor detached (for evaluations without grad)."""
        if not any(isinstance(leaf, torch.Tensor) for leaf in self._leaves):
            return self
        return self._rebuilt([leaf.detach() if isinstance(leaf, torch.Tensor) else leaf for leaf in self._leaves])

    def for_grad(self) -> tuple[CallArgs, list[torch.Tensor]]:
        """Arguments whose grad-requiring tensors are fresh leaves, and those leaves (in the order of
        :attr:`grad_tensors`): backward differentiates a block with respect to them."""
        if not self.grad_tensors:
            return self.detached(), []
        fresh = [t.detach().requires_grad_() for t in self.grad_tensors]
        leaves = [
            fresh[j] if j >= 0 else (leaf.detach() if isinstance(leaf, torch.Tensor) else leaf)
            for leaf, j in zip(self._leaves, self._grad_slots)
        ]
        return self._rebuilt(leaves), fresh

    def record_versions(self) -> None:
        """Remember the tensors' version counters (forward): an in-place change before backward is refused."""
        self._versions = [
            None if not isinstance(t, torch.Tensor) or t.is_inference() else t._version for t in self._leaves
        ]

    def changed(self) -> str | None:
        """Where an argument was changed since :meth:`record_versions` (a tensor modified in place, a
        container given or deprived of items), described for a message; None if nothing was."""
        # Checked after every block in forward: the plain flatten first, paths only for the message.
        leaves, spec = pytree.tree_flatten((self.args, self.kwargs))
        if spec != self._spec or len(leaves) != len(self._leaves):
            return "arguments' containers (an item added, removed or replaced)"
        for i, (leaf, before, version) in enumerate(zip(leaves, self._leaves, self._versions)):
            replaced = leaf is not before
            if replaced or (version is not None and leaf._version != version):
                path = pytree.tree_flatten_with_path((self.args, self.kwargs))[0][i][0]
                return f"{_describe_path(path)} (replaced)" if replaced else _describe_path(path)
        return None

    def check_unchanged(self, who: Callable[[], str]) -> None:
        """After a block ran in forward: refuse a block that changed the arguments, since backward
        evaluates it again and would see (or make) the change again."""
        where = self.changed()
        if where is not None:
            raise BlockError(
                f"revgrad: {who()} changed the chain's {where} in its forward; backward evaluates every block "
                "again, so a block must leave its extra arguments as they are (return what it computes, do "
                "not append to or update an argument)"
            )


def _describe_path(path: Sequence[Any]) -> str:
    """``((SequenceKey(0), SequenceKey(1)))`` -> ``"argument 1"``; a keyword -> ``"argument 'mask'"``."""
    where, *rest = path
    if getattr(where, "idx", None) == 0:  # positional
        head = f"positional argument {rest[0].idx}" if rest else "positional arguments"
        rest = rest[1:]
    else:
        head = f"argument {rest[0].key!r}" if rest else "keyword arguments"
        rest = rest[1:]
    return head + "".join(str(k) for k in rest)


def _refuse_hidden_gradients(leaf: object, path: Sequence[Any]) -> None:
    """Refuse an argument that holds tensors needing gradients where the arguments are not looked into
    (a module, a dataclass, any object): the chain could not return their gradients."""
    if isinstance(leaf, nn.Module):
        if any(p.requires_grad for p in leaf.parameters()):
            raise BlockError(
                f"revgrad: the chain's {_describe_path(path)} is a module ({type(leaf).__name__}) with parameters "
                "that require grad; they would get no gradient through the chain. Make it a sub-module of the "
                "blocks (shared between them if need be), or pass its output"
            )
        return
    if isinstance(leaf, (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)):
        return
    if dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
        values = [getattr(leaf, f.name, None) for f in dataclasses.fields(leaf)]
    else:
        values = list(getattr(leaf, "__dict__", {}).values())
    for value in values:
        inner = pytree.tree_leaves(value)
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in inner) or any(
            isinstance(m, nn.Module) and any(p.requires_grad for p in m.parameters()) for m in inner
        ):
            raise BlockError(
                f"revgrad: the chain's {_describe_path(path)} is a {type(leaf).__name__} holding tensors that "
                "require grad; the chain looks into tuples, lists and dicts only, so their gradients would be "
                "lost. Pass them in a tuple, list or dict (or as separate arguments)"
            )


NO_ARGS = CallArgs()


def _bind_error(fn: Callable, positional: int, keywords: tuple[str, ...]) -> str | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # cannot tell (a C function): let the call decide
    try:
        sig.bind(*([None] * positional), **dict.fromkeys(keywords))
    except TypeError as error:
        return str(error)
    return None


@functools.lru_cache(maxsize=1024)
def _class_binds(cls: type, method: str, leading: int, nargs: int, keywords: tuple[str, ...]) -> str | None:
    return _bind_error(getattr(cls, method), 1 + leading + nargs, keywords)  # self, leading, extra


def check_accepts(obj: object, method: str, leading: int, call: CallArgs, who: Callable[[], str]) -> None:
    """Raise :class:`BlockError` if ``obj.method`` cannot take ``leading`` positional arguments plus the
    chain's extra arguments (a block written for ``forward(x)`` called as ``chain(x, mask)``)."""
    if not call:
        return
    keywords = tuple(call.kwargs)
    if inspect.isfunction(inspect.getattr_static(type(obj), method, None)):  # a plain method: cached per class
        why = _class_binds(type(obj), method, leading, len(call.args), keywords)
    else:  # set on the instance, delegated through __getattr__, a static or C method: ask the bound callable
        fn = getattr(obj, method, None)
        why = None if fn is None else _bind_error(fn, leading + len(call.args), keywords)
    if why is not None:
        raise BlockError(
            f"revgrad: {who()}.{method} does not take the chain's extra arguments ({call.describe()}): {why}. "
            "Every block of a chain is given the arguments the chain is called with; give the block "
            "parameters for them (forward(self, x, *args, **kwargs) to ignore them)."
        )
