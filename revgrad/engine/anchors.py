"""Anchors: block inputs stored exactly in forward, the ground truth a failed check recomputes from.

Regular anchors sit at block 0 and every ``k`` blocks (default ``k = ceil(sqrt(N))``), so a
correction recomputes at most ``k - 1`` blocks from one. By default forward stores only block 0's
(the chain's input itself): a clean step holds no other, and the first correction of a backward pass
recomputes from block 0, laying the others on the way (``_Backward._correct``). ``anchor_every=k``
stores them in forward, about ``N / k`` activations held for corrections that never go further back.

Adaptive anchors: a block whose rebuilt input failed the check in one step is likely to fail in the
next, and each failure costs a recomputation from the anchor below. Such a block's input is stored
in the following steps too, while the bytes of all adaptive anchors stay within a budget. Backward
still rebuilds that input through the inverse and compares it with the stored one (free for fused
couplings, whose inverse is also their recompute), and the anchor is released after
``release_after`` consecutive clean steps.

Drift anchors: rebuilt from the top, float32 errors compound along a long chain (each activation is
rebuilt from an output that was itself rebuilt), up to the tolerance before a check fails; a regular
anchor stored in forward would have restarted the rebuild from exact values. So a block whose rebuilt
input passed its check but with more than ``DRIFT`` of its tolerance has its input stored in the
following steps, used as exact (the rebuild restarts there), within the same byte budget, and
released after ``release_after`` steps to measure the drift again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["DRIFT", "AdaptiveAnchors", "regular_anchors"]

# A rebuilt input that passes its check with more than this fraction of its tolerance starts a drift
# anchor (at most one per backward pass: the errors below it grow from it). Measured on float32 chains
# (`python bench/grad_trust.py --drift`): a 53-block healthy chain rebuilt from the top reaches tol
# at block 17, its gradient then 2.6x as far from the float64 truth as plain autograd's (worst
# tensor); drift anchors at 1/2, 1/3, 1/4 of the tolerance bring that to 1.6x, 1.3x, 1.1x. The
# 26-block Glow flow stays below 1/3 of its tolerances (no anchor: what its memory figure rests on)
# and crosses 1/4 at one block.
DRIFT = 1 / 3


def regular_anchors(num_blocks: int, every: int | None) -> frozenset[int]:
    """Indices of the blocks whose input is stored: 0, k, 2k, ... (``every=None``: k = ceil(sqrt(N)))."""
    if num_blocks == 0:
        return frozenset()
    k = every if every is not None else max(1, math.ceil(math.sqrt(num_blocks)))
    if k < 1:
        raise ValueError(f"revgrad: anchor_every must be a positive integer, got {every}")
    return frozenset(range(0, num_blocks, k))


@dataclass
class AdaptiveAnchors:
    """Blocks promoted to anchors after a failed check, and their runs of clean steps.

    Args:
        budget_bytes: most bytes the adaptive anchors may hold together; ``None`` allows as many
            bytes as the regular anchors above block 0 hold (at least one block input).
        release_after: consecutive clean steps after which an adaptive anchor is released.
    """

    budget_bytes: int | None = None
    release_after: int = 100
    clean_runs: dict[int, int] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)
    drift_steps: dict[int, int] = field(default_factory=dict)  # drift anchors: steps held

    @property
    def indices(self) -> frozenset[int]:
        """Anchors promoted after a failed check (their rebuilt input is still measured)."""
        return frozenset(self.clean_runs)

    @property
    def drift_indices(self) -> frozenset[int]:
        """Drift anchors: used as exact, like regular ones."""
        return frozenset(self.drift_steps)

    def drifted(self, index: int, nbytes: int, regular_bytes: int) -> bool:
        """Store ``index``'s input from the next step on (its rebuild drifted), if the budget allows."""
        if index in self.clean_runs or index in self.drift_steps:
            return True
        if sum(self.sizes.values()) + nbytes > self._budget(regular_bytes, nbytes):
            return False
        self.drift_steps[index] = 0
        self.sizes[index] = nbytes
        return True

    def tick(self, used: frozenset[int]) -> None:
        """A backward pass done whose forward stored the drift anchors ``used``: release those held
        ``release_after`` steps."""
        for index in used & self.drift_steps.keys():
            self.drift_steps[index] += 1
            if self.drift_steps[index] >= self.release_after:
                del self.drift_steps[index]
                del self.sizes[index]

    def _budget(self, regular_bytes: int, candidate_bytes: int) -> int:
        if self.budget_bytes is not None:
            return self.budget_bytes
        return max(regular_bytes, candidate_bytes)

    def promote(self, index: int, nbytes: int, regular_bytes: int) -> bool:
        """Keep ``index``'s input from the next step on, if the budget allows. Returns whether it does."""
        if index in self.clean_runs:
            self.clean_runs[index] = 0
            return True
        if index in self.drift_steps:  # a failure outranks drift: its rebuild is measured again
            del self.drift_steps[index]
            del self.sizes[index]
        if sum(self.sizes.values()) + nbytes > self._budget(regular_bytes, nbytes):
            return False
        self.clean_runs[index] = 0
        self.sizes[index] = nbytes
        return True

    def observe(self, index: int, clean: bool) -> None:
        """Record one step's check of an adaptive anchor; release it after enough clean steps."""
        if index not in self.clean_runs:
            return
        if not clean:
            self.clean_runs[index] = 0
            return
        self.clean_runs[index] += 1
        if self.clean_runs[index] >= self.release_after:
            del self.clean_runs[index]
            del self.sizes[index]

    def forget_beyond(self, num_blocks: int) -> None:
        for index in [i for i in self.clean_runs if i >= num_blocks]:
            del self.clean_runs[index]
            del self.sizes[index]
        for index in [i for i in self.drift_steps if i >= num_blocks]:
            del self.drift_steps[index]
            del self.sizes[index]
