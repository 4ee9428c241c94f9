"""`vitdemo explain`: every view of how a model sees one image, as PNG files."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint
from ..data import Preprocessing, load_image
from . import support


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    v = subparsers.add_parser("explain", help="write every visualisation of one image as PNG files",
                              description="Write every view of how the model sees one image as PNG files: "
                                          "patch grid, position embeddings, attention rollout, per-head attention, "
                                          "attention distance.")
    v.add_argument("image", help="an image file")
    v.add_argument("--checkpoint", help="checkpoint file or run directory (default: the shipped model)")
    v.add_argument("--out", required=True, help="output directory")
    v.add_argument("--force", action="store_true", help="replace the views' files if --out already has them")
    v.add_argument("--head-fusion", default="mean", choices=["mean", "max", "min"], help="rollout head fusion")
    v.add_argument("--discard-ratio", type=float, default=0.0, help="rollout: share of weakest attention dropped")
    v.set_defaults(func=run)


# What `explain` writes into --out (checked before any work, so that nothing of the user's is replaced).
VIEWS = ("patches.png", "patch_sequence.png", "position_similarity.png", "rollout.png",
                 "gradient_rollout.png", "attention_distance.png", "embedding_filters.png", "heads_last_layer.png")


def run(args: argparse.Namespace) -> int:
    from .. import explanations as E
    from .. import visualize as V

    support.check_new_files(args.out, VIEWS, args.force)
    model, meta = load_checkpoint(args.checkpoint)
    size, patch = meta["image_size"], model.config.patch_size
    image = load_image(args.image)
    # One crop for the model and every picture of it: the checkpoint's own resize and filter.
    prep = Preprocessing.for_checkpoint(meta)
    crop = prep.crop_args()
    x = prep(image)
    with torch.no_grad():
        logits, attentions = model(x, return_attention=True)
    label = meta["class_names"][logits.argmax(-1).item()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid, strip = V.patch_grid(image, patch, **crop)
    shown = grid.size[0]  # the model's view, enlarged for small images
    views = {
        "patches.png": grid,
        "patch_sequence.png": strip,
        "position_similarity.png": V.plot_position_embedding_similarity(E.position_embedding_similarity(model)),
        "rollout.png": V.overlay(image, E.attention_rollout(attentions, args.head_fusion, args.discard_ratio)[0],
                                 size=shown, **crop),
        "gradient_rollout.png": V.overlay(image, E.gradient_rollout(model, x)[0], size=shown, **crop),
        "attention_distance.png": V.plot_mean_attention_distance(E.mean_attention_distance(attentions, patch), size),
        "embedding_filters.png": V.plot_patch_embedding_components(E.patch_embedding_components(model)),
    }
    last = E.token_attention(attentions, layer=len(attentions) - 1)[0]  # class token, last layer, per head
    views["heads_last_layer.png"] = V.image_row([V.heatmap(m, size=96) for m in last])
    for name, view in views.items():
        (view if hasattr(view, "save") else V.figure_to_image(view)).save(out / name)
    print(f"predicted {label}; wrote {', '.join(views)} to {out}")
    return 0
