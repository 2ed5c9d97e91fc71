"""Smoke test of ``bench/deferred_checks.py`` (run for real on a GPU by ``bench/gpu_suite.sh``)."""

from __future__ import annotations

import json

import deferred_checks


def test_deferred_checks_script_runs_both_variants(tmp_path, capsys):
    assert deferred_checks.main(["--device", "cpu", "--blocks", "3", "--batch", "4", "--rounds", "1",
                                 "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "deferred_checks.json").read_text())
    assert payload["gradient_difference"] == 0.0  # same computation, deterministic on CPU
    names = [r["provider"] for r in payload["rows"]]
    assert names == ["plain", "correct, per-block checks", "correct, deferred checks"]
    assert "| correct, deferred checks |" in capsys.readouterr().out
