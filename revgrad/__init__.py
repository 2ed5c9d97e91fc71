"""revgrad: memory-saving backprop for reversible and invertible networks, with checked reconstruction.

Wrap a network of blocks (modules with ``forward`` and ``inverse``) with :func:`reversible`; train as
usual. Activation memory stays nearly flat in depth and gradients equal plain autograd's, because
every rebuilt activation is checked against a fingerprint stored in forward.
"""

from . import diagnostics, models, regularizers
from .anchors import AdaptiveAnchors
from .couplings import AdditiveCoupling, AffineCoupling
from .diagnostics import BlockStability, StabilityReport, lipschitz_bound, ood_probes, stability_report
from .engine import EngineConfig, run_chain
from .fingerprint import default_tol, fingerprint
from .interop import FrEIABlock, freia_blocks
from .layers import ActNorm, InvertibleConv1x1, Reverse, Shuffle, Squeeze
from .protocol import BlockError, FusedBlock, ReconstructionError, is_block
from .regularizers import PenaltySchedule, finite_difference_penalty
from .report import BackwardReport
from .sequential import ReversibleSequential, reversible

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
    "PenaltySchedule",
    "ReconstructionError",
    "Reverse",
    "ReversibleSequential",
    "Shuffle",
    "Squeeze",
    "StabilityReport",
    "__version__",
    "default_tol",
    "diagnostics",
    "fingerprint",
    "finite_difference_penalty",
    "freia_blocks",
    "is_block",
    "lipschitz_bound",
    "models",
    "ood_probes",
    "regularizers",
    "reversible",
    "run_chain",
    "stability_report",
]
