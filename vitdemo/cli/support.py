"""What the command line (`vitdemo.cli`) needs around its commands: help that shows every
default, checks of options before any work starts (among them: never overwrite what the user
made without --force), the command line's own wording of offline errors, and the choice of the
int8 file that ships beside a checkpoint.

Every problem is raised as `ValueError` (or the library's own errors), which `cli.main` prints
as one `error: ...` line with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from ..checkpoint import DEFAULT_CHECKPOINT, WEIGHTS_NAME
from ..engine import EMA_DIR, RECIPES, STATE_NAME
from ..runtime import Runtime, load_onnx, prepare

# The int8 export that ships beside a checkpoint (`vitdemo export --int8 --out DIR/model.int8.onnx`).
SHIPPED_INT8 = "model.int8.onnx"


# ---------------------------------------------------------------------------------------------
# Help
# ---------------------------------------------------------------------------------------------


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help when it has a default and its help does not say
    it already; options without one (None, or False for a flag) are left as they are. A
    description of several lines (a module docstring) is kept as written, one line is wrapped."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # Identity, not `in`: a default of 0 equals False but is a value worth showing.
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "default" in text or unset or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class _Commands(argparse._SubParsersAction):
    """Sub-commands whose `--help` opens with a description: their one-line `help` when they
    are given no description of their own."""

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        if kwargs.get("help") and not kwargs.get("description"):
            kwargs["description"] = kwargs["help"][0].upper() + kwargs["help"][1:] + "."
        return super().add_parser(name, **kwargs)


class Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose sub-commands inherit `HelpFormatter` and always have a
    description, so every command's `--help` shows its defaults, including commands added later."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _Commands)


def program_name() -> str:
    """`vitdemo` when run as the installed command, else `python -m vitdemo`: usage lines show
    what the user typed."""
    return "vitdemo" if Path(sys.argv[0]).name == "vitdemo" else "python -m vitdemo"


def recipe_default(field: str) -> str:
    """"default from --recipe: paper 3e-3, small-data 1e-3, finetune 0.01" for a recipe field,
    read from the recipes themselves so help never disagrees with them."""
    values = {name: _shown(getattr(recipe, field)) for name, recipe in RECIPES.items()}
    if len(set(values.values())) == 1:
        return f"default from --recipe: {next(iter(values.values()))} in each"
    return "default from --recipe: " + ", ".join(f"{name} {value}" for name, value in values.items())


def _shown(value: object) -> str:
    return "none" if value is None else f"{value:g}" if isinstance(value, (int, float)) else str(value)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# Checks before any work
# ---------------------------------------------------------------------------------------------


def check_device(name: str | None) -> None:
    """Refuse a `--device` PyTorch cannot use here, before data are loaded or a model built."""
    if name in (None, "auto"):
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use cuda, cuda:N, mps, cpu or auto") from None
    mps = getattr(torch.backends, "mps", None)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: PyTorch sees no CUDA GPU here (a CPU-only build of torch, or no "
                         "driver); use --device auto or cpu (README, 'On a GPU')")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    if device.type == "mps" and not (mps and mps.is_available()):
        raise ValueError(f"--device {name}: Apple's MPS is not available here; use --device auto or cpu")


def check_default_checkpoint(checkpoint: str | None) -> None:
    """Without `--checkpoint` the shipped model is used; a non-editable install has none (it
    lives in the repository, beside the package), so say what to do instead."""
    if checkpoint is None and not DEFAULT_CHECKPOINT.is_file():
        raise ValueError("no --checkpoint given, and the shipped CIFAR-10 model is not part of this installation "
                         "(it lives in the repository's checkpoints/vit_cifar10: install from a clone with "
                         "`pip install -e .`); pass --checkpoint RUN_DIR")


# ---------------------------------------------------------------------------------------------
# Never overwrite what the user made
# ---------------------------------------------------------------------------------------------

# What `train --out DIR` writes. A DIR holding any of them is a run: training there again
# would replace its weights and state after one epoch, so it needs --resume or --force.
RUN_FILES = (WEIGHTS_NAME, STATE_NAME, "results.json", "curves.png", f"{EMA_DIR}/{WEIGHTS_NAME}")


def existing(folder: str | Path, names: Iterable[str]) -> list[str]:
    """Those of `names` that are already in `folder`."""
    folder = Path(folder).expanduser()
    return [name for name in names if (folder / name).exists()]


def check_new_run(out: str, resume: bool, force: bool) -> None:
    """Refuse `train --out OUT` on a previous run unless told to continue it or start over; an
    empty or new folder is fine. Checked before any data are loaded or a model is built."""
    if resume and force:
        raise ValueError("--resume continues the run in --out and --force starts it over: give one of them")
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out} is a file; give --out a folder for the run")
    found = existing(path, RUN_FILES)
    if found and not (resume or force):
        raise ValueError(f"--out {out} already holds a training run ({', '.join(found)}): add --resume to continue "
                         f"it, --force to start over in its place, or give --out a new folder")


def start_over(out: str) -> None:
    """Delete a previous run's files from `out` (`train --force`), so that none of them (an EMA
    checkpoint the new run does not make, the old results) can pass for the new run's. Other
    files in the folder are the user's and stay."""
    path = Path(out).expanduser()
    for name in existing(path, RUN_FILES):
        (path / name).unlink()
    with contextlib.suppress(OSError):  # only if the old EMA checkpoint was all it held
        (path / EMA_DIR).rmdir()


