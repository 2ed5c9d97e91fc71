"""The flow reproduction (bench/paper/flows.py) runs end to end at tiny sizes and writes its table, JSON and plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


def test_flows_smoke(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "paper", "flows.py")
    png = tmp_path / "flows.png"
    done = subprocess.run(
        [sys.executable, script, "--steps", "2", "--measure-every", "1", "--levels", "1", "--depth", "1",
         "--hidden", "4", "--fd-every", "1", "--runs", "additive", "affine-off-fd",
         "--out", str(tmp_path), "--png", str(png)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| affine-off-fd |" in done.stdout and "torch " in done.stdout
    for name in ("additive", "affine-off-fd"):
        r = json.loads((tmp_path / f"{name}.json").read_text())
        assert r["history"]["step"] == [0, 1]
        assert r["final"]["rel_l2"] < 1e-3  # memory-saving gradient matches plain autograd at init
    assert png.stat().st_size > 10_000
