"""``bench/gpu_suite.sh --dry-run``: every part of the GPU suite runs on the CPU before a GPU sees it.

The dry run takes the suite's own code paths with tiny sizes: the install check (from outside the
tree), the CUDA tests on the CPU through the code path CUDA takes (kernels through Triton's
interpreter, deferred checks), kernel bandwidth (interpreter, torch.compile with dynamo's eager
backend), the Glow step with kernels, deferred checks, ``revgrad bench``, models and largest batch.
About 1.5 minutes on 2 cores. Skipped where this checkout is not the installed revgrad (the suite
would install it, which a test must not do).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "bench" / "gpu_suite.sh"
PARTS = ("tests", "kernels", "glow_step", "deferred_checks", "revnet_bench", "models", "largest_batch", "vit_bench")


def _installed_here() -> bool:
    code = ("import os, sys, revgrad, revgrad.kernels; "
            "sys.exit(0 if os.path.realpath(revgrad.__file__).startswith(sys.argv[1]) else 1)")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT) + os.sep], cwd="/tmp", capture_output=True)
    return proc.returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux" or not shutil.which("bash") or not shutil.which("timeout"),
                       reason="the suite is a bash script using coreutils' timeout"),
    pytest.mark.skipif(not _installed_here(), reason="revgrad is not installed from this checkout (pip install -e .)"),
]


def _run(out: Path, seconds: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "REVGRAD_"))}
    env["REVGRAD_SUITE_SECONDS"] = str(seconds)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # python3 = this python
    return subprocess.run(["bash", str(SUITE), "--dry-run", str(out)], env=env, capture_output=True, text=True,
                          timeout=seconds + 120)


def test_dry_run_runs_every_part(tmp_path):
    proc = _run(tmp_path, 400)
    summary = (tmp_path / "summary.txt").read_text()
    detail = f"{summary}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    for part in PARTS:
        log = (tmp_path / f"{part}.txt").read_text()[-3000:]
        assert f"{part}: rc=0" in summary, f"{part} failed:\n{detail}\n{log}"
        assert proc.stdout.count(f"{part}: rc=") == 1, "each part's line is printed once"
    assert proc.returncode == 0, detail
    assert "install: ok" in summary
    assert "revgrad from" in (tmp_path / "install.txt").read_text()
    assert "DRY RUN" in (tmp_path / "env.txt").read_text()
    kernels = json.loads((tmp_path / "kernels.json").read_text())
    assert kernels["complete"] and len(kernels["rows"]) == 30 and all("gbps" in r for r in kernels["rows"])
    glow = json.loads((tmp_path / "glow_step.json").read_text())
    assert glow["info"]["kernels"] == "triton" and all(r["step_ms"] for r in glow["rows"])
    for name in ("models.json", "largest_batch.json"):
        assert json.loads((tmp_path / name).read_text())["complete"], name
    assert (tmp_path / "deferred_checks.json").exists() and (tmp_path / "bench" / "bench.json").exists()
    assert (tmp_path / "vit" / "bench.json").exists()
    tests = (tmp_path / "tests.xml").read_text()
    assert 'failures="0"' in tests and 'errors="0"' in tests


def test_parts_past_the_budget_are_skipped_and_fail_the_suite(tmp_path):
    proc = _run(tmp_path, 5)
    summary = (tmp_path / "summary.txt").read_text()
    assert proc.returncode == 1, summary
    for part in PARTS:
        assert f"{part}: skipped" in summary, summary
