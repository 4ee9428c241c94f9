"""How to optimise: the `Recipe`, the named `RECIPES`, the optimiser it makes and its learning-rate
schedule."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Recipe:
    """How to optimise: optimiser, learning-rate schedule (linear warm-up, then cosine decay to
    zero), regularisation and augmentation."""

    optimizer: str = "adamw"  # "adamw" (decoupled weight decay), "adam" (decay added to the gradient, L2) or "sgd"
    lr: float = 1e-3
    weight_decay: float = 0.05  # see make_optimizer; never applied to biases, norms, embeddings
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9  # SGD only
    epochs: int = 10
    batch_size: int = 128
    warmup: float = 0.05  # fraction of all steps spent warming up
    label_smoothing: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 switches clipping off
    crop_padding: int | None = 4  # random crop after zero padding; None switches it off
    flip: bool = True
    policy: str | None = None  # "randaugment" or "autoaugment" (the CIFAR-10 policy), per image
    erasing: float = 0.0  # probability of random erasing, per image
    mixup_alpha: float = 0.0  # Mixup's Beta(alpha, alpha); 0 switches it off
    cutmix_alpha: float = 0.0  # CutMix's; with both on, one of the two per batch (DeiT)
    mix_prob: float = 1.0  # share of batches mixed when either is on
    repeats: int = 1  # repeated augmentation: each image this many times per batch
    ema_decay: float = 0.0  # exponential moving average of the weights, per step; 0 switches it off
    # Hard distillation through the class token (DeiT's, without its distillation token): the loss
    # is (1 - d) * the loss on the labels + d * cross-entropy with a CNN teacher's label of the same
    # augmented view; DeiT weighs the two halves equally (0.5). 0 switches it off; > 0 needs a teacher.
    distillation: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adam', 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.policy not in (None, "randaugment", "autoaugment"):
            raise ValueError(f"policy must be None, 'randaugment' or 'autoaugment', got {self.policy!r}")
        checks = {
            "lr": self.lr > 0,
            "epochs": isinstance(self.epochs, int) and self.epochs > 0,
            "batch_size": isinstance(self.batch_size, int) and self.batch_size > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup": 0 <= self.warmup < 1,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "grad_clip": self.grad_clip >= 0,
            "erasing": 0 <= self.erasing <= 1,
            "mixup_alpha": self.mixup_alpha >= 0,
            "cutmix_alpha": self.cutmix_alpha >= 0,
            "mix_prob": 0 <= self.mix_prob <= 1,
            "repeats": isinstance(self.repeats, int) and self.repeats >= 1,
            "ema_decay": 0 <= self.ema_decay < 1,
            "distillation": 0 <= self.distillation <= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                "invalid recipe: " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad)
                + " (lr, epochs, batch_size, repeats > 0; weight_decay, grad_clip, mixup_alpha, cutmix_alpha >= 0;"
                " warmup, label_smoothing, ema_decay in [0, 1); erasing, mix_prob, distillation in [0, 1])"
            )

    def replace(self, **changes: Any) -> "Recipe":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown recipe setting(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def mixes(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> "Recipe":
        """The recipe a checkpoint's metadata or a run's state recorded, older ones included."""
        fields = saved_recipe(saved)
        return cls(**{**fields, "betas": tuple(fields["betas"])})

    def describe(self) -> str:
        """The recipe in words, each ingredient that is on, as a model card states it."""
        optimizer = {"adamw": "AdamW", "adam": "Adam", "sgd": f"SGD with momentum {self.momentum:g}"}[self.optimizer]
        parts = [f"{optimizer}, lr {self.lr:g} at batch {self.batch_size}, weight decay {self.weight_decay:g}, "
                 f"{self.epochs} epochs (warm-up {self.warmup:.0%}, then cosine)"]
        if self.grad_clip:
            parts.append(f"gradient clipping at {self.grad_clip:g}")
        if self.label_smoothing:
            parts.append(f"label smoothing {self.label_smoothing:g}")
        augment = [f"random crop (padding {self.crop_padding})"] if self.crop_padding is not None else []
        augment += ["flip"] * self.flip
        if self.policy:
            augment.append({"randaugment": "RandAugment", "autoaugment": "AutoAugment (CIFAR-10 policy)"}[self.policy])
        if self.erasing:
            augment.append(f"random erasing {self.erasing:g}")
        if self.mixes:
            mixers = [f"{name} (alpha {alpha:g})" for name, alpha in (("Mixup", self.mixup_alpha),
                                                                     ("CutMix", self.cutmix_alpha)) if alpha > 0]
            share = "every batch" if self.mix_prob == 1 else f"{self.mix_prob:.0%} of batches"
            augment.append(f"{' or '.join(mixers)} on {share}")
        if self.repeats > 1:
            augment.append(f"each image {self.repeats} times per batch")
        parts.append("augmentation: " + (", ".join(augment) or "none"))
        if self.ema_decay:
            parts.append(f"moving average of the weights (decay {self.ema_decay:g})")
        if self.distillation:
            parts.append(f"hard distillation from a CNN teacher's label of each augmented image, weight "
                         f"{self.distillation:g}")
        return "; ".join(parts)


RECIPES: dict[str, Recipe] = {
    # Table 3 of the paper: Adam (0.9, 0.999), warm-up then cosine, weight decay, clipping at 1.
    # lr and weight decay are its ImageNet-1k values (batch 4096); made for big data. The decay is
    # decoupled from the gradient, AdamW-style, as the weight_decay of Flax's Adam (the paper's
    # JAX code base) is: added to Adam's gradient instead, a decay of 0.3 would swamp its steps.
    "paper": Recipe(optimizer="adamw", lr=3e-3, weight_decay=0.3, warmup=0.1, label_smoothing=0.0),
    # For small data sets trained from scratch: DeiT's kind of recipe (AdamW, weight decay 0.05,
    # warm-up then cosine, label smoothing 0.1), shorter, at lr 1e-3 for batch 128, with random
    # crop and flip; RandAugment pays only over long schedules.
    "small-data": Recipe(),
    # The paper's fine-tuning: SGD with momentum 0.9, no weight decay, clipping at 1, cosine.
    "finetune": Recipe(optimizer="sgd", lr=0.01, weight_decay=0.0, warmup=0.05, label_smoothing=0.0, batch_size=64),
    # What small ViTs trained from scratch need: the regularisation bundle of DeiT (Touvron et al.
    # 2021) as Lee, Lee and Song (2021, "Vision Transformer for Small-Size Datasets") train their
    # plain-ViT baseline to 93.6% on CIFAR-10, read from their code (main.py, utils/sampler.py),
    # not the paper's prose: AutoAugment's CIFAR-10 policy, random erasing 0.25, Mixup 1.0 or
    # CutMix 1.0 (one of the two, 50/50) on half the batches, label smoothing 0.1, AdamW lr 1e-3 wd
    # 0.05 at batch 128, 10% warm-up, cosine, no clipping (stochastic depth 0.1 is the model's
    # drop_path_rate). Their "repeated augmentation x3 for 100 epochs" is RASampler(n, 128, 1, 3):
    # repetitions=1 and len_factor=3, i.e. each "epoch" is three shuffled passes with no image
    # repeated inside a batch. That is 300 plain epochs, as here; `repeats` (DeiT's in-batch
    # repeats) stays at 1.
    "small-vit": Recipe(lr=1e-3, weight_decay=0.05, epochs=300, batch_size=128, warmup=0.1, label_smoothing=0.1,
                        grad_clip=0.0, policy="autoaugment", erasing=0.25, mixup_alpha=1.0, cutmix_alpha=1.0,
                        mix_prob=0.5),
}


def make_optimizer(model: nn.Module, recipe: Recipe, fused: bool = False) -> torch.optim.Optimizer:
    """The recipe's optimiser, with weight decay on the weight matrices only: biases,
    LayerNorms, the class token and position embeddings are left alone, as in timm and the
    reference code.

    "adamw" decays the weights themselves, w <- w - lr * wd * w, apart from Adam's normalised
    step (Loshchilov and Hutter, "Decoupled Weight Decay Regularization", 2019); "adam" adds
    wd * w to the gradient (an L2 penalty), which Adam's normalisation then rescales; "sgd" adds it
    to the gradient too, with momentum. `fused` updates all parameters in one kernel (CUDA)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kernels = {"fused": True} if fused else {}
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, **kernels)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, lr=recipe.lr, betas=recipe.betas, **kernels)
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.betas, **kernels)


def warmup_cosine(total_steps: int, warmup: float) -> Callable[[int], float]:
    """Learning-rate factor at a step: linear warm-up over the first `warmup` share of steps,
    then cosine decay to zero."""
    warmup_steps = int(total_steps * warmup)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """Tuples become lists, so a recipe compares equal after a round trip through a file."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def saved_recipe(saved: dict[str, Any]) -> dict[str, Any]:
    """A recipe as a run's state recorded it, in today's fields: runs started before a setting
    existed ran with its default (`randaugment: true` became `policy: "randaugment"`)."""
    saved = dict(saved)
    if saved.pop("randaugment", False):
        saved["policy"] = "randaugment"
    return {**jsonable(Recipe().to_dict()), **saved}
