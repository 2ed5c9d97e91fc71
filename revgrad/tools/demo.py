"""``revgrad demo``: train a small reversible ResNet on scikit-learn's digits and show what revgrad saves.

The data set is :func:`sklearn.datasets.load_digits` (1797 grayscale images of 8x8 pixels, 10
classes), which ships with scikit-learn: nothing is downloaded. It is split into train and test sets
with a fixed seed (the same split whatever ``seed`` is) and standardized with the training set's
mean and standard deviation.

The model (:class:`RevResNet`) is a plain stem (``conv3x3 1 -> C``), then ``stages`` reversible
stages of ``depth`` :class:`revgrad.AdditiveCoupling` blocks each (``f`` and ``g``:
``BN-ReLU-conv3x3-BN-ReLU-conv3x3`` on ``C/2`` channels), with a non-invertible :class:`Downsample`
(stride 2, channels doubled) between stages, then global average pooling and a linear head. All
stages live in one ``nn.Sequential`` (``model.body``) that :func:`revgrad.reversible` converts in
place: each run of blocks trains with memory-saving backprop, the downsampling layers with plain
autograd.

:func:`run_demo` trains it, measures test accuracy, and measures with :class:`revgrad.tools.memory.MemoryProbe`
the bytes held between forward and backward for one training batch, for the revgrad model and for a
copy of the same model (taken before conversion) that runs with plain autograd.

``revgrad demo --task lm`` (:func:`run_lm_demo`) trains a small reversible causal language model
(:func:`revgrad.models.rev_lm`: ``AdditiveCoupling(SelfAttention, MLP, dim=-1)`` layers) on the text of
Python's own help topics (``pydoc_data.topics``, part of the standard library: nothing is downloaded),
one token per byte. It measures the loss on held-out text before and after training, the training
throughput, and the bytes held between forward and backward by the model and by the same model with
plain autograd (``memory_saving=False``, same weights).

``revgrad demo --task flow`` (:func:`run_flow_demo`) trains a small Glow (:func:`revgrad.models.glow`:
affine couplings, learned priors, one memory-saving chain per level), class-conditional on the one-hot
label or not, by maximum likelihood on the digits' 17 integer levels, dequantized with fresh uniform
noise every batch. It measures the test bits per dimension before and after training, the training
throughput, the same memory comparison, and writes a PNG of samples at two temperatures (matplotlib).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks.couplings import AdditiveCoupling
from ..engine.backprop import CHECK_MODES, CheckMode
from ..engine.report import BackwardReport
from ..engine.sequential import ReversibleSequential, reversible
from ..models.flow import Glow, dequantize
from ..models.revnet import revnet_branch
from .memory import MemoryProbe, cpu_counting_available

__all__ = [
    "DEFAULTS",
    "FLOW_DEFAULTS",
    "LM_DEFAULTS",
    "DemoData",
    "DemoResult",
    "DemoSettings",
    "Downsample",
    "FlowData",
    "FlowDemoResult",
    "FlowDemoSettings",
    "LMDemoResult",
    "LMDemoSettings",
    "RevResNet",
    "build_model",
    "evaluate",
    "held_bytes",
    "load_digits_data",
    "load_digits_levels",
    "load_text_tokens",
    "run_demo",
    "run_flow_demo",
    "run_lm_demo",
    "write_flow_png",
]

#: Seed of the train/test split: fixed, so every ``seed`` is scored on the same test images.
SPLIT_SEED = 0
#: Share of the 1797 images held out for testing.
TEST_FRACTION = 0.2
NUM_CLASSES = 10
MIB = 1024 * 1024

LossFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class DemoSettings:
    """The demo's settings; the defaults are those of ``revgrad demo``.

    Attributes:
        epochs: passes over the training set.
        depth: AdditiveCoupling blocks per reversible stage.
        channels: channels of the first stage (each later stage doubles them); even.
        stages: reversible stages (the 8x8 images are halved between stages).
        batch_size: training batch size (also the batch whose held memory is measured).
        lr: peak learning rate of AdamW (cosine decay to zero over training).
        check: revgrad's check mode: ``"off"``, ``"detect"`` or ``"correct"``.
        seed: seed of the weights and of the batch order.
        threads: CPU threads for torch (``None``: torch's current setting). The default is 1: the
            convolutions are small, and on a CPU busy with other work extra OpenMP threads slow every
            step down many times over (about 5-10x measured with 2 threads on a loaded 2-core machine).
        device: where to train (``"cpu"`` or a CUDA device).
    """

    epochs: int = 5
    depth: int = 6
    channels: int = 32
    stages: int = 2
    batch_size: int = 64
    lr: float = 3e-3
    check: CheckMode = "correct"
    seed: int = 0
    threads: int | None = 1
    device: str = "cpu"

    def validate(self) -> None:
        """Raise ``ValueError`` for settings the demo cannot run with."""
        positive = {"epochs": self.epochs, "depth": self.depth, "channels": self.channels,
                    "stages": self.stages, "batch_size": self.batch_size}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"revgrad demo: {name} must be >= 1, got {value}")
        if self.channels % 2:
            raise ValueError(
                f"revgrad demo: channels must be even (couplings split them in halves), got {self.channels}"
            )
        if self.stages > 3:
            raise ValueError(f"revgrad demo: stages must be at most 3 (8x8 images halve to 2x2), got {self.stages}")
        if not self.lr > 0:
            raise ValueError(f"revgrad demo: lr must be positive, got {self.lr}")
        if self.check not in CHECK_MODES:
            raise ValueError(f"revgrad demo: check must be one of {CHECK_MODES}, got {self.check!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"revgrad demo: threads must be >= 1, got {self.threads}")


DEFAULTS = DemoSettings()


# --------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class DemoData:
    """Standardized digits: images ``[N, 1, 8, 8]`` (float32) and labels ``[N]`` (int64)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_data(device: torch.device | str = "cpu") -> DemoData:
    """Load scikit-learn's digits, split them with :data:`SPLIT_SEED`, standardize with train statistics."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ModuleNotFoundError as exc:  # scikit-learn is the optional "demo" extra
        raise ModuleNotFoundError(
            "revgrad demo needs scikit-learn for its data set: pip install 'revgrad[demo]'", name=exc.name
        ) from exc

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.images, digits.target, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=digits.target
    )
    x_train = torch.as_tensor(x_tr, dtype=torch.float32).unsqueeze(1)
    x_test = torch.as_tensor(x_te, dtype=torch.float32).unsqueeze(1)
    mean, std = x_train.mean(), x_train.std()
    return DemoData(
        x_train=((x_train - mean) / std).to(device),
        y_train=torch.as_tensor(y_tr, dtype=torch.int64).to(device),
        x_test=((x_test - mean) / std).to(device),
        y_test=torch.as_tensor(y_te, dtype=torch.int64).to(device),
    )


# --------------------------------------------------------------------------------------------------
# Model


class Downsample(nn.Module):
    """Non-invertible step between stages: ``BN-ReLU-conv3x3`` with stride 2, ``C -> 2C`` channels.

    Shapes: ``[B, C, H, W] -> [B, 2C, ceil(H/2), ceil(W/2)]``. It has no ``inverse``, so it is not a
    block: revgrad runs it with plain autograd between the runs of blocks.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(self.bn(x)))


