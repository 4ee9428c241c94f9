"""Pre-trained ImageNet-1k weights, downloaded when online (never at import time).

Two sources of ViT-B/16, each with its own preprocessing, kept with the weights:
- "torchvision": `ViT_B_16_Weights.IMAGENET1K_V1` (resize 256, centre-crop 224, bilinear,
  ImageNet mean/std);
- "timm": `timm/vit_base_patch16_224.augreg2_in21k_ft_in1k` on the Hugging Face hub (bicubic,
  crop ratio 0.9 so resize 248, mean/std 0.5).
Offline, both raise `PretrainedUnavailable` with a message that says why and what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .checkpoint import preprocessing
from .convert import convert_state_dict
from .model import VisionTransformer
from . import create_model

TIMM_REPO = "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
SOURCES = ("torchvision", "timm")


class PretrainedUnavailable(RuntimeError):
    """The weights could not be fetched (usually: no network)."""


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names; they ship inside torchvision, so no download."""
    from torchvision.models import ViT_B_16_Weights

    return list(ViT_B_16_Weights.IMAGENET1K_V1.meta["categories"])


def _fetch_torchvision() -> dict[str, torch.Tensor]:
    from torchvision.models import ViT_B_16_Weights

    return ViT_B_16_Weights.IMAGENET1K_V1.get_state_dict(progress=True)


def _fetch_timm() -> dict[str, torch.Tensor]:
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file

    return load_file(hf_hub_download(TIMM_REPO, "model.safetensors"))


FETCHERS: dict[str, Callable[[], dict[str, torch.Tensor]]] = {"torchvision": _fetch_torchvision, "timm": _fetch_timm}
PREPROCESSING = {
    "torchvision": preprocessing(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), resize=256, interpolation="bilinear"),
    "timm": preprocessing(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize=248, interpolation="bicubic"),
}


def load_pretrained(source: str = "torchvision") -> tuple[VisionTransformer, dict[str, Any]]:
    """ViT-B/16 trained on ImageNet-1k, in eval mode, with metadata shaped like a checkpoint's
    (`class_names`, `image_size`, `resize`, `interpolation`, `mean`, `std`, `config`, `source`)."""
    if source not in FETCHERS:
        raise ValueError(f"unknown pre-trained source {source!r}; choose one of {SOURCES}")
    try:
        state = FETCHERS[source]()
    except Exception as err:  # noqa: BLE001 - network, hub and cache errors all mean "unavailable"
        raise PretrainedUnavailable(
            f"could not download the pre-trained ViT-B/16 weights from {source} ({type(err).__name__}: {err}). "
            "This needs an internet connection the first time (later runs use the local cache); "
            "offline, use a vitdemo checkpoint instead."
        ) from err
    model = create_model("vit_b_16", num_classes=1000)
    model.load_state_dict(convert_state_dict(state, source), strict=True)
    metadata = {"config": model.config.to_dict(), "class_names": imagenet_class_names(),
                "source": source, **PREPROCESSING[source]}
    return model.eval(), metadata
