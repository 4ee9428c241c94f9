"""What the commands share: loading `--data` for a checkpoint, the options every command with
data or a runtime takes, and printing on the main process only."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from typing import Any, Iterator

from ..data import (
    CIFAR10,
    DataError,
    ImageData,
    Preprocessing,
    TrainingData,
    load_source,
    recorded_limits,
    run_split,
)
from ..runtime import RUNTIMES
from . import support


@contextlib.contextmanager
def cifar10_messages(args: argparse.Namespace) -> Iterator[None]:
    """CIFAR-10's loading errors in the command's words: the library's name its Python arguments."""
    try:
        yield
    except DataError as err:
        if args.data != CIFAR10 or "CIFAR-10" not in str(err):  # not load_cifar10's
            raise
        raise DataError(support.cifar10_unavailable(args.data_root, args.download, err.__cause__)) from None


def load(args: argparse.Namespace, prep: Preprocessing, **limits: Any) -> ImageData:
    """Every image of `--data` at a model's crop."""
    with cifar10_messages(args):
        return load_source(args.data, prep, data_root=args.data_root, download=args.download, **limits)


def check_classes(data: ImageData | TrainingData, meta: dict[str, Any]) -> None:
    if list(data.class_names) != list(meta["class_names"]):
        raise DataError(f"the data's classes {data.class_names} are not the model's {meta['class_names']}")


def run_images(args: argparse.Namespace, meta: dict[str, Any]) -> tuple[TrainingData | None, ImageData]:
    """(the run's own split, if `--data` holds the images the checkpoint was trained on; all of
    `--data`'s images at its crop). A --val-size or --split-seed other than the recorded one is
    refused on the run's own data: its held-out images would include training images."""
    prep = Preprocessing.for_checkpoint(meta)
    limits = recorded_limits(meta)
    data = load(args, prep, **limits)
    # An older checkpoint that records no split: the one the user gives.
    split_of = {**meta, **{name: getattr(args, name) for name in ("val_size", "split_seed") if meta.get(name) is None}}
    run = run_split(split_of, data, args.data)
    if run is None:  # other data (a test set): any split the options ask for is theirs to choose
        return None, load(args, prep) if limits["max_images_per_class"] else data
    for name in ("val_size", "split_seed"):
        given, recorded = getattr(args, name), meta.get(name)
        if given is not None and recorded is not None and float(given) != float(recorded):
            option = "--" + name.replace("_", "-")
            raise ValueError(f"{option} {given:g} is not the split the model was trained with ({recorded:g}); "
                             f"leave {option} out to use the recorded one")
    if run.val is None:
        raise ValueError(f"the model was trained on every image of {args.data} (val_size 0): none are held out. "
                         f"Give other data, such as a test set")
    return run, data


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set depth=6 drop_path_rate=0.1` -> {"depth": 6, "drop_path_rate": 0.1}."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects NAME=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
        if isinstance(out[key], list):
            out[key] = tuple(out[key])
    return out


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(*args: Any) -> None:
    if is_main():
        print(*args, flush=True)


def data_options(p: argparse.ArgumentParser, training: bool = True) -> None:
    p.add_argument("--data", required=True,
                   help="'synthetic' (built in, offline), 'cifar10' (torchvision's copy in --data-root), "
                        "a directory of class folders (root/<class>/<image>), or a .zip of them")
    p.add_argument("--data-root", default="data", help="where torchvision's CIFAR-10 lives (default: data)")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 if missing (needs internet)")
    if training:
        p.add_argument("--val-size", type=float, default=0.1,
                       help="validation images: a count if >= 1, else a fraction (default 0.1; 0 = none)")
        p.add_argument("--split-seed", type=int, default=0, help="seed of the stratified split (default 0)")
    else:
        p.add_argument("--val-size", type=float,
                       help="on the model's training data: its recorded validation split (the default; another "
                            "is refused); on other data: score this split's validation images, not all")
        p.add_argument("--split-seed", type=int, help="seed of that split (default: the recorded one, else 0)")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default)")

def runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", default="eager", choices=RUNTIMES,
                   help="eager (PyTorch fp32, default), packed (PyTorch fp32, prepacked weights), onnx "
                        "(ONNX Runtime fp32) or int8 (ONNX Runtime, int8 weights); see vitdemo/runtime.py")
    p.add_argument("--onnx", help="onnx/int8: an exported file to use (refused if it is of other weights or the "
                                  "other precision, never overwritten), or a new file name to export to")
