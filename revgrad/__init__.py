"""revgrad: memory-saving backprop for reversible and invertible networks, with checked reconstruction.

Wrap a network of blocks (modules with ``forward`` and ``inverse``) with :func:`reversible`; train as
usual. Activation memory stays nearly flat in depth and gradients stay as close to the truth as plain
autograd's, because every rebuilt activation is checked against a fingerprint stored in forward.

Rooms: ``revgrad.engine`` (the engine), ``revgrad.ops`` (kernels or their PyTorch twins),
``revgrad.blocks`` (couplings, layers, adapters), ``revgrad.models``, ``revgrad.analysis``
(diagnostics, regularizers), ``revgrad.tools`` (the ``revgrad`` command, measuring).
"""

from . import models
from .analysis import diagnostics, regularizers
from .analysis.diagnostics import BlockStability, StabilityReport, lipschitz_bound, ood_probes, stability_report
from .analysis.regularizers import PenaltySchedule, finite_difference_penalty
from .blocks.couplings import AdditiveCoupling, AffineCoupling
from .blocks.interop import FrEIABlock, NormflowsBlock, freia_blocks, normflows_blocks
from .blocks.layers import ActNorm, InvertibleConv1x1, Reverse, Shuffle, Squeeze
from .engine.anchors import AdaptiveAnchors
from .engine.backprop import EngineConfig, run_chain
from .engine.checks import default_tol
from .engine.protocol import BlockError, FusedBlock, ReconstructionError, is_block
from .engine.replay import RandomReplayError, claim_tape
from .engine.report import BackwardReport
from .engine.sequential import PlainSequential, ReversibleSequential, last_reports, reversible
from .ops.fingerprint import fingerprint

__version__ = "0.1.0"

__all__ = [
    "ActNorm",
    "AdaptiveAnchors",
    "AdditiveCoupling",
    "AffineCoupling",
    "BackwardReport",
    "BlockError",
    "BlockStability",
    "EngineConfig",
    "FrEIABlock",
    "FusedBlock",
    "InvertibleConv1x1",
    "MemoryProbe",
    "NormflowsBlock",
    "PenaltySchedule",
    "PlainSequential",
    "RandomReplayError",
    "ReconstructionError",
    "Reverse",
    "ReversibleSequential",
    "Shuffle",
    "Squeeze",
    "StabilityReport",
    "__version__",
    "claim_tape",
    "default_tol",
    "diagnostics",
    "fingerprint",
    "finite_difference_penalty",
    "freia_blocks",
    "is_block",
    "last_reports",
    "lipschitz_bound",
    "models",
    "normflows_blocks",
    "ood_probes",
    "regularizers",
    "reversible",
    "run_chain",
    "stability_report",
]


def __getattr__(name: str):
    # The memory probe behind the memory figures, on first use: `import revgrad` stays light.
    if name == "MemoryProbe":
        from .tools.memory import MemoryProbe

        return MemoryProbe
    raise AttributeError(f"module 'revgrad' has no attribute {name!r}")
