"""What a model reads of an image: `Preprocessing` (the crop and normalisation a checkpoint
records), the centre crop (`model_crop`, one image or a batch) and `normalize`.

Training data are stored as `model_crop` makes them and inference applies the same function, so
prediction sees exactly the pixels training saw.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from .images import to_rgb

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # CIFAR-10's training set (`channel_statistics` measures them)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # [0, 1] to [-1, 1], as the paper's JAX code scales every image


def _check_crop(image_size: int, resize: int | None) -> int:
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    resize = resize or image_size
    if resize < image_size:
        raise ValueError(f"resize ({resize}) must be at least image_size ({image_size})")
    return resize


def _crop_geometry(width: int, height: int, image_size: int, resize: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized_w, resized_h), (left, top)): the size the shorter side's resize gives and the
    centre crop's corner in it, with torchvision's rounding (`resize` to one side, `center_crop`),
    so that the crop is the one `preprocess` makes."""
    short, long = sorted((width, height))
    new_long = int(resize * long / short)  # torchvision truncates
    new_w, new_h = (resize, new_long) if width <= height else (new_long, resize)
    return (new_w, new_h), (int(round((new_w - image_size) / 2.0)), int(round((new_h - image_size) / 2.0)))


# torchvision's names for Pillow's filters (the same filters TF.resize applies to PIL images).
_PIL_RESAMPLING = {
    TF.InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    TF.InterpolationMode.NEAREST_EXACT: Image.Resampling.NEAREST,
    TF.InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    TF.InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    TF.InterpolationMode.BOX: Image.Resampling.BOX,
    TF.InterpolationMode.HAMMING: Image.Resampling.HAMMING,
    TF.InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
}


def model_crop(image: Image.Image, image_size: int, *, resize: int | None = None,
               interpolation: str | TF.InterpolationMode = "bicubic", size: int | None = None) -> Image.Image:
    """The square the model sees of `image`: shorter side to `resize` (default `image_size`),
    then the central image_size x image_size square, as 8-bit RGB.

    With `size` left out (or equal to `image_size`) these are exactly the pixels `preprocess`
    normalises and `load_image_folder` stores. With another `size` the same square of the
    original is drawn at size x size, straight from the original's pixels (sharper than
    enlarging the model's pixels), so that a map on the model's patch grid, stretched to that
    size, lies over the pixels each patch was made of. Pillow antialiases when it shrinks.
    """
    resize = _check_crop(image_size, resize)
    interpolation = TF.InterpolationMode(interpolation)
    if image.mode != "RGB" or "transparency" in image.info:
        image = to_rgb(image)
    if size is None or size == image_size:
        if image.size == (image_size, image_size) and resize == image_size:
            return image  # already the right size (CIFAR): nothing to do
        image = TF.resize(image, [resize], interpolation=interpolation)
        return TF.center_crop(image, [image_size, image_size])
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    (new_w, new_h), (left, top) = _crop_geometry(*image.size, image_size, resize)
    sx, sy = image.width / new_w, image.height / new_h  # resized pixels -> original pixels
    box = (left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy)
    return image.resize((size, size), _PIL_RESAMPLING[interpolation], box=box)


def model_crop_batch(images: Tensor, image_size: int, *, resize: int | None = None,
                     interpolation: str | TF.InterpolationMode = "bicubic") -> Tensor:
    """`model_crop` of every image of a uint8 batch (N, 3, H, W) -> uint8 (N, 3, S, S): images
    resized for training exactly as `preprocess` resizes one for prediction (through Pillow, the
    same filter, antialiased when shrinking), so a model trains on the pixels it will be shown."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a uint8 batch (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    resize = _check_crop(image_size, resize)
    if images.shape[-2:] == (image_size, image_size) and resize == image_size:
        return images  # nothing to do (CIFAR at 32 px)
    hwc = images.permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty((len(hwc), image_size, image_size, 3), dtype=np.uint8)  # Pillow's layout: plain copies

    def crop(i: int) -> None:
        out[i] = np.asarray(model_crop(Image.fromarray(hwc[i]), image_size, resize=resize, interpolation=interpolation))

    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:  # Pillow's resampling releases the GIL
        list(pool.map(crop, range(len(hwc))))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# Normalisation (augmentation on whole batches is in vitdemo.augment)
# ---------------------------------------------------------------------------------------------


def normalize(images_uint8: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (B, 3, H, W) or (3, H, W) -> float32 (x / 255 - mean) / std."""
    shape = (3, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images_uint8.device).view(shape)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images_uint8.device).view(shape)
    # One multiply-add instead of three passes over the batch.
    return torch.addcmul(-mean_t / std_t, images_uint8.to(torch.float32), 1.0 / (255.0 * std_t))


