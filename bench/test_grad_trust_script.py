"""Smoke test of ``bench/grad_trust.py`` (the numerical-trust figures in bench/RESULTS.md come from it)."""

from __future__ import annotations

import json

import grad_trust


def test_grad_trust_script_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "grad_trust.json"
    assert grad_trust.main(["--steps", "3", "--rounds", "1", "--per-round", "1", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert set(payload["summary"]) == {"off", "input-only", "correct"}
    assert payload["probed_steps"] == 1  # the first backward probes, the next ones do not
    assert payload["summary"]["correct"]["max"] < 1e-5
    assert "| correct |" in capsys.readouterr().out
