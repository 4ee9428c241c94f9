"""Data for training a ViT on small data sets on a CPU.

Images are decoded once, resized to the model's size and held in memory as one uint8 tensor
(N, 3, S, S). Augmentation then runs on whole batches (`vitdemo.augment`), so the CPU cores go to
the model rather than to DataLoader workers decoding the same JPEGs every epoch.

Read top to bottom: the `ImageData` container, opening one image safely, folders and zips,
CIFAR-10, the built-in synthetic data set, splitting, batching and augmentation, and the
inference path (`load_image`, `preprocess`). Every data problem raises `DataError` with a
message meant for the person who supplied the data.
"""

from __future__ import annotations

import gzip
import http.client
import io
import math
import os
import shutil
import ssl
import stat
import struct
import sys
import tarfile
import tempfile
import urllib.error
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


# ---------------------------------------------------------------------------------------------
# One image: open safely, convert to 8-bit RGB, resize
# ---------------------------------------------------------------------------------------------

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode Pillow opens, without losing the picture on the way."""
    if image.mode in _SIXTEEN_BIT:
        # Pillow's own I;16 -> L conversion clips at 255, turning a 16-bit photo white. Scale instead.
        a = np.asarray(image).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):  # 32-bit 'I' data: stretch its own range
            a = (a - a.min()) * 65535 // max(int(a.max() - a.min()), 1)
        image = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8))
    elif image.mode == "F":
        a = np.nan_to_num(np.asarray(image, dtype=np.float32))
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:  # float images are usually in [0, 1]
            a = a * 255.0
        image = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        # Transparent areas are undefined colour; composite on white as browsers and viewers show them.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def _check_bomb(image: Image.Image) -> None:
    # Pillow only warns between 1x and 2x its limit; we refuse anything above it, and check
    # ourselves because warning filters are process-global and not safe to flip inside threads.
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise DataError(f"image too large ({image.width}x{image.height} = {image.width * image.height:,} pixels), "
                        f"refused as a possible decompression bomb (limit: Image.MAX_IMAGE_PIXELS = {limit:,})")


# What Pillow raises when a file's bytes are not a sound image: its decoders' OSError without an
# errno ("broken data stream", "image file is truncated"; UnidentifiedImageError is one too), and
# from the format plugins that parse headers SyntaxError, ValueError, EOFError, struct.error,
# zlib.error, and even IndexError, KeyError or TypeError (a corrupted QOI file raised IndexError
# in a fuzz run of every format Pillow writes).
_PILLOW_DATA_ERRORS = (SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError,
                       struct.error, zlib.error, Image.DecompressionBombError, Image.DecompressionBombWarning)


def is_bad_image_error(exc: BaseException) -> bool:
    """Whether `exc`, raised by Pillow while it opened or decoded an image, blames the image's
    bytes (not an image, truncated, corrupt, a decompression bomb), as opposed to the machine (a
    MemoryError; an OSError with an errno, which comes from the file system: permission denied,
    an I/O error) or a bug (AttributeError, NameError, ...). Use it only around Pillow's own calls,
    so that a bug in the code around them is never taken for a bad file."""
    if isinstance(exc, OSError):
        return exc.errno is None
    return isinstance(exc, (DataError, *_PILLOW_DATA_ERRORS))


def decode_rgb(image: Image.Image) -> Image.Image:
    """An opened image (Pillow decodes lazily) decoded fully, so that truncated data fail here,
    turned upright (EXIF orientation) and converted to 8-bit RGB (`to_rgb`).

    Bad image data raise `DataError` saying what is wrong; anything else (a MemoryError, an
    error of the file system, a bug) propagates as it is."""
    try:
        _check_bomb(image)
        image.load()
        image = ImageOps.exif_transpose(image)  # phone photos store rotation in EXIF
    except Exception as exc:
        if not is_bad_image_error(exc):
            raise
        raise DataError(_describe(exc)) from exc
    return to_rgb(image)


def _open_rgb(source: str | os.PathLike | IO[bytes]) -> Image.Image:
    """Open and `decode_rgb` one image. `DataError` for bad image data; an OSError with an errno
    (file missing, permission denied) and anything else propagate."""
    try:
        opened = Image.open(source)
    except Exception as exc:
        if not is_bad_image_error(exc):
            raise
        raise DataError(_describe(exc)) from exc
    with opened as image:
        return decode_rgb(image)


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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DataError):
        return str(exc)
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image (Pillow cannot identify it)"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"image too large, refused as a possible decompression bomb ({exc})"
    if "truncated" in str(exc).lower():
        return f"truncated file ({type(exc).__name__}: {exc})"
    return f"corrupt or unreadable ({type(exc).__name__}: {exc})"


# ---------------------------------------------------------------------------------------------
# Image folders and zips
# ---------------------------------------------------------------------------------------------


def _visible(entry: os.DirEntry | Path) -> bool:
    # Hidden files (.DS_Store, ._resource forks) and macOS zip debris are never data.
    return not entry.name.startswith(".") and entry.name != "__MACOSX"


def _subdirs(path: Path) -> list[Path]:
    with os.scandir(path) as entries:
        return sorted(Path(e.path) for e in entries if _visible(e) and e.is_dir())


def _has_files(path: Path) -> bool:
    with os.scandir(path) as entries:
        return any(_visible(e) and e.is_file() for e in entries)


def _find_class_root(root: Path) -> Path:
    """Descend through single wrapper folders (zip/pizza/<class>, cifar10/train/<class>)."""
    for _ in range(8):
        subdirs = _subdirs(root)
        if len(subdirs) != 1 or _has_files(subdirs[0]) or not _subdirs(subdirs[0]):
            return root
        root = subdirs[0]
    return root


def _list_files(class_dir: Path) -> list[Path]:
    """Every visible file below `class_dir`, sorted, so the order is the same on every machine."""
    files = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        files += [Path(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    return files


def _load_chunk(jobs: list[tuple[int, Path]], out: Tensor, size: int, resize: int | None = None,
                interpolation: str = "bicubic") -> list[tuple[int, str]]:
    """Decode a chunk of files into rows of `out`; return (row, reason) for those skipped: bad
    image data, or a file the file system will not read. Anything else (a MemoryError, a bug)
    propagates and stops the load, instead of skipping every file."""
    failed = []
    for row, path in jobs:
        try:
            image = _open_rgb(path)
        except DataError as exc:
            failed.append((row, str(exc)))
            continue
        except OSError as exc:  # from the file system (errno set): permission denied, an I/O error
            failed.append((row, f"cannot read the file ({exc.strerror or exc})"))
            continue
        image = model_crop(image, size, resize=resize, interpolation=interpolation)
        out[row] = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # np.array: a writable copy
    return failed


def _auto_workers(sample: list[Path]) -> int:
    """Threads pay off only when decoding (which releases the GIL) outweighs Pillow's Python-level
    work per file (~80 us, GIL held): for tiny images such as CIFAR's 32 x 32 JPEGs two threads
    are twice as slow as one, for photos they are nearly twice as fast."""
    pixels = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the loader reports those
        for path in sample:
            try:
                with Image.open(path) as image:  # reads the header only
                    pixels.append(image.width * image.height)
            except Exception as exc:
                if not isinstance(exc, OSError) and not is_bad_image_error(exc):
                    raise
                continue  # a bad or unreadable file: the loader reports it
    if not pixels or sorted(pixels)[len(pixels) // 2] < 128 * 128:
        return 1
    return min(8, (os.cpu_count() or 1) + 2)  # a few extra threads cover waiting on file reads


def load_image_folder(
    root: str | os.PathLike,
    image_size: int = 224,
    max_images_per_class: int | None = None,
    progress: bool = True,
    num_workers: int | None = None,
    resize: int | None = None,
    interpolation: str = "bicubic",
) -> ImageData:
    """Load an ImageFolder tree, root/<class>/<image>, into memory at image_size x image_size.

    Classes are the sub-folders, sorted by name. Files that are not readable images are skipped
    and listed in `skipped`. `max_images_per_class` keeps the first files of each class by name.
    Each image is stored as `model_crop` makes it: pass the `resize` and `interpolation` of the
    preprocessing the model will be used with (a fine-tune's, e.g. 256 for 224) so that training
    sees the pixels `preprocess` will show it.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        hint = " (for a zip file use load_zip)" if zipfile.is_zipfile(root) else ""
        raise DataError(f"not a folder: {root}{hint}")
    if not isinstance(image_size, int) or image_size <= 0:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    if resize is not None and resize < image_size:
        raise DataError(f"resize ({resize}) must be at least image_size ({image_size})")
    root = _find_class_root(root)
    class_dirs = _subdirs(root)
    if not class_dirs:
        raise DataError(f"no class folders in {root}: expected one sub-folder per class, root/<class>/<image>")
    if len(class_dirs) < 2:
        raise DataError(f"needs at least 2 classes, found 1: {[class_dirs[0].name]} (in {root})")
    if all(not _has_files(d) and _subdirs(d) for d in class_dirs):
        # e.g. pizza_steak_sushi/{train,test}/<class>: loading would make 'train' and 'test' the classes.
        names = [d.name for d in class_dirs]
        raise DataError(f"{root} holds folders of class folders {names}, not images; "
                        f"point at one of them, e.g. {class_dirs[0]}")

    jobs: list[tuple[int, Path]] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = _list_files(class_dir)[:max_images_per_class]
        jobs += [(len(jobs) + i, f) for i, f in enumerate(files)]
        labels += [label] * len(files)
    if not jobs:
        raise DataError(f"no files in the class folders of {root}")

    images = torch.empty((len(jobs), 3, image_size, image_size), dtype=torch.uint8)
    workers = num_workers or _auto_workers([path for _, path in jobs[:: max(1, len(jobs) // 16)]])
    chunk = max(1, min(256, len(jobs) // (workers * 8)))
    failed: list[tuple[int, str]] = []
    bar = tqdm(total=len(jobs), desc="loading images", unit="img",
               disable=not (progress and sys.stderr.isatty()))
    with warnings.catch_warnings(), ThreadPoolExecutor(workers) as pool, bar:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # _check_bomb reports it instead
        futures = {pool.submit(_load_chunk, jobs[i:i + chunk], images, image_size, resize, interpolation):
                   len(jobs[i:i + chunk])
                   for i in range(0, len(jobs), chunk)}
        for future in as_completed(futures):
            failed += future.result()
            bar.update(futures[future])

    ok = torch.ones(len(jobs), dtype=torch.bool)
    skipped = []
    for row, reason in sorted(failed):
        ok[row] = False
        skipped.append(f"{jobs[row][1].relative_to(root)}: {reason}")
    label_tensor = torch.tensor(labels, dtype=torch.int64)[ok]
    if not ok.any():
        raise DataError(f"no readable images in {root} ({len(skipped)} files skipped, e.g. {skipped[0]})")
    counts = torch.bincount(label_tensor, minlength=len(class_dirs))
    empty = [d.name for d, n in zip(class_dirs, counts.tolist()) if n == 0]
    if empty:
        raise DataError(f"class folder(s) with no readable images: {empty} (in {root})")
    images = images if ok.all() else images[ok]
    return ImageData(images, label_tensor, [d.name for d in class_dirs], skipped)


def safe_extract_zip(
    zip_path: str | os.PathLike, dest: str | os.PathLike, max_total_bytes: int = 2 * 1024**3, max_files: int = 100_000
) -> Path:
    """Extract a zip from an untrusted source into `dest`, refusing anything that could escape
    `dest` or fill the disk. Only regular files and folders are written; nested zips stay files."""
    dest = Path(dest)
    try:
        archive = zipfile.ZipFile(zip_path)
    except FileNotFoundError:
        raise DataError(f"zip file not found: {zip_path}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"not a valid zip file: {zip_path} ({exc})") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > max_files:
            raise DataError(f"zip has {len(infos):,} entries, more than the limit of {max_files:,}")
        declared = 0
        for info in infos:
            _check_entry(info)
            declared += info.file_size
            if declared > max_total_bytes:
                raise DataError(f"zip too large: entry {info.filename!r} takes the declared uncompressed size to "
                                f"{declared:,} bytes, over the limit of {max_total_bytes:,} bytes")
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        written = 0
        for info in infos:
            target = dest.joinpath(*_entry_parts(info.filename))
            if root not in target.resolve().parents:  # e.g. a symlink that was already in dest
                raise DataError(f"unsafe zip entry {info.filename!r}: resolves outside {dest}")
            try:
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(target, "wb") as dst:
                    # Count what really comes out: the sizes in the header are the sender's claim.
                    while block := src.read(1 << 20):
                        written += len(block)
                        if written > max_total_bytes:
                            raise DataError(f"zip too large: entry {info.filename!r} takes the extracted size "
                                            f"over the limit of {max_total_bytes:,} bytes")
                        dst.write(block)
            except DataError:
                raise
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError, OSError) as exc:
                # A bad CRC or broken deflate data, an unsupported compression method, a file where
                # a folder is, a full disk: what a damaged zip or this machine raise. Anything
                # else is a bug and surfaces as it is.
                raise DataError(f"could not extract entry {info.filename!r}: {type(exc).__name__}: {exc}") from None
    return dest


def _entry_parts(name: str) -> list[str]:
    # Windows zips may use backslashes; treat them as separators so '..\\x' cannot hide.
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def _check_entry(info: zipfile.ZipInfo) -> None:
    name = info.filename
    unix = name.replace("\\", "/")
    if unix.startswith("/") or (len(unix) > 1 and unix[0].isalpha() and unix[1] == ":"):  # /x, C:/x
        raise DataError(f"unsafe zip entry {name!r}: absolute path")
    if ".." in _entry_parts(name):
        raise DataError(f"unsafe zip entry {name!r}: '..' would write outside the destination")
    if not _entry_parts(name):
        raise DataError(f"unsafe zip entry {name!r}: empty name")
    # Unix st_mode in the high bits; the file-type bits are 0 when the zip tool did not record them.
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise DataError(f"unsafe zip entry {name!r}: symbolic link")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise DataError(f"unsafe zip entry {name!r}: not a regular file or folder")
    if info.flag_bits & 0x1:
        raise DataError(f"zip entry {name!r} is encrypted; unzip it yourself and load the folder")


def load_zip(
    zip_path: str | os.PathLike,
    image_size: int = 224,
    max_total_bytes: int = 2 * 1024**3,
    max_files: int = 100_000,
    **kwargs: Any,
) -> ImageData:
    """`load_image_folder` on the contents of a zip; the extracted files are always deleted."""
    with tempfile.TemporaryDirectory(prefix="vitdemo-zip-") as tmp:
        safe_extract_zip(zip_path, tmp, max_total_bytes=max_total_bytes, max_files=max_files)
        return load_image_folder(tmp, image_size, **kwargs)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 and the built-in synthetic set
# ---------------------------------------------------------------------------------------------


# What a download that did not get through raises: urllib's URLError (no network, a name that does
# not resolve, an HTTP error), a connection dropped or timed out mid-transfer, http.client's
# protocol errors (a truncated response) and TLS errors. Other OSErrors (a full disk, a folder
# that cannot be written) are not "offline" and surface as they are.
NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException, ssl.SSLError)
# What unpacking a damaged archive raises (torchvision checks the download's MD5 first, so rare).
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def load_cifar10(root: str | os.PathLike, train: bool = True, download: bool = False) -> ImageData:
    """CIFAR-10 in torchvision's format (the python pickles), 32 x 32, from `root`."""
    split = "training" if train else "test"
    root = Path(root).expanduser()
    before = set(root.iterdir()) if root.is_dir() else None  # what a failed download must leave as it was
    folder = "load an ImageFolder copy with load_image_folder(root/<class>/<image>)"
    try:
        try:
            dataset = torchvision.datasets.CIFAR10(str(root), train=train, download=download)
        except BaseException:
            if download and root.is_dir():  # whatever failed, neither torchvision's folder nor a partial archive stays
                for path in [root] if before is None else [p for p in root.iterdir() if p not in before]:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
            raise
    except NETWORK_ERRORS as exc:
        if not download:
            raise
        raise DataError(f"could not download CIFAR-10 (offline?): {exc}. Without internet, {folder}.") from exc
    except ARCHIVE_ERRORS as exc:
        if not download:
            raise
        raise DataError(f"could not download CIFAR-10: the archive arrived damaged ({type(exc).__name__}: {exc}); "
                        f"try again, or {folder}.") from exc
    except RuntimeError as exc:
        # torchvision's only words for a missing or half-present copy, and for a download whose MD5 is
        # wrong; any other RuntimeError is not about the data and surfaces as it is.
        if "not found or corrupted" not in str(exc):
            raise
        if download:
            raise DataError(f"could not download CIFAR-10: {exc} Try again, or {folder}.") from exc
        raise DataError(f"CIFAR-10 ({split} set) not found in {root}: pass download=True when online, or "
                        f"{folder}.") from exc
    images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return ImageData(images, labels, list(dataset.classes))


SHAPES = ("circle", "square", "triangle", "cross", "ring", "bars", "star", "crescent")


def _shape_masks(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-masks of one shape in its own frame: unit radius, centred, unrotated."""
    rho = np.hypot(u, v)
    if name == "circle":
        return rho <= 0.9
    if name == "square":
        return np.maximum(abs(u), abs(v)) <= 0.75
    if name == "triangle":  # equilateral: inside three half-planes, inradius 0.5
        normals = [(np.cos(a), np.sin(a)) for a in np.deg2rad([90.0, 210.0, 330.0])]
        return np.all([u * c + v * s <= 0.5 for c, s in normals], axis=0)
    if name == "cross":
        return ((abs(u) <= 0.28) & (abs(v) <= 0.95)) | ((abs(v) <= 0.28) & (abs(u) <= 0.95))
    if name == "ring":
        return (rho <= 0.95) & (rho >= 0.55)
    if name == "bars":  # three parallel bars
        return (abs(u) <= 0.9) & (abs(v) <= 0.9) & (np.floor((u + 1.0) / 0.4) % 2 == 0)
    if name == "star":  # five points: the radius zig-zags between 0.4 and 1 with the angle
        phase = (np.arctan2(v, u) * 5 / (2 * np.pi)) % 1.0
        return rho <= 0.4 + 0.6 * abs(2 * phase - 1)
    if name == "crescent":
        return (rho <= 0.95) & (np.hypot(u - 0.5, v) >= 0.75)
    raise AssertionError(name)


def _draw(name: str, cx: np.ndarray, cy: np.ndarray, radius: np.ndarray, angle: np.ndarray, s: int) -> np.ndarray:
    """Coverage (n, s, s) in [0, 1] of rotated shapes, drawn at 2x and averaged: antialiased edges."""
    grid = ((np.arange(2 * s) + 0.5) / 2).astype(np.float32)  # 2x pixel centres, in output pixels
    dx = grid[None, None, :] - cx[:, None, None].astype(np.float32)
    dy = grid[None, :, None] - cy[:, None, None].astype(np.float32)
    cos, sin = ((f(angle) / radius)[:, None, None].astype(np.float32) for f in (np.cos, np.sin))
    inside = _shape_masks(name, dx * cos + dy * sin, dy * cos - dx * sin)
    return inside.reshape(-1, s, 2, s, 2).mean(axis=(2, 4), dtype=np.float32)


def synthetic_shapes(num_classes: int = 4, per_class: int = 300, image_size: int = 32, seed: int = 0) -> ImageData:
    """Light coloured shapes (circle, square, triangle, cross, ring, bars, star, crescent) at random
    position, size and rotation on darker, noisy, graded backgrounds: a data set that needs no files.

    Deterministic for a seed (its own generator, never the global one). Class k is SHAPES[k].
    """
    if not 2 <= num_classes <= len(SHAPES):
        raise DataError(f"num_classes must be between 2 and {len(SHAPES)}, got {num_classes}")
    if per_class < 1 or image_size < 8:
        raise DataError(f"need per_class >= 1 and image_size >= 8, got {per_class} and {image_size}")
    rng = np.random.default_rng(seed)
    n, s = num_classes * per_class, image_size
    labels = np.repeat(np.arange(num_classes), per_class)
    radius = rng.uniform(0.22, 0.42, n) * s
    cx, cy = (rng.uniform(radius, s - radius) for _ in range(2))
    angle = rng.uniform(0, 2 * np.pi, n)
    mask = np.empty((n, 1, s, s), dtype=np.float32)
    for k in range(num_classes):
        for start in range(k * per_class, (k + 1) * per_class, 512):  # chunks bound the memory
            rows = slice(start, min(start + 512, (k + 1) * per_class))
            mask[rows, 0] = _draw(SHAPES[k], cx[rows], cy[rows], radius[rows], angle[rows], s)

    # Random colours, but the shape is always the lighter one: with both polarities a tiny ViT
    # stays near chance for minutes; like this it reaches ~80% on 4 classes in a minute on 2 cores.
    bg = rng.uniform(0, 110, (n, 3, 1, 1)).astype(np.float32)
    fg = rng.uniform(150, 255, (n, 3, 1, 1)).astype(np.float32)
    ramp = np.linspace(-1, 1, s, dtype=np.float32)
    slope = rng.uniform(-40, 40, (n, 3, 2, 1, 1)).astype(np.float32)
    images = np.empty((n, 3, s, s), dtype=np.uint8)
    # In float32 and in chunks that stay in the cache: the whole batch in float64 at once took the
    # Train tab's 6,000 images 3-8 s, most of it moving memory.
    for start in range(0, n, 256):
        rows = slice(start, min(start + 256, n))
        background = (bg[rows] + slope[rows, :, 0] * ramp[None, None, :, None]
                      + slope[rows, :, 1] * ramp[None, None, None, :])
        noise = rng.standard_normal((rows.stop - rows.start, 3, s, s), dtype=np.float32) * 12
        chunk = mask[rows] * fg[rows] + (1 - mask[rows]) * background + noise
        images[rows] = np.clip(np.rint(chunk), 0, 255)
    return ImageData(torch.from_numpy(images), torch.from_numpy(labels).to(torch.int64), list(SHAPES[:num_classes]))


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


# ---------------------------------------------------------------------------------------------
# Inference: one user image
# ---------------------------------------------------------------------------------------------


def load_image(path_or_file: str | os.PathLike | IO[bytes] | bytes) -> Image.Image:
    """Open one image for prediction: decoded fully, upright (EXIF), 8-bit RGB.

    Raises `DataError` for anything that is not a complete, decodable image of sane size, and
    for a file that cannot be read (missing, permission denied), each saying which; anything else
    (a MemoryError, a bug) propagates as it is.
    """
    source = io.BytesIO(path_or_file) if isinstance(path_or_file, (bytes, bytearray)) else path_or_file
    name = getattr(source, "name", None) or (str(source) if isinstance(source, (str, os.PathLike)) else "upload")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _open_rgb(source)
    except FileNotFoundError:
        raise DataError(f"file not found: {name}") from None
    except DataError as exc:
        cause = exc.__cause__
        if cause is None or isinstance(cause, (DataError, Image.DecompressionBombError,
                                               Image.DecompressionBombWarning)):
            raise DataError(f"{name}: {exc}") from None
        raise DataError(f"not an image or corrupt: {name} ({type(cause).__name__}: {cause})") from None
    except OSError as exc:
        if exc.errno is None:
            raise
        # The file system's refusal (permission denied, a folder, an I/O error), not a bad image.
        raise DataError(f"cannot read {name}: {exc.strerror or exc}") from None


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


__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SHAPES",
    "DataError",
    "ImageData",
    "decode_rgb",
    "is_bad_image_error",
    "iterate_batches",
    "load_cifar10",
    "load_image",
    "load_image_folder",
    "load_zip",
    "model_crop",
    "model_crop_batch",
    "normalize",
    "num_batches",
    "preprocess",
    "safe_extract_zip",
    "stratified_split",
    "synthetic_shapes",
]
