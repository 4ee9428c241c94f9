"""What every tab shares: server settings, user errors, and reading an uploaded image.

Errors a user can act on are raised as `gr.Error` with our own words (`user_error`); handlers are
wrapped in `user_errors`, which turns the library's errors into such messages and anything
unexpected into a short message while the traceback goes to the server log only.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from gradio import processing_utils
from PIL import Image

from ..checkpoint import CheckpointError
from ..data import DataError, decode_rgb, pillow_errors
from ..engine import TrainingError

log = logging.getLogger("vitdemo.app")

MAX_PIXELS = 40_000_000  # larger images are refused: decoding them costs time and memory, the model sees 32-224 px
MAX_FILE_SIZE = "20mb"  # for launch(): uploads larger than this are refused by Gradio itself
QUEUE_SIZE = 32  # waiting events, over all sessions
# Gradio keeps every upload (and every file it serves) in its cache folder until told otherwise:
# every hour, delete those older than an hour, and all of them when the server stops.
DELETE_CACHE = (3600, 3600)
VIEW_SIZE = 320  # side of the overlays, in pixels
PROJECT_ROOT = Path(__file__).resolve().parents[2]
APP_DIR = Path(tempfile.gettempdir()) / "vitdemo-app"  # server-owned: runs and example images (read as common.APP_DIR)


def save_pil_to_cache(img: Image.Image, cache_dir: str, name: str = "image", format: str = "webp") -> str:
    """Gradio's `processing_utils.save_pil_to_cache`, written once and atomically. Gradio 6.31's
    own names the file by its bytes' hash but rewrites it in place each time the same picture is
    returned again (a grid or a strip that a slider leaves as it was): a browser still fetching
    the earlier copy then reads a file cut short ("Too much data for declared Content-Length" in
    the log) and draws no picture. The same name holds the same bytes, so an existing file stays."""
    data = processing_utils.encode_pil_to_bytes(img, format)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    folder.mkdir(exist_ok=True, parents=True)
    path = (folder / f"{name}.{format}").resolve()
    if not path.is_file():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # a reader sees the whole file or none
    return str(path)


processing_utils.save_pil_to_cache = save_pil_to_cache  # Gradio's components call it through the module


class ModelUnavailable(RuntimeError):
    """The model picked cannot be used (absent, offline, unknown); the message says why."""


# /a/b..., not a URL's, not "x/y", not "~/a/b" (a documented place in the user's home, not the server's layout)
_SERVER_PATH = re.compile(r"(?<![\w.:/~])((?:/[^\s/:'\"()]+){2,}/?)")
_EXTRACTED = re.compile(r"\bvitdemo-zip-\w+")


def for_users(message: str) -> str:
    """A message as users may see it: no server path (a path is shown by its last part, the folder
    an upload was unpacked to as "the zip"), and no "<" or ">", which the page would take for HTML
    and cut the message at."""
    message = _SERVER_PATH.sub(lambda m: Path(m.group(1)).name or m.group(1), message)
    message = _EXTRACTED.sub("the zip", message)
    return message.replace("<", "‹").replace(">", "›")


def user_error(message: str) -> gr.Error:
    """A message for the user, shown until their next action; their mistake, so no traceback in
    the server log either."""
    return gr.Error(for_users(message), duration=None, print_exception=False)


def user_errors(fn: Callable) -> Callable:
    """Turn the library's errors into `gr.Error` messages and anything unexpected into a short
    message (the traceback goes to the server log, never to the user)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (DataError, CheckpointError, ModelUnavailable, TrainingError) as err:
            raise user_error(str(err)) from None
        except Exception as err:  # noqa: BLE001 - the user gets a message, the log the details
            log.exception("unexpected error in %s", fn.__name__)
            raise user_error(f"Something went wrong ({type(err).__name__}). The server log has the details.") from None

    return wrapper


