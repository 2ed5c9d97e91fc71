"""Reversible transformers: step time, memory held and step peak of every provider, from the same weights.

    python -m pytest bench/test_bench_transformer.py --benchmark-disable    # tiny, every step once
    REVGRAD_BENCH_FULL=1 python -m pytest bench/test_bench_transformer.py --benchmark-only

Groups: ``step-time-revlm-stack`` (the layers of ``revgrad.models.rev_lm`` on ``[B, T, 2d]``) and
``step-time-rev-vit`` (``revgrad.models.rev_vit``); ``extra_info`` holds the batch, ``images_per_s``
(samples per second), ``held_bytes`` and ``peak_bytes``. Providers: plain autograd, checkpointing,
revgrad ``check="off"`` / ``"correct"`` and the peers memcnn, RevLib, reformer_pytorch
(``ReversibleSequence``) and revtorch (``ReversibleSequence`` of ``ReversibleBlock``), each wrapping
the very ``SelfAttention`` and ``MLP`` modules of the model; a peer that is not installed is skipped.
pytest-benchmark runs one provider after the other; for ratios on a noisy machine use
``revgrad bench --workload transformer`` (or ``vit``), which interleaves them.
"""

from __future__ import annotations

import pytest
from suite import ALL_PROVIDER_PARAMS, DEVICE_PARAMS, IGNORE_MEMCNN_WARNING, bench_step, transformers

from revgrad.tools.benchmark import (
    ALL_PROVIDERS,
    TrainStep,
    Workload,
    compare_with_plain,
    rev_vit_model,
    transformer_stack,
)
from revgrad.tools.measure import step_memory
from revgrad.tools.memory import cpu_counting_available

pytestmark = IGNORE_MEMCNN_WARNING

WORKLOADS = {w.name: w for w in transformers()}


def _group(workload: Workload) -> str:
    return "step-time-" + workload.name.rsplit("-", 1)[0]


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.benchmark(group=_group(w))) for n, w in WORKLOADS.items()]
)
@DEVICE_PARAMS
@ALL_PROVIDER_PARAMS
def test_step_time(benchmark, provider: str, device: str, name: str) -> None:
    info = bench_step(benchmark, WORKLOADS[name], provider, device)
    if info["peak_bytes"] is not None:
        assert info["peak_bytes"] >= info["held_bytes"]


# Tiny float64 copies: the same layers, so the same code paths (attention, LayerNorm, GELU, couplings on dim -1).
EXACT = [
    transformer_stack(depth=3, dim=16, tokens=8, heads=2, batch=2),
    rev_vit_model(depth=2, dim=16, heads=2, size=16, patch=8, batch=2, num_classes=10),
]


@pytest.mark.parametrize("workload", EXACT, ids=[w.name for w in EXACT])
def test_every_provider_computes_plain_autograds_gradients(workload: Workload) -> None:
    agreements = compare_with_plain(workload, ALL_PROVIDERS, fp32=False)
    assert "revgrad-off" in agreements and "revgrad-correct" in agreements
    for a in agreements.values():
        assert a.ok_fp64, a.summary()


# The memory target on the layer stack, as on the RevNet stage: revgrad holds a small share of plain
# autograd's bytes and check="off" does not grow with depth. One activation [2, 32, 64] is 16 KiB.
@pytest.mark.skipif(not cpu_counting_available(), reason="needs glibc mallinfo2 to count CPU bytes")
def test_memory_saving_holds_little_and_check_off_is_flat_in_depth() -> None:
    held = {}
    for depth in (2, 8):
        w = transformer_stack(depth=depth, dim=32, tokens=32, heads=2, batch=2)
        x = w.input()
        for provider in ("plain", "revgrad-off", "revgrad-correct"):
            held[provider, depth] = step_memory(TrainStep(w.build(provider), x)).held_bytes
    for provider in ("revgrad-off", "revgrad-correct"):
        share = held[provider, 8] / held["plain", 8]
        assert share <= 0.10, f"{provider} holds {100 * share:.1f} % of plain autograd's bytes at 8 layers"
    growth = held["revgrad-off", 8] - held["revgrad-off", 2]
    plain_growth = held["plain", 8] - held["plain", 2]
    assert plain_growth > 0
    assert growth <= 0.05 * plain_growth, f"check='off' grew by {growth} bytes; plain autograd by {plain_growth}"
