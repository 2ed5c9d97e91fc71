"""The fused protocol as README documents it: the example block, run from README's own text, is
tested like the built-in couplings (gradients equal to plain autograd's in every check mode, dropout
replayed, extra arguments, one sub-network evaluation per block in backward)."""

from __future__ import annotations

import copy
import pathlib
import re

import pytest
import torch
from reference import TOL, assert_rel_close, scalar_loss
from torch import nn

import revgrad

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
HEADING = "### Your own fused block"


def _example() -> dict:
    """Execute README's example (the first python block after its heading) and return its namespace."""
    text = README.read_text()
    assert HEADING in text, f"README has no section {HEADING!r}"
    block = re.search(r"```python\n(.*?)```", text[text.index(HEADING):], re.S)
    assert block is not None, f"no python example under {HEADING!r}"
    namespace: dict = {}
    exec(compile(block.group(1), str(README), "exec"), namespace)
    return namespace


EXAMPLE = _example()
NICECoupling = EXAMPLE["NICECoupling"]


class CountingNet(nn.Module):
    """``Linear -> GELU -> Dropout -> Linear`` that counts its calls and takes an optional ``gain``."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, 32), nn.GELU(), nn.Dropout(dropout), nn.Linear(32, width))
        self.calls = 0

    def forward(self, h: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        out = self.body(h)
        return out if gain is None else out * gain


def blocks(depth: int = 5, width: int = 6, dropout: float = 0.2, dtype=torch.float64) -> list[nn.Module]:
    torch.manual_seed(0)
    return [NICECoupling(CountingNet(width, dropout)).to(dtype).train() for _ in range(depth)]


def run_both(bs, x, *args, check="correct", **kwargs):
    grads = []
    for mode in ("plain", "rev"):
        copies = copy.deepcopy(bs)
        xx = x.clone().requires_grad_()
        a = [t.detach().clone().requires_grad_() for t in args]
        torch.manual_seed(11)
        if mode == "rev":
            out = revgrad.reversible(copies, check=check)(xx, *a, **kwargs)
        else:
            out = xx
            for b in copies:
                out = b(out, *a, **kwargs)
        scalar_loss(out).backward()
        grads.append([xx.grad, *(t.grad for t in a), *(p.grad for p in nn.ModuleList(copies).parameters())])
    return grads


def test_readme_example_runs_as_written():
    assert isinstance(EXAMPLE["model"], revgrad.ReversibleSequential)
    assert EXAMPLE["x"].grad is not None


@pytest.mark.parametrize("check", ["off", "detect", "correct"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_example_block_matches_plain_autograd_with_dropout(check, dtype):
    bs = blocks(dtype=dtype)
    plain, rev = run_both(bs, torch.randn(3, 4, 12, dtype=dtype), check=check)
    for a, b in zip(rev, plain, strict=True):
        assert_rel_close(a, b, TOL[dtype])


def test_example_block_takes_the_chains_extra_arguments():
    bs = blocks()
    gain = torch.rand(6, dtype=torch.float64) + 0.5
    plain, rev = run_both(bs, torch.randn(3, 4, 12, dtype=torch.float64), gain)
    for a, b in zip(rev, plain, strict=True):
        assert_rel_close(a, b, TOL[torch.float64])


def test_example_block_evaluates_its_network_once_per_backward():
    """The point of the protocol: one evaluation per block in backward (the generic path needs two)."""
    bs = blocks(depth=4)
    model = revgrad.reversible(bs, check="off")
    out = model(torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True))
    before = [b.net.calls for b in bs]
    scalar_loss(out).backward()
    assert [b.net.calls - n for b, n in zip(bs, before, strict=True)] == [1, 1, 1, 1]
    assert model.last_report.evaluations == 4
