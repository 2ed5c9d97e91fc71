"""The errors the engine raises: each names the block (``block 3 (AdditiveCoupling)``) and the cause."""

from __future__ import annotations

from .checks import MEASURED_EXACTLY

__all__ = ["BlockError", "ReconstructionError"]


class BlockError(RuntimeError):
    """A block broke the protocol: wrong output type, shape, dtype, or a non-invertible module."""


class ReconstructionError(RuntimeError):
    """A rebuilt block input disagreed with the fingerprint stored in forward (``check="detect"``)."""

    def __init__(self, block: int, block_type: str, error: float, tol: float, why: str | None = None) -> None:
        self.block = block
        self.block_type = block_type
        self.error = error
        self.tol = tol
        why = why or "its inverse is numerically unstable here"
        # Errors far above the tolerance are measured as a lower bound (stored fingerprints keep
        # residues, revgrad.engine.checks).
        at_least = "at least " if error > MEASURED_EXACTLY * tol else ""
        super().__init__(
            f"revgrad: block {block} ({block_type}) rebuilt its input with relative error {at_least}{error:.3g} "
            f"(tolerance {tol:.3g}); {why}. Use check='correct' to recompute such inputs exactly "
            "from stored anchors."
        )
