"""`vitdemo evaluate`: accuracy, per-class accuracy and confusion matrix of a checkpoint, on its
run's held-out images or on other data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint
from ..data import Preprocessing, split, stratified_sample
from ..engine import evaluate, select_device
from . import support
from .common import check_classes, data_options, run_images, runtime_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    e = subparsers.add_parser("evaluate", help="accuracy, per-class accuracy and confusion matrix of a checkpoint",
                              description="Accuracy, per-class accuracy and confusion matrix of a checkpoint: "
                                          "on the data it was trained on, its held-out images (the split its run "
                                          "recorded); on other data, every image.")
    e.add_argument("--checkpoint", help="checkpoint file or run directory (default: the shipped model)")
    data_options(e, training=False)
    e.add_argument("--limit", type=int, help="evaluate only N validation images, each class in proportion (seed 0)")
    runtime_options(e)
    e.add_argument("--out", help="directory for evaluation.json, confusion_matrix.png and (from the checkpoint's "
                                 "history) curves.png")
    e.add_argument("--force", action="store_true", help="replace those files if --out already has them")
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..visualize import plot_confusion_matrix, plot_history

    model, meta = load_checkpoint(args.checkpoint)
    saved = ["evaluation.json", "confusion_matrix.png"] + (["curves.png"] if meta.get("history") else [])
    if args.out:  # before the evaluation, which can take minutes
        support.check_new_files(args.out, saved, args.force)
    prep = Preprocessing.for_checkpoint(meta)
    run, data = run_images(args, meta)
    check_classes(data, meta)
    if run is not None:  # the images it was trained on: exactly its held-out ones
        val = run.val
    else:  # other data (a test set): all of it, or the split --val-size asks for
        val = split(data, args.val_size, args.split_seed or 0)[1] if args.val_size else data
    if args.limit:
        val = stratified_sample(val, args.limit)
    device = select_device(args.device)
    runner = support.runner(model, args.runtime, args.onnx, args.checkpoint)
    # int8 quantises activations over the whole batch, so in a batch an image's answer depends on
    # its neighbours; one at a time, each image gets the answer the app and `predict` give it.
    loss, acc, preds = evaluate(runner, val, prep.mean, prep.std, batch_size=1 if args.runtime == "int8" else 256,
                                device=device if args.runtime == "eager" else "cpu")
    agreement = None
    if args.runtime != "eager":  # how often the faster runtime picks the same class as PyTorch fp32
        agreement = (evaluate(model, val, prep.mean, prep.std, device=device)[2] == preds).float().mean().item()
    n = len(meta["class_names"])
    matrix = torch.zeros(n, n, dtype=torch.long)
    matrix.index_put_((val.labels, preds), torch.ones_like(preds), accumulate=True)
    per_class = (matrix.diag() / matrix.sum(1).clamp(min=1)).tolist()
    report = {"images": len(val), "runtime": args.runtime, "loss": loss, "accuracy": acc,
              "top1_agreement_with_eager": agreement,
              "per_class_accuracy": dict(zip(meta["class_names"], per_class)), "confusion_matrix": matrix.tolist()}
    print(f"{len(val)} images, {args.runtime} runtime: loss {loss:.4f}, top-1 accuracy {acc:.4f}")
    if agreement is not None:
        print(f"top-1 agreement with the eager PyTorch fp32 model: {agreement:.4f}")
    for name, value in report["per_class_accuracy"].items():
        print(f"  {name:>12}: {value:.4f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps(report, indent=2))
        plot_confusion_matrix(matrix.numpy(), meta["class_names"]).savefig(out / "confusion_matrix.png", dpi=120)
        if meta.get("history"):  # the training curves travel inside the checkpoint
            plot_history(meta["history"]).savefig(out / "curves.png", dpi=120)
        print(f"saved {', '.join(saved)} in {out}")
    return 0
