"""Class folders (root/<class>/<image>) and zips of them, decoded once into an `ImageData` at
the model's crop; unreadable files are skipped and named, unsafe zips refused.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from .core import DataError, ImageData
from .images import _open_rgb, pillow_errors
from .preprocessing import model_crop


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
                with pillow_errors(), Image.open(path) as image:  # reads the header only
                    pixels.append(image.width * image.height)
            except (DataError, OSError):  # a bad or unreadable file: the loader reports it
                continue
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


