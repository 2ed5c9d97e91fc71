"""Anchors: block inputs stored exactly in forward, the ground truth a failed check recomputes from.

Regular anchors sit at block 0 and every ``k`` blocks (default ``k = ceil(sqrt(N))``), so a
correction recomputes at most ``k - 1`` blocks from one. By default forward stores only block 0's
(the chain's input itself): a clean step holds no other, and the first correction of a backward pass
recomputes from block 0, laying the others on the way (``_Backward._correct``). ``anchor_every=k``
stores them in forward, about ``N / k`` activations held for corrections that never go further back.

Adaptive anchors: a block whose rebuilt input failed the check in one step is likely to fail in the
next, and each failure costs a recomputation from the anchor below. Such a block's input is stored
in the following steps too, while the bytes of all adaptive anchors stay within a budget. Backward
uses the stored input (it also restarts the rebuild below from exact values), and on one step in
``release_after // 10`` (every 10th by default) also rebuilds it through the inverse, only to measure
it against the stored one: the anchor is released after ``release_after`` consecutive clean steps, so
measured. (Measuring every step cost a block rebuild per anchor and step, 4-6 % of the Glow long run's
step with three anchors held, for a decision that takes 100 steps.)

Drift anchors: rebuilt from the top, float32 errors compound along a long chain (each activation is
rebuilt from an output that was itself rebuilt), up to the tolerance before a check fails; a regular
anchor stored in forward would have restarted the rebuild from exact values. So a block whose rebuilt
input passed its check but with more than ``DRIFT`` of its tolerance has its input stored in the
following steps, used as exact (the rebuild restarts there), within the same byte budget, where a
failing block's adaptive anchor outranks it. One is laid per backward pass (the errors below it grow
from it: the next step measures them again from exact values); one at a time, those used
``release_after`` times are released so their drift is measured again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["DRIFT", "AdaptiveAnchors", "regular_anchors"]

# A rebuilt input that passes its check with more than this fraction of its tolerance starts a drift
# anchor (at most one per backward pass: the errors below it grow from it). Measured on float32 chains
# (`python bench/grad_trust.py --drift`): the tests' 53-block healthy chain, rebuilt from the top,
# reaches tol at block 15 and its gradient ends 3.9x as far from the float64 truth as plain autograd's
# (worst tensor, 9.1e-5 against 2.3e-5); with drift anchors 1.2x (2.7e-5), as with anchors stored
# every 8 blocks. The 26-block Glow flow stays below a third of its tolerances at initialisation (no
# anchor, what its memory figure rests on) and crosses a quarter at one block.
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
        budget_bytes: most bytes the adaptive and drift anchors may hold together; ``None`` allows
            twice the bytes of the regular anchors above block 0 (at least one block input).
        release_after: consecutive clean steps after which an adaptive anchor is released.
    """

    budget_bytes: int | None = None
    release_after: int = 100
    clean_runs: dict[int, int] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)
    drift_steps: dict[int, int] = field(default_factory=dict)  # drift anchors: steps held
    uses: dict[int, int] = field(default_factory=dict)  # adaptive anchors: steps used since promoted

    @property
    def measure_every(self) -> int:
        """How often an adaptive anchor's rebuild is measured: every ``release_after // 10`` uses."""
        return max(1, self.release_after // 10)

    def measuring(self, index: int) -> bool:
        """Whether the backward pass now running measures adaptive anchor ``index``'s rebuild."""
        return (self.uses.get(index, 0) + 1) % self.measure_every == 0

    @property
    def indices(self) -> frozenset[int]:
        """Anchors promoted after a failed check (their rebuilt input is still measured)."""
        return frozenset(self.clean_runs)

    @property
    def drift_indices(self) -> frozenset[int]:
        """Drift anchors: used as exact, like regular ones."""
        return frozenset(self.drift_steps)

    def drifted(self, index: int, nbytes: int, regular_bytes: int) -> bool:
        """Store ``index``'s input from the next step on (its rebuild drifted), if the budget allows.
        Returns whether a new drift anchor was laid."""
        if index in self.clean_runs or index in self.drift_steps:
            return False
        if sum(self.sizes.values()) + nbytes > self._budget(regular_bytes, nbytes):
            return False
        self.drift_steps[index] = 0
        self.sizes[index] = nbytes
        return True

    def tick(self, used: frozenset[int], adaptive_used: frozenset[int] = frozenset()) -> None:
        """A backward pass done whose forward stored the drift anchors ``used`` (and the adaptive ones
        ``adaptive_used``, counted for :meth:`measuring`). Of the drift anchors used ``release_after``
        times, release one (the longest held): the next step measures its drift again, while the
        others still restart the rebuild (all at once would let errors compound along the whole
        chain in that step)."""
        for index in adaptive_used & self.clean_runs.keys():
            self.uses[index] = self.uses.get(index, 0) + 1
        for index in used & self.drift_steps.keys():
            self.drift_steps[index] += 1
        due = [i for i, uses in self.drift_steps.items() if uses >= self.release_after]
        if due:
            self._drop(max(due, key=self.drift_steps.__getitem__))

    def refresh(self, nbytes: dict[int, int], regular_bytes: int) -> None:
        """This step's bytes of the held anchors (the batch may have changed since they were laid):
        while they exceed the budget, release drift anchors (the newest first), then adaptive ones."""
        for index in self.sizes.keys() & nbytes.keys():
            self.sizes[index] = nbytes[index]
        budget = self._budget(regular_bytes, max(self.sizes.values(), default=0))  # one always fits
        while sum(self.sizes.values()) > budget and self.sizes:
            pool = self.drift_steps if self.drift_steps else self.clean_runs
            self._drop(min(pool, key=pool.__getitem__))

    def _drop(self, index: int) -> None:
        self.drift_steps.pop(index, None)
        self.clean_runs.pop(index, None)
        self.uses.pop(index, None)
        del self.sizes[index]

    def _budget(self, regular_bytes: int, candidate_bytes: int) -> int:
        if self.budget_bytes is not None:
            return self.budget_bytes
        # Twice the regular anchors: what the regular and adaptive anchors could hold together when
        # the regular ones were stored in forward; failing blocks and drift both draw on it.
        return max(2 * regular_bytes, candidate_bytes)

    def promote(self, index: int, nbytes: int, regular_bytes: int) -> bool:
        """Keep ``index``'s input from the next step on, if the budget allows. Returns whether it does."""
        if index in self.clean_runs:
            self.clean_runs[index] = self.uses[index] = 0
            return True
        if index in self.drift_steps:  # a failure outranks drift: its rebuild is measured again
            self._drop(index)
        budget = self._budget(regular_bytes, nbytes)
        # Failures outrank drift: drift anchors (the newest first) make room for a failing block.
        while sum(self.sizes.values()) + nbytes > budget and self.drift_steps:
            self._drop(min(self.drift_steps, key=self.drift_steps.__getitem__))
        if sum(self.sizes.values()) + nbytes > budget:
            return False
        self.clean_runs[index] = self.uses[index] = 0
        self.sizes[index] = nbytes
        return True

    def observe(self, index: int, clean: bool) -> None:
        """Record a measurement of an adaptive anchor's rebuild (one every :attr:`measure_every`
        steps, standing for that many); release it after ``release_after`` clean steps."""
        if index not in self.clean_runs:
            return
        if not clean:
            self.clean_runs[index] = 0
            return
        self.clean_runs[index] += self.measure_every
        if self.clean_runs[index] >= self.release_after:
            self._drop(index)

    def forget_beyond(self, num_blocks: int) -> None:
        for index in [i for i in self.sizes if i >= num_blocks]:
            self._drop(index)
