"""The training engine: one loop, written as a generator of events, that the command line
prints, the app streams into live plots, and `torchrun` runs on several processes.

    for event in train(model, train_data, val_data, RECIPES["small-data"], out_dir="runs/x"):
        print(event)

Closing the generator (or `should_stop()` returning True) stops between two optimiser steps;
the model then holds the weights of the last completed step and the last epoch's checkpoint
on disk is intact. Every epoch draws its shuffling, augmentation and dropout randomness from
`seed` and the epoch number alone, so a resumed run continues exactly the same curve.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import ood
from .augment import BatchAugment, MixUpCutMix, soft_cross_entropy
from .checkpoint import WEIGHTS_NAME, atomic_write, save_checkpoint, unwrap
from .cpu_linear import LinearKernels, bf16_pays, onednn_pays
from .data import ImageData, Preprocessing, iterate_batches, normalize
from .model import VisionTransformer

STATE_NAME = "train_state.pt"
EMA_DIR = "ema"  # out_dir/ema/model.safetensors: the moving average's checkpoint
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
AUGMENT_AHEAD = 16  # batches augmented in one call on a GPU (see _augmented)

# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------


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
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                "invalid recipe: " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad)
                + " (lr, epochs, batch_size, repeats > 0; weight_decay, grad_clip, mixup_alpha, cutmix_alpha >= 0;"
                " warmup, label_smoothing, ema_decay in [0, 1); erasing, mix_prob in [0, 1])"
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
        fields = _saved_recipe(saved)
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


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------


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
    kind: str = "done"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, incompatible resume state)."""


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def select_device(name: str | None = None) -> torch.device:
    """`name` if given, else the best available: CUDA, then Apple's MPS, then the CPU."""
    if name and name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum metric counters over all processes (a no-op on one)."""
    if _dist()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """The arithmetic of the training step: "auto" is bf16 autocast on a GPU and on a CPU with AMX
    matrix units (`vitdemo.cpu_linear.bf16_pays`), fp32 elsewhere (a CPU without native bf16
    emulates it, several times slower)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and bf16_pays()) else "fp32"


def _autocast(device: torch.device, precision: str | None = None):
    # Evaluation (precision None) uses bf16 on GPUs only: CPU figures stay fp32 wherever they run.
    bf16 = precision == "bf16" if precision is not None else device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def evaluate(
    model: nn.Module | Callable[[Tensor], Tensor], data: ImageData | Features, mean, std, batch_size: int = 256, device: torch.device | str = "cpu",
    inputs_are_features: bool = False,
) -> tuple[float, float, Tensor]:
    """Mean cross-entropy, accuracy and the predicted class of every item of `data`; `model`
    may also be a faster runtime's callable (`vitdemo.runtime.prepare`).
    With several processes each evaluates its own share (predictions are of that share) and the
    loss and accuracy are summed over all."""
    device = torch.device(device)
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    rank, world = _dist()
    # Sums stay on the device and are read once at the end: no wait for the GPU per batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct, preds = torch.zeros((), dtype=torch.int64, device=device), []
    for x, y in iterate_batches(data, batch_size, shuffle=False, rank=rank, world_size=world, pad=False):
        x = x.to(device) if inputs_are_features else normalize(x.to(device), mean, std)
        y = y.to(device)
        with _autocast(device):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        pred = logits.argmax(1)
        correct += (pred == y).sum()
        preds.append(pred)
    if was_training:
        model.train()
    count = float(sum(len(p) for p in preds))
    loss_sum, correct, count = _all_sum([loss_sum.item(), float(correct.item()), count], device)
    return loss_sum / max(count, 1), correct / max(count, 1), torch.cat(preds).cpu() if preds else torch.empty(0)


@dataclass
class Features:
    """Class-token features standing in for images when only the head is trained."""

    features: Tensor  # float (N, D)
    labels: Tensor

    @property
    def images(self) -> Tensor:
        """The features, under the name `iterate_batches` reads: it batches both alike."""
        return self.features

    def __len__(self) -> int:
        return len(self.labels)


