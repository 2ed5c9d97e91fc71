"""Invertible layers (Glow, Kingma & Dhariwal 2018): ActNorm, invertible 1x1 convolution, channel
permutations and space-to-depth.

All act on ``x: [B, C, ...]`` (any number of trailing dimensions, none included, except
:class:`Squeeze`, which needs ``[B, C, H, W]``). ``S`` below is the number of positions per channel,
the product of the trailing dimensions (``H * W`` for images, 1 for ``[B, C]``).

ActNorm, per-channel scale ``s = exp(log_scale)`` and bias ``b``::

    y = s * (x + b)            x = y / s - b
    logdet = S * sum_c log|s_c|

initialized from the first training batch so that ``y`` has zero mean and unit variance per channel:
``b = -mean(x)``, ``s = 1 / (std(x) + eps)`` (population std over the batch and trailing dims).

Invertible 1x1 convolution, ``W: [C, C]`` applied at every position::

    y[:, i] = sum_j W[i, j] x[:, j]      x = W^{-1} y
    logdet = S * log|det W|

either a plain ``W`` (random orthogonal init, ``log|det W|`` by ``slogdet``) or LU-parametrized::

    W = P @ L @ (U + diag(sign_s * exp(log_s)))      logdet = S * sum(log_s)

with ``P`` a fixed permutation, ``L`` unit lower triangular, ``U`` strictly upper triangular and
``sign_s`` fixed. The inverse inverts the small ``C x C`` matrix once per call.

Shuffle (a fixed random channel permutation), Reverse (channels flipped) and Squeeze (space-to-depth,
``[B, C, H, W] -> [B, C f^2, H/f, W/f]``) are volume-preserving: ``logdet = 0``, so their forward
returns ``y`` only.

None of them is conditioned: ``forward`` and ``inverse`` take and ignore a chain's extra arguments
(a condition ``c``, a mask), so they sit between conditional couplings in one chain.

Bi-Lipschitz bounds (``lipschitz_bounds() -> (Lip forward, Lip inverse)``, in the Euclidean norm of
the whole input): ActNorm ``(max|s|, 1/min|s|)``; 1x1 conv ``(sigma_max(W), 1/sigma_min(W))``;
permutations and squeeze ``(1, 1)``. They are read from the current parameters (one host sync), for
diagnostics, never on the hot path.
"""

from __future__ import annotations

import torch
from torch import nn

from ..engine.protocol import BlockError

__all__ = ["ActNorm", "InvertibleConv1x1", "Reverse", "Shuffle", "Squeeze"]


def _check_channels(layer: nn.Module, x: torch.Tensor, channels: int, what: str = "input") -> None:
    if x.dim() < 2 or x.shape[1] != channels:
        raise BlockError(
            f"revgrad: {type(layer).__name__} expects an {what} of shape [B, {channels}, ...] (channels in "
            f"dim 1); got {tuple(x.shape)}"
        )


def _positions(x: torch.Tensor) -> int:
    """``S``: the number of positions per channel (product of the dims after dim 1; 1 when there are none)."""
    s = 1
    for d in x.shape[2:]:
        s *= d
    return s


def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``v: [C]`` viewed as ``[1, C, 1, ...]`` to broadcast against ``x: [B, C, ...]``."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def _per_sample(value: torch.Tensor, batch: int) -> torch.Tensor:
    """A scalar logdet repeated into a fresh ``[B]`` tensor (not an expanded view)."""
    return value.reshape(1).repeat(batch)


