"""Training runs of the Train tab: the data, the model, the engine's events turned into live
curves and a status line, and the trained model registered in the model picker.

A run is the engine's generator (`vitdemo.engine.train`) driven by a `Trainer`, in a thread of
its own at a lower CPU priority, whose events the tab's generator handler reads: closing the
handler (Stop) sets the run's stop flag, the engine stops between two optimiser steps, and the
thread saves and registers the model as it is then. Curves are long-format rows (step, value,
series) for `gr.LinePlot`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import __version__, create_model, ood
from ..checkpoint import read_metadata, save_checkpoint
from ..data import CIFAR10, SYNTHETIC, DataError, ImageData, Preprocessing, TrainingData, num_batches, training_data
from ..engine import RECIPES, DoneEvent, EpochEvent, Recipe, StepEvent, TrainingError, ValidationEvent, evaluate
from ..engine import train as engine_train
from ..model import VisionTransformer
from ..pretrained import download_failure
from . import common, models
from .common import clamp, log, user_error

SRC_SYNTHETIC = "Synthetic shapes (built-in, offline)"
SRC_CIFAR = "CIFAR-10 (local folder, else torchvision download)"
SRC_ZIP = "Uploaded .zip of class folders"
SOURCES = (SRC_SYNTHETIC, SRC_CIFAR, SRC_ZIP)
IMAGE_SIZE = 32  # new models read 32 px images: CIFAR-10's size, and the shapes are drawn at it
SHAPE_CLASSES = 4
VAL_SHARE = 0.1  # of the images, held out for the validation curve
MAX_VAL_IMAGES = 1000  # validation several times an epoch must stay cheap
CURVE_POINTS = 12  # validation points per run (besides the end of each epoch)

MAX_TRAIN_PIXELS = 120_000_000  # images x side^2 held for one run: 40,000 at 32 px, 2,391 at 224 px
MAX_ZIP_BYTES = 300 * 1024**2  # extracted size of an uploaded zip
MAX_ZIP_FILES = 20_000
MAX_FULL_FINETUNE_PARAMS = 30_000_000  # bigger models are fine-tuned with a frozen backbone only (CPU)
MAX_BIG_FINETUNE_IMAGES = 240  # images for a frozen big backbone (ViT-B: about a minute of feature extraction)
MAX_PLOT_POINTS = 500  # per plot, all series together: the browser redraws every point on each update

RUNS_ROOT = common.APP_DIR / "runs"  # read as training.RUNS_ROOT at call time (tests move it)


def cache_dir() -> Path:
    return Path(os.environ.get("VITDEMO_CACHE", Path.home() / ".cache" / "vitdemo"))


def cifar_folders() -> list[Path]:
    """Where a local copy of CIFAR-10's training images (ImageFolder: one folder per class) is
    looked for, first found first: $VITDEMO_CIFAR10, then ~/.cache/vitdemo/cifar10/train (where
    `tar -xzf cifar10-train.tar.gz -C ~/.cache/vitdemo` puts it)."""
    folders = [Path(os.environ["VITDEMO_CIFAR10"])] if os.environ.get("VITDEMO_CIFAR10") else []
    return [*folders, cache_dir() / "cifar10" / "train"]


def torchvision_cifar_root() -> Path:
    return cache_dir() / "torchvision-cifar10"


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


# The built-in shapes and a local CIFAR-10 folder are loaded once per server and model crop
# (seconds each); zips are new uploads every time.
_cached_training_data = functools.lru_cache(maxsize=2)(training_data)


def _load(source: str, start: Preprocessing | None, image_size: int, **options: Any) -> TrainingData:
    options.update(image_size=image_size, start=start, max_val_images=MAX_VAL_IMAGES)
    if source == SYNTHETIC or Path(source).is_dir():
        return _cached_training_data(source, **options)
    return training_data(source, **options)


def _cifar_source() -> tuple[str, dict[str, Any]]:
    """A local folder of CIFAR-10 if there is one, else torchvision's copy (downloaded once)."""
    for folder in cifar_folders():
        if folder.is_dir():
            return str(folder), {}
    if (failed := models.MODELS.failure(SRC_CIFAR)) is not None:
        raise user_error(failed)
    return CIFAR10, {"data_root": torchvision_cifar_root(), "download": True}


