"""Anchors: block inputs stored exactly in forward, the ground truth a failed check recomputes from.

Regular anchors sit at block 0 and every ``k`` blocks (default ``k = ceil(sqrt(N))``), so a
correction recomputes at most ``k - 1`` blocks and the chain holds about ``N / k`` activations.

Adaptive anchors: a block whose rebuilt input failed the check in one step is likely to fail in the
next, and each failure costs a recomputation from the anchor below. Such a block's input is stored
in the following steps too, while the bytes of all adaptive anchors stay within a budget. Backward
still rebuilds that input through the inverse and compares it with the stored one (free for fused
couplings, whose inverse is also their recompute), and the anchor is released after
``release_after`` consecutive clean steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["AdaptiveAnchors", "regular_anchors"]


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

    @property
    def indices(self) -> frozenset[int]:
        return frozenset(self.clean_runs)

    def _budget(self, regular_bytes: int, candidate_bytes: int) -> int:
        if self.budget_bytes is not None:
            return self.budget_bytes
        return max(regular_bytes, candidate_bytes)

    def promote(self, index: int, nbytes: int, regular_bytes: int) -> bool:
        """Keep ``index``'s input from the next step on, if the budget allows. Returns whether it does."""
        if index in self.clean_runs:
            self.clean_runs[index] = 0
            return True
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