class RevResNet(nn.Module):
    """A small reversible ResNet for 8x8 grayscale images.

    Attributes:
        stem: ``conv3x3 1 -> C`` (plain layer).
        body: one ``nn.Sequential`` of ``stages`` runs of ``depth`` AdditiveCoupling blocks with a
            :class:`Downsample` between runs; :func:`revgrad.reversible` turns it into a
            :class:`revgrad.ReversibleSequential` (same children, same ``state_dict`` keys).
        head: BN-ReLU, global average pooling and a linear classifier.

    Shapes: ``forward(x: [B, 1, H, W]) -> logits [B, num_classes]``.
    """

    def __init__(self, depth: int, channels: int, stages: int, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        width = channels
        for stage in range(stages):
            if stage > 0:
                layers.append(Downsample(width))
                width *= 2
            half = width // 2
            layers += [
                AdditiveCoupling(revnet_branch(half, zero_last=True), revnet_branch(half, zero_last=True))
                for _ in range(depth)
            ]
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


def build_model(depth: int, channels: int, stages: int, num_classes: int = NUM_CLASSES) -> RevResNet:
    """A :class:`RevResNet` with plain (unconverted) ``nn.Sequential`` body, initialized from torch's RNG."""
    return RevResNet(depth, channels, stages, num_classes)


# --------------------------------------------------------------------------------------------------
# Training, evaluation, memory


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Accuracy of ``model`` (in eval mode) on ``x: [N, ...]`` with labels ``y: [N]``; restores its mode."""
    was_training = model.training
    model.eval()
    try:
        correct = sum(
            int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
            for i in range(0, len(x), batch_size)
        )
    finally:
        model.train(was_training)
    return correct / len(x)


def held_bytes(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, loss_fn: LossFn = F.cross_entropy, extra: tuple = ()
) -> int | None:
    """Bytes held between forward and backward of one training step (``None`` where not countable).

    Runs one warm-up step first (lazy caches, allocator), then measures the bytes that tensors created
    by ``forward`` and the loss (``loss_fn(model(x, *extra), y)``) still hold when backward starts, and finishes
    the step's backward. Gradients are cleared before and after; the parameters are not updated
    (BatchNorm running statistics are, as in any training-mode forward).
    """
    if x.device.type == "cpu" and not cpu_counting_available():
        return None
    was_training = model.training
    model.train()
    try:
        _training_step(model, x, y, loss_fn=loss_fn, extra=extra)  # warm-up: lazy caches, allocator pools
        probe = MemoryProbe(x.device)
        _training_step(model, x, y, probe, loss_fn, extra)
        return probe.held["held"]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def _training_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, probe: MemoryProbe | None = None,
    loss_fn: LossFn = F.cross_entropy, extra: tuple = (),
) -> None:
    """Forward, loss and backward without an update; marks ``"held"`` on ``probe`` before backward."""
    model.zero_grad(set_to_none=True)
    with probe if probe is not None else contextlib.nullcontext():
        loss = loss_fn(model(x, *extra), y)
        if probe is not None:
            probe.mark("held")
        loss.backward()


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run the body with ``threads`` intra-op threads (``None``: unchanged), then restore the setting."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class DemoResult:
    """What :func:`run_demo` measured.

    Attributes:
        settings: the settings it ran with.
        accuracy: test accuracy in ``[0, 1]``; ``test_size``, ``train_size``: images in each set.
        final_loss: mean training loss over the last epoch.
        parameters: trainable parameters of the model.
        blocks: AdditiveCoupling blocks in the model.
        held_revgrad, held_plain: bytes held between forward and backward for one training batch, by
            the revgrad model and by the same model with plain autograd (``None`` where CPU bytes
            cannot be counted: no glibc ``mallinfo2``).
        last_report: the :class:`revgrad.BackwardReport` of the last training step's backward.
        corrections: corrected reconstructions over all of training (``check="correct"``).
        train_seconds: time spent in the training loop; elapsed_seconds: the whole run.
    """

    settings: DemoSettings
    accuracy: float
    test_size: int
    train_size: int
    final_loss: float
    parameters: int
    blocks: int
    held_revgrad: int | None
    held_plain: int | None
    last_report: BackwardReport | None
    corrections: int
    train_seconds: float
    elapsed_seconds: float
    epoch_losses: list[float] = field(default_factory=list)

    @property
    def memory_ratio(self) -> float | None:
        """How many times less the revgrad model holds than plain autograd (``None`` if not measured)."""
        if self.held_revgrad is None or self.held_plain is None or self.held_revgrad <= 0:
            return None
        return self.held_plain / self.held_revgrad

    def summary(self) -> str:
        """The human-readable report that ``revgrad demo`` prints."""
        s = self.settings
        correct = round(self.accuracy * self.test_size)
        lines = [
            f"test accuracy: {100 * self.accuracy:.1f}% ({correct}/{self.test_size} test images)",
            f"activation memory held between forward and backward (one batch of {s.batch_size}):",
        ]
        if self.held_revgrad is None or self.held_plain is None:
            lines.append("  not measured: counting CPU bytes needs glibc's mallinfo2 (Linux, glibc >= 2.33)")
        else:
            ratio = self.memory_ratio
            lines += [
                f"  revgrad:        {self.held_revgrad / MIB:8.3f} MiB",
                f"  plain autograd: {self.held_plain / MIB:8.3f} MiB",
                f"  ratio:          {ratio:8.2f}x less with revgrad" if ratio else "  ratio:          n/a",
            ]
        lines.append(f"last backward: {_describe_report(self.last_report)}")
        if s.check == "correct":
            lines.append(f"corrections over training: {self.corrections}")
        lines.append(_time_line(self.elapsed_seconds, self.train_seconds, _count(s.epochs, "epoch"), s.threads))
        return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _time_line(elapsed: float, training: float, work: str, threads: int | None) -> str:
    """The last line of every demo's summary: wall time, training time, how much work, threads."""
    threads = torch.get_num_threads() if threads is None else threads
    return f"time: {elapsed:.1f} s ({training:.1f} s training, {work}, {_count(threads, 'thread')})"


def _describe_report(report: BackwardReport | None) -> str:
    """One line about a backward: the check, the worst reconstruction error, the corrections."""
    if report is None:
        return "none (no backward ran)"
    worst = report.max_error
    error = "not measured" if math.isnan(worst) else f"{worst:.2g} (tol {report.tol:.0e})"
    where = f" at children {report.corrected}" if report.corrected else ""
    return (
        f"check={report.check!r}, max reconstruction error {error}, "
        f"corrections made: {len(report.corrected)}{where}"
    )


def run_demo(
    *,
    epochs: int = DEFAULTS.epochs,
    depth: int = DEFAULTS.depth,
    channels: int = DEFAULTS.channels,
    stages: int = DEFAULTS.stages,
    batch_size: int = DEFAULTS.batch_size,
    lr: float = DEFAULTS.lr,
    check: CheckMode = DEFAULTS.check,
    seed: int = DEFAULTS.seed,
    threads: int | None = DEFAULTS.threads,
    device: str = DEFAULTS.device,
    progress: bool = True,
) -> DemoResult:
    """Train a reversible ResNet on the digits, then measure accuracy and held memory.

    Deterministic for a given ``seed`` and thread count on CPU. The caller's RNG state and thread
    setting are left as they were. ``progress`` shows a tqdm bar per epoch (on stderr). See
    :class:`DemoSettings` for the arguments; raises ``ValueError`` for invalid ones, and
    :class:`revgrad.ReconstructionError` when ``check="detect"`` finds a drifted reconstruction.
    """
    settings = DemoSettings(epochs, depth, channels, stages, batch_size, lr, check, seed, threads, device)
    settings.validate()
    start = time.perf_counter()
    dev = torch.device(device)
    with _torch_threads(threads), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        data = load_digits_data(dev)
        model = build_model(depth, channels, stages).to(dev)
        plain = copy.deepcopy(model)  # the same weights, trained with plain autograd
        reversible(model, check=check)
        body = model.body
        assert isinstance(body, ReversibleSequential)

        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        n = len(data.x_train)
        steps_per_epoch = math.ceil(n / batch_size)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
        )
        order_rng = torch.Generator().manual_seed(seed)
        epoch_losses: list[float] = []
        corrections = 0
        last_report: BackwardReport | None = None
        train_start = time.perf_counter()
        from tqdm.auto import tqdm  # here, so that `revgrad --help` and other commands run without it

        model.train()
        for epoch in range(epochs):
            order = torch.randperm(n, generator=order_rng).to(dev)
            total, seen = 0.0, 0
            bar = tqdm(
                range(0, n, batch_size), desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                disable=not progress, leave=True, dynamic_ncols=True,
            )
            for i in bar:
                idx = order[i : i + batch_size]
                loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                last_report = body.last_report
                if last_report is not None:
                    corrections += len(last_report.corrected)
                total += loss.item() * len(idx)
                seen += len(idx)
                bar.set_postfix(loss=f"{total / seen:.4f}")
            bar.close()
            epoch_losses.append(total / seen)
        train_seconds = time.perf_counter() - train_start

        accuracy = evaluate(model, data.x_test, data.y_test)
        batch_x, batch_y = data.x_train[:batch_size], data.y_train[:batch_size]
        held_revgrad = held_bytes(model, batch_x, batch_y)
        held_plain = held_bytes(plain, batch_x, batch_y)

    return DemoResult(
        settings=settings,
        accuracy=accuracy,
        test_size=len(data.x_test),
        train_size=n,
        final_loss=epoch_losses[-1],
        parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        blocks=sum(isinstance(m, AdditiveCoupling) for m in model.modules()),
        held_revgrad=held_revgrad,
        held_plain=held_plain,
        last_report=last_report,
        corrections=corrections,
        train_seconds=train_seconds,
        elapsed_seconds=time.perf_counter() - start,
        epoch_losses=epoch_losses,
    )


