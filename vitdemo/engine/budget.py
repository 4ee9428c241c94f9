"""A time budget instead of an epoch count: the run measures its own pace on its first steps,
then chooses how many epochs (each with its validation and checkpoint) fit in the time left.

The measured steps are taken and then undone: weights, optimiser, moving average and step are
put back as they were, and every epoch draws its randomness from (seed, epoch, rank) alone
(vitdemo.engine.batches), so a budgeted run that chose E epochs trains exactly as a run of
`epochs=E` does. Its warm-up and cosine decay to zero span those E epochs: the schedule
completes. The plan is saved in train_state.pt and in the checkpoints, and a resumed run keeps it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .run import Run

MARGIN = 0.03  # of the budget, kept free for what a measurement of a few seconds cannot foresee
WARM_STEPS = 5  # steps run before the clock starts: the first ones allocate, and compile when asked
MEASURE_SHARE, MEASURE_MIN, MEASURE_MAX = 0.04, 1.0, 15.0  # seconds of steps timed: 4% of the budget, in bounds
VALIDATION_SAMPLE = 512  # validation images timed, scaled to the whole split


@dataclass(frozen=True)
class BudgetPlan:
    """The epochs a time budget chose, and the measurements it chose them by (seconds)."""

    budget: float
    epochs: int
    step: float  # one optimiser step, augmentation included
    steps_per_epoch: int
    validation: float  # one epoch's validation (of the moving average too, when kept)
    checkpoint: float  # one epoch's checkpoint files
    spent: float  # before the first epoch: set-up and this measurement
    max_epochs: int | None = None  # a cap asked for beside the budget

    @property
    def epoch(self) -> float:
        return self.steps_per_epoch * self.step + self.validation + self.checkpoint

    @property
    def reason(self) -> str:
        left = self.budget * (1 - MARGIN) - self.spent
        fits = max(0, math.floor(left / self.epoch))
        why = (f"time budget {self.budget:g} s: {self.spent:.1f} s for set-up and measuring the pace, then per epoch "
               f"{self.steps_per_epoch} steps of {self.step * 1e3:.1f} ms, {self.validation:.2f} s validating and "
               f"{self.checkpoint:.2f} s saving = {self.epoch:.2f} s; {fits} epoch(s) fit in the "
               f"{max(left, 0):.1f} s left ({MARGIN:.0%} kept free)")
        if fits < 1:
            return why + "; one epoch is the least a run trains, so it will overrun its budget"
        if self.max_epochs is not None and self.max_epochs < fits:
            return why + f"; capped at {self.max_epochs} (epochs asked for)"
        return why

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "reason": self.reason}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "BudgetPlan":
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


def plan(budget: float, spent: float, steps_per_epoch: int, step: float, validation: float, checkpoint: float,
         max_epochs: int | None = None) -> BudgetPlan:
    """The plan: as many whole epochs as fit in what is left of `budget` after `spent`, less the
    margin; at least one, at most `max_epochs`."""
    draft = BudgetPlan(budget, 1, step, steps_per_epoch, validation, checkpoint, spent, max_epochs)
    fits = math.floor((budget * (1 - MARGIN) - spent) / draft.epoch)
    epochs = max(1, min(fits, max_epochs) if max_epochs is not None else fits)
    return dataclasses.replace(draft, epochs=epochs)


def measure(run: Run, take_steps: Callable[[], Any], validate: Callable[[Run], Any],
            save: Callable[[Path], None] | None, budget: float) -> tuple[float, float, float]:
    """(seconds per step, per epoch's validation, per epoch's checkpoint), measured on this run and
    then undone. `take_steps()` yields once per optimiser step it takes (from the first epoch's
    batches, again and again); `save(folder)` writes one epoch's files into a scratch folder."""
    saved = _snapshot(run)
    seconds = min(max(MEASURE_SHARE * budget, MEASURE_MIN), MEASURE_MAX)
    began = time.perf_counter()
    steps, warm, start = 0, None, None
    for taken in take_steps():
        steps = taken
        # The clock starts after the warm steps, or sooner where steps are slow against the budget
        # (warming must not spend it): after one step once a tenth of the budget is gone.
        if warm is None and (steps == WARM_STEPS or _all_agree(run, time.perf_counter() - began > 0.1 * budget)):
            _synchronize(run)
            warm, start = steps, time.perf_counter()
        elif warm is not None and _all_agree(run, time.perf_counter() - start >= seconds):
            break
    _synchronize(run)
    step = (time.perf_counter() - start) / (steps - warm)

    validation = 0.0
    if run.val_inputs is not None and len(run.val_inputs):
        whole = run.val_inputs
        run.val_inputs = _first(whole, 8)
        validate(run)  # once on a few images first: a first pass allocates what later ones reuse
        run.val_inputs = _first(whole, VALIDATION_SAMPLE)
        timed = []
        for _ in range(2):  # the faster of two: one pass can catch a pause of the machine's
            begin = time.perf_counter()
            validate(run)
            timed.append(time.perf_counter() - begin)
        validation = min(timed) * len(whole) / len(run.val_inputs)
        run.val_inputs = whole
    checkpoint = 0.0
    if save is not None:
        with tempfile.TemporaryDirectory(prefix=".budget-") as scratch:
            begin = time.perf_counter()
            save(Path(scratch))
            checkpoint = time.perf_counter() - begin
    _restore(run, saved)
    if run.world > 1:  # every rank must choose the same epochs: the slowest rank's pace decides
        figures = torch.tensor([step, validation, checkpoint], dtype=torch.float64, device=run.device)
        dist.all_reduce(figures, op=dist.ReduceOp.MAX)
        step, validation, checkpoint = figures.tolist()
    return step, validation, checkpoint


def _snapshot(run: Run) -> dict[str, Any]:
    return {"model": copy.deepcopy(run.base.state_dict()), "optimizer": copy.deepcopy(run.optimizer.state_dict()),
            "scheduler": run.scheduler.state_dict(), "ema": copy.deepcopy(run.ema.state_dict()) if run.ema else None,
            "step": run.step}


def _restore(run: Run, saved: dict[str, Any]) -> None:
    """Undo the measured steps: the parameters are copied into in place, so a compiled step and
    the optimiser keep pointing at them."""
    run.base.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])  # its state too: empty, as a fresh optimiser's
    run.scheduler.load_state_dict(saved["scheduler"])
    if run.ema is not None:
        run.ema.load_state_dict(saved["ema"])
    run.step = saved["step"]


def _first(data, n: int):
    """The first `n` items of images or features."""
    field = "features" if hasattr(data, "features") else "images"
    return dataclasses.replace(data, **{field: getattr(data, field)[:n], "labels": data.labels[:n]})


def _synchronize(run: Run) -> None:
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)


def _all_agree(run: Run, done: bool) -> bool:
    """`done` on every rank at once: the ranks of a distributed run must take the same steps."""
    if run.world == 1:
        return done
    flag = torch.tensor([float(done)], device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
