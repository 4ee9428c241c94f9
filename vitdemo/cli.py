"""Command line: `python -m vitdemo train | evaluate | predict | explain | export | fit-ood`.

    python -m vitdemo train --data synthetic --preset vit_cifar_4 --epochs 5 --out runs/shapes
    python -m vitdemo train --data ~/.cache/vitdemo/cifar10/train --preset vit_cifar_4 --out runs/cifar
    python -m vitdemo evaluate --checkpoint runs/cifar --data ~/.cache/vitdemo/cifar10/train
    python -m vitdemo predict photo.jpg --checkpoint runs/cifar
    python -m vitdemo explain photo.jpg --checkpoint runs/cifar --out views/
    python -m vitdemo export --checkpoint runs/cifar --out model.pt2
    python -m vitdemo export --checkpoint runs/cifar --out model.int8.onnx --int8
    python -m vitdemo fit-ood --checkpoint runs/cifar --data ~/.cache/vitdemo/cifar10/train
    torchrun --nproc_per_node=2 -m vitdemo train ...      # DistributedDataParallel

`python -m vitdemo COMMAND --help` explains every option. Installed (`pip install -e .`), the
`vitdemo` command is the same: `vitdemo train ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from . import create_model, get_config, list_presets, load_weights
from .checkpoint import CheckpointError, atomic_write, load_checkpoint, load_peer_weights
from .data import (
    CIFAR10,
    DataError,
    ImageData,
    Preprocessing,
    TrainingData,
    load_image,
    load_source,
    recorded_limits,
    run_split,
    source_name,
    split,
    stratified_split,
    training_data,
)
from . import cli_support as support
from .engine import COMPILE_MODES, PRECISIONS, RECIPES, DoneEvent, EpochEvent, StepEvent, TrainingError, evaluate, select_device, train
from .pretrained import PretrainedUnavailable
from .runtime import RUNTIMES, RuntimeUnavailable, export_onnx, load_onnx

# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


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
    split_of = dict(meta)
    for name in ("val_size", "split_seed"):
        given, recorded = getattr(args, name), meta.get(name)
        option = "--" + name.replace("_", "-")
        if given is not None and recorded is not None and float(given) != float(recorded):
            raise ValueError(f"{option} {given:g} is not the split the model was trained with ({recorded:g}); "
                             f"leave {option} out to use the recorded one")
        split_of[name] = recorded if recorded is not None else given  # an older checkpoint: as the user says
    run = run_split(split_of, data, args.data)
    if run is None:
        return None, load(args, prep) if limits["max_images_per_class"] else data
    if run.val is None:
        raise ValueError(f"the model was trained on every image of {args.data} (val_size 0): none are held out. "
                         f"Give other data, such as a test set")
    return run, data


def stratified_sample(data: ImageData, size: int, seed: int = 0) -> ImageData:
    """`size` of the images, each class in proportion (the first `size` of a split sorted by
    index would be the first classes only); all of them if `size` is not smaller."""
    if size >= len(data):
        return data
    return data.subset(stratified_split(data.labels, size, seed=seed)[1])


def _overrides(pairs: list[str]) -> dict[str, Any]:
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


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _print(*args: Any) -> None:
    if _is_main():
        print(*args, flush=True)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import ood
    from .checkpoint import update_metadata
    from .visualize import plot_history

    support.check_new_run(args.out, args.resume, args.force)  # before any download, data or model
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = select_device(args.device)
    if world > 1:  # launched by torchrun
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend)
    torch.manual_seed(args.seed)

    # A starting point's image size and normalisation decide how the data are prepared.
    init_meta = None
    if args.init_from in ("torchvision", "timm"):
        from .pretrained import load_pretrained

        try:
            init_model, init_meta = load_pretrained(args.init_from)
        except PretrainedUnavailable as err:
            raise PretrainedUnavailable(support.pretrained_unavailable(args.init_from, err.reason)) from None
    elif args.init_from and not args.init_source:
        init_model, init_meta = load_checkpoint(args.init_from)
    # A starting model brings its crop and normalisation; a new one gets its data's (measured).
    start = Preprocessing.for_checkpoint(init_meta) if init_meta is not None else None
    overrides = _overrides(args.set)
    image_size = args.image_size or overrides.get("image_size") or (
        start.image_size if start else get_config(args.preset).image_size[0])
    if isinstance(image_size, (tuple, list)):
        raise ValueError("train at a square size: --image-size N (or --set image_size=N)")
    with cifar10_messages(args):
        data = training_data(args.data, image_size, start=start, val_size=args.val_size, split_seed=args.split_seed,
                             data_root=args.data_root, download=args.download,
                             max_images_per_class=args.max_images_per_class, seed=args.seed)
    if data.skipped:
        _print(f"skipped {len(data.skipped)} unreadable file(s), e.g. {data.skipped[:3]}")
    classes = len(data.class_names)
    if init_meta is not None:
        if overrides:
            raise ValueError(f"--set {' '.join(args.set)} changes a new model; a fine-tuned model keeps the "
                             f"architecture of --init-from (only --image-size changes it)")
        model = init_model
        if image_size != model.config.image_size[0]:
            model.set_image_size(image_size)  # the paper's fine-tuning at higher resolution
        if list(init_meta["class_names"]) != list(data.class_names):
            model.reset_classifier(classes)
    else:
        overrides["image_size"] = image_size
        # The data decide the classes; a --set num_classes that agrees with them is harmless.
        if overrides.pop("num_classes", classes) != classes:
            raise ValueError(f"--set num_classes={_overrides(args.set)['num_classes']} contradicts --data "
                             f"{args.data}, which has {classes} classes; leave num_classes out (the data decide it)")
        model = create_model(args.preset, num_classes=classes, **overrides)
        if args.init_from:  # another implementation's weights file, in --init-source's names
            for note in load_weights(model, load_peer_weights(args.init_from, args.init_source)):
                _print(note)
    train_data, val_data, prep = data.train, data.val, data.preprocessing

    policy = "randaugment" if args.randaugment else args.policy
    recipe = RECIPES[args.recipe].replace(**{k: v for k, v in (
        ("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr),
        ("weight_decay", args.weight_decay), ("warmup", args.warmup), ("label_smoothing", args.label_smoothing),
        ("erasing", args.erasing), ("mixup_alpha", args.mixup), ("cutmix_alpha", args.cutmix),
        ("repeats", args.repeats), ("ema_decay", args.ema)) if v is not None})
    if policy is not None:
        recipe = recipe.replace(policy=None if policy == "none" else policy)
    params = sum(p.numel() for p in model.parameters())
    _print(f"{len(train_data)} training and {len(val_data) if val_data else 0} validation images, "
           f"{classes} classes; model {params:,} parameters on {device}; recipe {recipe}")
    _print(f"preprocessing: {prep}")
    out = Path(args.out)
    if args.force and _is_main():  # only now: a mistyped option or missing data leaves the old run as it was
        support.start_over(args.out)
    events = train(model, train_data, val_data, recipe, preprocess=prep, out_dir=out, seed=args.seed,
                   device=device, resume=args.resume, freeze_backbone=args.freeze_backbone,
                   log_every=args.log_every, compile=args.compile, precision=args.precision,
                   metadata={"data": source_name(args.data), "data_digest": data.digest, "split_seed": args.split_seed,
                             "val_size": args.val_size, "max_images_per_class": args.max_images_per_class,
                             "data_seed": args.seed})
    bar = None
    for event in events:
        if isinstance(event, StepEvent):
            if bar is None:
                # tqdm's own rate would count the steps before the first event (resume) as instant.
                bar = tqdm(total=event.total_steps, disable=not _is_main(), dynamic_ncols=True,
                           bar_format="{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}{postfix}]")
            bar.update(event.step - bar.n)
            bar.set_postfix_str(f"epoch {event.epoch}, loss {event.loss:.3f}, acc {event.acc:.3f}, "
                                f"{event.images_per_sec:.0f} img/s, {event.eta_seconds / 60:.0f} min left")
        elif isinstance(event, EpochEvent):
            val = (f" | test_loss: {event.val_loss:.4f} | test_acc: {event.val_acc:.4f}"
                   if event.val_loss is not None else "")
            if event.ema_val_acc is not None:
                val += f" | ema_val_acc: {event.ema_val_acc:.4f}"
            line = (f"Epoch: {event.epoch} | train_loss: {event.train_loss:.4f} | train_acc: {event.train_acc:.4f}"
                    f"{val} | {event.seconds:.0f}s")
            (bar.write if bar is not None else _print)(line) if _is_main() else None
        elif isinstance(event, DoneEvent) and _is_main():
            if bar is not None:
                bar.close()
            if not event.stopped and event.checkpoint is not None and val_data is not None and len(val_data):
                # The finished model carries its out-of-distribution statistics (vitdemo.ood): means and
                # covariance from the training images, the threshold from the held-out ones; the moving
                # average its own, from its checkpoint. The weights in the files stay bit for bit.
                update_metadata(event.checkpoint, ood=ood.fit(model, train_data, val_data, prep))
                if event.ema_checkpoint is not None:
                    average = load_checkpoint(event.ema_checkpoint)[0].to(device)
                    update_metadata(event.ema_checkpoint, ood=ood.fit(average, train_data, val_data, prep))
            results = {"history": event.history, "seconds": event.seconds, "stopped": event.stopped,
                       "checkpoint": str(event.checkpoint), "recipe": recipe.to_dict(), "parameters": params,
                       "args": {k: v for k, v in vars(args).items() if k != "func"}}
            (out / "results.json").write_text(json.dumps(results, indent=2))
            plot_history(event.history).savefig(out / "curves.png", dpi=120)
            print(f"saved {event.checkpoint}, {out / 'results.json'} and {out / 'curves.png'}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .visualize import plot_confusion_matrix, plot_history

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


def cmd_predict(args: argparse.Namespace) -> int:
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


def cmd_export(args: argparse.Namespace) -> int:
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


# What `explain` writes into --out (checked before any work, so that nothing of the user's is replaced).
EXPLAIN_VIEWS = ("patches.png", "patch_sequence.png", "position_similarity.png", "rollout.png",
                 "gradient_rollout.png", "attention_distance.png", "embedding_filters.png", "heads_last_layer.png")


def cmd_explain(args: argparse.Namespace) -> int:
    from . import explanations as E
    from . import visualize as V

    support.check_new_files(args.out, EXPLAIN_VIEWS, args.force)
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


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


def cmd_fit_ood(args: argparse.Namespace) -> int:
    """Fit out-of-distribution statistics (vitdemo.ood) for an existing checkpoint, on the split
    it was trained with, and write them into its metadata; the weights stay as they are."""
    from . import ood
    from .checkpoint import update_metadata

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


def build_parser() -> argparse.ArgumentParser:
    # support.Parser: every command's --help shows its defaults (sub-commands inherit its formatter).
    parser = support.Parser(prog=support.program_name(), description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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

    t = sub.add_parser("train", help="train or fine-tune a model", description="Train or fine-tune a ViT.")
    data_options(t)
    t.add_argument("--out", required=True, help="run directory: model.safetensors, train_state.pt, results.json, "
                                                 "curves.png")
    t.add_argument("--preset", default="vit_cifar_4", choices=list_presets(), help="model preset (default vit_cifar_4)")
    t.add_argument("--image-size", type=int, help="train at this resolution (default: the preset's)")
    t.add_argument("--set", nargs="*", metavar="NAME=VALUE",
                   help="override model hyper-parameters, e.g. --set depth=6 drop_path_rate=0.1")
    t.add_argument("--init-from", help="fine-tune: a vitdemo checkpoint, or 'torchvision' / 'timm' for "
                                       "pre-trained ImageNet ViT-B/16 (downloaded; needs internet)")
    t.add_argument("--init-source", choices=["timm", "torchvision", "hf"],
                   help="--init-from is another implementation's weights file (.pth, .bin or .safetensors) "
                        "with these parameter names; --preset must describe its architecture")
    t.add_argument("--freeze-backbone", action="store_true", help="train only the head (features cached once)")
    t.add_argument("--recipe", default="small-data", choices=list(RECIPES),
                   help="optimisation recipe (default small-data); the options below override its values")
    t.add_argument("--epochs", type=int, help=f"passes over the training set ({support.recipe_default('epochs')})")
    t.add_argument("--batch-size", type=int, help="images per optimiser step (per process under torchrun; "
                                                  f"{support.recipe_default('batch_size')})")
    t.add_argument("--lr", type=float, help="peak learning rate, reached after warm-up "
                                            f"({support.recipe_default('lr')})")
    t.add_argument("--weight-decay", type=float, help="decoupled weight decay on weight matrices "
                                                      f"({support.recipe_default('weight_decay')})")
    t.add_argument("--warmup", type=float, help=f"fraction of steps spent warming up "
                                                f"({support.recipe_default('warmup')})")
    t.add_argument("--label-smoothing", type=float, help="label smoothing of the cross-entropy loss "
                                                         f"({support.recipe_default('label_smoothing')})")
    t.add_argument("--randaugment", action="store_true", help="add RandAugment (same as --policy randaugment)")
    t.add_argument("--policy", choices=["randaugment", "autoaugment", "none"],
                   help="augmentation policy drawn per image: RandAugment, AutoAugment's CIFAR-10 policy, or none "
                        f"({support.recipe_default('policy')})")
    t.add_argument("--erasing", type=float, help="probability of random erasing per image "
                                                 f"({support.recipe_default('erasing')})")
    t.add_argument("--mixup", type=float, metavar="ALPHA", help="Mixup's alpha, 0 off "
                                                                f"({support.recipe_default('mixup_alpha')})")
    t.add_argument("--cutmix", type=float, metavar="ALPHA", help="CutMix's alpha, 0 off; with Mixup too, one of "
                                                                 f"the two per batch ({support.recipe_default('cutmix_alpha')})")
    t.add_argument("--repeats", type=int, help="repeated augmentation: copies of each image per batch "
                                               f"({support.recipe_default('repeats')})")
    t.add_argument("--ema", type=float, metavar="DECAY", help="keep an exponential moving average of the weights "
                                                              "with this decay per step, 0 off; validated and saved "
                                                              f"in OUT/ema/ ({support.recipe_default('ema_decay')})")
    t.add_argument("--compile", nargs="?", const="default", choices=list(COMPILE_MODES),
                   help="compile the training step with torch.compile (a slower start; pays on a GPU); "
                        "reduce-overhead also captures CUDA graphs")
    t.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                   help="arithmetic of the training step: auto (default) is bf16 autocast on a GPU and on a "
                        "CPU with AMX, fp32 elsewhere; weights and validation stay fp32 on a CPU")
    t.add_argument("--max-images-per-class", type=int, help="use at most this many images of each class")
    t.add_argument("--seed", type=int, default=0, help="seed of initialisation, order and augmentation")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--force", action="store_true", help="start over in an --out that holds a run: its files "
                                                        "(weights, state, results, curves, EMA) are deleted "
                                                        "once the data and model are ready")
    t.add_argument("--log-every", type=int, default=20, help="steps between progress updates")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="accuracy, per-class accuracy and confusion matrix of a checkpoint",
                       description="Accuracy, per-class accuracy and confusion matrix of a checkpoint: on the data it "
                                   "was trained on, its held-out images (the split its run recorded); on other data, "
                                   "every image.")
    e.add_argument("--checkpoint", help="checkpoint file or run directory (default: the shipped model)")
    data_options(e, training=False)
    e.add_argument("--limit", type=int, help="evaluate only N validation images, each class in proportion (seed 0)")
    runtime_options(e)
    e.add_argument("--out", help="directory for evaluation.json, confusion_matrix.png and (from the checkpoint's "
                                 "history) curves.png")
    e.add_argument("--force", action="store_true", help="replace those files if --out already has them")
    e.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify images",
                       description="Print the most likely classes of each image, with their probabilities.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", help="checkpoint file or run directory (default: the shipped model)")
    p.add_argument("--topk", type=support.positive_int, default=5,
                   help="how many classes to print, at least 1 (default 5; at most the model's classes are shown)")
    runtime_options(p)
    p.set_defaults(func=cmd_predict)

    v = sub.add_parser("explain", help="write every visualisation of one image as PNG files",
                       description="Write every view of how the model sees one image as PNG files: patch grid, "
                                   "position embeddings, attention rollout, per-head attention, attention distance.")
    v.add_argument("image", help="an image file")
    v.add_argument("--checkpoint", help="checkpoint file or run directory (default: the shipped model)")
    v.add_argument("--out", required=True, help="output directory")
    v.add_argument("--force", action="store_true", help="replace the views' files if --out already has them")
    v.add_argument("--head-fusion", default="mean", choices=["mean", "max", "min"], help="rollout head fusion")
    v.add_argument("--discard-ratio", type=float, default=0.0, help="rollout: share of weakest attention dropped")
    v.set_defaults(func=cmd_explain)

    x = sub.add_parser("export", help="export a checkpoint as a torch.export program (.pt2) or ONNX (.onnx)",
                       description="Export a checkpoint as a torch.export program (.pt2) or an ONNX file (.onnx, "
                                   "fp32 or int8 weights), and print its largest difference to the eager model.")
    x.add_argument("--checkpoint", help="checkpoint file or run directory (default: the shipped model)")
    x.add_argument("--out", required=True, help="output file: model.pt2 (torch.export) or model.onnx (ONNX)")
    x.add_argument("--int8", action="store_true", help="ONNX only: int8 weights (ONNX Runtime dynamic quantisation)")
    x.add_argument("--force", action="store_true", help="replace --out if it exists")
    x.set_defaults(func=cmd_export)

    o = sub.add_parser("fit-ood", help="fit a checkpoint's out-of-distribution score (vitdemo.ood) and store it "
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
    o.set_defaults(func=cmd_fit_ood)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        support.check_device(getattr(args, "device", None))  # before any data are loaded
        if "checkpoint" in vars(args):
            support.check_default_checkpoint(args.checkpoint)
        return args.func(args)
    except (DataError, CheckpointError, TrainingError, RuntimeUnavailable, PretrainedUnavailable, ValueError,
            OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "train":
            print("interrupted; the last epoch's checkpoint is intact (resume with --resume)", file=sys.stderr)
        else:  # no checkpoint to speak of; what was being written is left as it was
            print("interrupted", file=sys.stderr)
        return 130
