"""Smoke test of ``bench/overhead.py`` (the numbers in bench/RESULTS.md come from it)."""

from __future__ import annotations

import json

import overhead


def test_overhead_script_measures_bound_and_overhead(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    assert overhead.main(["--blocks", "2", "--rounds", "1", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert 0 < payload["bound"]["forward_fraction"] < 1.5
    providers = [r["provider"] for r in payload["overhead"]]
    assert providers[0] == "plain" and "revgrad-correct" in providers
    assert payload["overhead"][0]["excess_over_plain_ms"] == 0
    assert {r["provider"] for r in payload["ratios"]} == set(providers)
    assert payload["ratios"][0]["x_plain"] == 1.0
    assert "| revgrad-correct |" in capsys.readouterr().out
