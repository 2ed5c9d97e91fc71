"""A 12-block RevNet stage, built once and wrapped by every memory-saving provider (issue #2).

Every provider computes the same function of the same initial weights: ``N`` additive couplings
(Gomez et al. 2017) on the channel halves of ``x: [B, C, H, W]``::

    y1 = x1 + f(x2)
    y2 = x2 + g(y1)

with ``f`` and ``g`` the RevNet basic residual function on ``C/2`` channels
(BatchNorm -> ReLU -> Conv3x3 -> BatchNorm -> ReLU -> Conv3x3). :func:`make_branches` draws the
branches once from a seed; each builder in :data:`BUILDERS` takes a deep copy, so all providers start
from identical weights and BatchNorm buffers.

Providers:

* ``plain``: ``nn.Sequential`` of :class:`revgrad.AdditiveCoupling`, plain autograd (the reference);
* ``checkpoint``: the same sequential under ``torch.utils.checkpoint.checkpoint_sequential`` with
  ``ceil(sqrt(N))`` segments, ``use_reentrant=False``;
* ``revgrad-off`` / ``revgrad-correct``: ``revgrad.reversible(..., check="off" | "correct")``;
* ``memcnn``: ``memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(f, g), keep_input=False,
  keep_input_inverse=False)`` per block, called as ``module(x)``. It frees the storage of its input
  in forward, so every call needs a fresh input tensor, and doubles ``dL/dx`` when that input is a
  leaf (see :func:`fresh_input`);
* ``revlib``: ``revlib.ReversibleSequential(f_0, g_0, f_1, g_1, ...)``. RevLib's module ``k`` maps
  the stream pair ``(a, b)`` to ``(b, a + m_k(b))``; starting from ``(x1, x2)``, ``f`` gives
  ``(x2, x1 + f(x2)) = (x2, y1)`` and ``g`` then gives ``(y1, x2 + g(y1)) = (y1, y2)``. So the
  interleaved list computes exactly the revgrad coupling, with the same channel split
  (``chunk(2, dim=1)``) and the output ``cat([y1, y2])`` for an even number of modules.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

import revgrad
from revgrad.memory import MemoryProbe
from revgrad.models import revnet_branch

with warnings.catch_warnings():
    # memcnn 1.5.2 decorates with the deprecated torch.cuda.amp.custom_fwd/custom_bwd at import.
    warnings.simplefilter("ignore", FutureWarning)
    import memcnn
import revlib

__all__ = [
    "BUILDERS",
    "FP32_TOL",
    "FP64_TOL",
    "PROVIDERS",
    "Agreement",
    "Branches",
    "Errors",
    "Stage",
    "StageConfig",
    "StepResult",
    "build",
    "compare_with_plain",
    "exactness_config",
    "fresh_input",
    "held_bytes",
    "make_branches",
    "make_data",
    "make_optimizer",
    "pin_malloc",
    "rel_error",
    "run_step",
    "train_step",
]

Branches = list[tuple[nn.Module, nn.Module]]


@dataclass(frozen=True)
class StageConfig:
    """Sizes of the stage. Defaults: a plain-autograd step of about 130 ms on 2 cores (160 ms on one)."""

    blocks: int = 12
    batch: int = 32
    channels: int = 32
    size: int = 16
    seed: int = 0

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.size, self.size)

    @property
    def activation_bytes(self) -> int:
        """Bytes of one fp32 activation of the stage input: the unit of the memory columns."""
        return math.prod(self.input_shape) * 4




def make_branches(cfg: StageConfig) -> Branches:
    """The ``(f, g)`` pair of every block, drawn from ``cfg.seed``; providers take deep copies."""
    if cfg.channels % 2:
        raise ValueError(f"channels must be even to split in halves, got {cfg.channels}")
    gen_state = torch.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        half = cfg.channels // 2
        return [(revnet_branch(half), revnet_branch(half)) for _ in range(cfg.blocks)]
    finally:
        torch.set_rng_state(gen_state)


@dataclass
class Stage:
    """One provider's module plus the ``(f, g)`` modules it actually runs, to compare parameters by name."""

    provider: str
    module: nn.Module
    branches: Branches

    def named_branch_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters under provider-independent names ``"{block}.{f|g}.{name}"``."""
        out: dict[str, nn.Parameter] = {}
        for i, (f, g) in enumerate(self.branches):
            for tag, branch in (("f", f), ("g", g)):
                for name, p in branch.named_parameters():
                    out[f"{i}.{tag}.{name}"] = p
        return out

    def named_branch_buffers(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, (f, g) in enumerate(self.branches):
            for tag, branch in (("f", f), ("g", g)):
                for name, b in branch.named_buffers():
                    if b.is_floating_point():
                        out[f"{i}.{tag}.{name}"] = b
        return out


def _couplings(branches: Branches) -> nn.Sequential:
    return nn.Sequential(*(revgrad.AdditiveCoupling(f, g) for f, g in branches))


class CheckpointedStage(nn.Module):
    """``checkpoint_sequential`` over the couplings (non-reentrant); the last segment keeps its graph."""

    def __init__(self, body: nn.Sequential, segments: int) -> None:
        super().__init__()
        self.body = body
        self.segments = segments

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint_sequential(self.body, self.segments, x, use_reentrant=False)


def _plain(branches: Branches) -> nn.Module:
    return _couplings(branches)


def _checkpoint(branches: Branches) -> nn.Module:
    return CheckpointedStage(_couplings(branches), max(1, math.ceil(math.sqrt(len(branches)))))


def _revgrad_off(branches: Branches) -> nn.Module:
    return revgrad.reversible(_couplings(branches), check="off")


def _revgrad_correct(branches: Branches) -> nn.Module:
    return revgrad.reversible(_couplings(branches), check="correct")


def _memcnn(branches: Branches) -> nn.Module:
    return nn.Sequential(
        *(
            memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(f, g), keep_input=False, keep_input_inverse=False)
            for f, g in branches
        )
    )


def _revlib(branches: Branches) -> nn.Module:
    return revlib.ReversibleSequential(*(m for pair in branches for m in pair), split_dim=1)


BUILDERS: dict[str, Callable[[Branches], nn.Module]] = {
    "plain": _plain,
    "checkpoint": _checkpoint,
    "revgrad-off": _revgrad_off,
    "revgrad-correct": _revgrad_correct,
    "memcnn": _memcnn,
    "revlib": _revlib,
}
PROVIDERS: tuple[str, ...] = tuple(BUILDERS)


def build(provider: str, branches: Branches) -> Stage:
    """``provider``'s stage over a deep copy of ``branches`` (identical initial weights for all)."""
    own = copy.deepcopy(branches)
    return Stage(provider, BUILDERS[provider](own), own)


