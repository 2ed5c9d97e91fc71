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
    assert [r["provider"] for r in payload["small_blocks"]][:3] == ["plain", "hand-written loop", "revgrad-off"]


def test_small_memory_counts_what_each_provider_holds():
    import pytest

    from revgrad.tools.memory import cpu_counting_available

    if not cpu_counting_available():
        pytest.skip("counting CPU bytes needs glibc's mallinfo2")
    rows = overhead.small_memory(batches=(16,))
    held = {r["provider"]: r["held_b16"] for r in rows}
    # Plain autograd holds every block's graph; the memory-saving providers about the output.
    assert held["plain"] > 20 * held["revgrad-off"]
    assert held["revgrad-off"] <= held["revgrad-correct"] < held["revgrad-correct (anchors in forward)"]
    assert rows[2]["x_off_b16"] == 1.0


def test_hand_written_loop_computes_plain_gradients():
    """The baseline the engine is measured against must itself be right."""
    import torch

    from revgrad.models import glow_classifier

    torch.manual_seed(0)
    model = glow_classifier(in_channels=1, levels=1, depth=2, hidden=8, permutation="conv", memory_saving=False)
    model = model.double()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        model(x)
    blocks = list(model.flow)
    z, logdet = overhead.HandWrittenChain(blocks)(x)
    (z.square().sum() + logdet.sum()).backward()
    got = [p.grad.clone() for p in model.flow.parameters()]
    model.zero_grad(set_to_none=True)
    h, total = x, 0
    for block in blocks:
        out = block(h)
        h, ld = out if isinstance(out, tuple) else (out, 0)
        total = total + ld
    (h.square().sum() + total.sum()).backward()
    for a, p in zip(got, model.flow.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-10, atol=1e-12)
