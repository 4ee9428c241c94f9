"""What one call of `train` works with, a `Run`, and `set_up`, which checks the data and builds it."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..augment import BatchAugment, MixUpCutMix
from ..checkpoint import unwrap
from ..cpu_linear import LinearKernels, onednn_pays
from ..data import ImageData, Preprocessing, num_batches
from ..model import VisionTransformer
from .average import WeightAverage
from .devices import rank_and_world, resolve_precision, select_device
from .evaluation import Features, extract_features
from .recipes import Recipe, make_optimizer, warmup_cosine

if TYPE_CHECKING:
    from .budget import BudgetPlan

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


@dataclass
class Run:
    """What one call of `train` works with: made by `set_up`, the step and history updated as it goes."""

    recipe: Recipe
    seed: int
    device: torch.device
    precision: str  # "fp32" or "bf16", resolved
    rank: int
    world: int
    preprocess: Preprocessing
    base: VisionTransformer  # the model itself, unwrapped
    net: nn.Module  # what is optimised: the model or only its head; under DDP with several processes
    step_net: nn.Module  # net, compiled if asked
    freeze_backbone: bool
    train_inputs: ImageData | Features  # images, or class-token features for a head-only run
    val_inputs: ImageData | Features | None
    augment: BatchAugment | None  # None for features
    mixer: MixUpCutMix | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: WeightAverage | None
    kernels: Any  # the context every forward pass runs in (see set_up)
    steps_per_epoch: int
    total_steps: int
    step: int = 0  # optimiser steps done, over the whole run
    history: dict[str, list[float | None]] = field(default_factory=dict)
    teacher: nn.Module | None = None  # labels each augmented batch, for the recipe's distillation
    budget: BudgetPlan | None = None  # what a time budget chose, if one did


def reschedule(run: Run, recipe: Recipe) -> None:
    """Give a run that has taken no step yet `recipe`'s epochs: its step count and its schedule,
    warm-up then cosine to zero over the new total."""
    run.recipe, run.total_steps = recipe, run.steps_per_epoch * recipe.epochs
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, warmup_cosine(run.total_steps, recipe.warmup))


def set_up(model: VisionTransformer, train_data: ImageData, val_data: ImageData | None, recipe: Recipe,
           preprocess: Preprocessing, *, seed: int, device: str | torch.device | None, freeze_backbone: bool,
           compile: str | None, precision: str, teacher: nn.Module | None = None) -> Run:
    """Check the data, put the model on its device, and build what the run optimises and reads:
    images augmented on the batch or cached features, the optimiser, schedule and moving average."""
    device = select_device(str(device) if device is not None else None)
    if device.type == "cpu":
        # Denormal floats (tiny values late in training) can make CPU steps 10-20x slower.
        torch.set_flush_denormal(True)
    if compile not in (None, *COMPILE_MODES):
        raise ValueError(f"compile must be one of {COMPILE_MODES} or None, got {compile!r}")
    precision = resolve_precision(precision, device)
    if (teacher is not None) != (recipe.distillation > 0):
        raise ValueError("distillation needs both a teacher and the recipe's distillation weight above 0; got "
                         f"{'a' if teacher is not None else 'no'} teacher and distillation={recipe.distillation:g}")
    if teacher is not None and freeze_backbone:
        raise ValueError("a head-only run (freeze_backbone) trains on cached features, which a teacher cannot label")
    if teacher is not None:
        teacher = teacher.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    rank, world = rank_and_world()
    model.to(device)
    base = unwrap(model)
    mean, std = preprocess.mean, preprocess.std
    if len(train_data) == 0:
        raise ValueError("the training set is empty")
    for name, data in (("training", train_data), ("validation", val_data)):
        if data is not None and tuple(data.images.shape[-2:]) != (preprocess.image_size,) * 2:
            raise ValueError(f"the {name} images are {tuple(data.images.shape[-2:])} pixels, not the model's crop of "
                             f"{preprocess.image_size} x {preprocess.image_size} (vitdemo.data.training_data makes it)")

    # What is optimised, and what it reads: images (augmented on the batch) or cached features.
    augment = mixer = None
    if freeze_backbone:
        for p in base.parameters():
            p.requires_grad_(False)
        for p in base.head.parameters():
            p.requires_grad_(True)
        train_inputs = extract_features(base, train_data, mean, std, device=device)
        val_inputs = extract_features(base, val_data, mean, std, device=device) if val_data else None
        net: nn.Module = base.head
    else:
        train_inputs, val_inputs, net = train_data, val_data, model
        augment = BatchAugment(base.config.image_size[0], mean, std, crop_padding=recipe.crop_padding,
                               flip=recipe.flip, policy=recipe.policy, erasing=recipe.erasing)
        if recipe.mixes:
            mixer = MixUpCutMix(base.config.num_classes, mixup_alpha=recipe.mixup_alpha,
                                cutmix_alpha=recipe.cutmix_alpha, prob=recipe.mix_prob,
                                label_smoothing=recipe.label_smoothing)
    if device.type == "cuda" and isinstance(train_inputs, ImageData):
        # The whole training set lives on the GPU (CIFAR-10: 138 MB as uint8): batches are gathered
        # there, with no copy from the host per step.
        train_inputs = dataclasses.replace(train_inputs, images=train_inputs.images.to(device),
                                           labels=train_inputs.labels.to(device))
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    steps_per_epoch = num_batches(len(train_inputs), recipe.batch_size, world_size=world)  # what iterate_batches yields
    total_steps = steps_per_epoch * recipe.epochs
    # On a GPU one fused kernel updates every parameter (instead of a dozen launches per tensor group).
    optimizer = make_optimizer(net, recipe, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, recipe.warmup))
    ema = WeightAverage(base, recipe.ema_decay) if recipe.ema_decay else None
    step_net = torch.compile(net, mode=None if compile == "default" else compile) if compile else net
    # On a CPU where MKL is slow, the linear layers compute with oneDNN inside this context (see
    # vitdemo.cpu_linear); a compiled step brings its own kernels.
    onednn = device.type == "cpu" and not compile and onednn_pays()
    kernels = LinearKernels(base, ema.module if ema else None) if onednn else contextlib.nullcontext()
    # "test_loss" and "test_acc" hold the validation split's figures (never a test set's): the
    # walk-through's names, kept so that its plotting code and earlier results.json files read them.
    history = {"train_loss": [], "train_acc": [], "test_loss": [], "test_acc": [], "lr": []}
    if ema is not None:
        history.update(ema_val_loss=[], ema_val_acc=[])
    return Run(recipe=recipe, seed=seed, device=device, precision=precision, rank=rank, world=world,
               preprocess=preprocess, base=base, net=net, step_net=step_net, freeze_backbone=freeze_backbone,
               train_inputs=train_inputs, val_inputs=val_inputs, augment=augment, mixer=mixer, optimizer=optimizer,
               scheduler=scheduler, ema=ema, kernels=kernels, steps_per_epoch=steps_per_epoch,
               total_steps=total_steps, history=history, teacher=teacher)
