"""Smoke test of ``bench/graph_budget.py`` (the numbers in bench/RESULTS.md come from it)."""

from __future__ import annotations

import json

import graph_budget


def test_graph_budget_script_runs_and_keeps_the_top_block(tmp_path, capsys):
    out = tmp_path / "gb.json"
    assert graph_budget.main(["--keep", "1", "--rounds", "1", "--json", str(out)]) == 0
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["revgrad-correct keep 1"]["kept_blocks"] == [11]
    assert rows["revgrad-correct"]["kept_blocks"] == []
    assert rows["revgrad-correct keep 1"]["held_activations"] > rows["revgrad-correct"]["held_activations"]
    assert "| plain |" in capsys.readouterr().out
