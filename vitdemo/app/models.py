"""The models every tab uses: the shipped CIFAR-10 checkpoint, the pre-trained ImageNet ViT-B/16
(timm's weights: read from the hub's local cache, where a Hugging Face Space preloads them, else
downloaded on first use; a failed download is remembered for a while instead of retried on every
click) and the runs trained in the Train tab, shared by all sessions through `MODELS`. The paper's
model leads where its weights are at hand (`default_model`).

Cached models are only ever read (eval mode, no gradients); training and fine-tuning work on
copies. Other modules read the store as `models.MODELS` at call time (tests replace it).
"""

from __future__ import annotations

import functools
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image

from .. import get_config
from ..checkpoint import DEFAULT_CHECKPOINT, CheckpointError, load_checkpoint, read_metadata
from ..config import ViTConfig
from ..data import Preprocessing
from ..engine import Recipe
from ..model import VisionTransformer
from ..pretrained import PREPROCESSING as PRETRAINED_PREPROCESSING
from ..pretrained import PretrainedUnavailable, cached_timm_weights, imagenet_class_names, load_pretrained
from ..runtime import RUNTIMES, RuntimeUnavailable, load_onnx, packing_available, prepare
from .common import ModelUnavailable, shown_path, user_error

SHIPPED = "Shipped CIFAR-10 ViT"
PRETRAINED = "ViT-B/16 ImageNet-1k (pre-trained)"
# The weights a Space preloads (README's preload_from_hub): 85.1% top-1 in timm's results table, against
# 81.1% for torchvision's IMAGENET1K_V1 in its documentation.
PRETRAINED_SOURCE = "timm"
SHIPPED_CHECKPOINT: Path = DEFAULT_CHECKPOINT  # read at call time, so tests can point it elsewhere
PRETRAINED_RETRY_SECONDS = 600.0  # a failed download is not tried again for this long
MAX_RUNS = 4  # trained runs kept in memory; the oldest is dropped first


@dataclass
class Entry:
    model: VisionTransformer
    meta: dict[str, Any]
    checkpoint: Path | None = None
    stamp: Any = None  # what the entry was loaded from (file and mtime): reload when it changes
    views: dict[str, Any] = field(default_factory=dict)  # cached pictures and runtimes of this model


def no_shipped_message() -> str:
    return (f"No shipped model is present (no checkpoint at `{shown_path(SHIPPED_CHECKPOINT)}` yet). Train a "
            f"model in the Train tab (a minute on the built-in shapes), or pick the pre-trained ViT-B/16.")


