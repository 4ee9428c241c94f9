"""The batches an epoch trains on: its random streams, and augmentation ahead of the step."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from ..augment import BatchAugment

AUGMENT_AHEAD = 16  # batches augmented in one call on a GPU (see augmented)


def epoch_streams(seed: int, epoch: int, rank: int, device: torch.device,
                  ) -> tuple[torch.Generator, torch.Generator, torch.Generator, np.random.Generator]:
    """The epoch's random streams, from (seed, epoch, rank) alone, so that a resumed run repeats
    them exactly: (batch order, augmentation, the host's augmentation draws, mixing); dropout and
    stochastic depth draw from the global generator, which this seeds.

    The order is every rank's: each takes its share of one permutation. The others are the
    rank's own, or every rank would crop, flip and erase its i-th image as the others do theirs
    (see `_own_seed`)."""
    order_seed, augment_seed = seed * 100_003 + epoch, _own_seed(seed * 7 + epoch, seed, epoch, rank)
    torch.manual_seed(_own_seed(order_seed, seed, epoch, rank))
    order = torch.Generator().manual_seed(order_seed)
    augment = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(augment_seed)
    # Draws the host acts on (which operation an image gets, how a batch is mixed) come from CPU
    # generators: drawn on a GPU, reading them would wait for it.
    host = augment if augment.device.type == "cpu" else torch.Generator().manual_seed(augment_seed)
    mixing = np.random.default_rng((seed, epoch) if rank == 0 else (seed, epoch, rank))
    return order, augment, host, mixing


def _own_seed(shared: int, seed: int, epoch: int, rank: int) -> int:
    """The seed of a stream of the rank's own that one process seeds with `shared`: `shared`
    itself on rank 0, so that rank 0 and every single-process run draw what runs always drew; on
    another rank a 32-bit hash of (seed, epoch, rank, shared). Not an offset in the high bits:
    PyTorch's CPU generator reads only the low 32 bits of a seed."""
    if rank == 0:
        return shared
    return int(np.random.SeedSequence((seed, epoch, rank, shared)).generate_state(1)[0])


def augmented(batches: Iterator[tuple[Tensor, Tensor]], augment: BatchAugment, device: torch.device,
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
