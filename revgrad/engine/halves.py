"""An activation carried as its two channel halves between two-part blocks (the engine's CPU path).

A coupling works on ``x1 = x[:, :C//2]`` and ``x2 = x[:, C//2:]``. Passing one tensor per block makes
every coupling split its input (strided halves, packed by a copy before the sub-networks) and
concatenate its output, in forward and again in backward (input, gradient). Between two couplings the
engine can instead hand over the halves themselves, each a packed tensor, and concatenate only where
a whole tensor is needed: at the chain's ends, for anchors, and around blocks that take one tensor.
On GPUs the coupling kernels write whole tensors in one pass, so the engine uses this only where the
kernels do not run.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Halves", "full", "split"]


class Halves(NamedTuple):
    """``x`` as ``(a, b)``: ``a = x[:, :C//2]``, ``b = x[:, C//2:]``, both packed (contiguous)."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.a.shape[0], self.a.shape[1] + self.b.shape[1], *self.a.shape[2:]))

    @property
    def dtype(self) -> torch.dtype:
        return torch.promote_types(self.a.dtype, self.b.dtype)

    @property
    def device(self) -> torch.device:
        return self.a.device

    def numel(self) -> int:
        return self.a.numel() + self.b.numel()

    def full(self) -> torch.Tensor:
        return torch.cat([self.a, self.b], dim=1)


def full(t: torch.Tensor | Halves) -> torch.Tensor:
    """``t`` as one tensor (concatenated if it is carried as halves)."""
    return t.full() if isinstance(t, Halves) else t


def split(t: torch.Tensor | Halves) -> Halves:
    """``t`` as packed halves (split and packed if it is one tensor)."""
    if isinstance(t, Halves):
        return t
    c = t.shape[1] // 2
    return Halves(t[:, :c].contiguous(), t[:, c:].contiguous())