@torch.no_grad()
def extract_features(model: VisionTransformer, data: ImageData, mean, std, batch_size: int = 256,
                     device: torch.device | str = "cpu") -> Features:
    """The class-token features (what the head reads) of every image, computed once, so that
    training only the head costs one pass over the data instead of one per epoch."""
    model.eval()
    feats = []
    for x, _ in iterate_batches(data, batch_size, shuffle=False):
        with _autocast(torch.device(device)):
            feats.append(model.forward_features(normalize(x.to(device), mean, std))[0][:, 0].float().cpu())
    return Features(torch.cat(feats), data.labels)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


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
) -> Iterator[StepEvent | ValidationEvent | EpochEvent | DoneEvent]:
    """Train `model` on `train_data`, validating on `val_data` after every epoch.

    With `out_dir`, every epoch atomically writes `model.safetensors` (weights and metadata,
    see `vitdemo.checkpoint`) and `train_state.pt` (optimiser, schedule, epoch, history), and
    `resume=True` continues from them. With the recipe's `ema_decay`, the moving average of the
    weights is validated every epoch too and written as its own checkpoint in `out_dir/ema/`.
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
    """
    device = select_device(str(device) if device is not None else None)
    if device.type == "cpu":
        # Denormal floats (tiny values late in training) can make CPU steps 10-20x slower.
        torch.set_flush_denormal(True)
    if compile not in (None, *COMPILE_MODES):
        raise ValueError(f"compile must be one of {COMPILE_MODES} or None, got {compile!r}")
    precision = resolve_precision(precision, device)
    rank, world = _dist()
    out_dir = Path(out_dir) if out_dir is not None else None
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

    steps_per_epoch = math.ceil(len(train_inputs) / (recipe.batch_size * world))
    total_steps = steps_per_epoch * recipe.epochs
    # On a GPU one fused kernel updates every parameter (instead of a dozen launches per tensor group).
    optimizer = make_optimizer(net, recipe, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, recipe.warmup))
    ema = WeightAverage(base, recipe.ema_decay) if recipe.ema_decay else None
    step_net = torch.compile(net, mode=None if compile == "default" else compile) if compile else net
    # On a CPU where MKL is slow, the linear layers compute with oneDNN inside this context (see
    # vitdemo.cpu_linear); a compiled step brings its own kernels.
    kernels = (LinearKernels(base, ema.module if ema else None) if device.type == "cpu" and not compile and onednn_pays()
               else contextlib.nullcontext())

    def evaluated(m: nn.Module) -> tuple[float, float]:
        with kernels:
            loss, acc, _ = evaluate(m.head if freeze_backbone else m, val_inputs, mean, std, device=device,
                                    inputs_are_features=freeze_backbone)
        return loss, acc

    # "test_loss" and "test_acc" hold the validation split's figures (never a test set's): the
    # walk-through's names, kept so that its plotting code and earlier results.json files read them.
    history: dict[str, list[float | None]] = {"train_loss": [], "train_acc": [], "test_loss": [], "test_acc": [], "lr": []}
    if ema is not None:
        history.update(ema_val_loss=[], ema_val_acc=[])
    start_epoch, step = 0, 0

    state_path = out_dir / STATE_NAME if out_dir else None
    if resume:
        if state_path is None or not state_path.exists():
            raise TrainingError(f"cannot resume: no {STATE_NAME} in {out_dir}")
        state = torch.load(state_path, map_location=device, weights_only=True)
        if _saved_recipe(state["recipe"]) != _jsonable(recipe.to_dict()) or state["seed"] != seed:
            raise TrainingError(
                f"cannot resume {out_dir}: it was started with recipe {state['recipe']} and seed {state['seed']}"
            )
        if state.get("precision", precision) != precision:  # states written before it was recorded have none
            raise TrainingError(
                f"cannot resume {out_dir}: it was trained in {state['precision']}, and this run would train in "
                f"{precision}; pass --precision {state['precision']} to continue it as it began"
            )
        base.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, step, history = state["epoch"], state["step"], state["history"]

    checkpoint = out_dir / WEIGHTS_NAME if out_dir else None
    run_start = time.perf_counter()
    stopped = False
    for epoch in range(start_epoch, recipe.epochs):
        # Randomness of this epoch depends on (seed, epoch) only: resuming repeats it exactly.
        torch.manual_seed(seed * 100_003 + epoch)
        order = torch.Generator().manual_seed(seed * 100_003 + epoch)
        aug_gen = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed * 7 + epoch)
        # Draws the host acts on (which operation an image gets, how a batch is mixed) come from CPU
        # generators: drawn on a GPU, reading them would wait for it.
        host_gen = aug_gen if aug_gen.device.type == "cpu" else torch.Generator().manual_seed(seed * 7 + epoch)
        mix_rng = np.random.default_rng((seed, epoch))
        step_net.train()
        epoch_start = time.perf_counter()
        sums = [0.0, 0.0, 0.0]  # loss * n, correct, n for the epoch
        window = [0.0, 0.0, 0.0, time.perf_counter()]  # the same since the last StepEvent
        batches = iterate_batches(train_inputs, recipe.batch_size, shuffle=True, generator=order,
                                  rank=rank, world_size=world, repeats=1 if freeze_backbone else recipe.repeats)
        if augment is not None:
            batches = _augmented(batches, augment, device, aug_gen, host_gen,
                                 ahead=AUGMENT_AHEAD if device.type == "cuda" else 1)
        pending: list[tuple[Tensor, Tensor, int]] = []  # (loss, correct, n) of steps not yet read back
        for x, y in batches:
            if should_stop is not None and should_stop():
                stopped = True
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # no-op once augmented
            targets = None
            if mixer is not None:
                x, targets = mixer(x, y, mix_rng)
            with _autocast(device, precision), kernels:
                logits = step_net(x).float()
            if targets is None:
                loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
            else:  # mixed images: soft targets, label smoothing already in them
                loss = soft_cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip:
                nn.utils.clip_grad_norm_(net.parameters(), recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update()
            step += 1
            # Training accuracy counts the label of each image as drawn (the first of a mixed pair).
            pending.append((loss.detach(), (logits.argmax(1) == y).sum(), len(y)))
            log_now = step % log_every == 0 or step == total_steps
            # Reading a value back waits for the GPU; a small ViT's step is bound by kernel launches,
            # so on a GPU the values are read once per log interval, letting the CPU queue steps ahead.
            if log_now or device.type != "cuda":
                _read_back(pending, step, epoch, scheduler.get_last_lr()[0], (sums, window))
            if log_now:
                now = time.perf_counter()
                rate = window[2] * world / max(now - window[3], 1e-9)
                remaining = (total_steps - step) * recipe.batch_size * world / max(rate, 1e-9)
                yield StepEvent(epoch + 1, step, total_steps, window[0] / window[2], window[1] / window[2],
                                scheduler.get_last_lr()[0], rate, remaining)
                window = [0.0, 0.0, 0.0, time.perf_counter()]
            if val_every and step % val_every == 0 and step % steps_per_epoch and val_inputs is not None:
                val_loss, val_acc = evaluated(base)
                step_net.train()
                yield ValidationEvent(epoch + 1, step, val_loss, val_acc)
        if stopped:
            break
        _read_back(pending, step, epoch, scheduler.get_last_lr()[0], (sums, window))

        train_loss, train_acc, count = _all_sum(sums, device)
        train_loss, train_acc = train_loss / max(count, 1), train_acc / max(count, 1)
        val_loss = val_acc = ema_loss = ema_acc = None
        if val_inputs is not None and len(val_inputs):
            # The unwrapped module: under DDP each rank evaluates its own share, without collectives.
            val_loss, val_acc = evaluated(base)
            if ema is not None:
                ema_loss, ema_acc = evaluated(ema.module)
        for key, value in (("train_loss", train_loss), ("train_acc", train_acc), ("test_loss", val_loss),
                           ("test_acc", val_acc), ("lr", scheduler.get_last_lr()[0])):
            history[key].append(value)
        if ema is not None:
            history["ema_val_loss"].append(ema_loss)
            history["ema_val_acc"].append(ema_acc)

        if out_dir is not None and rank == 0:
            last = epoch + 1 == recipe.epochs and val_data is not None and len(val_data) > 0
            saved = [(checkpoint, base, val_loss, val_acc, {})]
            if ema is not None:
                saved.append((out_dir / EMA_DIR / WEIGHTS_NAME, ema.module, ema_loss, ema_acc,
                              {"weights": f"exponential moving average, decay {recipe.ema_decay}"}))
            for path, weights, loss_value, acc_value, kind in saved:
                extra = {**(metadata or {}), **kind}
                if last:
                    # The finished model carries its out-of-distribution statistics: means and covariance
                    # from the training images, the threshold from the held-out ones (vitdemo.ood).
                    extra["ood"] = ood.fit(weights, train_data, val_data, preprocess)
                metrics = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
                           "val_loss": loss_value, "val_acc": acc_value}
                save_checkpoint(path, weights, train_data.class_names, preprocess, metrics=metrics,
                                recipe=recipe.to_dict(), seed=seed, precision=precision, history=history, **extra)
            state = {"model": base.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "step": step,
                     "history": history, "recipe": _jsonable(recipe.to_dict()), "seed": seed, "precision": precision}
            if ema is not None:
                state["ema"] = ema.state_dict()
            atomic_write(state_path, lambda tmp, s=state: torch.save(s, tmp))
        if world > 1:
            dist.barrier()
        yield EpochEvent(epoch + 1, recipe.epochs, train_loss, train_acc, val_loss, val_acc,
                         time.perf_counter() - epoch_start, checkpoint, ema_loss, ema_acc)

    # No epoch completed (in this run or the one resumed): no checkpoint was written, name none.
    saved_checkpoint = checkpoint if checkpoint is not None and history["train_loss"] else None
    yield DoneEvent(history, stopped, time.perf_counter() - run_start, saved_checkpoint)


