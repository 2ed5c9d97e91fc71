"""Keep the top blocks' autograd graphs when a memory budget allows: no recompute for them.

Reversible backprop pays one extra evaluation per block in backward. A block whose forward runs with
plain autograd instead pays nothing extra but holds its graph (the tensors its operations save) until
backward. Given ``graph_budget`` bytes, the last blocks of a chain whose graphs fit together in the
budget run with plain autograd; the rest go through the engine.

A block's graph size is measured, not guessed: while backward recomputes a block with grad (the
graph it builds there is the one its forward would keep), saved-tensor hooks add up the distinct
storages it saves, parameters excluded. Blocks are measured from the top down until the measured
sizes exceed the budget, once per chain input shape; from the next step on, the blocks that fit are
kept. So the first step (and the first step at a new batch shape) runs fully reversible. The budget
counts tensor bytes; the allocator's own overhead comes on top (about 2 % measured on CPU,
``tests/test_graph_budget.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["GraphBudget", "SavedBytes"]


class SavedBytes:
    """Counts the distinct storages saved for backward while active (a ``saved_tensors_hooks``).

    A storage freed meanwhile (a graph released early) and its address reused counts again: in a
    plain forward both would be alive together.
    """

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        self._seen = {t.untyped_storage().data_ptr(): StorageWeakRef(t.untyped_storage()) for t in exclude}
        self.total = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        seen = self._seen.get(ptr)
        if seen is None or seen.expired():
            self._seen[ptr] = StorageWeakRef(storage)
            self.total += storage.nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


@dataclass
class GraphBudget:
    """Measured graph sizes of one chain's blocks and the budget they are kept within.

    Attributes:
        budget: bytes the kept graphs may hold together.
        sizes: ``(block label, chain input shape) -> bytes`` saved by the block's graph.
    """

    budget: int
    sizes: dict[tuple[int, tuple[int, ...]], int] = field(default_factory=dict)
    inputs: dict[tuple[int, tuple[int, ...]], int] = field(default_factory=dict)

    def keep_count(self, labels: list[int], shape: tuple[int, ...]) -> int:
        """How many of the last ``labels`` to run with plain autograd for an input of ``shape``.

        Besides the kept graphs, the input of the lowest kept block counts: it is the engine's output,
        held for the engine's backward, where otherwise only the chain's output is held.
        """
        total = kept = 0
        for label in reversed(labels):
            key = (label, shape)
            size = self.sizes.get(key)
            if size is None or total + size + self.inputs[key] > self.budget:
                break
            total += size
            kept += 1
        return kept

    def meter(self, label: int, shape: tuple[int, ...], above: list[int], block: nn.Module) -> SavedBytes | None:
        """A counter for ``label``'s recompute in backward, if it still needs measuring: unmeasured, and
        the blocks ``above`` it (all measured) still fit in the budget."""
        if (label, shape) in self.sizes:
            return None
        total = 0
        for other in above:
            size = self.sizes.get((other, shape))
            if size is None:
                return None
            total += size
        if total > self.budget:
            return None
        return SavedBytes(list(block.parameters()))

    def record(self, label: int, shape: tuple[int, ...], graph_bytes: int, input_bytes: int) -> None:
        self.sizes[(label, shape)] = graph_bytes
        self.inputs[(label, shape)] = input_bytes
