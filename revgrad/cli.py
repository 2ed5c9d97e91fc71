"""The ``revgrad`` command line.

Subcommands are entries of :data:`COMMANDS`: each :class:`Command` names itself, adds its options to
its own ``argparse`` parser and runs from the parsed namespace. A new subcommand (``bench``,
``doctor``) is one more entry; heavy imports belong inside its ``run`` so that ``revgrad --help``
stays fast and works without the optional dependencies.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import __version__

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


@dataclass(frozen=True)
class Command:
    """One subcommand: ``revgrad NAME [options]``.

    Attributes:
        name: the subcommand's name.
        help: one line for ``revgrad --help``.
        description: the text at the top of ``revgrad NAME --help``.
        add_arguments: adds the subcommand's options to its parser.
        run: runs it from the parsed arguments; returns the exit status.
    """

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _error(message: str, prefix: str = "revgrad: error: ") -> None:
    print(message if message.startswith("revgrad") else prefix + message, file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# revgrad demo


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .demo import DEFAULTS  # light: torch is already imported by the package

    model = parser.add_argument_group("model")
    model.add_argument("--depth", type=_positive_int, default=DEFAULTS.depth, metavar="N",
                       help="AdditiveCoupling blocks per reversible stage (default: %(default)s)")
    model.add_argument("--channels", type=_positive_int, default=DEFAULTS.channels, metavar="C",
                       help="channels of the first stage, even; each later stage doubles them "
                            "(default: %(default)s)")
    model.add_argument("--stages", type=int, choices=(1, 2, 3), default=DEFAULTS.stages,
                       help="reversible stages, with a stride-2 downsampling between them (default: %(default)s)")
    model.add_argument("--check", choices=("off", "detect", "correct"), default=DEFAULTS.check,
                       help="revgrad's reconstruction check: 'off' (classic reversible backprop), 'detect' "
                            "(raise on a drifted rebuilt activation) or 'correct' (recompute it exactly from "
                            "an anchor) (default: %(default)s)")

    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=_positive_int, default=DEFAULTS.epochs, metavar="N",
                          help="passes over the training set (default: %(default)s)")
    training.add_argument("--batch-size", type=_positive_int, default=DEFAULTS.batch_size, metavar="B",
                          help="training batch size, also the batch whose held memory is measured "
                               "(default: %(default)s)")
    training.add_argument("--lr", type=_positive_float, default=DEFAULTS.lr,
                          help="peak learning rate of AdamW, one-cycle schedule (default: %(default)s)")
    training.add_argument("--seed", type=int, default=DEFAULTS.seed,
                          help="seed of the initial weights and the batch order; runs with the same seed and "
                               "thread count give the same result (default: %(default)s)")

    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--threads", type=_positive_int, default=DEFAULTS.threads, metavar="N",
                         help="CPU threads for torch; the demo's convolutions are small, and extra threads "
                              "slow down badly on a CPU busy with other work (default: %(default)s)")
    runtime.add_argument("--device", default=DEFAULTS.device,
                         help="where to train: 'cpu' or a CUDA device such as 'cuda' or 'cuda:1' "
                              "(default: %(default)s)")
    runtime.add_argument("--no-progress", dest="progress", action="store_false",
                         help="do not show the per-epoch progress bars")


def _demo_run(args: argparse.Namespace) -> int:
    import torch

    from .demo import DemoSettings, run_demo
    from .protocol import ReconstructionError

    settings = DemoSettings(
        epochs=args.epochs, depth=args.depth, channels=args.channels, stages=args.stages,
        batch_size=args.batch_size, lr=args.lr, check=args.check, seed=args.seed,
        threads=args.threads, device=args.device,
    )
    try:
        settings.validate()
    except ValueError as exc:
        _error(str(exc))
        return 2
    try:
        device = torch.device(settings.device)
    except RuntimeError as exc:
        _error(f"--device {settings.device}: {exc}")
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        _error(f"--device {settings.device}: CUDA is not available")
        return 2
    if device.type not in ("cpu", "cuda"):
        _error(f"--device {settings.device}: the demo runs on 'cpu' or 'cuda'")
        return 2

    print(
        f"revgrad demo: a reversible ResNet on scikit-learn's digits (8x8 images, 10 classes)\n"
        f"  model: stem conv, {settings.stages} stage(s) x {settings.depth} AdditiveCoupling blocks, "
        f"{settings.channels} channels, check={settings.check!r}\n"
        f"  training: {settings.epochs} epochs, batch {settings.batch_size}, lr {settings.lr:g}, "
        f"seed {settings.seed}, device {settings.device}",
        flush=True,
    )
    try:
        result = run_demo(
            epochs=settings.epochs, depth=settings.depth, channels=settings.channels, stages=settings.stages,
            batch_size=settings.batch_size, lr=settings.lr, check=settings.check, seed=settings.seed,
            threads=settings.threads, device=settings.device, progress=args.progress,
        )
    except ModuleNotFoundError as exc:
        if exc.name != "sklearn":
            raise
        _error(str(exc))
        return 1
    except ReconstructionError as exc:
        _error(f"{exc}\n(the demo ran with --check detect; --check correct recovers from this)")
        return 1
    print(f"  {result.parameters:,} parameters, {result.blocks} reversible blocks, "
          f"{result.train_size} training / {result.test_size} test images")
    print(result.summary())
    return 0


# --------------------------------------------------------------------------------------------------
# revgrad doctor


def _doctor_arguments(parser: argparse.ArgumentParser) -> None:
    from .doctor import NAMED_MODELS

    parser.add_argument("--model", choices=sorted(NAMED_MODELS), default="glow",
                        help="the model to build (weights from --checkpoint if given) (default: %(default)s)")
    parser.add_argument("--checkpoint", default=None,
                        help="a torch.save'd module, or a state_dict for --model")
    parser.add_argument("--batch", type=_positive_int, default=16, help="digits images (default: %(default)s)")
    parser.add_argument("--iterations", type=_positive_int, default=10,
                        help="power iterations of the Lipschitz estimates (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="batch choice and probes (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the reports as JSON to this path")


def _doctor_run(args: argparse.Namespace) -> int:
    from .doctor import run_doctor, write_json

    try:
        result = run_doctor(args.model, checkpoint=args.checkpoint, batch=args.batch,
                            iterations=args.iterations, seed=args.seed)
    except (TypeError, ValueError, FileNotFoundError) as exc:
        _error(str(exc))
        return 2
    except ImportError as exc:
        _error(f"{exc}; the built-in data needs scikit-learn (pip install 'revgrad[demo]')")
        return 1
    print(result)
    if args.json:
        write_json(result, args.json)
    return 0


COMMANDS: tuple[Command, ...] = (
    Command(
        name="demo",
        help="train a small reversible ResNet on scikit-learn's digits and compare its memory with plain autograd",
        description=(
            "Train a small reversible ResNet (AdditiveCoupling blocks, converted with revgrad.reversible) on "
            "scikit-learn's digits data set (1797 8x8 images, bundled with scikit-learn: nothing is downloaded). "
            "Prints the test accuracy, the activation memory held between forward and backward for one "
            "training batch by the revgrad model and by the same model with plain autograd, and what the last "
            "backward's reconstruction check found. Needs scikit-learn (pip install 'revgrad[demo]')."
        ),
        add_arguments=_demo_arguments,
        run=_demo_run,
    ),
    Command(
        name="doctor",
        help="print the stability report of a flow on digits and on out-of-distribution probes",
        description=(
            "Build a named model (or load a saved one) and print revgrad.stability_report of its invertible "
            "chain on a batch of scikit-learn's digits and on Gaussian, Rademacher and scaled probes: per block "
            "the reconstruction error, the share of NaN/Inf, local Lipschitz estimates of the block and of its "
            "inverse, and the analytic bi-Lipschitz bounds where they exist."
        ),
        add_arguments=_doctor_arguments,
        run=_doctor_run,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``revgrad`` parser, with one subparser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="revgrad",
        description="revgrad: memory-saving backprop for reversible networks, with checked reconstruction.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.description)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``revgrad`` console script; returns the exit status.

    ``argv``: the arguments without the program name (``None``: ``sys.argv[1:]``). ``--help``,
    ``--version`` and usage errors return argparse's status (0 or 2) instead of exiting.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    if args.command is None:
        parser.print_help()
        return 2
    return args.run(args)
