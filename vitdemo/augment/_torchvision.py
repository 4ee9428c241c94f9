"""The one place that reaches into torchvision's private API (written against torchvision 0.29.1).

`v2.RandAugment` and `v2.AutoAugment` draw one operation for their whole input, so a batch passed
to them gets the same operation on every image. `AugmentPolicy` instead draws per image and runs
each operation once on the images that drew it, which needs what `forward` keeps to itself: the
table of operations and magnitudes, AutoAugment's sub-policies, and the function that applies one
operation. If a torchvision upgrade moves them, only this file changes; `tests/test_augment.py`
checks the results image for image against these same operations.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torchvision.transforms import v2

PolicyTransform = v2.RandAugment | v2.AutoAugment
# Per operation name: (magnitudes(num_bins, height, width) -> Tensor or None, signed?).
AugmentationSpace = dict[str, tuple[Callable[[int, int, int], Tensor | None], bool]]


def augmentation_space(transform: PolicyTransform) -> AugmentationSpace:
    """The transform's operations in torchvision's order (RandAugment draws an index into it)."""
    return transform._AUGMENTATION_SPACE


def subpolicies(transform: v2.AutoAugment) -> list[tuple[tuple[str, float, int | None], ...]]:
    """AutoAugment's sub-policies: per sub-policy, two (operation, probability, magnitude bin)."""
    return transform._policies


def apply_operation(transform: PolicyTransform, images: Tensor, name: str, magnitude: float) -> Tensor:
    """One operation at one signed magnitude on uint8 images (..., C, H, W), exactly as the
    transform's `forward` applies it (its interpolation and fill)."""
    return transform._apply_image_or_video_transform(images, name, magnitude, interpolation=transform.interpolation,
                                                     fill=transform._fill)