class WeightAverage:
    """An exponential moving average of a model's weights (Polyak and Juditsky 1992; kept by DeiT
    and timm's `ModelEma`), updated after every optimiser step:

        average <- decay * average + (1 - decay) * weights     (the first update copies)

    `module` is a copy of the model holding the average, so it validates and saves as a model does.
    One multi-tensor kernel per update and a Python counter: unlike `torch.optim.swa_utils.
    AveragedModel`, whose counter is a tensor copied to the device every step, it never makes
    the host wait for a GPU."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0
        self._mine = [t for t in itertools.chain(self.module.parameters(), self.module.buffers()) if t.is_floating_point()]
        self._theirs = [t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        if self.updates == 0:
            torch._foreach_copy_(self._mine, self._theirs)
        else:
            torch._foreach_lerp_(self._mine, self._theirs, 1.0 - self.decay)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


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


def _augmented(batches: Iterator[tuple[Tensor, Tensor]], augment: BatchAugment, device: torch.device,
               generator: torch.Generator, host_generator: torch.Generator, ahead: int,
               ) -> Iterator[tuple[Tensor, Tensor]]:
    """Move batches to `device` and augment them, `ahead` batches in one call. Augmentation is
    drawn image by image, so grouping changes only the number of calls, and so of kernel launches,
    by which a small ViT's step on a GPU is bound.

    On a GPU, batches are gathered and augmented on a side stream: some of torchvision's
    operations copy a small matrix from the host, which makes the host wait for the stream it
    runs on; there that is the augmentation's own short queue, while the training steps already
    queued on the main stream keep the GPU busy. The main stream waits for the side stream (an
    event, not the host) before it reads a batch."""
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    main = torch.cuda.current_stream(device) if side is not None else None
    if side is not None:
        side.wait_stream(main)  # whatever the main stream wrote to the data (the upload) comes first
    while True:
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            group = list(itertools.islice(batches, ahead))  # the gathering runs here too
            if not group:
                return
            x = augment(torch.cat([images for images, _ in group]).to(device, non_blocking=True),
                        generator=generator, host_generator=host_generator)
            labels = [y.to(device, non_blocking=True) for _, y in group]
        if side is not None:
            main.wait_stream(side)
            for t in (x, *labels):  # made on the side stream, used on the main one
                t.record_stream(main)
        yield from zip(x.split([len(y) for y in labels]), labels)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """Tuples become lists, so a recipe compares equal after a round trip through a file."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _saved_recipe(saved: dict[str, Any]) -> dict[str, Any]:
    """A recipe as a run's state recorded it, in today's fields: runs started before a setting
    existed ran with its default (`randaugment: true` became `policy: "randaugment"`)."""
    saved = dict(saved)
    if saved.pop("randaugment", False):
        saved["policy"] = "randaugment"
    return {**_jsonable(Recipe().to_dict()), **saved}


__all__ = [
    "RECIPES", "DoneEvent", "EpochEvent", "Recipe", "StepEvent", "TrainingError", "ValidationEvent", "evaluate",
    "extract_features", "make_optimizer", "select_device", "train", "warmup_cosine",
]
