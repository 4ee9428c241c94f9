"""The Train tab: train a small ViT from scratch with live loss and accuracy curves (train and
validation), fine-tune the picked model, and compare both on the same small data: the paper's
central finding, that pre-training is what lets a Transformer learn from little data.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import gradio as gr

from ..data import DataError, Preprocessing
from ..engine import EpochEvent, StepEvent, ValidationEvent
from ..model import VisionTransformer
from . import models, training
from .common import HIDDEN, ModelUnavailable, clamp, for_users, log, user_error
from .inputs import choice, number_in, numeric_slider, warn_out_of_range
from .models import SHIPPED
from .training import SOURCES, SRC_CIFAR, SRC_SYNTHETIC, SRC_ZIP, Run

WIDTHS = (64, 96, 128, 192)
PATCHES = (4, 8)
BATCH_SIZES = (32, 64, 128, 256)
LR_RANGE = (1e-5, 1e-2)

# Each source's defaults, measured on 2 CPU cores with `python benchmarks/train_tab.py`:
# the shapes reach 90% validation accuracy in well under a minute, CIFAR-10 50% within 3 minutes.
DEFAULTS: dict[str, dict[str, Any]] = {
    SRC_SYNTHETIC: {"per_class": 4000, "patch": 8, "depth": 4, "width": 96, "epochs": 5, "lr": 3e-3, "batch": 128},
    SRC_CIFAR: {"per_class": 2000, "patch": 4, "depth": 6, "width": 64, "epochs": 8, "lr": 2e-3, "batch": 128},
    SRC_ZIP: {"per_class": 300, "patch": 8, "depth": 4, "width": 96, "epochs": 10, "lr": 2e-3, "batch": 32},
}
COMPARE_PER_CLASS = 100  # images per class in the comparison: little data is where pre-training shows
COMPARE_VAL_SHARE = 0.3  # of those, held out: enough for a validation curve that is not all noise
COMPARE_EPOCHS = 8  # both runs within 90 s on a slow 2-core CPU (benchmarks/train_tab.py compare)
SCRATCH, FINETUNED = "from scratch", "fine-tuned"
COLORS = {"train": "#93c5fd", "validation": "#1d4ed8",
          f"{SCRATCH}: validation": "#ea580c", f"{FINETUNED}: validation": "#1d4ed8",
          f"{SCRATCH}: train": "#fdba74", f"{FINETUNED}: train": "#93c5fd"}

_ACTIVE: dict[str, list[Run]] = {}  # the current or last runs of each browser session
STOPPING = "**Stopping...** the current step is finishing; then the model as it is is saved."
POLL_SECONDS = 0.25  # the longest a training handler goes without yielding: Stop is answered within it


SLIDER_RANGES = {"per_class": (10, 5000, "Images per class"), "depth": (1, 8, "Layers"), "epochs": (1, 30, "Epochs")}


def _settings(per_class: Any, patch: Any, depth: Any, width: Any, epochs: Any, lr: Any, batch_size: Any
              ) -> dict[str, Any]:
    """The tab's numbers, checked: our own message, with the allowed range, for any other."""
    def pick(value: Any, allowed: tuple[int, ...], what: str) -> int:
        if clamp(value, 0, 10_000) not in allowed:
            raise user_error(f"{what} must be one of {', '.join(map(str, allowed))}; got {value!r}.")
        return clamp(value, 0, 10_000)

    def within(value: Any, lo: int, hi: int, what: str) -> int:
        return int(number_in(value, lo, hi, what, whole=True))

    lr = number_in(lr, *LR_RANGE, "The learning rate", why="small ViTs train well at 1e-3 to 3e-3 with this recipe")
    return {"per_class": within(per_class, *SLIDER_RANGES["per_class"]), "patch": pick(patch, PATCHES, "The patch size"),
            "depth": within(depth, *SLIDER_RANGES["depth"]), "width": pick(width, WIDTHS, "The width D"),
            "epochs": within(epochs, *SLIDER_RANGES["epochs"]), "lr": lr,
            "batch_size": pick(batch_size, BATCH_SIZES, "The batch size")}


