"""Augmentation and regularisation for training small ViTs, on whole batches.

A ViT has none of a CNN's built-in locality, so on a small data set it overfits unless the data are
varied for it: DeiT (Touvron et al. 2021, "Training data-efficient image transformers & distillation
through attention", arXiv 2012.12877) trains ViT-B on ImageNet-1k alone with RandAugment, random
erasing (p 0.25), mixup (alpha 0.8) and CutMix (alpha 1.0) switched per batch with probability 0.5,
and label smoothing 0.1, and each of them helps.

Everything here works on a whole batch (B, 3, H, W) at once, on the CPU or a GPU, in few calls:

- `BatchAugment` (here): the pieces below in DeiT's order, then `normalize`.
  - `RandomCropFlip` (crop_flip.py): per-image random crop and flip, in one gather.
  - `AugmentPolicy` (policy.py): AutoAugment or RandAugment drawn per image but applied once per
    operation, with torchvision's operations (reached through _torchvision.py).
  - `RandomErasing` (erasing.py): one box of noise per image, drawn as torchvision draws it.
- `MixUpCutMix` (mix.py): mixup or CutMix of the batch with itself reversed, and the soft targets.
- `soft_cross_entropy` (mix.py): the loss for those targets.

Randomness comes only from the generators passed in, never from the global RNG when one is given,
so a seed gives the same batches. Draws that decide which code runs (a policy's operations, the
mixing mode and box) are made on the host, so they never make the CPU wait for the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..data import normalize
from .crop_flip import RandomCropFlip
from .erasing import ERASING_ATTEMPTS, ERASING_RATIO, ERASING_SCALE, RandomErasing
from .mix import MixDraw, MixUpCutMix, soft_cross_entropy
from .policy import POLICIES, AugmentPolicy, Draw, Rounds, check_host_generator


class BatchAugment:
    """Training augmentation of a uint8 batch, in DeiT's order: `RandomCropFlip` (crop from the
    image padded by `crop_padding`, flip if `flip`), `AugmentPolicy` if `policy` (on uint8),
    `normalize`, `RandomErasing` with probability `erasing` (on the normalised values, so that its
    noise has the data's scale).

    Call with a `torch.Generator` for reproducible batches (without one the global RNG is used).
    Crop, flip and erasing draw on the generator's device. A policy's draws decide which operation
    runs on which images, so they are read on the host: they come from `host_generator` (a CPU
    generator) if given, else from `generator` if it is a CPU one; a CUDA generator needs a
    `host_generator` beside it.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        crop_padding: int | None = 4,
        flip: bool = True,
        policy: str | None = None,
        erasing: float = 0.0,
        padding_mode: str = "constant",
    ) -> None:
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.crop_flip = RandomCropFlip(image_size, crop_padding, flip, padding_mode)
        self.random_erasing = RandomErasing(erasing)
        self.augment_policy = None if policy is None else AugmentPolicy(policy)

    # The settings, read from the pieces that use them.
    crop_padding = property(lambda self: self.crop_flip.padding)
    flip = property(lambda self: self.crop_flip.flip)
    padding_mode = property(lambda self: self.crop_flip.padding_mode)
    erasing = property(lambda self: self.random_erasing.p)
    policy = property(lambda self: getattr(self.augment_policy, "name", None))  # None: no policy
    policy_transform = property(lambda self: getattr(self.augment_policy, "transform", None))

    def __repr__(self) -> str:
        return (f"BatchAugment(image_size={self.image_size}, crop_padding={self.crop_padding}, flip={self.flip}, "
                f"policy={self.policy!r}, erasing={self.erasing}, padding_mode={self.padding_mode!r})")

    def __call__(self, images_uint8: Tensor, generator: torch.Generator | None = None,
                 host_generator: torch.Generator | None = None) -> Tensor:
        """uint8 (B, 3, H, W) -> augmented, normalised float32 (B, 3, image_size, image_size)."""
        x = images_uint8
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"expected a uint8 batch (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        self.crop_flip.check(*x.shape[-2:])  # every check before the first draw
        host_generator = self._host_generator(generator, host_generator)
        x = self.crop_flip(x, generator)
        if self.augment_policy is not None:
            x = self.augment_policy(x, host_generator)
        x = normalize(x, self.mean, self.std)
        return self.random_erasing(x, generator)

    def _host_generator(self, generator: torch.Generator | None,
                        host_generator: torch.Generator | None) -> torch.Generator | None:
        """The generator the policy draws from: `host_generator`, else `generator` if on the CPU."""
        check_host_generator(host_generator)
        if self.augment_policy is None or host_generator is not None:
            return host_generator
        if generator is not None and generator.device.type != "cpu":
            # Reading draws made on the GPU back to the host would wait for the GPU every batch.
            raise ValueError(f"the {self.policy} policy draws its operations on the host: with a generator on "
                             f"{generator.device}, also pass host_generator=torch.Generator() (a CPU generator)")
        return generator

    def policy_draws(self, x: Tensor, host_generator: torch.Generator | None = None) -> Rounds:
        """The policy's draws for the batch `x` (`AugmentPolicy.draws`); [] without a policy."""
        return [] if self.augment_policy is None else self.augment_policy.draws(x, host_generator)

    def erasing_draws(self, batch: int, height: int, width: int,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The boxes random erasing draws for a batch (`RandomErasing.draws`)."""
        return self.random_erasing.draws(batch, height, width, generator)


__all__ = ["ERASING_ATTEMPTS", "ERASING_RATIO", "ERASING_SCALE", "POLICIES", "AugmentPolicy", "BatchAugment", "Draw",
           "MixDraw", "MixUpCutMix", "RandomCropFlip", "RandomErasing", "soft_cross_entropy"]
