"""What every data module shares: `DataError` and the in-memory `ImageData`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor



class DataError(ValueError):
    """A problem with the data (missing, malformed, unsafe); the message says what and where."""


@dataclass
class ImageData:
    """A labelled image set held in memory."""

    images: Tensor  # uint8, (N, 3, H, W), all the same size
    labels: Tensor  # int64, (N,), indices into class_names
    class_names: list[str]
    skipped: list[str] = field(default_factory=list)  # "file: reason" for every file not loaded

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise DataError(f"images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise DataError(f"labels must be int64 (N,) with N = {self.images.shape[0]}, got "
                            f"{self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: Tensor) -> "ImageData":
        """The images at `indices` (a copy), with the same class names."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return ImageData(self.images[indices], self.labels[indices], list(self.class_names), list(self.skipped))


