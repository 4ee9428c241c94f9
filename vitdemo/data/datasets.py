"""Named data sets: CIFAR-10 in torchvision's format, and the built-in synthetic shapes."""

from __future__ import annotations

import gzip
import http.client
import os
import shutil
import ssl
import tarfile
import urllib.error
import zlib
from pathlib import Path

import numpy as np
import torch
import torchvision

from .core import DataError, ImageData


# ---------------------------------------------------------------------------------------------
# CIFAR-10 and the built-in synthetic set
# ---------------------------------------------------------------------------------------------


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

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


