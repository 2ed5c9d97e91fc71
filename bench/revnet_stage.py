"""The 12-block RevNet stage, wrapped by every memory-saving provider.

The stage, the providers and the agreement check live in the package, :mod:`revgrad.tools.benchmark`
(so that ``revgrad bench`` works from an installed package; its docstring describes every provider):
``N`` additive couplings (Gomez et al. 2017) on the channel halves of ``x: [B, C, H, W]``::

    y1 = x1 + f(x2)
    y2 = x2 + g(y1)

with ``f`` and ``g`` the RevNet basic residual function on ``C/2`` channels
(BatchNorm -> ReLU -> Conv3x3 -> BatchNorm -> ReLU -> Conv3x3), drawn once from a seed; every
provider builds its module over a fresh copy (identical weights and BatchNorm buffers).

This module names what ``bench/step_time.py`` and ``bench/test_bench_revnet_stage.py`` use.
"""

from __future__ import annotations

from revgrad.tools.benchmark import (
    FP32_TOL,
    FP64_TOL,
    PROVIDERS,
    Agreement,
    Errors,
    Stage,
    StageConfig,
    TrainStep,
    Workload,
    exactness_config,
    fresh_input,
    rel_error,
    revnet_stage,
    unavailable,
)
from revgrad.tools.benchmark import compare_with_plain as _compare_with_plain
from revgrad.tools.measure import pin_malloc, step_memory

__all__ = [
    "FP32_TOL",
    "FP64_TOL",
    "PROVIDERS",
    "Agreement",
    "Errors",
    "Stage",
    "StageConfig",
    "TrainStep",
    "Workload",
    "compare_with_plain",
    "exactness_config",
    "fresh_input",
    "held_bytes",
    "pin_malloc",
    "rel_error",
    "revnet_stage",
    "train_steps",
    "unavailable",
]


def train_steps(cfg: StageConfig, providers: tuple[str, ...] = PROVIDERS) -> dict[str, TrainStep]:
    """A training step of every provider (that can run here) on the stage ``cfg``, on the same input."""
    workload = revnet_stage(cfg)
    x = workload.input()
    return {p: TrainStep(workload.build(p), x, cfg.seed) for p in providers if unavailable(p) is None}


def held_bytes(step: TrainStep) -> int:
    """Bytes that the step's forward leaves allocated until backward (glibc count, CPU only).

    The stage input already exists when counting starts; the output counts (one activation for every
    provider). memcnn frees its input's storage, which counts as minus one activation.
    """
    return step_memory(step, "cpu", warmup=False).held_bytes


def compare_with_plain(cfg: StageConfig, providers: tuple[str, ...] = PROVIDERS) -> dict[str, Agreement]:
    """One step of every provider from the same weights and data, against plain autograd's step.

    float64 on :func:`exactness_config` (float64 convolutions are slow on CPU), float32 on ``cfg``
    itself (the timed stage); the float32 noise is plain float32 against plain float64, both on ``cfg``.
    """
    return _compare_with_plain(revnet_stage(cfg), providers, exact=revnet_stage(exactness_config(cfg)))
