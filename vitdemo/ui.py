"""The Gradio app: classify, see the patches, the position embeddings and the attention, train.

`build_demo()` returns the `gr.Blocks`; `app.py` launches it. Every event handler is a plain
function of this module (`classify`, `patches`, `position_views`, `explain`, `train_run`, ...),
so the tests call them directly; the Gradio wiring is in `build_demo` alone. This is the only
module of the library that imports gradio.

Models are shared by all sessions through `MODELS`, a small cache keyed by the name shown in
the model picker: the shipped CIFAR-10 checkpoint, the pre-trained ImageNet ViT-B/16 (downloaded
on first use; a failed download is remembered for a while instead of retried on every click) and
the runs trained in the Train tab. Cached models are only ever read (eval mode, no gradients);
training and fine-tuning work on copies.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

from . import __version__, create_model, get_config
from . import visualize as vz
from .checkpoint import (
    DEFAULT_CHECKPOINT,
    CheckpointError,
    load_checkpoint,
    preprocessing,
    read_metadata,
    save_checkpoint,
)
from .config import ViTConfig
from .data import to_rgb as any_mode_to_rgb  # the library's one conversion of any Pillow mode to RGB
from .data import (
    CIFAR_MEAN,
    CIFAR_STD,
    DataError,
    ImageData,
    load_cifar10,
    load_zip,
    preprocess,
    stratified_split,
    synthetic_shapes,
)
from .engine import RECIPES, DoneEvent, EpochEvent, Recipe, StepEvent, TrainingError
from .engine import train as engine_train
from .model import VisionTransformer
from .pretrained import PREPROCESSING as PRETRAINED_PREPROCESSING
from .pretrained import PretrainedUnavailable, imagenet_class_names, load_pretrained
from .runtime import RUNTIMES, RuntimeUnavailable, load_onnx, packing_available, prepare

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

SHIPPED = "Shipped CIFAR-10 ViT"
PRETRAINED = "ViT-B/16 ImageNet-1k (pre-trained, download)"
SHIPPED_CHECKPOINT: Path = DEFAULT_CHECKPOINT  # read at call time, so tests can point it elsewhere

MAX_PIXELS = 40_000_000  # larger images are refused: decoding them costs time and memory, the model sees 32-224 px
MAX_FILE_SIZE = "20mb"  # for launch(): uploads larger than this are refused by Gradio itself
QUEUE_SIZE = 32  # waiting events, over all sessions
# Gradio keeps every upload (and every file it serves) in its cache folder until told otherwise:
# every hour, delete those older than an hour, and all of them when the server stops.
DELETE_CACHE = (3600, 3600)
PRETRAINED_RETRY_SECONDS = 600.0  # a failed download is not tried again for this long
TOP_K = 10  # classes returned by `classify` (the label shows the top 5)
VIEW_SIZE = 320  # side of the attention overlays, in pixels

SRC_SYNTHETIC = "Synthetic shapes (built-in, offline)"
SRC_CIFAR = "CIFAR-10 (torchvision download)"
SRC_ZIP = "Uploaded .zip of class folders"
SOURCES = (SRC_SYNTHETIC, SRC_CIFAR, SRC_ZIP)
WIDTHS = (64, 96, 128, 192)
BATCH_SIZES = (32, 64, 128, 256)
MAX_TRAIN_PIXELS = 60_000_000  # images x side^2 held for one run: 5,000 at 32 px, 1,195 at 224 px
MAX_ZIP_BYTES = 300 * 1024**2  # extracted size of an uploaded zip
MAX_ZIP_FILES = 20_000
MAX_FULL_FINETUNE_PARAMS = 30_000_000  # bigger models are fine-tuned with a frozen backbone only (CPU)
MAX_BIG_FINETUNE_IMAGES = 240  # images for a frozen big backbone (ViT-B: about a minute of feature extraction)
MAX_RUNS = 4  # trained runs kept in memory; the oldest is dropped first
MAX_PLOT_POINTS = 500
HALF = (0.5, 0.5, 0.5)

APP_DIR = Path(tempfile.gettempdir()) / "vitdemo-app"  # server-owned: runs and example images
RUNS_ROOT = APP_DIR / "runs"
CIFAR_ROOT = Path(os.environ.get("VITDEMO_CACHE", Path.home() / ".cache" / "vitdemo")) / "torchvision-cifar10"

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="amber")
CSS = """
#model-note p { margin: 0.2em 0; }
.status-line { min-height: 2.6em; }
"""
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False}]


def launch_options() -> dict[str, Any]:
    """What `app.py` passes to `demo.launch()` (host and port come from GRADIO_SERVER_NAME and
    GRADIO_SERVER_PORT through launch's own defaults)."""
    return {"max_file_size": MAX_FILE_SIZE, "theme": THEME, "css": CSS, "show_error": False}


def _error(message: str) -> gr.Error:
    """A message for the user; their mistake, so no traceback in the server log either."""
    return gr.Error(message, print_exception=False)


def user_errors(fn: Callable) -> Callable:
    """Turn the library's errors into `gr.Error` messages and anything unexpected into a short
    message (the traceback goes to the server log, never to the user)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (DataError, CheckpointError, ModelUnavailable, TrainingError) as err:
            raise _error(str(err)) from None
        except Exception as err:  # noqa: BLE001 - the user gets a message, the log the details
            log.exception("unexpected error in %s", fn.__name__)
            raise _error(f"Something went wrong ({type(err).__name__}: {err}).") from None

    return wrapper


# ---------------------------------------------------------------------------------------------
# Models: the shipped checkpoint, the pre-trained ViT-B/16, runs trained in this app
# ---------------------------------------------------------------------------------------------


class ModelUnavailable(RuntimeError):
    """The model picked cannot be used (absent, offline, unknown); the message says why."""


@dataclass
class Entry:
    model: VisionTransformer
    meta: dict[str, Any]
    checkpoint: Path | None = None
    stamp: Any = None  # what the entry was loaded from (file and mtime): reload when it changes
    views: dict[str, Any] = field(default_factory=dict)  # cached pictures of this model


def _shown_path(path: Path) -> str:
    """A path as users may see it: relative to the project, never the server's layout."""
    try:
        return str(Path(path).resolve().relative_to(Path(__file__).resolve().parent.parent))
    except ValueError:
        return Path(path).name


def no_shipped_message() -> str:
    return (f"No shipped model is present (no checkpoint at `{_shown_path(SHIPPED_CHECKPOINT)}` yet). Train a "
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
                model, meta = load_pretrained("torchvision")
            except PretrainedUnavailable as err:
                minutes = round(PRETRAINED_RETRY_SECONDS / 60)
                message = (f"The pre-trained ViT-B/16 is not available: {err} (The download is not tried "
                           f"again for {minutes} minutes.)")
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

    def register(self, name: str, model: VisionTransformer, meta: dict[str, Any], checkpoint: Path | None) -> None:
        """Add a trained run; beyond `MAX_RUNS`, the oldest run (and its folder) is dropped."""
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
            if RUNS_ROOT.resolve() in folder.resolve().parents:  # only ever delete our own run folders
                shutil.rmtree(folder, ignore_errors=True)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._runs.clear()
            self._failures.clear()

    def _lock_for(self, name: str) -> threading.Lock:
        with self._lock:
            return self._loading.setdefault(name, threading.Lock())


def _read_only(model: VisionTransformer) -> VisionTransformer:
    # Shared between threads: eval mode and no parameter gradients (gradient rollout asks for the
    # gradient of its own input instead, so concurrent calls never write into the weights' .grad).
    model = model.to("cpu").eval()
    model.requires_grad_(False)
    return model


MODELS = ModelStore()


def model_choices() -> list[str]:
    return MODELS.choices()


def _entry(name: str | None) -> Entry:
    return MODELS.get(name or SHIPPED)


def model_spec(name: str | None) -> tuple[ViTConfig, dict[str, Any]]:
    """A model's config and metadata without loading (or downloading) its weights."""
    name = name or SHIPPED
    if (entry := MODELS.cached(name)) is not None and name != SHIPPED:
        return entry.model.config, entry.meta
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
        meta = {"config": config.to_dict(), "class_names": imagenet_class_names(), "source": "torchvision",
                **PRETRAINED_PREPROCESSING["torchvision"]}
        return config, meta
    raise ModelUnavailable(f"Unknown model {name!r}; choose one of {MODELS.choices()}.")


# ---------------------------------------------------------------------------------------------
# Images in
# ---------------------------------------------------------------------------------------------


def _decode_upload(decode: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Gradio's own decoding of an uploaded image, with its failures (not an image, corrupt, a
    decompression bomb) turned into a clear `gr.Error` instead of a generic "Error"."""

    @functools.wraps(decode)
    def preprocess(payload: Any) -> Any:
        try:
            return decode(payload)
        except gr.Error:
            raise
        except Image.DecompressionBombError:
            raise _error(f"The image is far too large (over {Image.MAX_IMAGE_PIXELS * 2:,} pixels); "
                         f"the limit is {MAX_PIXELS:,} pixels.") from None
        except Image.UnidentifiedImageError:
            raise _error("That file is not an image that can be read (PNG, JPEG, WebP, GIF, BMP, TIFF, ...).") from None
        except Exception as err:  # noqa: BLE001 - any decoding failure is the same problem for the user
            raise _error(f"The image could not be read ({type(err).__name__}: {err}).") from None

    return preprocess


def image_input(label: str = "Image") -> gr.Image:
    """An image input for PIL images in their own mode: `image_mode=None` keeps 16-bit, CMYK,
    alpha and palette images as they are, for the data module's conversion (`to_rgb`) instead of
    Pillow's lossy one; Gradio has already applied the EXIF rotation."""
    image = gr.Image(type="pil", image_mode=None, sources=["upload", "clipboard", "webcam"], label=label, height=300)
    # An instance attribute rather than a subclass: subclassing a Gradio component makes Gradio
    # write a .pyi stub file next to this module at import time.
    image.preprocess = _decode_upload(image.preprocess)
    return image


def to_rgb(image: Any) -> Image.Image:
    """A user's image as fully decoded, upright, 8-bit RGB, or a `gr.Error` saying what is wrong:
    none, not an image, larger than `MAX_PIXELS`, corrupt or truncated. Any Pillow mode (I;16,
    CMYK, P, RGBA, LA, L, F, ...) goes through the data module's conversion."""
    if image is None:
        raise _error("No image: upload one, paste one from the clipboard, take a webcam picture or click an example.")
    if isinstance(image, np.ndarray):
        try:
            image = Image.fromarray(image)
        except Exception as err:  # noqa: BLE001
            raise _error(f"That array is not an image ({err}).") from None
    if not isinstance(image, Image.Image):
        raise _error(f"Not an image: got {type(image).__name__}.")
    w, h = image.size
    if w < 1 or h < 1:
        raise _error("The image is empty (0 pixels).")
    if w * h > MAX_PIXELS:
        raise _error(f"The image is too large: {w}x{h} = {w * h:,} pixels; the limit is {MAX_PIXELS:,}. "
                     f"Please send a smaller version.")
    try:
        image.load()  # Gradio's image is opened lazily: decoding happens (and fails) here
        image = ImageOps.exif_transpose(image)
        return any_mode_to_rgb(image)
    except Exception as err:  # noqa: BLE001 - truncated data, bad chunks, unknown modes...
        raise _error(f"The image could not be decoded; is the file corrupt or truncated? "
                     f"({type(err).__name__}: {err})") from None


def model_input(image: Image.Image, meta: dict[str, Any]) -> torch.Tensor:
    """The normalised (1, 3, S, S) tensor the model expects, with its own preprocessing."""
    return preprocess(image, meta["image_size"], meta["mean"], meta["std"], resize=meta.get("resize"),
                      interpolation=meta.get("interpolation", "bicubic"))


def model_view(image: Image.Image, meta: dict[str, Any], size: int) -> Image.Image:
    """The part of `image` the model sees (its centre crop, after resizing the shorter side to
    `resize`), drawn at size x size: maps computed on the model's grid line up with it."""
    w, h = image.size
    image_size = meta["image_size"]
    crop = min(w, h) * image_size / (meta.get("resize") or image_size)
    left, top = (w - crop) / 2, (h - crop) / 2
    return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + crop, top + crop))