class ModelStore:
    """Models by picker name, loaded once and then shared read-only by every session."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._runs: list[str] = []  # names of trained runs, oldest first
        self._failures: dict[str, tuple[float, str]] = {}  # name -> (monotonic time, message)
        self._lock = threading.Lock()  # guards the dicts and the per-name locks
        self._loading: dict[str, threading.Lock] = {}

    def choices(self) -> list[str]:
        return [SHIPPED, PRETRAINED, *self._runs]

    def cached(self, name: str) -> Entry | None:
        return self._entries.get(name)

    def remember_failure(self, name: str, message: str) -> None:
        with self._lock:
            self._failures[name] = (time.monotonic(), message)

    def failure(self, name: str) -> str | None:
        failed = self._failures.get(name)
        if failed and time.monotonic() - failed[0] < PRETRAINED_RETRY_SECONDS:
            return failed[1]
        return None

    def get(self, name: str) -> Entry:
        """The model called `name`, loading it on first use; `ModelUnavailable` says why not."""
        if name == SHIPPED:
            return self._get_shipped()
        entry = self._entries.get(name)
        if entry is not None:
            return entry
        if name != PRETRAINED:
            raise ModelUnavailable(f"Unknown model {name!r}; choose one of {self.choices()}.")
        with self._lock_for(name):
            if (entry := self._entries.get(name)) is not None:  # loaded while we waited
                return entry
            if (message := self.failure(name)) is not None:
                raise ModelUnavailable(message)
            try:
                model, meta = load_pretrained(PRETRAINED_SOURCE)
            except PretrainedUnavailable as err:
                minutes = round(PRETRAINED_RETRY_SECONDS / 60)
                message = (f"The pre-trained ViT-B/16 is not available here: its weights are not on this server and "
                           f"could not be downloaded: {err.reason}. Pick the shipped CIFAR-10 ViT instead; on a "
                           f"Hugging Face Space the weights are preloaded when the Space is built. (Not tried again "
                           f"for {minutes} minutes.)")
                self.remember_failure(name, message)
                raise ModelUnavailable(message) from None
            entry = Entry(_read_only(model), meta)
            with self._lock:
                self._entries[name] = entry
            return entry

    def _get_shipped(self) -> Entry:
        path = Path(SHIPPED_CHECKPOINT)
        try:
            stamp = (str(path), path.stat().st_mtime_ns)
        except OSError:
            raise ModelUnavailable(no_shipped_message()) from None
        entry = self._entries.get(SHIPPED)
        if entry is not None and entry.stamp == stamp:
            return entry
        with self._lock_for(SHIPPED):
            entry = self._entries.get(SHIPPED)
            if entry is not None and entry.stamp == stamp:
                return entry
            try:
                model, meta = load_checkpoint(path)
            except CheckpointError as err:
                raise ModelUnavailable(f"The shipped model cannot be loaded: {err}") from None
            entry = Entry(_read_only(model), meta, path, stamp)
            with self._lock:
                self._entries[SHIPPED] = entry
            return entry

    def register(self, name: str, model: VisionTransformer, meta: dict[str, Any], checkpoint: Path | None,
                 runs_root: Path | None = None) -> None:
        """Add a trained run; beyond `MAX_RUNS`, the oldest run (and its folder, when it lies in
        `runs_root`) is dropped."""
        dropped = []
        with self._lock:
            self._entries[name] = Entry(_read_only(model), meta, checkpoint)
            if name not in self._runs:
                self._runs.append(name)
            while len(self._runs) > MAX_RUNS:
                old = self._runs.pop(0)
                entry = self._entries.pop(old, None)
                if entry is not None and entry.checkpoint is not None:
                    dropped.append(entry.checkpoint.parent)
        for folder in dropped:
            if runs_root is not None and Path(runs_root).resolve() in folder.resolve().parents:
                shutil.rmtree(folder, ignore_errors=True)  # only ever delete our own run folders

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._runs.clear()
            self._failures.clear()

    def _lock_for(self, name: str) -> threading.Lock:
        with self._lock:
            return self._loading.setdefault(name, threading.Lock())


def _read_only(model: VisionTransformer) -> VisionTransformer:
    # Shared between threads: eval mode and no parameter gradients (gradient-based explanations
    # ask for the gradient of their own input instead, so concurrent calls never write .grad).
    model = model.to("cpu").eval()
    model.requires_grad_(False)
    return model


MODELS = ModelStore()


def model_choices() -> list[str]:
    return MODELS.choices()


def entry(name: str | None) -> Entry:
    """The model picked (the shipped one when none is), or `ModelUnavailable`."""
    return MODELS.get(name or SHIPPED)


def model_spec(name: str | None) -> tuple[ViTConfig, dict[str, Any]]:
    """A model's config and metadata without loading (or downloading) its weights."""
    name = name or SHIPPED
    if (cached := MODELS.cached(name)) is not None and name != SHIPPED:
        return cached.model.config, cached.meta
    if name == SHIPPED:
        path = Path(SHIPPED_CHECKPOINT)
        if not path.is_file():
            raise ModelUnavailable(no_shipped_message())
        try:
            meta = read_metadata(path)
            return ViTConfig.from_dict(meta["config"]), meta
        except (CheckpointError, TypeError, ValueError) as err:
            raise ModelUnavailable(f"The shipped model cannot be read: {err}") from None
    if name == PRETRAINED:
        config = get_config("vit_b_16", num_classes=1000)
        meta = {"config": config.to_dict(), "class_names": imagenet_class_names(), "source": PRETRAINED_SOURCE,
                **PRETRAINED_PREPROCESSING[PRETRAINED_SOURCE].to_dict()}
        return config, meta
    raise ModelUnavailable(f"Unknown model {name!r}; choose one of {MODELS.choices()}.")


def if_available(fn: Callable, empty: tuple, note: int | None = None) -> Callable:
    """`fn(image, model_name, ...)` for the page's own events (a new image, a model picked): without
    an image the outputs are emptied; with a model that cannot be used they are too, and the text
    output at index `note` says "Not available: why" in place, with no error (no red badge on every
    picture: the note under the picker says it once). Buttons and controls keep their errors."""

    @functools.wraps(fn)
    def wrapper(image: Any, model_name: str | None, *args: Any) -> Any:
        if image is None:
            return empty
        try:
            entry(model_name)
        except ModelUnavailable as err:
            out = list(empty)
            if note is not None:
                out[note] = f"Not available: {err}"
            return tuple(out)
        return fn(image, model_name, *args)

    return wrapper


def model_input(image: Image.Image, meta: dict[str, Any]) -> torch.Tensor:
    """The normalised (1, 3, S, S) tensor the model expects, with its own preprocessing."""
    return Preprocessing.for_checkpoint(meta)(image)


