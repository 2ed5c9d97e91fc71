"""An activation carried as its two channel halves between two-part blocks (the engine's CPU path).

A coupling works on the halves of its split dimension, ``x1 = x[:, :C//2]`` and ``x2 = x[:, C//2:]`` for
the channels (``dim=1``). Passing one tensor per block makes
every coupling split its input (strided halves, packed by a copy before the sub-networks) and
concatenate its output, in forward and again in backward (input, gradient). Between two couplings the
engine can instead hand over the halves themselves, each a packed tensor, and concatenate only where
a whole tensor is needed: at the chain's ends, for anchors, and around blocks that take one tensor.
On GPUs the coupling kernels write whole tensors in one pass, so the engine uses this only where the
kernels do not run.
"""

from __future__ import annotations

import torch

__all__ = ["Halves", "full", "split"]


class Halves:
    """``x`` as ``(a, b)``: its halves along ``dim`` (``a`` the first ``size // 2``), both packed.

    Unpacks as ``a, b = halves``.
    """

    __slots__ = ("a", "b", "dim")

    def __init__(self, a: torch.Tensor, b: torch.Tensor, dim: int = 1) -> None:
        self.a, self.b, self.dim = a, b, dim

    def __iter__(self):
        return iter((self.a, self.b))

    @property
    def shape(self) -> torch.Size:
        shape = list(self.a.shape)
        shape[self.dim] += self.b.shape[self.dim]
        return torch.Size(shape)

    @property
    def dtype(self) -> torch.dtype:
        return torch.promote_types(self.a.dtype, self.b.dtype)

    @property
    def device(self) -> torch.device:
        return self.a.device

    def numel(self) -> int:
        return self.a.numel() + self.b.numel()

    def full(self) -> torch.Tensor:
        return torch.cat([self.a, self.b], dim=self.dim)


def full(t: torch.Tensor | Halves) -> torch.Tensor:
    """``t`` as one tensor (concatenated if it is carried as halves)."""
    return t.full() if isinstance(t, Halves) else t


def split(t: torch.Tensor | Halves, dim: int = 1) -> Halves:
    """``t`` as packed halves along ``dim`` (``dim >= 1``; split and packed if it is one tensor, or
    carried as halves along another dimension)."""
    if isinstance(t, Halves):
        if t.dim == dim:
            return t
        t = t.full()
    c = t.shape[dim] // 2
    return Halves(t.narrow(dim, 0, c).contiguous(), t.narrow(dim, c, t.shape[dim] - c).contiguous(), dim)