def check_new_files(out: str, names: Iterable[str], force: bool) -> None:
    """Refuse to write `names` into the folder `out` over files of the same names, unless `force`."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out} is a file; give --out a folder")
    found = existing(path, names)
    if found and not force:
        them = "it" if len(found) == 1 else "them"
        raise ValueError(f"--out {out} already holds {', '.join(found)}: add --force to replace {them}, or give "
                         f"--out another folder")


def check_new_file(out: str, force: bool) -> None:
    """Refuse to write the file `out` over an existing one, unless `force`."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise ValueError(f"--out {out} is a folder; give --out a file name, such as {Path(out) / 'model.pt2'}")
    if path.exists() and not force:
        raise ValueError(f"--out {out} already exists: add --force to replace it, or give --out another file name")


# ---------------------------------------------------------------------------------------------
# Offline errors, worded for the command line
# ---------------------------------------------------------------------------------------------


def cifar10_unavailable(root: str, download: bool, cause: BaseException | None) -> str:
    """What `--data cifar10` says when torchvision's copy is missing or cannot be downloaded."""
    folder = "pass an image-folder copy with --data FOLDER (FOLDER/<class>/<image>; see README, 'CIFAR-10 as an " \
             "image folder')"
    if download:
        reason = f" ({cause})" if cause is not None else ""
        return f"could not download CIFAR-10{reason}; without internet, {folder}"
    return f"CIFAR-10 is not in --data-root {root}: add --download to fetch it (170 MB, needs internet), or {folder}"


def pretrained_unavailable(source: str, reason: str) -> str:
    """What `--init-from torchvision|timm` says when the weights cannot be downloaded."""
    return (f"could not download the pre-trained ViT-B/16 weights for --init-from {source} ({reason}); they need "
            "internet the first time (later runs use the local cache). Offline, pass --init-from a vitdemo run "
            "directory or checkpoint, or another implementation's weights file with --init-source")


# ---------------------------------------------------------------------------------------------
# Runtimes
# ---------------------------------------------------------------------------------------------


def checkpoint_dir(checkpoint: str | None) -> Path:
    """The directory holding a checkpoint given as a run directory or a file (default: the
    shipped model's)."""
    path = Path(checkpoint).expanduser() if checkpoint else DEFAULT_CHECKPOINT
    return path if path.is_dir() else path.parent


def runner(model: torch.nn.Module, runtime: str, onnx: str | None, checkpoint: str | None) -> Runtime:
    """`model` prepared for `runtime` (see `vitdemo.runtime.prepare`). For "int8" without
    `--onnx`, the int8 export beside the checkpoint (the shipped model carries one) is used when
    it was exported from these very weights (their SHA-256 is stored in it): no export, which
    takes seconds; otherwise the model is exported to a temporary file, as `prepare` does."""
    if runtime == "int8" and onnx is None:
        beside = checkpoint_dir(checkpoint) / SHIPPED_INT8
        if beside.is_file():
            try:
                shipped = load_onnx(beside, model)
                if shipped.metadata.get("vitdemo.precision") == "int8":
                    print(f"int8 runtime: {SHIPPED_INT8} beside the checkpoint", file=sys.stderr)
                    return shipped
            except ValueError:  # exported from other weights, or not a readable ONNX file
                pass
            print(f"int8 runtime: {SHIPPED_INT8} beside the checkpoint is not of these weights; exporting afresh",
                  file=sys.stderr)
    return model.eval() if runtime == "eager" else prepare(model, runtime, onnx_path=onnx)
