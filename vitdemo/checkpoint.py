"""Checkpoints: one safetensors file that holds a model's weights and, in its header, the JSON
metadata needed to rebuild and use it (config, class names, preprocessing, metrics, recipe).

A safetensors file cannot run code when loaded, unlike a pickle, and keeping the metadata in the
same file means weights and description can never drift apart. Every write is atomic: the file
is written under a temporary name in the same directory, flushed to disk, then renamed over the
old one, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ViTConfig
from .data.preprocessing import Preprocessing
from .model import VisionTransformer

FORMAT = "vitdemo-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
# Where `load_checkpoint()` looks when given no path: the model shipped with the project.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "vit_cifar10" / WEIGHTS_NAME
REQUIRED_METADATA = ("config", "class_names", "image_size", "mean", "std")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not describe its weights."""


def atomic_write(path: str | Path, write: Callable[[str], None], *, overwrite: bool = True) -> Path:
    """Call `write(tmp_path)`, then move the finished file to `path` in one rename.

    The temporary file lives in the same directory (a rename across file systems is not
    atomic). Errors such as a full disk or a read-only directory surface as `OSError` with the
    path named, and leave whatever was at `path` before untouched. With `overwrite=False` an
    existing `path` is never replaced, even one created while `write` ran: `FileExistsError`.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path.name} already exists and is left as it is")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise OSError(f"cannot write {path}: {err.strerror or err}") from err
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; a checkpoint is an ordinary file
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except FileExistsError:
        Path(tmp).unlink(missing_ok=True)
        raise FileExistsError(f"{path.name} already exists and is left as it is") from None
    except OSError as err:  # the disk or the folder: say which file could not be written
        Path(tmp).unlink(missing_ok=True)
        raise OSError(f"cannot write {path}: {err.strerror or err}") from err
    except BaseException:
        # Anything else (an interrupt, MemoryError, a bug in `write`) is no writing problem: it
        # surfaces as it is, and only the temporary file goes.
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _link_new(tmp: str, path: Path) -> None:
    """Give the finished file `tmp` the name `path` only if no file has it: a hard link fails
    on an existing name in one step, where checking first and renaming after could race."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename
        if path.exists():
            raise FileExistsError(path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _umask() -> int:
    # Read, not set-and-restore: os.umask() changes the whole process, racing other threads.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def save_checkpoint(
    path: str | Path,
    model: VisionTransformer,
    class_names: list[str],
    preprocess: Preprocessing,
    **extra: Any,
) -> Path:
    """Write `model` and its metadata (config, class names, preprocessing, and any JSON-able
    `extra` such as metrics or recipe) to one safetensors file, atomically. The preprocessing is
    read back with `Preprocessing.for_checkpoint(metadata)`."""
    model = unwrap(model)
    if model.config.num_classes and len(class_names) != model.config.num_classes:
        raise CheckpointError(
            f"{len(class_names)} class names for a model with {model.config.num_classes} outputs"
        )
    from . import __version__

    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vitdemo_version": __version__,
        "config": model.config.to_dict(),
        "class_names": list(class_names),
        **preprocess.to_dict(),
        **extra,
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    header = {"vitdemo": json.dumps(metadata)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint, without loading its weights."""
    from safetensors import safe_open

    path = _resolve(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {err}") from err
    if "vitdemo" not in header:
        raise CheckpointError(f"{path} has no vitdemo metadata (is it a vitdemo checkpoint?)")
    try:
        metadata = json.loads(header["vitdemo"])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} has corrupt metadata: {err}") from err
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path} has corrupt metadata: not a JSON object")
    _check_format(path, metadata)
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise CheckpointError(f"{path} metadata lacks {missing}")
    try:
        Preprocessing.for_checkpoint(metadata)
    except (TypeError, ValueError) as err:  # the values Preprocessing refuses, and non-numbers
        raise CheckpointError(f"{path} has invalid preprocessing: {err}") from err
    return metadata


def _check_format(path: Path, metadata: dict[str, Any]) -> None:
    """Refuse metadata of another format, or of a newer version of this one, whose fields this
    code could misread; every older version is read as it is (there is only version 1 so far)."""
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vitdemo checkpoint (format {metadata.get('format')!r}, "
                              f"expected {FORMAT!r})")
    version = metadata.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path} has an invalid checkpoint format version: {version!r}")
    if version > FORMAT_VERSION:
        from . import __version__

        raise CheckpointError(f"{path} was written by a newer vitdemo ({metadata.get('vitdemo_version', 'unknown')}, "
                              f"checkpoint format {version}); this vitdemo ({__version__}) reads format "
                              f"{FORMAT_VERSION}: update vitdemo to load it")


def update_metadata(path: str | Path, **changes: Any) -> Path:
    """Merge `changes` into a checkpoint's metadata and rewrite it atomically. The weights are
    copied as they are, bit for bit, so files tied to their digest (an ONNX export) stay valid."""
    from safetensors import safe_open

    path = _resolve(path)
    metadata = read_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {err}") from err
    header["vitdemo"] = json.dumps({**metadata, **changes})
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_checkpoint(
    path: str | Path | None = None, map_location: str | torch.device = "cpu"
) -> tuple[VisionTransformer, dict[str, Any]]:
    """Load a checkpoint written by `save_checkpoint` (default: the shipped CIFAR-10 model).

    Returns the model in eval mode and its metadata: a dict with at least `class_names`,
    `image_size`, `mean`, `std` (the normalisation the model expects) and `config`. Raises
    `CheckpointError` with the reason for anything that is not a consistent checkpoint.
    """
    path = _resolve(path if path is not None else DEFAULT_CHECKPOINT)
    metadata = read_metadata(path)
    try:
        config = ViTConfig.from_dict(metadata["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path} has an invalid config: {err}") from err
    if config.num_classes and len(metadata["class_names"]) != config.num_classes:
        raise CheckpointError(
            f"{path}: {len(metadata['class_names'])} class names but the config has {config.num_classes} classes"
        )
    try:
        tensors = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {err}") from err
    model = VisionTransformer(config)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not match the config: {err}") from err
    return model.to(map_location).eval(), metadata


# What reading a damaged or foreign weights file raises: safetensors' own error; from torch.load,
# an unpickler refusing an object or an opcode, a broken zip archive (RuntimeError), and, for
# damaged or random bytes, EOFError, UnicodeDecodeError (a ValueError), IndexError, KeyError,
# struct.error and AssertionError (all seen fuzzing torch.load with weights_only=True); OSError
# for a file that cannot be read.
PEER_DECODE_ERRORS = (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, ValueError, IndexError,
                      KeyError, struct.error, AssertionError, OSError)


def _file_fault(err: Exception) -> bool:
    """Whether `err`, from reading a weights file, is about the file's bytes. A damaged pickle can
    also make torch's unpickler call a constructor with wrong arguments or ask an object for an
    attribute it lacks: a TypeError or AttributeError raised in torch's own code. The same from
    anywhere else is a bug, and MemoryError is this machine's limit: neither is the file's fault."""
    if isinstance(err, PEER_DECODE_ERRORS):
        return True
    if not isinstance(err, (TypeError, AttributeError)):
        return False
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return module == "torch" or module.startswith("torch.")


def load_peer_weights(path: str | Path, source: str) -> dict[str, torch.Tensor]:
    """Read another implementation's weights (.safetensors, or .pth/.bin/.pt loaded with
    `weights_only=True` so a pickle cannot run code) and convert them to vitdemo's names."""
    from .convert import convert_state_dict

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if not _file_fault(err):
            raise
        raise CheckpointError(f"cannot read weights from {path}: {err}") from err
    for wrapper in ("state_dict", "model"):  # common training-script wrappers
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return convert_state_dict(state, source)


def unwrap(model: nn.Module) -> VisionTransformer:
    """The VisionTransformer inside DistributedDataParallel or torch.compile wrappers."""
    while not isinstance(model, VisionTransformer):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a VisionTransformer, got {type(model).__name__}")
        model = inner
    return model


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    return path
