"""Which heat map shows what the model uses? The perturbation test of Chefer, Gur and Wolf
(CVPR 2021) for every explanation the app offers, on held-out CIFAR-10 images.

    python benchmarks/faithfulness.py                        # the shipped model, 1,000 images
    python benchmarks/faithfulness.py --images 200 --no-save # a quick look

For each method and image, the patches are ranked by the method's map; 10%, 20%, ..., 90% of
them are replaced by the dataset's mean colour (0 after the model's normalisation), most
relevant first (positive perturbation) or least relevant first (negative), and the model's
top-1 accuracy against the true labels is measured at each step. AUC = 100 x the trapezoidal
area under accuracy (0 to 1) against the removed fraction from 0.1 to 0.9 (the steps of Chefer
et al.; the curve's point at 0, the intact images, is printed but not integrated). Positive:
lower is better; negative: higher is better; a random order is the floor.

Class-specific methods (gradient rollout, relevance) are run twice: explaining each image's
predicted class, and its true class. Rollout and raw attention do not depend on the class, so
their two rows are the same maps, reported once for both.

The images are the shipped model's own held-out split (val_size and split_seed from its
metadata), 100 per class by default. Results are printed as a table and written to
faithfulness.json beside the checkpoint (the app shows it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import vitdemo  # noqa: E402
from vitdemo import faithfulness as FT  # noqa: E402
from vitdemo import explanations as E  # noqa: E402
from vitdemo.checkpoint import DEFAULT_CHECKPOINT  # noqa: E402
from vitdemo.data import DataError, Preprocessing, checkpoint_data, stratified_sample  # noqa: E402
from vitdemo.runtime import weights_digest  # noqa: E402

DEFAULT_DATA = Path("~/.cache/vitdemo/cifar10/train").expanduser()

# Every method maps (model, normalised images, attention maps, class per image) to (B, gh, gw)
# scores, higher = more relevant. `class_specific` says whether the class changes the map.
Method = Callable[[vitdemo.VisionTransformer, Tensor, list[Tensor], Tensor], Tensor]
METHODS: dict[str, tuple[str, bool, Method | None]] = {
    "rollout_mean": ("Attention rollout, mean fusion", False,
                     lambda m, x, att, c: E.attention_rollout(att, "mean", grid_size=m.config.grid_size)),
    "rollout_max": ("Attention rollout, max fusion", False,
                    lambda m, x, att, c: E.attention_rollout(att, "max", grid_size=m.config.grid_size)),
    "last_layer_cls": ("Last layer's class-token attention (mean over heads)", False,
                       lambda m, x, att, c: att[-1][:, :, 0, 1:].mean(1).reshape(len(x), *m.config.grid_size)),
    "gradient_rollout": ("Gradient rollout", True, lambda m, x, att, c: E.gradient_rollout(m, x, c)),
    "relevance": ("Relevance (Chefer et al. 2021)", True, lambda m, x, att, c: E.relevance(m, x, c)),
    "random": ("Random order (floor)", False, None),
}


def held_out_images(data_dir: Path, meta: dict, count: int):
    """The checkpoint's held-out split, rebuilt exactly (same seed, same size), then `count`
    images of it, each class in proportion."""
    if "val_size" not in meta or "split_seed" not in meta:
        sys.exit("this checkpoint does not record its held-out split (val_size, split_seed); "
                 "the test must run on images the model did not train on")
    if not data_dir.is_dir():
        sys.exit(f"CIFAR-10's training images (class folders) were not found at {data_dir}; "
                 "pass --data with the folder the model was trained from")
    try:
        val = checkpoint_data(meta, data_dir).val  # found by the data's recorded digest
    except DataError as err:
        sys.exit(f"{err}: pass --data with the folder the model was trained from")
    return stratified_sample(val, count)


def run(model, meta, images, batch_size: int, seed: int, log=print) -> tuple[dict, dict]:
    """Every method's curves and AUCs (the JSON's "methods"), and each image's AUC per
    (method, target, sign) for the paired comparisons."""
    patch = model.config.patch_size
    steps = FT.FRACTIONS[1:]  # the intact images (fraction 0) are evaluated once, shared by all
    # hits[key][target][sign]: list of (steps, batch) bool tensors
    hits = {k: {t: {s: [] for s in ("positive", "negative")} for t in ("predicted", "true")} for k in METHODS}
    intact, shuffle = [], torch.Generator().manual_seed(seed)
    for start in range(0, len(images), batch_size):
        x = Preprocessing.for_checkpoint(meta).normalize(images.images[start:start + batch_size])
        labels = images.labels[start:start + batch_size]
        with torch.no_grad():
            logits, attentions = model(x, return_attention=True)
        predicted = logits.argmax(-1)
        intact.append(predicted == labels)
        random = FT.random_order(len(x), model.config.num_patches, generator=shuffle)
        for key, (_, class_specific, explain) in METHODS.items():
            orders = {}
            for target, classes in (("predicted", predicted), ("true", labels)):
                if explain is None:
                    orders[target] = random
                elif class_specific or target == "predicted":
                    # The same tie-breaking draw for both targets: the same map gives the same order.
                    tie_break = torch.Generator().manual_seed(seed + start)
                    orders[target] = FT.removal_order(explain(model, x, attentions, classes), generator=tie_break)
                else:
                    orders[target] = orders["predicted"]
            for sign in ("positive", "negative"):
                first = FT.perturbation_hits(model, x, labels, orders["predicted"], patch, sign == "positive", steps)
                hits[key]["predicted"][sign].append(first)
                # Only images whose order differs (true class != predicted, for class-specific
                # methods) need new forward passes; the others would repeat them exactly.
                differ = (orders["true"] != orders["predicted"]).any(1)
                second = first.clone()
                if differ.any():
                    second[:, differ] = FT.perturbation_hits(model, x[differ], labels[differ], orders["true"][differ],
                                                             patch, sign == "positive", steps)
                hits[key]["true"][sign].append(second)
        log(f"  {min(start + batch_size, len(images))}/{len(images)} images")

    accuracy_intact = torch.cat(intact).float().mean().item()
    methods, per_image = [], {}
    for key, (name, class_specific, _) in METHODS.items():
        entry = {"key": key, "name": name, "class_specific": class_specific}
        for target in ("predicted", "true"):
            result = {}
            for sign in ("positive", "negative"):
                h = torch.cat(hits[key][target][sign], 1).float()  # (steps, images)
                curve = [accuracy_intact] + h.mean(1).tolist()
                areas = FT.perturbation_auc(steps, h.numpy())  # one per image; their mean is the AUC
                per_image[key, target, sign] = areas
                result[f"{sign}_curve"] = [round(a, 4) for a in curve]
                result[f"{sign}_auc"] = round(FT.perturbation_auc(FT.FRACTIONS, curve), 2)
                result[f"{sign}_auc_se"] = round(float(areas.std(ddof=1) / np.sqrt(len(areas))), 2)
            entry[target] = result
        methods.append(entry)
    return {"accuracy_intact": round(accuracy_intact, 4), "methods": methods}, per_image


def paired_differences(per_image: dict, against: str = "relevance") -> list[str]:
    """Each method's AUC minus `against`'s on the same images, with the standard error of that
    paired difference: whether a gap in the table is larger than the images' noise."""
    lines = []
    for target in ("predicted", "true"):
        for sign in ("positive", "negative"):
            base = per_image[against, target, sign]
            for key in METHODS:
                if key != against:
                    d = per_image[key, target, sign] - base
                    se = d.std(ddof=1) / np.sqrt(len(d))
                    lines.append(f"  {sign:<8} {target:<9} {key:<17} {d.mean():+6.2f} +- {se:.2f}")
    return lines


