"""``revgrad doctor``: reports on data and on the OOD probes, through the API and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from revgrad.tools.cli import main
from revgrad.tools.doctor import find_chain, run_doctor

pytest.importorskip("sklearn")


def test_doctor_reports_data_and_probes_and_flags_exploding_couplings():
    result = run_doctor("glow-exploding", batch=2, iterations=3)
    assert set(result.reports) == {"data", "gaussian", "rademacher", "scaled_2x", "scaled_10x"}
    rows = result.reports["data"].blocks
    affine = [r for r in rows if "AffineCoupling" in r.name]
    others = [r for r in rows if "Shuffle" in r.name or "Squeeze" in r.name]
    assert affine and others
    assert min(r.lip_inverse for r in affine) > 100 * max(r.lip_inverse for r in others)
    assert all(r.bound_inverse is None for r in affine)
    json.dumps(result.to_dict(), default=str)


def test_doctor_cli_runs_and_writes_json(tmp_path, capsys):
    path = tmp_path / "report.json"
    assert main(["doctor", "--model", "glow", "--batch", "2", "--iterations", "2", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "== data ==" in out and "== gaussian ==" in out and "AffineCoupling" in out
    data = json.loads(path.read_text())
    assert math.isfinite(float(data["data"]["total"]["lip_forward"]))


def test_doctor_loads_a_saved_module(tmp_path):
    from revgrad.tools.doctor import build_named

    model = build_named("glow")
    path = tmp_path / "model.pt"
    torch.save(model, path)
    assert run_doctor("glow", checkpoint=str(path), batch=2, iterations=2).reports["data"].blocks


def test_doctor_rejects_a_model_without_a_chain():
    with pytest.raises(TypeError, match="flow"):
        find_chain(torch.nn.Linear(2, 2))
    assert main(["doctor", "--model", "nope"]) == 2
