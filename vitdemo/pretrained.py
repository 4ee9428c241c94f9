"""Pre-trained ImageNet-1k weights, downloaded when online (never at import time).

Two sources of ViT-B/16, each with its own preprocessing, kept with the weights:
- "torchvision": `ViT_B_16_Weights.IMAGENET1K_V1` (resize 256, centre-crop 224, bilinear,
  ImageNet mean/std);
- "timm": `timm/vit_base_patch16_224.augreg2_in21k_ft_in1k` on the Hugging Face hub (bicubic,
  crop ratio 0.9 so resize 248, mean/std 0.5).
Offline, both raise `PretrainedUnavailable` with a message that says why and what to do, at
once: the hub client retries a failed connection for about 25 s, so the hub is asked only after
the local cache misses and its server answers a plain TCP connection. Only the failures of a
download are reported so (no network, a server's refusal, a cache that cannot be written, a
damaged file); anything else (out of memory, a bug) surfaces as itself.

`cached_timm_weights()` says, without any network, whether the hub's local cache already holds
timm's weights (a Hugging Face Space preloads them at build time: README's `preload_from_hub`).
"""

from __future__ import annotations

import os
import socket
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from .data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, HALF, Preprocessing
from .convert import convert_state_dict
from .model import VisionTransformer
from . import create_model

TIMM_REPO = "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
TIMM_FILE = "model.safetensors"
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
        return load_file(hf_hub_download(TIMM_REPO, TIMM_FILE, local_files_only=True))
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise OSError("HF_HUB_OFFLINE is set and the weights are not in the local cache") from None
    _check_reachable(constants.ENDPOINT)  # offline, this fails in milliseconds instead of ~25 s of retries
    return load_file(hf_hub_download(TIMM_REPO, TIMM_FILE))


def cached_timm_weights() -> Path | None:
    """The file of timm's ViT-B/16 weights in the hub's local cache, or None; never uses the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(TIMM_REPO, TIMM_FILE)
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def download_failure(err: BaseException) -> str | None:
    """What went wrong, in a few plain words, if `err` is a download's failure; None for anything else."""
    from safetensors import SafetensorError

    if isinstance(err, PermissionError):
        return f"the download cache cannot be written ({err.filename or 'permission denied'})"
    if isinstance(err, urllib.error.URLError):  # torchvision's download: "[Errno -2] Name or service not known"
        reason = err.reason
        return f"no internet connection ({getattr(reason, 'strerror', None) or reason})"
    if isinstance(err, SafetensorError) or (isinstance(err, RuntimeError) and "hash" in str(err)):
        return "the downloaded weights file is damaged; delete it from the cache to download it again"
    if isinstance(err, OSError):  # sockets, the hub client (its HTTP errors are OSErrors), a full disk
        text = str(err.strerror or err)
        offline = (isinstance(err, (ConnectionError, TimeoutError, socket.gaierror)) or "not reachable" in text
                   or "HF_HUB_OFFLINE" in text)
        return f"no internet connection ({text})" if offline else f"the download failed ({text})"
    return None


FETCHERS: dict[str, Callable[[], dict[str, torch.Tensor]]] = {"torchvision": _fetch_torchvision, "timm": _fetch_timm}
PREPROCESSING = {
    "torchvision": Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD, resize=256, interpolation="bilinear"),
    "timm": Preprocessing(224, HALF, HALF, resize=248, interpolation="bicubic"),
}


def load_pretrained(source: str = "torchvision") -> tuple[VisionTransformer, dict[str, Any]]:
    """ViT-B/16 trained on ImageNet-1k, in eval mode, with metadata shaped like a checkpoint's
    (`class_names`, `image_size`, `resize`, `interpolation`, `mean`, `std`, `config`, `source`)."""
    if source not in FETCHERS:
        raise ValueError(f"unknown pre-trained source {source!r}; choose one of {SOURCES}")
    try:
        state = FETCHERS[source]()
    except Exception as err:
        reason = download_failure(err)
        if reason is None:
            raise  # not a download's failure: a bug or the machine's, reported as itself
        raise PretrainedUnavailable(
            f"the pre-trained ViT-B/16 weights ({source}) could not be fetched: {reason}. They are downloaded "
            "once (about 350 MB) and then read from the local cache.", reason=reason
        ) from err
    model = create_model("vit_b_16", num_classes=1000)
    model.load_state_dict(convert_state_dict(state, source), strict=True)
    metadata = {"config": model.config.to_dict(), "class_names": imagenet_class_names(),
                "source": source, **PREPROCESSING[source].to_dict()}
    return model.eval(), metadata
