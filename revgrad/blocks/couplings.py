"""Coupling blocks: additive (RevNet) and affine (Glow / RealNVP), with fused backward.

Both split the input along dim 1 into ``x1 = x[:, :C//2]`` and ``x2 = x[:, C//2:]``.

Additive (Gomez et al. 2017)::

    y1 = x1 + f(x2)            x2 = y2 - g(y1)
    y2 = x2 + g(y1)            x1 = y1 - f(x2)

Affine (Dinh et al. 2017, Kingma & Dhariwal 2018), ``[shift, raw] = net(x1)`` split in channel halves::

    y1 = x1                    x1 = y1
    y2 = (x2 + shift) * s      x2 = y2 / s - shift
    logdet = sum(log s) over all non-batch dimensions

with the scale ``s`` one of

* ``"sigmoid"`` (Glow): ``s = sigmoid(raw + 2)``, in (0, 1): the forward contracts, the inverse
  divides by ``s`` and can explode (the paper's main example);
* ``"exp"`` (RealNVP): ``s = exp(raw)``, unbounded both ways;
* ``"bounded"``: ``s = exp(log(bound) * tanh(raw))``, in (1/bound, bound): bi-Lipschitz.

Fused backward: the inverse evaluates each sub-network once, with grad, at the point the VJP needs
(``g`` at ``y1`` then ``f`` at the rebuilt ``x2``; ``net`` at ``x1 = y1``), so a block costs one
extra evaluation of its sub-networks per step, not two. The affine VJP needs only ``y2``, ``raw``
and the incoming gradients::

    dx2 = dy2 * s,   dshift = dy2 * s,   draw = (dy2 * y2 + dlogdet) * dlog(s)/draw

The elementwise math (split, scale, add, log-determinant, residual sums, and the fingerprint of the
block input folded into the same pass) goes through :mod:`revgrad.ops.fused`: Triton kernels on GPUs,
their PyTorch twins elsewhere; both compute in float32 (float64 for float64 inputs) whatever the
conditioner's output dtype.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from ..engine.arguments import CallArgs, check_accepts
from ..engine.checks import take_request
from ..engine.halves import Halves
from ..engine.protocol import VJP, BlockError
from ..engine.replay import NullTape, RngTape, claim_tape
from ..ops import dispatch, fused
from ..ops.fused import _halves, affine_backward_reference, affine_forward_reference, affine_inverse_reference

__all__ = [
    "AdditiveCoupling",
    "AffineCoupling",
    "affine_backward_reference",
    "affine_forward_reference",
    "affine_inverse_reference",
]

ScaleKind = Literal["sigmoid", "exp", "bounded"]
_SCALES = ("sigmoid", "exp", "bounded")


def _cat_sum(first: torch.Tensor, p: torch.Tensor, q: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``cat([first, p + q], dim)``; outside autograd ``p + q`` is written straight into the result."""
    if torch.is_grad_enabled():
        return torch.cat([first, p + q], dim=dim)
    dtype = torch.promote_types(first.dtype, torch.promote_types(p.dtype, q.dtype))
    c = first.shape[dim]
    shape = list(first.shape)
    shape[dim] += p.shape[dim]
    out = first.new_empty(shape, dtype=dtype)
    out.narrow(dim, 0, c).copy_(first)
    torch.add(p, q, out=out.narrow(dim, c, p.shape[dim]))
    return out


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    return t if scale == 1.0 else t * scale


def _unscaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    return t if scale == 1.0 else t / scale


def _grad_of(
    output: torch.Tensor, wrt: Sequence[torch.Tensor], grad: torch.Tensor
) -> list[torch.Tensor | None]:
    if not output.requires_grad or not wrt:
        return [None] * len(wrt)
    return list(torch.autograd.grad(output, wrt, grad.to(output.dtype), allow_unused=True))


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _additive_vjp(early, g_out, y1_, f_out, x2, params, gy1: torch.Tensor, gy2: torch.Tensor):
    """The additive coupling's VJP from its sub-network graphs: ``(dL/dy1 in full, f's share of dL/dx2
    (None if f ignores x2), parameter grads)``; ``dL/dx1 = scale1 * dL/dy1`` and
    ``dL/dx2 = scale2 * dL/dy2 + f's share``. ``early``: g's VJP if already taken, else it is taken
    here from ``g_out`` at ``y1_``."""
    dy1, *dg = early if early is not None else _grad_of(g_out, [y1_, *params], gy2)
    gy1 = gy1 if dy1 is None else gy1 + dy1
    dx2, *df = _grad_of(f_out, [x2, *params], gy1)
    # Differentiating both graphs w.r.t. all of the block's parameters (unused ones get None) sums a
    # parameter that f and g share, without walking the modules to split them.
    return gy1, dx2, tuple(_add(a, b) for a, b in zip(dg, df))


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