def crop_of(meta: dict[str, Any]) -> dict[str, Any]:
    """The model's crop settings, for the library's pictures (`visualize.overlay`, `patch_grid`):
    every picture is drawn over exactly the pixels the model read (`vitdemo.data.model_crop`)."""
    crop = Preprocessing.for_checkpoint(meta).crop_args()
    del crop["image_size"]  # the pictures take it from the model's config
    return crop


# ---------------------------------------------------------------------------------------------
# Runtimes
# ---------------------------------------------------------------------------------------------

RUNTIME_CHOICES = [
    ("auto: int8 where the model ships it, else prepacked fp32", "auto"),
    ("PyTorch fp32", "eager"),
    ("PyTorch fp32, prepacked weights", "packed"),
    ("ONNX Runtime fp32", "onnx"),
    ("ONNX Runtime int8", "int8"),
]
RUNTIME_NAMES = {value: label for label, value in RUNTIME_CHOICES[1:]}
_RUNTIME_LOCK = threading.Lock()  # one export at a time; prepared runtimes are shared read-only


def shipped_int8(model_entry: Entry) -> Path | None:
    """The int8 ONNX file that ships next to a checkpoint, if any (checked against the weights
    when it is loaded)."""
    if model_entry.checkpoint is None:
        return None
    path = Path(model_entry.checkpoint).parent / "model.int8.onnx"
    return path if path.is_file() else None


def model_runner(model_entry: Entry, runtime: str = "auto") -> tuple[Callable, str]:
    """The callable that classifies with `runtime`, and the runtime it resolved to. "auto" picks
    what pays without a wait: int8 for a model with its int8 export beside it, else the prepacked
    fp32 model (the same outputs). Others are prepared on first use (an ONNX export takes seconds)
    and then kept with the model."""
    if runtime not in ("auto", *RUNTIMES):
        raise user_error(f"Unknown runtime {runtime!r}; choose one of auto, {', '.join(RUNTIMES)}.")
    if runtime == "auto":
        runtime = "int8" if shipped_int8(model_entry) else "packed" if packing_available() else "eager"
    if runtime == "eager":
        return model_entry.model, runtime
    key = f"runtime:{runtime}"
    with _RUNTIME_LOCK:
        if key not in model_entry.views:
            model_entry.views[key] = _prepare_runtime(model_entry, runtime)
    return model_entry.views[key], runtime


def _prepare_runtime(model_entry: Entry, runtime: str) -> Callable:
    try:
        if runtime == "int8" and (shipped := shipped_int8(model_entry)):
            try:
                return load_onnx(shipped, model_entry.model, precision="int8")
            except ValueError:
                pass  # exported from other weights: export afresh (to a temporary file)
        return prepare(model_entry.model, runtime)  # an ONNX export goes to a temporary file
    except RuntimeUnavailable as err:
        raise user_error(f"The {RUNTIME_NAMES[runtime]} runtime is not available here: {err}") from None


# ---------------------------------------------------------------------------------------------
# The model picker and the model card
# ---------------------------------------------------------------------------------------------


def model_note(name: str | None, load: bool = True) -> str:
    """One line under the picker: what the model is, or why it cannot be used. With `load`,
    the model is loaded (downloaded, for the pre-trained one) now, so problems show at once."""
    name = name or SHIPPED
    try:
        if load:
            picked = entry(name)
            config, meta = picked.model.config, picked.meta
        else:
            config, meta = model_spec(name)
    except ModelUnavailable as err:
        return f"**{name}:** {err}"
    return (f"**{name}:** {config.image_size[0]} px images, patch {config.patch_size}, {config.depth} layers of "
            f"width {config.embed_dim}, {len(meta['class_names'])} classes.")


def count_parameters(config: ViTConfig) -> int:
    """Parameters of the model `config` describes, counted without building it (ViT-B/16 with
    1000 classes: 86,567,656)."""
    c, d, m = config, config.embed_dim, config.mlp_dim
    embed = c.in_chans * c.patch_size**2 * d + d + d + (c.num_patches + 1) * d  # E, its bias, class token, E_pos
    block = 4 * d + 3 * d * d + (3 * d if c.qkv_bias else 0) + d * d + d + d * m + m + m * d + d
    head = d * c.num_classes + c.num_classes if c.num_classes else 0
    return embed + c.depth * block + 2 * d + head


def pct(v: Any) -> str:
    return f"{v:.1%}" if isinstance(v, (int, float)) else "n/a"