def table(results: dict) -> str:
    """The summary as a Markdown table (README's), each AUC with its standard error over images."""
    lines = ["| " + " | ".join(FT.SUMMARY_HEADERS) + " |", "|---|---|---|---|---|---|"]
    for m in results["methods"]:
        cells = [m["name"], "yes" if m["class_specific"] else "no"]
        for target, sign in (("predicted", "positive"), ("predicted", "negative"), ("true", "positive"),
                             ("true", "negative")):
            cells.append(f"{m[target][f'{sign}_auc']:.1f} ± {m[target][f'{sign}_auc_se']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT.parent), help="a checkpoint (folder or file)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the class folders the checkpoint was trained from")
    parser.add_argument("--images", type=int, default=1000, help="held-out images, each class in proportion")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="seeds the random order and the breaking of ties")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="JSON file (default: faithfulness.json beside the checkpoint)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    model, meta = vitdemo.load_checkpoint(args.checkpoint)
    model.requires_grad_(False)  # explanations take their gradients through the input
    images = held_out_images(Path(args.data).expanduser(), meta, args.images)
    print(f"{len(images)} held-out images ({torch.bincount(images.labels).tolist()} per class), "
          f"{model.config.num_patches} patches each, {torch.get_num_threads()} threads")
    results, per_image = run(model, meta, images, args.batch_size, args.seed)
    seconds = time.perf_counter() - began
    checkpoint = Path(args.checkpoint)
    try:
        shown = checkpoint.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        shown = checkpoint.name  # never a server path in a file the app shows
    report = {
        "checkpoint": shown,
        "weights_sha256": weights_digest(model),  # ties these figures to the weights they measured
        "images": len(images),
        "selection": f"{len(images)} of the checkpoint's {int(meta['val_size'])} held-out images "
                     f"(split_seed {meta['split_seed']}), each class in proportion",
        "fractions": list(FT.FRACTIONS),
        "auc": "100 x trapezoidal area under top-1 accuracy (true labels, 0 to 1) against the removed fraction "
               "of patches, from 0.1 to 0.9; positive perturbation (most relevant first): lower is better; "
               "negative (least relevant first): higher is better",
        "fill": "removed patches hold the dataset's mean colour (0 after normalisation)",
        "command": " ".join(["python benchmarks/faithfulness.py", *sys.argv[1:]]),
        "seed": args.seed,
        "seconds": round(seconds, 1),
        **results,
    }
    print(f"accuracy on the intact images: {100 * results['accuracy_intact']:.1f}%; {seconds:.0f} s\n")
    print(table(report))
    print("\nAUC minus relevance's AUC on the same images (+- standard error of the paired difference):")
    print("\n".join(paired_differences(per_image)))
    if not args.no_save:
        folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
        out = Path(args.out) if args.out else folder / FT.RESULTS_NAME
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
