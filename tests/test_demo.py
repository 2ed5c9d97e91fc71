"""``revgrad demo``: the importable run (tiny settings), the CLI in process and as a subprocess."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest

from revgrad import BackwardReport, ReversibleSequential, __version__, reversible
from revgrad.tools.cli import main
from revgrad.tools.demo import DemoResult, build_model, load_digits_data, run_demo
from revgrad.tools.memory import cpu_counting_available

pytest.importorskip("sklearn")  # the demo's data set

TINY = dict(epochs=1, depth=2, channels=16, stages=2, batch_size=64, seed=0, threads=1, progress=False)
CHANCE = 0.1  # 10 balanced classes


@pytest.fixture(scope="module")
def tiny() -> DemoResult:
    return run_demo(**TINY)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, check=False)


def test_data_split_and_standardization():
    data = load_digits_data()
    assert data.x_train.shape[1:] == (1, 8, 8) and data.x_test.shape[1:] == (1, 8, 8)
    assert len(data.x_train) + len(data.x_test) == 1797
    assert len(data.x_test) == 360
    assert abs(float(data.x_train.mean())) < 1e-5
    assert abs(float(data.x_train.std()) - 1.0) < 1e-4
    assert set(data.y_test.tolist()) == set(range(10))


def test_model_converts_into_one_reversible_body():
    model = build_model(depth=3, channels=8, stages=2)
    keys = list(model.state_dict())
    assert reversible(model) is model
    assert isinstance(model.body, ReversibleSequential)
    assert list(model.state_dict()) == keys


def test_tiny_run_learns(tiny: DemoResult):
    assert tiny.accuracy > 4 * CHANCE, tiny.summary()
    assert tiny.test_size == 360 and tiny.train_size == 1437
    assert tiny.blocks == 4
    assert len(tiny.epoch_losses) == 1 and math.isfinite(tiny.final_loss)
    assert tiny.train_seconds > 0 and tiny.elapsed_seconds >= tiny.train_seconds


@pytest.mark.skipif(not cpu_counting_available(), reason="needs glibc mallinfo2 to count CPU bytes")
def test_tiny_run_holds_less_memory_than_plain_autograd(tiny: DemoResult):
    assert tiny.held_revgrad is not None and tiny.held_plain is not None
    assert 0 < tiny.held_revgrad < tiny.held_plain, tiny.summary()
    assert tiny.memory_ratio is not None and tiny.memory_ratio > 1


def test_tiny_run_reports_its_last_backward(tiny: DemoResult):
    report = tiny.last_report
    assert isinstance(report, BackwardReport)
    assert report.check == "correct"
    assert tiny.corrections >= len(report.corrected) >= 0
    assert report.max_error <= report.tol
    text = tiny.summary()
    for needle in ("test accuracy", "revgrad:", "plain autograd:", "corrections made"):
        assert needle in text


def test_same_seed_same_result(tiny: DemoResult):
    again = run_demo(**TINY)
    assert again.epoch_losses == tiny.epoch_losses
    assert again.accuracy == tiny.accuracy


def test_check_off_runs():
    result = run_demo(**{**TINY, "depth": 1, "check": "off"})
    assert result.accuracy > 2 * CHANCE
    assert result.last_report is not None and result.last_report.check == "off"
    assert result.corrections == 0


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match="channels must be even"):
        run_demo(**{**TINY, "channels": 15})
    with pytest.raises(ValueError, match="check must be one of"):
        run_demo(**{**TINY, "check": "sometimes"})


def test_cli_demo_in_process(capsys):
    code = main(["demo", "--epochs", "1", "--depth", "1", "--channels", "8", "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0
    for needle in ("test accuracy:", "plain autograd:", "ratio:", "last backward:", "corrections made:"):
        assert needle in captured.out
    assert "epoch 1/1" in captured.err  # the tqdm bar, on stderr


def test_cli_usage_errors(capsys):
    assert main(["demo", "--epochs", "0"]) == 2
    assert main(["demo", "--check", "maybe"]) == 2
    assert main(["demo", "--channels", "7"]) == 2
    assert "channels must be even" in capsys.readouterr().err
    assert main([]) == 2


def test_cli_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"revgrad {__version__}"


def test_demo_help_subprocess():
    exe = shutil.which("revgrad")
    args = (exe,) if exe else (sys.executable, "-m", "revgrad")
    proc = _run(*args, "demo", "--help")
    assert proc.returncode == 0, proc.stderr
    for option in ("--epochs", "--depth", "--channels", "--batch-size", "--lr", "--check", "--seed", "--threads"):
        assert option in proc.stdout
    assert "off,detect,correct" in proc.stdout


def test_python_m_revgrad_subprocess():
    proc = _run(sys.executable, "-m", "revgrad", "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"revgrad {__version__}"