# --------------------------------------------------------------------------------------------------
# The language-model task: ``revgrad demo --task lm``

#: Where the text comes from: the standard library's pydoc help topics (about 466 kB of English and code).
LM_CORPUS = "pydoc_data.topics"
#: Byte-level tokens: every byte is a token, so any text is covered and nothing needs a vocabulary.
LM_VOCAB = 256
#: Share of the corpus (its end) held out to measure the loss before and after training.
LM_HELDOUT_FRACTION = 0.1
#: The prompt of the sample printed after training.
LM_PROMPT = "The "


@dataclass(frozen=True)
class LMDemoSettings:
    """The language-model demo's settings; the defaults are those of ``revgrad demo --task lm``.

    Attributes:
        steps: training steps (one batch each).
        dim: features of each of the two streams (the layers carry ``[B, T, 2 * dim]``).
        depth: reversible layers (``AdditiveCoupling(SelfAttention, MLP, dim=-1)``).
        heads: attention heads; ``dim`` must be divisible by them.
        seq_len: tokens (bytes) per sequence, also the model's ``max_len``.
        batch_size: sequences per step (also the batch whose held memory is measured).
        lr: peak learning rate of AdamW (one-cycle schedule over ``steps``).
        dropout: dropout of the embeddings, attention and MLP (replayed exactly in backward).
        check: revgrad's check mode: ``"off"``, ``"detect"`` or ``"correct"``.
        seed: seed of the weights, the batches and the sample.
        threads: CPU threads for torch (``None``: torch's current setting); 1 by default, see
            :class:`DemoSettings`.
        device: where to train (``"cpu"`` or a CUDA device).
        eval_batches: held-out batches (fixed windows, the same for every seed) the loss is averaged over.
        sample_len: bytes sampled after training and printed (0: none; after the default 100 steps the
            model has learnt spacing and common letter pairs, not words).
    """

    steps: int = 100
    dim: int = 64
    depth: int = 4
    heads: int = 4
    seq_len: int = 64
    batch_size: int = 16
    lr: float = 3e-3
    dropout: float = 0.0
    check: CheckMode = "correct"
    seed: int = 0
    threads: int | None = 1
    device: str = "cpu"
    eval_batches: int = 8
    sample_len: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` for settings the demo cannot run with."""
        positive = {"steps": self.steps, "dim": self.dim, "depth": self.depth, "heads": self.heads,
                    "seq_len": self.seq_len, "batch_size": self.batch_size, "eval_batches": self.eval_batches}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"revgrad demo: {name} must be >= 1, got {value}")
        if self.dim % self.heads:
            raise ValueError(f"revgrad demo: dim must be divisible by heads, got {self.dim} and {self.heads}")
        if self.seq_len > 4096:
            raise ValueError(f"revgrad demo: seq_len must be at most 4096, got {self.seq_len}")
        if not self.lr > 0:
            raise ValueError(f"revgrad demo: lr must be positive, got {self.lr}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"revgrad demo: dropout must be in [0, 1), got {self.dropout}")
        if self.check not in CHECK_MODES:
            raise ValueError(f"revgrad demo: check must be one of {CHECK_MODES}, got {self.check!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"revgrad demo: threads must be >= 1, got {self.threads}")
        if self.sample_len < 0:
            raise ValueError(f"revgrad demo: sample_len must be >= 0, got {self.sample_len}")


LM_DEFAULTS = LMDemoSettings()


def load_text_tokens(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The pydoc help topics as byte tokens (int64): ``(train, heldout)``, the held-out part being the end.

    The topics are joined in sorted order of their names, so the split is the same on every machine
    running the same Python version.
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics)).encode("utf-8")
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(torch.int64)
    cut = int(len(tokens) * (1 - LM_HELDOUT_FRACTION))
    return tokens[:cut].to(device), tokens[cut:].to(device)


def _windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[B, T]`` and next-byte targets ``[B, T]`` of the windows starting at ``starts``."""
    index = starts.to(tokens.device)[:, None] + torch.arange(seq_len + 1, device=tokens.device)
    chunk = tokens[index]
    return chunk[:, :-1], chunk[:, 1:]


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy of ``logits [B, T, V]`` against ``targets [B, T]`` (nats per byte)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


@torch.no_grad()
def _heldout_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean loss of ``model`` (in eval mode) over ``batches``; restores its mode."""
    was_training = model.training
    model.eval()
    try:
        return sum(float(_lm_loss(model(x), y)) for x, y in batches) / len(batches)
    finally:
        model.train(was_training)


@torch.no_grad()
def _sample(model: nn.Module, prompt: str, length: int, max_len: int, generator: torch.Generator,
            device: torch.device, temperature: float = 0.8) -> str:
    """``length`` bytes sampled after ``prompt`` (temperature ``temperature``), as printable text."""
    was_training = model.training
    model.eval()
    try:
        tokens = torch.tensor(list(prompt.encode()), dtype=torch.int64, device=device)[None]
        for _ in range(length):
            logits = model(tokens[:, -max_len:])[0, -1].float() / temperature
            nxt = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator).to(device)
            tokens = torch.cat([tokens, nxt[None]], dim=1)
    finally:
        model.train(was_training)
    text = bytes(tokens[0].tolist()).decode("utf-8", errors="replace")
    return "".join(c if c.isprintable() else " " for c in text)


@dataclass
class LMDemoResult:
    """What :func:`run_lm_demo` measured.

    Attributes:
        settings: the settings it ran with.
        loss_before, loss_after: mean next-byte cross-entropy (nats) on the held-out batches before and
            after training (``ln 256 = 5.55`` is a uniform guess).
        step_losses: the training loss of every step.
        train_tokens, heldout_tokens: bytes of the corpus in each part.
        tokens_per_second: tokens trained on per second of the training loop (forward, backward, update).
        parameters: trainable parameters (the head is tied to the token embedding).
        held_revgrad, held_plain: bytes held between forward and backward for one training batch, by
            the model and by the same model with plain autograd (``None`` where CPU bytes cannot be
            counted).
        last_report: the :class:`revgrad.BackwardReport` of the last training step's backward.
        corrections: corrected reconstructions over all of training.
        sample: text sampled after :data:`LM_PROMPT` after training (empty when ``sample_len`` is 0).
        train_seconds: time spent in the training loop; elapsed_seconds: the whole run.
    """

    settings: LMDemoSettings
    loss_before: float
    loss_after: float
    step_losses: list[float]
    train_tokens: int
    heldout_tokens: int
    tokens_per_second: float
    parameters: int
    held_revgrad: int | None
    held_plain: int | None
    last_report: BackwardReport | None
    corrections: int
    sample: str
    train_seconds: float
    elapsed_seconds: float

    @property
    def memory_ratio(self) -> float | None:
        """How many times less the revgrad model holds than plain autograd (``None`` if not measured)."""
        if self.held_revgrad is None or self.held_plain is None or self.held_revgrad <= 0:
            return None
        return self.held_plain / self.held_revgrad

    def summary(self) -> str:
        """The human-readable report that ``revgrad demo --task lm`` prints."""
        s = self.settings
        bits = 1 / math.log(2)
        lines = [
            f"held-out loss (next byte; a uniform guess is ln 256 = {math.log(LM_VOCAB):.2f}): "
            f"{self.loss_before:.3f} before -> {self.loss_after:.3f} after {_count(s.steps, 'step')} "
            f"({self.loss_before * bits:.2f} -> {self.loss_after * bits:.2f} bits per byte)",
            f"throughput: {self.tokens_per_second:,.0f} tokens/s trained (forward, backward and update)",
            f"activation memory held between forward and backward (one batch of {s.batch_size} x {s.seq_len} "
            f"tokens):",
        ]
        if self.held_revgrad is None or self.held_plain is None:
            lines.append("  not measured: counting CPU bytes needs glibc's mallinfo2 (Linux, glibc >= 2.33)")
        else:
            ratio = self.memory_ratio
            lines += [
                f"  revgrad:        {self.held_revgrad / MIB:8.3f} MiB",
                f"  plain autograd: {self.held_plain / MIB:8.3f} MiB (the same model, memory_saving=False)",
                f"  ratio:          {ratio:8.2f}x less with revgrad" if ratio else "  ratio:          n/a",
            ]
        lines.append(f"last backward: {_describe_report(self.last_report)}")
        if s.check == "correct":
            lines.append(f"corrections over training: {self.corrections}")
        if self.sample:
            lines.append(f"sample: {self.sample!r}")
        lines.append(_time_line(self.elapsed_seconds, self.train_seconds, _count(s.steps, "step"), s.threads))
        return "\n".join(lines)


def run_lm_demo(
    *,
    steps: int = LM_DEFAULTS.steps,
    dim: int = LM_DEFAULTS.dim,
    depth: int = LM_DEFAULTS.depth,
    heads: int = LM_DEFAULTS.heads,
    seq_len: int = LM_DEFAULTS.seq_len,
    batch_size: int = LM_DEFAULTS.batch_size,
    lr: float = LM_DEFAULTS.lr,
    dropout: float = LM_DEFAULTS.dropout,
    check: CheckMode = LM_DEFAULTS.check,
    seed: int = LM_DEFAULTS.seed,
    threads: int | None = LM_DEFAULTS.threads,
    device: str = LM_DEFAULTS.device,
    eval_batches: int = LM_DEFAULTS.eval_batches,
    sample_len: int = LM_DEFAULTS.sample_len,
    progress: bool = True,
) -> LMDemoResult:
    """Train a reversible causal LM on Python's help topics, then measure loss, throughput and memory.

    Deterministic for a given ``seed`` and thread count on CPU; the caller's RNG state and thread
    setting are left as they were. ``progress`` shows a tqdm bar (on stderr). See
    :class:`LMDemoSettings` for the arguments; raises ``ValueError`` for invalid ones, and
    :class:`revgrad.ReconstructionError` when ``check="detect"`` finds a drifted reconstruction.
    """
    from ..models.transformer import rev_lm

    settings = LMDemoSettings(steps, dim, depth, heads, seq_len, batch_size, lr, dropout, check, seed, threads,
                              device, eval_batches, sample_len)
    settings.validate()
    start = time.perf_counter()
    dev = torch.device(device)
    with _torch_threads(threads), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        train, heldout = load_text_tokens(dev)
        if len(heldout) <= seq_len + eval_batches * batch_size:
            raise ValueError(f"revgrad demo: seq_len {seq_len} is too long for the held-out text "
                             f"({len(heldout)} bytes)")
        config = dict(vocab_size=LM_VOCAB, dim=dim, depth=depth, heads=heads, max_len=seq_len, dropout=dropout)
        model = rev_lm(**config, memory_saving=True, check=check).to(dev)
        layers = model.layers
        assert isinstance(layers, ReversibleSequential)
        # Held-out windows evenly spaced over the held-out text: the same for every seed.
        eval_starts = torch.linspace(0, len(heldout) - seq_len - 1, eval_batches * batch_size).long()
        eval_set = [_windows(heldout, s, seq_len) for s in eval_starts.split(batch_size)]
        loss_before = _heldout_loss(model, eval_set)

        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
        batch_rng = torch.Generator().manual_seed(seed)
        step_losses: list[float] = []
        corrections = 0
        last_report: BackwardReport | None = None
        from tqdm.auto import tqdm  # here, so that `revgrad --help` and other commands run without it

        model.train()
        train_start = time.perf_counter()
        bar = tqdm(range(steps), desc="training", unit="step", disable=not progress, leave=True, dynamic_ncols=True)
        for _ in bar:
            starts = torch.randint(0, len(train) - seq_len - 1, (batch_size,), generator=batch_rng)
            x, y = _windows(train, starts, seq_len)
            loss = _lm_loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            last_report = layers.last_report
            if last_report is not None:
                corrections += len(last_report.corrected)
            step_losses.append(loss.item())
            bar.set_postfix(loss=f"{step_losses[-1]:.3f}")
        bar.close()
        train_seconds = time.perf_counter() - train_start

        loss_after = _heldout_loss(model, eval_set)
        plain = rev_lm(**config, memory_saving=False).to(dev)  # the same weights, plain autograd
        plain.load_state_dict(model.state_dict())
        batch_x, batch_y = eval_set[0]
        held_revgrad = held_bytes(model, batch_x, batch_y, _lm_loss)
        held_plain = held_bytes(plain, batch_x, batch_y, _lm_loss)
        sample = ""
        if sample_len:
            sample = _sample(model, LM_PROMPT, sample_len, seq_len, torch.Generator().manual_seed(seed), dev)

    return LMDemoResult(
        settings=settings,
        loss_before=loss_before,
        loss_after=loss_after,
        step_losses=step_losses,
        train_tokens=len(train),
        heldout_tokens=len(heldout),
        tokens_per_second=steps * batch_size * seq_len / train_seconds,
        parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        held_revgrad=held_revgrad,
        held_plain=held_plain,
        last_report=last_report,
        corrections=corrections,
        sample=sample,
        train_seconds=train_seconds,
        elapsed_seconds=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------------------------------
# The flow task: ``revgrad demo --task flow``

#: Quantization levels of the digits: their pixels are integers 0..16.
FLOW_BINS = 17
#: Seed of the test set's fixed dequantization noise: every run and seed is scored on the same values.
FLOW_TEST_NOISE_SEED = 1234
#: Rows of each sample panel (one per class for the conditional model) and samples per row.
FLOW_GRID = 10


@dataclass(frozen=True)
class FlowDemoSettings:
    """The flow demo's settings; the defaults are those of ``revgrad demo --task flow``.

    Attributes:
        steps: training steps (one batch each, drawn at random from the training set).
        levels: Glow levels (a squeeze each, a split after each but the last); the 8x8 images allow 1 to 3.
        depth: flow steps per level (``ActNorm -> invertible 1x1 convolution -> affine coupling``).
        hidden: width of the coupling networks.
        conditional: condition every coupling and the learned priors on the one-hot class (a cINN);
            ``False``: an unconditional density model of all digits.
        batch_size: training batch size (also the batch whose held memory is measured).
        lr: peak learning rate of Adam (one-cycle schedule over ``steps``).
        check: revgrad's check mode: ``"off"``, ``"detect"`` or ``"correct"``.
        seed: seed of the weights, the batches, their dequantization noise and the samples.
        threads: CPU threads for torch (``None``: torch's current setting); 1 by default, see
            :class:`DemoSettings`.
        device: where to train (``"cpu"`` or a CUDA device).
        out: path of the PNG grid of samples (``None``: none is written).
        temperatures: the sampling temperatures, one panel each.
    """

    steps: int = 250
    levels: int = 2
    depth: int = 3
    hidden: int = 48
    conditional: bool = True
    batch_size: int = 64
    lr: float = 3e-3
    check: CheckMode = "correct"
    seed: int = 0
    threads: int | None = 1
    device: str = "cpu"
    out: str | None = "flow_samples.png"
    temperatures: tuple[float, ...] = (1.0, 0.7)

    def validate(self) -> None:
        """Raise ``ValueError`` for settings the demo cannot run with."""
        positive = {"steps": self.steps, "levels": self.levels, "depth": self.depth, "hidden": self.hidden,
                    "batch_size": self.batch_size}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"revgrad demo: {name} must be >= 1, got {value}")
        if self.levels > 3:
            raise ValueError(f"revgrad demo: levels must be at most 3 (8x8 images squeeze to 1x1), got {self.levels}")
        if not self.lr > 0:
            raise ValueError(f"revgrad demo: lr must be positive, got {self.lr}")
        if self.check not in CHECK_MODES:
            raise ValueError(f"revgrad demo: check must be one of {CHECK_MODES}, got {self.check!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"revgrad demo: threads must be >= 1, got {self.threads}")
        if not self.temperatures or any(not t >= 0 for t in self.temperatures):
            raise ValueError(f"revgrad demo: temperatures must be one or more numbers >= 0, got {self.temperatures}")


FLOW_DEFAULTS = FlowDemoSettings()


@dataclass(frozen=True)
class FlowData:
    """The digits as integers 0..16: images ``[N, 1, 8, 8]`` (int64) and labels ``[N]`` (int64), split as
    :func:`load_digits_data` splits them."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_levels(device: torch.device | str = "cpu") -> FlowData:
    """scikit-learn's digits as their integer levels (0..16, :data:`FLOW_BINS` of them), split with
    :data:`SPLIT_SEED` (the same train and test images as the other digits task)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ModuleNotFoundError as exc:  # scikit-learn is the optional "demo" extra
        raise ModuleNotFoundError(
            "revgrad demo needs scikit-learn for its data set: pip install 'revgrad[demo]'", name=exc.name
        ) from exc

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.images, digits.target, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=digits.target
    )

    def levels(images) -> torch.Tensor:
        return torch.as_tensor(images).round().clamp(0, FLOW_BINS - 1).to(torch.int64).unsqueeze(1).to(device)

    def labels(y) -> torch.Tensor:
        return torch.as_tensor(y, dtype=torch.int64).to(device)

    return FlowData(levels(x_tr), labels(y_tr), levels(x_te), labels(y_te))


def _flow_input(levels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Integer levels to the flow's input: uniformly dequantized to ``[0, 1)``, then centred to
    ``[-0.5, 0.5)`` (a shift: no change of density)."""
    return dequantize(levels.cpu(), FLOW_BINS, generator=generator).to(levels.device) - 0.5


def _one_hot(y: torch.Tensor, conditional: bool) -> torch.Tensor | None:
    return F.one_hot(y, NUM_CLASSES).float() if conditional else None


@torch.no_grad()
def _test_bits_per_dim(model: Glow, x: torch.Tensor, c: torch.Tensor | None, batch_size: int = 512) -> float:
    """Mean bits per dimension of ``model`` (eval mode) on the dequantized test images; restores its mode."""
    was_training = model.training
    model.eval()
    try:
        total = 0.0
        for i in range(0, len(x), batch_size):
            ci = None if c is None else c[i : i + batch_size]
            total += float(model.bits_per_dim(x[i : i + batch_size], ci, bins=FLOW_BINS)) * len(x[i : i + batch_size])
    finally:
        model.train(was_training)
    return total / len(x)


def _flow_nll(log_prob: torch.Tensor, _unused: torch.Tensor | None) -> torch.Tensor:
    return -log_prob.mean()


@torch.no_grad()
def _flow_samples(model: Glow, settings: FlowDemoSettings, generator: torch.Generator) -> list[torch.Tensor]:
    """Per temperature, ``FLOW_GRID * FLOW_GRID`` samples ``[N, 1, 8, 8]`` in ``[-0.5, 0.5)`` units (row ``r``
    of a conditional model: class ``r``); not clamped."""
    was_training = model.training
    model.eval()
    try:
        n = FLOW_GRID * FLOW_GRID
        device = next(model.parameters()).device
        classes = torch.arange(FLOW_GRID, device=device).repeat_interleave(FLOW_GRID) % NUM_CLASSES
        c = _one_hot(classes, settings.conditional)
        return [model.sample(n, c, temperature=t, generator=generator).cpu() for t in settings.temperatures]
    finally:
        model.train(was_training)


def _image_grid(images: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[rows * cols, 1, H, W]`` images in ``[0, 1]`` to one ``[rows * (H + 1) - 1, cols * (W + 1) - 1]`` grid
    (one-pixel gaps at NaN, drawn as the background)."""
    _, _, h, w = images.shape
    grid = torch.full((rows * (h + 1) - 1, cols * (w + 1) - 1), float("nan"))
    for k in range(min(len(images), rows * cols)):
        r, q = divmod(k, cols)
        grid[r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = images[k, 0]
    return grid


def write_flow_png(
    path: str, samples: list[torch.Tensor], temperatures: tuple[float, ...], real: torch.Tensor, conditional: bool,
    title: str = "",
) -> None:
    """Write the sample panels (one per temperature) next to a panel of real test digits to ``path``.

    ``samples``: per temperature ``[FLOW_GRID * FLOW_GRID, 1, 8, 8]`` in ``[-0.5, 0.5)`` units; ``real``: as many
    test images (same units). Values are clamped to ``[0, 1]`` after the shift back (non-finite ones shown as
    black). Raises ``ImportError`` without matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def show(images: torch.Tensor) -> torch.Tensor:
        return _image_grid(torch.nan_to_num(images + 0.5, nan=1.0, posinf=1.0, neginf=0.0).clamp(0, 1),
                           FLOW_GRID, FLOW_GRID)

    panels = [("test images", show(real))]
    panels += [(f"samples, temperature {t:g}", show(s)) for t, s in zip(temperatures, samples)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.0), squeeze=False)
    cmap = matplotlib.colormaps["gray_r"].with_extremes(bad="#d8e4f0")
    for ax, (name, grid) in zip(axes[0], panels):
        ax.imshow(grid.numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        if conditional:
            ax.set_yticks([r * 9 + 3.5 for r in range(FLOW_GRID)], [str(r % NUM_CLASSES) for r in range(FLOW_GRID)],
                          fontsize=8)
        else:
            ax.set_yticks([])
    if conditional:
        axes[0][0].set_ylabel("class")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class FlowDemoResult:
    """What :func:`run_flow_demo` measured.

    Attributes:
        settings: the settings it ran with.
        bpd_before, bpd_after: test bits per dimension (the test images with fixed dequantization noise)
            before training (after ActNorm's data-dependent initialization) and after it; ``log2(17) = 4.09``
            is a uniform guess over the 17 levels.
        step_bpd: the training bits per dimension of every step.
        train_size, test_size: images in each set.
        images_per_second: training images per second of the training loop (forward, backward, update).
        parameters: trainable parameters.
        blocks: blocks in the memory-saving chains (squeezes, ActNorms, 1x1 convolutions, couplings).
        held_revgrad, held_plain: bytes held between forward and backward for one training batch, by the
            model and by the same model with plain autograd (``memory_saving=False``, same weights)
            (``None`` where CPU bytes cannot be counted).
        last_reports: the :class:`revgrad.BackwardReport` of each level's chain in the last training step.
        corrections: corrected reconstructions over all of training, all chains.
        png: the path the samples were written to (``None``: none written); png_note: why not, if asked for.
        nonfinite_samples: sample values that were NaN or infinite (drawn as black).
        train_seconds: time spent in the training loop; elapsed_seconds: the whole run.
    """

    settings: FlowDemoSettings
    bpd_before: float
    bpd_after: float
    step_bpd: list[float]
    train_size: int
    test_size: int
    images_per_second: float
    parameters: int
    blocks: int
    held_revgrad: int | None
    held_plain: int | None
    last_reports: dict[str, BackwardReport]
    corrections: int
    png: str | None
    png_note: str
    nonfinite_samples: int
    train_seconds: float
    elapsed_seconds: float

    @property
    def memory_ratio(self) -> float | None:
        """How many times less the revgrad model holds than plain autograd (``None`` if not measured)."""
        if self.held_revgrad is None or self.held_plain is None or self.held_revgrad <= 0:
            return None
        return self.held_plain / self.held_revgrad

    @property
    def last_report(self) -> BackwardReport | None:
        """The first level's chain's last report (the longest chain, at full resolution)."""
        return next(iter(self.last_reports.values()), None)

    def summary(self) -> str:
        """The human-readable report that ``revgrad demo --task flow`` prints."""
        s = self.settings
        lines = [
            f"test bits/dim (uniform over {FLOW_BINS} levels: {math.log2(FLOW_BINS):.2f}): {self.bpd_before:.3f} "
            f"before -> {self.bpd_after:.3f} after {_count(s.steps, 'step')}",
            f"throughput: {self.images_per_second:,.0f} images/s trained (forward, backward and update)",
            f"activation memory held between forward and backward (one batch of {s.batch_size}):",
        ]
        if self.held_revgrad is None or self.held_plain is None:
            lines.append("  not measured: counting CPU bytes needs glibc's mallinfo2 (Linux, glibc >= 2.33)")
        else:
            ratio = self.memory_ratio
            lines += [
                f"  revgrad:        {self.held_revgrad / MIB:8.3f} MiB",
                f"  plain autograd: {self.held_plain / MIB:8.3f} MiB (the same model, memory_saving=False)",
                f"  ratio:          {ratio:8.2f}x less with revgrad" if ratio else "  ratio:          n/a",
            ]
        if not self.last_reports:
            lines.append(f"last backward: {_describe_report(None)}")
        for name, report in self.last_reports.items():
            lines.append(f"last backward ({name}): {_describe_report(report)}")
        if s.check == "correct":
            lines.append(f"corrections over training: {self.corrections}")
        if self.png:
            temps = " and ".join(f"{t:g}" for t in s.temperatures)
            rows = "one row per class" if s.conditional else "unconditional"
            note = f"; {self.nonfinite_samples} non-finite values drawn black" if self.nonfinite_samples else ""
            lines.append(f"samples: {self.png} (temperatures {temps}, {rows}, test images alongside{note})")
        elif self.png_note:
            lines.append(f"samples: not written: {self.png_note}")
        lines.append(_time_line(self.elapsed_seconds, self.train_seconds, _count(s.steps, "step"), s.threads))
        return "\n".join(lines)


def run_flow_demo(
    *,
    steps: int = FLOW_DEFAULTS.steps,
    levels: int = FLOW_DEFAULTS.levels,
    depth: int = FLOW_DEFAULTS.depth,
    hidden: int = FLOW_DEFAULTS.hidden,
    conditional: bool = FLOW_DEFAULTS.conditional,
    batch_size: int = FLOW_DEFAULTS.batch_size,
    lr: float = FLOW_DEFAULTS.lr,
    check: CheckMode = FLOW_DEFAULTS.check,
    seed: int = FLOW_DEFAULTS.seed,
    threads: int | None = FLOW_DEFAULTS.threads,
    device: str = FLOW_DEFAULTS.device,
    out: str | None = FLOW_DEFAULTS.out,
    temperatures: tuple[float, ...] = FLOW_DEFAULTS.temperatures,
    progress: bool = True,
) -> FlowDemoResult:
    """Train a small Glow (:func:`revgrad.models.glow`, learned priors) on the digits by maximum likelihood,
    then measure test bits/dim, throughput and memory, and write a PNG of samples to ``out``.

    The digits' 17 integer levels are dequantized with fresh uniform noise every batch
    (:func:`revgrad.models.dequantize`); the test images with fixed noise. ActNorm initializes from the
    first training batch before the "before" score. Deterministic for a given ``seed`` and thread count
    on CPU; the caller's RNG state and thread setting are left as they were. Without matplotlib no PNG
    is written (``png_note`` says so). Raises ``ValueError`` for invalid settings and
    :class:`revgrad.ReconstructionError` when ``check="detect"`` finds a drifted reconstruction.
    """
    from ..models.flow import glow

    settings = FlowDemoSettings(steps, levels, depth, hidden, conditional, batch_size, lr, check, seed, threads,
                                device, out, tuple(temperatures))
    settings.validate()
    start = time.perf_counter()
    dev = torch.device(device)
    with _torch_threads(threads), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        data = load_digits_levels(dev)
        config = dict(in_channels=1, image_size=8, levels=levels, depth=depth, hidden=hidden, coupling="affine",
                      scale="sigmoid", prior="learned", condition_dim=NUM_CLASSES if conditional else None)
        model = glow(**config, memory_saving=True, check=check).to(dev)
        chains = [m for m in model.levels if isinstance(m, ReversibleSequential)]
        x_test = _flow_input(data.x_test, torch.Generator().manual_seed(FLOW_TEST_NOISE_SEED))
        c_test = _one_hot(data.y_test, conditional)

        batch_rng = torch.Generator().manual_seed(seed)
        n = len(data.x_train)

        def batch() -> tuple[torch.Tensor, torch.Tensor | None]:
            idx = torch.randint(0, n, (batch_size,), generator=batch_rng).to(dev)
            return _flow_input(data.x_train[idx], batch_rng), _one_hot(data.y_train[idx], conditional)

        model.train()
        with torch.no_grad():  # ActNorm's data-dependent initialization, from a training batch
            model.log_prob(*batch())
        bpd_before = _test_bits_per_dim(model, x_test, c_test)

        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
        step_bpd: list[float] = []
        corrections = 0
        from tqdm.auto import tqdm  # here, so that `revgrad --help` and other commands run without it

        train_start = time.perf_counter()
        bar = tqdm(range(steps), desc="training", unit="step", disable=not progress, leave=True, dynamic_ncols=True)
        for _ in bar:
            x, c = batch()
            loss = model.bits_per_dim(x, c, bins=FLOW_BINS)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            scheduler.step()
            corrections += sum(len(ch.last_report.corrected) for ch in chains if ch.last_report is not None)
            step_bpd.append(loss.item())
            bar.set_postfix(bpd=f"{step_bpd[-1]:.3f}")
        bar.close()
        train_seconds = time.perf_counter() - train_start
        last_reports = {name: m.last_report for name, m in model.named_modules()
                        if isinstance(m, ReversibleSequential) and m.last_report is not None}

        bpd_after = _test_bits_per_dim(model, x_test, c_test)
        plain = glow(**config, memory_saving=False).to(dev)  # the same weights, plain autograd
        plain.load_state_dict(model.state_dict())
        batch_x, batch_c = x_test[:batch_size], None if c_test is None else c_test[:batch_size]
        extra = () if batch_c is None else (batch_c,)
        held_revgrad = held_bytes(model, batch_x, None, _flow_nll, extra)
        held_plain = held_bytes(plain, batch_x, None, _flow_nll, extra)

        png, png_note, nonfinite = None, "", 0
        if out is not None:
            samples = _flow_samples(model, settings, torch.Generator().manual_seed(seed))
            nonfinite = sum(int((~torch.isfinite(s)).sum()) for s in samples)
            real = _real_grid_images(data, x_test, conditional)
            kind = "class-conditional" if conditional else "unconditional"
            title = (f"{kind} Glow on the 8x8 digits, {levels} levels x {depth} steps; "
                     f"test {bpd_after:.2f} bits/dim after {steps} steps")
            try:
                write_flow_png(out, samples, settings.temperatures, real, conditional, title)
                png = out
            except ImportError:
                png_note = "matplotlib is not installed (pip install matplotlib)"

    return FlowDemoResult(
        settings=settings,
        bpd_before=bpd_before,
        bpd_after=bpd_after,
        step_bpd=step_bpd,
        train_size=n,
        test_size=len(data.x_test),
        images_per_second=steps * batch_size / train_seconds,
        parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        blocks=sum(len(ch) for ch in chains),
        held_revgrad=held_revgrad,
        held_plain=held_plain,
        last_reports=last_reports,
        corrections=corrections,
        png=png,
        png_note=png_note,
        nonfinite_samples=nonfinite,
        train_seconds=train_seconds,
        elapsed_seconds=time.perf_counter() - start,
    )


def _real_grid_images(data: FlowData, x_test: torch.Tensor, conditional: bool) -> torch.Tensor:
    """``FLOW_GRID * FLOW_GRID`` test images (dequantized) for the reference panel: row ``r`` of class ``r`` when
    ``conditional``, else the first test images."""
    if not conditional:
        return x_test[: FLOW_GRID * FLOW_GRID].cpu()
    rows = [x_test[data.y_test == r][:FLOW_GRID] for r in range(FLOW_GRID)]
    return torch.cat(rows).cpu()
