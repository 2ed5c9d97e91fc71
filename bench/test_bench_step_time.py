"""Step time and throughput (images/s) on RevNet-38/110/164 and a Glow stage, every provider; and the
check that every provider computes plain autograd's gradients there.

    python -m pytest bench/test_bench_step_time.py --benchmark-disable    # tiny, every step once
    REVGRAD_BENCH_FULL=1 python -m pytest bench/test_bench_step_time.py --benchmark-only

Groups: ``step-time-revnet38``, ``step-time-revnet110``, ``step-time-revnet164``,
``step-time-glow-stage``; ``extra_info`` holds the batch, ``images_per_s``, ``held_bytes`` and
``peak_bytes``. memcnn and RevLib are skipped on the Glow stage: their wrappers express additive
couplings only. pytest-benchmark runs one provider after the other; for ratios on a noisy machine
use ``bench/report.py models``, which interleaves them.
"""

from __future__ import annotations

import pytest
from suite import DEVICE_PARAMS, IGNORE_MEMCNN_WARNING, PROVIDER_PARAMS, bench_step, models

from revgrad.tools.benchmark import PROVIDERS, Workload, compare_with_plain, glow_stage, revnet_model

pytestmark = IGNORE_MEMCNN_WARNING

WORKLOADS = {w.name: w for w in models()}


def _group(workload: Workload) -> str:
    return "step-time-" + ("glow-stage" if workload.name.startswith("glow") else workload.name)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.benchmark(group=_group(w))) for n, w in WORKLOADS.items()]
)
@DEVICE_PARAMS
@PROVIDER_PARAMS
def test_step_time(benchmark, provider: str, device: str, name: str) -> None:
    bench_step(benchmark, WORKLOADS[name], provider, device)


# Tiny float64 copies of the same workloads: same structure, so the same code paths.
EXACT = [revnet_model(n, batch=2, size=8) for n in ("revnet38", "revnet110", "revnet164")] + [
    glow_stage(steps=3, channels=4, size=4, hidden=8, batch=2)
]


@pytest.mark.parametrize("workload", EXACT, ids=[w.name for w in EXACT])
def test_every_provider_computes_plain_autograds_gradients(workload: Workload) -> None:
    agreements = compare_with_plain(workload, PROVIDERS, fp32=False)
    assert "revgrad-off" in agreements and "revgrad-correct" in agreements
    for a in agreements.values():
        assert a.ok_fp64, a.summary()
