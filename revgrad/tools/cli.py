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

#: Options of ``revgrad demo`` that belong to some tasks only (argparse ``dest`` -> tasks); the others are shared.
_DEMO_TASK_OPTIONS = {
    "epochs": ("digits",), "channels": ("digits",), "stages": ("digits",),
    "steps": ("lm", "flow"), "dim": ("lm",), "heads": ("lm",), "seq_len": ("lm",), "dropout": ("lm",),
    "sample_len": ("lm",), "levels": ("flow",), "hidden": ("flow",), "conditional": ("flow",), "out": ("flow",),
}
#: How the options in :data:`_DEMO_TASK_OPTIONS` are spelled on the command line, where not ``--dest``.
_DEMO_OPTION_NAMES = {"conditional": "--unconditional"}


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .demo import DEFAULTS, FLOW_DEFAULTS, LM_DEFAULTS  # light: torch is already imported by the package

    parser.add_argument("--task", choices=("digits", "lm", "flow"), default="digits",
                        help="'digits': a reversible ResNet on scikit-learn's digits; 'lm': a reversible causal "
                             "language model on Python's own help text (pydoc_data, byte tokens); 'flow': a "
                             "Glow density model of the digits, with samples written to a PNG "
                             "(default: %(default)s)")
    model = parser.add_argument_group("model")
    model.add_argument("--depth", type=_positive_int, default=None, metavar="N",
                       help=f"digits: AdditiveCoupling blocks per reversible stage (default: {DEFAULTS.depth}); "
                            f"lm: reversible transformer layers (default: {LM_DEFAULTS.depth}); "
                            f"flow: flow steps per level (default: {FLOW_DEFAULTS.depth})")
    model.add_argument("--channels", type=_positive_int, default=None, metavar="C",
                       help=f"digits: channels of the first stage, even; each later stage doubles them "
                            f"(default: {DEFAULTS.channels})")
    model.add_argument("--stages", type=int, choices=(1, 2, 3), default=None,
                       help=f"digits: reversible stages, with a stride-2 downsampling between them "
                            f"(default: {DEFAULTS.stages})")
    model.add_argument("--dim", type=_positive_int, default=None, metavar="D",
                       help=f"lm: features of each of the two streams (default: {LM_DEFAULTS.dim})")
    model.add_argument("--heads", type=_positive_int, default=None, metavar="H",
                       help=f"lm: attention heads, dividing --dim (default: {LM_DEFAULTS.heads})")
    model.add_argument("--seq-len", type=_positive_int, default=None, metavar="T",
                       help=f"lm: bytes per training sequence (default: {LM_DEFAULTS.seq_len})")
    model.add_argument("--dropout", type=float, default=None, metavar="P",
                       help=f"lm: dropout, replayed exactly in backward (default: {LM_DEFAULTS.dropout:g})")
    model.add_argument("--levels", type=int, choices=(1, 2, 3), default=None,
                       help=f"flow: Glow levels, a squeeze each and a split after each but the last "
                            f"(default: {FLOW_DEFAULTS.levels})")
    model.add_argument("--hidden", type=_positive_int, default=None, metavar="H",
                       help=f"flow: width of the coupling networks (default: {FLOW_DEFAULTS.hidden})")
    model.add_argument("--unconditional", dest="conditional", action="store_const", const=False, default=None,
                       help="flow: model all digits without their labels (default: class-conditional, "
                            "one-hot labels into every coupling and prior)")
    model.add_argument("--check", choices=("off", "detect", "correct"), default=DEFAULTS.check,
                       help="revgrad's reconstruction check: 'off' (classic reversible backprop), 'detect' "
                            "(raise on a drifted rebuilt activation) or 'correct' (recompute it exactly from "
                            "an anchor) (default: %(default)s)")

    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=_positive_int, default=None, metavar="N",
                          help=f"digits: passes over the training set (default: {DEFAULTS.epochs})")
    training.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                          help=f"lm, flow: training steps (default: {LM_DEFAULTS.steps} for lm, "
                               f"{FLOW_DEFAULTS.steps} for flow)")
    training.add_argument("--batch-size", type=_positive_int, default=None, metavar="B",
                          help=f"training batch size, also the batch whose held memory is measured "
                               f"(default: {DEFAULTS.batch_size} for digits, {LM_DEFAULTS.batch_size} for lm, "
                               f"{FLOW_DEFAULTS.batch_size} for flow)")
    training.add_argument("--lr", type=_positive_float, default=None,
                          help=f"peak learning rate of AdamW (Adam for flow), one-cycle schedule "
                               f"(default: {DEFAULTS.lr:g} for digits, {LM_DEFAULTS.lr:g} for lm, "
                               f"{FLOW_DEFAULTS.lr:g} for flow)")
    training.add_argument("--seed", type=int, default=DEFAULTS.seed,
                          help="seed of the initial weights and the batch order; runs with the same seed and "
                               "thread count give the same result (default: %(default)s)")

    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--threads", type=_positive_int, default=DEFAULTS.threads, metavar="N",
                         help="CPU threads for torch; the demo's layers are small, and extra threads "
                              "slow down badly on a CPU busy with other work (default: %(default)s)")
    runtime.add_argument("--device", default=DEFAULTS.device,
                         help="where to train: 'cpu' or a CUDA device such as 'cuda' or 'cuda:1' "
                              "(default: %(default)s)")
    runtime.add_argument("--sample-len", type=int, default=None, metavar="N",
                         help=f"lm: bytes to sample from the trained model and print (default: "
                              f"{LM_DEFAULTS.sample_len})")
    runtime.add_argument("--out", default=None, metavar="PNG",
                         help=f"flow: where to write the PNG of samples (needs matplotlib) "
                              f"(default: {FLOW_DEFAULTS.out} in the current directory)")
    runtime.add_argument("--no-progress", dest="progress", action="store_false",
                         help="do not show the progress bars")