def _check_scale(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value == 0:
        raise ValueError(f"revgrad: AdditiveCoupling {name} must be a finite nonzero number, got {value!r}")
    return float(value)


class _Coupling(nn.Module):
    """What both couplings share: the split dimension, sub-network calls with the chain's extra
    arguments, and the checks that name what is wrong."""

    dim: int

    def _split_dim(self, x: torch.Tensor) -> int:
        """``self.dim`` as a non-negative index for ``x``; refuses the batch dimension and sizes < 2."""
        d = self.dim
        if x.dim() < 2 or not -x.dim() <= d < x.dim() or d % x.dim() == 0 or x.shape[d] < 2:
            raise BlockError(
                f"revgrad: {type(self).__name__} splits dim {d} in halves, which needs a non-batch "
                f"dimension of size >= 2; got an input of shape {tuple(x.shape)}"
            )
        return d % x.dim()

    def _call(self, name: str, net: nn.Module, t: torch.Tensor, like: torch.Size, what: str, args, kwargs):
        """``net(t, *args, **kwargs)``, checked: it must leave ``t`` unchanged and return ``like``."""
        if args or kwargs:
            check_accepts(net, "forward", 1, CallArgs(args, kwargs), lambda: f"{type(self).__name__}.{name} "
                          f"({type(net).__name__})")
        version = _version(t)
        out = net(t, *args, **kwargs)
        if version is not None and t._version != version:
            # An in-place first layer (nn.ReLU(inplace=True)) changes a half the coupling's output or
            # inverse still needs.
            raise BlockError(
                f"revgrad: {type(self).__name__}.{name} modified its input in place (an in-place first "
                f"operation, such as nn.ReLU(inplace=True)?); a coupling's sub-networks must leave their "
                "input unchanged, or the coupling is not invertible"
            )
        if not isinstance(out, torch.Tensor) or out.shape != like:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise BlockError(
                f"revgrad: {type(self).__name__}.{name} returned {shape}; expected {tuple(like)} ({what})"
            )
        return out


class AdditiveCoupling(_Coupling):
    """RevNet block on the halves of dim ``dim``: ``y1 = scale1 * x1 + f(x2)``, ``y2 = scale2 * x2 + g(y1)``.

    Args:
        f: maps ``x2`` (``[B, C - C//2]`` along ``dim``) to the shape of ``x1`` (``C//2`` along ``dim``);
            called as ``f(x2, *args, **kwargs)`` with the chain's extra arguments.
        g: maps ``y1`` to the shape of ``x2``; called as ``g(y1, *args, **kwargs)``.
        dim: the dimension split in halves (``1``: channels of ``[B, C, ...]``; ``-1``: features of
            tokens ``[B, T, C]``). Not the batch dimension.
        scale1, scale2: ``lambda`` and ``beta`` of MEFT's reversible fine-tuning (nonzero numbers; the
            inverse divides by them, so a small ``scale1`` makes the inverse amplify errors by
            ``1 / scale1`` per block: what ``check="correct"`` is for).

    Shapes: ``x, y: [B, ...]`` with ``C >= 2`` along ``dim``. Lipschitz bounds (scales 1): forward and
    inverse both at most ``(1 + Lip f)(1 + Lip g)``. On GPUs, residual sums run as fused kernels when
    the halves are consecutive ranges of each sample (every dimension between the batch and ``dim``
    of size 1) and both scales are 1; otherwise as PyTorch operations.
    """

    def __init__(self, f: nn.Module, g: nn.Module, dim: int = 1, scale1: float = 1.0, scale2: float = 1.0) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"revgrad: AdditiveCoupling dim must be an int, got {dim!r}")
        self.f = f
        self.g = g
        self.dim = dim
        self.scale1 = _check_scale("scale1", scale1)
        self.scale2 = _check_scale("scale2", scale2)

    def extra_repr(self) -> str:
        parts = [] if self.dim == 1 else [f"dim={self.dim}"]
        parts += [f"{n}={v:g}" for n, v in (("scale1", self.scale1), ("scale2", self.scale2)) if v != 1.0]
        return ", ".join(parts)

    def _f(self, x2: torch.Tensor, like: torch.Size, args=(), kwargs=None) -> torch.Tensor:
        return self._call("f", self.f, x2, like, "f maps x2 to x1's shape", args, kwargs or {})

    def _g(self, y1: torch.Tensor, like: torch.Size, args=(), kwargs=None) -> torch.Tensor:
        return self._call("g", self.g, y1, like, "g maps y1 to x2's shape", args, kwargs or {})

    def _fusable(self, x: torch.Tensor, out: torch.Tensor, d: int) -> bool:
        """Whether the residual sums run as the kernel: no grad needed, one dtype, scales 1, halves that
        are consecutive ranges of each sample, and kernels dispatched for these tensors."""
        return (
            (not torch.is_grad_enabled() or not (x.requires_grad or out.requires_grad))
            and out.dtype == x.dtype
            and self.scale1 == 1.0
            and self.scale2 == 1.0
            and fused.halves_are_ranges(x, d)
            and dispatch.use_kernels(x, out)
        )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        d = self._split_dim(x)
        request = take_request(x)
        x1, x2 = _halves(x, d)
        with claim_tape() as tape:
            tape.mark()
            # Halves are strided; sub-networks (BatchNorm first) run faster on a packed copy.
            f_out = self._f(x2.contiguous(), x1.shape, args, kwargs)
            if self._fusable(x, f_out, d):
                # Each residual add writes its half of y in place and fingerprints x on the way.
                want = fused.FP_OF_A if request is not None else 0
                xc = x.contiguous()
                y = torch.empty_like(xc)
                fp = fused.residual(xc, f_out, y, 0, subtract=False, fingerprint_of=want)
                tape.mark()
                g_out = self._g(y.narrow(d, 0, x1.shape[d]), x2.shape, args, kwargs)
                fp2 = fused.residual(xc, g_out, y, x1[0].numel(), subtract=False, fingerprint_of=want)
                if request is not None:
                    request.value = fp + fp2
                return y
            y1 = _scaled(x1, self.scale1) + f_out
            tape.mark()
            g_out = self._g(y1, x2.shape, args, kwargs)
        return _cat_sum(y1, _scaled(x2, self.scale2), g_out, d)

    def inverse(self, y: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        d = self._split_dim(y)
        y1, y2 = _halves(y, d)
        x2 = _unscaled(y2 - self._g(y1, y2.shape, args, kwargs), self.scale2)
        x1 = _unscaled(y1 - self._f(x2, y1.shape, args, kwargs), self.scale1)
        return torch.cat([x1, x2], dim=d)

    def inverse_for_backward(
        self,
        y: torch.Tensor,
        tape: RngTape | NullTape,
        params: list[torch.Tensor],
        *args,
        grad_y: torch.Tensor | None = None,
        exact: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, VJP]:
        d = self._split_dim(y)
        request = take_request(None)
        y = y.detach()
        y1, y2 = _halves(y, d)
        early: list[torch.Tensor | None] | None = None
        with torch.enable_grad():
            y1_ = y1.contiguous().requires_grad_()  # a packed leaf: g's VJP w.r.t. y1 is part of dL/dy1
            with tape.replay(1):
                g_out = self._g(y1_, y2.shape, args, kwargs)
            if grad_y is not None:
                # g ran at y1, part of the trusted output: its VJP need not wait for the check, and
                # taking it now frees g's graph before f's is built (one sub-network graph at a time).
                early = _grad_of(g_out, [y1_, *params], _halves(grad_y, d)[1])
                g_out = g_out.detach()
                y1_ = None  # g's VJP is taken: the packed copy of y1 is dead
            if exact is not None:
                # The engine stored this block's input: f is differentiated at the true x2, and the
                # residual subtractions that would rebuild x are skipped.
                x = exact.detach()
                x2 = _halves(x, d)[1].contiguous().requires_grad_()
                with tape.replay(0):
                    f_out = self._f(x2, y1.shape, args, kwargs)
            elif self._fusable(y, g_out.detach(), d):
                # Both residual subtractions write straight into x and fingerprint it on the way.
                want = fused.FP_OF_OUT if request is not None else 0
                y_ = y.contiguous()
                x = torch.empty_like(y_)
                split = y1[0].numel()
                fp = fused.residual(y_, g_out.detach(), x, split, subtract=True, fingerprint_of=want)
                # A leaf over x's storage: the kernel writes only the other half afterwards.
                x2 = x.narrow(d, y1.shape[d], y2.shape[d]).detach().requires_grad_()
                with tape.replay(0):
                    f_out = self._f(x2, y1.shape, args, kwargs)
                fp2 = fused.residual(y_, f_out.detach(), x, 0, subtract=True, fingerprint_of=want)
                if request is not None:
                    request.value = fp + fp2
            else:
                x2 = _unscaled(y2 - g_out.detach(), self.scale2).requires_grad_()
                with tape.replay(0):
                    f_out = self._f(x2, y1.shape, args, kwargs)
                x = torch.cat([_unscaled(y1 - f_out.detach(), self.scale1), x2.detach()], dim=d)
            if early is not None:
                g_out = None  # x is rebuilt and g's VJP taken: the closure must not keep g_out alive
        given = grad_y
        s1, s2 = self.scale1, self.scale2

        def vjp(grad_y: torch.Tensor, grad_logdet: torch.Tensor | None):
            if early is not None and grad_y is not given:
                raise RuntimeError("revgrad: AdditiveCoupling's VJP got another gradient than its inverse")
            gy1, gy2 = _halves(grad_y, d)
            gy1, dx2, grads = _additive_vjp(early, g_out, y1_, f_out, x2, params, gy1, gy2)
            gy1, gy2 = _scaled(gy1, s1), _scaled(gy2, s2)
            gx = torch.cat([gy1, gy2], dim=d) if dx2 is None else _cat_sum(gy1, gy2, dx2, d)
            return gx, grads

        return x, vjp

    # -- the two-part path: the engine hands over the halves themselves (revgrad.engine.halves) --------------

    def forward_halves(self, x1: torch.Tensor, x2: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` on packed halves (engine forward, no grad): ``(y1, y2)``, the same numbers."""
        with claim_tape() as tape:
            tape.mark()
            y1 = _scaled(x1, self.scale1) + self._f(x2, x1.shape, args, kwargs)
            tape.mark()
            y2 = _scaled(x2, self.scale2) + self._g(y1, x2.shape, args, kwargs)
        return y1, y2

    def inverse_halves_for_backward(
        self,
        y: Halves,
        tape: RngTape | NullTape,
        params: list[torch.Tensor],
        *args,
        grad_y: Halves | None = None,
        exact: Halves | None = None,
        **kwargs,
    ) -> tuple[Halves, VJP]:
        """``inverse_for_backward`` on packed halves: returns ``x`` as halves, and a VJP that takes and
        returns halves (``vjp(Halves gy, None) -> (Halves gx, parameter grads)``)."""
        y1, y2 = y.a.detach(), y.b.detach()
        early: list[torch.Tensor | None] | None = None
        with torch.enable_grad():
            y1_ = y1.detach().requires_grad_()  # packed already: no copy, unlike the one-tensor path
            with tape.replay(1):
                g_out = self._g(y1_, y2.shape, args, kwargs)
            if grad_y is not None:
                early = _grad_of(g_out, [y1_, *params], grad_y.b)  # see inverse_for_backward
                g_out, y1_ = g_out.detach(), None
            if exact is not None:
                x1, x2 = exact.a.detach(), exact.b.detach().requires_grad_()
            else:
                x1, x2 = None, _unscaled(y2 - g_out.detach(), self.scale2).requires_grad_()
            with tape.replay(0):
                f_out = self._f(x2, y1.shape, args, kwargs)
            if x1 is None:
                x1 = _unscaled(y1 - f_out.detach(), self.scale1)
            if early is not None:
                g_out = None
        given, dim = grad_y, y.dim
        s1, s2 = self.scale1, self.scale2

        def vjp(grad_y: Halves, grad_logdet: torch.Tensor | None):
            if early is not None and grad_y is not given:
                raise RuntimeError("revgrad: AdditiveCoupling's VJP got another gradient than its inverse")
            gy1, dx2, grads = _additive_vjp(early, g_out, y1_, f_out, x2, params, grad_y.a, grad_y.b)
            gy2 = _scaled(grad_y.b, s2)
            return Halves(_scaled(gy1, s1), gy2 if dx2 is None else gy2 + dx2, dim), grads

        return Halves(x1, x2.detach(), dim), vjp


class AffineCoupling(_Coupling):
    """Affine coupling: ``x1`` passes, ``y2 = (x2 + shift) * s(raw)`` with ``[shift, raw] = net(x1)``.

    Args:
        net: maps ``x1`` (``C//2`` along ``dim``) to ``2 * (C - C//2)`` along ``dim`` (the other
            dimensions as ``x1``'s): the first half is the shift, the second the raw scale. Called as
            ``net(x1, *args, **kwargs)`` with the chain's extra arguments (a cINN's condition ``c``).
        scale: ``"sigmoid"`` (Glow, ``sigmoid(raw + 2)``), ``"exp"`` (RealNVP) or ``"bounded"``
            (``exp(log(bound) * tanh(raw))``, kept in ``(1/bound, bound)``).
        bound: the bound for ``scale="bounded"`` (> 1).
        dim: the dimension split in halves (``1``: channels; ``-1``: the features of ``[B, T, C]``).

    ``forward(x, *args, **kwargs) -> (y, logdet)`` with ``logdet: [B]``; ``inverse(y, *args, **kwargs)
    -> x``. On GPUs the elementwise math runs as fused kernels when the halves are consecutive ranges
    of each sample (every dimension between the batch and ``dim`` of size 1); otherwise as PyTorch
    operations.
    """

    def __init__(self, net: nn.Module, scale: ScaleKind = "sigmoid", bound: float = 2.0, dim: int = 1) -> None:
        super().__init__()
        if scale not in _SCALES:
            raise ValueError(f"revgrad: AffineCoupling scale must be one of {_SCALES}, got {scale!r}")
        if scale == "bounded" and not bound > 1.0:
            raise ValueError(f"revgrad: AffineCoupling bound must be > 1, got {bound}")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"revgrad: AffineCoupling dim must be an int, got {dim!r}")
        self.net = net
        self.scale = scale
        self.bound = float(bound)
        self.dim = dim

    def extra_repr(self) -> str:
        parts = [f"scale={self.scale!r}"]
        if self.scale == "bounded":
            parts.append(f"bound={self.bound}")
        if self.dim != 1:
            parts.append(f"dim={self.dim}")
        return ", ".join(parts)

    def _conditioner(self, x1: torch.Tensor, x2_shape: torch.Size, d: int, args, kwargs) -> torch.Tensor:
        like = list(x2_shape)
        like[d] *= 2
        return self._call("net", self.net, x1, torch.Size(like), "net maps x1 to [shift, raw scale] for x2",
                          args, kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        d = self._split_dim(x)
        request = take_request(x)
        x1, x2 = _halves(x, d)
        with claim_tape() as tape:
            tape.mark()
            h = self._conditioner(x1, x2.shape, d, args, kwargs)
        y, logdet, fp = fused.affine_coupling(x, h, self.scale, self.bound, request is not None, d)
        if request is not None:
            request.value = fp
        return y, logdet

    def inverse(self, y: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        d = self._split_dim(y)
        y1, y2 = _halves(y, d)
        h = self._conditioner(y1, y2.shape, d, args, kwargs)
        return fused.affine_coupling_inverse(y, h, self.scale, self.bound, False, d)[0]

    def inverse_for_backward(
        self, y: torch.Tensor, tape: RngTape | NullTape, params: list[torch.Tensor], *args, **kwargs
    ) -> tuple[torch.Tensor, VJP]:
        d = self._split_dim(y)
        request = take_request(None)
        y = y.detach()
        y1, y2 = _halves(y, d)
        with torch.enable_grad():
            x1 = y1.detach().requires_grad_()
            with tape.replay(0):
                h = self._conditioner(x1, y2.shape, d, args, kwargs)
        h_ = h.detach()
        x, fp = fused.affine_coupling_inverse(y, h_, self.scale, self.bound, request is not None, d)
        if request is not None:
            request.value = fp

        def vjp(grad_y: torch.Tensor | None, grad_logdet: torch.Tensor | None):
            if grad_y is None:  # only the logdet is differentiated
                grad_y = torch.zeros_like(y)
            gx, dh = fused.affine_coupling_backward(y, h_, grad_y, grad_logdet, self.scale, self.bound, d)
            dx1, *dp = _grad_of(h, [x1, *params], dh)
            if dx1 is not None:
                gx.narrow(d, 0, x1.shape[d]).add_(dx1)
            return gx, tuple(dp)

        return x, vjp
