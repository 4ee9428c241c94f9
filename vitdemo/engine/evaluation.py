"""Loss and accuracy on held-out data, and the class-token features a head-only run trains on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import ImageData, iterate_batches, normalize
from ..model import VisionTransformer
from .devices import all_sum, autocast, rank_and_world


@torch.no_grad()
def evaluate(
    model: nn.Module | Callable[[Tensor], Tensor], data: ImageData | Features, mean, std, batch_size: int = 256,
    device: torch.device | str = "cpu", inputs_are_features: bool = False,
) -> tuple[float, float, Tensor]:
    """Mean cross-entropy, accuracy and the predicted class of every item of `data`; `model`
    may also be a faster runtime's callable (`vitdemo.runtime.prepare`).
    With several processes each evaluates its own share (predictions are of that share) and the
    loss and accuracy are summed over all."""
    device = torch.device(device)
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    rank, world = rank_and_world()
    # Sums stay on the device and are read once at the end: no wait for the GPU per batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct, preds = torch.zeros((), dtype=torch.int64, device=device), []
    for x, y in iterate_batches(data, batch_size, shuffle=False, rank=rank, world_size=world, pad=False):
        x = x.to(device) if inputs_are_features else normalize(x.to(device), mean, std)
        y = y.to(device)
        with autocast(device):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        pred = logits.argmax(1)
        correct += (pred == y).sum()
        preds.append(pred)
    if was_training:
        model.train()
    count = float(sum(len(p) for p in preds))
    loss_sum, correct, count = all_sum([loss_sum.item(), float(correct.item()), count], device)
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
        with autocast(torch.device(device)):
            feats.append(model.forward_features(normalize(x.to(device), mean, std))[0][:, 0].float().cpu())
    return Features(torch.cat(feats), data.labels)
