"""Ready models, torchvision-style constructors: ``memory_saving=True, check="correct"`` train with
revgrad's engine; ``memory_saving=False`` trains the same model with plain autograd (same
``state_dict`` keys).

One module per family: :mod:`revgrad.models.revnet` (RevNet-38/110/164, Gomez et al. 2017),
:mod:`revgrad.models.glow` (the Glow-style INN classifier of Behrmann et al. 2021),
:mod:`revgrad.models.flow` (Glow as a density model, Kingma & Dhariwal 2018), :mod:`revgrad.models.meft`
(pretrained transformers made reversible, Liao et al. 2023) and
:mod:`revgrad.models.transformer` (RevViT, Mangalam et al. 2022, and a reversible causal LM).
"""

from .flow import Glow, dequantize, glow
from .glow import GlowClassifier, glow_classifier
from .meft import MEFT, AdaptedFunction, Adapter, attention_bias, meft_model
from .revnet import RevDownsample, RevNet, revnet38, revnet110, revnet164, revnet_bottleneck_branch, revnet_branch
from .transformer import MLP, RevLM, RevViT, SelfAttention, rev_lm, rev_vit, rev_vit_base, rev_vit_small

__all__ = [
    "MEFT",
    "MLP",
    "AdaptedFunction",
    "Adapter",
    "Glow",
    "GlowClassifier",
    "RevDownsample",
    "RevLM",
    "RevNet",
    "RevViT",
    "SelfAttention",
    "attention_bias",
    "dequantize",
    "glow",
    "glow_classifier",
    "meft_model",
    "rev_lm",
    "rev_vit",
    "rev_vit_base",
    "rev_vit_small",
    "revnet38",
    "revnet110",
    "revnet164",
    "revnet_bottleneck_branch",
    "revnet_branch",
]
