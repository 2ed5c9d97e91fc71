"""Test chains: healthy ones, and ones whose inverse explodes, drifts or yields NaN."""

from __future__ import annotations

import torch
from torch import nn

import revgrad


class Flip(nn.Module):
    """Reverse the channel order (a user block without a fused path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y.flip(1)


class Scale(nn.Module):
    """``y = x * exp(log_scale)`` with logdet; ``inverse_error`` makes the inverse off by that factor."""

    def __init__(self, channels: int, inverse_error: float = 0.0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.linspace(-0.3, 0.3, channels))
        self.inverse_error = inverse_error

    def _s(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_scale.view(1, -1, *([1] * (x.dim() - 2)))

    def forward(self, x: torch.Tensor):
        s = self._s(x)
        logdet = s.sum() * x[0, 0].numel() * torch.ones(x.shape[0], dtype=x.dtype)
        return x * torch.exp(s), logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self._s(y)) * (1.0 + self.inverse_error)


class NaNInverse(Scale):
    """A block whose inverse yields NaN in one element."""

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        x = super().inverse(y).clone()
        x.view(-1)[3] = float("nan")
        return x


def conv_branch(channels: int, hidden: int | None = None) -> nn.Module:
    hidden = hidden or channels
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
        nn.Conv2d(hidden, channels, 3, padding=1),
    )


def healthy_chain(depth: int, channels: int = 4, seed: int = 0, affine_every: int = 3) -> nn.Sequential:
    """Additive couplings with a bounded-scale affine coupling and a flip every few blocks."""
    torch.manual_seed(seed)
    half = channels // 2
    blocks: list[nn.Module] = []
    for i in range(depth):
        if affine_every and i % affine_every == affine_every - 1:
            blocks.append(revgrad.AffineCoupling(nn.Conv2d(half, 2 * (channels - half), 3, padding=1), "bounded"))
            blocks.append(Flip())
        else:
            blocks.append(revgrad.AdditiveCoupling(conv_branch(channels - half), conv_branch(half)))
    return nn.Sequential(*blocks)


def exploding_chain(depth: int = 12, channels: int = 4, bias: float = -6.0, seed: int = 0) -> nn.Sequential:
    """Glow-style affine couplings whose sigmoid scales saturate near 0 (``sigmoid(bias + 2)``).

    The forward contracts x2 by ~400x per block while the shift overwrites it, so float32 rounding
    in the output is amplified by ~400x per block when the inverse divides by the scale.
    """
    torch.manual_seed(seed)
    half = channels // 2
    blocks: list[nn.Module] = []
    for _ in range(depth):
        conv = nn.Conv2d(half, 2 * (channels - half), 3, padding=1)
        with torch.no_grad():
            conv.bias[: channels - half] = 1.0
            conv.bias[channels - half :] = bias
        blocks.append(revgrad.AffineCoupling(conv, scale="sigmoid"))
        blocks.append(Flip())
    return nn.Sequential(*blocks)
