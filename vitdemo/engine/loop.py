"""The training loop, `train`: set up, resume, then per epoch train, validate, save, and tell.

Each piece is a function of its own: `set_up` (vitdemo.engine.run) builds the `Run`, `load_state`
and `save_epoch` (vitdemo.engine.state) read and write out_dir, `one_epoch` takes the epoch's
optimiser steps, `validate` measures its weights.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..augment import soft_cross_entropy
from ..data import ImageData, Preprocessing, iterate_batches
from ..model import VisionTransformer
from . import budget
from .batches import AUGMENT_AHEAD, augmented, epoch_streams
from .devices import all_sum, autocast
from .evaluation import evaluate
from .events import DoneEvent, EpochEvent, PlanEvent, StepEvent, TrainingError, ValidationEvent
from .recipes import Recipe
from .run import Run, reschedule, set_up
from .state import checkpoint_paths, load_state, save_epoch, saved_budget

Event = PlanEvent | StepEvent | ValidationEvent | EpochEvent | DoneEvent


def train(
    model: VisionTransformer,
    train_data: ImageData,
    val_data: ImageData | None,
    recipe: Recipe,
    *,
    preprocess: Preprocessing,
    out_dir: str | Path | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    resume: bool = False,
    freeze_backbone: bool = False,
    log_every: int = 20,
    should_stop: Callable[[], bool] | None = None,
    metadata: dict[str, Any] | None = None,
    val_every: int | None = None,
    compile: str | None = None,
    precision: str = "auto",
    time_budget: float | None = None,
    max_epochs: int | None = None,
    teacher: nn.Module | None = None,
) -> Iterator[Event]:
    """Train `model` on `train_data`, validating on `val_data` after every epoch.

    With `out_dir`, every epoch atomically writes `model.safetensors` (weights and metadata,
    see `vitdemo.checkpoint`) and `train_state.pt` (optimiser, schedule, epoch, history), and
    `resume=True` continues from them. With the recipe's `ema_decay`, the moving average of the
    weights is validated every epoch too and written as its own checkpoint in `out_dir/ema/`.
    The checkpoints carry no out-of-distribution statistics: the caller fits them on the
    finished weights (`vitdemo.ood.fit`; the command line's `train` and the app's Train tab do).
    `preprocess` is the model's `Preprocessing`: the data must be at its crop, it gives the
    normalisation, and it is stored with the model, as is `metadata` (any JSON-able facts, e.g. the data source). With
    `freeze_backbone`, only the head is trained, on class-token features computed once. Yields
    `StepEvent`s every `log_every` steps, a `ValidationEvent` every `val_every` steps inside an
    epoch (if given), an `EpochEvent` per epoch and a final `DoneEvent`.

    `compile` ("default", "reduce-overhead": also CUDA graphs, or "max-autotune") compiles the
    training step's forward and backward with `torch.compile`: a slower start for faster steps,
    worth it on a GPU, where a small ViT's eager step is bound by kernel launches.

    `precision` ("auto", "fp32" or "bf16", see `resolve_precision`) is the training step's
    arithmetic; weights, optimiser state and validation stay fp32 on a CPU. A run resumes only
    with the precision it started with, so that its history stays one computation.

    `time_budget` (seconds, counted from this call) replaces the recipe's epoch count: the run
    measures its pace on its first steps, undoes them, and trains as many epochs as fit, at most
    `max_epochs` (see vitdemo.engine.budget); a `PlanEvent` says what it chose and why. A resumed
    budgeted run keeps the plan it started with.

    `teacher` (a `vitdemo.teacher.ConvTeacher`, trained on the same training images at the same
    crop and normalisation) labels every augmented batch for the recipe's `distillation`.
    """
    run_start = time.perf_counter()  # the budget's clock
    out_dir = Path(out_dir) if out_dir is not None else None
    planned = None
    if time_budget is not None:
        if not time_budget > 0:
            raise ValueError(f"the time budget must be a positive number of seconds, got {time_budget!r}")
        if resume:
            planned = saved_budget(out_dir, time_budget)
            recipe = recipe.replace(epochs=planned.epochs)
    run = set_up(model, train_data, val_data, recipe, preprocess, seed=seed, device=device,
                 freeze_backbone=freeze_backbone, compile=compile, precision=precision, teacher=teacher)
    run.budget = planned
    first_epoch = load_state(out_dir, run) if resume else 0
    checkpoint, ema_checkpoint = checkpoint_paths(out_dir, run)
    if time_budget is not None and not resume:
        def save_scratch(folder: Path) -> None:
            figures = {name: 0.0 for name in ("train_loss", "train_acc", "val_loss", "val_acc", "ema_val_loss",
                                               "ema_val_acc")}
            save_epoch(folder, run, 1, figures, train_data.class_names, preprocess, metadata)

        pace = budget.measure(run, lambda: _measured_steps(run), validate,
                              save_scratch if out_dir is not None and run.rank == 0 else None, time_budget)
        run.budget = budget.plan(time_budget, time.perf_counter() - run_start, run.steps_per_epoch, *pace,
                                 max_epochs=max_epochs)
        recipe = recipe.replace(epochs=run.budget.epochs)
        reschedule(run, recipe)
        yield PlanEvent(run.budget)
    stopped = False
    for epoch in range(first_epoch, recipe.epochs):
        epoch_start = time.perf_counter()
        trained = yield from one_epoch(run, epoch, log_every, val_every, should_stop)
        if trained is None:  # should_stop() said so, between two steps
            stopped = True
            break
        figures = {**trained, **validate(run)}
        record(run, figures)
        if out_dir is not None and run.rank == 0:
            save_epoch(out_dir, run, epoch + 1, figures, train_data.class_names, preprocess, metadata)
        if run.world > 1:
            dist.barrier()  # no rank starts the next epoch before the checkpoint is written
        yield EpochEvent(epoch + 1, recipe.epochs, seconds=time.perf_counter() - epoch_start, checkpoint=checkpoint,
                         **figures)

    # No epoch completed (in this run or the one resumed): no checkpoint was written, name none.
    if not run.history["train_loss"]:
        checkpoint = ema_checkpoint = None
    yield DoneEvent(run.history, stopped, time.perf_counter() - run_start, checkpoint, ema_checkpoint, run.budget)


def one_epoch(run: Run, epoch: int, log_every: int, val_every: int | None, should_stop: Callable[[], bool] | None,
              ) -> Generator[StepEvent | ValidationEvent, None, dict[str, float] | None]:
    """Take the epoch's optimiser steps (`epoch` 0-based), yielding its StepEvents and
    ValidationEvents. Returns its training loss and accuracy over all ranks, or None when
    `should_stop()` stopped it."""
    recipe, device = run.recipe, run.device
    batches, mix_rng = epoch_batches(run, epoch)
    run.step_net.train()
    sums = [0.0, 0.0, 0.0]  # loss * n, correct, n for the epoch
    window = [0.0, 0.0, 0.0, time.perf_counter()]  # the same since the last StepEvent
    pending: list[tuple[Tensor, Tensor, int]] = []  # (loss, correct, n) of steps not yet read back
    for x, y in batches:
        if should_stop is not None and should_stop():
            return None
        pending.append(optimizer_step(run, x, y, mix_rng))
        run.step += 1
        lr = run.scheduler.get_last_lr()[0]
        log_now = run.step % log_every == 0 or run.step == run.total_steps
        # Reading a value back waits for the GPU; a small ViT's step is bound by kernel launches,
        # so on a GPU the values are read once per log interval, letting the CPU queue steps ahead.
        if log_now or device.type != "cuda":
            _read_back(pending, run.step, epoch, lr, (sums, window))
        if log_now:
            now = time.perf_counter()
            rate = window[2] * run.world / max(now - window[3], 1e-9)
            remaining = (run.total_steps - run.step) * recipe.batch_size * run.world / max(rate, 1e-9)
            yield StepEvent(epoch + 1, run.step, run.total_steps, window[0] / window[2], window[1] / window[2],
                            lr, rate, remaining)
            window = [0.0, 0.0, 0.0, time.perf_counter()]
        if val_every and run.step % val_every == 0 and run.step % run.steps_per_epoch and run.val_inputs is not None:
            val_loss, val_acc = evaluated(run, run.base)
            run.step_net.train()
            yield ValidationEvent(epoch + 1, run.step, val_loss, val_acc)
    _read_back(pending, run.step, epoch, run.scheduler.get_last_lr()[0], (sums, window))
    loss_sum, correct, count = all_sum(sums, device)
    return {"train_loss": loss_sum / max(count, 1), "train_acc": correct / max(count, 1)}


def epoch_batches(run: Run, epoch: int) -> tuple[Iterable[tuple[Tensor, Tensor]], Any]:
    """The (augmented) batches of `epoch` (0-based), in its order, and its mixing stream."""
    order, augment_generator, host_generator, mix_rng = epoch_streams(run.seed, epoch, run.rank, run.device)
    batches = iterate_batches(run.train_inputs, run.recipe.batch_size, shuffle=True, generator=order, rank=run.rank,
                              world_size=run.world, repeats=1 if run.freeze_backbone else run.recipe.repeats)
    if run.augment is not None:
        batches = augmented(batches, run.augment, run.device, augment_generator, host_generator,
                            ahead=AUGMENT_AHEAD if run.device.type == "cuda" else 1)
    return batches, mix_rng


def _measured_steps(run: Run) -> Iterator[int]:
    """Optimiser steps as an epoch takes them, over the first epochs' batches again and again, for
    the time budget to time (and undo); yields the number taken so far."""
    run.step_net.train()
    taken = 0
    for epoch in itertools.count():
        batches, mix_rng = epoch_batches(run, epoch)
        for x, y in batches:
            loss, _, _ = optimizer_step(run, x, y, mix_rng)
            if run.device.type != "cuda":
                loss.item()  # as one_epoch reads every step's loss back on a CPU
            taken += 1
            yield taken


def optimizer_step(run: Run, x: Tensor, y: Tensor, mix_rng) -> tuple[Tensor, Tensor, int]:
    """One step on a batch: forward (on mixed images if the recipe mixes), backward, clipping,
    the update, the schedule and the moving average. Returns (loss, correct, n), not read back."""
    recipe = run.recipe
    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)  # no-op once augmented
    targets = None
    if run.mixer is not None:
        x, targets = run.mixer(x, y, mix_rng)
    with autocast(run.device, run.precision), run.kernels:
        logits = run.step_net(x).float()
        if run.teacher is not None:
            with torch.no_grad():  # the teacher's label of the very view the student sees, mixed or not
                taught = run.teacher(x.contiguous(memory_format=torch.channels_last)).argmax(1)
    if targets is None:
        loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
    else:  # mixed images: soft targets, label smoothing already in them
        loss = soft_cross_entropy(logits, targets)
    if run.teacher is not None:  # DeiT's hard distillation, through the class token's one head
        loss = (1 - recipe.distillation) * loss + recipe.distillation * F.cross_entropy(logits, taught)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if recipe.grad_clip:
        nn.utils.clip_grad_norm_(run.net.parameters(), recipe.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update()
    # Training accuracy counts the label of each image as drawn (the first of a mixed pair).
    return loss.detach(), (logits.argmax(1) == y).sum(), len(y)


def evaluated(run: Run, model: nn.Module) -> tuple[float, float]:
    """`model`'s validation loss and accuracy (its head's on features, for a head-only run)."""
    with run.kernels:
        loss, acc, _ = evaluate(model.head if run.freeze_backbone else model, run.val_inputs,
                                run.preprocess.mean, run.preprocess.std, device=run.device,
                                inputs_are_features=run.freeze_backbone)
    return loss, acc


def validate(run: Run) -> dict[str, float | None]:
    """The epoch's validation figures, the moving average's too; None without validation data.
    The unwrapped module: under DDP each rank evaluates its own share, without collectives."""
    val_loss = val_acc = ema_loss = ema_acc = None
    if run.val_inputs is not None and len(run.val_inputs):
        val_loss, val_acc = evaluated(run, run.base)
        if run.ema is not None:
            ema_loss, ema_acc = evaluated(run, run.ema.module)
    return {"val_loss": val_loss, "val_acc": val_acc, "ema_val_loss": ema_loss, "ema_val_acc": ema_acc}


def record(run: Run, figures: dict[str, float | None]) -> None:
    """Append the epoch's figures and last learning rate to the run's history."""
    for key, name in (("train_loss", "train_loss"), ("train_acc", "train_acc"), ("test_loss", "val_loss"),
                      ("test_acc", "val_acc")):
        run.history[key].append(figures[name])
    run.history["lr"].append(run.scheduler.get_last_lr()[0])
    if run.ema is not None:
        run.history["ema_val_loss"].append(figures["ema_val_loss"])
        run.history["ema_val_acc"].append(figures["ema_val_acc"])


def _read_back(pending: list[tuple[Tensor, Tensor, int]], step: int, epoch: int, lr: float,
               totals: tuple[list[float], ...]) -> None:
    """Add the pending steps' (loss * n, correct, n) to each of `totals`, in one transfer, and
    empty `pending`. Raises TrainingError naming the first step whose loss was not finite."""
    if not pending:
        return
    values = torch.stack([loss for loss, _, _ in pending] + [c.to(pending[0][0].dtype) for _, c, _ in pending]).tolist()
    losses, corrects = values[:len(pending)], values[len(pending):]
    first = step - len(pending) + 1
    for i, (loss_value, correct, (_, _, n)) in enumerate(zip(losses, corrects, pending)):
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"the loss became {loss_value} at step {first + i} (epoch {epoch + 1}, lr {lr:.3g}); "
                f"training stopped. Lower the learning rate or check the data; the last epoch's "
                f"checkpoint is intact"
            )
        for acc in totals:
            acc[0] += loss_value * n
            acc[1] += correct
            acc[2] += n
    pending.clear()
