"""Sizes and helpers shared by the pytest-benchmark suites (``bench/test_bench_*.py``).

Tiny sizes by default, so that ``python -m pytest tests bench --benchmark-disable`` (CI) runs every
benchmark once in seconds; ``REVGRAD_BENCH_FULL=1`` selects the real sizes. CUDA is added to the
devices when present (memory from ``torch.cuda.max_memory_allocated`` there). Timed runs
(``--benchmark-only``) warm each step up, then time it for enough rounds to give a median and a
spread (:func:`timed`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from revgrad.tools.benchmark import (
    ALL_PROVIDERS,
    PROVIDERS,
    TrainStep,
    Workload,
    glow_stage,
    rev_vit_model,
    revnet_model,
    revnet_stage,
    transformer_stack,
    unavailable,
)
from revgrad.tools.measure import pin_malloc, step_memory

FULL = os.environ.get("REVGRAD_BENCH_FULL", "") == "1"
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]

# Memory vs depth and batch: the RevNet stage [B, 32, 16, 16] of bench/revnet_stage.py (one activation = B * 32 KiB).
DEPTHS = (8, 16, 32, 64, 128) if FULL else (2, 4, 8)
STAGE = dict(batch=16, channels=32, size=16) if FULL else dict(batch=2, channels=4, size=4)
BATCH_DEPTH = 32 if FULL else 4
BATCHES = (4, 16, 64) if FULL else (1, 2, 4)
# Step time: RevNet-38/110/164 at CIFAR size and a Glow stage, small batches.
MODEL_BATCH, MODEL_SIZE = (16, 32) if FULL else (2, 8)
GLOW = dict(steps=16, channels=12, size=16, hidden=128, batch=16) if FULL else dict(
    steps=2, channels=4, size=4, hidden=8, batch=2)
# Transformers: rev_lm's layers on [B, T, 2d] (rev_lm's default width) and RevViT-S/16 at 224 px.
TRANSFORMER = dict(depth=8, dim=256, tokens=256, heads=4, batch=8) if FULL else dict(
    depth=2, dim=16, tokens=8, heads=2, batch=2)
VIT = dict(depth=12, dim=384, heads=6, size=224, patch=16, batch=8) if FULL else dict(
    depth=2, dim=16, heads=2, size=16, patch=8, batch=2, num_classes=10)
# Largest batch within a byte budget (input + peak of a step), on the stage at BUDGET_DEPTH blocks.
BUDGET_MIB = 512 if FULL else 0.25
BUDGET_DEPTH = 32 if FULL else 4
# Untimed steps before the timed rounds (allocator pages, caches, lazy initialisation); see timed().
WARMUP_ROUNDS = 2

# memcnn 1.5.2 frees its input with the deprecated TypedStorage API.
IGNORE_MEMCNN_WARNING = pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")


def stage(depth: int, batch: int | None = None) -> Workload:
    """The RevNet stage at ``depth`` blocks (and ``batch``, default the suite's)."""
    return revnet_stage(blocks=depth, **(STAGE | ({"batch": batch} if batch else {})))


def models() -> list[Workload]:
    """The step-time workloads: RevNet-38/110/164 and a Glow stage."""
    return [*(revnet_model(name, batch=MODEL_BATCH, size=MODEL_SIZE) for name in ("revnet38", "revnet110",
                                                                                 "revnet164")),
            glow_stage(**GLOW)]


def transformers() -> list[Workload]:
    """The transformer workloads: rev_lm's layer stack and a RevViT."""
    return [transformer_stack(**TRANSFORMER), rev_vit_model(**VIT)]


def runnable(provider: str, workload: Workload, device: str) -> None:
    """Skip the test, saying why, when ``provider`` cannot run ``workload`` here."""
    reason = unavailable(provider, workload)
    if reason is not None:
        pytest.skip(f"{provider} on {workload.name}: {reason}")


def rounds_for(step_seconds: float, min_rounds: int, max_time: float) -> int:
    """Timed rounds for a step that takes ``step_seconds``: enough to fill ``max_time``, at least ``min_rounds``
    (pytest-benchmark's own rule for ``benchmark(...)``)."""
    return max(min_rounds, math.ceil(max_time / max(step_seconds, 1e-9)))


def timed(benchmark, run: Callable[[], None], setup: Callable[[], None] | None = None) -> None:
    """Time ``run`` (``setup`` before each round, untimed) with pytest-benchmark, one step per round.

    With ``--benchmark-disable`` the step runs once: the CI smoke test. Otherwise ``WARMUP_ROUNDS``
    untimed steps come first; the first of them is clocked to size the run, which then takes
    :func:`rounds_for` rounds. pytest-benchmark's ``--benchmark-min-rounds`` (default 5) and
    ``--benchmark-max-time`` (default 1 s), or a test's ``@pytest.mark.benchmark(min_rounds=...,
    max_time=...)``, set the rounds as they do for ``benchmark(...)`` (``benchmark.pedantic`` alone
    ignores them): raise ``--benchmark-max-time`` for more rounds.
    """
    if not benchmark.enabled:
        benchmark.pedantic(run, setup=setup, rounds=1)
        return
    if setup is not None:
        setup()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    rounds = rounds_for(seconds, getattr(benchmark, "_min_rounds", 5), getattr(benchmark, "_max_time", 1.0))
    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=WARMUP_ROUNDS - 1, iterations=1)


def bench_step(benchmark, workload: Workload, provider: str, device: str, **info: Any) -> dict[str, Any]:
    """Time one provider's training step on ``workload`` with pytest-benchmark and record its memory.

    ``benchmark.extra_info`` gets the workload, batch, ``held_bytes``, ``peak_bytes`` and, once timed,
    ``images_per_s`` (batch / median step); returns it.
    """
    runnable(provider, workload, device)
    if device == "cpu":
        pin_malloc()  # warm pages for every provider (see revgrad.tools.measure.pin_malloc)
    step = TrainStep(workload.build(provider, device=device), workload.input(device=device), workload.seed)
    memory = step_memory(step, device)
    extra = benchmark.extra_info
    extra.update(workload=workload.name, provider=provider, device=device, batch=workload.batch,
                 held_bytes=memory.held_bytes, peak_bytes=memory.peak_bytes, **info)

    def run() -> None:
        step.run()
        if device == "cuda":
            torch.cuda.synchronize()

    timed(benchmark, run, setup=step.prepare)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        extra["images_per_s"] = workload.batch / stats.stats.median
    return extra


PROVIDER_PARAMS = pytest.mark.parametrize("provider", PROVIDERS)
# The transformer workloads also offer reformer_pytorch's and revtorch's reversible sequences.
ALL_PROVIDER_PARAMS = pytest.mark.parametrize("provider", ALL_PROVIDERS)
DEVICE_PARAMS = pytest.mark.parametrize("device", DEVICES)
