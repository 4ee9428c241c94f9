"""Pick the app's CIFAR-10 examples: two images per class from the shipped model's held-out split.

    python scripts/pick_examples.py --data ~/.cache/vitdemo/cifar10/train

The held-out split is the one the shipped checkpoint records (its `val_size` images, stratified,
drawn with its `split_seed`): images the model never trained on. For each class the images are
taken in the split's order, and the first two that the model answers correctly and does not flag
as unlike its training data are kept. That is a choice, said in the app and in
`vitdemo/app/assets/cifar10/examples.json`, which records for each class how many held-out images
were looked at to find them (the model gets 86% of held-out images right, so examples it gets
wrong exist; these are not they). The 20 images are written as PNG files with their exact pixels;
the data set's README allows these 20, and no other CIFAR-10 image, in the repository.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vitdemo import ood  # noqa: E402
from vitdemo.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint  # noqa: E402
from vitdemo.data import Preprocessing, load_source, recorded_limits, run_split, stratified_split  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "vitdemo" / "app" / "assets" / "cifar10"
PER_CLASS = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CIFAR-10's training images as class folders")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    model, meta = load_checkpoint(args.checkpoint)
    model.eval()
    prep = Preprocessing.for_checkpoint(meta)
    data = load_source(args.data, prep, **recorded_limits(meta))
    if list(data.class_names) != list(meta["class_names"]):
        raise SystemExit(f"the folder's classes {data.class_names} are not the checkpoint's {meta['class_names']}")
    if run_split(meta, data, args.data) is None:
        raise SystemExit("these are not the images the checkpoint was trained on (their digest differs)")
    _, held_out = stratified_split(data.labels, int(meta["val_size"]), seed=int(meta["split_seed"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen, looked = {c: [] for c in data.class_names}, {c: 0 for c in data.class_names}
    for index in held_out.tolist():
        name = data.class_names[int(data.labels[index])]
        if len(chosen[name]) == PER_CLASS:
            continue
        looked[name] += 1
        x = prep.normalize(data.images[index : index + 1])
        with torch.no_grad():
            right = int(model(x).argmax()) == int(data.labels[index])
        if right and not ood.check(model, x, meta)[0].flagged:
            file = f"{name}-{index}.png"
            Image.fromarray(data.images[index].permute(1, 2, 0).numpy()).save(out / file)
            chosen[name].append(file)
        if all(len(v) == PER_CLASS for v in chosen.values()):
            break
    manifest = {"source": "CIFAR-10 training images, the shipped model's held-out split (never trained on)",
                "split": {"val_size": meta["val_size"], "split_seed": meta["split_seed"]},
                "rule": f"per class, in the split's order, the first {PER_CLASS} answered correctly and not flagged",
                "command": "python scripts/pick_examples.py --data CIFAR10_TRAIN_FOLDER",
                "classes": {c: {"files": chosen[c], "held_out_images_looked_at": looked[c]} for c in chosen}}
    (out / "examples.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for c in chosen:
        print(f"{c:12s} {chosen[c]}  (looked at {looked[c]})")


if __name__ == "__main__":
    main()
