"""Building blocks of reversible models (RevNet, Glow); the full models come with issue #5."""

from __future__ import annotations

from torch import nn

__all__ = ["revnet_branch"]


def revnet_branch(channels: int, *, zero_last: bool = False) -> nn.Sequential:
    """RevNet basic residual function, ``f`` or ``g`` of an additive coupling (Gomez et al. 2017).

    ``BN -> ReLU -> Conv3x3 -> BN -> ReLU -> Conv3x3`` on ``[B, channels, H, W]``, convs without bias
    (BatchNorm follows or the coupling adds). ``zero_last=True`` starts the last conv at zero, so the
    coupling starts as the identity, which lets deep stacks train from the first step.
    """
    branch = nn.Sequential(
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
    )
    if zero_last:
        nn.init.zeros_(branch[-1].weight)
    return branch
