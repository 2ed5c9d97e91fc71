"""Ready models, torchvision-style constructors: ``memory_saving=True, check="correct"`` train with
revgrad's engine; ``memory_saving=False`` trains the same model with plain autograd (same
``state_dict`` keys).

One module per family: :mod:`revgrad.models.revnet` (RevNet-38/110/164, Gomez et al. 2017) and
:mod:`revgrad.models.glow` (the Glow-style INN classifier of Behrmann et al. 2021).
"""

from .glow import GlowClassifier, glow_classifier
from .revnet import RevDownsample, RevNet, revnet38, revnet110, revnet164, revnet_bottleneck_branch, revnet_branch

__all__ = [
    "GlowClassifier",
    "RevDownsample",
    "RevNet",
    "glow_classifier",
    "revnet38",
    "revnet110",
    "revnet164",
    "revnet_bottleneck_branch",
    "revnet_branch",
]
