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
* **normflows** flows (``normflows.flows.Flow``) return ``(z', log_det)`` from both ``forward`` (the
  *generative* direction, base -> data) and ``inverse`` (the *normalizing* one, data -> base, the one
  ``log_prob`` runs). They are blocks as they are, in the generative direction; :class:`NormflowsBlock`
  picks the direction (``"normalizing"`` by default, for likelihood training) and
  :func:`normflows_blocks` turns a ``normflows.NormalizingFlow``'s flows into a chain in that order.

No library is imported here: this module works (and imports) without them.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
from torch import nn

from ..engine.errors import BlockError

__all__ = ["FrEIABlock", "NormflowsBlock", "freia_blocks", "normflows_blocks"]


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


def _as_logdet(jac: object, like: torch.Tensor, who: str = "FrEIABlock") -> torch.Tensor:
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
        f"revgrad.{who}: a log-determinant of shape {tuple(jac.shape)} does not fit batch {batch}"
    )


class FrEIABlock(nn.Module):
    """A FrEIA invertible module as a revgrad block.

    Args:
        module: a FrEIA ``InvertibleModule`` with one input and one output, built with
            ``dims_in=[shape without batch]`` (e.g. ``GLOWCouplingBlock([(C,)], subnet_constructor=...)``
            or ``AllInOneBlock([(C, H, W)], subnet_constructor=...)``), conditional or not.

        condition: for a conditional module (built with ``dims_c=[...]``), which of the chain's extra
            positional arguments is its condition, as ``SequenceINN.append(..., cond=k)`` does:
            ``chain(x, c0, c1)`` calls ``module([x], c=[ck])`` in forward, inverse and backward (a
            cINN). ``None`` (default): all of them, one per entry of ``dims_c``. An unconditional
            module ignores the chain's extra arguments, so it can sit between conditional blocks.

    Shapes: ``forward(x: [B, ...]) -> (y: [B, ...], logdet: [B])`` with ``logdet`` FrEIA's
    ``log_jac_det`` (a scalar, e.g. ``0.`` for a permutation, is broadcast to ``[B]``);
    ``inverse(y) -> x`` is ``module([y], rev=True)``.

    The module stays a child named ``module``, so its parameters are ``module.*``. Data-dependent
    initialisation (``ActNorm``'s first batch) happens in the first forward, as it would in FrEIA;
    the inverse of a module that has not run forward yet is not meaningful.
    """

    def __init__(self, module: nn.Module, condition: int | None = None) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"revgrad.FrEIABlock expects a FrEIA module, got {type(module).__name__}")
        dims_in = getattr(module, "dims_in", None)
        if isinstance(dims_in, list) and len(dims_in) > 1 and all(isinstance(d, (tuple, list)) for d in dims_in):
            raise ValueError(
                f"revgrad.FrEIABlock: {type(module).__name__} has {len(dims_in)} inputs; a block "
                "maps one tensor to one tensor"
            )
        self.module = module
        self.conditions = len(getattr(module, "dims_c", None) or [])
        if condition is not None and (isinstance(condition, bool) or not isinstance(condition, int) or condition < 0):
            raise ValueError(f"revgrad.FrEIABlock: condition must be an index >= 0 or None, got {condition!r}")
        self.condition = condition

    @property
    def wrapped_module(self) -> nn.Module:
        """The FrEIA module (errors and reports name it: ``block 3 (FrEIABlock: GLOWCouplingBlock)``)."""
        return self.module

    def _conditions(self, args: tuple, kwargs: dict) -> dict:
        """``{"c": [...]}`` for a conditional module, from the chain's extra positional arguments."""
        if not self.conditions:
            return {}
        if self.condition is not None and not kwargs and self.condition < len(args):
            return {"c": [args[self.condition]]}
        if self.condition is not None or kwargs or len(args) != self.conditions:
            raise BlockError(
                f"revgrad: FrEIABlock ({type(self.module).__name__}) is conditional with {self.conditions} "
                f"condition(s) (dims_c={self.module.dims_c}); pass them as the chain's extra positional "
                f"arguments, chain(x, c){'' if self.condition is None else f' (it takes number {self.condition})'}, "
                f"got {len(args)} positional and keywords {sorted(kwargs)}"
            )
        return {"c": list(args)}

    def forward(self, x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._conditions(args, kwargs)
        y, jac = _unpack(self.module([x], rev=False, jac=True, **c), self.module, "forward")
        return y, _as_logdet(jac, x)

    def inverse(self, y: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        c = self._conditions(args, kwargs)
        # jac=False: the inverse's log-determinant is not used (and would cost, e.g., an i-ResNet's
        # power series with autograd inside).
        x, _ = _unpack(self.module([y], rev=True, jac=False, **c), self.module, "rev=True")
        return x


def freia_blocks(inn: nn.Module | Iterable[nn.Module]) -> list[FrEIABlock]:
    """Every module of a FrEIA ``SequenceINN`` (or an iterable of FrEIA modules) as a :class:`FrEIABlock`.

    ``revgrad.reversible(freia_blocks(inn))`` runs the same modules (same parameter objects) with
    memory-saving backprop; its forward returns ``(z, log_jac_det)`` like ``inn(x)``. A conditional
    ``SequenceINN``'s conditions become the chain's extra positional arguments, in its order:
    ``inn(x, c=[c0, c1])`` is ``chain(x, c0, c1)``.
    """
    modules = list(getattr(inn, "module_list", inn))
    conditions = getattr(inn, "conditions", None) or [None] * len(modules)
    return [FrEIABlock(m, condition=k) for m, k in zip(modules, conditions)]


_DIRECTIONS = ("normalizing", "generative")


def _takes_extra(method) -> bool:
    """Whether a flow's ``forward``/``inverse`` takes more than ``z`` (a ``context``, ``*args``)."""
    try:
        params = list(inspect.signature(method).parameters.values())
    except (TypeError, ValueError):
        return True
    return len(params) > 1 or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


class NormflowsBlock(nn.Module):
    """A normflows flow (``normflows.flows.Flow``) as a revgrad block, in the direction you train.

    A normflows flow's ``forward(z) -> (z', log_det)`` is its *generative* direction (base to data,
    what ``NormalizingFlow.sample`` runs) and ``inverse(x) -> (x', log_det)`` the *normalizing* one
    (data to base, what ``log_prob`` and ``forward_kld`` run); each returns the log-determinant of
    the map it computes.

    Args:
        flow: the flow module (it stays a child named ``flow``: parameters are ``flow.*``).
        direction: ``"normalizing"`` (default): ``forward(x) = flow.inverse(x)``, ``inverse(z) =
            flow(z)``, for maximum likelihood; ``"generative"``: ``forward(z) = flow(z)``, ``inverse(x)
            = flow.inverse(x)``, for sampling or reverse-KL training.

    Shapes: ``forward(h: [B, ...], *args, **kwargs) -> (h', logdet: [B])``; ``inverse(h', ...) -> (h,
    logdet: [B])``, the other direction's log-determinant (a chain's ``inverse`` uses it with
    ``with_logdet=True`` and drops it otherwise). A scalar log-determinant (a permutation's ``0``) is
    broadcast to ``[B]``. The chain's extra arguments (``chain(x, context=c)`` for a
    ``ConditionalNormalizingFlow``'s flows) are passed on to a flow method that takes more than ``z``
    and left out for one that takes ``z`` only, so unconditional flows can sit between conditional ones.

    A flow without an inverse (``Planar``, ``Radial``) cannot be a block: ``NotImplementedError``
    comes from the flow the first time the engine needs its inverse. Data-dependent initialisation
    (normflows' ``ActNorm``) happens in the block's first forward, on the first batch of the direction
    trained, as in normflows.
    """

    def __init__(self, flow: nn.Module, direction: str = "normalizing") -> None:
        super().__init__()
        if not isinstance(flow, nn.Module) or not callable(getattr(flow, "inverse", None)):
            raise TypeError(
                f"revgrad.NormflowsBlock expects a normflows flow (forward and inverse), got {type(flow).__name__}"
            )
        if direction not in _DIRECTIONS:
            raise ValueError(f"revgrad.NormflowsBlock: direction must be one of {_DIRECTIONS}, got {direction!r}")
        self.flow = flow
        self.direction = direction
        self._extra = {"forward": _takes_extra(flow.forward), "inverse": _takes_extra(flow.inverse)}

    @property
    def wrapped_module(self) -> nn.Module:
        """The normflows flow (errors and reports name it: ``block 3 (NormflowsBlock: AffineCouplingBlock)``)."""
        return self.flow

    def extra_repr(self) -> str:
        return f"direction={self.direction!r}"

    def _run(self, which: str, h: torch.Tensor, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        fn = self.flow if which == "forward" else self.flow.inverse  # forward through __call__: hooks fire
        out = fn(h, *args, **kwargs) if self._extra[which] else fn(h)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], torch.Tensor)):
            raise TypeError(
                f"revgrad.NormflowsBlock: {type(self.flow).__name__}.{which} returned {type(out).__name__}; "
                "expected normflows' (z, log_det)"
            )
        return out[0], _as_logdet(out[1], out[0], "NormflowsBlock")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run("inverse" if self.direction == "normalizing" else "forward", x, args, kwargs)

    def inverse(self, y: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run("forward" if self.direction == "normalizing" else "inverse", y, args, kwargs)


def normflows_blocks(model: nn.Module | Iterable[nn.Module], direction: str = "normalizing") -> list[NormflowsBlock]:
    """The flows of a ``normflows.NormalizingFlow`` (or ``ConditionalNormalizingFlow``, or an iterable of
    flows in normflows' order, base to data) as :class:`NormflowsBlock` s, in the order ``direction`` runs
    them: ``"normalizing"`` (default) last flow first, as ``log_prob`` does; ``"generative"`` first
    flow first, as ``sample`` does.

    With ``chain = revgrad.reversible(normflows_blocks(model))`` (same parameter objects):
    ``z, logdet = chain(x)`` and ``model.q0.log_prob(z) + logdet`` is ``model.log_prob(x)``
    (``chain(x, context=c)`` for a conditional model); sampling is ``z, log_q = model.q0(n)``,
    ``x, ld = chain.inverse(z, with_logdet=True)``, ``log_q - ld``. A ``MultiscaleFlow`` (flows per
    level, split and merged between levels) is not one chain and is refused.
    """
    if direction not in _DIRECTIONS:
        raise ValueError(f"revgrad.normflows_blocks: direction must be one of {_DIRECTIONS}, got {direction!r}")
    flows = list(getattr(model, "flows", model))
    if hasattr(model, "merges") or any(isinstance(f, (nn.ModuleList, list, tuple)) for f in flows):
        raise TypeError(
            f"revgrad.normflows_blocks: {type(model).__name__} has flows per level (a MultiscaleFlow), which "
            "split and merge between levels; make a chain per level: normflows_blocks(model.flows[i])"
        )
    blocks = [NormflowsBlock(f, direction) for f in flows]
    return blocks[::-1] if direction == "normalizing" else blocks
