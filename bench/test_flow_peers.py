"""Smoke test of bench/flow_peers.py: tiny sizes, every installed provider once (peers not installed are skipped)."""

from __future__ import annotations

import importlib.util

import flow_peers
import pytest

TINY = ["--size", "8", "--batch", "2", "--levels", "2", "--depth", "1", "--hidden", "8", "--rounds", "1",
        "--per-round", "1", "--no-peak"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flow_peers_tiny(capsys):
    result = flow_peers.main(TINY)
    rows = result["rows"]
    for name in ("plain", "revgrad-off", "revgrad-correct"):
        assert name in rows
        assert rows[name]["parameters"] == rows["plain"]["parameters"]
    for name in ("revgrad-off", "revgrad-correct"):
        assert rows[name]["grad_rel_err_vs_plain"] < 1e-4
    for name, module in flow_peers.PEER_MODULES.items():
        if importlib.util.find_spec(module) is None:
            assert name not in rows
            continue
        assert rows[name]["parameters"] > 0 and rows[name]["held_bytes"] > 0
    assert "| provider |" in capsys.readouterr().out