# ---------------------------------------------------------------------------------------------
# Classify
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


def shipped_int8(entry: Entry) -> Path | None:
    """The int8 ONNX file that ships next to a checkpoint, if any (checked against the weights
    when it is loaded)."""
    if entry.checkpoint is None:
        return None
    path = Path(entry.checkpoint).parent / "model.int8.onnx"
    return path if path.is_file() else None


def model_runner(entry: Entry, runtime: str = "auto") -> tuple[Callable, str]:
    """The callable that classifies with `runtime`, and the runtime it resolved to. "auto" picks
    what pays without a wait: int8 for a model with its int8 export beside it (the shipped one:
    1.4x at batch 1, the same class for 99% of images), else the prepacked fp32 model (1.2x,
    the same outputs). Others are prepared on first use (an ONNX export takes seconds) and then
    kept with the model."""
    if runtime not in ("auto", *RUNTIMES):
        raise _error(f"Unknown runtime {runtime!r}; choose one of auto, {', '.join(RUNTIMES)}.")
    if runtime == "auto":
        runtime = "int8" if shipped_int8(entry) else "packed" if packing_available() else "eager"
    if runtime == "eager":
        return entry.model, runtime
    key = f"runtime:{runtime}"
    with _RUNTIME_LOCK:
        if key not in entry.views:
            entry.views[key] = _prepare_runtime(entry, runtime)
    return entry.views[key], runtime


def _prepare_runtime(entry: Entry, runtime: str) -> Callable:
    try:
        if runtime == "int8" and (shipped := shipped_int8(entry)):
            try:
                return load_onnx(shipped, entry.model)
            except ValueError:
                pass  # exported from other weights: export afresh
        return prepare(entry.model, runtime)  # an ONNX export goes to a temporary file
    except RuntimeUnavailable as err:
        raise _error(f"The {RUNTIME_NAMES[runtime]} runtime is not available here: {err}") from None


@user_errors
def classify(image: Any, model_name: str = SHIPPED, runtime: str = "auto") -> tuple[dict[str, float], dict[str, Any]]:
    """Class probabilities (the `TOP_K` most likely, all of them for up to 10 classes), and the
    time taken in milliseconds (preprocessing and forward pass) with the runtime that ran."""
    rgb = to_rgb(image)
    entry = _entry(model_name)
    run, resolved = model_runner(entry, runtime)
    start = time.perf_counter()
    x = model_input(rgb, entry.meta)
    with torch.inference_mode():
        probs = run(x).float().softmax(-1)[0]
    ms = (time.perf_counter() - start) * 1000
    top = probs.topk(min(TOP_K, probs.numel()))
    names = entry.meta["class_names"]
    labels = {names[i]: float(p) for p, i in zip(top.values.tolist(), top.indices.tolist())}
    return labels, {"ms": ms, "runtime": resolved}


def timing_text(timing: dict[str, Any] | None) -> str:
    if not timing:
        return ""
    return (f"Inference: **{timing['ms']:.1f} ms** with {RUNTIME_NAMES[timing['runtime']]} (preprocessing and "
            f"forward pass, {torch.get_num_threads()} CPU threads).")


# ---------------------------------------------------------------------------------------------
# Patches
# ---------------------------------------------------------------------------------------------


