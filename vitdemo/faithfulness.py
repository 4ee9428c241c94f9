"""Does a heat map show what the model uses? The perturbation test of Chefer, Gur and Wolf,
"Transformer Interpretability Beyond Attention Visualization" (CVPR 2021).

Patches are removed in the order an explanation ranks them and the model's accuracy is measured
after each step. Removing the most relevant patches first (positive perturbation) should make
accuracy fall fast: a lower area under the curve is better. Removing the least relevant first
(negative perturbation) should leave it standing: a higher area is better. A random order is the
floor every explanation must beat.

A removed patch is replaced by the dataset's mean colour, so the image stays in the range the
model was trained on; with inputs normalised by that mean, this is 0 in the model's input space.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

# Fractions of the patches removed. 0 (the intact image) is part of the curve for reference;
# the area is taken over 0.1 ... 0.9, the steps of Chefer et al. (see `perturbation_auc`).
FRACTIONS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def removal_order(maps: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Patch indices (row-major, as the model reads them), most relevant first: (B, N) for
    (B, grid_h, grid_w) maps. Equal scores are ordered at random (seeded by `generator`), so
    a flat or partly flat map gains nothing from the grid's reading order. The same
    `generator` state gives the same order for the same map."""
    scores = maps.reshape(maps.shape[0], -1).float().cpu()
    B, N = scores.shape
    shuffle = torch.argsort(torch.rand(B, N, generator=generator), dim=1)  # a random permutation per image
    ranked = torch.sort(scores.gather(1, shuffle), dim=1, descending=True, stable=True).indices
    return shuffle.gather(1, ranked)


def random_order(batch: int, num_patches: int, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random order of the patches for each image, (batch, num_patches): the floor."""
    return torch.argsort(torch.rand(batch, num_patches, generator=generator), dim=1)


def remove_patches(x: Tensor, patches: Tensor, patch_size: int, fill: Tensor | float = 0.0) -> Tensor:
    """A copy of `x` (B, C, H, W) with the patches whose row-major indices are in `patches`
    (B, k) replaced by `fill` (a value, or one per channel; 0 is the normalisation mean)."""
    B, C, H, W = x.shape
    gh, gw = H // patch_size, W // patch_size
    keep = torch.ones(B, gh * gw, dtype=torch.bool, device=x.device)
    keep.scatter_(1, patches.to(x.device), False)
    keep = keep.reshape(B, 1, gh, gw).repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
    fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return torch.where(keep, x, fill)


def removed_count(fraction: float, num_patches: int) -> int:
    """How many patches a fraction removes: rounded down, as Chefer et al. (int(N * f)); the
    small epsilon keeps 0.3 * 10 at 3 despite floating point."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return int(fraction * num_patches + 1e-9)


@torch.no_grad()
def perturbation_hits(model: Callable[[Tensor], Tensor], x: Tensor, labels: Tensor, order: Tensor, patch_size: int,
                      positive: bool = True, fractions: Sequence[float] = FRACTIONS,
                      fill: Tensor | float = 0.0) -> Tensor:
    """Whether the model still predicts `labels` after each removal step: bool (F, B).

    `order` (B, N) ranks the patches most relevant first. Positive perturbation removes the
    first `removed_count(f, N)` of them, negative the last as many (the least relevant first).
    `x` is the normalised batch the model takes; `model` returns logits."""
    N = order.shape[1]
    hits = []
    for f in fractions:
        k = removed_count(f, N)
        patches = order[:, :k] if positive else order[:, N - k:]
        hits.append(model(remove_patches(x, patches, patch_size, fill)).argmax(-1).cpu() == labels.cpu())
    return torch.stack(hits)


def perturbation_auc(fractions: Sequence[float], accuracy, start: float = 0.1):
    """Area under the accuracy curve, 100 x the trapezoidal integral of accuracy (0 to 1) over
    the removal fraction from `start` (0.1 as Chefer et al.: the steps 0.1, ..., 0.9) to the
    last fraction. An order that changed nothing would score 80 x the intact accuracy over
    0.1 ... 0.9; positive perturbation: lower is better, negative: higher is better.

    `accuracy` is one value per fraction (a float comes back), or (F, B): one curve per image
    (hits as 0/1), B areas come back, whose mean is the area of the mean curve."""
    f = np.asarray(fractions, dtype=float)
    a = np.asarray(accuracy, dtype=float)
    use = f >= start - 1e-9
    if use.sum() < 2:
        raise ValueError(f"need at least two fractions from {start}, got {f.tolist()}")
    area = 100 * np.trapezoid(a[use], f[use], axis=0)
    return float(area) if a.ndim == 1 else area


# ---------------------------------------------------------------------------------------------
# Measured results (benchmarks/faithfulness.py writes faithfulness.json beside a checkpoint)
# ---------------------------------------------------------------------------------------------

RESULTS_NAME = "faithfulness.json"
SUMMARY_HEADERS = ("method", "depends on the class", "positive AUC (lower is better)",
                   "negative AUC (higher is better)", "positive AUC, true class", "negative AUC, true class")


def read_results(checkpoint_dir: str | Path) -> dict | None:
    """The measured results beside a checkpoint (`RESULTS_NAME` in its folder), or None when
    there are none or they are unreadable (the app then shows nothing)."""
    path = Path(checkpoint_dir)
    path = (path if path.is_dir() else path.parent) / RESULTS_NAME
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) and isinstance(results.get("methods"), list) else None


def summary_rows(results: dict) -> list[list]:
    """One row per method, in `SUMMARY_HEADERS`' order: name, "yes"/"no", and the positive and
    negative AUCs for the predicted class, then for the true class (the same maps as for the
    predicted class when the method does not depend on the class)."""
    return [[m["name"], "yes" if m["class_specific"] else "no",
             m["predicted"]["positive_auc"], m["predicted"]["negative_auc"],
             m["true"]["positive_auc"], m["true"]["negative_auc"]] for m in results["methods"]]