def shown_path(path: Path) -> str:
    """A path as users may see it: relative to the project, never the server's layout."""
    try:
        return str(Path(path).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return Path(path).name


def clamp(value: Any, lo: int, hi: int) -> int:
    """`value` rounded to an int in [lo, hi] (lo for anything that is not a number)."""
    try:
        return int(min(max(round(float(value)), lo), hi))
    except (TypeError, ValueError):
        return lo


# ---------------------------------------------------------------------------------------------
# Images in
# ---------------------------------------------------------------------------------------------

def _decode_upload(decode: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Gradio's own decoding of an uploaded image, with a bad file's failures (not an image,
    corrupt, a decompression bomb) turned into a clear `gr.Error` instead of a generic "Error"."""

    @functools.wraps(decode)
    def preprocess(payload: Any) -> Any:
        try:
            with pillow_errors():  # the server's problem or a bug is not the file's: `user_errors` logs it
                return decode(payload)
        except DataError as err:
            cause = err.__cause__
            if isinstance(cause, Image.DecompressionBombError):
                raise user_error(f"The image is far too large (over {Image.MAX_IMAGE_PIXELS * 2:,} pixels); "
                                 f"the limit is {MAX_PIXELS:,} pixels.") from None
            if isinstance(cause, Image.UnidentifiedImageError):
                raise user_error("That file is not an image that can be read (PNG, JPEG, WebP, GIF, BMP, TIFF, "
                                 "...).") from None
            raise user_error(f"The image could not be read; is the file corrupt or truncated? "
                             f"({type(cause or err).__name__})") from None

    return preprocess


def image_input(label: str = "Image", height: int = 300, elem_id: str | None = None) -> gr.Image:
    """An image input for PIL images in their own mode: `image_mode=None` keeps 16-bit, CMYK,
    alpha and palette images as they are, for the data module's conversion (`to_rgb`) instead of
    Pillow's lossy one; Gradio has already applied the EXIF rotation."""
    image = gr.Image(type="pil", image_mode=None, sources=["upload", "clipboard", "webcam"], label=label,
                     height=height, elem_id=elem_id)
    # An instance attribute rather than a subclass: subclassing a Gradio component makes Gradio
    # write a .pyi stub file next to this module at import time.
    image.preprocess = _decode_upload(image.preprocess)
    return image


def to_rgb(image: Any) -> Image.Image:
    """A user's image as fully decoded, upright, 8-bit RGB, or a `gr.Error` saying what is wrong:
    none, not an image, larger than `MAX_PIXELS`, corrupt or truncated. Any Pillow mode (I;16,
    CMYK, P, RGBA, LA, L, F, ...) goes through the data module's conversion."""
    if image is None:
        raise user_error("No image: upload one, paste one from the clipboard, take a webcam picture or click an example.")
    if isinstance(image, np.ndarray):
        try:
            image = Image.fromarray(image)
        except (TypeError, ValueError) as err:
            raise user_error(f"That array is not an image ({err}).") from None
    if not isinstance(image, Image.Image):
        raise user_error(f"Not an image: got {type(image).__name__}.")
    w, h = image.size
    if w < 1 or h < 1:
        raise user_error("The image is empty (0 pixels).")
    if w * h > MAX_PIXELS:
        raise user_error(f"The image is too large: {w}x{h} = {w * h:,} pixels; the limit is {MAX_PIXELS:,}. "
                         f"Please send a smaller version.")
    try:
        return decode_rgb(image)  # Gradio's image is opened lazily: decoding happens (and fails) here
    except DataError as err:
        raise user_error(f"The image could not be decoded; is the file corrupt or truncated? ({err})") from None


def check_image(image: Any) -> None:
    """Nothing for a readable image or for none; our message for one that cannot be read. The
    page's views of a new image wait for this event (`.success`), so that a bad file is said once,
    not once per tab."""
    if image is not None:
        to_rgb(image)


def if_image(fn: Callable, empty: tuple) -> Callable:
    """`fn` for an image's change event: an emptied image empties the outputs instead of
    raising "no image" (which the buttons and the API still do)."""

    @functools.wraps(fn)
    def wrapper(image: Any, *args: Any) -> Any:
        return empty if image is None else fn(image, *args)

    return wrapper


def picture(**kwargs: Any) -> gr.Image:
    """An output picture with nothing over it: no label badge (the label is for screen readers only),
    no toolbar; captions are text beside it."""
    return gr.Image(format="png", interactive=False, show_label=False, buttons=[], **kwargs)


LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False}]  # for gr.Markdown
HIDDEN = {"api_visibility": "undocumented"}  # events the page uses that are no API of ours