@user_errors
def patches(image: Any, model_name: str = SHIPPED) -> tuple[Image.Image, Image.Image, str]:
    """The image as the model sees it with its patch grid, the sequence of patches, and a
    sentence counting them. Needs the model's config only, not its weights."""
    rgb = to_rgb(image)
    config, meta = model_spec(model_name)
    size, p = config.image_size[0], config.patch_size
    grid, strip = vz.patch_grid(model_view(rgb, meta, size), p)
    gh, gw = config.grid_size
    n = gh * gw
    text = (f"{size}x{size} pixels cut into {gh}x{gw} = **{n} patches of {p}x{p}** pixels -> **{n} tokens**, each "
            f"patch flattened ({3 * p * p} numbers) and projected to width D = {config.embed_dim}; with the "
            f"**class token** in front the Transformer reads **{n + 1} tokens** (Eq. 1).")
    return grid, strip, text


# ---------------------------------------------------------------------------------------------
# Position embeddings (Fig. 7, centre)
# ---------------------------------------------------------------------------------------------


def _similarity(entry: Entry) -> torch.Tensor:
    if "similarity" not in entry.views:
        entry.views["similarity"] = vz.position_embedding_similarity(entry.model)
    return entry.views["similarity"]


def _clamp(value: Any, lo: int, hi: int) -> int:
    try:
        return int(min(max(round(float(value)), lo), hi))
    except (TypeError, ValueError):
        return lo


@user_errors
def position_figure(model_name: str = SHIPPED) -> Image.Image:
    """Fig. 7 (centre) for the model: every position's cosine similarity to every other."""
    entry = _entry(model_name)
    if "position_figure" not in entry.views:
        fig = vz.plot_position_embedding_similarity(_similarity(entry))
        entry.views["position_figure"] = vz.figure_to_image(fig, dpi=90)
    return entry.views["position_figure"]