def channel_statistics(images_uint8: Tensor, decimals: int = 4) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of uint8 images (N, 3, H, W) scaled to [0, 1], rounded to
    `decimals` so that a checkpoint records readable numbers: the normalisation a model trained
    from scratch on these images uses (CIFAR-10's training set gives the published
    (0.4914, 0.4822, 0.4465) and (0.2470, 0.2435, 0.2616))."""
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] != 3 or not len(images_uint8):
        raise ValueError(f"expected a non-empty uint8 batch (N, 3, H, W), got {images_uint8.dtype} "
                         f"{tuple(images_uint8.shape)}")
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(images_uint8), 1024):  # in chunks: a float copy of 50,000 images is 600 MB
        chunk = images_uint8[start:start + 1024].to(torch.float64) / 255.0
        total += chunk.sum(dim=(0, 2, 3))
        squares += chunk.square().sum(dim=(0, 2, 3))
    count = images_uint8.numel() / 3
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)  # a flat channel: no division by 0
    return tuple(round(float(m), decimals) for m in mean), tuple(round(float(s), decimals) for s in std)


def preprocess(
    image: Image.Image,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resize: int | None = None,
    interpolation: str | TF.InterpolationMode = "bicubic",
) -> Tensor:
    """A PIL image -> normalised float (1, 3, S, S): `model_crop` (shorter side to `resize`,
    default image_size, centre crop), then normalise. With the defaults it gives exactly the
    pixels `load_image_folder` stores, so prediction sees what training saw."""
    image = model_crop(image, image_size, resize=resize, interpolation=interpolation)
    return normalize(TF.pil_to_tensor(image).unsqueeze(0), mean, std)



# ---------------------------------------------------------------------------------------------
# The one description of a model's input
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """The input transform a model expects, as its checkpoint records it: the shorter side
    resized to `resize` with `interpolation`, the central `image_size` square, scaled to [0, 1]
    and normalised per channel, (x - mean) / std.

    The one value the training data, the engine, inference, the pictures and the runtimes all
    read, so none of them can crop or normalise differently. `resize` 0 means `image_size`
    (no margin: the whole image squeezed to its shorter side, as CIFAR's 32 px are).
    """

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int = 0
    interpolation: str = "bicubic"

    KEYS = ("image_size", "resize", "interpolation", "mean", "std")  # its entries in checkpoint metadata

    def __post_init__(self) -> None:
        set_ = object.__setattr__.__get__(self)  # frozen: normalise the fields once, here
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}")
        set_("resize", _check_crop(self.image_size, int(self.resize or self.image_size)))
        try:
            set_("interpolation", TF.InterpolationMode(self.interpolation).value)
        except ValueError:
            names = ", ".join(m.value for m in _PIL_RESAMPLING)
            raise ValueError(f"interpolation must be one of {names}, got {self.interpolation!r}") from None
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3 or not all(math.isfinite(v) for v in values):
                raise ValueError(f"{name} must be three finite numbers (R, G, B), got {getattr(self, name)!r}")
            set_(name, values)
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    @classmethod
    def for_checkpoint(cls, meta: Mapping[str, Any]) -> "Preprocessing":
        """The preprocessing recorded in a checkpoint's metadata (`load_checkpoint`, `read_metadata`)."""
        return cls(int(meta["image_size"]), tuple(meta["mean"]), tuple(meta["std"]),
                   resize=int(meta.get("resize") or 0), interpolation=meta.get("interpolation", "bicubic"))

    def to_dict(self) -> dict[str, Any]:
        """Its checkpoint metadata entries (JSON: lists, not tuples)."""
        return {"image_size": self.image_size, "resize": self.resize, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std)}

    def at_size(self, image_size: int) -> "Preprocessing":
        """The same transform for a model fine-tuned at another resolution (the paper's Sec. 3.2):
        the margin between resize and crop keeps its proportion (256/224 at 384 px: 439)."""
        return replace(self, image_size=image_size, resize=round(self.resize * image_size / self.image_size))

    def crop_args(self) -> dict[str, Any]:
        """`image_size`, `resize`, `interpolation`: the keyword arguments of `model_crop` and of the
        pictures drawn over the model's crop (`visualize.overlay`, `patch_grid`)."""
        return {"image_size": self.image_size, "resize": self.resize, "interpolation": self.interpolation}

    def crop(self, image: Image.Image, size: int | None = None) -> Image.Image:
        """The square of `image` the model reads, as 8-bit RGB (`model_crop`)."""
        return model_crop(image, size=size, **self.crop_args())

    def crop_batch(self, images_uint8: Tensor) -> Tensor:
        """`crop` of every image of a uint8 batch: training data as inference will see them."""
        return model_crop_batch(images_uint8, **self.crop_args())

    def normalize(self, images_uint8: Tensor) -> Tensor:
        """Cropped uint8 images -> the model's float input."""
        return normalize(images_uint8, self.mean, self.std)

    def __call__(self, image: Image.Image) -> Tensor:
        """A PIL image -> the model's input, float (1, 3, image_size, image_size)."""
        return preprocess(image, self.image_size, self.mean, self.std, resize=self.resize,
                          interpolation=self.interpolation)