def _cifar_unavailable(err: DataError) -> str:
    cause = err.__cause__ or err
    why = download_failure(cause) or str(err)
    where = f"`{str(cache_dir() / 'cifar10' / 'train').replace(str(Path.home()), '~', 1)}`"  # documented
    message = (f"CIFAR-10 is not on this server and could not be downloaded: {why}. Put CIFAR-10's "
               f"training images as class folders in {where} "
               f"(or set VITDEMO_CIFAR10 to such a folder), or use the built-in shapes or a .zip of class "
               f"folders. The download is not tried again for {round(models.PRETRAINED_RETRY_SECONDS / 60)} "
               f"minutes.")
    models.MODELS.remember_failure(SRC_CIFAR, message)
    return message


def load_training_data(source: str, zip_file: Any, per_class: int, start: Preprocessing | None = None,
                       image_size: int = IMAGE_SIZE, max_images: int = 1_000_000,
                       val_share: float = VAL_SHARE) -> tuple[TrainingData, str]:
    """The tab's data source as training and validation images (`vitdemo.data.training_data`,
    as the CLI loads them) and its description: at most `per_class` images per class,
    `max_images` and `MAX_TRAIN_PIXELS` pixels in all. A fine-tuned model passes its `start`
    preprocessing and trains on the pixels it will be shown; a new model is normalised with its
    training images' statistics. User text never becomes a path: the zip is Gradio's uploaded
    copy, CIFAR-10 lives in fixed folders."""
    per_class = clamp(per_class, 2, 5000)
    budget = {"max_images": max(4, min(max_images, MAX_TRAIN_PIXELS // image_size**2)), "val_size": val_share}
    if source == SRC_SYNTHETIC:
        data = _load(SYNTHETIC, start, image_size, max_images_per_class=per_class,
                     synthetic_classes=SHAPE_CLASSES, **budget)
        return data, "synthetic shapes"
    if source == SRC_CIFAR:
        cifar, where = _cifar_source()
        try:
            return _load(cifar, start, image_size, max_images_per_class=per_class, **where, **budget), "CIFAR-10"
        except DataError as err:
            if cifar != CIFAR10:
                raise
            raise user_error(_cifar_unavailable(err)) from None
    if source == SRC_ZIP:
        path = getattr(zip_file, "name", zip_file)  # a path from gr.File(type="filepath") (or a file object)
        if not path:
            raise user_error("Upload a .zip file of class folders first: one folder per class, images inside, "
                             "two classes or more.")
        path = Path(path)
        if path.suffix.lower() != ".zip":
            raise user_error(f"Expected a .zip file, got a {path.suffix or 'file without extension'}.")
        data = _load(str(path), start, image_size, max_images_per_class=per_class, max_total_bytes=MAX_ZIP_BYTES,
                     max_files=MAX_ZIP_FILES, progress=False, **budget)
        note = f", {len(data.skipped)} unreadable files skipped" if data.skipped else ""
        return data, f"uploaded zip ({len(data.train) + len(data.val or [])} images{note})"
    raise user_error(f"Unknown data source {source!r}; choose one of: {', '.join(SOURCES)}.")


# ---------------------------------------------------------------------------------------------
# A run
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run of the Train tab."""

    number: int
    folder: Path
    model: VisionTransformer | None  # None once registered
    class_names: list[str]
    prep: Preprocessing
    recipe: Recipe
    description: str  # data and model, for the picker name
    metadata: dict[str, Any]
    train_data: ImageData | None = None
    val_data: ImageData | None = None
    label: str = ""  # prefix of its curves' series names ("from scratch: ") in a comparison
    steps: int = 0
    total_steps: int = 0
    history: dict[str, list] = field(default_factory=dict)
    last_epoch: EpochEvent | None = None
    last_val: tuple[float, float] | None = None  # (loss, accuracy) of the latest validation
    started: float = field(default_factory=time.perf_counter)
    training_started: float | None = None
    name: str | None = None  # picker name, once registered
    checkpoint: Path | None = None
    message: str = ""
    stop: threading.Event = field(default_factory=threading.Event)  # set: stop between two steps
    stopped: bool = False  # the engine stopped before the last step
    finished: threading.Event = field(default_factory=threading.Event)  # saved and registered, or discarded


_RUN_COUNTER = iter(range(1, 1_000_000))
_RUN_COUNTER_LOCK = threading.Lock()


def frame(rows: list[tuple[int, float, str]], limit: int = MAX_PLOT_POINTS) -> pd.DataFrame:
    """Long-format (step, value, series) rows for gr.LinePlot, at most `limit` of them: the
    per-step training points are thinned evenly, the validation points all kept."""
    train = [r for r in rows if r[2].endswith("train")]
    other = [r for r in rows if not r[2].endswith("train")]
    room = max(2, limit - len(other))
    if len(train) > room:
        keep = np.unique(np.linspace(0, len(train) - 1, room).round().astype(int))
        train = [train[i] for i in keep]
    rows = train + other
    # Typed columns even when empty: the plot fixes its axes' kind (numeric or not) from the
    # first frame it gets, and later frames only send differences.
    return pd.DataFrame({"step": pd.Series([r[0] for r in rows], dtype="int64"),
                         "value": pd.Series([r[1] for r in rows], dtype="float64"),
                         "series": pd.Series([r[2] for r in rows], dtype="object")})


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


def new_run(model: VisionTransformer, data: TrainingData, recipe: Recipe, description: str,
            data_name: str, label: str = "") -> Run:
    """A run of `model` on `data`'s training and validation images, with its preprocessing."""
    if data.val is None:
        raise user_error("Training here needs validation images for its curves.")
    with _RUN_COUNTER_LOCK:
        number = next(_RUN_COUNTER)
    RUNS_ROOT.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="run-", dir=RUNS_ROOT))
    metadata = {"data": data_name, "trained_in": f"vitdemo {__version__} app"}
    run = Run(number, folder, model, list(data.class_names), data.preprocessing, recipe, description, metadata,
              data.train, data.val, label)
    run.total_steps = num_batches(len(run.train_data), recipe.batch_size) * recipe.epochs
    return run


@contextlib.contextmanager
def fixed_seed(seed: int = 0) -> Iterator[None]:
    """New weights drawn from `seed`, leaving the global random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def new_model(num_classes: int, patch: int, depth: int, width: int) -> VisionTransformer:
    """A from-scratch ViT of the paper's design for 32 px images (heads of width 32), its initial
    weights drawn from a fixed seed: the same inputs give the same run, curve and final figure."""
    with fixed_seed():
        return create_model("vit_cifar_4", num_classes=num_classes, patch_size=patch, depth=depth,
                            embed_dim=width, num_heads=max(1, width // 32), mlp_dim=2 * width)


def finetune_model(base: models.Entry, num_classes: int) -> VisionTransformer:
    """A trainable copy of a model with a new head (its preprocessing: `models.preprocessing_of`)."""
    model = copy.deepcopy(base.model)
    model.requires_grad_(True)
    with fixed_seed():
        model.reset_classifier(num_classes)
    return model


def recipe_for(epochs: int, lr: float, batch_size: int) -> Recipe:
    return RECIPES["small-data"].replace(epochs=epochs, batch_size=batch_size, lr=lr)


# ---------------------------------------------------------------------------------------------
# Memory: glibc keeps freed activations of steps run in many threads
# ---------------------------------------------------------------------------------------------


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
    whichever worker thread Gradio picks, between other requests' allocations, and glibc then
    keeps the freed activations of every step in fragmented heaps (tests/test_load.py measures
    the server's memory under load with this in place). A trim takes a few milliseconds."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM()


# ---------------------------------------------------------------------------------------------
# Driving the engine
# ---------------------------------------------------------------------------------------------


def events(run: Run, freeze_backbone: bool = False) -> Iterator[StepEvent | ValidationEvent | EpochEvent]:
    """The engine's events for `run`, recorded into it (curves, history, last validation); the
    engine's final `DoneEvent` ends the iteration. Setting `run.stop`, or closing this generator,
    stops the engine between two steps."""
    steps_per_epoch = run.total_steps // run.recipe.epochs
    val_every = max(1, run.total_steps // CURVE_POINTS)
    engine = engine_train(run.model, run.train_data, run.val_data, run.recipe, preprocess=run.prep, out_dir=None,
                          seed=0, freeze_backbone=freeze_backbone, log_every=max(1, run.total_steps // 150),
                          val_every=val_every if val_every < steps_per_epoch else None, should_stop=run.stop.is_set)
    run.training_started = time.perf_counter()
    trimmed = time.monotonic()
    try:
        for event in engine:
            if time.monotonic() - trimmed > TRIM_SECONDS:
                release_memory()
                trimmed = time.monotonic()
            if isinstance(event, DoneEvent):
                run.stopped = event.stopped
                return
            if isinstance(event, StepEvent):
                run.steps = event.step
            elif isinstance(event, ValidationEvent):
                run.last_val = (event.val_loss, event.val_acc)
            elif isinstance(event, EpochEvent):
                run.steps = event.epoch * steps_per_epoch  # StepEvents come every few steps only
                run.last_epoch = event
                # The walk-through's history keys, kept for its readers: "test" means validation here.
                for key, value in (("train_loss", event.train_loss), ("train_acc", event.train_acc),
                                   ("test_loss", event.val_loss), ("test_acc", event.val_acc)):
                    run.history.setdefault(key, []).append(value)
                if event.val_loss is not None:
                    run.last_val = (event.val_loss, event.val_acc)
            yield event
    finally:
        engine.close()


def starting_point(run: Run) -> tuple[float, float, float, float]:
    """(train loss, train accuracy, validation loss, validation accuracy) before the first step:
    where both curves start (chance, for a new model). The training figures are on up to
    `MAX_VAL_IMAGES` training images spread over the set, without augmentation."""
    mean, std = run.prep.mean, run.prep.std
    n = len(run.train_data)
    sample = run.train_data.subset(torch.linspace(0, n - 1, min(n, MAX_VAL_IMAGES)).round().long().unique())
    train_loss, train_acc, _ = evaluate(run.model, sample, mean, std)
    val_loss, val_acc, _ = evaluate(run.model, run.val_data, mean, std)
    return train_loss, train_acc, val_loss, val_acc


def eta_seconds(run: Run, steps_after: int = 0) -> float | None:
    """Seconds left at the pace so far (validation included), or None before the first steps;
    `steps_after`: the steps of the runs still to come after this one (the comparison's second
    run has the same model size and steps), so that one time left covers the whole."""
    if run.training_started is None or run.steps < 2:
        return None
    elapsed = time.perf_counter() - run.training_started
    return elapsed / run.steps * (run.total_steps - run.steps + steps_after)


def finish(run: Run, stopped: bool) -> None:
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
        acc = f", val {run.last_val[1]:.0%}" if run.last_val is not None else ""
        run.name = f"Run {run.number}: {run.description}{acc} ({state})"
        run.model.to("cpu").eval()
        try:  # the out-of-distribution statistics, fitted here as the command line fits them after training
            extra["ood"] = ood.fit(run.model, run.train_data, run.val_data, run.prep)
        except (ValueError, RuntimeError) as err:  # e.g. too few images for a covariance: no warning, no failure
            log.warning("run %s: no out-of-distribution statistics (%s)", run.number, err)
        run.checkpoint = save_checkpoint(run.folder / "model.safetensors", run.model, run.class_names, run.prep,
                                         **extra)
        models.MODELS.register(run.name, run.model, read_metadata(run.checkpoint), run.checkpoint, RUNS_ROOT)
        seconds = time.perf_counter() - run.started
        if stopped:
            run.message = (f"**Stopped** at step {run.steps} of {run.total_steps} after {duration(seconds)}. The "
                           f"model as it was then is **{run.name}** in the model picker (**Use this model** below picks it "
                           f"for every tab); its checkpoint is below.")
        else:
            val = f": validation accuracy **{models.pct(run.last_val[1])}**" if run.last_val is not None else ""
            run.message = (f"**Finished** in {duration(seconds)}{val}. The model is **{run.name}** in the model "
                           f"picker (**Use this model** below picks it for every tab); its checkpoint is below.")
    except Exception as err:  # noqa: BLE001 - e.g. a full disk: say so, never crash the server
        log.exception("could not save run %s", run.number)
        run.message = f"The run could not be saved ({type(err).__name__}); the server log has the details."
    finally:
        run.model = None  # the store holds it now (or nobody: it is not needed any more)
        run.train_data = run.val_data = None
        run.finished.set()


def discard(run: Run, message: str) -> None:
    """A failed run: nothing was saved, so no folder is left behind."""
    run.message, run.model = message, None
    run.train_data = run.val_data = None
    shutil.rmtree(run.folder, ignore_errors=True)
    run.finished.set()


# ---------------------------------------------------------------------------------------------
# Training in a thread of its own, so that the server keeps answering
# ---------------------------------------------------------------------------------------------

TRAINING_NICE = 10  # how much lower the training thread's CPU priority is than the server's (0-19)
_END = object()  # the trainer's last item: every run has ended


def lower_priority() -> None:
    """Give this thread (and the threads it starts: PyTorch's intra-op workers) a lower CPU
    priority, so that on a busy machine the server's threads get the cores first. On Linux a
    thread's nice value is its own, and threads inherit it from the thread that starts them;
    elsewhere this does nothing."""
    with contextlib.suppress(AttributeError, OSError):  # no os.setpriority, or not allowed
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), TRAINING_NICE)


# Models up to this size train faster on one core than on two from a thread that is not the main
# one (`one_thread`).
ONE_THREAD_PARAMS = 1_000_000


def one_thread() -> None:
    """PyTorch on one thread in this thread only (OpenMP's thread count is per thread; the server's
    handlers keep theirs). Measured on a 2-core machine: a small ViT (0.3M parameters) trained 1.8x
    slower on two threads from a second thread than from the main one (10.4 s against 6.1 s for the
    same steps). Once other threads have run PyTorch, libgomp counts more threads than cores and
    stops spinning between parallel regions, so each of the model's many small operations waits
    for its helper thread to wake. On one thread the same steps took 8.9 s, and the other core
    stays free for the server."""
    torch.set_num_threads(1)


@dataclass
class Start:
    """A run's figures before its first step (see `starting_point`)."""

    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float


@dataclass
class Failed:
    """A run failed; `message` is for the user."""

    message: str


class Trainer:
    """`runs` measured (`Start`), then trained one after another, in a thread of its own at a lower
    CPU priority (`lower_priority`); their events come out of `updates()`.

    Why not in the event handler itself: Gradio waits for a generator's current step before it
    cancels it, then closes the generator on its event loop, so a run trained inside the handler
    kept Stop unanswered for a whole step and froze the server while it was saved (13 s on a slow
    2-core CPU); and at the handlers' own priority the run took both cores from them. Here the
    handler waits for events at most `timeout` seconds at a time, `stop()` returns at once, and the
    thread stops between two steps, then saves and registers what it has (`finish`)."""

    def __init__(self, runs: list[Run], freeze_backbone: bool = False) -> None:
        self.runs = runs
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._ended = False
        self._thread = threading.Thread(target=self._work, args=(freeze_backbone,), daemon=True,
                                        name=f"vitdemo-train-{runs[0].number}")
        self._thread.start()

    def stop(self) -> None:
        """Stop every run between two steps (a run under way is saved as it is, later ones never start)."""
        for run in self.runs:
            run.stop.set()

    def updates(self, timeout: float) -> list[tuple[Run, Any]]:
        """The (run, item) pairs since the last call, item a `Start`, an engine event or `Failed`,
        waiting at most `timeout` seconds for the first; an empty list if none came."""
        items = []
        with contextlib.suppress(queue.Empty):
            items.append(self._events.get(timeout=timeout))
            while True:
                items.append(self._events.get_nowait())
        if _END in items:
            self._ended = True
        return [item for item in items if item is not _END]

    @property
    def ended(self) -> bool:
        """Every run has ended (finished, stopped or failed) and `updates()` has returned its last items."""
        return self._ended

    def _work(self, freeze_backbone: bool) -> None:
        lower_priority()
        if all(sum(p.numel() for p in run.model.parameters()) <= ONE_THREAD_PARAMS for run in self.runs):
            one_thread()
        try:
            for run in self.runs:  # every series starts at step 0, so all of them are in the first frame
                with _failure(run, self._events):
                    self._events.put((run, Start(*starting_point(run))))
            for run in self.runs:
                if run.stop.is_set() or run.finished.is_set():
                    break
                with _failure(run, self._events):
                    for event in events(run, freeze_backbone):
                        self._events.put((run, event))
                    finish(run, stopped=run.stopped)
                if not run.name:  # failed: the runs after it do not start
                    break
        finally:
            for run in self.runs:  # runs that never started (stopped, or a failure before them)
                if not run.finished.is_set():
                    discard(run, "")
            self._events.put(_END)


@contextlib.contextmanager
def _failure(run: Run, events: queue.SimpleQueue) -> Iterator[None]:
    """A failure of `run` discards it and is sent as `Failed`, with a message for the user."""
    try:
        yield
    except TrainingError as err:  # e.g. a non-finite loss: the user's settings
        discard(run, f"**Training failed:** {err}")
        events.put((run, Failed(str(err))))
    except Exception as err:  # noqa: BLE001 - e.g. out of memory: a message, not a crash
        log.exception("run %s failed", run.number)
        discard(run, f"Training failed ({type(err).__name__}); the server log has the details.")
        events.put((run, Failed(run.message)))
