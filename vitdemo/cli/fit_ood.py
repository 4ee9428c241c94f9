"""`vitdemo fit-ood`: fit a checkpoint's out-of-distribution statistics (`vitdemo.ood`) on its
run's own split and store them in its metadata."""

from __future__ import annotations

import argparse


from ..checkpoint import load_checkpoint
from ..engine import select_device
from .common import check_classes, run_images


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    o = subparsers.add_parser("fit-ood", help="fit a checkpoint's out-of-distribution score (vitdemo.ood) and store it "
                                              "in its metadata")
    o.add_argument("--checkpoint", required=True, help="checkpoint file or run directory (rewritten in place; "
                                                      "the weights are kept bit for bit)")
    o.add_argument("--data", required=True, help="the data the model was trained on: 'synthetic', 'cifar10', a "
                                                "directory of class folders, or a .zip of them")
    o.add_argument("--data-root", default="data", help="where torchvision's CIFAR-10 lives (default: data)")
    o.add_argument("--download", action="store_true", help="download CIFAR-10 if missing (needs internet)")
    o.add_argument("--val-size", type=float, help="the validation split the model was trained with (default: "
                                                  "the one recorded in the checkpoint; another one is refused)")
    o.add_argument("--split-seed", type=int, help="seed of that split (default: the recorded one)")
    o.add_argument("--false-alarm-rate", type=float, default=0.05,
                   help="share of held-out images allowed above the threshold (default 0.05)")
    o.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default)")
    o.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Fit out-of-distribution statistics (vitdemo.ood) for an existing checkpoint, on the split
    it was trained with, and write them into its metadata; the weights stay as they are."""
    from .. import ood
    from ..checkpoint import update_metadata

    model, meta = load_checkpoint(args.checkpoint)
    run, data = run_images(args, meta)
    check_classes(data, meta)
    if run is None and (meta.get("val_size") is None and args.val_size is None
                        or meta.get("split_seed") is None and args.split_seed is None):
        raise ValueError("the checkpoint does not record its validation split: give --val-size and --split-seed "
                         "as it was trained (the held-out images must be images it was not trained on)")
    if run is None:
        raise ValueError(f"--data {args.data} holds other images than the model was trained on: the statistics "
                         f"describe its training images, and the threshold needs its held-out ones")
    train_data, val_data = run.train, run.val
    prep = run.preprocessing
    model.to(select_device(args.device))
    stats = ood.fit(model, train_data, val_data, prep, false_alarm_rate=args.false_alarm_rate)
    path = update_metadata(args.checkpoint, ood=stats)
    calibration = stats["calibration"]
    print(f"fitted on {calibration['train_images']} training images; threshold {stats['threshold']:.4f} flags "
          f"{calibration['held_out_flagged']:.2%} of the {calibration['held_out_images']} held-out images "
          f"(goal: at most {args.false_alarm_rate:.0%}); saved in {path}")
    return 0
