"""Gradient-aware checks: how close a rebuilt activation must be for the gradients that use it.

A fingerprint check bounds the relative distance ``e`` between a rebuilt activation and the true one.
What the user cares about is the gradient: a block's VJP evaluated at a rebuilt activation moves by
about ``s * e`` relative, where ``s`` is the VJP's *sensitivity* to that activation. Most blocks have
``s`` of order 1, and ``e <= tol`` keeps their VJP within ``tol``. A block whose VJP is very sensitive
(a conditioner with sharp curvature, a saturated scale) turns an ``e`` of float32 rounding size into a
gradient error thousands of times larger while every check passes.

So each activation ``h`` gets its own tolerance ``tol * BUDGET / s(h)`` (never looser than ``tol``), with
``s(h)`` the largest sensitivity among the VJPs that are computed from ``h``: the block that takes
``h`` as input when its VJP is a recompute from its input, and the block that produced ``h`` when its
VJP is a fused closure built from its output (couplings differentiate at their trusted output).

``s`` is measured by a *probe*, in the first backward and then every ``every`` backward passes: the
VJP is computed a second time at the activation moved by ``eps = tol`` (relative, per sample) along a
random direction, ``s = ||VJP' - VJP|| / ||VJP|| / eps``, over the input gradient and the block's
parameter gradients together. On a probe step an activation already found too far for its new
tolerance is replaced by the exact one before its VJP is used; in between, the stored ``s`` sets the
checks' tolerances and a failed check corrects as any other.

This bounds each VJP's error to about ``BUDGET * tol`` (relative: 1e-4 in float32) at the
sensitivities last measured; it does
not bound how the backward chain itself amplifies errors (plain autograd's gradient goes through the
same chain), and a sensitivity that grows between probes is caught at the next probe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["BUDGET", "DEFAULT_PROBE_EVERY", "Sensitivity", "all_finite", "perturbed", "relative_change"]

DEFAULT_PROBE_EVERY = 20
# A VJP may move by BUDGET * tol (relative) when its activation moves by its tolerance. A random
# direction overstates the sensitivity to the errors rebuilds actually make (BatchNorm'd RevNet blocks
# measure s ~ 10-200 where their gradient moves ~5x the activation's error): a budget of 1 would
# correct healthy chains; 10 leaves them alone and still catches the sensitive blocks (s in the
# thousands, where float32 rounding becomes a gradient error of 1e-3).
BUDGET = 1.0
# The smallest move a probe makes, as a fraction of tol (1e-7 in float32: about a rounding).
SMALLEST_MOVE = 1e-2
# Random directions per probe; the largest change counts.
DIRECTIONS = 2
_SEED = 0x5E45_17


@dataclass
class Sensitivity:
    """Per run of blocks: the VJP sensitivity of each activation and when to measure it again.

    ``values[j]``: the largest sensitivity measured at the last probe among the VJPs computed from
    block ``j``'s input activation (``j = N``: the chain's output, always exact, never stored).
    """

    every: int = DEFAULT_PROBE_EVERY
    steps: int = 0
    values: dict[int, float] = field(default_factory=dict)
    _pending: dict[int, float] = field(default_factory=dict)
    _skipped: bool = False  # this pass met a gradient that was not finite: nothing measured there
    _again: bool = False  # the next pass probes (the last probe was skipped somewhere)

    def probing(self) -> bool:
        """Whether the backward pass now starting probes (the first one, then every ``every``, and the
        one after a probe that met non-finite gradients)."""
        return self.every > 0 and (self._again or self.steps % self.every == 0)

    def skip(self) -> None:
        """A VJP to probe was not finite (an fp16 step whose gradients overflowed, which a GradScaler
        then skips): a sensitivity measured there means nothing, so probe again in the next backward."""
        self._skipped = True

    def tol(self, j: int, base: float) -> float:
        """The tolerance of activation ``j``: ``base * BUDGET / s``, never above ``base``."""
        s = self.values.get(j)
        return base if s is None or not s > BUDGET else base * BUDGET / s

    def observe(self, j: int, s: float) -> None:
        """One probe's sensitivity of a VJP computed from activation ``j`` (this pass)."""
        if math.isnan(s):
            s = math.inf
        self._pending[j] = max(s, self._pending.get(j, 0.0))

    def finish(self, probed: bool) -> None:
        """End of a backward pass: a probe's measurements replace the previous ones (activations the
        probe could not measure, for hooks, keep theirs)."""
        if probed:
            self.values = {**self.values, **self._pending}
            self._pending = {}
            self._again, self._skipped = self._skipped, False
        self.steps += 1


def perturbed(h: torch.Tensor, eps: float, step: int) -> torch.Tensor:
    """``h`` moved by ``eps * ||h_b||`` along a random unit direction per sample ``b``.

    The direction comes from a private generator (seeded by ``step``): the caller's random numbers
    are neither used nor advanced.
    """
    gen = torch.Generator(device=h.device).manual_seed(_SEED + step)
    v = torch.randn(h.shape, generator=gen, device=h.device, dtype=torch.float32)
    flat_v = v.reshape(h.shape[0], -1)
    flat_h = h.detach().reshape(h.shape[0], -1).float()
    scale = eps * torch.linalg.vector_norm(flat_h, dim=1) / torch.linalg.vector_norm(flat_v, dim=1).clamp_min(1e-30)
    return (flat_h + flat_v * scale[:, None]).reshape(h.shape).to(h.dtype)


def all_finite(tensors: list[torch.Tensor | None]) -> bool:
    """Whether every tensor present is finite (one host read for all of them)."""
    present = [t.detach() for t in tensors if t is not None]
    if not present:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in present]).all())


def relative_change(new: list[torch.Tensor | None], old: list[torch.Tensor | None]) -> float:
    """``||new - old|| / ||old||`` over all the tensors present in both, in float64."""
    num = den = 0.0
    for a, b in zip(new, old):
        if a is None or b is None:
            continue
        a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
        num += float(torch.linalg.vector_norm(a64 - b64)) ** 2
        den += float(torch.linalg.vector_norm(b64)) ** 2
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)
