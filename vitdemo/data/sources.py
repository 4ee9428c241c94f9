"""The one way from a data source to training and validation data, for the CLI and the app alike.

A source is "synthetic" (the built-in shapes), "cifar10" (torchvision's copy), a folder of class
folders or a .zip of them. Every source is loaded at the model's crop (`Preprocessing`), at any
image size, and split with a seeded stratified split. A model trained from scratch normalises
with its training images' own statistics, measured here; a model fine-tuned from another keeps
the crop and normalisation of its start, so training and prediction see the same pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .batches import per_class_subset, stratified_split
from .core import DataError, ImageData
from .datasets import load_cifar10, synthetic_shapes
from .folders import load_image_folder, load_zip
from .preprocessing import HALF, Preprocessing, channel_statistics

SYNTHETIC, CIFAR10 = "synthetic", "cifar10"
SYNTHETIC_PER_CLASS = 300  # the built-in shapes' default size: 1,200 images of 4 classes


@dataclass
class TrainingData:
    """Training and validation images at the model's crop, and the preprocessing to train and
    predict with (the one the checkpoint records)."""

    train: ImageData
    val: ImageData | None  # None: no images held out
    preprocessing: Preprocessing
    class_names: list[str]
    skipped: list[str]  # "file: reason" for every file of the source not loaded
    digest: str  # `data_digest` of all the images, before the split (recorded with the model)


def crop_for(image_size: int) -> Preprocessing:
    """The crop of a new model: the whole image, its shorter side at `image_size`, bicubic. Its
    normalisation is a placeholder until `training_data` measures the training images'."""
    return Preprocessing(image_size, HALF, HALF)


def load_source(
    source: str | os.PathLike,
    crop: Preprocessing,
    *,
    data_root: str | os.PathLike = "data",
    download: bool = False,
    max_images_per_class: int | None = None,
    synthetic_classes: int = 4,
    seed: int = 0,
    **zip_limits: Any,
) -> ImageData:
    """Every image of `source` (at most `max_images_per_class` of each class, drawn with `seed`)
    as `crop` makes it: uint8 (N, 3, crop.image_size, crop.image_size).

    `data_root` is where torchvision's CIFAR-10 lives (`download` fetches it, online only);
    `zip_limits` are `safe_extract_zip`'s `max_total_bytes` and `max_files`. Raises `DataError`.
    """
    if str(source) == SYNTHETIC:
        per_class = max_images_per_class or SYNTHETIC_PER_CLASS
        # Drawn at 32 px, as the built-in data set is defined, then cropped like any source.
        data = synthetic_shapes(num_classes=synthetic_classes, per_class=per_class, image_size=32, seed=seed)
        return ImageData(crop.crop_batch(data.images), data.labels, list(data.class_names))
    if str(source) == CIFAR10:
        data = load_cifar10(data_root, train=True, download=download)
        if max_images_per_class:
            data = per_class_subset(data, max_images_per_class, seed)
        return ImageData(crop.crop_batch(data.images), data.labels, list(data.class_names))
    path = Path(source).expanduser()
    crop_args = {"image_size": crop.image_size, "resize": crop.resize, "interpolation": crop.interpolation,
                 "max_images_per_class": max_images_per_class}
    if path.suffix.lower() == ".zip":
        return load_zip(path, **crop_args, **zip_limits)
    if zip_limits:
        raise TypeError(f"zip limits {sorted(zip_limits)} given for a folder: {path.name}")
    return load_image_folder(path, **crop_args)


def split(data: ImageData, val_size: int | float, seed: int = 0,
          max_val_images: int | None = None) -> tuple[ImageData, ImageData | None]:
    """Stratified, seeded train/validation split: `val_size` images if >= 1, else that fraction
    (at least one per class, at most `max_val_images`); 0 holds none out."""
    if not val_size:
        return data, None
    count = int(val_size) if val_size >= 1 else max(data.num_classes, round(val_size * len(data)))
    if max_val_images is not None:
        count = min(count, max_val_images)
    if len(data) - count < data.num_classes:
        raise DataError(f"too few images to train and validate: {len(data)} for {data.num_classes} classes; "
                        f"give each class at least 3 images")
    train_idx, val_idx = stratified_split(data.labels, count, seed=seed)
    return data.subset(train_idx), data.subset(val_idx)


def source_name(source: str | os.PathLike) -> str:
    """How a run records its source: a built-in name as it is, a folder or zip as an absolute path
    (a relative one would name another folder from another directory)."""
    return str(source) if str(source) in (SYNTHETIC, CIFAR10) else str(Path(source).expanduser().resolve())