def model_card(model_name: str = SHIPPED) -> str:
    """Markdown about the model: what it is, its config, size, classes, metrics."""
    name = model_name or SHIPPED
    try:
        config, meta = model_spec(name)
    except ModelUnavailable as err:
        return f"### {name}\n\n{err}"
    lines = [f"### {name}", ""]
    if name == PRETRAINED:
        where = ("read from this server's hub cache" if cached_timm_weights() is not None
                 else "downloaded on first use (about 350 MB), then read from the local cache")
        lines.append("The paper's ViT-B/16: timm's `vit_base_patch16_224.augreg2_in21k_ft_in1k` (pre-trained on "
                     "ImageNet-21k and fine-tuned on ImageNet-1k with the AugReg recipe of Steiner et al. 2021; 85.1% "
                     f"top-1 on ImageNet-1k in timm's results table), converted to vitdemo's layout; {where}.")
        if (failed := MODELS.failure(name)) is not None:
            lines.append(f"\n**Not available now:** {failed}")
    elif name == SHIPPED:
        lines.append(f"The project's own model, trained from scratch on CIFAR-10 "
                     f"(`{shown_path(SHIPPED_CHECKPOINT)}`).")
    else:
        lines.append(f"Trained in this app ({meta.get('data', 'unknown data')}).")
    c = config
    lines += [
        "",
        # One row per property: a row of eight columns letter-wraps on a phone.
        "| property | value |",
        "|---|---|",
        f"| image | {c.image_size[0]}x{c.image_size[1]} pixels |",
        f"| patch P | {c.patch_size}x{c.patch_size} |",
        f"| tokens | {c.num_patches} patches + 1 class token |",
        f"| width D | {c.embed_dim} |",
        f"| layers L | {c.depth} |",
        f"| heads | {c.num_heads} |",
        f"| MLP | {c.mlp_dim} |",
        f"| parameters | {count_parameters(c):,} |",
        "",
    ]
    names = list(meta.get("class_names", []))
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    lines.append(f"**Classes ({len(names)}):** {shown}")
    lines.append(f"\n**Preprocessing:** resize {meta.get('resize', meta.get('image_size'))}, centre crop "
                 f"{meta.get('image_size')}, {meta.get('interpolation', 'bicubic')}, mean {meta.get('mean')}, "
                 f"std {meta.get('std')}")
    metrics = meta.get("metrics")
    if isinstance(metrics, dict):
        val_loss = metrics.get("val_loss")
        lines.append(f"\n**Metrics** (epoch {metrics.get('epoch', '?')}): train accuracy "
                     f"{pct(metrics.get('train_acc'))}, validation accuracy {pct(metrics.get('val_acc'))}, "
                     f"validation loss {f'{val_loss:.4f}' if isinstance(val_loss, (int, float)) else 'n/a'}")
    if meta.get("stopped_at_step"):
        lines.append(f"\nStopped by the user at step {meta['stopped_at_step']}.")
    if isinstance(meta.get("recipe"), dict):
        try:
            recipe = Recipe.from_saved(meta["recipe"]).describe()
        except (TypeError, ValueError, KeyError):  # a recipe this version cannot read: say nothing of it
            recipe = None
        if recipe:
            depth = f"; stochastic depth {c.drop_path_rate:g}" if c.drop_path_rate else ""
            lines.append(f"\n**Recipe:** {recipe}{depth}.")
    if meta.get("vitdemo_version"):
        lines.append(f"\nWritten by vitdemo {meta['vitdemo_version']}.")
    return "\n".join(lines)


def picker_update(value: str | None = None) -> dict[str, Any]:
    """The picker's choices as they are now, selecting `value` if given."""
    return gr.update(choices=MODELS.choices(), value=value) if value else gr.update(choices=MODELS.choices())


def default_model() -> str:
    """The model the app opens with: the paper's ViT-B/16 when its weights are already in the hub's
    local cache (a Hugging Face Space preloads them), else the shipped CIFAR-10 model (offline, out
    of the box). Asks no network."""
    return PRETRAINED if cached_timm_weights() is not None and MODELS.failure(PRETRAINED) is None else SHIPPED


def refresh_picker(current: str | None) -> Any:
    """The picker's choices as they are now (runs trained in other sessions included)."""
    value = current if current in MODELS.choices() else default_model()
    return gr.update(choices=MODELS.choices(), value=value)


__all__ = [
    "MODELS", "PRETRAINED", "SHIPPED", "Entry", "default_model", "ModelStore", "count_parameters", "entry", "model_card",
    "crop_of", "model_choices", "model_input", "model_note", "model_runner", "model_spec", "picker_update",
    "refresh_picker",
]
