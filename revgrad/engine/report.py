"""What the last backward pass through a chain measured and did."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["BackwardReport"]


@dataclass
class BackwardReport:
    """Per-backward summary, kept in ``ReversibleSequential.last_report``.

    Attributes:
        errors: per block, the relative reconstruction error measured for its rebuilt input
            (largest over the batch); ``inf`` when the rebuilt input held NaN or Inf; NaN where
            nothing was measured (anchored input, ``check="off"``). Errors above 20 x ``tol`` may be
            a lower bound (stored fingerprints keep residues); a corrected block's is the true one.
        corrected: indices of blocks whose rebuilt input failed the check and was replaced by an
            exact recomputation from an anchor.
        from_adaptive: indices of blocks whose rebuilt input failed the check against the input an
            adaptive anchor stored in forward (which backward uses in any case: no recomputation
            needed; an adaptive anchor's rebuild is measured every ``release_after // 10`` steps, NaN
            in ``errors`` in between). Every block whose error exceeds ``tol`` is in ``corrected`` or here
            (``check="correct"``).
        evaluations: block evaluations spent in backward (inverse or forward, with or without grad).
            Plain reversible backprop spends 1 per fused block and 2 per other block.
        correction_evaluations: of those, the forward evaluations spent recomputing from anchors.
        anchors: indices of the blocks whose input was stored in forward (adaptive ones included).
        check: the check mode in force; tol: the tolerance used.
        num_blocks: how many of the entries are blocks (a merged report of a container with
            non-block children has NaN entries for those children); ``None`` means all.
        deferred: the backward began with its checks deferred: settled together at the end of the
            pass in one comparison and one host sync (while the step before corrected nothing),
            instead of one per checked block.
        rerun: a deferred check failed, so the pass ran again with a check per block (and the
            corrections); ``evaluations`` counts both passes.
        probed: this backward measured the VJPs' sensitivity to their activations
            (:mod:`revgrad.engine.sensitivity`); the probes' evaluations are counted in ``evaluations``.
        sensitivity: on a probed backward, per block, how many times as much (relative) its VJP
            moved as the activation it is computed from (NaN where that activation was exact);
            empty otherwise. A block whose activation was too far for that is corrected.
        drifted: the block (at most one per pass) whose rebuilt input passed its check with more
            than a third of its tolerance and now gets a drift anchor: its input is stored in the
            next steps and used as exact (:mod:`revgrad.engine.anchors`), so rebuilt errors do not
            compound past it.
    """

    errors: list[float]
    corrected: list[int] = field(default_factory=list)
    from_adaptive: list[int] = field(default_factory=list)
    evaluations: int = 0
    correction_evaluations: int = 0
    anchors: list[int] = field(default_factory=list)
    check: str = "off"
    tol: float = math.nan
    num_blocks: int | None = None
    deferred: bool = False
    rerun: bool = False
    probed: bool = False
    sensitivity: list[float] = field(default_factory=list)
    drifted: list[int] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        """Largest measured error; NaN when nothing was measured."""
        return max((e for e in self.errors if not math.isnan(e)), default=math.nan)

    def __str__(self) -> str:
        worst = self.max_error
        return (
            f"BackwardReport(check={self.check!r}, tol={self.tol:.3g}, "
            f"blocks={len(self.errors) if self.num_blocks is None else self.num_blocks}, "
            f"max_error={worst:.3g}, corrected={self.corrected}, "
            + (f"from_adaptive={self.from_adaptive}, " if self.from_adaptive else "")
            + (f"drifted={self.drifted}, " if self.drifted else "")
            + f"evaluations={self.evaluations}, "
            f"correction_evaluations={self.correction_evaluations}, anchors={self.anchors}"
            + (", deferred" if self.deferred else "") + (", rerun" if self.rerun else "")
            + (", probed" if self.probed else "") + ")"
        )
