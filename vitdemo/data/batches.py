"""Splitting (stratified, seeded) and batching (shuffled, sharded across ranks, repeated
augmentation) of an `ImageData` held in memory."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from .core import DataError, ImageData


# ---------------------------------------------------------------------------------------------
# Splitting and batching
# ---------------------------------------------------------------------------------------------


def stratified_split(labels: Tensor, val_size: int | float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(train, val) index tensors, sorted; every class is in both, in proportion to its size.

    `val_size` is a count (int) or a fraction in (0, 1). Deterministic for a seed.
    """
    labels = torch.as_tensor(labels).long().flatten()
    n = labels.numel()
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise DataError(f"val_size must be an int count or a float fraction, got {val_size!r}")
    if isinstance(val_size, float):
        if not 0.0 < val_size < 1.0:
            raise DataError(f"a fractional val_size must be in (0, 1), got {val_size}")
        val_size = round(val_size * n)
    if not 0 < val_size < n:
        raise DataError(f"val_size must be between 1 and {n - 1} for {n} images, got {val_size}")
    classes, counts = torch.unique(labels, return_counts=True)
    if (counts < 2).any():
        lonely = classes[counts < 2].tolist()
        raise DataError(f"class(es) {lonely} have a single image and cannot be in both train and validation")
    if not len(classes) <= val_size <= n - len(classes):
        raise DataError(f"val_size {val_size} cannot give each of the {len(classes)} classes at least one "
                        f"validation and one training image ({n} images)")

    # Largest-remainder apportionment: floors of the exact shares, then the leftover to the
    # largest fractions (CIFAR 50,000 / 5,000 gives exactly 500 per class).
    share = counts.double() * val_size / n
    per_class = share.floor().long()
    order = torch.argsort(share - per_class, descending=True, stable=True)
    per_class[order[: val_size - int(per_class.sum())]] += 1
    # Every class needs one image on each side; move any surplus to classes that still have room.
    per_class = per_class.clamp(min=1)
    per_class = torch.minimum(per_class, counts - 1)
    while (diff := val_size - int(per_class.sum())) != 0:
        room = (counts - 1 - per_class) if diff > 0 else (per_class - 1)
        k = int(torch.argmax(room))
        per_class[k] += 1 if diff > 0 else -1

    generator = torch.Generator().manual_seed(seed)
    val = []
    for c, k in zip(classes.tolist(), per_class.tolist()):
        members = torch.nonzero(labels == c).flatten()
        val.append(members[torch.randperm(len(members), generator=generator)[:k]])
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[torch.cat(val)] = True
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()


def stratified_sample(data: ImageData, size: int, seed: int = 0) -> ImageData:
    """`size` of the images, each class in proportion (the first `size` of a split sorted by
    index would be the first classes only); all of them if `size` is not smaller."""
    if size >= len(data):
        return data
    return data.subset(stratified_split(data.labels, size, seed=seed)[1])


def per_class_subset(data: ImageData, per_class: int, seed: int = 0) -> ImageData:
    """At most `per_class` images of each class, drawn at random (seeded), in their order."""
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(data.num_classes):
        members = torch.nonzero(data.labels == c).flatten()
        keep.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return data.subset(torch.sort(torch.cat(keep)).values)


def num_batches(num_samples: int, batch_size: int, drop_last: bool = False, world_size: int = 1) -> int:
    """How many batches `iterate_batches` yields per rank."""
    per_rank = math.ceil(num_samples / world_size)
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


def iterate_batches(
    data: ImageData,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    pad: bool = True,
    repeats: int = 1,
) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of (uint8 images, labels) batches.

    With `world_size` > 1 every rank must pass a generator in the same state: each takes every
    world_size-th index of the same permutation, padded (by repeating its start, as
    DistributedSampler does) so all ranks run the same number of batches. Evaluation passes
    `pad=False` so that no image is counted twice.

    `repeats` > 1 is repeated augmentation (Hoffer et al. 2020, "Augment your batch"; Berman et
    al. 2019; used by DeiT): every (global) batch holds batch/repeats distinct images, each
    `repeats` times, for augmentation to draw differently; the epoch keeps its length, so it sees
    1/repeats of the images. Copies are laid out a, b, c, ..., a, b, c, ... so that a batch
    flipped end to end (how Mixup and CutMix pair images) rarely pairs an image with itself.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if repeats > 1 and n:
        order = _repeated(order, batch_size * world_size, repeats)
    # Indices where the data are (a GPU: one copy per epoch; indexing with host indices would copy,
    # and wait for the GPU, at every batch).
    order = order.to(data.images.device)
    if world_size > 1 and n and not pad:
        order = order[rank::world_size]
    elif world_size > 1 and n:
        padded = math.ceil(n / world_size) * world_size
        order = torch.cat([order, order.repeat(math.ceil(padded / n))])[:padded][rank::world_size]
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield data.images[idx], data.labels[idx]


def _repeated(order: Tensor, batch: int, repeats: int) -> Tensor:
    """`order` laid out for repeated augmentation: each batch is ceil(batch / repeats) images of
    `order`, in turn, tiled `repeats` times and cut to `batch`; as long as `order`."""
    distinct = math.ceil(batch / repeats)
    batches = math.ceil(len(order) / batch)
    # batches * distinct exceeds len(order) only for a data set smaller than one batch's share.
    groups = order.repeat(math.ceil(batches * distinct / len(order)))[:batches * distinct].view(batches, distinct)
    return groups.repeat(1, repeats)[:, :batch].flatten()[:len(order)]


