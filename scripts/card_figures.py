"""Print the figures of a checkpoint's model card that come from the checkpoint itself: its size,
the schedule, and its training run's own per-epoch validation history (stored in its metadata).

    python scripts/card_figures.py [CHECKPOINT [GOAL]]   # default: checkpoints/vit_cifar10, 0.85

Accuracy on the held-out images in fp32 comes from `python -m vitdemo evaluate` instead (the
command is in the card), as does the per-class table.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vitdemo.checkpoint import WEIGHTS_NAME, load_checkpoint  # noqa: E402
from vitdemo.engine import Recipe  # noqa: E402


def main(path: str = "checkpoints/vit_cifar10", goal: float = 0.85) -> None:
    model, meta = load_checkpoint(path)
    weights = Path(path) / WEIGHTS_NAME if Path(path).is_dir() else Path(path)
    recipe, history = meta["recipe"], meta["history"]
    val = history["test_acc"]  # the walk-through's name for the validation accuracy of each epoch
    train_images = round(50_000 - meta["val_size"]) if meta.get("val_size", 0) >= 1 else None
    print(f"file: {weights.stat().st_size / 1e6:.1f} MB; parameters: {sum(p.numel() for p in model.parameters()):,}")
    print(f"config: {model.config}")
    print(f"recipe: {Recipe.from_saved(recipe).describe()}; stochastic depth {model.config.drop_path_rate:g}")
    if train_images:
        steps = math.ceil(train_images / recipe["batch_size"]) * recipe["epochs"]
        print(f"schedule: {recipe['epochs']} epochs of {train_images:,} images at batch {recipe['batch_size']}: "
              f"{steps:,} steps (if the data are CIFAR-10's 50,000 training images)")
    print(f"epochs in the history: {len(val)}; last epoch: validation {val[-1]:.2%}, "
          f"training (augmented batches) {history['train_acc'][-1]:.2%}")
    best = max(range(len(val)), key=lambda i: val[i])
    print(f"best epoch: {best + 1} ({val[best]:.2%})")
    ema = [v for v in history.get("ema_val_acc", []) if v is not None]
    if ema:  # the run kept a moving average of the weights, validated each epoch beside them
        print(f"moving average (decay {recipe.get('ema_decay')}): last epoch {ema[-1]:.2%}, best {max(ema):.2%}")
    reached = next((i for i, v in enumerate(val) if v >= goal), None)
    if reached is not None:
        print(f"first epoch at {goal:.0%} or more: {reached + 1}")
        # The first epoch from which the validation accuracy never fell below the goal again.
        stays = next(i for i in range(len(val)) if min(val[i:]) >= goal)
        print(f"from epoch {stays + 1} on: between {min(val[stays:]):.2%} and {max(val[stays:]):.2%}")


if __name__ == "__main__":
    main(*sys.argv[1:2], *[float(g) for g in sys.argv[2:3]])
