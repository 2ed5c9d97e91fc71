"""The largest batch whose training step fits a fixed memory budget, per provider: the headline.

    python -m pytest bench/test_bench_largest_batch.py --benchmark-disable      # tiny budget
    REVGRAD_BENCH_FULL=1 python -m pytest bench/test_bench_largest_batch.py --benchmark-only

Group ``largest-batch``: the benchmark times the search; ``extra_info`` holds ``largest_batch``,
``budget_bytes`` and the stage depth. A step fits when its input plus its peak bytes (above the
weights) stay within the budget: on CUDA ``max_memory_allocated`` (an out-of-memory error counts as
not fitting), on CPU the bytes counted by glibc (nothing is limited, only counted).
"""

from __future__ import annotations

import pytest
import torch
from suite import BUDGET_DEPTH, BUDGET_MIB, DEVICE_PARAMS, IGNORE_MEMCNN_WARNING, PROVIDER_PARAMS, runnable, stage

from revgrad.tools.benchrun import largest_batches
from revgrad.tools.memory import cpu_counting_available

pytestmark = [
    IGNORE_MEMCNN_WARNING,
    pytest.mark.skipif(not cpu_counting_available(), reason="needs glibc mallinfo2 to count CPU bytes"),
]

BUDGET = int(BUDGET_MIB * 2**20)


@pytest.mark.benchmark(group="largest-batch")
@DEVICE_PARAMS
@PROVIDER_PARAMS
def test_largest_batch(benchmark, provider: str, device: str) -> None:
    workload = stage(BUDGET_DEPTH)
    runnable(provider, workload, device)

    def search() -> int:
        return largest_batches(workload, [provider], BUDGET, torch.device(device))[provider]

    batch = benchmark.pedantic(search, rounds=1, iterations=1)
    benchmark.extra_info.update(largest_batch=batch, budget_bytes=BUDGET, depth=BUDGET_DEPTH, device=device)
    assert batch >= 1, f"{provider}: not even a batch of 1 fits {BUDGET_MIB} MiB"


@DEVICE_PARAMS
def test_memory_saving_fits_larger_batches_than_plain(device: str) -> None:
    workload = stage(BUDGET_DEPTH)
    found = largest_batches(workload, ["plain", "revgrad-off", "revgrad-correct"], BUDGET, torch.device(device))
    assert found["revgrad-off"] > found["plain"], found
    assert found["revgrad-correct"] > found["plain"], found
