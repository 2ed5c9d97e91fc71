"""Blocks from other libraries: memcnn couplings work as they are; FrEIA modules need an adapter.

* **memcnn** (``memcnn.AdditiveCoupling``, ``memcnn.AffineCoupling``): these modules already follow
  the block protocol (``forward(x) -> y``, ``inverse(y) -> x``), so they go straight into
  :func:`revgrad.reversible`, with any ``implementation_fwd``/``implementation_bwd`` (the default
  ``-1`` is plain autograd inside the block and the cheapest). Do not also wrap them in
  ``memcnn.InvertibleModuleWrapper``, which would be a second memory-saving mechanism.
* **FrEIA** invertible modules (``GLOWCouplingBlock``, ``AllInOneBlock``, ``PermuteRandom``,
  ``ActNorm``, ...) are called as ``module([x], rev=False, jac=True) -> ((y,), log_jac_det)``;
  :class:`FrEIABlock` turns one into a block whose forward returns ``(y, logdet[B])``.
  :func:`freia_blocks` does that for every module of a ``FrEIA.framework.SequenceINN``.

Neither library is imported here: this module works (and imports) without them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["FrEIABlock", "freia_blocks"]


def _unpack(out: object, module: nn.Module, direction: str) -> tuple[torch.Tensor, object]:
    """``((y,), jac)`` or ``[y], jac`` -> ``(y, jac)``; also a bare ``(y,)`` without a Jacobian."""
    if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], (tuple, list)):
        outs, jac = out
    elif isinstance(out, (tuple, list)) and len(out) == 1 and isinstance(out[0], torch.Tensor):
        outs, jac = out, None
    else:
        raise TypeError(
            f"revgrad.FrEIABlock: {type(module).__name__}({direction}) returned "
            f"{type(out).__name__}; expected FrEIA's ((y,), log_jac_det)"
        )
    if len(outs) != 1 or not isinstance(outs[0], torch.Tensor):
        raise TypeError(
            f"revgrad.FrEIABlock: {type(module).__name__} returned {len(outs)} outputs; only "
            "modules with one input and one output can be blocks"
        )
    return outs[0], jac


def _as_logdet(jac: object, like: torch.Tensor) -> torch.Tensor:
    """FrEIA's Jacobian (a float, a 0-dim tensor, ``[B]`` or ``[B, 1]``) as a ``[B]`` tensor."""
    batch = like.shape[0]
    if jac is None:
        return like.new_zeros(batch)
    if not isinstance(jac, torch.Tensor):
        return torch.full((batch,), float(jac), dtype=like.dtype, device=like.device)
    if jac.numel() == 1:  # one number for the whole batch (a per-channel scale's, a permutation's)
        return jac.reshape(()).expand(batch)
    if jac.numel() == batch:
        return jac.reshape(batch)
    raise ValueError(
        f"revgrad.FrEIABlock: a log_jac_det of shape {tuple(jac.shape)} does not fit batch {batch}"
    )


class FrEIABlock(nn.Module):
    """A FrEIA invertible module as a revgrad block.

    Args:
        module: a FrEIA ``InvertibleModule`` with one input and one output, built with
            ``dims_in=[shape without batch]`` (e.g. ``GLOWCouplingBlock([(C,)], subnet_constructor=...)``
            or ``AllInOneBlock([(C, H, W)], subnet_constructor=...)``) and no conditions.

    Shapes: ``forward(x: [B, ...]) -> (y: [B, ...], logdet: [B])`` with ``logdet`` FrEIA's
    ``log_jac_det`` (a scalar, e.g. ``0.`` for a permutation, is broadcast to ``[B]``);
    ``inverse(y) -> x`` is ``module([y], rev=True)``.

    The module stays a child named ``module``, so its parameters are ``module.*``. Data-dependent
    initialisation (``ActNorm``'s first batch) happens in the first forward, as it would in FrEIA;
    the inverse of a module that has not run forward yet is not meaningful.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"revgrad.FrEIABlock expects a FrEIA module, got {type(module).__name__}")
        dims_in = getattr(module, "dims_in", None)
        if isinstance(dims_in, list) and len(dims_in) > 1 and all(isinstance(d, (tuple, list)) for d in dims_in):
            raise ValueError(
                f"revgrad.FrEIABlock: {type(module).__name__} has {len(dims_in)} inputs; a block "
                "maps one tensor to one tensor"
            )
        if getattr(module, "dims_c", None):
            raise ValueError(
                f"revgrad.FrEIABlock: {type(module).__name__} is conditional (dims_c="
                f"{module.dims_c}); conditional FrEIA modules are not supported as blocks"
            )
        self.module = module

    @property
    def wrapped_module(self) -> nn.Module:
        """The FrEIA module (errors and reports name it: ``block 3 (FrEIABlock: GLOWCouplingBlock)``)."""
        return self.module

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, jac = _unpack(self.module([x], rev=False, jac=True), self.module, "forward")
        return y, _as_logdet(jac, x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        # jac=False: the inverse's log-determinant is not used (and would cost, e.g., an i-ResNet's
        # power series with autograd inside).
        x, _ = _unpack(self.module([y], rev=True, jac=False), self.module, "rev=True")
        return x


def freia_blocks(inn: nn.Module | Iterable[nn.Module]) -> list[FrEIABlock]:
    """Every module of a FrEIA ``SequenceINN`` (or an iterable of FrEIA modules) as a :class:`FrEIABlock`.

    ``revgrad.reversible(freia_blocks(inn))`` runs the same modules (same parameter objects) with
    memory-saving backprop; its forward returns ``(z, log_jac_det)`` like ``inn(x)``. Conditional
    modules are rejected.
    """
    conditions = getattr(inn, "conditions", None)
    if conditions is not None and any(c is not None for c in conditions):
        raise ValueError("revgrad.freia_blocks: conditional SequenceINN modules are not supported as blocks")
    modules = getattr(inn, "module_list", inn)
    return [FrEIABlock(m) for m in modules]