def _apply_matrix(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y[:, i, ...] = sum_j w[i, j] x[:, j, ...]`` for ``x: [B, C, ...]``."""
    return torch.einsum("ij,bj...->bi...", w.to(x.dtype), x)


class ActNorm(nn.Module):
    """Per-channel affine normalization with data-dependent init: ``y = exp(log_scale) * (x + bias)``.

    Args:
        channels: ``C``.
        eps: added to the std at init (``s = 1 / (std + eps)``).

    Shapes: ``x, y: [B, C, ...]``; ``forward(x) -> (y, logdet)`` with ``logdet: [B]`` equal to
    ``S * sum(log_scale)`` (``S`` positions per channel); ``inverse(y) -> x``.

    The first forward in training mode while the ``initialized`` buffer is 0 sets ``bias = -mean(x)``
    and ``log_scale = -log(std(x) + eps)`` per channel (mean and population std over the batch and
    trailing dims), so that this batch comes out with zero mean and unit variance per channel. The
    buffer is saved in ``state_dict``; a loaded, initialized layer is not initialized again. Later
    evaluations of the same forward (revgrad's backward recomputes blocks with their buffers as the
    forward found them) do not initialize again either.

    Lipschitz bounds: ``(max_c s_c, 1 / min_c s_c)``.
    """

    initialized: torch.Tensor

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"revgrad: ActNorm needs at least 1 channel, got {channels}")
        self.channels = int(channels)
        self.eps = float(eps)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        # Host-side copy of the flag: avoids a sync per forward, and is not rolled back when revgrad's
        # backward replays the forward with the buffer as the forward found it (still 0 on the first step).
        self._initialized_host: bool | None = False

    def extra_repr(self) -> str:
        return f"{self.channels}"

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized_host = None  # unknown until the next forward reads the loaded buffer

    def _is_initialized(self) -> bool:
        if not self._initialized_host:
            self._initialized_host = bool(self.initialized.item())
        return self._initialized_host

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set ``bias`` and ``log_scale`` so that ``forward(x)`` has zero mean and unit std per channel."""
        _check_channels(self, x, self.channels)
        dims = [0, *range(2, x.dim())]
        xf = x.detach().to(self.bias.dtype)
        mean = xf.mean(dim=dims)
        std = xf.std(dim=dims, correction=0)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(1)
        self._initialized_host = True

    def forward(self, x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        _check_channels(self, x, self.channels)
        if self.training and not self._is_initialized():
            self.initialize(x)
        y = (x + _per_channel(self.bias, x)) * _per_channel(self.log_scale.exp(), x)
        logdet = self.log_scale.sum() * _positions(x)
        return y, _per_sample(logdet, x.shape[0])

    def inverse(self, y: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        _check_channels(self, y, self.channels)
        return y * _per_channel(torch.exp(-self.log_scale), y) - _per_channel(self.bias, y)

    @torch.no_grad()
    def lipschitz_bounds(self) -> tuple[float | None, float | None]:
        """``(max_c |s_c|, 1 / min_c |s_c|)``: Lipschitz constants of forward and inverse."""
        return float(self.log_scale.max().exp()), float((-self.log_scale.min()).exp())


class InvertibleConv1x1(nn.Module):
    """Glow's invertible 1x1 convolution: ``y = W x`` over channels at every position.

    Args:
        channels: ``C``.
        lu: LU-parametrize ``W = P L (U + diag(sign_s * exp(log_s)))`` (``P``, ``sign_s`` fixed
            buffers; parameters ``lower``, ``upper`` (only their strict triangles are used) and
            ``log_s``); else a plain ``weight: [C, C]``. Both start from a random orthogonal matrix
            (drawn from the global RNG).

    Shapes: ``x, y: [B, C, ...]`` (any trailing dims, none included); ``forward(x) -> (y, logdet)``
    with ``logdet: [B]`` equal to ``S * log|det W|`` (plain: ``slogdet``; LU: ``sum(log_s)``);
    ``inverse(y) -> x`` inverts the ``C x C`` matrix once per call.

    Lipschitz bounds: ``(sigma_max(W), 1 / sigma_min(W))``.
    """

    def __init__(self, channels: int, lu: bool = False) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"revgrad: InvertibleConv1x1 needs at least 1 channel, got {channels}")
        self.channels = int(channels)
        self.lu = bool(lu)
        w0, _ = torch.linalg.qr(torch.randn(channels, channels))
        if not self.lu:
            self.weight = nn.Parameter(w0)
            return
        p, lower, upper = torch.linalg.lu(w0)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.lower = nn.Parameter(torch.tril(lower, -1))
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def extra_repr(self) -> str:
        return f"{self.channels}, lu={self.lu}"

    def matrix(self) -> torch.Tensor:
        """``W: [C, C]`` (differentiable in the parameters)."""
        if not self.lu:
            return self.weight
        eye = torch.eye(self.channels, dtype=self.lower.dtype, device=self.lower.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * self.log_s.exp())
        return self.perm @ lower @ upper

    def log_abs_det(self) -> torch.Tensor:
        """``log|det W|`` (a scalar)."""
        if self.lu:
            return self.log_s.sum()
        return torch.linalg.slogdet(self.weight)[1]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        _check_channels(self, x, self.channels)
        y = _apply_matrix(self.matrix(), x)
        logdet = self.log_abs_det() * _positions(x)
        return y, _per_sample(logdet.to(y.dtype), x.shape[0])

    def inverse(self, y: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        _check_channels(self, y, self.channels)
        return _apply_matrix(torch.linalg.inv(self.matrix()), y)

    @torch.no_grad()
    def lipschitz_bounds(self) -> tuple[float | None, float | None]:
        """``(sigma_max(W), 1 / sigma_min(W))``: Lipschitz constants of forward and inverse."""
        sv = torch.linalg.svdvals(self.matrix().to(torch.float64))
        return float(sv[0]), float(1.0 / sv[-1])


class Shuffle(nn.Module):
    """A fixed random permutation of the channels: ``y[:, i] = x[:, perm[i]]``.

    Args:
        channels: ``C``.
        seed: seeds a private generator for ``perm`` (the global RNG is not touched).

    Shapes: ``x, y: [B, C, ...]``. Volume-preserving: ``forward(x) -> y`` (no logdet). Lipschitz
    bounds ``(1, 1)``.
    """

    perm: torch.Tensor
    inv_perm: torch.Tensor

    def __init__(self, channels: int, seed: int = 0) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"revgrad: Shuffle needs at least 1 channel, got {channels}")
        self.channels = int(channels)
        perm = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def extra_repr(self) -> str:
        return f"{self.channels}"

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        _check_channels(self, x, self.channels)
        return x.index_select(1, self.perm)

    def inverse(self, y: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        _check_channels(self, y, self.channels)
        return y.index_select(1, self.inv_perm)

    def lipschitz_bounds(self) -> tuple[float | None, float | None]:
        """``(1, 1)``: a permutation is an isometry."""
        return 1.0, 1.0


class Reverse(nn.Module):
    """Channels in reverse order: ``y[:, i] = x[:, C - 1 - i]`` (its own inverse).

    Shapes: ``x, y: [B, C, ...]``. Volume-preserving: ``forward(x) -> y``. Lipschitz bounds ``(1, 1)``.
    """

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise BlockError(
                f"revgrad: Reverse flips dim 1 (channels) and needs an input [B, C, ...]; got {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check(x)
        return x.flip(1)

    def inverse(self, y: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check(y)
        return y.flip(1)

    def lipschitz_bounds(self) -> tuple[float | None, float | None]:
        """``(1, 1)``: a permutation is an isometry."""
        return 1.0, 1.0


class Squeeze(nn.Module):
    """Space-to-depth: ``[B, C, H, W] -> [B, C f^2, H/f, W/f]``; the inverse is depth-to-space.

    ``y[b, c f^2 + i f + j, h, w] = x[b, c, h f + i, w f + j]`` for ``0 <= i, j < f``.

    Args:
        factor: ``f`` (>= 1); ``H`` and ``W`` must be divisible by it.

    Volume-preserving: ``forward(x) -> y`` (no logdet). Lipschitz bounds ``(1, 1)``.
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        if int(factor) != factor or factor < 1:
            raise ValueError(f"revgrad: Squeeze factor must be a positive integer, got {factor!r}")
        self.factor = int(factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        f = self.factor
        if x.dim() != 4 or x.shape[2] % f or x.shape[3] % f:
            raise BlockError(
                f"revgrad: Squeeze(factor={f}) needs an input [B, C, H, W] with H and W divisible by {f}; "
                f"got {tuple(x.shape)}"
            )
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // f, f, w // f, f).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(b, c * f * f, h // f, w // f)

    def inverse(self, y: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        f = self.factor
        if y.dim() != 4 or y.shape[1] % (f * f):
            raise BlockError(
                f"revgrad: Squeeze(factor={f}).inverse needs an input [B, C*{f * f}, H, W] with channels "
                f"divisible by {f * f}; got {tuple(y.shape)}"
            )
        b, cff, h, w = y.shape
        c = cff // (f * f)
        y = y.reshape(b, c, f, f, h, w).permute(0, 1, 4, 2, 5, 3)
        return y.reshape(b, c, h * f, w * f)

    def lipschitz_bounds(self) -> tuple[float | None, float | None]:
        """``(1, 1)``: a reshuffle of the elements is an isometry."""
        return 1.0, 1.0
