"""revgrad.tools.benchmark / revgrad.tools.measure: the pieces under ``revgrad bench`` and the bench/ suites."""

from __future__ import annotations

import pytest
import torch

from revgrad.tools import benchmark
from revgrad.tools.benchmark import PROVIDERS, TrainStep, glow_stage, revnet_model, revnet_stage, unavailable
from revgrad.tools.measure import largest_batch, paired_ratio, step_memory, time_interleaved
from revgrad.tools.memory import MemoryProbe, cpu_counting_available

pytestmark = pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")
needs_counting = pytest.mark.skipif(not cpu_counting_available(), reason="needs glibc mallinfo2")


@pytest.mark.parametrize("limit", [1, 5, 64, 1000, 1 << 20])
@pytest.mark.parametrize("true_max", [0, 1, 2, 3, 37, 64, 100, 999])
def test_largest_batch_finds_the_boundary(true_max: int, limit: int) -> None:
    probes = []
    found = largest_batch(lambda b: b <= true_max, limit=limit, on_probe=lambda b, ok: probes.append(b))
    assert found == min(true_max, limit)
    assert len(probes) <= 2 * max(1, limit).bit_length() + 2


def test_largest_batch_with_tolerance_stops_early() -> None:
    exact, coarse = [], []
    largest_batch(lambda b: b <= 1000, on_probe=lambda b, ok: exact.append(b))
    found = largest_batch(lambda b: b <= 1000, tolerance=1 / 16, on_probe=lambda b, ok: coarse.append(b))
    assert 1000 / (1 + 1 / 16) <= found <= 1000
    assert len(coarse) < len(exact)
    with pytest.raises(ValueError, match="start <= limit"):
        largest_batch(lambda b: True, start=4, limit=2)


def test_paired_ratio_is_the_median_of_per_round_ratios() -> None:
    rounds = [{"a": 2.0, "plain": 1.0}, {"a": 30.0, "plain": 10.0}, {"a": 1.0, "plain": 1.0}]
    assert paired_ratio(rounds, "a", "plain") == 2.0


@needs_counting
def test_cpu_peak_sees_a_temporary_freed_before_the_end() -> None:
    x = torch.randn(256, 1024)  # 1 MiB
    with MemoryProbe("cpu", track_peak=True) as probe:
        y = x * 2  # +1 MiB
        z = y + 1  # +1 MiB: peak 2 MiB
        del y
        held = probe.mark("held")  # 1 MiB left
    assert probe.peak is not None and probe.peak >= 2 * x.nbytes > held >= x.nbytes
    del z
    with MemoryProbe("cpu") as plain_probe:
        pass
    assert plain_probe.peak is None  # not tracked unless asked


def test_workloads_give_every_provider_the_same_parameters() -> None:
    for workload in (revnet_stage(blocks=3, batch=2, channels=4, size=4), revnet_model("revnet38", batch=1, size=8),
                     glow_stage(steps=2, channels=4, size=4, hidden=4, batch=2)):
        reference = workload.build("plain").parameters
        for provider in PROVIDERS:
            if unavailable(provider, workload) is not None:
                continue
            stage = workload.build(provider)
            assert stage.parameters.keys() == reference.keys()
            module_params = {id(p) for p in stage.module.parameters()}
            assert {id(p) for p in stage.parameters.values()} <= module_params  # the module trains them
            for name, p in stage.parameters.items():
                assert torch.equal(p, reference[name]), (provider, name)


def test_missing_peer_is_unavailable_not_a_crash(monkeypatch) -> None:
    monkeypatch.setitem(benchmark._PEER_MODULES, "memcnn", None)
    workload = revnet_stage(blocks=2, batch=2, channels=4, size=4)
    assert "not installed" in unavailable("memcnn", workload)
    with pytest.raises(ValueError, match="memcnn cannot run"):
        workload.build("memcnn")
    assert "not expressible" in unavailable("revlib", glow_stage(steps=1, channels=4))
    assert "unknown provider" in unavailable("nope")


@needs_counting
def test_step_memory_and_interleaved_timing_on_the_stage() -> None:
    workload = revnet_stage(blocks=4, batch=2, channels=4, size=4)
    x = workload.input()
    steps = {p: TrainStep(workload.build(p), x) for p in ("plain", "revgrad-off")}
    memory = {p: step_memory(s) for p, s in steps.items()}
    assert memory["plain"].held_bytes > memory["revgrad-off"].held_bytes > 0
    assert all(m.peak_bytes >= m.held_bytes for m in memory.values())
    timings = time_interleaved(steps, rounds=3, warmup=1)
    assert [len(t) for t in timings.times.values()] == [3, 3]
    assert timings.ratio("plain") == 1.0 and timings.ratio("revgrad-off") > 0
    assert all(p.grad is None for s in steps.values() for p in s.stage.module.parameters())  # zero_grad ran
