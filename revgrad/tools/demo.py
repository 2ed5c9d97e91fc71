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
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks.couplings import AdditiveCoupling
from ..engine.backprop import CHECK_MODES, CheckMode
from ..engine.report import BackwardReport
from ..engine.sequential import ReversibleSequential, reversible
from ..models.revnet import revnet_branch
from .memory import MemoryProbe, cpu_counting_available

__all__ = [
    "DEFAULTS",
    "DemoData",
    "DemoResult",
    "DemoSettings",
    "Downsample",
    "RevResNet",
    "build_model",
    "evaluate",
    "held_bytes",
    "load_digits_data",
    "run_demo",
]

#: Seed of the train/test split: fixed, so every ``seed`` is scored on the same test images.
SPLIT_SEED = 0
#: Share of the 1797 images held out for testing.
TEST_FRACTION = 0.2
NUM_CLASSES = 10
MIB = 1024 * 1024


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


def held_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int | None:
    """Bytes held between forward and backward of one training step (``None`` where not countable).

    Runs one warm-up step first (lazy caches, allocator), then measures the bytes that tensors created
    by ``forward`` and the loss still hold when backward starts, and finishes the step's backward.
    Gradients are cleared before and after; the parameters are not updated (BatchNorm running
    statistics are, as in any training-mode forward).
    """
    if x.device.type == "cpu" and not cpu_counting_available():
        return None
    was_training = model.training
    model.train()
    try:
        _training_step(model, x, y)  # warm-up: lazy caches (fingerprint signs), allocator pools
        probe = MemoryProbe(x.device)
        _training_step(model, x, y, probe)
        return probe.held["held"]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def _training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, probe: MemoryProbe | None = None) -> None:
    """Forward, loss and backward without an update; marks ``"held"`` on ``probe`` before backward."""
    model.zero_grad(set_to_none=True)
    with probe if probe is not None else contextlib.nullcontext():
        loss = F.cross_entropy(model(x), y)
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
        threads = torch.get_num_threads() if s.threads is None else s.threads
        lines.append(
            f"time: {self.elapsed_seconds:.1f} s ({self.train_seconds:.1f} s training, "
            f"{_count(s.epochs, 'epoch')}, {_count(threads, 'thread')})"
        )
        return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


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
