"""Smoke test of ``bench/grad_trust.py`` (the numerical-trust figures in bench/RESULTS.md come from it)."""

from __future__ import annotations

import json

import grad_trust


def test_grad_trust_script_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "grad_trust.json"
    assert grad_trust.main(["--steps", "3", "--rounds", "1", "--per-round", "1", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert set(payload["summary"]) == {"off", "input-only", "correct", "anchors in forward"}
    assert payload["probed_steps"] == 1  # the first backward probes, the next ones do not
    assert payload["summary"]["correct"]["max"] < 1e-5
    assert "| correct |" in capsys.readouterr().out


def test_drift_part_compares_providers_against_the_truth():
    rows = grad_trust.drift(cases=((6, 0, 100),), steps=2)
    assert [r["provider"] for r in rows] == [
        "plain float32", "rebuilt from the top", "default (drift anchors)", "anchors in forward"
    ]
    assert all(0 <= r["worst_tensor"] < 1e-3 and r["whole"] <= r["worst_tensor"] * 10 for r in rows)
    assert rows[3]["anchors"] == [0, 3, 6]  # 8 blocks: every ceil(sqrt(8)) = 3 stored in forward
