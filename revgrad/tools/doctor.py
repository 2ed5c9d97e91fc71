"""``revgrad doctor``: the stability report of a flow on real data and off it.

Loads a saved model (``torch.save`` of a whole module, or a ``state_dict`` for the named model) or
builds a named one, takes a batch of scikit-learn's digits (standardized, ``[B, 1, 8, 8]``) and
prints :func:`revgrad.stability_report` of the model's invertible chain on that batch and on each
out-of-distribution probe (:func:`revgrad.ood_probes`).

The chain is the model's ``flow`` attribute (``revgrad.models.glow_classifier``), or the model itself
when it is a chain of blocks: a chain whose input is the data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn

from ..analysis.diagnostics import StabilityReport, ood_probes, stability_report
from ..engine.protocol import is_block

__all__ = ["NAMED_MODELS", "DoctorResult", "build_named", "find_chain", "run_doctor"]


def _glow(exploding: bool) -> nn.Module:
    from ..models.glow import glow_classifier

    torch.manual_seed(0)
    model = glow_classifier(in_channels=1, num_classes=10, levels=2, depth=4, coupling="affine", scale="sigmoid")
    if exploding:  # saturate every sigmoid scale near zero: the paper's exploding-inverse regime
        for module in model.modules():
            if type(module).__name__ == "AffineCoupling":
                last = [m for m in module.net.modules() if isinstance(m, nn.Conv2d)][-1]
                with torch.no_grad():
                    half = last.out_channels // 2
                    last.bias[half:] = -8.0
                    last.bias[:half] = 1.0
    return model


NAMED_MODELS = {
    "glow": lambda: _glow(exploding=False),
    "glow-exploding": lambda: _glow(exploding=True),
}


def build_named(name: str) -> nn.Module:
    if name not in NAMED_MODELS:
        raise ValueError(f"revgrad doctor: unknown model {name!r}; choose from {sorted(NAMED_MODELS)}")
    return NAMED_MODELS[name]()


def find_chain(model: nn.Module) -> nn.Module:
    """The invertible chain whose input is the data: ``model.flow``, or ``model`` itself."""
    flow = getattr(model, "flow", None)
    if isinstance(flow, nn.Module):
        return flow
    if is_block(model) or (isinstance(model, nn.Sequential) and len(model) and all(is_block(m) for m in model)):
        return model
    raise TypeError(
        f"revgrad doctor: {type(model).__name__} has no 'flow' attribute and is not a chain of blocks; "
        "pass a flow (a module whose blocks take the data directly)"
    )


@dataclass
class DoctorResult:
    reports: dict[str, StabilityReport]

    def to_dict(self) -> dict:
        return {name: report.to_dict() for name, report in self.reports.items()}

    def __str__(self) -> str:
        return "\n\n".join(f"== {name} ==\n{report}" for name, report in self.reports.items())


def run_doctor(
    model: str | nn.Module = "glow", *, checkpoint: str | None = None, batch: int = 16, iterations: int = 10,
    seed: int = 0,
) -> DoctorResult:
    """Stability reports of ``model``'s chain on a digits batch (``"data"``) and on the OOD probes."""
    from .demo import load_digits_data

    if isinstance(model, str):
        module = build_named(model)
        if checkpoint is not None:
            loaded = torch.load(checkpoint, map_location="cpu", weights_only=False)
            if isinstance(loaded, nn.Module):
                module = loaded
            else:
                module.load_state_dict(loaded)
    else:
        module = model
    chain = find_chain(module)
    data = load_digits_data("cpu").x_train
    gen = torch.Generator().manual_seed(seed)
    x = data[torch.randperm(data.shape[0], generator=gen)[:batch]]
    if module.training:  # data-dependent initializations (ActNorm) happen on a first training batch
        with torch.no_grad():
            module(x)
    reports = {"data": stability_report(chain, x, iterations=iterations, seed=seed)}
    for name, probe in ood_probes(x, seed=seed).items():
        reports[name] = stability_report(chain, probe, iterations=iterations, seed=seed)
    return DoctorResult(reports)


def write_json(result: DoctorResult, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(result.to_dict(), fh, indent=2, default=str)