def _prepare(source: str, zip_file: Any, settings: dict[str, Any], finetune: bool, freeze_backbone: bool,
             model_name: str) -> tuple[Run, bool]:
    """The run the tab's inputs describe, and whether only the head trains."""
    if freeze_backbone and not finetune:
        raise user_error("'Freeze the backbone' needs 'Fine-tune the selected model' ticked too: a new model has "
                         "no trained backbone to keep.")
    recipe = training.recipe_for(settings["epochs"], settings["lr"], settings["batch_size"])
    if not finetune:
        data, name = training.load_training_data(source, zip_file, settings["per_class"])
        classes = len(data.class_names)
        model = training.new_model(classes, settings["patch"], settings["depth"], settings["width"])
        what = f"{name}, {classes} classes, ViT {settings['depth']}x{settings['width']}/{settings['patch']}"
        return training.new_run(model, data, recipe, what, name), False
    base = models.entry(model_name)
    params = sum(p.numel() for p in base.model.parameters())
    big = params > training.MAX_FULL_FINETUNE_PARAMS
    if big and not freeze_backbone:
        raise user_error(f"Fine-tuning all {params:,} parameters of {model_name} would take hours on this CPU: "
                         f"tick 'Freeze the backbone' to train only the head.")
    # A frozen big backbone computes every image's features once, before the first step, and
    # that cannot be stopped: keep it short.
    data, name = training.load_training_data(
        source, zip_file, settings["per_class"], Preprocessing.for_checkpoint(base.meta),
        base.model.config.image_size[0], max_images=training.MAX_BIG_FINETUNE_IMAGES if big else 1_000_000)
    model = training.finetune_model(base, len(data.class_names))
    parent = model_name.split(":")[0] if model_name.startswith("Run ") else model_name.split(" (")[0]
    what = (f"{name}, {len(data.class_names)} classes, fine-tuned from {parent}"
            + (" (head only)" if freeze_backbone else ""))
    return training.new_run(model, data, recipe, what, name), freeze_backbone