def data_digest(data: ImageData) -> str:
    """A fingerprint of the images and labels (SHA-256, 16 hex digits): the same data give the
    same digest wherever they are, so a checkpoint can tell its own training data from others."""
    digest = hashlib.sha256()
    digest.update(json.dumps(list(data.class_names)).encode())
    digest.update(data.labels.contiguous().numpy().tobytes())
    digest.update(memoryview(data.images.contiguous().numpy()))
    return digest.hexdigest()[:16]


def _crop(image_size: int | None, start: Preprocessing | None) -> Preprocessing:
    if start is None and image_size is None:
        raise TypeError("the model's image_size or its starting preprocessing is needed")
    crop = start if start is not None else crop_for(image_size)
    return crop.at_size(image_size) if image_size is not None and image_size != crop.image_size else crop


def training_data(
    source: str | os.PathLike,
    image_size: int | None = None,
    *,
    start: Preprocessing | None = None,
    val_size: int | float = 0.1,
    split_seed: int = 0,
    max_val_images: int | None = None,
    max_images: int | None = None,
    **load: Any,
) -> TrainingData:
    """`source` split into training and validation images at a model's crop.

    Fine-tuning passes the starting model's preprocessing as `start`: its crop and normalisation
    are kept (moved to `image_size` if that differs, `Preprocessing.at_size`). A new model passes
    only `image_size`: the whole image at that size, bicubic, normalised with the mean and std of
    the training images (measured; the validation images play no part). `max_images` caps the
    total, the same number from each class. `load` goes to `load_source`.
    """
    crop = _crop(image_size, start)
    data = load_source(source, crop, **load)
    if max_images is not None and len(data) > max_images:
        data = per_class_subset(data, max(2, max_images // data.num_classes), load.get("seed", 0))
    if data.num_classes < 2:
        raise DataError(f"training needs at least two classes (a folder each); the data have {data.num_classes}")
    train, val = split(data, val_size, split_seed, max_val_images)
    prep = crop if start is not None else replace(crop, **dict(zip(("mean", "std"), channel_statistics(train.images))))
    return TrainingData(train, val, prep, list(data.class_names), list(data.skipped), data_digest(data))


def recorded_limits(meta: dict[str, Any]) -> dict[str, Any]:
    """The `load_source` options a checkpoint's run loaded its data with."""
    return {"max_images_per_class": meta.get("max_images_per_class"), "seed": int(meta.get("data_seed", 0))}


def run_split(meta: dict[str, Any], data: ImageData, source: str | os.PathLike | None = None) -> TrainingData | None:
    """The training and held-out images of the run that made a checkpoint, if `data` (loaded at
    its crop with `recorded_limits`) are the images it trained on: the same digest, or for a
    checkpoint without one, the same `source`. None for other data, or a split not recorded."""
    if meta.get("val_size") is None or meta.get("split_seed") is None:
        return None
    if meta.get("data_digest") is not None:
        same = data_digest(data) == meta["data_digest"]
    else:
        same = source is not None and meta.get("data") is not None and source_name(source) == source_name(meta["data"])
    if not same:
        return None
    train, val = split(data, meta["val_size"], int(meta["split_seed"]))
    return TrainingData(train, val, Preprocessing.for_checkpoint(meta), list(data.class_names), list(data.skipped),
                        data_digest(data))


def checkpoint_data(meta: dict[str, Any], source: str | os.PathLike | None = None, **load: Any) -> TrainingData:
    """The training and held-out images of the run that made a checkpoint, from its recorded data
    or from `source` (the same data in another place). `load` goes to `load_source`
    (`data_root`, `download`). Raises `DataError` if they are not its data or it recorded no split."""
    source = source if source is not None else meta.get("data")
    if source is None:
        raise DataError("the checkpoint does not record its data: give the source")
    data = load_source(source, Preprocessing.for_checkpoint(meta), **recorded_limits(meta), **load)
    run = run_split(meta, data, source)
    if run is None:
        raise DataError(f"{Path(str(source)).name} is not the data the checkpoint's run recorded, or it recorded no "
                        f"validation split")
    return run


__all__ = ["CIFAR10", "SYNTHETIC", "TrainingData", "checkpoint_data", "crop_for", "data_digest", "load_source",
           "recorded_limits", "run_split", "source_name", "split", "training_data"]
