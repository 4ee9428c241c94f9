"""What `train` yields, in order: a `PlanEvent` when a time budget chose the epochs, `StepEvent`s
every few steps, `ValidationEvent`s inside an epoch when asked, an `EpochEvent` per epoch and one final `DoneEvent`; and the error it raises."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .budget import BudgetPlan


@dataclass
class PlanEvent:
    """The epochs a time budget chose, before the first epoch (see vitdemo.engine.budget)."""

    plan: BudgetPlan
    kind: str = "plan"


@dataclass
class StepEvent:
    epoch: int
    step: int  # optimiser steps done so far, over the whole run
    total_steps: int
    loss: float  # mean over the steps since the last StepEvent
    acc: float
    lr: float
    images_per_sec: float
    eta_seconds: float
    kind: str = "step"


@dataclass
class EpochEvent:
    epoch: int  # 1-based: epochs completed
    epochs: int
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    seconds: float
    checkpoint: Path | None
    ema_val_loss: float | None = None  # the moving average's, when the recipe keeps one
    ema_val_acc: float | None = None
    kind: str = "epoch"


@dataclass
class ValidationEvent:
    """Validation inside an epoch (every `val_every` steps), so a long epoch still draws a curve."""

    epoch: int  # 1-based: the epoch under way
    step: int
    val_loss: float
    val_acc: float
    kind: str = "validation"


@dataclass
class DoneEvent:
    history: dict[str, list[float]]
    stopped: bool  # True when stopped before the last epoch
    seconds: float
    checkpoint: Path | None  # the last epoch's; None without out_dir or when no epoch was completed
    ema_checkpoint: Path | None = None  # the moving average's beside it, when the recipe keeps one
    budget: BudgetPlan | None = None  # what a time budget chose, if one did
    kind: str = "done"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, incompatible resume state)."""
