"""Training the CNN teacher (vitdemo.teacher) that a ViT student can distil from.

The recipe is the fast CIFAR-10 ResNet's kind (Page, "How to train your ResNet"; 94% in 24
epochs there): SGD with Nesterov momentum 0.9, batch 512, the learning rate up linearly to 0.4
over the first fifth of the steps and down linearly to zero, weight decay 5e-4, label smoothing
0.2, random crops from the image padded by reflection, flips and random erasing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..augment import BatchAugment
from ..data import ImageData, Preprocessing, iterate_batches, num_batches
from ..teacher import ConvTeacher
from .devices import autocast, select_device
from .evaluation import evaluate


def train_teacher(train: ImageData, val: ImageData | None, preprocess: Preprocessing, *, epochs: int = 24,
                  batch_size: int = 512, lr: float = 0.4, weight_decay: float = 5e-4, label_smoothing: float = 0.2,
                  width: int = 64, seed: int = 0, device: str | torch.device | None = None,
                  log: Callable[[str], None] = print) -> tuple[ConvTeacher, dict[str, list[float]]]:
    """Train a `ConvTeacher` on `train` (at the student's crop and normalisation, `preprocess`);
    returns it in eval mode and its history (per epoch: training loss, validation accuracy)."""
    device = select_device(str(device) if device is not None else None)
    torch.manual_seed(seed)
    model = ConvTeacher(len(train.class_names), width).to(device, memory_format=torch.channels_last)
    if device.type == "cuda":  # gathered where they are used, as the engine does
        train = ImageData(train.images.to(device), train.labels.to(device), train.class_names)
    augment = BatchAugment(preprocess.image_size, preprocess.mean, preprocess.std, crop_padding=4, flip=True,
                           erasing=0.5, padding_mode="reflect")
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}],
                                lr=lr, momentum=0.9, nesterov=True)
    total = num_batches(len(train), batch_size) * epochs
    peak = max(1, total // 5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / peak if s < peak else max(0.0, (total - s) / (total - peak)))
    generator = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"train_loss": [], "val_acc": []}
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        loss_sum = torch.zeros((), device=device)
        for images, labels in iterate_batches(train, batch_size, shuffle=True, generator=order):
            x = augment(images.to(device), generator=generator).contiguous(memory_format=torch.channels_last)
            labels = labels.to(device)
            with autocast(device, "bf16" if device.type == "cuda" else "fp32"):
                logits = model(x).float()
            loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(labels)
        history["train_loss"].append(loss_sum.item() / len(train))
        val_acc = evaluate(model, val, preprocess.mean, preprocess.std, device=device)[1] if val else float("nan")
        history["val_acc"].append(val_acc)
        log(f"teacher epoch {epoch + 1}/{epochs}: train_loss {history['train_loss'][-1]:.4f} | val_acc {val_acc:.4f} "
            f"| {time.perf_counter() - start:.0f}s")
    return model.eval(), history