def _demo_options(args: argparse.Namespace, defaults) -> dict:
    """The settings of ``args.task`` given on the command line, the task's defaults for the others."""
    from dataclasses import fields

    given = {f.name: getattr(args, f.name, None) for f in fields(defaults)}
    return {name: getattr(defaults, name) if value is None else value for name, value in given.items()}


def _demo_device_error(device_name: str) -> str | None:
    import torch

    try:
        device = torch.device(device_name)
    except RuntimeError as exc:
        return f"--device {device_name}: {exc}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device_name}: CUDA is not available"
    if device.type not in ("cpu", "cuda"):
        return f"--device {device_name}: the demo runs on 'cpu' or 'cuda'"
    return None


def _demo_run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ..engine.protocol import ReconstructionError
    from .demo import (
        DEFAULTS,
        FLOW_DEFAULTS,
        LM_DEFAULTS,
        DemoSettings,
        FlowDemoSettings,
        LMDemoSettings,
        run_demo,
        run_flow_demo,
        run_lm_demo,
    )

    for dest, tasks in _DEMO_TASK_OPTIONS.items():
        if args.task not in tasks and getattr(args, dest, None) is not None:
            option = _DEMO_OPTION_NAMES.get(dest, f"--{dest.replace('_', '-')}")
            _error(f"revgrad demo: {option} is an option of --task {' or '.join(tasks)}, not {args.task}")
            return 2
    if args.task == "lm":
        settings = LMDemoSettings(**_demo_options(args, LM_DEFAULTS))
    elif args.task == "flow":
        settings = FlowDemoSettings(**_demo_options(args, FLOW_DEFAULTS))
    else:
        settings = DemoSettings(**_demo_options(args, DEFAULTS))
    try:
        settings.validate()
    except ValueError as exc:
        _error(str(exc))
        return 2
    why = _demo_device_error(settings.device)
    if why:
        _error(why)
        return 2

    if isinstance(settings, LMDemoSettings):
        s = settings
        print(
            f"revgrad demo --task lm: a reversible causal language model on Python's help topics "
            f"(pydoc_data, byte tokens)\n"
            f"  model: {s.depth} AdditiveCoupling(SelfAttention, MLP) layers, two streams of {s.dim} features, "
            f"{s.heads} heads, check={s.check!r}\n"
            f"  training: {s.steps} steps, batch {s.batch_size} x {s.seq_len} bytes, lr {s.lr:g}, "
            f"seed {s.seed}, device {s.device}",
            flush=True,
        )
        run = lambda: run_lm_demo(**asdict(s), progress=args.progress)  # noqa: E731
    elif isinstance(settings, FlowDemoSettings):
        s = settings
        kind = "class-conditional (one-hot labels)" if s.conditional else "unconditional"
        print(
            f"revgrad demo --task flow: a {kind} Glow on scikit-learn's digits (8x8 images, 17 levels, "
            f"dequantized)\n"
            f"  model: {s.levels} level(s) x {s.depth} steps (ActNorm, 1x1 conv, affine coupling of width "
            f"{s.hidden}), learned priors, check={s.check!r}\n"
            f"  training: {s.steps} steps, batch {s.batch_size}, Adam, lr {s.lr:g}, seed {s.seed}, device {s.device}",
            flush=True,
        )
        run = lambda: run_flow_demo(**asdict(s), progress=args.progress)  # noqa: E731
    else:
        s = settings
        print(
            f"revgrad demo: a reversible ResNet on scikit-learn's digits (8x8 images, 10 classes)\n"
            f"  model: stem conv, {s.stages} stage(s) x {s.depth} AdditiveCoupling blocks, "
            f"{s.channels} channels, check={s.check!r}\n"
            f"  training: {s.epochs} epochs, batch {s.batch_size}, lr {s.lr:g}, "
            f"seed {s.seed}, device {s.device}",
            flush=True,
        )
        run = lambda: run_demo(**asdict(s), progress=args.progress)  # noqa: E731
    try:
        result = run()
    except ModuleNotFoundError as exc:
        if exc.name != "sklearn":
            raise
        _error(str(exc))
        return 1
    except ReconstructionError as exc:
        _error(f"{exc}\n(the demo ran with --check detect; --check correct recovers from this)")
        return 1
    if isinstance(settings, LMDemoSettings):
        print(f"  {result.parameters:,} parameters, {settings.depth} reversible layers, "
              f"{result.train_tokens:,} training / {result.heldout_tokens:,} held-out bytes")
    elif isinstance(settings, FlowDemoSettings):
        print(f"  {result.parameters:,} parameters, {result.blocks} invertible blocks in {settings.levels} "
              f"memory-saving chain(s), {result.train_size} training / {result.test_size} test images")
    else:
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
    from .benchmark import ALL_PROVIDERS, PROVIDERS
    from .benchrun import FULL, PRESETS, QUICK, WORKLOADS

    parser.add_argument("--workload", choices=WORKLOADS, default="revnet-stage",
                        help="what every provider trains: the RevNet stage, the layers of a reversible causal "
                             "language model (rev_lm, input [B, tokens, 2 dim]) or a RevViT (images [B, 3, size, "
                             "size]); the transformers add reformer_pytorch and revtorch (default: %(default)s)")
    # Defaults are None so that --quick and --workload can fill in what was not given.
    sizes = parser.add_argument_group("sizes (defaults: full run / with --quick; revnet-stage unless said)")
    sizes.add_argument("--quick", action="store_true",
                       help=f"small sizes that finish in about a minute on a 2-core CPU: depths "
                            f"{' '.join(map(str, QUICK.depths))}, batch {QUICK.batch}, {QUICK.steps} timed steps")
    sizes.add_argument("--depths", type=_positive_int, nargs="+", metavar="N",
                       help=f"blocks of the stage (default: {' '.join(map(str, FULL.depths))}; transformer "
                            f"{' '.join(map(str, PRESETS['transformer'][0].depths))}, vit "
                            f"{' '.join(map(str, PRESETS['vit'][0].depths))})")
    sizes.add_argument("--batch", type=_positive_int, metavar="B", help=f"batch size (default: {FULL.batch})")
    sizes.add_argument("--channels", type=_positive_int, metavar="C",
                       help=f"channels of the stage input, even (default: {FULL.channels})")
    sizes.add_argument("--size", type=_positive_int, metavar="S",
                       help=f"height = width of the stage input, or of RevViT's images (default: {FULL.size}; vit "
                            f"{PRESETS['vit'][0].size})")
    transformer, vit = PRESETS["transformer"][0], PRESETS["vit"][0]
    sizes.add_argument("--dim", type=_positive_int, metavar="D",
                       help=f"transformers: features per stream (default: transformer {transformer.dim}, vit "
                            f"{vit.dim})")
    sizes.add_argument("--heads", type=_positive_int, metavar="H",
                       help=f"transformers: attention heads (default: transformer {transformer.heads}, vit "
                            f"{vit.heads})")
    sizes.add_argument("--tokens", type=_positive_int, metavar="T",
                       help=f"transformer: sequence length (default: {transformer.tokens})")
    sizes.add_argument("--patch", type=_positive_int, metavar="P",
                       help=f"vit: patch size, (size / patch)^2 tokens (default: {vit.patch})")
    sizes.add_argument("--steps", type=_positive_int, metavar="K",
                       help=f"timed steps per provider and depth, interleaved (default: {FULL.steps})")
    sizes.add_argument("--warmup", type=int, metavar="K",
                       help=f"untimed steps per provider and depth (default: {FULL.warmup})")
    parser.add_argument("--providers", nargs="+", choices=ALL_PROVIDERS, metavar="P",
                        help=f"providers to compare; plain autograd is always added (default: all: "
                             f"{' '.join(PROVIDERS)}; the transformers add {' '.join(ALL_PROVIDERS[len(PROVIDERS):])})")
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

    from .benchrun import PRESETS, format_table, run_bench, write_outputs

    given = {
        name: getattr(args, name)
        for name in ("batch", "channels", "size", "steps", "warmup", "dim", "heads", "tokens", "patch")
        if getattr(args, name) is not None
    }
    if args.depths:
        given["depths"] = tuple(args.depths)
    if args.providers:
        given["providers"] = tuple(args.providers)
    settings = replace(PRESETS[args.workload][args.quick], **given, device=args.device, threads=args.threads,
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
        help="train a small reversible ResNet on scikit-learn's digits (or, with --task lm, a reversible language "
             "model; with --task flow, a Glow density model) and compare its memory with plain autograd",
        description=(
            "Train a small reversible ResNet (AdditiveCoupling blocks, converted with revgrad.reversible) on "
            "scikit-learn's digits data set (1797 8x8 images, bundled with scikit-learn: nothing is downloaded). "
            "Prints the test accuracy, the activation memory held between forward and backward for one "
            "training batch by the revgrad model and by the same model with plain autograd, and what the last "
            "backward's reconstruction check found. Needs scikit-learn (pip install 'revgrad[demo]'). "
            "With --task lm: train a reversible causal language model (revgrad.models.rev_lm) on the text of "
            "Python's help topics (pydoc_data, part of the standard library), one token per byte, and print the "
            "held-out loss before and after training, tokens per second, the same memory comparison and the "
            "last backward's report. "
            "With --task flow: train a small Glow (revgrad.models.glow, class-conditional unless --unconditional) "
            "by maximum likelihood on the digits' 17 integer levels, dequantized afresh every batch, and print the "
            "test bits/dim before and after training, images per second, the same memory comparison and the last "
            "backward's reports; samples at temperatures 1 and 0.7 are written as a PNG to --out (matplotlib)."
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
            "every provider computes plain autograd's gradients. --workload transformer (the layers of a reversible "
            "causal language model) or vit (a RevViT) trains a transformer instead, with reformer_pytorch's and "
            "revtorch's reversible sequences as two more providers."
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
