"""vitdemo: the Vision Transformer of "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2020),
small, exact and fast, with the tools to train it and to see how it works.

    import vitdemo
    model = vitdemo.create_model("vit_b_16", num_classes=1000)
    logits, attentions = model(images, return_attention=True)
"""

from __future__ import annotations

from typing import Any

from .checkpoint import load_checkpoint, save_checkpoint
from .config import DEFAULT_PRESET, PRESETS, ViTConfig, get_config, list_presets
from .convert import convert_state_dict, load_weights
from .model import VisionTransformer, resample_pos_embed
from .tracing import BlockTrace, Trace, trace

__version__ = "0.1.0"


def create_model(name: str = DEFAULT_PRESET, num_classes: int | None = None, **overrides: Any) -> VisionTransformer:
    """Build the preset `name` (see `list_presets()`) with `num_classes` outputs (default: the
    preset's, 1000 for ImageNet's sizes, 10 for the CIFAR ones) and any other hyper-parameter of
    `ViTConfig` overridden, e.g. `create_model("vit_s_16", depth=6)`. Weights are freshly
    initialised; bad values raise `ValueError`."""
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    return VisionTransformer(get_config(name, **overrides))


__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "BlockTrace",
    "Trace",
    "ViTConfig",
    "VisionTransformer",
    "__version__",
    "convert_state_dict",
    "create_model",
    "get_config",
    "list_presets",
    "load_checkpoint",
    "save_checkpoint",
    "load_weights",
    "resample_pos_embed",
    "trace",
]
