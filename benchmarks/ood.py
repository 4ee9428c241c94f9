"""How well the shipped model's out-of-distribution score (vitdemo.ood) tells held-out CIFAR-10
images from images unlike them, against the maximum-softmax-probability baseline.

    python benchmarks/ood.py                                   # the shipped model, CIFAR-10 from ~/.cache
    python benchmarks/ood.py --checkpoint RUN --data DIR --per-kind 100 --train-sample 5000

In-distribution: the validation split the model was trained with (recorded in its metadata:
5,000 images for the shipped model), never trained on. Unlike: `--per-kind` images of every kind
that `vitdemo.ood.unlike_images` draws (noise, flat colours, gradients, text pages, stripes,
checkerboards, flat shapes on plain backgrounds), made at 96 px and preprocessed as an upload is.

For the shipped threshold it prints the false-alarm rate on the held-out images (it was
calibrated on them: at most 5% by construction), the rate on one half with a threshold
calibrated on the other (an estimate for unseen images), and the rate that a threshold
calibrated on training images gives. Then, per kind and over all unlike images, the AUROC and
the share flagged at the threshold that flags 5% of the held-out images, for the shipped score,
for the same score and the one after the final LayerNorm both fitted on `--train-sample`
training images (like for like), and for the baseline, 1 - the maximum softmax probability
(Hendrycks and Gimpel, 2017).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vitdemo import ood  # noqa: E402
from vitdemo.checkpoint import load_checkpoint  # noqa: E402
from vitdemo.data import ImageData, Preprocessing, checkpoint_data, iterate_batches, stratified_sample  # noqa: E402


@torch.no_grad()
def features(model, batches) -> dict[str, torch.Tensor]:
    """Class tokens entering and leaving the final LayerNorm, and the logits, in one forward pass
    per batch (the LayerNorm and the head act on the class token alone)."""
    out = {"pre_norm": [], "post_norm": [], "logits": []}
    for x in batches:
        pre = ood.features(model, x, "pre_norm")
        out["pre_norm"].append(pre)
        out["post_norm"].append(model.norm(pre))
        out["logits"].append(model.head(out["post_norm"][-1]))
    return {k: torch.cat(v) for k, v in out.items()}


def images_of(data: ImageData, meta, batch_size: int = 500):
    return (Preprocessing.for_checkpoint(meta).normalize(x) for x, _ in iterate_batches(data, batch_size, shuffle=False))


def msp_score(f: dict[str, torch.Tensor]) -> torch.Tensor:
    """The baseline's score: 1 - the maximum softmax probability (higher = less like training)."""
    return 1 - f["logits"].softmax(-1).max(-1).values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="checkpoint (default: the shipped CIFAR-10 model)")
    parser.add_argument("--data", default=str(Path("~/.cache/vitdemo/cifar10/train").expanduser()),
                        help="the data the model was trained on (default: CIFAR-10 in ~/.cache/vitdemo)")
    parser.add_argument("--per-kind", type=int, default=100, help="unlike images per kind (default 100)")
    parser.add_argument("--train-sample", type=int, default=5000,
                        help="training images for the comparisons (threshold from training images; the score "
                             "after the LayerNorm, fitted on them) (default 5000)")
    args = parser.parse_args()

    model, meta = load_checkpoint(args.checkpoint)
    if not ood.has_stats(meta):
        sys.exit("this checkpoint has no out-of-distribution statistics: run `python -m vitdemo fit-ood` first")
    stats = meta["ood"]
    means, whitening = torch.tensor(stats["means"]), torch.tensor(stats["whitening"])
    feature = stats.get("feature", "pre_norm")
    run = checkpoint_data(meta, args.data)  # the split the model was trained with, found by the data's digest
    train_data, val_data = run.train, run.val
    seen = stratified_sample(train_data, args.train_sample)
    start = time.perf_counter()
    held = features(model, images_of(val_data, meta))
    trained = features(model, images_of(seen, meta))
    unlike = ood.unlike_images(args.per_kind, seed=1)  # seed 1: not the images the tests draw
    prep = Preprocessing.for_checkpoint(meta)
    kinds = {kind: features(model, [torch.cat([prep(im) for im in images])])
             for kind, images in unlike.items()}
    print(f"{len(val_data)} held-out images of the split the model was trained with, {args.per_kind} unlike "
          f"images of each of {len(kinds)} kinds, {len(seen)} training images (scored in "
          f"{time.perf_counter() - start:.0f} s)\n")

    # The shipped score: statistics and threshold from the checkpoint.
    threshold = stats["threshold"]
    held_maha = ood.distances(held[feature], means, whitening)
    print(f"Shipped score: Mahalanobis distance of the {ood.FEATURES[feature]}, threshold {threshold:.3f}")
    print(f"  false alarms on the {len(val_data)} held-out images it was calibrated on: "
          f"{(held_maha > threshold).double().mean():.2%}")
    order = torch.randperm(len(held_maha), generator=torch.Generator().manual_seed(0))
    halves = order[: len(order) // 2], order[len(order) // 2:]
    crossed = [(held_maha[b] > ood.calibrate(held_maha[a], 0.05)).double().mean().item()
               for a, b in (halves, halves[::-1])]
    print(f"  threshold calibrated on one random half, false alarms on the other: {crossed[0]:.2%} and "
          f"{crossed[1]:.2%}")
    from_train = ood.calibrate(ood.distances(trained[feature], means, whitening), 0.05)
    print(f"  a threshold calibrated on {len(seen)} training images instead ({from_train:.3f}) flags "
          f"{(held_maha > from_train).double().mean():.2%} of the held-out images")

    # The comparisons: after the LayerNorm (fitted here on the training sample) and the baseline.
    post_stats = ood.fit_gaussians(trained["post_norm"], seen.labels)
    pre_stats = ood.fit_gaussians(trained["pre_norm"], seen.labels)
    scorers = {
        "Mahalanobis (shipped)": lambda f: ood.distances(f[feature], means, whitening),
        f"Mahalanobis before the LayerNorm, fitted on {len(seen)}": lambda f: ood.distances(f["pre_norm"], *pre_stats),
        f"Mahalanobis after the LayerNorm, fitted on {len(seen)}": lambda f: ood.distances(f["post_norm"], *post_stats),
        "max softmax probability": msp_score,
    }
    print(f"\nAUROC, held-out images against unlike images, and the share of unlike images flagged at the "
          f"threshold that flags 5% of the held-out images:\n")
    print("| kind | " + " | ".join(scorers) + " |")
    print("|---|" + "---|" * len(scorers))
    rows = {kind: [] for kind in [*kinds, "all"]}
    for name, score in scorers.items():
        inside = score(held)
        cut = ood.calibrate(inside, 0.05)
        outside = {kind: score(f) for kind, f in kinds.items()}
        outside["all"] = torch.cat(list(outside.values()))
        for kind, values in outside.items():
            rows[kind].append(f"{ood.auroc(inside, values):.4f} ({(values > cut).double().mean():.0%})")
    for kind, cells in rows.items():
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
