"""Test chains: healthy ones, and ones whose inverse explodes, drifts or yields NaN."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

import revgrad
import revgrad.engine.anchors


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


class SmallFastWave(nn.Module):
    """``sin(k h) / k``: values of order ``1/k``, slopes of order 1, curvature of order ``k``."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = float(k)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.k * h) / self.k


def gradient_sensitive_chain(k: float = 1e5, shift: float = 20.0, seed: int = 0) -> nn.Sequential:
    """A chain whose rebuilt activations pass every check while the gradient is far off.

    Block 3 is an affine coupling whose shift (``shift``) is large next to ``x2``: its inverse
    subtracts it again and leaves float32 rounding of about ``eps * shift / |x2|`` (~1e-6 relative,
    under the 1e-5 tolerance). Block 1 is an affine coupling whose conditioner goes through
    :class:`SmallFastWave`: its output and its inverse barely notice an error that small, but the
    gradient of its first convolution's weights is ``k`` times as sensitive to it (the wave's
    curvature). Blocks 0 and 2 flip the channels, so the error lands in the half block 1 conditions
    on. With ``anchor_every >= 4`` only block 0's input is stored and every other activation is rebuilt.
    """
    torch.manual_seed(seed)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    with torch.no_grad():
        conv.bias[:2] = shift
        conv.bias[2:] = 0.0
    drifting = revgrad.AffineCoupling(conv, scale="sigmoid")
    sensitive = revgrad.AffineCoupling(
        nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), SmallFastWave(k), nn.Conv2d(8, 4, 1)), scale="exp"
    )
    return nn.Sequential(Flip(), sensitive, Flip(), drifting)


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


def exploding_chain(depth: int = 12, channels: int = 4, bias: float = -14.0, seed: int = 0) -> nn.Sequential:
    """Glow-style affine couplings whose sigmoid scales saturate near 0 (``s = sigmoid(bias + 2)``).

    ``y2 = (x2 + shift) * s`` with ``shift`` near 1: float32 rounds ``y2`` by about ``eps * |y2|``,
    which the inverse ``x2 = y2 / s - shift`` gives back as ``eps * |x2 + shift|``; past the first
    blocks every activation is about ``shift * s``, so each block's input, even rebuilt from its exact
    output, is off by about ``eps / s`` relative. The default ``s = sigmoid(-12) = 6e-6`` puts that at
    ~1e-2, over 100x the float32 tolerance 1e-5 on any hardware (``reconstruction_error`` measures
    it); rebuilt from the top without anchors the errors compound to inf. The forward stays finite
    (activations ~6e-6). ``bias=-6`` (``s = 0.018``, ~3e-6 per block: below the float32 tolerance,
    unstable only through compounding) is the milder chain of the low-precision tests.
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


def _blocks(chain: nn.Module) -> list[nn.Module]:
    return list(chain) if isinstance(chain, nn.Sequential) else [chain]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _largest_relative_error(rebuilt: torch.Tensor, true: torch.Tensor) -> float:
    """Largest per-sample ``||rebuilt - true|| / ||true||`` in float64; inf if anything is not finite."""
    a = rebuilt.detach().reshape(rebuilt.shape[0], -1).double()
    b = true.detach().reshape(true.shape[0], -1).double()
    err = torch.linalg.vector_norm(a - b, dim=1) / torch.linalg.vector_norm(b, dim=1)
    return float(err.nan_to_num(nan=math.inf).max())


def reconstruction_errors(
    chain: nn.Module,
    x: torch.Tensor,
    *,
    anchors: int | str | None = "outputs",
    autocast: torch.dtype | None = None,
) -> list[float]:
    """Per block, the largest per-sample relative L2 error of its input as the inverses rebuild it.

    The chain runs forward block by block as given (dtype, device, kernels or not: the caller's
    dispatch) on a deep copy (``chain``'s BatchNorm statistics stay as they are), without grad and
    without the engine, so nothing is checked or corrected. ``anchors`` says which outputs are exact
    on the way down:

    - ``"outputs"`` (default): every block is inverted from its exact output. This is the least a
      check sees at a block whose output it trusts exactly (the top, or right below an anchor or a
      correction): the premise of tests that need checks to fail (:func:`assert_unstable`).
    - ``k``, or ``"default"`` for the engine's ``ceil(sqrt(N))``: as the engine with anchors at blocks
      ``0, k, 2k, ...`` and nothing corrected: a block's output is exact at the top and where the block
      above is an anchor, else the input the block above rebuilt; anchored blocks are not rebuilt (0).
    - ``None``: no anchors, every input rebuilt from the top (``check="detect"`` and ``"off"``).

    ``autocast``: forward and inverses under autocast to that dtype. Non-finite errors are inf.
    """
    blocks = _blocks(copy.deepcopy(chain))
    n = len(blocks)
    stored: set[int] = set()  # blocks whose input the engine keeps
    if anchors not in ("outputs", None):
        stored = set(revgrad.engine.anchors.regular_anchors(n, None if anchors == "default" else int(anchors)))
    with torch.no_grad(), torch.autocast(
        x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None
    ):
        inputs = [x.detach()]
        for block in blocks:
            inputs.append(_first(block(inputs[-1])))
        errors = [0.0] * n
        rebuilt = inputs[-1]
        for i in reversed(range(n)):
            if i in stored:  # the engine takes the stored input
                rebuilt = inputs[i]
                continue
            exact = anchors == "outputs" or i + 1 == n or i + 1 in stored
            rebuilt = _first(blocks[i].inverse(inputs[i + 1] if exact else rebuilt))
            errors[i] = _largest_relative_error(rebuilt, inputs[i])
    return errors


def reconstruction_error(chain: nn.Module, x: torch.Tensor, **options) -> float:
    """The largest of :func:`reconstruction_errors` over the blocks."""
    return max(reconstruction_errors(chain, x, **options))


def assert_unstable(chain: nn.Module, x: torch.Tensor, tol: float, margin: float = 100, **options) -> float:
    """Premise of a test that needs reconstruction checks to fail: some block's input, rebuilt from
    its exact output, is off by at least ``margin`` (100) x ``tol`` (options as for
    :func:`reconstruction_errors`)."""
    error = reconstruction_error(chain, x, **options)
    assert error >= margin * tol, (
        f"premise: the chain should be unstable, but its largest reconstruction error {error:.3g} is "
        f"under {margin:g} x tol = {margin * tol:.3g} here; the test cannot show what it claims"
    )
    return error


def assert_healthy(chain: nn.Module, x: torch.Tensor, tol: float, margin: float = 10, **options) -> float:
    """Premise of a test that needs every check to pass (or unchecked backprop to be right): every
    block's rebuilt input is off by at most ``tol / margin`` (options as for
    :func:`reconstruction_errors`; pass the anchors the test's engine has, ``anchors=None`` when it
    has none)."""
    error = reconstruction_error(chain, x, **options)
    assert error <= tol / margin, (
        f"premise: the chain should be healthy, but its largest reconstruction error {error:.3g} is "
        f"over tol / {margin:g} = {tol / margin:.3g} here; the test cannot show what it claims"
    )
    return error