@user_errors
def position_detail(model_name: str = SHIPPED, row: int = 1, col: int = 1) -> tuple[Image.Image, str]:
    """One position's similarity map, large, with the position outlined (row and col 1-based)."""
    entry = _entry(model_name)
    sim = _similarity(entry)
    gh, gw = sim.shape[:2]
    r, c = _clamp(row, 1, gh) - 1, _clamp(col, 1, gw) - 1
    tile = vz.heatmap(sim[r, c], size=VIEW_SIZE)
    cell = VIEW_SIZE / gw
    ImageDraw.Draw(tile).rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], outline=(0, 255, 255),
                                   width=max(1, int(cell // 12)))
    others = torch.cat([sim[r, c].flatten()[: r * gw + c], sim[r, c].flatten()[r * gw + c + 1:]])
    text = (f"Position (row {r + 1}, column {c + 1}) of {gh}x{gw}: cosine similarity of its embedding with every "
            f"position's (outlined: itself, 1.0). Highest elsewhere: {float(others.max()):.2f}, lowest: "
            f"{float(others.min()):.2f}. Nearby rows and columns look alike when the model has learned the 2-D layout.")
    return tile, text


def position_views(model_name: str = SHIPPED, row: int = 1, col: int = 1) -> tuple[Any, Any, str]:
    """Both position views, or none and a note when the model is not available (no error
    popup: this runs when the page loads and when the picker changes)."""
    try:
        fig = position_figure(model_name)
        tile, text = position_detail(model_name, row, col)
        return fig, tile, text
    except gr.Error as err:
        return None, None, f"Not available: {err.message}"


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

QUERY_CLS = "class token"
QUERY_PATCH = "a patch (row, column)"


def _fingerprint(name: str, entry: Entry, x: torch.Tensor) -> str:
    return f"{name}|{id(entry.model)}|{hashlib.blake2b(x.numpy().tobytes(), digest_size=16).hexdigest()}"


def _forward(entry: Entry, x: torch.Tensor, key: str) -> dict[str, Any]:
    with torch.inference_mode():
        logits, attentions = entry.model(x, return_attention=True)
    probs = logits.float().softmax(-1)[0]
    return {"key": key, "x": x, "attentions": [a.float() for a in attentions],
            "pred": int(probs.argmax()), "prob": float(probs.max()), "gradient": {}}


def _head_tiles(maps: torch.Tensor, query_cell: tuple[int, int] | None,
                size: int = 128) -> list[tuple[Image.Image, str]]:
    tiles = []
    gh, gw = maps.shape[-2:]
    for h, m in enumerate(maps):
        tile = vz.heatmap(m, size=size)
        if query_cell is not None:
            r, c = query_cell
            cell = size / gw
            ImageDraw.Draw(tile).rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1],
                                           outline=(0, 255, 255), width=max(1, int(cell // 10)))
        tiles.append((tile, f"head {h + 1}"))
    return tiles


@user_errors
def explain(
    image: Any,
    model_name: str = SHIPPED,
    cache: dict[str, Any] | None = None,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    opacity: float = 0.6,
    gradient: bool = False,
    layer: int = 1,
    query: str = QUERY_CLS,
    query_row: int = 1,
    query_col: int = 1,
) -> tuple[Image.Image, list[tuple[Image.Image, str]], Image.Image, str, dict[str, Any]]:
    """Attention rollout overlay, one map per head for a layer and query, the mean attention
    distance plot, a caption, and the cache: the forward pass's attention maps, reused when
    called again with the same image and model (only display controls changed)."""
    rgb = to_rgb(image)
    entry = _entry(model_name)
    x = model_input(rgb, entry.meta)
    key = _fingerprint(model_name, entry, x)
    if not isinstance(cache, dict) or cache.get("key") != key:  # a new image or model: one forward pass
        cache = _forward(entry, x, key)
    attentions = cache["attentions"]
    config = entry.model.config
    gh, gw = config.grid_size
    fusion = head_fusion if head_fusion in ("mean", "max", "min") else "mean"
    discard = min(max(float(discard_ratio or 0.0), 0.0), 0.95)
    alpha = min(max(float(opacity if opacity is not None else 0.6), 0.0), 1.0)
    class_name = entry.meta["class_names"][cache["pred"]]

    if gradient:
        done = cache["gradient"]  # discard ratio -> map
        if round(discard, 4) not in done:
            x = cache["x"].clone().requires_grad_(True)  # the weights stay gradient-free (shared model)
            done[round(discard, 4)] = vz.gradient_rollout(entry.model, x, discard_ratio=discard)[0]
        mask = done[round(discard, 4)]
        how = f"gradient rollout for the predicted class, discard ratio {discard:.2f}"
    else:
        mask = vz.attention_rollout(attentions, head_fusion=fusion, discard_ratio=discard, grid_size=(gh, gw))[0]
        how = f"attention rollout, {fusion} over heads, discard ratio {discard:.2f}"
    rollout = vz.overlay(model_view(rgb, entry.meta, VIEW_SIZE), mask, alpha=alpha)

    layer_index = _clamp(layer, 1, len(attentions)) - 1
    if query == QUERY_PATCH:
        r, c = _clamp(query_row, 1, gh) - 1, _clamp(query_col, 1, gw) - 1
        q, cell, who = 1 + r * gw + c, (r, c), f"patch (row {r + 1}, column {c + 1}, outlined)"
    else:
        q, cell, who = 0, None, "the class token"
    maps = vz.token_attention(attentions, layer_index, q, grid_size=(gh, gw))[0]
    gallery = _head_tiles(maps, cell)

    distances = vz.mean_attention_distance(attentions, config.patch_size, grid_size=(gh, gw))
    fig = vz.plot_mean_attention_distance(distances, image_size=config.image_size[0])
    fig.axes[0].set_title("")  # the component's label says it
    distance_plot = vz.figure_to_image(fig, dpi=90)

    caption = (f"Predicted **{class_name}** ({cache['prob']:.0%}). Left: {how}, over {len(attentions)} layers. "
               f"Gallery: what {who} attends to in layer {layer_index + 1}, one map per head "
               f"(each scaled to its own range).")
    return rollout, gallery, distance_plot, caption, cache


# ---------------------------------------------------------------------------------------------
# About: the model card
# ---------------------------------------------------------------------------------------------


def count_parameters(config: ViTConfig) -> int:
    """Parameters of the model `config` describes, counted without building it (ViT-B/16 with
    1000 classes: 86,567,656)."""
    c, d, m = config, config.embed_dim, config.mlp_dim
    embed = c.in_chans * c.patch_size**2 * d + d + d + (c.num_patches + 1) * d  # E, its bias, class token, E_pos
    block = 4 * d + 3 * d * d + (3 * d if c.qkv_bias else 0) + d * d + d + d * m + m + m * d + d
    head = d * c.num_classes + c.num_classes if c.num_classes else 0
    return embed + c.depth * block + 2 * d + head


def _pct(v: Any) -> str:
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
        lines.append("torchvision's `ViT_B_16_Weights.IMAGENET1K_V1`, converted to vitdemo's layout: ViT-B/16 "
                     "trained on ImageNet-1k (about 81% top-1). The weights (330 MB) are downloaded on first use.")
        if (failed := MODELS.failure(name)) is not None:
            lines.append(f"\n**Not available now:** {failed}")
    elif name == SHIPPED:
        lines.append(f"The project's own model, trained from scratch on CIFAR-10 "
                     f"(`{_shown_path(SHIPPED_CHECKPOINT)}`).")
    else:
        lines.append(f"Trained in this app ({meta.get('data', 'unknown data')}).")
    c = config
    lines += [
        "",
        "| image | patch | tokens | width D | layers | heads | MLP | parameters |",
        "|---|---|---|---|---|---|---|---|",
        f"| {c.image_size[0]}x{c.image_size[1]} | {c.patch_size} | {c.num_patches} + 1 | {c.embed_dim} | {c.depth} "
        f"| {c.num_heads} | {c.mlp_dim} | {count_parameters(c):,} |",
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
                     f"{_pct(metrics.get('train_acc'))}, validation accuracy {_pct(metrics.get('val_acc'))}, "
                     f"validation loss {f'{val_loss:.4f}' if isinstance(val_loss, (int, float)) else 'n/a'}")
    if meta.get("stopped_at_step"):
        lines.append(f"\nStopped by the user at step {meta['stopped_at_step']}.")
    if isinstance(meta.get("recipe"), dict):
        r = meta["recipe"]
        lines.append(f"\n**Recipe:** {r.get('optimizer')} lr {r.get('lr')}, weight decay {r.get('weight_decay')}, "
                     f"{r.get('epochs')} epochs, batch {r.get('batch_size')}, label smoothing "
                     f"{r.get('label_smoothing')}")
    if meta.get("vitdemo_version"):
        lines.append(f"\nWritten by vitdemo {meta['vitdemo_version']}.")
    return "\n".join(lines)


ABOUT = r"""
## The Vision Transformer

*An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale*, Dosovitskiy et al., 2020
([arXiv:2010.11929](https://arxiv.org/abs/2010.11929)).

A ViT cuts an $H \times W$ image into $N = HW/P^2$ patches of $P \times P$ pixels, flattens each one and
projects it linearly to width $D$ (the patch embedding $E$). A learned class token goes in front, a
learned position embedding is added, and a plain Transformer encoder of $L$ layers reads the sequence:

$$z_0 = [x_\text{class};\, x_p^1 E;\, x_p^2 E;\, \dots;\, x_p^N E] + E_{pos} \qquad (1)$$

with $E \in \mathbb{R}^{(P^2 C) \times D}$ and $E_{pos} \in \mathbb{R}^{(N+1) \times D}$ ($C$ colour channels), then for
each layer $\ell = 1 \dots L$:

$$z'_\ell = \mathrm{MSA}(\mathrm{LN}(z_{\ell-1})) + z_{\ell-1} \qquad (2)$$

$$z_\ell = \mathrm{MLP}(\mathrm{LN}(z'_\ell)) + z'_\ell \qquad (3)$$

$$y = \mathrm{LN}(z_L^0) \qquad (4)$$

The classifier is one linear layer on $y$, the class token's final state. Nothing in the model
knows that images are two-dimensional except the patch cutting: the position embeddings learn the
2-D layout (see the Position embeddings tab), and some attention heads look across the whole image
already in the first layers (see the Attention tab). With little data a ViT lacks the inductive biases of a CNN; with a
lot of data (or pre-trained weights and fine-tuning) it matches or beats them.

**Links:** [the paper (arXiv:2010.11929)](https://arxiv.org/abs/2010.11929) ·
[Google's code](https://github.com/google-research/vision_transformer) ·
attention rollout: [Abnar and Zuidema, 2020 (arXiv:2005.00928)](https://arxiv.org/abs/2005.00928)
"""


# ---------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run of the Train tab."""

    number: int
    folder: Path
    model: VisionTransformer | None  # None once registered
    class_names: list[str]
    prep: dict[str, Any]
    recipe: Recipe
    description: str  # data and model, for the picker name
    metadata: dict[str, Any]
    steps: int = 0
    total_steps: int = 0
    epoch: int = 0
    history: dict[str, list] = field(default_factory=dict)
    last_epoch: EpochEvent | None = None
    started: float = field(default_factory=time.perf_counter)
    loss_rows: list[tuple[int, float, str]] = field(default_factory=list)
    acc_rows: list[tuple[int, float, str]] = field(default_factory=list)
    name: str | None = None  # picker name, once registered
    checkpoint: Path | None = None
    message: str = ""
    finished: threading.Event = field(default_factory=threading.Event)


_RUN_COUNTER = iter(range(1, 1_000_000))
_RUN_COUNTER_LOCK = threading.Lock()
_ACTIVE: dict[str, Run] = {}  # the current or last run of each browser session


def _frame(rows: list[tuple[int, float, str]], limit: int = MAX_PLOT_POINTS) -> pd.DataFrame:
    """Long-format (step, value, metric) rows for gr.LinePlot, at most `limit` of them: the
    per-step training points are thinned evenly, the per-epoch validation points all kept."""
    train = [r for r in rows if r[2] == "train"]
    other = [r for r in rows if r[2] != "train"]
    room = max(2, limit - len(other))
    if len(train) > room:
        keep = np.unique(np.linspace(0, len(train) - 1, room).round().astype(int))
        train = [train[i] for i in keep]
    return pd.DataFrame(train + other, columns=["step", "value", "metric"])


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.empty((images.shape[0], 3, size, size), dtype=torch.uint8)
    for i in range(0, len(images), 256):
        chunk = images[i:i + 256].float()
        out[i:i + 256] = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True,
                                       align_corners=False).round().clamp(0, 255).to(torch.uint8)
    return out


def _per_class_subset(data: ImageData, per_class: int, seed: int = 0) -> ImageData:
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(data.num_classes):
        members = torch.nonzero(data.labels == c).flatten()
        keep.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return data.subset(torch.sort(torch.cat(keep)).values)


def load_training_data(source: str, zip_file: Any, per_class: int, image_size: int,
                       max_images: int = 1_000_000) -> tuple[ImageData, tuple, tuple, str]:
    """(data, mean, std, description) for the Train tab's data source: at most `per_class`
    images per class, `max_images` in all and `MAX_TRAIN_PIXELS` pixels in all. User text never
    becomes a path: the zip is Gradio's uploaded copy, CIFAR-10 lives in a fixed cache folder."""
    per_class = _clamp(per_class, 2, 5000)

    def fit(classes: int) -> int:  # images per class within the budget
        return max(2, min(per_class, max_images // classes, MAX_TRAIN_PIXELS // (classes * image_size**2)))

    if source == SRC_SYNTHETIC:
        data = synthetic_shapes(num_classes=4, per_class=fit(4), image_size=min(image_size, 64), seed=0)
        data = ImageData(_resize_uint8(data.images, image_size), data.labels, data.class_names)
        return data, HALF, HALF, "synthetic shapes"
    if source == SRC_CIFAR:
        if (failed := MODELS.failure(SRC_CIFAR)) is not None:
            raise _error(failed)
        try:
            full = load_cifar10(CIFAR_ROOT, train=True, download=True)
        except DataError as err:
            cause = err.__cause__ or err
            message = (f"CIFAR-10 could not be downloaded; is this server offline? ({type(cause).__name__}: {cause}) "
                       f"Use the built-in synthetic shapes or upload a .zip of class folders. (The download is not "
                       f"tried again for {round(PRETRAINED_RETRY_SECONDS / 60)} minutes.)")
            MODELS.remember_failure(SRC_CIFAR, message)
            raise _error(message) from None
        data = _per_class_subset(full, fit(len(full.class_names)))
        data = ImageData(_resize_uint8(data.images, image_size), data.labels, data.class_names)
        return data, CIFAR_MEAN, CIFAR_STD, "CIFAR-10"
    if source == SRC_ZIP:
        path = getattr(zip_file, "name", zip_file)  # a path from gr.File(type="filepath") (or a file object)
        if not path:
            raise _error("Upload a .zip file of class folders first (zip/<class>/<image>, two classes or more).")
        path = Path(path)
        if path.suffix.lower() != ".zip":
            raise _error(f"Expected a .zip file, got {path.name!r}.")
        data = load_zip(path, image_size=image_size, max_total_bytes=MAX_ZIP_BYTES, max_files=MAX_ZIP_FILES,
                        max_images_per_class=fit(2), progress=False)
        if data.num_classes > 2 and len(data) > data.num_classes * fit(data.num_classes):
            data = _per_class_subset(data, fit(data.num_classes))
        note = f", {len(data.skipped)} unreadable files skipped" if data.skipped else ""
        return data, HALF, HALF, f"uploaded zip ({len(data)} images{note})"
    raise _error(f"Unknown data source {source!r}; choose one of {list(SOURCES)}.")


def _find_malloc_trim() -> Callable[[], Any] | None:
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim  # glibc (Linux); elsewhere there is nothing to do
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


_MALLOC_TRIM = _find_malloc_trim()
TRIM_SECONDS = 1.0  # while training, free memory goes back to the system at most this often


def release_memory() -> None:
    """Give the memory the C allocator holds free back to the system. Training steps run in
    whichever worker thread Gradio picks, between other requests' allocations, and glibc then keeps
    the freed activations of every step in fragmented heaps: while training and answering 8 busy
    clients, the server grew from 1.2 to 2.1 GB in two minutes without trimming and stayed at 1.2 GB
    with it (tests/test_load.py). A trim takes a few milliseconds."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM()


def _new_run_folder() -> Path:
    RUNS_ROOT.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="run-", dir=RUNS_ROOT))


def _status(run: Run, event: StepEvent | EpochEvent | None = None) -> str:
    if isinstance(event, StepEvent):
        return (f"**Epoch {event.epoch}/{run.recipe.epochs}, step {event.step}/{event.total_steps}**: loss "
                f"{event.loss:.3f}, accuracy {event.acc:.1%}, {event.images_per_sec:.0f} images/s, about "
                f"{_duration(event.eta_seconds)} left")
    if isinstance(event, EpochEvent):
        val = (f", validation loss {event.val_loss:.3f}, validation accuracy {event.val_acc:.1%}"
               if event.val_loss is not None else "")
        return (f"**Epoch {event.epoch}/{event.epochs} done** in {_duration(event.seconds)}: train loss "
                f"{event.train_loss:.3f}, train accuracy {event.train_acc:.1%}{val}")
    return "Preparing..."


def _finish(run: Run, stopped: bool) -> None:
    """Save and register the run's model (finished, or stopped: the weights of its last step)."""
    try:
        last = run.last_epoch
        metrics = None
        if last is not None:
            metrics = {"epoch": last.epoch, "train_loss": last.train_loss, "train_acc": last.train_acc,
                       "val_loss": last.val_loss, "val_acc": last.val_acc}
        extra = dict(run.metadata, recipe=run.recipe.to_dict(), history=run.history, seed=0, metrics=metrics)
        if stopped:
            extra["stopped_at_step"] = run.steps
        state = "stopped" if stopped else "finished"
        acc = f", val {last.val_acc:.0%}" if last is not None and last.val_acc is not None else ""
        run.name = f"Run {run.number}: {run.description}{acc} ({state})"
        run.model.to("cpu").eval()
        run.checkpoint = save_checkpoint(run.folder / "model.safetensors", run.model, run.class_names, run.prep,
                                         **extra)
        MODELS.register(run.name, run.model, read_metadata(run.checkpoint), run.checkpoint)
        seconds = time.perf_counter() - run.started
        if stopped:
            run.message = (f"**Stopped** at step {run.steps} of {run.total_steps} after {_duration(seconds)}. The "
                           f"model as it was then is **{run.name}** in the model picker; its checkpoint is below.")
        else:
            val = f": validation accuracy {_pct(last.val_acc)}" if last and last.val_acc is not None else ""
            run.message = (f"**Finished** in {_duration(seconds)}{val}. The model is **{run.name}** in the model "
                           f"picker; its checkpoint is below.")
    except Exception as err:  # noqa: BLE001 - e.g. a full disk: say so, never crash the server
        log.exception("could not save run %s", run.number)
        run.message = f"The run could not be saved ({type(err).__name__}: {err})."
    finally:
        run.model = None  # the store holds it now (or nobody: it is not needed any more)
        run.finished.set()


def _picker_update(value: str | None = None) -> dict[str, Any]:
    return gr.update(choices=MODELS.choices(), value=value) if value else gr.update(choices=MODELS.choices())


def train_run(
    source: str = SRC_SYNTHETIC,
    zip_file: Any = None,
    per_class: int = 300,
    depth: int = 4,
    width: int = 128,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 64,
    finetune: bool = False,
    freeze_backbone: bool = False,
    model_name: str = SHIPPED,
    request: gr.Request = None,
) -> Iterator[tuple[Any, Any, str, Any, Any]]:
    """Train and stream the curves: yields (loss DataFrame, accuracy DataFrame, status Markdown,
    model picker update, checkpoint file). The finished model, or the model as it is when the
    generator is closed (Stop), becomes a selectable model and its checkpoint a download."""
    session = getattr(request, "session_hash", None) or "local"
    empty = _frame([])
    yield empty, empty, "Loading the data...", gr.skip(), None
    try:
        run = _prepare_run(source, zip_file, per_class, depth, width, epochs, lr, batch_size, finetune,
                           freeze_backbone, model_name)
    except gr.Error:
        raise
    except (DataError, ModelUnavailable, ValueError) as err:
        raise _error(str(err)) from None
    except Exception as err:  # noqa: BLE001
        log.exception("could not prepare a run")
        raise _error(f"Could not start training ({type(err).__name__}: {err}).") from None
    train_data, val_data = run.metadata.pop("_data")
    _ACTIVE[session] = run
    if len(_ACTIVE) > 64:  # forget finished runs of old sessions
        for key in [k for k, r in _ACTIVE.items() if r.finished.is_set() and k != session]:
            _ACTIVE.pop(key, None)
    steps_per_epoch = math.ceil(len(train_data) / run.recipe.batch_size)
    run.total_steps = steps_per_epoch * run.recipe.epochs
    events = engine_train(run.model, train_data, val_data, run.recipe, preprocess=run.prep, out_dir=None, seed=0,
                          freeze_backbone=bool(freeze_backbone and finetune),
                          log_every=max(1, run.total_steps // 150))
    done, failed = False, None
    frozen = (" First the frozen backbone computes every image's features once (this part cannot be stopped)."
              if freeze_backbone and finetune else "")
    yield empty, empty, (f"Training {run.description} on {len(train_data)} images ({len(val_data)} for "
                         f"validation), {run.total_steps} steps...{frozen}"), gr.skip(), None
    trimmed = time.monotonic()
    try:
        for event in events:
            if time.monotonic() - trimmed > TRIM_SECONDS:
                release_memory()
                trimmed = time.monotonic()
            if isinstance(event, StepEvent):
                run.steps, run.epoch = event.step, event.epoch
                run.loss_rows.append((event.step, event.loss, "train"))
                run.acc_rows.append((event.step, 100 * event.acc, "train"))
            elif isinstance(event, EpochEvent):
                run.last_epoch = event
                for key, value in (("train_loss", event.train_loss), ("train_acc", event.train_acc),
                                   ("test_loss", event.val_loss), ("test_acc", event.val_acc)):
                    run.history.setdefault(key, []).append(value)
                if event.val_loss is not None:
                    run.loss_rows.append((run.steps, event.val_loss, "validation"))
                    run.acc_rows.append((run.steps, 100 * event.val_acc, "validation"))
            elif isinstance(event, DoneEvent):
                done = True
                break
            yield _frame(run.loss_rows), _frame(run.acc_rows), _status(run, event), gr.skip(), gr.skip()
    except TrainingError as err:
        failed = str(err)
    except Exception as err:  # noqa: BLE001 - e.g. out of memory: a message, not a crash
        log.exception("run %s failed", run.number)
        failed = f"Training failed ({type(err).__name__}: {err})."
    finally:
        # Also reached when the generator is closed (Stop): the engine stops between two steps
        # and the model, as it is after its last step, is saved and registered.
        events.close()
        if failed is not None:
            run.message, run.model = failed, None
            shutil.rmtree(run.folder, ignore_errors=True)  # nothing was saved in it: leave no empty folder
            run.finished.set()
        elif not run.finished.is_set():
            _finish(run, stopped=not done)
    if failed is not None:
        raise _error(failed)
    yield (_frame(run.loss_rows), _frame(run.acc_rows), run.message, _picker_update(run.name),
           str(run.checkpoint) if run.checkpoint else None)


def _prepare_run(source, zip_file, per_class, depth, width, epochs, lr, batch_size, finetune, freeze_backbone,
                 model_name) -> Run:
    depth, epochs = _clamp(depth, 1, 8), _clamp(epochs, 1, 20)
    width = int(width) if _clamp(width, 0, 10_000) in WIDTHS else 128
    batch_size = int(batch_size) if _clamp(batch_size, 0, 10_000) in BATCH_SIZES else 64
    try:
        lr = float(lr)
    except (TypeError, ValueError):
        raise _error(f"The learning rate must be a number, got {lr!r}.") from None
    if not 1e-6 <= lr <= 0.1:
        raise _error(f"The learning rate must be between 1e-6 and 0.1, got {lr:g}.")
    if freeze_backbone and not finetune:
        raise _error("'Freeze the backbone' needs 'Fine-tune the selected model' ticked too: a new model has no "
                     "trained backbone to keep.")
    base, big = None, False
    if finetune:
        base = _entry(model_name)
        params = sum(p.numel() for p in base.model.parameters())
        big = params > MAX_FULL_FINETUNE_PARAMS
        if big and not freeze_backbone:
            raise _error(f"Fine-tuning all {params:,} parameters of {model_name} would take hours on this CPU: "
                         f"tick 'Freeze the backbone' to train only the head.")
        image_size = base.model.config.image_size[0]
    else:
        image_size = get_config("vit_cifar_4").image_size[0]
    # A frozen big backbone computes every image's features once, before the first step, and
    # that cannot be stopped: keep it short.
    data, mean, std, data_name = load_training_data(source, zip_file, per_class, image_size,
                                                    max_images=MAX_BIG_FINETUNE_IMAGES if big else 1_000_000)
    if data.num_classes < 2:
        raise _error("Training needs at least two classes.")
    train_idx, val_idx = stratified_split(data.labels, 0.2, seed=0)
    train_data, val_data = data.subset(train_idx), data.subset(val_idx)

    if base is not None:
        model = copy.deepcopy(base.model)
        model.requires_grad_(True)
        model.reset_classifier(data.num_classes)
        meta = base.meta
        prep = preprocessing(meta["image_size"], meta["mean"], meta["std"], resize=meta.get("resize"),
                             interpolation=meta.get("interpolation", "bicubic"))
        parent = model_name.split(":")[0] if model_name.startswith("Run ") else model_name.split(" (")[0]
        what = f"{data_name}, {data.num_classes} classes, fine-tuned from {parent}" + (
            " (head only)" if freeze_backbone else "")
    else:
        model = create_model("vit_cifar_4", num_classes=data.num_classes, depth=depth, embed_dim=width,
                             num_heads=width // 32, mlp_dim=2 * width)
        prep = preprocessing(image_size, mean, std)
        what = f"{data_name}, {data.num_classes} classes, ViT {depth}x{width}"
    recipe = RECIPES["small-data"].replace(epochs=epochs, batch_size=batch_size, lr=lr)
    with _RUN_COUNTER_LOCK:
        number = next(_RUN_COUNTER)
    metadata = {"data": data_name, "trained_in": f"vitdemo {__version__} app", "_data": (train_data, val_data)}
    return Run(number, _new_run_folder(), model, list(data.class_names), prep, recipe, what, metadata)


def after_stop(request: gr.Request = None, timeout: float = 60.0) -> tuple[str, Any, Any]:
    """After Stop: wait for the cancelled run to be saved, then show it (status, picker, file)."""
    run = _ACTIVE.get(getattr(request, "session_hash", None) or "local")
    if run is None:
        return gr.skip(), gr.skip(), gr.skip()
    if not run.finished.wait(timeout):
        return "Stopping... (the current step is finishing)", gr.skip(), gr.skip()
    return run.message, _picker_update(run.name), str(run.checkpoint) if run.checkpoint else None


# ---------------------------------------------------------------------------------------------
# The model picker
# ---------------------------------------------------------------------------------------------


def model_note(name: str | None, load: bool = True) -> str:
    """One line under the picker: what the model is, or why it cannot be used. With `load`,
    the model is loaded (downloaded, for the pre-trained one) now, so problems show at once."""
    name = name or SHIPPED
    try:
        if load:
            entry = _entry(name)
            config, meta = entry.model.config, entry.meta
        else:
            config, meta = model_spec(name)
    except ModelUnavailable as err:
        if name == PRETRAINED:
            gr.Warning(str(err))
        return f"**{name}:** {err}"
    return (f"**{name}:** {config.image_size[0]} px images, patch {config.patch_size}, {config.depth} layers of "
            f"width {config.embed_dim}, {len(meta['class_names'])} classes.")


def select_model(name: str | None) -> tuple[Any, ...]:
    """Everything that changes with the model picker: the note, the card, the sliders' ranges
    (layers, patch rows and columns) and the attention cache (emptied)."""
    note = model_note(name)
    card = model_card(name)
    try:
        config, _ = model_spec(name)
        gh, gw, depth = config.grid_size[0], config.grid_size[1], config.depth
    except ModelUnavailable:
        gh = gw = depth = 1
    rows = gr.update(maximum=max(gh, 2), value=(gh + 1) // 2)
    cols = gr.update(maximum=max(gw, 2), value=(gw + 1) // 2)
    return note, card, gr.update(maximum=max(depth, 2), value=depth), rows, cols, rows, cols, None


def refresh_picker(current: str | None) -> Any:
    """The picker's choices as they are now (runs trained in other sessions included)."""
    value = current if current in MODELS.choices() else SHIPPED
    return gr.update(choices=MODELS.choices(), value=value)


# ---------------------------------------------------------------------------------------------
# Example images, drawn here (no data set images are shipped)
# ---------------------------------------------------------------------------------------------


def _sky(size: int, top: tuple, bottom: tuple) -> Image.Image:
    t = np.linspace(0, 1, size)[:, None, None]
    rows = (1 - t) * np.array(top) + t * np.array(bottom)
    return Image.fromarray(np.repeat(rows, size, axis=1).astype(np.uint8))


def draw_examples(folder: Path, size: int = 128) -> list[Path]:
    """Write a few simple drawn pictures (and one 16-bit grayscale PNG) to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    s = size / 128
    pictures: dict[str, Image.Image] = {}

    img = _sky(size, (70, 130, 220), (170, 205, 245))
    d = ImageDraw.Draw(img)
    d.polygon([(60 * s, 60 * s), (78 * s, 60 * s), (58 * s, 18 * s), (48 * s, 18 * s)], fill=(200, 200, 210))
    d.polygon([(60 * s, 68 * s), (78 * s, 68 * s), (58 * s, 110 * s), (48 * s, 110 * s)], fill=(185, 185, 198))
    d.ellipse([16 * s, 57 * s, 112 * s, 71 * s], fill=(238, 238, 242))
    d.polygon([(18 * s, 64 * s), (32 * s, 64 * s), (22 * s, 42 * s), (14 * s, 42 * s)], fill=(210, 60, 60))
    pictures["airplane"] = img

    img = _sky(size, (150, 190, 230), (200, 220, 240))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 76 * s, size, size], fill=(25, 70, 130))
    d.polygon([(14 * s, 70 * s), (114 * s, 70 * s), (100 * s, 90 * s), (26 * s, 90 * s)], fill=(120, 40, 35))
    d.rectangle([40 * s, 54 * s, 86 * s, 70 * s], fill=(240, 240, 240))
    d.rectangle([72 * s, 40 * s, 80 * s, 54 * s], fill=(30, 30, 30))
    pictures["ship"] = img

    img = _sky(size, (180, 200, 225), (120, 120, 120))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 88 * s, size, size], fill=(70, 70, 75))
    d.rounded_rectangle([12 * s, 58 * s, 116 * s, 90 * s], radius=int(8 * s), fill=(200, 30, 40))
    d.polygon([(34 * s, 58 * s), (46 * s, 40 * s), (84 * s, 40 * s), (98 * s, 58 * s)], fill=(190, 25, 35))
    d.polygon([(40 * s, 57 * s), (49 * s, 44 * s), (64 * s, 44 * s), (64 * s, 57 * s)], fill=(170, 210, 235))
    d.polygon([(68 * s, 57 * s), (68 * s, 44 * s), (82 * s, 44 * s), (92 * s, 57 * s)], fill=(170, 210, 235))
    for cx in (36, 94):
        d.ellipse([(cx - 12) * s, 78 * s, (cx + 12) * s, 102 * s], fill=(20, 20, 20))
        d.ellipse([(cx - 5) * s, 85 * s, (cx + 5) * s, 95 * s], fill=(150, 150, 150))
    pictures["car"] = img

    img = _sky(size, (40, 30, 60), (90, 60, 40))
    ImageDraw.Draw(img).ellipse([30 * s, 26 * s, 98 * s, 94 * s], fill=(235, 220, 120))
    pictures["circle"] = img

    folder_files = []
    for name, picture in pictures.items():
        path = folder / f"{name}.png"
        picture.save(path)
        folder_files.append(path)
    # A 16-bit grayscale PNG (mode I;16): converted by scaling, not clipped to white.
    yy, xx = np.mgrid[0:size, 0:size]
    square = (abs(xx - size / 2) < size / 4) & (abs(yy - size / 2) < size / 4)
    a = (yy * 20000 // size + square * 40000).astype(np.uint16)
    path = folder / "square-16bit.png"
    Image.fromarray(a).save(path)
    folder_files.append(path)
    return folder_files


# ---------------------------------------------------------------------------------------------
# The Blocks
# ---------------------------------------------------------------------------------------------


def if_image(fn: Callable, empty: tuple) -> Callable:
    """`fn` for an image's change event: an emptied image empties the outputs instead of
    raising "no image" (which the buttons and the API still do)."""

    @functools.wraps(fn)
    def wrapper(image: Any, *args: Any) -> Any:
        return empty if image is None else fn(image, *args)

    return wrapper


def build_demo() -> gr.Blocks:
    """The app. Launch it with `demo.launch(**launch_options())`."""
    examples = [[str(p)] for p in draw_examples(APP_DIR / "examples")]
    with gr.Blocks(title="vitdemo: An Image is Worth 16x16 Words", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown("# vitdemo: the Vision Transformer, explained\n"
                    "An image cut into patches, each patch a word, read by a Transformer "
                    "([Dosovitskiy et al., 2020](https://arxiv.org/abs/2010.11929)). Pick a model, then explore.")
        with gr.Row(equal_height=True):
            picker = gr.Dropdown(choices=MODELS.choices(), value=SHIPPED, label="Model", allow_custom_value=True,
                                 scale=2, info="Used by every tab; runs you train appear here.")
            note = gr.Markdown(elem_id="model-note")
        attn_cache = gr.State(None, time_to_live=1800)
        last_ms = gr.State(None)

        with gr.Tabs():
            with gr.Tab("Classify", id="classify"):
                with gr.Row():
                    with gr.Column():
                        cls_image = image_input()
                        cls_runtime = gr.Dropdown(RUNTIME_CHOICES, value="auto", label="Runtime",
                                                  info="int8: 1.4x faster for the shipped model, 2.4x for ViT-B/16, "
                                                       "the same class as fp32 for 99% of images. An ONNX export "
                                                       "takes seconds on first use.")
                        cls_button = gr.Button("Classify", variant="primary")
                        gr.Examples(examples, inputs=cls_image, label="Examples (drawn pictures)")
                    with gr.Column():
                        cls_label = gr.Label(num_top_classes=5, label="Top 5")
                        cls_time = gr.Markdown()

            with gr.Tab("Patches", id="patches"):
                gr.Markdown("The model never sees pixels one by one: it cuts the image into P x P patches, the "
                            "*16x16 words* of the title, and reads them row by row.")
                with gr.Row():
                    with gr.Column():
                        patch_image = image_input()
                        patch_button = gr.Button("Cut into patches", variant="primary")
                        gr.Examples(examples, inputs=patch_image)
                    with gr.Column():
                        patch_text = gr.Markdown()
                        patch_grid_out = gr.Image(format="png", interactive=False,
                                                  label="The image as the model sees it, with its patches")
                        patch_seq_out = gr.Image(format="png", label="The sequence of patches (tokens 1, 2, ...)",
                                                 interactive=False)

            with gr.Tab("Position embeddings", id="position"):
                gr.Markdown("Each patch position has a learned embedding. The paper's Fig. 7 (centre): tile (r, c) "
                            "shows the cosine similarity of position (r, c)'s embedding with every position's.")
                with gr.Row():
                    pos_fig = gr.Image(format="png", label="Position embedding similarity (Fig. 7, centre)",
                                       interactive=False, scale=3)
                    with gr.Column(scale=2):
                        pos_row = gr.Slider(1, 8, value=4, step=1, label="Row")
                        pos_col = gr.Slider(1, 8, value=4, step=1, label="Column")
                        pos_detail = gr.Image(format="png", label="One position, large", interactive=False)
                        pos_note = gr.Markdown()

            with gr.Tab("Attention", id="attention"):
                with gr.Row():
                    with gr.Column(scale=1):
                        attn_image = image_input()
                        attn_button = gr.Button("Explain", variant="primary")
                        gr.Examples(examples, inputs=attn_image)
                        fusion = gr.Radio(["mean", "max", "min"], value="mean", label="Head fusion (rollout)")
                        discard = gr.Slider(0.0, 0.95, value=0.0, step=0.05,
                                            label="Discard ratio (weakest attention zeroed)")
                        opacity = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="Overlay opacity")
                        gradient = gr.Checkbox(False, label="Gradient rollout for the predicted class")
                    with gr.Column(scale=2):
                        attn_caption = gr.Markdown()
                        with gr.Row():
                            rollout_out = gr.Image(format="png", label="Rollout", interactive=False)
                            distance_out = gr.Image(
                                format="png", interactive=False,
                                label="Mean attention distance per head, this image (Fig. 7, right)")
                        with gr.Row():
                            layer = gr.Slider(1, 7, value=7, step=1, label="Layer")
                            query = gr.Radio([QUERY_CLS, QUERY_PATCH], value=QUERY_CLS, label="Query")
                            q_row = gr.Slider(1, 8, value=1, step=1, label="Query row")
                            q_col = gr.Slider(1, 8, value=1, step=1, label="Query column")
                        heads_out = gr.Gallery(format="png", label="Attention of the query, one map per head",
                                               show_label=False, columns=6, height=260, object_fit="contain",
                                               interactive=False)

            with gr.Tab("Train", id="train"):
                gr.Markdown("Train a small ViT from scratch (patch 4 on 32 px images), or fine-tune the selected "
                            "model on new classes. Curves update live; Stop keeps the model as it is.")
                with gr.Row():
                    with gr.Column():
                        source = gr.Radio(list(SOURCES), value=SRC_SYNTHETIC, label="Data")
                        zip_in = gr.File(file_types=[".zip"], type="filepath",
                                         label="Zip of class folders (zip/<class>/<image>), for 'Uploaded .zip'")
                        per_class = gr.Slider(20, 500, value=300, step=10, label="Images per class (at most)")
                        finetune = gr.Checkbox(False, label="Fine-tune the selected model (new head for these classes)")
                        freeze = gr.Checkbox(False, label="Freeze the backbone (train only the head)")
                    with gr.Column():
                        depth = gr.Slider(1, 8, value=4, step=1, label="Layers (new model)")
                        width = gr.Dropdown(list(WIDTHS), value=128, label="Width D (new model; heads of 32)")
                        epochs = gr.Slider(1, 20, value=5, step=1, label="Epochs")
                        lr = gr.Number(1e-3, label="Learning rate (AdamW, warm-up and cosine)", minimum=1e-6,
                                       maximum=0.1)
                        batch = gr.Radio(list(BATCH_SIZES), value=64, label="Batch size")
                with gr.Row():
                    start = gr.Button("Start training", variant="primary")
                    stop = gr.Button("Stop", variant="stop")
                status = gr.Markdown("Ready.", elem_classes="status-line")
                with gr.Row():
                    loss_plot = gr.LinePlot(x="step", y="value", color="metric", title="Loss", x_title="step",
                                            y_title="loss")
                    acc_plot = gr.LinePlot(x="step", y="value", color="metric", title="Accuracy (%)",
                                           x_title="step", y_title="accuracy (%)", y_lim=[0, 100])
                checkpoint_out = gr.File(label="Checkpoint of the last run (model.safetensors)", interactive=False)

            with gr.Tab("About", id="about"):
                gr.Markdown(ABOUT, latex_delimiters=LATEX)
                card = gr.Markdown(latex_delimiters=[])

        # -- wiring ----------------------------------------------------------------------------
        model_outputs = [note, card, layer, q_row, q_col, pos_row, pos_col, attn_cache]
        position_outputs = [pos_fig, pos_detail, pos_note]
        hidden = {"api_visibility": "undocumented"}

        demo.load(refresh_picker, picker, picker, **hidden).then(
            select_model, picker, model_outputs, **hidden).then(
            position_views, [picker, pos_row, pos_col], position_outputs, **hidden)
        picker.input(select_model, picker, model_outputs, **hidden).then(
            position_views, [picker, pos_row, pos_col], position_outputs, **hidden)

        view = {"concurrency_limit": 2, "concurrency_id": "views"}
        cls_outputs = [cls_label, last_ms]
        cls_button.click(classify, [cls_image, picker, cls_runtime], cls_outputs, api_name="classify", concurrency_limit=3,
                         concurrency_id="classify").success(timing_text, last_ms, cls_time, **hidden)
        cls_image.change(if_image(classify, (None, None)), [cls_image, picker, cls_runtime], cls_outputs,
                         api_name="classify_on_change", concurrency_limit=3, concurrency_id="classify",
                         **hidden).success(timing_text, last_ms, cls_time, **hidden)

        patch_outputs = [patch_grid_out, patch_seq_out, patch_text]
        patch_button.click(patches, [patch_image, picker], patch_outputs, api_name="patches", **view)
        patch_image.change(if_image(patches, (None, None, "")), [patch_image, picker], patch_outputs,
                           api_name="patches_on_change", **view, **hidden)

        detail_inputs = [picker, pos_row, pos_col]
        pos_row.release(position_detail, detail_inputs, [pos_detail, pos_note], **hidden)
        pos_col.release(position_detail, detail_inputs, [pos_detail, pos_note], **hidden)

        attn_inputs = [attn_image, picker, attn_cache, fusion, discard, opacity, gradient, layer, query, q_row, q_col]
        attn_outputs = [rollout_out, heads_out, distance_out, attn_caption, attn_cache]
        attn_button.click(explain, attn_inputs, attn_outputs, api_name="explain", **view)
        on_change = if_image(explain, (None, [], None, "", None))
        attn_image.change(on_change, attn_inputs, attn_outputs, api_name="explain_on_change", **view, **hidden)
        for control in (fusion, gradient, query):
            control.change(on_change, attn_inputs, attn_outputs, **view, **hidden)
        for control in (discard, opacity, layer, q_row, q_col):
            control.release(on_change, attn_inputs, attn_outputs, **view, **hidden)

        train_inputs = [source, zip_in, per_class, depth, width, epochs, lr, batch, finetune, freeze, picker]
        train_event = start.click(train_run, train_inputs, [loss_plot, acc_plot, status, picker, checkpoint_out],
                                  api_name="train", concurrency_limit=1, concurrency_id="train",
                                  show_progress_on=[status])
        train_event.then(select_model, picker, model_outputs, **hidden).then(
            position_views, [picker, pos_row, pos_col], position_outputs, **hidden)
        stop.click(None, None, None, cancels=[train_event]).then(
            after_stop, None, [status, picker, checkpoint_out], **hidden).then(
            select_model, picker, model_outputs, **hidden).then(
            position_views, [picker, pos_row, pos_col], position_outputs, **hidden)
    demo.queue(max_size=QUEUE_SIZE)
    return demo


__all__ = [
    "MODELS", "PRETRAINED", "QUERY_CLS", "QUERY_PATCH", "SHIPPED", "SOURCES", "SRC_CIFAR", "SRC_SYNTHETIC", "SRC_ZIP",
    "ModelStore", "ModelUnavailable", "after_stop", "build_demo", "classify", "count_parameters", "draw_examples",
    "explain", "if_image", "image_input", "launch_options", "load_training_data", "model_card", "model_choices",
    "model_input", "model_note", "model_spec", "model_view", "patches", "position_detail", "position_figure",
    "position_views", "refresh_picker", "release_memory", "select_model", "timing_text", "to_rgb", "train_run", "user_errors",
]
