"""Glow, the multi-scale normalizing flow of Kingma & Dhariwal 2018, as a density model.

Per level ``l`` (``levels`` of them): ``Squeeze`` (``C -> 4C``, ``H, W -> H/2, W/2``), then ``depth``
flow steps ``ActNorm -> invertible 1x1 convolution (LU) -> coupling``; then, except at the last
level, half of the channels are split off as that level's latent ``z_l`` and the other half goes on::

    h_0 = x
    (h, logdet_l) = level_l(h_l)                  one memory-saving chain per level
    kept, z_l = h[:, :C/2], h[:, C/2:]            l < levels - 1;  h_{l+1} = kept
    z_top = h                                     l = levels - 1

    log p(x) = sum_l logdet_l + sum_l log p(z_l | kept_l, c) + log p(z_top | c)

Priors: ``"standard"``, a standard normal over every latent; ``"learned"``, Glow's: a zero-initialized
3x3 convolution predicting the mean and log-std of ``z_l`` from ``kept_l`` (and the condition), and a
learned per-channel mean and log-std for ``z_top`` (plus a zero-initialized linear map of the
condition). Both start as the standard normal.

Each level's blocks form one :class:`revgrad.ReversibleSequential` (``memory_saving=False``:
:class:`revgrad.PlainSequential`, the same ``state_dict`` keys), so activation memory is flat in
``depth``; the split priors run with plain autograd (one convolution per level). A condition
``c: [B, condition_dim]`` reaches every coupling's conditioner as the chains' extra argument (the
layers ignore it), broadcast over the positions and concatenated to the conditioner's input.

``decode`` and ``sample`` run each level's chain backwards (``chain.inverse``), memory-saving under
grad as the forward.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from ..blocks import layers as L
from ..blocks.couplings import AdditiveCoupling, AffineCoupling
from ..engine.sequential import PlainSequential, ReversibleSequential
from .glow import glow_conditioner

__all__ = ["Glow", "dequantize", "glow"]

_LOG_2PI = math.log(2.0 * math.pi)


def dequantize(
    x: torch.Tensor, bins: int = 256, generator: torch.Generator | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Uniform dequantization: integer values ``x`` in ``[0, bins)`` to ``(x + u) / bins`` in ``[0, 1)``,
    ``u ~ U[0, 1)`` drawn from ``generator`` (the global RNG when ``None``).

    Shapes: any; returns ``dtype`` (default: ``torch.get_default_dtype()``), strictly below 1.
    """
    if x.is_floating_point():
        raise TypeError(f"revgrad: dequantize takes integer values (uint8, int64, ...), got {x.dtype}")
    dtype = dtype or torch.get_default_dtype()
    u = torch.rand(x.shape, generator=generator, dtype=dtype, device=x.device)
    out = (x.to(dtype) + u) / bins
    # (bins - 1 + u) / bins can round up to 1 in low precision: keep the result in [0, 1).
    below_one = torch.nextafter(torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype)).to(x.device)
    return torch.minimum(out, below_one)


def _gaussian_log_density(z: torch.Tensor, mean: torch.Tensor | None, log_std: torch.Tensor | None) -> torch.Tensor:
    """``sum log N(z; mean, exp(log_std)^2)`` over the non-batch dims: ``[B]``."""
    if mean is None:
        e = -0.5 * (z.square() + _LOG_2PI)
    else:
        e = -0.5 * (((z - mean) * torch.exp(-log_std)).square() + _LOG_2PI) - log_std
    return e.flatten(1).sum(1)


