"""`vitdemo predict`: the most likely classes of each image, with their probabilities."""

from __future__ import annotations

import argparse

import torch

from ..checkpoint import load_checkpoint
from ..data import Preprocessing, load_image
from . import support
from .common import runtime_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="classify images",
                              description="Print the most likely classes of each image, with their probabilities.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", help="checkpoint file or run directory (default: the shipped model)")
    p.add_argument("--topk", type=support.positive_int, default=5,
                   help="how many classes to print, at least 1 (default 5; at most the model's classes are shown)")
    runtime_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model, meta = load_checkpoint(args.checkpoint)
    model = support.runner(model, args.runtime, args.onnx, args.checkpoint)
    prep = Preprocessing.for_checkpoint(meta)
    for path in args.images:
        x = prep(load_image(path))
        with torch.no_grad():
            probs = model(x).softmax(-1)[0]
        top = probs.topk(min(args.topk, len(probs)))
        labels = ", ".join(f"{meta['class_names'][i]} {p:.3f}" for p, i in zip(top.values.tolist(), top.indices.tolist()))
        print(f"{path}: {labels}")
    return 0
