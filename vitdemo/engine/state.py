"""What a run leaves in its `out_dir` after every epoch, and how it continues from it:
`model.safetensors` (weights and metadata, see `vitdemo.checkpoint`), `ema/model.safetensors`
(the moving average's, when the recipe keeps one) and `train_state.pt` (everything else a
resumed run needs: optimiser, schedule, average, epoch, step, history)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checkpoint import WEIGHTS_NAME, atomic_write, save_checkpoint
from ..data import Preprocessing
from .events import TrainingError
from .recipes import jsonable, saved_recipe

if TYPE_CHECKING:
    from .budget import BudgetPlan
    from .run import Run

STATE_NAME = "train_state.pt"
EMA_DIR = "ema"  # out_dir/ema/model.safetensors: the moving average's checkpoint


def checkpoint_paths(out_dir: Path | None, run: Run) -> tuple[Path | None, Path | None]:
    """(the model's checkpoint, the moving average's) in `out_dir`; None where there is none."""
    if out_dir is None:
        return None, None
    return out_dir / WEIGHTS_NAME, out_dir / EMA_DIR / WEIGHTS_NAME if run.ema is not None else None


def load_state(out_dir: Path | None, run: Run) -> int:
    """Continue `run` where `out_dir`'s train_state.pt left it: the weights, optimiser, schedule,
    average, step and history. Returns the number of epochs it had completed. Raises
    TrainingError without a state, or for one of another recipe, seed or precision."""
    state_path = out_dir / STATE_NAME if out_dir else None
    if state_path is None or not state_path.exists():
        raise TrainingError(f"cannot resume: no {STATE_NAME} in {out_dir}")
    state = torch.load(state_path, map_location=run.device, weights_only=True)
    if saved_recipe(state["recipe"]) != jsonable(run.recipe.to_dict()) or state["seed"] != run.seed:
        planned = state.get("time_budget")
        hint = (f"; its epochs were chosen by a time budget of {planned['budget']:g} s: resume with "
                f"--time-budget {planned['budget']:g}" if planned and run.budget is None else "")
        raise TrainingError(
            f"cannot resume {out_dir}: it was started with recipe {state['recipe']} and seed {state['seed']}{hint}"
        )
    if state.get("precision", run.precision) != run.precision:  # states written before it was recorded have none
        raise TrainingError(
            f"cannot resume {out_dir}: it was trained in {state['precision']}, and this run would train in "
            f"{run.precision}; pass --precision {state['precision']} to continue it as it began"
        )
    run.base.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    run.step, run.history = state["step"], state["history"]
    return state["epoch"]


def saved_budget(out_dir: Path | None, budget: float) -> BudgetPlan:
    """The plan a budgeted run in `out_dir` started with, for resuming it with the same `budget`."""
    from .budget import BudgetPlan

    state_path = out_dir / STATE_NAME if out_dir else None
    if state_path is None or not state_path.exists():
        raise TrainingError(f"cannot resume: no {STATE_NAME} in {out_dir}")
    planned = torch.load(state_path, map_location="cpu", weights_only=True).get("time_budget")
    if planned is None:
        raise TrainingError(f"cannot resume {out_dir} with a time budget: its epochs were not chosen by one; "
                            f"resume it without --time-budget")
    if planned["budget"] != budget:
        raise TrainingError(f"cannot resume {out_dir} with a time budget of {budget:g} s: it was planned for "
                            f"{planned['budget']:g} s ({planned['epochs']} epoch(s)); resume with "
                            f"--time-budget {planned['budget']:g}")
    return BudgetPlan.from_dict(planned)


def save_epoch(out_dir: Path, run: Run, epoch: int, figures: dict[str, float | None], class_names: list[str],
               preprocess: Preprocessing, metadata: dict[str, Any] | None) -> None:
    """Write the checkpoint(s) and train_state.pt after `epoch` (1-based) epochs, each atomically,
    so that a run killed at any moment leaves the last epoch's files whole. `figures` are the
    epoch's (train_loss, train_acc, val_loss, val_acc, ema_val_loss, ema_val_acc)."""
    model_path, ema_path = checkpoint_paths(out_dir, run)
    planned = {"time_budget": run.budget.to_dict()} if run.budget is not None else {}
    saved = [(model_path, run.base, figures["val_loss"], figures["val_acc"], planned)]
    if run.ema is not None:
        saved.append((ema_path, run.ema.module, figures["ema_val_loss"], figures["ema_val_acc"],
                      {"weights": f"exponential moving average, decay {run.recipe.ema_decay}", **planned}))
    for path, weights, val_loss, val_acc, kind in saved:
        metrics = {"epoch": epoch, "train_loss": figures["train_loss"], "train_acc": figures["train_acc"],
                   "val_loss": val_loss, "val_acc": val_acc}
        save_checkpoint(path, weights, class_names, preprocess, metrics=metrics, recipe=run.recipe.to_dict(),
                        seed=run.seed, precision=run.precision, history=run.history, **{**(metadata or {}), **kind})
    state = {"model": run.base.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "epoch": epoch, "step": run.step, "history": run.history,
             "recipe": jsonable(run.recipe.to_dict()), "seed": run.seed, "precision": run.precision}
    if run.ema is not None:
        state["ema"] = run.ema.state_dict()
    if run.budget is not None:
        state["time_budget"] = run.budget.to_dict()
    atomic_write(out_dir / STATE_NAME, lambda tmp: torch.save(state, tmp))
