"""Benchmark workloads and providers: one model trained by plain autograd, checkpointing, revgrad and
its peers, every provider from the same initial weights.

Providers (:data:`PROVIDERS`); each wraps a fresh copy of the same model (identical weights and
BatchNorm buffers, drawn from the workload's seed):

* ``plain``: plain autograd (the reference);
* ``checkpoint``: ``torch.utils.checkpoint`` over every run of blocks with ``ceil(sqrt(N))``
  segments (``checkpoint_sequential``, non-reentrant; the last segment keeps its graph);
* ``revgrad-off`` / ``revgrad-correct``: ``revgrad.reversible(model, check="off" | "correct")``;
* ``memcnn``: every additive coupling as ``memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(f,
  g), keep_input=False, keep_input_inverse=False)``. It frees the storage of its input in forward, so
  every step needs a fresh input tensor, and doubles ``dL/dx`` when that input is a leaf (hence
  :func:`fresh_input`);
* ``revlib``: every run of additive couplings as ``revlib.ReversibleSequential(f_0, g_0, f_1, g_1,
  ...)``. RevLib's module ``k`` maps the stream pair ``(a, b)`` to ``(b, a + m_k(b))``; from ``(x1,
  x2)``, ``f`` gives ``(x2, x1 + f(x2)) = (x2, y1)`` and ``g`` then ``(y1, x2 + g(y1)) = (y1, y2)``:
  exactly the revgrad coupling, with the same channel split and ``cat([y1, y2])`` output.

:data:`TRANSFORMER_PEERS`, two more peers that are not in :data:`PROVIDERS` (the RevNet runs'
default), offered by the transformer workloads:

* ``reformer``: every run of additive couplings as reformer_pytorch's
  ``reversible.ReversibleSequence([(f_0, g_0), (f_1, g_1), ...])``; its ``ReversibleBlock`` computes
  ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)`` on the halves of dim 2, so it expresses couplings on the
  last dimension of ``[B, T, 2d]`` only (not the RevNet couplings on channels);
* ``revtorch``: every run as ``revtorch.ReversibleSequence(ModuleList(ReversibleBlock(f, g,
  split_along_dim=dim)))``: the same coupling on any dimension.

Both take ``f`` and ``g`` as arbitrary modules: they run the very ``SelfAttention`` and ``MLP`` of
the revgrad model (no attention of their own), and each saves only its output for backward.

The peers are optional: without them their providers are skipped (:func:`unavailable` says why),
never a crash. Their wrappers express additive couplings only, so they run the RevNet and transformer
workloads, not the Glow stage.

Workloads (:class:`Workload`):

* :func:`revnet_stage`: ``N`` additive couplings ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)`` on the channel
  halves of ``x: [B, C, H, W]``, ``f`` and ``g`` the RevNet basic residual function on ``C/2``
  channels (the 12-block stage of the CPU speed figures);
* :func:`revnet_model`: RevNet-38/110/164 (:mod:`revgrad.models`) on ``[B, 3, 32, 32]``; the
  downsampling units keep plain autograd in every provider;
* :func:`glow_stage`: ``K`` Glow steps (ActNorm, LU 1x1 convolution, sigmoid affine coupling) on
  ``[B, C, H, W]``, returning ``(z, logdet[B])``;
* :func:`transformer_stack`: the ``N`` reversible layers of :func:`revgrad.models.rev_lm` (causal
  pre-LN attention and MLP, couplings on the last dimension) on ``h: [B, T, 2d]``;
* :func:`rev_vit_model`: :func:`revgrad.models.rev_vit` with ``N`` layers on ``[B, 3, S, S]``; the
  patch embedding, the fusion and the head keep plain autograd in every provider.

A training step (:class:`TrainStep`) is forward, backward with fixed upstream gradients for every
output, then the gradients are set to None as ``optimizer.zero_grad()`` does (no optimizer step:
the weights stay at their init).
:func:`compare_with_plain` checks that every provider computes plain autograd's output and gradients
(float64 within :data:`FP64_TOL`), so that no benchmark reports a speedup for different math.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import ModuleType

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from .. import models
from ..blocks import layers
from ..blocks.couplings import AdditiveCoupling, AffineCoupling
from ..engine.sequential import reversible
from ..models.glow import glow_conditioner

__all__ = [
    "ALL_PROVIDERS",
    "FP32_TOL",
    "FP64_TOL",
    "PEERS",
    "PROVIDERS",
    "TRANSFORMER_PEERS",
    "Agreement",
    "Branches",
    "CheckpointedStage",
    "Errors",
    "FlowChain",
    "Stage",
    "StageConfig",
    "StepResult",
    "TrainStep",
    "Workload",
    "available_providers",
    "compare_with_plain",
    "exactness_config",
    "fresh_input",
    "glow_stage",
    "make_branches",
    "peer",
    "rel_error",
    "rev_vit_model",
    "revnet_model",
    "revnet_stage",
    "run_step",
    "transformer_stack",
    "unavailable",
]

PROVIDERS: tuple[str, ...] = ("plain", "checkpoint", "revgrad-off", "revgrad-correct", "memcnn", "revlib")
TRANSFORMER_PEERS: tuple[str, ...] = ("reformer", "revtorch")  # offered by the transformer workloads
ALL_PROVIDERS: tuple[str, ...] = (*PROVIDERS, *TRANSFORMER_PEERS)
PEERS: tuple[str, ...] = ("memcnn", "revlib", *TRANSFORMER_PEERS)  # optional packages, one provider each
# What each peer imports, and the package that installs it.
_PEER_IMPORTS = {"reformer": "reformer_pytorch.reversible"}
_PEER_PACKAGES = {"reformer": "reformer_pytorch"}

Branches = list[tuple[nn.Module, nn.Module]]
Converter = Callable[[nn.Module], nn.Module]


# --------------------------------------------------------------------------------------------------
# The peers (optional imports).

_PEER_MODULES: dict[str, ModuleType | None] = {}
_PEER_ERRORS: dict[str, str] = {}  # why a peer that is installed failed to import


def peer(name: str) -> ModuleType | None:
    """The module of peer ``name`` (a provider of :data:`PEERS`: ``memcnn``, ``revlib``, ``revtorch``;
    ``reformer`` -> ``reformer_pytorch.reversible``), or None when it is not installed or fails to
    import (imported once)."""
    if name not in _PEER_MODULES:
        with warnings.catch_warnings():
            # memcnn 1.5.2 decorates with the deprecated torch.cuda.amp.custom_fwd/custom_bwd at import.
            warnings.simplefilter("ignore", FutureWarning)
            try:
                _PEER_MODULES[name] = importlib.import_module(_PEER_IMPORTS.get(name, name))
            except ModuleNotFoundError:
                _PEER_MODULES[name] = None
            except Exception as exc:  # a broken install is a skipped provider, not a crashed benchmark
                _PEER_MODULES[name] = None
                _PEER_ERRORS[name] = repr(exc)
    return _PEER_MODULES[name]


# --------------------------------------------------------------------------------------------------
# Workloads.


@dataclass(frozen=True)
class Workload:
    """A model every provider builds from the same initial weights, and its input.

    Attributes:
        name: short name (``"revnet-stage-32"``, ``"revnet38"``, ``"glow-stage-8"``).
        description: one line for reports.
        make: builds the model with plain autograd's structure, the same weights at every call.
        sample_shape: the input's shape without the batch dimension.
        batch: the batch size of :meth:`input`.
        converters: per provider, turns a model from ``make`` into that provider's module, reusing
            its parameter and buffer tensors (in place or by wrapping).
        unsupported: per provider the workload cannot express, the reason.
        seed: seeds the input and the upstream gradients.
    """

    name: str
    description: str
    make: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]
    batch: int
    converters: Mapping[str, Converter]
    unsupported: Mapping[str, str] = field(default_factory=dict)
    seed: int = 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, *self.sample_shape)

    def activation_bytes(self, element_size: int = 4) -> int:
        """Bytes of one input activation ``[B, *sample_shape]`` (fp32 by default): the memory unit."""
        return math.prod(self.input_shape) * element_size

    def with_batch(self, batch: int) -> Workload:
        return replace(self, batch=batch)

    def input(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """The input ``[B, *sample_shape]``, drawn in float64 from ``seed`` (same values in every dtype)."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        return torch.randn(self.input_shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    def build(self, provider: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Stage:
        """``provider``'s module over a fresh model (see :class:`Stage`); raises ``ValueError`` with the
        reason when the provider cannot run this workload here (:func:`unavailable`)."""
        reason = unavailable(provider, self)
        if reason is not None:
            raise ValueError(f"revgrad.tools.benchmark: {provider} cannot run {self.name}: {reason}")
        model = self.make().to(device=device, dtype=dtype)
        params = dict(model.named_parameters())
        buffers = {k: b for k, b in model.named_buffers() if b.is_floating_point()}
        return Stage(provider, self.converters[provider](model), params, buffers)


