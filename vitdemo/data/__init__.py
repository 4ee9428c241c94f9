"""Data for training a ViT on small data sets on a CPU.

Images are decoded once, cropped to the model's input and held in memory as one uint8 tensor
(N, 3, S, S). Augmentation then runs on whole batches (`vitdemo.augment`), so the CPU cores go to
the model rather than to DataLoader workers decoding the same JPEGs every epoch.

The modules, in the order data flow through them:

- `images`: open one image safely and decode it to 8-bit RGB (`load_image`), and the words for
  what went wrong with it;
- `preprocessing`: `Preprocessing`, the crop and normalisation a model expects (recorded in its
  checkpoint), and the crop itself (`model_crop`), used alike for training data and inference;
- `folders`: class folders and zips of them; `datasets`: CIFAR-10 and the built-in shapes;
- `batches`: stratified splits and batches;
- `sources`: `training_data`, the one way from any source to training and validation data.

Every data problem raises `DataError` with a message meant for the person who supplied the data.
"""

from .batches import iterate_batches, num_batches, per_class_subset, stratified_sample, stratified_split
from .core import DataError, ImageData
from .datasets import CIFAR10_CLASSES, SHAPES, load_cifar10, synthetic_shapes
from .folders import load_image_folder, load_zip, safe_extract_zip
from .images import decode_rgb, is_bad_image_error, load_image, pillow_errors, to_rgb
from .preprocessing import (
    CIFAR_MEAN,
    CIFAR_STD,
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    channel_statistics,
    model_crop,
    model_crop_batch,
    normalize,
    preprocess,
)
from .sources import (
    CIFAR10,
    SYNTHETIC,
    TrainingData,
    checkpoint_data,
    crop_for,
    data_digest,
    load_source,
    recorded_limits,
    run_split,
    source_name,
    split,
    training_data,
)

__all__ = [
    "CIFAR10",
    "CIFAR10_CLASSES",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "HALF",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SHAPES",
    "SYNTHETIC",
    "DataError",
    "ImageData",
    "Preprocessing",
    "TrainingData",
    "channel_statistics",
    "checkpoint_data",
    "crop_for",
    "data_digest",
    "decode_rgb",
    "is_bad_image_error",
    "iterate_batches",
    "load_cifar10",
    "load_image",
    "load_image_folder",
    "load_source",
    "load_zip",
    "model_crop",
    "model_crop_batch",
    "normalize",
    "num_batches",
    "per_class_subset",
    "pillow_errors",
    "preprocess",
    "recorded_limits",
    "run_split",
    "safe_extract_zip",
    "source_name",
    "split",
    "stratified_sample",
    "stratified_split",
    "synthetic_shapes",
    "to_rgb",
    "training_data",
]
