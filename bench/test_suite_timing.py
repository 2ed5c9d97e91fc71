"""How the pytest-benchmark suites choose warm-up and rounds (``suite.timed``), without timing anything."""

from __future__ import annotations

import time

from suite import WARMUP_ROUNDS, rounds_for, timed


class _Benchmark:
    """The part of pytest-benchmark's fixture that ``timed`` uses; records what it is asked to do."""

    def __init__(self, enabled: bool, min_rounds: int = 5, max_time: float = 1.0) -> None:
        self.enabled = enabled
        self._min_rounds = min_rounds
        self._max_time = max_time
        self.calls: list[dict] = []

    def pedantic(self, target, setup=None, rounds=1, warmup_rounds=0, iterations=1):
        self.calls.append(dict(rounds=rounds, warmup_rounds=warmup_rounds, iterations=iterations))
        for _ in range(warmup_rounds + rounds):
            if setup is not None:
                setup()
            target()


def test_rounds_fill_max_time_with_at_least_min_rounds() -> None:
    assert rounds_for(0.01, min_rounds=5, max_time=1.0) == 100
    assert rounds_for(3.0, min_rounds=5, max_time=1.0) == 5
    assert rounds_for(0.0, min_rounds=5, max_time=1.0) >= 5


def test_disabled_runs_the_step_once() -> None:
    runs: list[str] = []
    bench = _Benchmark(enabled=False)
    timed(bench, lambda: runs.append("run"), setup=lambda: runs.append("setup"))
    assert runs == ["setup", "run"]
    assert bench.calls == [dict(rounds=1, warmup_rounds=0, iterations=1)]


def test_enabled_warms_up_then_times_several_rounds() -> None:
    runs: list[str] = []

    def step() -> None:
        runs.append("run")
        time.sleep(0.002)

    bench = _Benchmark(enabled=True, min_rounds=5, max_time=0.001)
    timed(bench, step, setup=lambda: runs.append("setup"))
    (call,) = bench.calls
    assert call["rounds"] == 5 and call["iterations"] == 1
    assert call["warmup_rounds"] == WARMUP_ROUNDS - 1
    # every step gets its setup; WARMUP_ROUNDS untimed steps in all, then the timed rounds
    assert runs == ["setup", "run"] * (WARMUP_ROUNDS + 5)
