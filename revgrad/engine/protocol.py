"""The block protocol and the errors that name a block.

A *block* is any ``nn.Module`` with ``forward(x)`` and ``inverse(y)``:

* ``forward(x)`` returns ``y`` or ``(y, logdet)``; ``logdet`` has shape ``[batch]``;
* ``inverse(y)`` returns ``x`` (when it returns a tuple, items after the first are ignored);
* both take the chain's extra arguments when it is called with some (``chain(x, c)`` calls
  ``block(x, c)`` and ``block.inverse(y, c)``).

``x`` and ``y`` are single floating-point tensors whose first dimension is the batch; ``y`` may have a
different shape from ``x`` (space-to-depth), but ``inverse`` must give back ``x``'s shape.

A block may also implement the *fused* protocol (see :class:`FusedBlock`): a forward that records
what its own inverse needs for replay, and an inverse that leaves the recompute graph behind, so
that backward evaluates its sub-networks once instead of twice. The engine falls back to
"inverse, then forward again with grad" for every other block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn

from .errors import BlockError, ReconstructionError

if TYPE_CHECKING:
    from .replay import NullTape, RngTape

__all__ = [
    "VJP",
    "BlockError",
    "FusedBlock",
    "ReconstructionError",
    "block_name",
    "block_type",
    "check_inverse_output",
    "is_block",
    "require_blocks",
    "split_output",
]

# vjp(grad_y, grad_logdet) -> (grad_x, grads of the block's parameters that require grad, in order)
VJP = Callable[[torch.Tensor, "torch.Tensor | None"], "tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]"]


@runtime_checkable
class FusedBlock(Protocol):
    """A block whose backward rebuilds its input and the recompute graph in one evaluation.

    Its ``forward`` takes the engine's RNG tape with ``with revgrad.claim_tape() as tape:`` and calls
    ``tape.mark()`` before each sub-network that may draw random numbers; ``inverse_for_backward``
    runs the k-th of them inside ``tape.replay(k)`` (the tape is a no-op one outside the engine and
    for blocks that drew nothing). A deterministic block need not mark at all. README ("Your own
    fused block") has a complete example, tested as written.
    """

    def inverse_for_backward(
        self, y: torch.Tensor, tape: RngTape | NullTape, params: list[torch.Tensor], *args, **kwargs
    ) -> tuple[torch.Tensor, VJP]:
        """Rebuild ``x`` from ``y`` (grad enabled inside) and return it with a VJP closure.

        ``params`` are the tensors to differentiate, in order: aliases standing for the block's
        parameters during this call, then leaves standing for the chain's extra-argument tensors
        that require grad. Differentiate the sub-networks' outputs with respect to all of them
        (``allow_unused=True``); the closure ``vjp(grad_y, grad_logdet)`` returns ``grad_x`` and their
        gradients in that order. ``grad_y`` or ``grad_logdet`` may be None. ``*args, **kwargs`` are
        the chain's extra arguments, to pass on to the sub-networks as forward did.

        A block may also accept a keyword ``grad_y``: the engine then passes the gradient it will
        later give the closure, so parts of the VJP that do not depend on the rebuilt ``x`` can be
        taken at once and their graphs freed (a lower peak). The closure is only called if ``x``
        passes its check; otherwise it is dropped with whatever it precomputed.

        A block may also accept a keyword ``exact``: where the engine stored the block's input (an
        anchor, or a segment recomputed after a correction) it passes it, and the block returns it
        as ``x`` with the VJP taken at it, instead of the engine recomputing the whole block through
        autograd.
        """
        ...


def is_block(module: object) -> bool:
    """True for an ``nn.Module`` with a callable ``inverse``; containers of blocks are not blocks.

    A container says so with a true class attribute ``chain_of_blocks`` (``ReversibleSequential``
    does): its ``inverse`` runs its children, whose own protocol applies.
    """
    return (
        isinstance(module, nn.Module)
        and callable(getattr(module, "inverse", None))
        and not getattr(type(module), "chain_of_blocks", False)
    )


def require_blocks(
    items, where: str, noun: str = "item", error: type[Exception] = TypeError
) -> list[nn.Module]:
    """``items`` as a list, raising ``error`` naming the first one that is not a block."""
    items = list(items)
    for i, item in enumerate(items):
        if not is_block(item):
            raise error(
                f"{where}: {noun} {i} ({type(item).__name__}) is not a block: blocks are nn.Modules with "
                "forward(x) and inverse(y)"
            )
    return items


def block_type(block: nn.Module) -> str:
    """The block's class, and the wrapped module's for adapters (``FrEIABlock: GLOWCouplingBlock``).

    An adapter names what it wraps through a ``wrapped_module`` attribute.
    """
    name = type(block).__name__
    inner = getattr(block, "wrapped_module", None)
    if isinstance(inner, nn.Module):
        name = f"{name}: {type(inner).__name__}"
    return name


def block_name(index: int, block: nn.Module) -> str:
    return f"block {index} ({block_type(block)})"


def split_output(
    out: object, index: int, block: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate a block's forward output and return ``(y, logdet or None)``.

    A log-determinant that is one number for the whole batch (a Python number, or a tensor of shape
    ``()`` or ``[1]``: a per-channel scale's, a permutation's ``0``) is the same for every sample and
    is broadcast to ``[batch]``, as FrEIA does.
    """
    if isinstance(out, torch.Tensor):
        y, logdet = out, None
    elif isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], torch.Tensor):
        y, logdet = out
        if isinstance(logdet, (int, float)) and not isinstance(logdet, bool):
            logdet = torch.full((y.shape[0] if y.dim() else 1,), float(logdet), dtype=y.dtype, device=y.device)
        elif logdet is not None and not isinstance(logdet, torch.Tensor):
            raise BlockError(
                f"revgrad: {block_name(index, block)} returned a logdet of type {type(logdet).__name__}; "
                "forward must return y or (y, logdet) with logdet a tensor of shape [batch]"
            )
    else:
        raise BlockError(
            f"revgrad: {block_name(index, block)} returned {type(out).__name__}; forward must return a "
            "tensor y or a pair (y, logdet)"
        )
    if not y.is_floating_point():
        raise BlockError(f"revgrad: {block_name(index, block)} returned a {y.dtype} output; expected floating point")
    if y.dim() == 0 or y.shape[0] != x.shape[0]:
        raise BlockError(
            f"revgrad: {block_name(index, block)} maps input {tuple(x.shape)} to {tuple(y.shape)}; "
            "blocks must keep the batch dimension first and unchanged"
        )
    if logdet is not None and tuple(logdet.shape) != (x.shape[0],):
        if logdet.dim() == 0 or tuple(logdet.shape) == (1,):
            logdet = logdet.reshape(()).expand(x.shape[0])
        else:
            raise BlockError(
                f"revgrad: {block_name(index, block)} returned a logdet of shape {tuple(logdet.shape)}; "
                f"expected [batch] = ({x.shape[0]},), or one number for the whole batch"
            )
    if logdet is not None and not logdet.is_floating_point():
        logdet = logdet.to(y.dtype)
    return y, logdet


def check_inverse_output(
    out: object, index: int, block: nn.Module, shape: torch.Size, dtype: torch.dtype
) -> torch.Tensor:
    """Validate what ``block.inverse`` returned against the input the forward pass saw."""
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise BlockError(
            f"revgrad: {block_name(index, block)}.inverse returned {type(out).__name__}; expected a tensor"
        )
    if out.shape != shape:
        raise BlockError(
            f"revgrad: {block_name(index, block)}.inverse returned shape {tuple(out.shape)} but the block's "
            f"forward input had shape {tuple(shape)}; inverse(forward(x)) must have x's shape"
        )
    # Under autocast an inverse may come back in a lower precision; the chain keeps the forward's dtype.
    return out if out.dtype == dtype else out.to(dtype)