def unavailable(provider: str, workload: Workload | None = None) -> str | None:
    """Why ``provider`` cannot run (``workload`` here), or None when it can."""
    if provider not in ALL_PROVIDERS:
        return f"unknown provider (known: {', '.join(ALL_PROVIDERS)})"
    if workload is not None and provider in workload.unsupported:
        return workload.unsupported[provider]
    if workload is not None and provider not in workload.converters:
        return f"not offered for {workload.name}"
    if provider in PEERS and peer(provider) is None:
        if provider in _PEER_ERRORS:
            return f"{provider} failed to import: {_PEER_ERRORS[provider]}"
        return f"{provider} is not installed (pip install --no-deps {_PEER_PACKAGES.get(provider, provider)})"
    return None


def available_providers(workload: Workload, requested: Sequence[str] = PROVIDERS) -> tuple[list[str], list[str]]:
    """``(providers that can run workload here, in order; "PROVIDER: skipped, REASON" for the others)``."""
    chosen, skipped = [], []
    for p in requested:
        reason = unavailable(p, workload)
        if reason is None:
            chosen.append(p)
        else:
            skipped.append(f"{p}: skipped, {reason}")
    return chosen, skipped


@dataclass
class Stage:
    """One provider's module, with the model's parameters and floating-point buffers under the names
    they have in plain autograd's model (the same for every provider)."""

    provider: str
    module: nn.Module
    parameters: dict[str, nn.Parameter]
    buffers: dict[str, torch.Tensor]


