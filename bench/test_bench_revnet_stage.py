"""pytest-benchmark version of ``bench/step_time.py``, plus the agreement check it relies on.

    pytest bench/ --benchmark-disable           # smoke test: each step once, plus the check
    pytest bench/ --benchmark-only              # timings, group "revnet-stage-12"

pytest-benchmark runs one provider after another; for a side-by-side comparison on a noisy machine
use ``bench/step_time.py``, which interleaves them.
"""

from __future__ import annotations

import pytest
from revnet_stage import PROVIDERS, Agreement, StageConfig, compare_with_plain, pin_malloc, train_steps, unavailable

CFG = StageConfig()

# memcnn 1.5.2 frees its input with the deprecated TypedStorage API.
pytestmark = pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")


@pytest.fixture(scope="module")
def agreements() -> dict[str, Agreement]:
    return compare_with_plain(CFG)


def _runnable(provider: str) -> str:
    reason = unavailable(provider)
    if reason is not None:
        pytest.skip(reason)
    return provider


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "plain"])
def test_provider_matches_plain(provider: str, agreements: dict[str, Agreement]) -> None:
    a = agreements[_runnable(provider)]
    assert a.error is None, a.summary()
    # float64 is the verdict. In float32 a ReLU input within rounding of zero can flip sign in any
    # provider's recomputation and move one small gradient tensor by 1e-3 relative: that is reported
    # by step_time.py, not asserted.
    assert a.ok_fp64, f"float64 step differs from plain autograd: {a.summary()}"


def test_bn_running_stats_match_plain_for_revgrad(agreements: dict[str, Agreement]) -> None:
    # revgrad shields BatchNorm buffers during its recomputations; the peers update them again.
    for provider in ("revgrad-off", "revgrad-correct"):
        assert agreements[provider].fp64.bn_buffers <= 1e-12, agreements[provider].summary()


@pytest.mark.benchmark(group=f"revnet-stage-{CFG.blocks}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_step_time(benchmark, provider: str) -> None:
    pin_malloc()  # warm pages for every provider, as in step_time.py
    step = train_steps(CFG, (_runnable(provider),))[provider]
    benchmark.pedantic(step.run, setup=step.prepare, rounds=10, warmup_rounds=2)
