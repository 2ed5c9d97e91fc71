"""``revgrad bench``: runs end to end on tiny sizes, prints the table, writes the JSON and the plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from revgrad.tools.benchmark import PROVIDERS, unavailable
from revgrad.tools.cli import main
from revgrad.tools.memory import cpu_counting_available

pytestmark = [
    pytest.mark.skipif(not cpu_counting_available(), reason="needs glibc mallinfo2 to count bytes"),
    pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning"),
]

TINY = ["--depths", "2", "4", "--batch", "2", "--channels", "4", "--size", "4", "--steps", "2", "--warmup", "0",
        "--device", "cpu", "--no-progress"]
RUNNABLE = [p for p in PROVIDERS if unavailable(p) is None]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory) -> tuple[int, str, Path]:
    out = tmp_path_factory.mktemp("bench")
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = main(["bench", *TINY, "--out", str(out)])
    return status, buffer.getvalue(), out


def test_prints_a_row_per_provider_and_depth(bench_run):
    status, text, _ = bench_run
    assert status == 0, text
    assert "| provider | depth | held MiB | peak MiB | step ms | time x plain |" in text
    for provider in RUNNABLE:
        for depth in (2, 4):
            assert f"| {provider} | {depth} |" in text, text
    assert "**DISAGREES**" not in text
    assert "torch " in text and "CPU " in text


def test_json_has_machine_and_per_provider_per_depth_numbers(bench_run):
    _, _, out = bench_run
    data = json.loads((out / "bench.json").read_text())
    assert data["schema"] == "revgrad.bench/1"
    machine = data["machine"]
    for key in ("cpu", "cores", "threads", "torch", "triton", "python", "command", "device"):
        assert key in machine, key
    assert machine["command"].startswith("revgrad bench --depths 2 4")
    assert machine["device"] == "cpu"
    assert set(data["results"]) == set(RUNNABLE)
    for provider, per_depth in data["results"].items():
        assert set(per_depth) == {"2", "4"}
        for r in per_depth.values():
            assert isinstance(r["held_bytes"], int) and isinstance(r["peak_bytes"], int)
            assert r["peak_bytes"] >= r["held_bytes"] > -10 * data["workload"]["activation_bytes"]
            assert r["step_ms"] > 0 and r["ratio"] > 0 and len(r["times_ms"]) == 2
        if provider == "plain":
            assert all(r["ratio"] == 1.0 for r in per_depth.values())
    assert all(a["agrees"] for a in data["agreement"].values())
    assert data["results"]["plain"]["4"]["held_bytes"] > data["results"]["plain"]["2"]["held_bytes"]


def test_plot_is_written(bench_run):
    pytest.importorskip("matplotlib")
    _, _, out = bench_run
    assert (out / "bench.png").stat().st_size > 10_000


def test_runs_as_a_module_with_largest_batch(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "revgrad", "bench", *TINY[:-1], "--providers", "revgrad-off",
         "--budget-mib", "0.25", "--no-check", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| revgrad-off | 4 |" in done.stdout and "largest batch" in done.stdout
    data = json.loads((tmp_path / "bench.json").read_text())
    assert set(data["results"]) == {"plain", "revgrad-off"}  # plain is always added
    assert data["agreement"] is None
    batches = data["largest_batch"]["batch"]
    assert batches["revgrad-off"] > batches["plain"] >= 1, batches
    assert data["machine"]["command"].startswith("revgrad bench")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--channels", "5"], "--channels must be even"),
        (["--depths", "0"], "must be a positive integer"),
        (["--batch", "x"], "invalid _positive_int value"),
        (["--providers", "nope"], "invalid choice"),
        (["--device", "tpu"], "not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        (["--device", "meta"], "runs on 'cpu' or 'cuda'"),
        (["--budget-mib", "-1"], "must be positive"),
    ],
)
def test_bad_arguments_give_a_clear_error(args, message, capsys, tmp_path):
    assert main(["bench", *args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_cuda_without_cuda_is_refused(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["bench", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_missing_peer_is_skipped_with_a_note(monkeypatch, tmp_path, capsys):
    from revgrad.tools import benchmark

    monkeypatch.setitem(benchmark._PEER_MODULES, "revlib", None)
    status = main(["bench", *TINY, "--steps", "1", "--depths", "2", "--providers", "revlib", "--no-check",
                   "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0
    assert "note: revlib: skipped, revlib is not installed" in out
    assert set(json.loads((tmp_path / "bench.json").read_text())["results"]) == {"plain"}


def test_without_matplotlib_the_json_is_still_written(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    status = main(["bench", *TINY, "--steps", "1", "--depths", "2", "--providers", "plain", "--no-check",
                   "--out", str(tmp_path)])
    assert status == 0
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert (tmp_path / "bench.json").exists() and not (tmp_path / "bench.png").exists()