@dataclass(frozen=True)
class StageConfig:
    """Sizes of the RevNet stage. Defaults: a plain-autograd step of about 130 ms on 2 cores (160 ms on one)."""

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


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` under ``torch.manual_seed(seed)``, leaving the caller's CPU generator as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def make_branches(cfg: StageConfig) -> Branches:
    """The ``(f, g)`` pair of every block of the RevNet stage, drawn from ``cfg.seed``."""
    if cfg.channels % 2:
        raise ValueError(f"channels must be even to split in halves, got {cfg.channels}")
    half = cfg.channels // 2

    def pairs() -> nn.Module:
        return nn.ModuleList(nn.ModuleList([models.revnet_branch(half), models.revnet_branch(half)])
                             for _ in range(cfg.blocks))

    return [(f, g) for f, g in _seeded(cfg.seed, pairs)]


class CheckpointedStage(nn.Module):
    """``checkpoint_sequential`` over ``body`` (non-reentrant); the last segment keeps its graph.

    Shapes: as ``body``.
    """

    def __init__(self, body: nn.Sequential, segments: int) -> None:
        super().__init__()
        self.body = body
        self.segments = segments

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint_sequential(self.body, self.segments, x, use_reentrant=False)


def _run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blocks in order; ``(y, sum of the logdets [B])`` of those that return ``(y, logdet)``."""
    logdet = None
    for block in blocks:
        out = block(x)
        if isinstance(out, tuple):
            x, ld = out[0], out[1]
            logdet = ld if logdet is None else logdet + ld
        else:
            x = out
    return x, logdet


class FlowChain(nn.Module):
    """A chain of flow blocks with plain autograd, summing log-determinants (``nn.Sequential`` cannot
    chain ``(y, logdet)``); ``segments`` > 1 checkpoints all segments but the last, as
    ``checkpoint_sequential`` does.

    Shapes: ``forward(x: [B, ...]) -> (y, logdet [B])``, or ``y`` when no block returns a logdet.
    """

    def __init__(self, body: nn.Sequential, segments: int = 1) -> None:
        super().__init__()
        self.body = body
        self.segments = segments

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        blocks = list(self.body)
        size = math.ceil(len(blocks) / max(1, self.segments))
        parts = [blocks[i : i + size] for i in range(0, len(blocks), size)]
        logdet = None
        for i, part in enumerate(parts):
            if i < len(parts) - 1 and torch.is_grad_enabled():
                x, ld = checkpoint(_run_blocks, part, x, use_reentrant=False)
            else:
                x, ld = _run_blocks(part, x)
            if ld is not None:
                logdet = ld if logdet is None else logdet + ld
        return x if logdet is None else (x, logdet)


def _sqrt_segments(n: int) -> int:
    return max(1, math.ceil(math.sqrt(n)))


def _holds_couplings(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and any(isinstance(m, AdditiveCoupling) for m in module)


def _map_stages(model: nn.Module, fn: Callable[[nn.Sequential], nn.Module]) -> nn.Module:
    """``fn`` applied to every ``nn.Sequential`` that holds additive couplings (``model`` itself if it is one)."""
    if _holds_couplings(model):
        return fn(model)
    for name, child in list(model.named_children()):
        setattr(model, name, _map_stages(child, fn))
    return model


def _replace_coupling_runs(stage: nn.Sequential, convert: Callable[[list[AdditiveCoupling]], list[nn.Module]]):
    """``stage`` with every run of consecutive additive couplings replaced by ``convert(run)``."""
    out: list[nn.Module] = []
    run: list[AdditiveCoupling] = []
    for child in [*stage, None]:
        if isinstance(child, AdditiveCoupling):
            run.append(child)
            continue
        if run:
            out += convert(run)
            run = []
        if child is not None:
            out.append(child)
    return nn.Sequential(*out)


def _split_dim(run: list[AdditiveCoupling]) -> int:
    """The dimension every coupling of ``run`` splits (a peer wraps the run with one)."""
    dims = {c.dim for c in run}
    if len(dims) != 1:
        raise ValueError(f"revgrad.tools.benchmark: a run of couplings split on several dimensions {sorted(dims)}")
    if any(getattr(c, "scale1", 1.0) != 1.0 or getattr(c, "scale2", 1.0) != 1.0 for c in run):
        raise ValueError("revgrad.tools.benchmark: the peers express unscaled additive couplings only")
    return dims.pop()


def _memcnn_run(run: list[AdditiveCoupling]) -> list[nn.Module]:
    memcnn = peer("memcnn")
    dim = _split_dim(run)
    return [
        memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(c.f, c.g, split_dim=dim), keep_input=False,
                                       keep_input_inverse=False)
        for c in run
    ]


def _revlib_run(run: list[AdditiveCoupling]) -> list[nn.Module]:
    return [peer("revlib").ReversibleSequential(*(m for c in run for m in (c.f, c.g)), split_dim=_split_dim(run))]


def _revtorch_run(run: list[AdditiveCoupling]) -> list[nn.Module]:
    revtorch = peer("revtorch")
    dim = _split_dim(run)
    return [revtorch.ReversibleSequence(nn.ModuleList(
        revtorch.ReversibleBlock(c.f, c.g, split_along_dim=dim) for c in run))]


def _reformer_run(run: list[AdditiveCoupling]) -> list[nn.Module]:
    if _split_dim(run) not in (2, -1):
        raise ValueError("revgrad.tools.benchmark: reformer_pytorch's ReversibleBlock splits dim 2 of [B, T, 2d] "
                         "only")
    return [peer("reformer").ReversibleSequence([(c.f, c.g) for c in run])]  # arg_route: no extra arguments


def _revgrad(check: str) -> Converter:
    return lambda model: reversible(model, check=check)


def _peer_converter(convert_run: Callable[[list[AdditiveCoupling]], list[nn.Module]]) -> Converter:
    return lambda model: _map_stages(model, lambda s: _replace_coupling_runs(s, convert_run))


COUPLING_CONVERTERS: dict[str, Converter] = {
    "plain": lambda model: model,
    "checkpoint": lambda model: _map_stages(model, lambda s: CheckpointedStage(s, _sqrt_segments(len(s)))),
    "revgrad-off": _revgrad("off"),
    "revgrad-correct": _revgrad("correct"),
    "memcnn": _peer_converter(_memcnn_run),
    "revlib": _peer_converter(_revlib_run),
    "revtorch": _peer_converter(_revtorch_run),
}
# The transformer workloads: couplings on the last dimension of [B, T, 2d], which reformer_pytorch expresses too.
LAST_DIM_CONVERTERS: dict[str, Converter] = COUPLING_CONVERTERS | {"reformer": _peer_converter(_reformer_run)}

_CHANNEL_SPLIT = {
    "reformer": "not expressible: reformer_pytorch's ReversibleBlock splits dim 2 (the features of [B, T, 2d]); "
                "these couplings split channels (dim 1)",
}


def revnet_stage(cfg: StageConfig | None = None, **sizes: int) -> Workload:
    """The RevNet stage: ``cfg.blocks`` additive couplings on ``x: [cfg.batch, cfg.channels, cfg.size,
    cfg.size]``, branches from :func:`make_branches` (``sizes`` override ``cfg``'s fields)."""
    cfg = replace(cfg or StageConfig(), **sizes)
    if cfg.channels % 2 or cfg.blocks < 1:
        raise ValueError(f"revgrad.tools.benchmark: the stage needs >= 1 block and even channels, got {cfg}")
    return Workload(
        name=f"revnet-stage-{cfg.blocks}",
        description=(
            f"{cfg.blocks} additive couplings, branches BN-ReLU-Conv3x3-BN-ReLU-Conv3x3 on "
            f"{cfg.channels // 2} channels, input [B, {cfg.channels}, {cfg.size}, {cfg.size}]"
        ),
        make=lambda: nn.Sequential(*(AdditiveCoupling(f, g) for f, g in make_branches(cfg))),
        sample_shape=cfg.input_shape[1:],
        batch=cfg.batch,
        converters=COUPLING_CONVERTERS,
        unsupported=_CHANNEL_SPLIT,
        seed=cfg.seed,
    )


REVNETS: tuple[str, ...] = ("revnet38", "revnet110", "revnet164")


def revnet_model(name: str, batch: int = 8, size: int = 32, seed: int = 0) -> Workload:
    """RevNet-38/110/164 (``name``) for 10 classes on ``[batch, 3, size, size]``; output logits ``[B, 10]``.

    Every provider converts the stages' runs of additive couplings; the downsampling units, the stem
    and the head keep plain autograd (``checkpoint`` checkpoints whole stages, them included).
    """
    if name not in REVNETS:
        raise ValueError(f"revgrad.tools.benchmark: unknown RevNet {name!r} (known: {', '.join(REVNETS)})")
    build = getattr(models, name)
    return Workload(
        name=name,
        description=f"{name} (revgrad.models), 10 classes, input [B, 3, {size}, {size}]",
        make=lambda: _seeded(seed, lambda: build(num_classes=10, memory_saving=False)),
        sample_shape=(3, size, size),
        batch=batch,
        converters=COUPLING_CONVERTERS,
        unsupported=_CHANNEL_SPLIT,
        seed=seed,
    )


_NO_LOGDET_PEERS = (
    "not expressible: its wrappers take additive couplings, not flow blocks that return a log-determinant "
    "(ActNorm, 1x1 convolution, affine coupling)"
)


def glow_stage(steps: int = 8, channels: int = 12, size: int = 16, hidden: int = 64, batch: int = 8,
               seed: int = 0) -> Workload:
    """``steps`` Glow steps on ``x: [batch, channels, size, size]`` (CIFAR after one squeeze by default).

    Each step: :class:`revgrad.ActNorm` (initialized once from a seeded batch, so every provider
    starts from the same values), :class:`revgrad.InvertibleConv1x1` (LU) and a sigmoid
    :class:`revgrad.AffineCoupling` whose network is Glow's ``Conv3x3 -> ReLU -> Conv1x1 -> ReLU ->
    Conv3x3`` of width ``hidden`` (last conv small and random rather than zero, so that the
    couplings are not the identity). Output ``(z [B, C, H, W], logdet [B])``.
    """
    if channels < 2:
        raise ValueError(f"revgrad.tools.benchmark: glow_stage needs at least 2 channels, got {channels}")
    c1, c2 = channels // 2, channels - channels // 2

    def build() -> nn.Module:
        blocks: list[nn.Module] = []
        for _ in range(steps):
            net = glow_conditioner(c1, 2 * c2, hidden)
            nn.init.normal_(net[-1].weight, std=1e-2)
            blocks += [layers.ActNorm(channels), layers.InvertibleConv1x1(channels, lu=True),
                       AffineCoupling(net, scale="sigmoid")]
        body = nn.Sequential(*blocks)
        with torch.no_grad():  # ActNorm's data-dependent init, once, from a fixed batch
            FlowChain(body)(torch.randn(max(batch, 16), channels, size, size))
        return body

    return Workload(
        name=f"glow-stage-{steps}",
        description=(
            f"{steps} Glow steps (ActNorm, LU 1x1 conv, sigmoid affine coupling, width {hidden}), "
            f"input [B, {channels}, {size}, {size}]"
        ),
        make=lambda: _seeded(seed, build),
        sample_shape=(channels, size, size),
        batch=batch,
        converters={
            "plain": FlowChain,
            "checkpoint": lambda body: FlowChain(body, _sqrt_segments(len(body))),
            "revgrad-off": _revgrad("off"),
            "revgrad-correct": _revgrad("correct"),
        },
        unsupported={p: _NO_LOGDET_PEERS for p in PEERS},
        seed=seed,
    )


def transformer_stack(depth: int = 8, dim: int = 256, tokens: int = 256, heads: int = 4, batch: int = 8,
                      mlp_ratio: float = 4.0, seed: int = 0) -> Workload:
    """The ``depth`` reversible layers of :func:`revgrad.models.rev_lm` on ``h: [batch, tokens, 2 * dim]``.

    Each layer is ``AdditiveCoupling(SelfAttention(dim, heads, causal=True), MLP(dim, mlp_ratio * dim),
    dim=-1)`` with rev_lm's initialization (``memory_saving=False``: a :class:`revgrad.PlainSequential`
    that every provider converts); no embedding, fusion or head, as the RevNet stage has no stem. Output
    ``[B, T, 2d]``. Every provider runs these very modules: the peers wrap the layers' ``f`` and ``g``.
    """
    if depth < 1 or dim < 1 or tokens < 1 or heads < 1 or dim % heads:
        raise ValueError(f"revgrad.tools.benchmark: transformer_stack needs depth, tokens >= 1 and dim divisible by "
                         f"heads, got depth {depth}, dim {dim}, tokens {tokens}, heads {heads}")

    def build() -> nn.Module:
        return models.rev_lm(vocab_size=2, dim=dim, depth=depth, heads=heads, max_len=tokens, mlp_ratio=mlp_ratio,
                             memory_saving=False).layers

    return Workload(
        name=f"revlm-stack-{depth}",
        description=(
            f"{depth} reversible transformer layers of rev_lm (causal pre-LN attention, {heads} heads, MLP "
            f"{mlp_ratio:g}x; coupling on the last dim), d {dim} per stream, input [B, {tokens}, {2 * dim}]"
        ),
        make=lambda: _seeded(seed, build),
        sample_shape=(tokens, 2 * dim),
        batch=batch,
        converters=LAST_DIM_CONVERTERS,
        seed=seed,
    )


def rev_vit_model(depth: int = 12, dim: int = 384, heads: int = 6, size: int = 224, patch: int = 16,
                  batch: int = 8, num_classes: int = 1000, seed: int = 0) -> Workload:
    """:func:`revgrad.models.rev_vit` with ``depth`` layers on ``[batch, 3, size, size]``, logits ``[B, num_classes]``.

    The defaults are RevViT-S/16 (``dim=768, heads=12``: RevViT-B/16). Every provider converts the
    reversible layers; the patch embedding, the stream fusion, the final LayerNorm and the head keep
    plain autograd (``checkpoint`` checkpoints the layers, ``ceil(sqrt(N))`` segments).
    """
    if size % patch or dim % heads or depth < 1:
        raise ValueError(f"revgrad.tools.benchmark: rev_vit_model needs size divisible by patch, dim by heads and "
                         f"depth >= 1, got size {size}, patch {patch}, dim {dim}, heads {heads}, depth {depth}")
    tokens = (size // patch) ** 2

    def build() -> nn.Module:
        return models.rev_vit(img_size=size, patch_size=patch, num_classes=num_classes, dim=dim, depth=depth,
                              heads=heads, memory_saving=False)

    return Workload(
        name=f"rev-vit-{depth}",
        description=(
            f"{depth} RevViT layers (d {dim} per stream, {heads} heads, patch {patch}: {tokens} tokens) with patch "
            f"embedding and {num_classes}-class head, input [B, 3, {size}, {size}]"
        ),
        make=lambda: _seeded(seed, build),
        sample_shape=(3, size, size),
        batch=batch,
        converters=LAST_DIM_CONVERTERS,
        seed=seed,
    )


# --------------------------------------------------------------------------------------------------
# One training step.


def fresh_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(leaf, h)``: a new leaf copy of ``x`` and the model input ``h``, a non-leaf copy of the leaf.

    ``h`` stands for the output of the layers before the model (``dL/dx`` arrives in ``leaf.grad``).
    It is a new tensor for every step because memcnn frees its input's storage in forward. It is
    not a leaf because memcnn 1.5.2 both sets ``.grad`` on its inputs and returns their gradient,
    which doubles ``dL/dx`` on a leaf input (see ``bench/RESULTS.md``).
    """
    leaf = x.detach().clone().requires_grad_()
    return leaf, leaf.clone()


def _outputs(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def upstream_like(outputs: Sequence[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    """Fixed upstream gradients ``dL/d output`` for every output (``randn / sqrt(numel)``, drawn in
    float64 from ``seed``): the same values for every provider and dtype."""
    gen = torch.Generator().manual_seed(seed + 2)
    return [
        (torch.randn(o.shape, generator=gen, dtype=torch.float64) / math.sqrt(max(1, o.numel()))).to(o)
        for o in outputs
    ]


class TrainStep:
    """One provider's training step on ``x`` (``[B, ...]``): forward, backward, ``zero_grad(set_to_none=True)``.

    :meth:`prepare` makes the step's fresh input (outside any timed region); :meth:`run` is the step.
    The upstream gradients are drawn at the first step from the outputs' shapes (:func:`upstream_like`).
    The module is put in training mode.
    """

    def __init__(self, stage: Stage, x: torch.Tensor, seed: int = 0) -> None:
        self.stage = stage
        self.x = x
        self.seed = seed
        self.leaf: torch.Tensor | None = None
        self.h: torch.Tensor | None = None
        self.upstream: list[torch.Tensor] | None = None
        stage.module.train()

    def prepare(self) -> None:
        self.leaf, self.h = fresh_input(self.x)

    def forward(self) -> tuple[torch.Tensor, ...]:
        """The model's outputs on the prepared input (prepares one if needed).

        The input stays referenced until :meth:`backward` ends, as the output of the layers before
        the model would be: memory counts then see what the model itself keeps or frees.
        """
        if self.h is None:
            self.prepare()
        outputs = _outputs(self.stage.module(self.h))
        if self.upstream is None:
            self.upstream = upstream_like(outputs, self.seed)
        return outputs

    def prime(self) -> None:
        """Draw the upstream gradients now, from a forward without grad, if no step drew them yet:
        a step measured right after does not count them (as after a warm-up step)."""
        if self.upstream is None:
            self.prepare()
            with torch.no_grad():
                self.upstream = upstream_like(_outputs(self.stage.module(self.h)), self.seed)
            self.h = None

    def backward(self, outputs: tuple[torch.Tensor, ...], zero_grad: bool = True) -> None:
        pairs = [(o, g) for o, g in zip(outputs, self.upstream or []) if o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        self.h = None
        if zero_grad:
            self.stage.module.zero_grad(set_to_none=True)  # what optimizer.zero_grad() does

    def run(self) -> None:
        self.backward(self.forward())


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
    """What one training step produced: the outputs, ``dL/dx``, parameter grads and buffers after it."""

    outputs: list[torch.Tensor]
    grad_input: torch.Tensor | None
    grads: dict[str, torch.Tensor | None]
    buffers: dict[str, torch.Tensor]

    @property
    def output(self) -> torch.Tensor:
        """All outputs flattened into one vector."""
        return torch.cat([o.flatten() for o in self.outputs])

    def all_grads(self) -> torch.Tensor | None:
        """Every parameter gradient, flattened and concatenated (None when any is missing)."""
        if any(g is None for g in self.grads.values()):
            return None
        return torch.cat([g.flatten() for g in self.grads.values() if g is not None])


def run_step(stage: Stage, x: torch.Tensor, seed: int = 0) -> StepResult:
    """One training-mode forward + backward of ``stage`` on a fresh copy of ``x``, keeping the results."""
    step = TrainStep(stage, x, seed)
    stage.module.zero_grad(set_to_none=True)
    step.prepare()
    leaf = step.leaf
    outputs = step.forward()
    step.backward(outputs, zero_grad=False)
    return StepResult(
        outputs=[o.detach().clone() for o in outputs],
        grad_input=None if leaf is None or leaf.grad is None else leaf.grad.clone(),
        grads={k: None if p.grad is None else p.grad.clone() for k, p in stage.parameters.items()},
        buffers={k: b.detach().clone() for k, b in stage.buffers.items()},
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

    * float64 (on the ``exact`` workload of :func:`compare_with_plain`): output, ``dL/dx`` and every
      parameter tensor's gradient within :data:`FP64_TOL`: the provider computes the same function
      and the same gradients.
    * float32: the output within :data:`FP32_TOL`; ``dL/dx``, all parameter gradients together and the
      worst parameter tensor within ``max(FP32_TOL, 2 * noise)``, where ``noise`` is the same error of
      plain autograd in float32 against plain autograd in float64. In float32 a rebuilt activation that
      differs from plain's by one rounding flips a ReLU whose input is within an ulp of zero, and one
      flipped element moves the gradient by about ``1 / sqrt(elements)`` (a few 1e-4 here): plain
      float32 itself is that far from the exact gradient (see ``bench/RESULTS.md``).
    """

    provider: str
    fp64: Errors
    fp32: Errors | None  # None when only float64 was checked
    fp32_noise: Errors | None  # plain float32 against plain float64
    error: str | None = None

    @property
    def ok_fp64(self) -> bool:
        e = self.fp64
        return self.error is None and max(e.output, *e.gradient_errors()) <= FP64_TOL

    @property
    def ok_fp32(self) -> bool:
        e, n = self.fp32, self.fp32_noise
        if self.error is not None or e is None or n is None or e.output > FP32_TOL:
            return False
        pairs = zip(e.gradient_errors(), n.gradient_errors(), strict=True)
        return all(err <= max(FP32_TOL, 2 * noise) for err, noise in pairs)

    @property
    def ok(self) -> bool:
        """The verdict: float64 agreement (float32 differences are reported, see ok_fp32)."""
        return self.ok_fp64

    @property
    def max_fp64_error(self) -> float:
        """The largest float64 relative error of the output, ``dL/dx`` and any parameter gradient."""
        return max(self.fp64.output, *self.fp64.gradient_errors())

    def summary(self) -> str:
        if self.error is not None:
            return f"{self.provider}: error: {self.error}"
        a, b = self.fp64, self.fp32
        text = (f"{self.provider}: fp64 out {a.output:.1e} dx {a.grad_input:.1e} params {a.grads:.1e} "
                f"(worst tensor {a.worst_param:.1e})")
        if b is not None:
            text += (
                f" | fp32 out {b.output:.1e} dx {b.grad_input:.1e} params {b.grads:.1e} (worst tensor "
                f"{b.worst_param:.1e}, {b.worst_param_name}) | fp32 {'within' if self.ok_fp32 else 'beyond'} "
                "2x plain's own fp32 noise"
            )
        return text + f" | BN stats {a.bn_buffers:.1e} | {'agrees' if self.ok else 'DISAGREES'} in float64"


def exactness_config(cfg: StageConfig) -> StageConfig:
    """The float64 check's stage: same blocks and channels, batch and image cut to at most 8.

    Agreement in float64 tests the algorithm, which does not depend on these sizes; float64
    convolutions are slow on CPU.
    """
    return replace(cfg, batch=min(cfg.batch, 8), size=min(cfg.size, 8))


def _step_in(provider: str, workload: Workload, dtype: torch.dtype, device: torch.device | str) -> StepResult:
    return run_step(workload.build(provider, dtype, device), workload.input(dtype, device), workload.seed)


def compare_with_plain(
    workload: Workload,
    providers: Sequence[str] = PROVIDERS,
    exact: Workload | None = None,
    fp32: bool = True,
    device: torch.device | str = "cpu",
) -> dict[str, Agreement]:
    """One step of every provider from the same weights and data, against plain autograd's step.

    float64 on ``exact`` (default: ``workload`` itself; pass a smaller one, float64 is slow on CPU),
    float32 on ``workload`` (skipped with ``fp32=False``); the float32 noise is plain float32 against
    plain float64, both on ``workload``. Everything runs on ``device``: on CUDA that is the engine's
    CUDA path (deferred checks, CUDA generators) that the timed runs take. Providers that cannot run
    the workload here are left out. A provider that raises is reported with the error, not hidden.
    """
    exact = exact or workload
    ref64_exact = _step_in("plain", exact, torch.float64, device)
    noise = ref32 = None
    if fp32:
        ref32 = _step_in("plain", workload, torch.float32, device)
        ref64 = ref64_exact if exact is workload else _step_in("plain", workload, torch.float64, device)
        noise = Errors.between(ref32, ref64)
    out: dict[str, Agreement] = {}
    for provider in providers:
        if unavailable(provider, workload) is not None:
            continue
        try:
            e64 = Errors.between(_step_in(provider, exact, torch.float64, device), ref64_exact)
            e32 = None if ref32 is None else Errors.between(_step_in(provider, workload, torch.float32, device),
                                                            ref32)
        except Exception as exc:  # a provider that crashes is reported, not hidden
            out[provider] = Agreement(provider, Errors.failed(), None, noise, error=repr(exc))
            continue
        out[provider] = Agreement(provider, e64, e32, noise)
    return out
