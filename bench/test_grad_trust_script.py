"""Smoke test of ``bench/grad_trust.py`` (the numerical-trust figures in bench/RESULTS.md come from it)."""

from __future__ import annotations

import json

import grad_trust
import torch


def test_grad_trust_script_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "grad_trust.json"
    assert grad_trust.main(["--steps", "3", "--rounds", "1", "--per-round", "1", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert set(payload["summary"]) == {"plain", "off", "input-only", "correct", "anchors in forward"}
    assert payload["probed_steps"] == 1  # the first backward probes, the next ones do not
    correct = payload["summary"]["correct"]
    assert correct["max"] < 1e-5 and correct["truth_max"] < 1e-5 and correct["as_plain"] == 1.0
    assert len(payload["errors_vs_truth"]["plain"]) == 3 and payload["kink_steps"] == []
    assert "| correct |" in capsys.readouterr().out


class _Kink(torch.nn.Module):
    """``relu(x * w - c)``: for ``x = w = 1 + 2^-12`` and ``c = 1 + 2^-11`` the product is
    ``1 + 2^-11 + 2^-24``, a tie in float32 that rounds to ``c`` (ReLU input 0), exact in float64
    (input 2^-24 > 0). Separate ops, so no fused multiply-add can make float32 exact."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1 + 2.0**-12]))
        self.register_buffer("c", torch.tensor([1 + 2.0**-11]))
        self.relu = torch.nn.ReLU()

    def forward(self, x):
        return self.relu(torch.sub(torch.mul(x, self.w), self.c))


def test_kink_crossed_sees_float32_rounding_cross_a_relu_kink():
    model, model64 = _Kink(), _Kink().double()
    assert grad_trust.kink_crossed(model, model64, torch.tensor([1 + 2.0**-12]))
    assert not grad_trust.kink_crossed(model, model64, torch.tensor([2.0]))
    assert not model.relu._forward_pre_hooks and not model64.relu._forward_pre_hooks  # hooks removed


def test_drift_part_compares_providers_against_the_truth():
    rows = grad_trust.drift(cases=((6, 0, 100),), steps=2)
    assert [r["provider"] for r in rows] == [
        "plain float32", "rebuilt from the top", "default (drift anchors)", "anchors in forward"
    ]
    assert all(0 <= r["worst_tensor"] < 1e-3 and r["whole"] <= r["worst_tensor"] * 10 for r in rows)
    assert rows[3]["anchors"] == [0, 3, 6]  # 8 blocks: every ceil(sqrt(8)) = 3 stored in forward
