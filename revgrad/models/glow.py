"""The Glow-style INN classifier of Behrmann et al. 2021 ("Understanding and Mitigating Exploding
Inverses in Invertible Neural Networks"): Glow's flow steps (ActNorm, a permutation, a coupling) on
squeezed images, then global average pooling and a linear classifier.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..blocks import layers as L
from ..blocks.couplings import AdditiveCoupling, AffineCoupling
from ..engine.sequential import ReversibleSequential, reversible

__all__ = ["GlowClassifier", "glow_classifier", "glow_conditioner"]


def glow_conditioner(c_in: int, c_out: int, hidden: int) -> nn.Sequential:
    """Glow's coupling network: ``Conv3x3 -> ReLU -> Conv1x1 -> ReLU -> Conv3x3``, last conv at zero."""
    net = nn.Sequential(
        nn.Conv2d(c_in, hidden, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(hidden, hidden, 1),
        nn.ReLU(),
        nn.Conv2d(hidden, c_out, 3, padding=1),
    )
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


class GlowClassifier(nn.Module):
    """Glow-style invertible classifier (Behrmann et al. 2021).

    Attributes:
        flow: one ``nn.Sequential`` of blocks: per level ``Squeeze`` then ``depth`` times
            ``ActNorm -> permutation -> coupling``. :func:`revgrad.reversible` turns it into a
            :class:`revgrad.ReversibleSequential`.
        fc: linear classifier on the global average of the final latent.

    Shapes: ``forward(x: [B, C, H, W]) -> logits [B, num_classes]`` (``H, W`` divisible by
    ``2**levels``); the log-determinant of the flow, when a block returns one, is kept in
    :attr:`last_logdet` (``[B]``) for likelihood terms; :meth:`latent` gives the final latent.
    """

    def __init__(self, flow: nn.Sequential, latent_channels: int, num_classes: int) -> None:
        super().__init__()
        self.flow = flow
        self.fc = nn.Linear(latent_channels, num_classes)
        self.last_logdet: torch.Tensor | None = None

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.flow, ReversibleSequential):
            out = self.flow(x)
        else:  # plain autograd; blocks may return (y, logdet), which nn.Sequential cannot chain
            out, logdet = x, None
            for block in self.flow:
                step = block(out)
                if isinstance(step, tuple):
                    out, ld = step
                    if ld is not None:
                        logdet = ld if logdet is None else logdet + ld
                else:
                    out = step
            out = out if logdet is None else (out, logdet)
        if isinstance(out, tuple):
            z, self.last_logdet = out
        else:
            z, self.last_logdet = out, None
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.latent(x)
        return self.fc(z.mean(dim=(2, 3)))


def glow_classifier(
    in_channels: int = 1,
    num_classes: int = 10,
    levels: int = 2,
    depth: int = 4,
    hidden: int = 32,
    coupling: Literal["affine", "additive"] = "affine",
    permutation: Literal["shuffle", "conv", "lu", "reverse"] = "shuffle",
    scale: Literal["sigmoid", "exp", "bounded"] = "sigmoid",
    *,
    memory_saving: bool = True,
    check: str = "correct",
) -> GlowClassifier:
    """The Glow-style INN classifier of Behrmann et al. 2021 ("Understanding and Mitigating Exploding
    Inverses in Invertible Neural Networks").

    Per level: ``Squeeze`` (space-to-depth, ``C -> 4C``), then ``depth`` times ``ActNorm ->
    permutation -> coupling``; then global average pooling of the final latent
    (``in_channels * 4**levels`` channels) and a linear classifier ``fc``. No multi-scale split: the
    whole input stays in the latent.

    Args:
        coupling: ``"affine"`` (:class:`revgrad.AffineCoupling` with ``scale``) or ``"additive"``
            (:class:`revgrad.AdditiveCoupling`).
        permutation: ``"shuffle"`` (fixed random channel permutation, a different seed per layer),
            ``"conv"`` (invertible 1x1 convolution), ``"lu"`` (its LU-parametrized form) or
            ``"reverse"`` (channel reversal).
        scale: the affine coupling's scale function (``"sigmoid"`` is Glow's).
        hidden: width of the coupling networks (``Conv3x3 -> ReLU -> Conv1x1 -> ReLU -> Conv3x3``,
            last conv at zero so each coupling starts as the identity).
        memory_saving: ``True`` runs the flow with ``revgrad.reversible(model, check=check)``.
    """
    if coupling not in ("affine", "additive"):
        raise ValueError(f"revgrad: glow_classifier coupling must be 'affine' or 'additive', got {coupling!r}")
    if permutation not in ("shuffle", "conv", "lu", "reverse"):
        raise ValueError(
            f"revgrad: glow_classifier permutation must be 'shuffle', 'conv', 'lu' or 'reverse', got {permutation!r}"
        )
    if levels < 1 or depth < 1:
        raise ValueError(f"revgrad: glow_classifier needs levels >= 1 and depth >= 1, got {levels}, {depth}")
    blocks: list[nn.Module] = []
    c = in_channels
    seed = 0
    for _ in range(levels):
        blocks.append(L.Squeeze(2))
        c *= 4
        c1, c2 = c // 2, c - c // 2
        for _ in range(depth):
            blocks.append(L.ActNorm(c))
            if permutation == "shuffle":
                blocks.append(L.Shuffle(c, seed=seed))
            elif permutation == "reverse":
                blocks.append(L.Reverse())
            else:
                blocks.append(L.InvertibleConv1x1(c, lu=permutation == "lu"))
            seed += 1
            if coupling == "affine":
                blocks.append(AffineCoupling(glow_conditioner(c1, 2 * c2, hidden), scale=scale))
            else:
                blocks.append(AdditiveCoupling(glow_conditioner(c2, c1, hidden), glow_conditioner(c1, c2, hidden)))
    model = GlowClassifier(nn.Sequential(*blocks), c, num_classes)
    if memory_saving:
        reversible(model, check=check)  # in place: keeps the model's class and state_dict keys
    return model
