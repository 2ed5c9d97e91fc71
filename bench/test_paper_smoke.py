"""The paper reproduction runs end to end (tiny: 4 steps) and writes its table, JSON and plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


def test_reproduce_quick_smoke(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "paper", "reproduce.py")
    done = subprocess.run(
        [sys.executable, script, "--quick", "--steps", "4", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| affine-correct |" in done.stdout
    for name in ("additive", "affine-off", "affine-correct", "affine-off-fd"):
        assert json.loads((tmp_path / f"{name}.json").read_text())
    assert (tmp_path / "paper.png").stat().st_size > 10_000
