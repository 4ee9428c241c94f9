"""One image: open it safely (decompression bombs, truncated files, 16-bit and float modes,
EXIF orientation), decode it fully and convert it to 8-bit RGB; and the words for what went wrong.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from typing import IO

import numpy as np
from PIL import Image, ImageOps

from .core import DataError


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


@contextlib.contextmanager
def pillow_errors() -> Iterator[None]:
    """Around Pillow's own calls: what blames the image's bytes (`is_bad_image_error`) becomes a
    `DataError` saying what is wrong, its cause kept; anything else propagates as it is."""
    try:
        yield
    except Exception as exc:
        if not is_bad_image_error(exc):
            raise
        raise DataError(_describe(exc)) from exc


def decode_rgb(image: Image.Image) -> Image.Image:
    """An opened image (Pillow decodes lazily) decoded fully, so that truncated data fail here,
    turned upright (EXIF orientation) and converted to 8-bit RGB (`to_rgb`).

    Bad image data raise `DataError` saying what is wrong; anything else (a MemoryError, an
    error of the file system, a bug) propagates as it is."""
    with pillow_errors():
        _check_bomb(image)
        image.load()
        image = ImageOps.exif_transpose(image)  # phone photos store rotation in EXIF
    return to_rgb(image)


def _open_rgb(source: str | os.PathLike | IO[bytes]) -> Image.Image:
    """Open and `decode_rgb` one image. `DataError` for bad image data; an OSError with an errno
    (file missing, permission denied) and anything else propagate."""
    with pillow_errors():
        opened = Image.open(source)
    with opened as image:
        return decode_rgb(image)


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