def _with_condition(x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """``x: [B, C, H, W]`` with ``c: [B, K]`` broadcast over the positions and concatenated: ``[B, C+K, H, W]``."""
    if c is None:
        return x
    b, _, h, w = x.shape
    return torch.cat([x, c.to(x.dtype)[:, :, None, None].expand(b, c.shape[1], h, w)], dim=1)


class ConditionedNet(nn.Module):
    """Glow's coupling network (``Conv3x3 -> ReLU -> Conv1x1 -> ReLU -> Conv3x3``, last conv at zero)
    on ``x`` with the condition ``c`` (``[B, condition_dim]``) broadcast and concatenated to it.

    Shapes: ``forward(x: [B, c_in, H, W], c: [B, condition_dim] | None) -> [B, c_out, H, W]``.
    """

    def __init__(self, c_in: int, c_out: int, hidden: int, condition_dim: int | None = None) -> None:
        super().__init__()
        self.condition_dim = condition_dim
        self.net = glow_conditioner(c_in + (condition_dim or 0), c_out, hidden)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(_with_condition(x, c if self.condition_dim else None))


class SplitPrior(nn.Module):
    """Glow's learned prior of a split-off half: a zero-initialized 3x3 convolution of the kept half
    (and the condition) gives the mean and log-std of ``z``.

    Shapes: ``forward(kept: [B, c_keep, H, W], c) -> (mean, log_std)``, each ``[B, c_split, H, W]``.
    """

    def __init__(self, c_keep: int, c_split: int, condition_dim: int | None = None) -> None:
        super().__init__()
        self.condition_dim = condition_dim
        self.conv = nn.Conv2d(c_keep + (condition_dim or 0), 2 * c_split, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, kept: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.conv(_with_condition(kept, c if self.condition_dim else None))
        mean, log_std = out.chunk(2, dim=1)
        return mean, log_std


class TopPrior(nn.Module):
    """Glow's learned prior of the last level's latent: a per-channel mean and log-std (zero at
    init), shifted by a zero-initialized linear map of the condition when there is one.

    Shapes: ``forward(c: [B, condition_dim] | None) -> (mean, log_std)``, each ``[1 or B, C, 1, 1]``.
    """

    def __init__(self, channels: int, condition_dim: int | None = None) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(channels))
        self.log_std = nn.Parameter(torch.zeros(channels))
        self.condition = None
        if condition_dim:
            self.condition = nn.Linear(condition_dim, 2 * channels)
            nn.init.zeros_(self.condition.weight)
            nn.init.zeros_(self.condition.bias)

    def forward(self, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.mean[None], self.log_std[None]
        if self.condition is not None and c is not None:
            dm, ds = self.condition(c.to(self.mean.dtype)).chunk(2, dim=1)
            mean, log_std = mean + dm, log_std + ds
        return mean[:, :, None, None], log_std[:, :, None, None]


class Glow(nn.Module):
    """Glow (Kingma & Dhariwal 2018): a multi-scale flow ``x -> [z_0, ..., z_top]`` and its density.

    Attributes:
        levels: one chain per level (:class:`revgrad.ReversibleSequential`, or
            :class:`revgrad.PlainSequential` without memory saving): ``Squeeze`` then ``depth`` times
            ``ActNorm -> InvertibleConv1x1(lu=True) -> coupling``.
        priors: ``None`` (standard normal) or one :class:`SplitPrior` per split level and a
            :class:`TopPrior` last.
        latent_shapes: ``(C, H, W)`` of each level's latent.

    Shapes: ``x: [B, in_channels, H, W]`` (``H, W`` divisible by ``2**levels``); ``c: [B, condition_dim]``
    when the model is conditional (a one-hot class, an embedding), else ``None``. ``log_prob(x, c)`` and
    ``forward(x, c)``: ``[B]`` in nats.
    """

    def __init__(
        self,
        levels: nn.ModuleList,
        priors: nn.ModuleList | None,
        latent_shapes: list[tuple[int, int, int]],
        input_shape: tuple[int, int, int],
        condition_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.levels = levels
        self.priors = priors
        self.latent_shapes = [tuple(s) for s in latent_shapes]
        self.input_shape = tuple(input_shape)
        self.condition_dim = condition_dim

    # -- helpers ----------------------------------------------------------------------------------

    def _condition(self, c: torch.Tensor | None, batch: int, dtype: torch.dtype) -> tuple:
        """The chains' extra arguments: ``(c,)`` for a conditional model, ``()`` otherwise; checks ``c``."""
        if self.condition_dim is None:
            if c is not None:
                raise ValueError("revgrad: this Glow is not conditional (condition_dim=None) but got a condition c")
            return ()
        if c is None:
            raise ValueError(f"revgrad: this Glow is conditional: pass c of shape [B, {self.condition_dim}]")
        if c.dim() != 2 or c.shape[1] != self.condition_dim or c.shape[0] != batch:
            raise ValueError(
                f"revgrad: Glow expects a condition c of shape [{batch}, {self.condition_dim}], got {tuple(c.shape)}"
            )
        return (c.to(dtype),)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"revgrad: Glow expects x of shape [B, {', '.join(map(str, self.input_shape))}], got {tuple(x.shape)}"
            )

    def _prior(self, level: int, kept: torch.Tensor | None, cargs: tuple):
        """``(mean, log_std)`` of level ``level``'s latent, or ``(None, None)`` for the standard normal."""
        if self.priors is None:
            return None, None
        c = cargs[0] if cargs else None
        if level == len(self.levels) - 1:
            return self.priors[level](c)
        return self.priors[level](kept, c)

    def _encode(self, x: torch.Tensor, c: torch.Tensor | None):
        """``(latents, sum of logdets [B], base log-density [B])``."""
        self._check_input(x)
        cargs = self._condition(c, x.shape[0], x.dtype)
        latents: list[torch.Tensor] = []
        logdet = x.new_zeros(x.shape[0])
        log_base = x.new_zeros(x.shape[0])
        h = x
        last = len(self.levels) - 1
        for level, chain in enumerate(self.levels):
            out = chain(h, *cargs)
            if isinstance(out, tuple):
                h, ld = out
                logdet = logdet + ld
            else:
                h = out
            if level < last:
                half = h.shape[1] // 2
                kept, z = h[:, :half], h[:, half:]
                mean, log_std = self._prior(level, kept, cargs)
                h = kept
            else:
                z = h
                mean, log_std = self._prior(level, None, cargs)
            latents.append(z)
            log_base = log_base + _gaussian_log_density(z, mean, log_std)
        return latents, logdet, log_base

    def _reference(self) -> torch.Tensor:
        for p in self.parameters():
            return p
        raise RuntimeError("revgrad: Glow has no parameters")

    # -- the API ----------------------------------------------------------------------------------

    def log_prob(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(x | c)`` in nats, ``[B]``: the sum of every block's logdet and of the latents' base
        log-densities."""
        _, logdet, log_base = self._encode(x, c)
        return logdet + log_base

    forward = log_prob

    def bits_per_dim(self, x: torch.Tensor, c: torch.Tensor | None = None, bins: int = 256) -> torch.Tensor:
        """``(-mean log p(x) + D ln(bins)) / (D ln 2)`` over the batch (a scalar), ``D = C H W``: the
        discrete negative log-likelihood in bits per dimension of data in ``[0, 1)`` dequantized from
        ``bins`` levels (:func:`dequantize`; no noise is added here)."""
        d = x[0].numel()
        return (-self.log_prob(x, c).mean() + d * math.log(bins)) / (d * math.log(2.0))

    def encode(self, x: torch.Tensor, c: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The latents, one per level: ``[B, *latent_shapes[l]]``."""
        return self._encode(x, c)[0]

    def decode(self, latents: list[torch.Tensor], c: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` from the latents (``encode``'s inverse), through each level's chain ``inverse``."""
        if len(latents) != len(self.levels):
            raise ValueError(
                f"revgrad: Glow.decode needs {len(self.levels)} latents (one per level), got {len(latents)}"
            )
        h = latents[-1]
        cargs = self._condition(c, h.shape[0], h.dtype)
        for level in reversed(range(len(self.levels))):
            if level < len(self.levels) - 1:
                h = torch.cat([h, latents[level]], dim=1)
            h = self.levels[level].inverse(h, *cargs)
        return h

    def sample(
        self,
        n: int,
        c: torch.Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``n`` samples ``[n, *input_shape]``: every latent drawn from its prior with its std times
        ``temperature`` (0: the prior means), from ``generator`` (the global RNG when ``None``), and
        decoded level by level (a split prior needs the kept half decoded below it)."""
        ref = self._reference()
        cargs = self._condition(c, n, ref.dtype)
        last = len(self.levels) - 1

        def draw(level: int, kept: torch.Tensor | None) -> torch.Tensor:
            shape = (n, *self.latent_shapes[level])
            eps = torch.randn(shape, generator=generator, dtype=ref.dtype, device=ref.device) * temperature
            mean, log_std = self._prior(level, kept, cargs)
            return eps if mean is None else mean + torch.exp(log_std) * eps

        h = draw(last, None)
        for level in reversed(range(len(self.levels))):
            if level < last:
                h = torch.cat([h, draw(level, h)], dim=1)
            h = self.levels[level].inverse(h, *cargs)
        return h


def glow(
    in_channels: int,
    image_size: int | tuple[int, int],
    levels: int = 3,
    depth: int = 8,
    hidden: int = 128,
    coupling: Literal["affine", "additive"] = "affine",
    scale: Literal["sigmoid", "exp"] = "sigmoid",
    prior: Literal["standard", "learned"] = "standard",
    condition_dim: int | None = None,
    *,
    memory_saving: bool = True,
    check: str = "correct",
) -> Glow:
    """Glow (Kingma & Dhariwal 2018) as a density model; see :class:`Glow` and :mod:`revgrad.models.flow`.

    Args:
        in_channels, image_size: the input ``[B, in_channels, H, W]`` (``image_size``: ``H = W`` or
            ``(H, W)``, divisible by ``2**levels``).
        levels: multi-scale levels (a squeeze each; a split after each but the last).
        depth: flow steps per level (``ActNorm -> InvertibleConv1x1(lu=True) -> coupling``).
        hidden: width of the coupling networks (``Conv3x3 -> ReLU -> Conv1x1 -> ReLU -> Conv3x3``, last
            conv at zero so each coupling starts as the identity).
        coupling: ``"affine"`` (:class:`revgrad.AffineCoupling` with ``scale``) or ``"additive"``.
        scale: the affine coupling's scale, ``"sigmoid"`` (Glow's) or ``"exp"`` (RealNVP's).
        prior: ``"standard"`` (standard normal latents) or ``"learned"`` (Glow's split and top priors).
        condition_dim: ``K`` for a conditional model: every coupling network (and the learned priors)
            gets ``c: [B, K]`` broadcast over the positions; ``None``: unconditional.
        memory_saving: each level's blocks in a :class:`revgrad.ReversibleSequential` with ``check``;
            ``False``: :class:`revgrad.PlainSequential` (plain autograd, the same ``state_dict`` keys).
    """
    if coupling not in ("affine", "additive"):
        raise ValueError(f"revgrad: glow coupling must be 'affine' or 'additive', got {coupling!r}")
    if scale not in ("sigmoid", "exp"):
        raise ValueError(f"revgrad: glow scale must be 'sigmoid' or 'exp', got {scale!r}")
    if prior not in ("standard", "learned"):
        raise ValueError(f"revgrad: glow prior must be 'standard' or 'learned', got {prior!r}")
    if levels < 1 or depth < 1 or in_channels < 1 or hidden < 1:
        raise ValueError(
            f"revgrad: glow needs levels, depth, in_channels and hidden >= 1, got {levels}, {depth}, {in_channels}, "
            f"{hidden}"
        )
    if condition_dim is not None and (isinstance(condition_dim, bool) or condition_dim < 1):
        raise ValueError(f"revgrad: glow condition_dim must be None or >= 1, got {condition_dim!r}")
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if height % 2**levels or width % 2**levels:
        raise ValueError(
            f"revgrad: glow needs an image size divisible by 2**levels = {2**levels}, got {(height, width)}"
        )

    chains: list[nn.Module] = []
    priors: list[nn.Module] = []
    latent_shapes: list[tuple[int, int, int]] = []
    c, h, w = in_channels, height, width
    for level in range(levels):
        c, h, w = 4 * c, h // 2, w // 2
        c1, c2 = c // 2, c - c // 2
        blocks: list[nn.Module] = [L.Squeeze(2)]
        for _ in range(depth):
            blocks.append(L.ActNorm(c))
            blocks.append(L.InvertibleConv1x1(c, lu=True))
            if coupling == "affine":
                blocks.append(AffineCoupling(ConditionedNet(c1, 2 * c2, hidden, condition_dim), scale=scale))
            else:
                blocks.append(AdditiveCoupling(ConditionedNet(c2, c1, hidden, condition_dim),
                                               ConditionedNet(c1, c2, hidden, condition_dim)))
        chains.append(ReversibleSequential(*blocks, check=check) if memory_saving else PlainSequential(*blocks))
        if level < levels - 1:
            keep = c // 2
            latent_shapes.append((c - keep, h, w))
            if prior == "learned":
                priors.append(SplitPrior(keep, c - keep, condition_dim))
            c = keep
        else:
            latent_shapes.append((c, h, w))
            if prior == "learned":
                priors.append(TopPrior(c, condition_dim))
    return Glow(
        nn.ModuleList(chains), nn.ModuleList(priors) if prior == "learned" else None, latent_shapes,
        (in_channels, height, width), condition_dim,
    )
