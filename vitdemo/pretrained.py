"""Pre-trained ImageNet-1k weights, downloaded when online (never at import time).

Two sources of ViT-B/16, each with its own preprocessing, kept with the weights:
- "torchvision": `ViT_B_16_Weights.IMAGENET1K_V1` (resize 256, centre-crop 224, bilinear,
  ImageNet mean/std);
- "timm": `timm/vit_base_patch16_224.augreg2_in21k_ft_in1k` on the Hugging Face hub (bicubic,
  crop ratio 0.9 so resize 248, mean/std 0.5).
Offline, both raise `PretrainedUnavailable` with a message that says why and what to do, at
once: the hub client retries a failed connection for about 25 s, so the hub is asked only after
the local cache misses and its server answers a plain TCP connection.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import torch

from .checkpoint import preprocessing
from .convert import convert_state_dict
from .model import VisionTransformer
from . import create_model

TIMM_REPO = "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
SOURCES = ("torchvision", "timm")


class PretrainedUnavailable(RuntimeError):
    """The weights could not be fetched (usually: no network). `reason` is the underlying error
    in a few words, for callers that word their own advice (the command line names its options)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names; they ship inside torchvision, so no download."""
    from torchvision.models import ViT_B_16_Weights

    return list(ViT_B_16_Weights.IMAGENET1K_V1.meta["categories"])


def _fetch_torchvision() -> dict[str, torch.Tensor]:
    from torchvision.models import ViT_B_16_Weights

    return ViT_B_16_Weights.IMAGENET1K_V1.get_state_dict(progress=True)


def _check_reachable(url: str, timeout: float = 5.0) -> None:
    """Raise `OSError` at once if `url`'s server does not accept a TCP connection. Skipped behind
    a proxy (then only the proxy can tell), where the download itself reports the failure."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise OSError(f"{host} is not reachable: {err.strerror or err}") from None


def _fetch_timm() -> dict[str, torch.Tensor]:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from safetensors.torch import load_file

    try:  # the local cache first: no network at all
        return load_file(hf_hub_download(TIMM_REPO, "model.safetensors", local_files_only=True))
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise OSError("HF_HUB_OFFLINE is set and the weights are not in the local cache") from None
    _check_reachable(constants.ENDPOINT)  # offline, this fails in milliseconds instead of ~25 s of retries
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
        reason = f"{type(err).__name__}: {err}"
        raise PretrainedUnavailable(
            f"could not download the pre-trained ViT-B/16 weights from {source} ({reason}). "
            "This needs an internet connection the first time (later runs use the local cache); "
            "offline, use a vitdemo checkpoint instead.", reason=reason
        ) from err
    model = create_model("vit_b_16", num_classes=1000)
    model.load_state_dict(convert_state_dict(state, source), strict=True)
    metadata = {"config": model.config.to_dict(), "class_names": imagenet_class_names(),
                "source": source, **PREPROCESSING[source]}
    return model.eval(), metadata