# --------------------------------------------------------------------------------------------------
# One training step.


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def pin_malloc() -> bool:
    """Keep freed memory in glibc's heap between steps (``mallopt``); True when it took effect.

    By default glibc returns freed memory to the kernel (heap trimming, and ``mmap`` for blocks above
    a threshold that adapts to what was freed last), so a step may touch megabytes of fresh pages
    again, depending on what ran before it. On the VM this benchmark was written on a page fault costs
    tens of microseconds: one provider measured 240 ms per step with warm pages and 360 ms when
    re-faulting 10 MB per step. Pinning the thresholds (trim above 1 GiB, ``mmap`` only above
    32 MiB, the largest value glibc accepts) makes every provider run on warm pages. It does not
    change what :class:`revgrad.memory.MemoryProbe` counts (bytes allocated, not bytes mapped).
    """
    path = ctypes.util.find_library("c")
    if path is None:
        return False
    try:
        mallopt = ctypes.CDLL(path).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30)) and bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20))


def make_data(cfg: StageConfig, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The stage input and the upstream gradient ``dL/dy`` of every step, from ``cfg.seed``."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(cfg.input_shape, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(cfg.input_shape, generator=gen, dtype=torch.float64) / math.sqrt(math.prod(cfg.input_shape))
    return x.to(dtype), grad_out.to(dtype)


def fresh_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(leaf, h)``: a new leaf copy of ``x`` and the stage input ``h``, a non-leaf copy of the leaf.

    ``h`` stands for the output of the layers before the stage (``dL/dx`` arrives in ``leaf.grad``).
    It is a new tensor for every step because memcnn frees its input's storage in forward. It is
    not a leaf because memcnn 1.5.2 both sets ``.grad`` on its inputs and returns their gradient,
    which doubles ``dL/dx`` on a leaf input (see ``bench/RESULTS.md``).
    """
    leaf = x.detach().clone().requires_grad_()
    return leaf, leaf.clone()


def train_step(stage: Stage, h: torch.Tensor, grad_out: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """The timed step: forward, backward with the upstream gradient ``grad_out``, ``zero_grad``."""
    out = stage.module(h)
    out.backward(grad_out)
    optimizer.zero_grad(set_to_none=True)


def make_optimizer(stage: Stage) -> torch.optim.Optimizer:
    """The optimizer whose ``zero_grad`` ends every step (no ``step``: weights stay at their init)."""
    return torch.optim.SGD(stage.module.parameters(), lr=0.0)


def held_bytes(stage: Stage, x: torch.Tensor, grad_out: torch.Tensor) -> int:
    """Bytes that ``stage``'s forward leaves allocated until backward (glibc count, CPU only).

    The stage input already exists when counting starts; the output counts (one activation for every
    provider). memcnn frees its input's storage, which counts as minus one activation.
    """
    stage.module.zero_grad(set_to_none=True)
    _leaf, h = fresh_input(x)
    with MemoryProbe("cpu") as probe:
        out = stage.module(h)
        held = probe.mark("held")
        out.backward(grad_out)
    stage.module.zero_grad(set_to_none=True)
    return held


# --------------------------------------------------------------------------------------------------
# Agreement with plain autograd.


def rel_error(actual: torch.Tensor | None, expected: torch.Tensor | None) -> float:
    """Relative L2 distance ``||a - e|| / ||e||`` in float64; ``inf`` when exactly one side is missing."""
    if actual is None or expected is None:
        return 0.0 if actual is None and expected is None else math.inf
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    num = torch.linalg.vector_norm(a - e).item()
    den = torch.linalg.vector_norm(e).item()
    return num if den == 0.0 else num / den


@dataclass
class StepResult:
    """What one training step produced: the output, ``dL/dx``, parameter grads and BN buffers after it."""

    output: torch.Tensor
    grad_input: torch.Tensor | None
    grads: dict[str, torch.Tensor | None]
    buffers: dict[str, torch.Tensor]

    def all_grads(self) -> torch.Tensor | None:
        """Every parameter gradient, flattened and concatenated (None when any is missing)."""
        if any(g is None for g in self.grads.values()):
            return None
        return torch.cat([g.flatten() for g in self.grads.values() if g is not None])


def run_step(stage: Stage, x: torch.Tensor, grad_out: torch.Tensor) -> StepResult:
    """One forward + backward of ``stage`` (train mode) on a fresh copy of ``x``, keeping the results."""
    stage.module.train()
    stage.module.zero_grad(set_to_none=True)
    leaf, h = fresh_input(x)
    out = stage.module(h)
    out.backward(grad_out)
    params = stage.named_branch_parameters()
    return StepResult(
        output=out.detach().clone(),
        grad_input=None if leaf.grad is None else leaf.grad.clone(),
        grads={k: None if p.grad is None else p.grad.clone() for k, p in params.items()},
        buffers={k: b.detach().clone() for k, b in stage.named_branch_buffers().items()},
    )


@dataclass
class Errors:
    """Relative errors of one step against a reference step."""

    output: float
    grad_input: float
    grads: float  # all parameter gradients together
    worst_param: float  # the largest over parameter tensors
    worst_param_name: str
    bn_buffers: float  # BatchNorm running statistics after the step (informational)

    @classmethod
    def between(cls, got: StepResult, ref: StepResult) -> Errors:
        per_param = {k: rel_error(got.grads.get(k), g) for k, g in ref.grads.items()}
        worst = max(per_param, key=lambda k: per_param[k])
        return cls(
            output=rel_error(got.output, ref.output),
            grad_input=rel_error(got.grad_input, ref.grad_input),
            grads=rel_error(got.all_grads(), ref.all_grads()),
            worst_param=per_param[worst],
            worst_param_name=worst,
            bn_buffers=max((rel_error(got.buffers.get(k), b) for k, b in ref.buffers.items()), default=0.0),
        )

    @classmethod
    def failed(cls) -> Errors:
        return cls(math.inf, math.inf, math.inf, math.inf, "", math.inf)

    def gradient_errors(self) -> tuple[float, float, float]:
        return self.grad_input, self.grads, self.worst_param


FP64_TOL = 1e-10
FP32_TOL = 1e-4


@dataclass
class Agreement:
    """One provider's step against plain autograd's, in float64 (exactness) and float32 (as timed).

    * float64 (on :func:`exactness_config`): output, ``dL/dx`` and every parameter tensor's gradient
      within :data:`FP64_TOL`: the provider computes the same function and the same gradients.
    * float32: the output within :data:`FP32_TOL`; ``dL/dx``, all parameter gradients together and the
      worst parameter tensor within ``max(FP32_TOL, 2 * noise)``, where ``noise`` is the same error of
      plain autograd in float32 against plain autograd in float64. In float32 a rebuilt activation that
      differs from plain's by one rounding flips a ReLU whose input is within an ulp of zero, and one
      flipped element moves the gradient by about ``1 / sqrt(elements)`` (a few 1e-4 here): plain
      float32 itself is that far from the exact gradient (see ``bench/RESULTS.md``).
    """

    provider: str
    fp64: Errors
    fp32: Errors
    fp32_noise: Errors  # plain float32 against plain float64
    error: str | None = None

    @property
    def ok_fp64(self) -> bool:
        e = self.fp64
        return self.error is None and max(e.output, *e.gradient_errors()) <= FP64_TOL

    @property
    def ok_fp32(self) -> bool:
        e, n = self.fp32, self.fp32_noise
        if self.error is not None or e.output > FP32_TOL:
            return False
        pairs = zip(e.gradient_errors(), n.gradient_errors(), strict=True)
        return all(err <= max(FP32_TOL, 2 * noise) for err, noise in pairs)

    @property
    def ok(self) -> bool:
        """The verdict: float64 agreement (float32 differences are reported, see ok_fp32)."""
        return self.ok_fp64

    def summary(self) -> str:
        if self.error is not None:
            return f"{self.provider}: error: {self.error}"
        a, b = self.fp64, self.fp32
        return (
            f"{self.provider}: fp64 out {a.output:.1e} dx {a.grad_input:.1e} params {a.grads:.1e} "
            f"(worst tensor {a.worst_param:.1e}) | fp32 out {b.output:.1e} dx {b.grad_input:.1e} "
            f"params {b.grads:.1e} (worst tensor {b.worst_param:.1e}, {b.worst_param_name}) | "
            f"BN stats {a.bn_buffers:.1e} | fp32 {'within' if self.ok_fp32 else 'beyond'} 2x plain's own "
            f"fp32 noise | {'agrees' if self.ok else 'DISAGREES'} in float64"
        )


def _step_in(provider: str, branches: Branches, cfg: StageConfig, dtype: torch.dtype) -> StepResult:
    own = copy.deepcopy(branches)
    for f, g in own:
        f.to(dtype)
        g.to(dtype)
    x, grad_out = make_data(cfg, dtype)
    return run_step(build(provider, own), x, grad_out)


def exactness_config(cfg: StageConfig) -> StageConfig:
    """The float64 check's stage: same blocks and channels, batch and image cut to at most 8.

    Agreement in float64 tests the algorithm, which does not depend on these sizes; float64
    convolutions are slow on CPU.
    """
    return replace(cfg, batch=min(cfg.batch, 8), size=min(cfg.size, 8))


def compare_with_plain(cfg: StageConfig, providers: tuple[str, ...] = PROVIDERS) -> dict[str, Agreement]:
    """One step of every provider from the same weights and data, against plain autograd's step.

    float64 on :func:`exactness_config`, float32 on ``cfg`` itself (the timed stage); the float32
    noise is plain float32 against plain float64, both on ``cfg``.
    """
    branches = make_branches(cfg)
    small = exactness_config(cfg)
    ref64_small = _step_in("plain", branches, small, torch.float64)
    ref64 = _step_in("plain", branches, cfg, torch.float64)
    ref32 = _step_in("plain", branches, cfg, torch.float32)
    noise = Errors.between(ref32, ref64)
    out: dict[str, Agreement] = {}
    for provider in providers:
        try:
            e64 = Errors.between(_step_in(provider, branches, small, torch.float64), ref64_small)
            e32 = Errors.between(_step_in(provider, branches, cfg, torch.float32), ref32)
        except Exception as exc:  # a provider that crashes is reported, not hidden
            out[provider] = Agreement(provider, Errors.failed(), Errors.failed(), noise, error=repr(exc))
            continue
        out[provider] = Agreement(provider, e64, e32, noise)
    return out
