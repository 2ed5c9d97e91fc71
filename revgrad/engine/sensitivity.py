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

``s`` is measured by a *probe*, in the first backward and then every ``every`` backward passes (twice
as late after each probe that found every ``s`` within a factor 2 of the last, up to ``8 * every``): the
VJP is computed a second time at the activation moved by ``eps`` (relative, per sample: as far as this
pass's rebuild of it is off, at least ``tol / 100``) along a random direction,
``s = ||VJP' - VJP|| / ||VJP|| / eps``, over the input gradient and the block's
parameter gradients together. On a probe step an activation already found too far for its new
tolerance is replaced by the exact one before its VJP is used; in between, the stored ``s`` sets the
checks' tolerances and a failed check corrects as any other.

This bounds each VJP's error to about ``BUDGET * tol`` (relative: 1e-5 in float32) at the
sensitivities last measured; it does not bound how the backward chain itself amplifies errors (plain
autograd's gradient goes through the same chain), and a sensitivity that grows between probes is
caught at the next probe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "BACKOFF", "BUDGET", "DEFAULT_PROBE_EVERY", "GROWTH", "Sensitivity", "all_finite", "perturbed", "relative_change",
]

DEFAULT_PROBE_EVERY = 20
# An activation's tolerance is tol * BUDGET / s: the VJP computed from it moves by at most about
# BUDGET * tol (relative) at the sensitivity measured, since s is measured with a move as large as
# the activation's actual rebuild error (a move of tol would overstate what rebuilds within tolerance
# do to healthy blocks' VJPs: BatchNorm'd RevNet blocks measure s ~ 10-200 at such moves).
BUDGET = 1.0
# The smallest move a probe makes, as a fraction of tol (1e-7 in float32: about a rounding).
SMALLEST_MOVE = 1e-2
# Random directions per probe (the largest change counts). One: a smooth sensitivity shows in every
# direction, and a ReLU network's VJP jumps where a move crosses a kink, which a random move of the
# actual error's size crosses about as often as the rebuild's own error does. (Such a jump is within
# float32 rounding of the truth's kink: plain float32 autograd lands on either side of it, too.) Each
# direction costs one more evaluation of every probed block: a second one doubled the probes' cost.
DIRECTIONS = 1
# Probes back off while the chain holds still: after a probe in which no sensitivity grew by more
# than GROWTH (those at most BUDGET counting as BUDGET, where they tighten nothing; one measured for
# the first time, from BUDGET) and nothing was corrected, the next comes twice as late, up to
# BACKOFF * every; any growth or correction brings back ``every``. A probe costs about one backward
# pass (measured: 0.87x ``off``'s step on the Glow classifier of bench/grad_trust.py, whose
# sensitivities stay within 0.2-5 over its first 600 steps).
GROWTH = 2.0
BACKOFF = 8
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
    interval: int = 0  # backward passes from one probe to the next (``every``, doubled while stable)
    _next: int = 0  # the pass that probes next
    _pending: dict[int, float] = field(default_factory=dict)
    _skipped: bool = False  # this pass met a gradient that was not finite: nothing measured there
    _again: bool = False  # the next pass probes (the last probe was skipped somewhere)

    def probing(self) -> bool:
        """Whether the backward pass now starting probes: the first one, then one every ``interval``
        (``every``, doubled after each probe that found the sensitivities stable, up to
        ``BACKOFF * every``), and the one after a probe that met non-finite gradients."""
        return self.every > 0 and (self._again or self.steps >= self._next)

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

    def finish(self, probed: bool, corrected: bool = False) -> None:
        """End of a backward pass: a probe's measurements replace the previous ones (activations the
        probe could not measure, for hooks, keep theirs) and set when to probe next. ``corrected``: the
        pass corrected a block (the chain is not settled: probe again after ``every``)."""
        if probed:
            # A block measured for the first time counts as stable if its sensitivity tightens nothing.
            stable = bool(self.values) and not corrected and all(
                s <= GROWTH * max(self.values.get(j, BUDGET), BUDGET) for j, s in self._pending.items()
            )
            self.interval = min(2 * max(self.interval, self.every), BACKOFF * self.every) if stable else self.every
            self._next = self.steps + self.interval
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
    # In float64 for a float64 activation: rounded to float32, it would move by ~1e-8 whatever eps
    # (1e-11 at the least), and the sensitivity would read a thousand times too high.
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    v = torch.randn(h.shape, generator=gen, device=h.device, dtype=torch.float32).to(acc)
    flat_v = v.reshape(h.shape[0], -1)
    flat_h = h.detach().reshape(h.shape[0], -1).to(acc)
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
