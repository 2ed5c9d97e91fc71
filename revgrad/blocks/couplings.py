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

import contextlib
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from ..engine.checks import take_request
from ..engine.halves import Halves
from ..engine.protocol import VJP, BlockError
from ..engine.replay import RngTape, claim_tape
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


def _cat_sum(first: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``cat([first, p + q], dim=1)``; outside autograd ``p + q`` is written straight into the result."""
    if torch.is_grad_enabled():
        return torch.cat([first, p + q], dim=1)
    dtype = torch.promote_types(first.dtype, torch.promote_types(p.dtype, q.dtype))
    c = first.shape[1]
    out = first.new_empty((first.shape[0], c + p.shape[1], *first.shape[2:]), dtype=dtype)
    out[:, :c].copy_(first)
    torch.add(p, q, out=out[:, c:])
    return out


def _replay(tape: RngTape | None, mark: int) -> contextlib.AbstractContextManager[None]:
    return tape.replay(mark) if tape is not None else contextlib.nullcontext()


def _mark(tape: RngTape | None) -> None:
    if tape is not None:
        tape.mark()


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
    """The additive coupling's VJP from its sub-network graphs: ``(dL/dx1, f's share of dL/dx2 (None if
    f ignores x2), parameter grads)``; ``dL/dx2 = dL/dy2 + f's share``. ``early``: g's VJP if already
    taken, else it is taken here from ``g_out`` at ``y1_``."""
    dy1, *dg = early if early is not None else _grad_of(g_out, [y1_, *params], gy2)
    gy1 = gy1 if dy1 is None else gy1 + dy1
    dx2, *df = _grad_of(f_out, [x2, *params], gy1)
    # Differentiating both graphs w.r.t. all of the block's parameters (unused ones get None) sums a
    # parameter that f and g share, without walking the modules to split them.
    return gy1, dx2, tuple(_add(a, b) for a, b in zip(dg, df))


def _fusable(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether an additive coupling writes its residual sums with the kernel (no grad needed, one
    dtype, kernels dispatched for these tensors)."""
    return (not torch.is_grad_enabled() or not (x.requires_grad or out.requires_grad)) and (
        out.dtype == x.dtype and dispatch.use_kernels(x, out)
    )


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


class _Coupling(nn.Module):
    def _check_unchanged(self, name: str, t: torch.Tensor, version: int | None) -> None:
        """A sub-network that modifies its input in place (``nn.ReLU(inplace=True)`` as its first
        layer) changes a half the coupling's output or inverse still needs: refuse it."""
        if version is not None and t._version != version:
            raise BlockError(
                f"revgrad: {type(self).__name__}.{name} modified its input in place (an in-place first "
                f"operation, such as nn.ReLU(inplace=True)?); a coupling's sub-networks must leave their "
                "input unchanged, or the coupling is not invertible"
            )

    def _check_split(self, x: torch.Tensor) -> None:
        if x.dim() < 2 or x.shape[1] < 2:
            raise BlockError(
                f"revgrad: {type(self).__name__} splits dim 1 in halves and needs at least 2 channels; "
                f"got an input of shape {tuple(x.shape)}"
            )

    def _check_out(self, name: str, out: torch.Tensor, like: torch.Size, what: str) -> None:
        if not isinstance(out, torch.Tensor) or out.shape != like:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise BlockError(
                f"revgrad: {type(self).__name__}.{name} returned {shape}; expected {tuple(like)} ({what})"
            )


