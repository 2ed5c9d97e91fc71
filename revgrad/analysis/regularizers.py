"""Training regularizers for local invertibility: the bidirectional finite-difference penalty.

Memory-saving backprop rebuilds activations with the inverse, so it only needs the network to be
invertible *near the training data*. The finite-difference penalty (Behrmann et al., "Understanding
and mitigating exploding inverses in invertible neural networks", 2021) keeps the forward and inverse
Jacobians bounded there with a few extra forward / inverse evaluations and no double backprop, so it
also works on a :class:`revgrad.ReversibleSequential` in memory-saving mode, in both directions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["PenaltySchedule", "finite_difference_penalty"]

Direction = Literal["forward", "inverse", "both"]
_DIRECTIONS = ("forward", "inverse", "both")


def _output(out) -> torch.Tensor:
    """``y`` from ``y`` or ``(y, logdet)``."""
    return out[0] if isinstance(out, tuple) else out


def _unit_directions(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One random direction per sample, of unit L2 norm over all non-batch dimensions.

    Drawn as a standard normal (so uniform on the sphere) in ``like``'s dtype, from ``generator`` on
    the generator's device (then moved to ``like``'s), or from the global RNG of ``like``'s device.
    """
    dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
    if generator is None:
        v = torch.randn(like.shape, dtype=dtype, device=like.device)
    else:
        v = torch.randn(like.shape, dtype=dtype, device=generator.device, generator=generator).to(like.device)
    norm = torch.linalg.vector_norm(v.flatten(1).to(_acc(dtype)), dim=1).clamp_min(1e-30)
    return (v / norm.to(dtype).view(-1, *([1] * (v.dim() - 1)))).detach()


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mean_sq_diff(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """``mean_b ||a_b - b_b||^2 / eps^2``, accumulated in float32 (float64 for float64 inputs)."""
    acc = _acc(a.dtype)
    return (a.to(acc) - b.to(acc)).flatten(1).square().sum(1).mean() / (eps * eps)


def finite_difference_penalty(
    model: nn.Module,
    x: torch.Tensor,
    eps: float = 0.1,
    direction: Direction = "both",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The bidirectional finite-difference penalty: a scalar, differentiable w.r.t. the parameters.

    With ``z = F(x)`` and random unit directions ``v`` (per sample, unit L2 norm over all non-batch
    dimensions) and ``v'`` (same, in ``z``'s shape)::

        forward term = mean_b ||F(x + eps v) - F(x)||^2 / eps^2           ~ ||J_F(x) v||^2
        inverse term = mean_b ||F^-1(z + eps v') - F^-1(z)||^2 / eps^2    ~ ||J_F^-1(z) v'||^2

    ``direction="both"`` returns their sum. These estimate the *squared* Jacobian-vector norms as
    written (exactly so for a linear ``F``). The paper's reference code divides by ``eps`` rather
    than ``eps^2`` and normalizes the direction differently, so its numbers (and a good ``weight``)
    differ from this function's by a constant factor.

    The inverse term evaluates ``F^-1`` at ``z`` as well rather than reusing ``x``, so the difference
    measures the inverse's Jacobian only, not its reconstruction error. ``z`` is not detached: the
    gradient is that of the penalty as a function of the parameters (through both ``F`` and ``F^-1``),
    which is what central finite differences of the penalty give. No double backprop is used; on a
    :class:`revgrad.ReversibleSequential` every evaluation (``forward`` and ``inverse``) runs with
    memory-saving backprop.

    Args:
        model: a module with ``forward(x) -> y`` or ``(y, logdet)`` (the logdet is ignored) and, for
            the inverse term, ``inverse(y) -> x``.
        x: the input batch, ``[B, ...]`` (a floating-point tensor).
        eps: the finite-difference step (> 0); the paper used 0.1.
        direction: ``"forward"``, ``"inverse"`` or ``"both"``.
        generator: draws the directions (``v`` first, then ``v'`` for ``"both"``). ``None`` draws
            from the global RNG of ``x``'s device, as dropout does: this advances the global RNG
            state; pass a ``torch.Generator`` to keep the penalty reproducible and the global stream
            untouched.

    Returns:
        A 0-dim tensor in float32 (float64 for float64 models).
    """
    if direction not in _DIRECTIONS:
        raise ValueError(f"revgrad: direction must be one of {_DIRECTIONS}, got {direction!r}")
    if not eps > 0:
        raise ValueError(f"revgrad: eps must be positive, got {eps}")
    if direction != "forward" and not callable(getattr(model, "inverse", None)):
        raise TypeError(
            f"revgrad: the inverse term needs model.inverse; {type(model).__name__} has none (use direction='forward')"
        )
    z = _output(model(x))
    total: torch.Tensor | None = None
    if direction in ("forward", "both"):
        v = _unit_directions(x, generator)
        total = _mean_sq_diff(_output(model(x + eps * v)), z, eps)
    if direction in ("inverse", "both"):
        v_inv = _unit_directions(z, generator)
        base = _output(model.inverse(z))
        moved = _output(model.inverse(z + eps * v_inv))
        term = _mean_sq_diff(moved, base, eps)
        total = term if total is None else total + term
    assert total is not None
    return total


@dataclass
class PenaltySchedule:
    """Adds the finite-difference penalty every ``every`` steps, as the paper did (every 10 steps).

    ``schedule(step, model, x)`` returns ``weight * finite_difference_penalty(model, x, eps,
    direction, generator)`` when ``step % every == 0`` (so step 0 counts) and otherwise a zero
    0-dim tensor on ``x``'s device (no model evaluation, no gradient), so ``loss = loss +
    schedule(step, model, x)`` works on every step.

    Attributes:
        every: apply the penalty on every ``every``-th step (>= 1).
        weight: the factor on the penalty (>= 0).
        eps, direction, generator: passed to :func:`finite_difference_penalty`.
    """

    every: int = 10
    weight: float = 1.0
    eps: float = 0.1
    direction: Direction = "both"
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"revgrad: every must be a positive integer, got {self.every!r}")
        if not self.weight >= 0:
            raise ValueError(f"revgrad: weight must be >= 0, got {self.weight}")
        if self.direction not in _DIRECTIONS:
            raise ValueError(f"revgrad: direction must be one of {_DIRECTIONS}, got {self.direction!r}")
        if not self.eps > 0:
            raise ValueError(f"revgrad: eps must be positive, got {self.eps}")

    def active(self, step: int) -> bool:
        """Whether the penalty is applied at ``step``."""
        return step % self.every == 0

    def __call__(self, step: int, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.active(step) or self.weight == 0:
            return torch.zeros((), dtype=_acc(x.dtype), device=x.device)
        penalty = finite_difference_penalty(model, x, self.eps, self.direction, self.generator)
        return self.weight * penalty
