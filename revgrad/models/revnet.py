"""RevNet-38/110/164 for CIFAR (Gomez et al. 2017).

RevNet configurations (Gomez et al. 2017, "The Reversible Residual Network", Table 1, CIFAR, as
recalled from the paper and the authors' code, renmengye/revnet-public, not checked against a copy;
the parameter counts below reproduce the paper's to three digits)::

    model        units     channels (stem; stages)   unit        params (paper)
    RevNet-38    3-3-3     32; 32-64-112             basic       0.46M
    RevNet-110   9-9-9     32; 32-64-128             basic       1.73M
    RevNet-164   9-9-9     32; 128-256-512           bottleneck  1.75M

Depth: every unit holds ``f`` and ``g``, each 2 (basic) or 3 (bottleneck) convolutions, plus the stem
convolution and the classifier: ``9 * 2 * 2 + 2 = 38``, ``27 * 2 * 2 + 2 = 110``, ``27 * 2 * 3 + 2 = 164``.

The first unit of a stage whose width or resolution changes (all stages but the first of RevNet-38
and RevNet-110) is :class:`RevDownsample`, a coupling that is not invertible:
``y1 = s(x1) + f(x2)``, ``y2 = s(x2) + g(y1)`` with ``f`` strided and widening, and the shortcut ``s``
average pooling with zero channel padding (basic) or a strided 1x1 projection convolution per half
(bottleneck), as in ResNet-v2 and (as recalled) the authors' code. Its input is stored by plain
autograd; every other unit is an :class:`revgrad.AdditiveCoupling` whose activations are rebuilt
in backward. With these choices the parameter counts (CIFAR-10) are 464,858, 1,729,162 and
1,748,746: the paper's 0.46M, 1.73M and 1.75M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks.couplings import AdditiveCoupling
from ..engine.sequential import reversible

__all__ = [
    "RevDownsample",
    "RevNet",
    "revnet38",
    "revnet110",
    "revnet164",
    "revnet_bottleneck_branch",
    "revnet_branch",
]


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


def _basic(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """``BN -> ReLU -> Conv3x3 (stride, c_in -> c_out) -> BN -> ReLU -> Conv3x3``."""
    return nn.Sequential(
        nn.BatchNorm2d(c_in),
        nn.ReLU(),
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
    )


def _bottleneck(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """``BN-ReLU-Conv1x1 (c_in -> c_out/4) -> BN-ReLU-Conv3x3 (stride) -> BN-ReLU-Conv1x1 (-> c_out)``."""
    inner = max(c_out // 4, 1)
    return nn.Sequential(
        nn.BatchNorm2d(c_in),
        nn.ReLU(),
        nn.Conv2d(c_in, inner, 1, bias=False),
        nn.BatchNorm2d(inner),
        nn.ReLU(),
        nn.Conv2d(inner, inner, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(inner),
        nn.ReLU(),
        nn.Conv2d(inner, c_out, 1, bias=False),
    )


def revnet_bottleneck_branch(channels: int, *, zero_last: bool = False) -> nn.Sequential:
    """RevNet bottleneck residual function on ``[B, channels, H, W]`` (inner width ``channels // 4``).

    ``BN-ReLU-Conv1x1 -> BN-ReLU-Conv3x3 -> BN-ReLU-Conv1x1``, convs without bias; ``zero_last`` as
    in :func:`revnet_branch`.
    """
    branch = _bottleneck(channels, channels)
    if zero_last:
        nn.init.zeros_(branch[-1].weight)
    return branch


class _PadShortcut(nn.Module):
    """Average pooling with ``stride`` then symmetric zero padding of the channels to ``c_out``."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.c_in, self.c_out, self.stride = c_in, c_out, stride

    def extra_repr(self) -> str:
        return f"{self.c_in} -> {self.c_out}, stride={self.stride}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)
        extra = self.c_out - self.c_in
        if extra:
            x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return x


class RevDownsample(nn.Module):
    """The non-invertible first unit of a RevNet stage that changes width or resolution.

    ``y1 = s1(x1) + f(x2)``, ``y2 = s2(x2) + g(y1)`` on the channel halves, ``f`` strided and
    widening ``c_in/2 -> c_out/2``; the shortcuts ``s1, s2`` are average pooling with zero channel
    padding (``bottleneck=False``) or strided 1x1 projection convolutions (``bottleneck=True``).

    Shapes: ``[B, c_in, H, W] -> [B, c_out, ceil(H/stride), ceil(W/stride)]``. It has no ``inverse``,
    so it is not a block: revgrad runs it with plain autograd between runs of blocks.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, *, bottleneck: bool = False) -> None:
        super().__init__()
        if c_in % 2 or c_out % 2:
            raise ValueError(f"revgrad: RevDownsample needs even channel counts, got {c_in} -> {c_out}")
        h_in, h_out = c_in // 2, c_out // 2
        branch = _bottleneck if bottleneck else _basic
        self.f = branch(h_in, h_out, stride)
        self.g = branch(h_out, h_out)
        if bottleneck:
            self.shortcut1 = nn.Conv2d(h_in, h_out, 1, stride=stride, bias=False)
            self.shortcut2 = nn.Conv2d(h_in, h_out, 1, stride=stride, bias=False)
        else:
            self.shortcut1 = _PadShortcut(h_in, h_out, stride)
            self.shortcut2 = _PadShortcut(h_in, h_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        y1 = self.shortcut1(x1) + self.f(x2.contiguous())
        y2 = self.shortcut2(x2) + self.g(y1)
        return torch.cat([y1, y2], dim=1)


class RevNet(nn.Module):
    """RevNet for 32x32 images (Gomez et al. 2017); see the module docstring for the configurations.

    Attributes:
        stem: ``conv3x3 in_channels -> stem_channels``.
        layer1, layer2, layer3: one ``nn.Sequential`` per stage: a :class:`RevDownsample` where the
            width or stride changes, then :class:`revgrad.AdditiveCoupling` units.
            :func:`revgrad.reversible` turns each into a :class:`revgrad.ReversibleSequential` (same
            children, same ``state_dict`` keys).
        bn, relu, avgpool: final BN-ReLU and global average pooling.
        fc: the linear classifier (torchvision's name).

    Shapes: ``forward(x: [B, in_channels, H, W]) -> logits [B, num_classes]``.
    """

    def __init__(
        self,
        units: tuple[int, ...],
        channels: tuple[int, ...],
        *,
        bottleneck: bool = False,
        num_classes: int = 10,
        stem_channels: int = 32,
        in_channels: int = 3,
        strides: tuple[int, ...] = (1, 2, 2),
        zero_last: bool = False,
    ) -> None:
        super().__init__()
        if not len(units) == len(channels) == len(strides):
            raise ValueError("revgrad: RevNet needs as many units, channels and strides as stages")
        self.stem = nn.Conv2d(in_channels, stem_channels, 3, padding=1, bias=False)
        branch = revnet_bottleneck_branch if bottleneck else revnet_branch
        width = stem_channels
        self._stage_names: list[str] = []
        for i, (n, c, s) in enumerate(zip(units, channels, strides), start=1):
            if n < 1 or c % 2:
                raise ValueError(f"revgrad: stage {i} needs >= 1 unit and an even width, got {n}, {c}")
            layers: list[nn.Module] = []
            if c != width or s != 1:
                layers.append(RevDownsample(width, c, s, bottleneck=bottleneck))
            while len(layers) < n:
                half = c // 2
                layers.append(AdditiveCoupling(branch(half, zero_last=zero_last), branch(half, zero_last=zero_last)))
            name = f"layer{i}"
            self.add_module(name, nn.Sequential(*layers))
            self._stage_names.append(name)
            width = c
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for name in self._stage_names:
            h = getattr(self, name)(h)
        h = self.avgpool(self.relu(self.bn(h)))
        return self.fc(torch.flatten(h, 1))


def _finish(model: nn.Module, memory_saving: bool, check: str) -> nn.Module:
    if memory_saving:
        reversible(model, check=check)  # in place: keeps the model's class and state_dict keys
    return model


def revnet38(num_classes: int = 10, memory_saving: bool = True, check: str = "correct", **kwargs) -> RevNet:
    """RevNet-38 (3-3-3 basic units, 32-64-112 channels, 0.46M parameters for CIFAR-10).

    ``memory_saving=True`` converts the stages in place with ``revgrad.reversible(model, check=check)``;
    ``False`` gives plain autograd. Both have the same ``state_dict`` keys. ``kwargs`` go to :class:`RevNet`.
    """
    model = RevNet((3, 3, 3), (32, 64, 112), num_classes=num_classes, **kwargs)
    return _finish(model, memory_saving, check)


def revnet110(num_classes: int = 10, memory_saving: bool = True, check: str = "correct", **kwargs) -> RevNet:
    """RevNet-110 (9-9-9 basic units, 32-64-128 channels, 1.73M parameters); see :func:`revnet38`."""
    model = RevNet((9, 9, 9), (32, 64, 128), num_classes=num_classes, **kwargs)
    return _finish(model, memory_saving, check)


def revnet164(num_classes: int = 10, memory_saving: bool = True, check: str = "correct", **kwargs) -> RevNet:
    """RevNet-164 (9-9-9 bottleneck units, 128-256-512 channels, 1.75M parameters); see :func:`revnet38`."""
    model = RevNet((9, 9, 9), (128, 256, 512), bottleneck=True, num_classes=num_classes, **kwargs)
    return _finish(model, memory_saving, check)