def _status(run: Run, event: Any, steps_after: int = 0) -> str:
    """The status line: the step or epoch, the latest validation accuracy, and the time left for
    everything the button started (`steps_after`: the steps of the runs after this one)."""
    eta = training.eta_seconds(run, steps_after)
    left = f", about {training.duration(eta)} left" if eta is not None else ""
    left += " in all" if steps_after and left else ""
    val = f", validation accuracy **{run.last_val[1]:.1%}**" if run.last_val is not None else ""
    who = run.label.capitalize()
    if isinstance(event, EpochEvent):
        return (f"{who}**Epoch {event.epoch}/{event.epochs} done** in {training.duration(event.seconds)}: train "
                f"accuracy {event.train_acc:.1%}{val}{left}")
    epoch = min(run.recipe.epochs, run.steps * run.recipe.epochs // max(run.total_steps, 1) + 1)
    return (f"{who}**Step {run.steps}/{run.total_steps}** (epoch {epoch}/{run.recipe.epochs}){val}{left}")


def _steps_after(runs: list[Run], run: Run) -> int:
    return sum(later.total_steps for later in runs[runs.index(run) + 1:])


def _curves(rows: dict[str, list]) -> tuple[Any, Any]:
    return training.frame(rows["loss"]), training.frame(rows["acc"])


def _drive(runs: list[Run], rows: dict[str, list], freeze: bool = False) -> Iterator[tuple[Any, Any, str]]:
    """Train `runs` in turn (in the background: `training.Trainer`), recording their curves in
    `rows` and yielding (loss, accuracy, status) as they go, and at least every `POLL_SECONDS`:
    Gradio can only cancel this generator (Stop) when it yields. Each run is saved and registered
    when it ends, Stop included: closing this generator stops the runs and returns at once."""
    trainer = training.Trainer(runs, freeze)
    frames, status = None, "Measuring the model before training..."
    try:
        while not trainer.ended:
            for run, item in trainer.updates(POLL_SECONDS):
                if isinstance(item, training.Failed):
                    raise user_error(item.message)
                if isinstance(item, training.Start):
                    run.last_val = (item.val_loss, item.val_acc)
                    rows["loss"] += [(0, item.train_loss, f"{run.label}train"), (0, item.val_loss, f"{run.label}validation")]
                    rows["acc"] += [(0, 100 * item.train_acc, f"{run.label}train"),
                                    (0, 100 * item.val_acc, f"{run.label}validation")]
                    if run is runs[-1]:
                        status = (f"Step 0: validation accuracy **{runs[0].last_val[1]:.1%}** before training "
                                  f"(chance: {1 / len(runs[0].class_names):.0%}); training...")
                elif isinstance(item, StepEvent):
                    rows["loss"].append((item.step, item.loss, f"{run.label}train"))
                    rows["acc"].append((item.step, 100 * item.acc, f"{run.label}train"))
                    status = _status(run, item, _steps_after(runs, run))
                elif isinstance(item, ValidationEvent | EpochEvent) and run.last_val is not None:
                    step = item.step if isinstance(item, ValidationEvent) else run.steps
                    rows["loss"].append((step, run.last_val[0], f"{run.label}validation"))
                    rows["acc"].append((step, 100 * run.last_val[1], f"{run.label}validation"))
                    status = _status(run, item, _steps_after(runs, run))
                frames = None  # new points: draw them
            # The plot takes its legend and colours from the series of its first frame, so no
            # frame is drawn before every run's step 0 is in.
            if frames is None and len(rows["loss"]) >= 2 * len(runs):
                frames = _curves(rows)
            # After Stop (`request_stop`) the frames this yields until Gradio cancels it say so too.
            yield (*(frames or (None, None)), STOPPING if any(run.stop.is_set() for run in runs) else status)
    finally:
        trainer.stop()  # a no-op once every run has ended; on Stop the thread saves the run, not Gradio's loop


def _start(session: str, runs: list[Run]) -> None:
    _ACTIVE[session] = runs
    if len(_ACTIVE) > 64:  # forget finished runs of old sessions
        for key in [k for k, r in _ACTIVE.items() if all(x.finished.is_set() for x in r) and k != session]:
            _ACTIVE.pop(key, None)


def _failed_start(err: Exception) -> str:
    if isinstance(err, gr.Error):
        return err.message
    if isinstance(err, (DataError, ModelUnavailable, ValueError)):
        return str(err)
    log.exception("could not prepare a run")
    return f"Could not start training ({type(err).__name__}); the server log has the details."


def train_run(source: str = SRC_SYNTHETIC, zip_file: Any = None, per_class: int = 4000, patch: int = 8,
              depth: int = 4, width: int = 96, epochs: int = 5, lr: float = 3e-3, batch_size: int = 128,
              finetune: bool = False, freeze_backbone: bool = False, model_name: str = SHIPPED,
              request: gr.Request = None) -> Iterator[tuple[Any, Any, str, Any, Any]]:
    """Train and stream the curves: yields (loss DataFrame, accuracy DataFrame, status Markdown,
    the run's name in the model picker, checkpoint file). The finished model, or the model as it
    is when the generator is closed (Stop), becomes a selectable model and its checkpoint a
    download; the picked model does not change (the tab's "Use this model" button picks it)."""
    empty = None  # no plot until the first frame, which holds every series (see _drive)
    yield empty, empty, "Loading the data...", gr.skip(), None
    try:
        run, freeze = _prepare(source, zip_file, _settings(per_class, patch, depth, width, epochs, lr, batch_size),
                               bool(finetune), bool(freeze_backbone), model_name)
    except Exception as err:  # noqa: BLE001 - every failure to start is said in the status line too
        message = for_users(_failed_start(err))
        yield empty, empty, f"**Not started:** {message}", gr.skip(), None
        raise user_error(message) from None
    _start(_session(request), [run])
    frozen = (" First the frozen backbone computes every image's features once (this part cannot be stopped)."
              if freeze else "")
    yield empty, empty, (f"Training {run.description} on {len(run.train_data)} images ({len(run.val_data)} for "
                         f"validation), {run.total_steps} steps...{frozen}"), gr.skip(), None
    rows: dict[str, list] = {"loss": [], "acc": []}
    try:
        for loss, acc, status in _drive([run], rows, freeze):
            yield loss, acc, status, gr.skip(), gr.skip()
    except gr.Error as err:
        yield (*_curves(rows), f"**Training failed:** {err.message}", gr.skip(), None)
        raise
    yield (*_curves(rows), run.message, run.name or gr.skip(), str(run.checkpoint) if run.checkpoint else None)


def compare_run(source: str = SRC_SYNTHETIC, zip_file: Any = None, model_name: str = SHIPPED,
                request: gr.Request = None) -> Iterator[tuple[Any, Any, str, Any, Any]]:
    """The same small data (`COMPARE_PER_CLASS` images per class) trained twice with the same
    recipe and steps: a new model of the picked model's architecture from scratch, then the picked
    model fine-tuned. Both validation curves share one plot, so the effect of pre-training shows."""
    empty = None  # no plot until the first frame, which holds every series (see _drive)
    yield empty, empty, "Loading the data...", gr.skip(), None
    try:
        base = models.entry(model_name)
        if sum(p.numel() for p in base.model.parameters()) > training.MAX_FULL_FINETUNE_PARAMS:
            raise user_error(f"{model_name} is too large to train twice on this CPU; pick the shipped model "
                             f"or a model trained here.")
        # Both on the same pixels, the picked model's crop and normalisation: only the start differs.
        data, name = training.load_training_data(source, zip_file, COMPARE_PER_CLASS,
                                                 Preprocessing.for_checkpoint(base.meta),
                                                 base.model.config.image_size[0], val_share=COMPARE_VAL_SHARE)
        classes = len(data.class_names)
        recipe = training.recipe_for(COMPARE_EPOCHS, 1e-3, 32)
        tuned = training.finetune_model(base, classes)
        with training.fixed_seed():
            scratch = VisionTransformer(base.model.config.replace(num_classes=classes))
        label = f"{name}, {classes} classes, {COMPARE_PER_CLASS} images each"
        runs = [training.new_run(scratch, data, recipe, f"{label}, {SCRATCH}", name, f"{SCRATCH}: "),
                training.new_run(tuned, data, recipe, f"{label}, {FINETUNED}", name, f"{FINETUNED}: ")]
    except Exception as err:  # noqa: BLE001
        message = for_users(_failed_start(err))
        yield empty, empty, f"**Not started:** {message}", gr.skip(), None
        raise user_error(message) from None
    _start(_session(request), runs)
    rows: dict[str, list] = {"loss": [], "acc": []}
    try:
        for loss, acc, status in _drive(runs, rows):
            yield loss, acc, status, gr.skip(), gr.skip()
    except gr.Error as err:
        yield (*_curves(rows), f"**Training failed:** {err.message}", gr.skip(), None)
        raise
    finals = [f"{run.label}**{models.pct(run.last_val[1]) if run.last_val else 'n/a'}**" for run in runs]
    text = (f"**Done**: validation accuracy after {runs[0].total_steps} steps on the same images, "
            f"{' vs '.join(finals)}. Pre-training is what lets a ViT learn from little data (the paper's "
            f"central finding). Both models are in the model picker.")
    yield (*_curves(rows), text, runs[-1].name or gr.skip(), str(runs[-1].checkpoint) if runs[-1].checkpoint else None)


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


def request_stop(request: gr.Request = None) -> Any:
    """Stop, answered at once (outside the queue): the session's runs stop between two steps and
    the status says so, while the run is saved (`after_stop` then shows it)."""
    runs = [run for run in _ACTIVE.get(_session(request), []) if not run.finished.is_set()]
    for run in runs:
        run.stop.set()
    return STOPPING if runs else gr.skip()


def after_stop(request: gr.Request = None, timeout: float = 60.0) -> tuple[str, Any, Any]:
    """After Stop: wait for the cancelled run to be saved, then show it (status, its name in the
    picker, file)."""
    runs = _ACTIVE.get(_session(request))
    if not runs:
        return gr.skip(), gr.skip(), gr.skip()
    deadline = time.monotonic() + timeout
    for run in runs:
        if not run.finished.wait(max(0.0, deadline - time.monotonic())):
            return STOPPING, gr.skip(), gr.skip()
    saved = [run for run in runs if run.name]
    if not saved:
        return "Stopped before the first step; nothing was trained.", gr.skip(), None
    last = saved[-1]
    return last.message, last.name, str(last.checkpoint) if last.checkpoint else None


def source_defaults(source: str) -> tuple[Any, ...]:
    """The tab's inputs set to `source`'s defaults."""
    d = DEFAULTS.get(source, DEFAULTS[SRC_SYNTHETIC])
    return (gr.update(value=d["per_class"]), gr.update(value=d["patch"]), gr.update(value=d["depth"]),
            gr.update(value=d["width"]), gr.update(value=d["epochs"]), gr.update(value=d["lr"]),
            gr.update(value=d["batch"]))


def create_ui() -> dict[str, Any]:
    d = DEFAULTS[SRC_SYNTHETIC]
    gr.Markdown("Train a small ViT from scratch on 32 px images, or fine-tune the selected model on new classes. "
                "The curves update live: the light line is the training batches, the dark one held-out "
                "validation images. **Stop** keeps the model as it is.")
    with gr.Row():
        with gr.Column():
            source = gr.Radio(list(SOURCES), value=SRC_SYNTHETIC, label="Data")
            zip_in = gr.File(file_types=[".zip"], type="filepath",
                             label="Zip of class folders (zip/<class>/<image>), for 'Uploaded .zip'")
            per_class = numeric_slider(*SLIDER_RANGES["per_class"][:2], value=d["per_class"], step=10,
                                       label="Images per class (at most)")
            finetune = gr.Checkbox(False, label="Fine-tune the selected model (new head for these classes)")
            freeze = gr.Checkbox(False, label="Freeze the backbone (train only the head)")
        with gr.Column():
            with gr.Row():
                patch = choice(gr.Radio(list(PATCHES), value=d["patch"], label="Patch size P (new model)"),
                               "The patch size")
                width = gr.Dropdown(list(WIDTHS), value=d["width"], label="Width D (new model; heads of 32)")
            depth = numeric_slider(*SLIDER_RANGES["depth"][:2], value=d["depth"], step=1, label="Layers (new model)")
            epochs = numeric_slider(*SLIDER_RANGES["epochs"][:2], value=d["epochs"], step=1, label="Epochs")
            lr = gr.Number(d["lr"], label=f"Learning rate (AdamW, warm-up then cosine; {LR_RANGE[0]:g} to "
                                          f"{LR_RANGE[1]:g})")
            batch = choice(gr.Radio(list(BATCH_SIZES), value=d["batch"], label="Batch size"), "The batch size")
    with gr.Row():
        start = gr.Button("Start training", variant="primary")
        compare = gr.Button("Compare: from scratch vs fine-tuned (small data)", variant="secondary")
        stop = gr.Button("Stop", variant="stop")
    status = gr.Markdown("Ready.", elem_classes="status-line")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="value", color="series", title="Loss", x_title="step", y_title="loss",
                                color_map=COLORS, height=300, min_width=320)
        acc_plot = gr.LinePlot(x="step", y="value", color="series", title="Accuracy (%)", x_title="step",
                               y_title="accuracy (%)", y_lim=[0, 100], color_map=COLORS, height=300, min_width=320)
    use = gr.Button("Use this model", variant="primary", visible=False)
    checkpoint = gr.File(label="Checkpoint of the last run (model.safetensors)", interactive=False)
    # The run's name, for the button and for API callers (a State would not be in the API's answer).
    run_name = gr.Textbox(visible=False, label="The run's name in the model picker")
    return {"use": use, "run": run_name,"source": source, "zip": zip_in, "per_class": per_class, "patch": patch, "width": width,
            "depth": depth, "epochs": epochs, "lr": lr, "batch": batch, "finetune": finetune, "freeze": freeze,
            "start": start, "compare": compare, "stop": stop, "status": status, "loss": loss_plot,
            "acc": acc_plot, "checkpoint": checkpoint}


