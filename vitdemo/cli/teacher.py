"""`vitdemo teacher`: train the CNN teacher (vitdemo.teacher) that `vitdemo train --teacher`
distils from, on the training images of the split the student will use, and write
OUT/teacher.safetensors."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..data import source_name, training_data
from ..engine import select_device, train_teacher
from ..teacher import TEACHER_NAME, save_teacher
from . import support
from .common import cifar10_messages, data_options, say

# What a student checks against its own run before it learns from a teacher: the same images, split
# and crop, so the teacher never saw the student's held-out images and labels what the student sees.
SPLIT_FIELDS = ("data_digest", "val_size", "split_seed", "max_images_per_class", "data_seed")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    t = subparsers.add_parser("teacher", help="train a CNN teacher for distillation (train --teacher)",
                              description="Train the CNN teacher that `train --teacher` distils into a ViT.")
    data_options(t)
    t.add_argument("--out", required=True, help=f"folder for {TEACHER_NAME}")
    t.add_argument("--image-size", type=int, default=32, help="the student's crop (default 32)")
    t.add_argument("--epochs", type=int, default=24, help="passes over the training set (default 24)")
    t.add_argument("--batch-size", type=int, default=512, help="images per step (default 512)")
    t.add_argument("--width", type=int, default=64, help="the stem's channels; the stages have 2, 4 and 8 times "
                                                         "as many (default 64: 6.6M parameters)")
    t.add_argument("--max-images-per-class", type=int, help="use at most this many images of each class")
    t.add_argument("--seed", type=int, default=0, help="seed of initialisation, order and augmentation")
    t.add_argument("--force", action="store_true", help=f"replace an existing OUT/{TEACHER_NAME}")
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    support.check_new_files(args.out, [TEACHER_NAME], args.force)
    device = select_device(args.device)
    with cifar10_messages(args):
        data = training_data(args.data, args.image_size, val_size=args.val_size, split_seed=args.split_seed,
                             data_root=args.data_root, download=args.download,
                             max_images_per_class=args.max_images_per_class, seed=args.seed)
    say(f"{len(data.train)} training and {len(data.val) if data.val else 0} validation images; teacher on {device}")
    start = time.perf_counter()
    model, history = train_teacher(data.train, data.val, data.preprocessing, epochs=args.epochs,
                                   batch_size=args.batch_size, width=args.width, seed=args.seed, device=device,
                                   log=say)
    seconds = time.perf_counter() - start
    split = teacher_split(args, data.digest)
    path = save_teacher(Path(args.out) / TEACHER_NAME, model, class_names=data.class_names,
                        **data.preprocessing.to_dict(), **split, data=source_name(args.data), epochs=args.epochs,
                        batch_size=args.batch_size, seed=args.seed, seconds=seconds, history=history,
                        val_acc=history["val_acc"][-1], parameters=sum(p.numel() for p in model.parameters()))
    say(f"saved {path}: held-out accuracy {history['val_acc'][-1]:.4f} after {seconds:.0f} s")
    return 0


def teacher_split(args: argparse.Namespace, digest: str) -> dict[str, Any]:
    """The facts of a run's data and split that teacher and student must share (SPLIT_FIELDS); the
    data seed matters only where it picked the images (--max-images-per-class)."""
    data_seed = args.seed if args.max_images_per_class is not None else None
    return dict(zip(SPLIT_FIELDS, (digest, args.val_size, args.split_seed, args.max_images_per_class, data_seed)))


def check_teacher(meta: dict[str, Any], split: dict[str, Any], class_names: list[str], prep: dict[str, Any]) -> None:
    """Refuse, in words, a teacher trained on other images, another split, classes or crop."""
    differ = [f"{name} {meta.get(name)!r} (the student's: {split[name]!r})" for name in SPLIT_FIELDS
              if meta.get(name) != split[name]]
    if list(meta.get("class_names", [])) != list(class_names):
        differ.append(f"classes {meta.get('class_names')} (the student's: {list(class_names)})")
    prep = json.loads(json.dumps(prep))  # as the teacher's file holds it: tuples become lists
    differ += [f"{name} {meta.get(name)!r} (the student's: {value!r})" for name, value in prep.items()
               if meta.get(name) != value]
    if differ:
        raise ValueError("--teacher was trained on other data, split or crop than this run: " + "; ".join(differ)
                         + ". A teacher must learn from the student's training images alone (never its held-out "
                           "ones) and see its crop; train one with `vitdemo teacher` and this run's data options")