class AdditiveCoupling(_Coupling):
    """RevNet block: ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)`` on the halves of dim 1.

    Args:
        f: maps ``x2`` (``[B, C - C//2, ...]``) to the shape of ``x1`` (``[B, C//2, ...]``).
        g: maps ``y1`` (``[B, C//2, ...]``) to the shape of ``x2``.

    Shapes: ``x, y: [B, C, ...]``. Lipschitz bounds: forward and inverse both at most
    ``(1 + Lip f)(1 + Lip g)``.
    """

    def __init__(self, f: nn.Module, g: nn.Module) -> None:
        super().__init__()
        self.f = f
        self.g = g

    def _f(self, x2: torch.Tensor, like: torch.Size) -> torch.Tensor:
        version = _version(x2)
        out = self.f(x2)
        self._check_unchanged("f", x2, version)
        self._check_out("f", out, like, "f maps x2 to x1's shape")
        return out

    def _g(self, y1: torch.Tensor, like: torch.Size) -> torch.Tensor:
        version = _version(y1)
        out = self.g(y1)
        self._check_unchanged("g", y1, version)
        self._check_out("g", out, like, "g maps y1 to x2's shape")
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_split(x)
        request = take_request(x)
        x1, x2 = _halves(x)
        with claim_tape() as tape:
            _mark(tape)
            # Channel slices are strided; sub-networks (BatchNorm first) run faster on a packed copy.
            f_out = self._f(x2.contiguous(), x1.shape)
            if _fusable(x, f_out):
                # Each residual add writes its half of y in place and fingerprints x on the way.
                want = fused.FP_OF_A if request is not None else 0
                xc = x.contiguous()
                y = torch.empty_like(xc)
                fp = fused.residual(xc, f_out, y, 0, subtract=False, fingerprint_of=want)
                _mark(tape)
                g_out = self._g(y[:, : x1.shape[1]], x2.shape)
                fp2 = fused.residual(xc, g_out, y, x1[0].numel(), subtract=False, fingerprint_of=want)
                if request is not None:
                    request.value = fp + fp2
                return y
            y1 = x1 + f_out
            _mark(tape)
            g_out = self._g(y1, x2.shape)
        return _cat_sum(y1, x2, g_out)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        self._check_split(y)
        y1, y2 = _halves(y)
        x2 = y2 - self._g(y1, y2.shape)
        x1 = y1 - self._f(x2, y1.shape)
        return torch.cat([x1, x2], dim=1)

    def inverse_for_backward(
        self,
        y: torch.Tensor,
        tape: RngTape | None,
        params: list[nn.Parameter],
        grad_y: torch.Tensor | None = None,
        exact: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, VJP]:
        self._check_split(y)
        request = take_request(None)
        y = y.detach()
        y1, y2 = _halves(y)
        early: list[torch.Tensor | None] | None = None
        with torch.enable_grad():
            y1_ = y1.contiguous().requires_grad_()  # a packed leaf: g's VJP w.r.t. y1 is part of dL/dy1
            with _replay(tape, 1):
                g_out = self._g(y1_, y2.shape)
            if grad_y is not None:
                # g ran at y1, part of the trusted output: its VJP need not wait for the check, and
                # taking it now frees g's graph before f's is built (one sub-network graph at a time).
                early = _grad_of(g_out, [y1_, *params], _halves(grad_y)[1])
                g_out = g_out.detach()
                y1_ = None  # g's VJP is taken: the packed copy of y1 is dead
            if exact is not None:
                # The engine stored this block's input: f is differentiated at the true x2, and the
                # residual subtractions that would rebuild x are skipped.
                x = exact.detach()
                x2 = _halves(x)[1].contiguous().requires_grad_()
                with _replay(tape, 0):
                    f_out = self._f(x2, y1.shape)
            elif _fusable(y, g_out.detach()):
                # Both residual subtractions write straight into x and fingerprint it on the way.
                want = fused.FP_OF_OUT if request is not None else 0
                y_ = y.contiguous()
                x = torch.empty_like(y_)
                split = y1[0].numel()
                fp = fused.residual(y_, g_out.detach(), x, split, subtract=True, fingerprint_of=want)
                # A leaf over x's storage: the kernel writes only the other half afterwards.
                x2 = x[:, y1.shape[1] :].detach().requires_grad_()
                with _replay(tape, 0):
                    f_out = self._f(x2, y1.shape)
                fp2 = fused.residual(y_, f_out.detach(), x, 0, subtract=True, fingerprint_of=want)
                if request is not None:
                    request.value = fp + fp2
            else:
                x2 = (y2 - g_out.detach()).requires_grad_()
                with _replay(tape, 0):
                    f_out = self._f(x2, y1.shape)
                x = torch.cat([y1 - f_out.detach(), x2.detach()], dim=1)
            if early is not None:
                g_out = None  # x is rebuilt and g's VJP taken: the closure must not keep g_out alive
        given = grad_y

        def vjp(grad_y: torch.Tensor, grad_logdet: torch.Tensor | None):
            if early is not None and grad_y is not given:
                raise RuntimeError("revgrad: AdditiveCoupling's VJP got another gradient than its inverse")
            gy1, gy2 = _halves(grad_y)
            gy1, dx2, grads = _additive_vjp(early, g_out, y1_, f_out, x2, params, gy1, gy2)
            gx = torch.cat([gy1, gy2], dim=1) if dx2 is None else _cat_sum(gy1, gy2, dx2)
            return gx, grads

        return x, vjp

    # -- the two-part path: the engine hands over the halves themselves (revgrad.engine.halves) --------------

    def forward_halves(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` on packed halves (engine forward, no grad): ``(y1, y2)``, the same numbers."""
        with claim_tape() as tape:
            _mark(tape)
            y1 = x1 + self._f(x2, x1.shape)
            _mark(tape)
            y2 = x2 + self._g(y1, x2.shape)
        return y1, y2

    def inverse_halves_for_backward(
        self,
        y: Halves,
        tape: RngTape | None,
        params: list[nn.Parameter],
        grad_y: Halves | None = None,
        exact: Halves | None = None,
    ) -> tuple[Halves, VJP]:
        """``inverse_for_backward`` on packed halves: returns ``x`` as halves, and a VJP that takes and
        returns halves (``vjp(Halves gy, None) -> (Halves gx, parameter grads)``)."""
        y1, y2 = y.a.detach(), y.b.detach()
        early: list[torch.Tensor | None] | None = None
        with torch.enable_grad():
            y1_ = y1.detach().requires_grad_()  # packed already: no copy, unlike the one-tensor path
            with _replay(tape, 1):
                g_out = self._g(y1_, y2.shape)
            if grad_y is not None:
                early = _grad_of(g_out, [y1_, *params], grad_y.b)  # see inverse_for_backward
                g_out, y1_ = g_out.detach(), None
            if exact is not None:
                x1, x2 = exact.a.detach(), exact.b.detach().requires_grad_()
            else:
                x1, x2 = None, (y2 - g_out.detach()).requires_grad_()
            with _replay(tape, 0):
                f_out = self._f(x2, y1.shape)
            if x1 is None:
                x1 = y1 - f_out.detach()
            if early is not None:
                g_out = None
        given = grad_y

        def vjp(grad_y: Halves, grad_logdet: torch.Tensor | None):
            if early is not None and grad_y is not given:
                raise RuntimeError("revgrad: AdditiveCoupling's VJP got another gradient than its inverse")
            gy1, dx2, grads = _additive_vjp(early, g_out, y1_, f_out, x2, params, grad_y.a, grad_y.b)
            return Halves(gy1, grad_y.b if dx2 is None else grad_y.b + dx2), grads

        return Halves(x1, x2.detach()), vjp


class AffineCoupling(_Coupling):
    """Affine coupling: ``x1`` passes, ``y2 = (x2 + shift) * s(raw)`` with ``[shift, raw] = net(x1)``.

    Args:
        net: maps ``x1`` (``[B, C//2, ...]``) to ``[B, 2 * (C - C//2), ...]``: the first half of its
            channels is the shift, the second half the raw scale.
        scale: ``"sigmoid"`` (Glow, ``sigmoid(raw + 2)``), ``"exp"`` (RealNVP) or ``"bounded"``
            (``exp(log(bound) * tanh(raw))``, kept in ``(1/bound, bound)``).
        bound: the bound for ``scale="bounded"`` (> 1).

    ``forward(x) -> (y, logdet)`` with ``logdet: [B]``; ``inverse(y) -> x``.
    """

    def __init__(self, net: nn.Module, scale: ScaleKind = "sigmoid", bound: float = 2.0) -> None:
        super().__init__()
        if scale not in _SCALES:
            raise ValueError(f"revgrad: AffineCoupling scale must be one of {_SCALES}, got {scale!r}")
        if scale == "bounded" and not bound > 1.0:
            raise ValueError(f"revgrad: AffineCoupling bound must be > 1, got {bound}")
        self.net = net
        self.scale = scale
        self.bound = float(bound)

    def extra_repr(self) -> str:
        return f"scale={self.scale!r}" + (f", bound={self.bound}" if self.scale == "bounded" else "")

    def _conditioner(self, x1: torch.Tensor, x2_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        version = _version(x1)
        h = self.net(x1)
        self._check_unchanged("net", x1, version)
        like = torch.Size((x2_shape[0], 2 * x2_shape[1], *x2_shape[2:]))
        self._check_out("net", h, like, "net maps x1 to [shift, raw scale] for x2")
        shift, raw = h.chunk(2, dim=1)
        return h, shift, raw

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_split(x)
        request = take_request(x)
        x1, x2 = _halves(x)
        with claim_tape() as tape:
            _mark(tape)
            h, _, _ = self._conditioner(x1, x2.shape)
        y, logdet, fp = fused.affine_coupling(x, h, self.scale, self.bound, request is not None)
        if request is not None:
            request.value = fp
        return y, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        self._check_split(y)
        y1, y2 = _halves(y)
        h, _, _ = self._conditioner(y1, y2.shape)
        return fused.affine_coupling_inverse(y, h, self.scale, self.bound)[0]

    def inverse_for_backward(
        self, y: torch.Tensor, tape: RngTape | None, params: list[nn.Parameter]
    ) -> tuple[torch.Tensor, VJP]:
        self._check_split(y)
        request = take_request(None)
        y = y.detach()
        y1, y2 = _halves(y)
        with torch.enable_grad():
            x1 = y1.detach().requires_grad_()
            with _replay(tape, 0):
                h, _, _ = self._conditioner(x1, y2.shape)
        h_ = h.detach()
        x, fp = fused.affine_coupling_inverse(y, h_, self.scale, self.bound, request is not None)
        if request is not None:
            request.value = fp

        def vjp(grad_y: torch.Tensor | None, grad_logdet: torch.Tensor | None):
            if grad_y is None:  # only the logdet is differentiated
                grad_y = torch.zeros_like(y)
            gx, dh = fused.affine_coupling_backward(y, h_, grad_y, grad_logdet, self.scale, self.bound)
            dx1, *dp = _grad_of(h, [x1, *params], dh)
            if dx1 is not None:
                gx[:, : x1.shape[1]] += dx1
            return gx, tuple(dp)

        return x, vjp