def use_button(name: str | None) -> Any:
    """The "Use this model" button for the run just trained (hidden before the first)."""
    if not name:
        return gr.skip()
    return gr.update(value=f"Use this model in every tab: {name}", visible=True)


def use_model(name: str | None) -> Any:
    """The picker set to the run just trained, when the user asks for it."""
    if not name or name not in models.MODELS.choices():
        raise user_error("That run is no longer in the model picker (the oldest runs make way for new ones).")
    return models.picker_update(name)


def wire(ui: dict[str, Any], picker: gr.Dropdown) -> Any:
    """The tab's events. A finished or stopped run joins the picker's choices, but the picked model
    changes only when the user picks: with the picker, or this tab's "Use this model" button, whose
    event this returns (the app redraws every tab after it)."""
    settings = [ui[k] for k in ("per_class", "patch", "depth", "width", "epochs", "lr", "batch")]
    ui["source"].input(source_defaults, ui["source"], settings, **HIDDEN)
    for key, (lo, hi, name) in SLIDER_RANGES.items():  # a typed number the slider clamps is said at once
        ui[key].release(warn_out_of_range(lo, hi, name), ui[key], None, concurrency_limit=4, concurrency_id="checks",
                        **HIDDEN)
    outputs = [ui["loss"], ui["acc"], ui["status"], ui["run"], ui["checkpoint"]]
    queue = {"concurrency_limit": 1, "concurrency_id": "train", "show_progress_on": [ui["status"]]}
    inputs = [ui["source"], ui["zip"], *settings, ui["finetune"], ui["freeze"], picker]
    train_event = ui["start"].click(train_run, inputs, outputs, api_name="train", **queue)
    compare_event = ui["compare"].click(compare_run, [ui["source"], ui["zip"], picker], outputs,
                                        api_name="compare", **queue)
    # Outside the queue, so that Stop is answered at once however busy the server is.
    stopped = ui["stop"].click(request_stop, None, ui["status"], cancels=[train_event, compare_event], queue=False,
                               api_name="stop", **HIDDEN).then(after_stop, None, [ui["status"], ui["run"], ui["checkpoint"]],
                                                               **HIDDEN)
    for event in (train_event, compare_event, stopped):
        # New choices, the same pick (`refresh_picker` keeps the current model while it is in the store).
        event.then(models.refresh_picker, picker, picker, **HIDDEN).then(use_button, ui["run"], ui["use"], **HIDDEN)
    return ui["use"].click(use_model, ui["run"], picker, api_name="use_trained_model", **HIDDEN)
