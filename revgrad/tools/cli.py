"""The ``revgrad`` command line.

Subcommands are entries of :data:`COMMANDS`: each :class:`Command` names itself, adds its options to
its own ``argparse`` parser and runs from the parsed namespace. A new subcommand (``bench``,
``doctor``) is one more entry; heavy imports belong inside its ``run`` so that ``revgrad --help``
stays fast and works without the optional dependencies.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .. import __version__

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

    from ..engine.protocol import ReconstructionError
    from .demo import DemoSettings, run_demo

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


# --------------------------------------------------------------------------------------------------
# revgrad bench


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from .benchmark import PROVIDERS
    from .benchrun import FULL, QUICK

    # Defaults are None so that --quick can fill in what was not given.
    sizes = parser.add_argument_group("sizes (defaults: full run / with --quick)")
    sizes.add_argument("--quick", action="store_true",
                       help=f"small sizes that finish in about a minute on a 2-core CPU: depths "
                            f"{' '.join(map(str, QUICK.depths))}, batch {QUICK.batch}, {QUICK.steps} timed steps")
    sizes.add_argument("--depths", type=_positive_int, nargs="+", metavar="N",
                       help=f"blocks of the stage (default: {' '.join(map(str, FULL.depths))})")
    sizes.add_argument("--batch", type=_positive_int, metavar="B", help=f"batch size (default: {FULL.batch})")
    sizes.add_argument("--channels", type=_positive_int, metavar="C",
                       help=f"channels of the stage input, even (default: {FULL.channels})")
    sizes.add_argument("--size", type=_positive_int, metavar="S",
                       help=f"height = width of the stage input (default: {FULL.size})")
    sizes.add_argument("--steps", type=_positive_int, metavar="K",
                       help=f"timed steps per provider and depth, interleaved (default: {FULL.steps})")
    sizes.add_argument("--warmup", type=int, metavar="K",
                       help=f"untimed steps per provider and depth (default: {FULL.warmup})")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, metavar="P",
                        help=f"providers to compare; plain autograd is always added (default: all: "
                             f"{' '.join(PROVIDERS)})")
    parser.add_argument("--budget-mib", type=_positive_float, metavar="MIB",
                        help="also find, per provider, the largest batch whose step (input + peak) fits this many "
                             "MiB (doubling, then bisection to within 3%%); on CPU bytes are counted, not limited")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda' or "
                                                         "'cuda:N' (default: %(default)s)")
    parser.add_argument("--threads", type=_positive_int, metavar="N",
                        help="torch CPU threads (default: 1 on CPU, steadier on a machine shared with other work)")
    parser.add_argument("--out", default="revgrad-bench", metavar="DIR",
                        help="folder for bench.json and bench.png (default: %(default)s)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the float64 check that every provider computes plain autograd's gradients")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _bench_run(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from .benchrun import FULL, QUICK, format_table, run_bench, write_outputs

    given = {
        name: getattr(args, name)
        for name in ("batch", "channels", "size", "steps", "warmup")
        if getattr(args, name) is not None
    }
    if args.depths:
        given["depths"] = tuple(args.depths)
    if args.providers:
        given["providers"] = tuple(args.providers)
    settings = replace(QUICK if args.quick else FULL, **given, device=args.device, threads=args.threads,
                       check=args.check, budget_mib=args.budget_mib)
    try:
        result = run_bench(settings, progress=args.progress, command=shlex.join(args.command_line))
    except ValueError as exc:
        _error(str(exc))
        return 2
    print(format_table(result))
    json_path, png, why = write_outputs(result, Path(args.out))
    print(f"\nwrote {json_path}" + (f" and {png}" if png else ""))
    if why:
        _error(why, prefix="revgrad bench: ")
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
        name="bench",
        help="measure memory and step time of revgrad, plain autograd, checkpointing, memcnn and RevLib",
        description=(
            "Train the same RevNet stage (additive couplings, RevNet basic branches) with every provider, for "
            "several depths, on this machine: plain autograd, torch.utils.checkpoint (sqrt(N) segments), revgrad "
            "check='off' and check='correct', memcnn and RevLib (skipped when not installed). Prints a table of "
            "bytes held between forward and backward, the step's peak bytes, the step time (median, providers "
            "interleaved) and ratios to plain autograd measured in the same run; writes bench.json and bench.png "
            "(memory and time vs depth; the plot needs matplotlib) to --out. A float64 check first verifies that "
            "every provider computes plain autograd's gradients."
        ),
        add_arguments=_bench_arguments,
        run=_bench_run,
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
    args.command_line = ["revgrad", *(sys.argv[1:] if argv is None else argv)]  # recorded with results
    return args.run(args)
