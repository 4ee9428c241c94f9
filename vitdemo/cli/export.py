"""`vitdemo export`: a checkpoint as a torch.export program (.pt2) or an ONNX file (.onnx)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_write, load_checkpoint
from ..runtime import export_onnx, load_onnx
from . import support


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    x = subparsers.add_parser("export", help="export a checkpoint as a torch.export program (.pt2) or ONNX (.onnx)",
                              description="Export a checkpoint as a torch.export program (.pt2) or an ONNX file "
                                          "(.onnx, fp32 or int8 weights), and print its largest difference to the "
                                          "eager model.")
    x.add_argument("--checkpoint", help="checkpoint file or run directory (default: the shipped model)")
    x.add_argument("--out", required=True, help="output file: model.pt2 (torch.export) or model.onnx (ONNX)")
    x.add_argument("--int8", action="store_true", help="ONNX only: int8 weights (ONNX Runtime dynamic quantisation)")
    x.add_argument("--force", action="store_true", help="replace --out if it exists")
    x.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    support.check_new_file(args.out, args.force)
    model, meta = load_checkpoint(args.checkpoint)
    size = meta["image_size"]
    example = torch.randn(2, 3, size, size)  # batch 2: a batch of 1 would be specialised to a constant
    out = Path(args.out)
    if out.suffix == ".onnx":
        # overwrite=False also keeps a file that appeared while the model was exported.
        export_onnx(model, out, int8=args.int8, overwrite=args.force)
        with torch.no_grad():
            diff = (load_onnx(out, model)(example) - model(example)).abs().max().item()
        print(f"saved {out} (ONNX, {'int8 weights' if args.int8 else 'fp32'}; max |difference| to eager {diff:.2e})")
        return 0
    if args.int8:
        raise ValueError("--int8 applies to ONNX files: give --out a .onnx name")
    out.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    # Written whole under a temporary name, then renamed: an interrupted export leaves the old file.
    atomic_write(out, lambda tmp: _save_program(program, tmp), overwrite=args.force)
    with torch.no_grad():
        diff = (torch.export.load(out).module()(example) - model(example)).abs().max().item()
    print(f"saved {out} (torch.export program; max |difference| to eager {diff:.2e})")
    return 0


def _save_program(program: Any, path: str) -> None:
    # A file object, not the name: torch.export warns about a file name not ending in .pt2.
    with open(path, "wb") as f:
        torch.export.save(program, f)
