"""``revgrad demo``: the importable runs (digits, ``--task lm`` and ``--task flow``, tiny settings), the CLI in
process and as a subprocess."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from revgrad import BackwardReport, ReversibleSequential, __version__, reversible
from revgrad.tools.cli import main
from revgrad.tools.demo import (
    FLOW_BINS,
    LM_VOCAB,
    DemoResult,
    FlowDemoResult,
    LMDemoResult,
    build_model,
    load_digits_data,
    load_digits_levels,
    load_text_tokens,
    run_demo,
    run_flow_demo,
    run_lm_demo,
)
from revgrad.tools.memory import cpu_counting_available

pytest.importorskip("sklearn")  # the demo's data set

TINY = dict(epochs=1, depth=2, channels=16, stages=2, batch_size=64, seed=0, threads=1, progress=False)
CHANCE = 0.1  # 10 balanced classes
TINY_FLOW = dict(steps=40, levels=2, depth=1, hidden=16, batch_size=32, lr=5e-3, seed=0, threads=1, progress=False)
TINY_LM = dict(steps=30, dim=32, depth=2, heads=2, seq_len=32, batch_size=8, eval_batches=2, seed=0, threads=1,
               progress=False)


@pytest.fixture(scope="module")
def tiny() -> DemoResult:
    return run_demo(**TINY)


@pytest.fixture(scope="module")
def tiny_lm() -> LMDemoResult:
    return run_lm_demo(**TINY_LM)


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


def test_text_tokens_are_the_bytes_of_pythons_help_topics():
    train, heldout = load_text_tokens()
    assert train.dtype == torch.int64 and int(train.max()) < LM_VOCAB and int(train.min()) >= 0
    assert len(train) > 100_000 and len(heldout) > 10_000
    assert b"the" in bytes(train[:2000].tolist())


def test_tiny_lm_run_learns_and_holds_less_memory_than_plain_autograd(tiny_lm: LMDemoResult):
    text = tiny_lm.summary()
    assert len(tiny_lm.step_losses) == TINY_LM["steps"]
    assert math.isfinite(tiny_lm.loss_before) and tiny_lm.loss_after < tiny_lm.loss_before - 0.5, text
    assert tiny_lm.tokens_per_second > 0
    report = tiny_lm.last_report
    assert isinstance(report, BackwardReport) and report.check == "correct"
    assert report.max_error <= report.tol
    if cpu_counting_available():
        assert tiny_lm.held_revgrad is not None and tiny_lm.held_plain is not None
        assert 0 < tiny_lm.held_revgrad < tiny_lm.held_plain, text
    for needle in ("held-out loss", "tokens/s", "revgrad:", "plain autograd:", "corrections made"):
        assert needle in text


def test_cli_demo_lm_in_process(capsys):
    code = main(["demo", "--task", "lm", "--steps", "3", "--dim", "16", "--heads", "2", "--depth", "1",
                 "--seq-len", "16", "--batch-size", "4", "--sample-len", "8", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    for needle in ("--task lm", "held-out loss", "tokens/s", "plain autograd:", "last backward:", "sample: 'The "):
        assert needle in out


def test_cli_demo_refuses_the_other_tasks_options(capsys):
    assert main(["demo", "--task", "lm", "--epochs", "2"]) == 2
    assert "--epochs is an option of --task digits" in capsys.readouterr().err
    assert main(["demo", "--steps", "2"]) == 2
    assert "--steps is an option of --task lm" in capsys.readouterr().err
    assert main(["demo", "--task", "lm", "--dim", "30", "--heads", "4"]) == 2
    assert "divisible by heads" in capsys.readouterr().err


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
    for option in ("--epochs", "--depth", "--channels", "--batch-size", "--lr", "--check", "--seed", "--threads",
                   "--task", "--steps", "--dim", "--seq-len", "--levels", "--hidden", "--unconditional", "--out"):
        assert option in proc.stdout
    assert "off,detect,correct" in proc.stdout


def test_python_m_revgrad_subprocess():
    proc = _run(sys.executable, "-m", "revgrad", "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"revgrad {__version__}"


def test_digit_levels_are_the_17_integer_values_on_the_same_split():
    data = load_digits_levels()
    assert data.x_train.dtype == torch.int64 and data.x_train.shape[1:] == (1, 8, 8)
    assert int(data.x_train.min()) == 0 and int(data.x_train.max()) == FLOW_BINS - 1
    assert len(data.x_test) == 360 and torch.equal(data.y_test, load_digits_data().y_test)


@pytest.mark.parametrize("conditional", [True, False])
def test_tiny_flow_run_learns_holds_less_memory_and_writes_samples(tmp_path, conditional):
    pytest.importorskip("matplotlib")
    out = tmp_path / "samples.png"
    result: FlowDemoResult = run_flow_demo(**TINY_FLOW, conditional=conditional, out=str(out))
    text = result.summary()
    assert len(result.step_bpd) == TINY_FLOW["steps"]
    assert math.isfinite(result.bpd_before) and result.bpd_after < result.bpd_before - 0.3, text
    assert result.images_per_second > 0 and result.blocks == 2 * (1 + 3 * TINY_FLOW["depth"])
    assert set(result.last_reports) == {"levels.0", "levels.1"}
    for report in result.last_reports.values():
        assert report.check == "correct" and report.max_error <= report.tol
    if cpu_counting_available():
        assert result.held_revgrad is not None and result.held_plain is not None
        assert 0 < result.held_revgrad < result.held_plain, text
    assert result.png == str(out) and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5000
    for needle in ("test bits/dim", "images/s", "revgrad:", "plain autograd:", "corrections made", str(out)):
        assert needle in text


def test_tiny_flow_without_png_and_invalid_settings(tmp_path):
    result = run_flow_demo(**{**TINY_FLOW, "steps": 2, "levels": 1}, out=None)
    assert result.png is None and "samples:" not in result.summary()
    with pytest.raises(ValueError, match="levels must be at most 3"):
        run_flow_demo(**{**TINY_FLOW, "levels": 4}, out=None)
    with pytest.raises(ValueError, match="temperatures"):
        run_flow_demo(**TINY_FLOW, temperatures=(), out=None)


def test_cli_demo_flow_in_process(capsys, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)  # the default --out is flow_samples.png in the current directory
    code = main(["demo", "--task", "flow", "--steps", "3", "--depth", "1", "--hidden", "8", "--batch-size", "16",
                 "--unconditional", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    for needle in ("--task flow", "unconditional", "test bits/dim", "images/s", "plain autograd:", "last backward",
                   "flow_samples.png"):
        assert needle in out
    assert (tmp_path / "flow_samples.png").is_file()
    assert main(["demo", "--task", "flow", "--epochs", "2"]) == 2
    assert "--epochs is an option of --task digits" in capsys.readouterr().err
    assert main(["demo", "--unconditional"]) == 2
    assert "--unconditional is an option of --task flow" in capsys.readouterr().err
