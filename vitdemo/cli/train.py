"""`vitdemo train`: train a ViT from scratch or fine-tune one (`--init-from`), one process or many
(torchrun), writing a run folder: model.safetensors, train_state.pt, results.json, curves.png."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from .. import create_model, get_config, list_presets, load_weights
from ..checkpoint import load_checkpoint, load_peer_weights
from ..data import Preprocessing, source_name, training_data
from ..engine import COMPILE_MODES, PRECISIONS, RECIPES, DoneEvent, EpochEvent, PlanEvent, StepEvent, select_device
from ..engine import train as engine_train
from ..pretrained import PretrainedUnavailable
from . import support
from . import teacher as teacher_cli
from .common import cifar10_messages, data_options, is_main, parse_overrides, say


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    t = subparsers.add_parser("train", help="train or fine-tune a model", description="Train or fine-tune a ViT.")
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
    t.add_argument("--epochs", type=int, help=f"passes over the training set ({support.recipe_default('epochs')}); "
                                              "with --time-budget, the most it may choose")
    t.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="train for this long instead of a number of epochs: the run measures its pace on its "
                        "first steps (then undoes them) and picks the epochs whose training, validation and "
                        "checkpoints end inside the budget, counted from the start of training (after the data "
                        "are loaded; the out-of-distribution fit after it is not counted); warm-up and cosine "
                        "span those epochs, and a resumed run keeps the plan")
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
    t.add_argument("--teacher", help="distil from this CNN teacher (a folder or file made by `vitdemo teacher` "
                                     "with the same data options): its label of each augmented image is a "
                                     "second target for the class token (DeiT's hard distillation)")
    t.add_argument("--distillation", type=float, metavar="WEIGHT",
                   help="the teacher's share of the loss, the labels' is the rest (default with --teacher: 0.5)")
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
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .. import ood
    from ..checkpoint import update_metadata
    from ..visualize import plot_history

    support.check_new_run(args.out, args.resume, args.force)  # before any download, data or model
    if args.distillation is not None and not args.teacher and args.distillation > 0:
        raise ValueError("--distillation weighs a teacher's labels: give --teacher too")
    teacher_model = teacher_meta = None
    if args.teacher:
        from ..teacher import load_teacher

        teacher_model, teacher_meta = load_teacher(args.teacher)
    if args.time_budget is not None and not args.time_budget > 0:
        raise ValueError(f"--time-budget must be a positive number of seconds, got {args.time_budget:g}")
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
        from ..pretrained import load_pretrained

        try:
            init_model, init_meta = load_pretrained(args.init_from)
        except PretrainedUnavailable as err:
            raise PretrainedUnavailable(support.pretrained_unavailable(args.init_from, err.reason)) from None
    elif args.init_from and not args.init_source:
        init_model, init_meta = load_checkpoint(args.init_from)
    # A starting model brings its crop and normalisation; a new one gets its data's (measured).
    start = Preprocessing.for_checkpoint(init_meta) if init_meta is not None else None
    overrides = parse_overrides(args.set)
    if init_meta is not None and overrides:  # before the data, which can take minutes
        raise ValueError(f"--set {' '.join(args.set)} changes a new model; a fine-tuned model keeps the "
                         f"architecture of --init-from (only --image-size changes it)")
    image_size = args.image_size or overrides.get("image_size") or (
        start.image_size if start else get_config(args.preset).image_size[0])
    if isinstance(image_size, (tuple, list)):
        raise ValueError("train at a square size: --image-size N (or --set image_size=N)")
    with cifar10_messages(args):
        data = training_data(args.data, image_size, start=start, val_size=args.val_size, split_seed=args.split_seed,
                             data_root=args.data_root, download=args.download,
                             max_images_per_class=args.max_images_per_class, seed=args.seed)
    if data.skipped:
        say(f"skipped {len(data.skipped)} unreadable file(s), e.g. {data.skipped[:3]}")
    classes = len(data.class_names)
    if init_meta is not None:
        model = init_model
        if image_size != model.config.image_size[0]:
            model.set_image_size(image_size)  # the paper's fine-tuning at higher resolution
        if list(init_meta["class_names"]) != list(data.class_names):
            model.reset_classifier(classes)
    else:
        overrides["image_size"] = image_size
        # The data decide the classes; a --set num_classes that agrees with them is harmless.
        if overrides.pop("num_classes", classes) != classes:
            raise ValueError(f"--set num_classes={parse_overrides(args.set)['num_classes']} contradicts --data "
                             f"{args.data}, which has {classes} classes; leave num_classes out (the data decide it)")
        model = create_model(args.preset, num_classes=classes, **overrides)
        if args.init_from:  # another implementation's weights file, in --init-source's names
            for note in load_weights(model, load_peer_weights(args.init_from, args.init_source)):
                say(note)
    train_data, val_data, prep = data.train, data.val, data.preprocessing
    taught = {}
    if teacher_meta is not None:
        teacher_cli.check_teacher(teacher_meta, teacher_cli.teacher_split(args, data.digest), data.class_names,
                                  prep.to_dict())
        taught = {"teacher": {k: teacher_meta[k] for k in ("width", "epochs", "seed", "val_acc", "parameters")
                              if k in teacher_meta}}

    policy = "randaugment" if args.randaugment else args.policy
    # Under a time budget, --epochs is only the most it may choose (train's max_epochs).
    recipe = RECIPES[args.recipe].replace(**{k: v for k, v in (
        ("epochs", None if args.time_budget else args.epochs), ("batch_size", args.batch_size), ("lr", args.lr),
        ("weight_decay", args.weight_decay), ("warmup", args.warmup), ("label_smoothing", args.label_smoothing),
        ("erasing", args.erasing), ("mixup_alpha", args.mixup), ("cutmix_alpha", args.cutmix),
        ("repeats", args.repeats), ("ema_decay", args.ema),
        ("distillation", args.distillation if args.distillation is not None else 0.5 if args.teacher else None),
    ) if v is not None})
    if policy is not None:
        recipe = recipe.replace(policy=None if policy == "none" else policy)
    params = sum(p.numel() for p in model.parameters())
    say(f"{len(train_data)} training and {len(val_data) if val_data else 0} validation images, "
           f"{classes} classes; model {params:,} parameters on {device}; recipe {recipe}"
        + (" (its epochs chosen by --time-budget)" if args.time_budget else ""))
    say(f"preprocessing: {prep}")
    out = Path(args.out)
    if args.force and is_main():  # only now: a mistyped option or missing data leaves the old run as it was
        support.start_over(args.out)
    events = engine_train(model, train_data, val_data, recipe, preprocess=prep, out_dir=out, seed=args.seed,
                   device=device, resume=args.resume, freeze_backbone=args.freeze_backbone,
                   log_every=args.log_every, compile=args.compile, precision=args.precision,
                   time_budget=args.time_budget, max_epochs=args.epochs if args.time_budget else None,
                   metadata={"data": source_name(args.data), "data_digest": data.digest, "split_seed": args.split_seed,
                             "val_size": args.val_size, "max_images_per_class": args.max_images_per_class,
                             "data_seed": args.seed, **taught},
                   teacher=teacher_model)
    bar = None
    for event in events:
        if isinstance(event, PlanEvent):
            if is_main():
                say(f"{event.plan.epochs} epoch(s): {event.plan.reason}")
        elif isinstance(event, StepEvent):
            if bar is None:
                # tqdm's own rate would count the steps before the first event (resume) as instant.
                bar = tqdm(total=event.total_steps, disable=not is_main(), dynamic_ncols=True,
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
            (bar.write if bar is not None else say)(line) if is_main() else None
        elif isinstance(event, DoneEvent) and is_main():
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
            results = {"time_budget": event.budget.to_dict()} if event.budget else {}
            results |= {"history": event.history, "seconds": event.seconds, "stopped": event.stopped,
                       "checkpoint": str(event.checkpoint), "parameters": params,
                       "recipe": (recipe.replace(epochs=event.budget.epochs) if event.budget else recipe).to_dict(),
                       "args": {k: v for k, v in vars(args).items() if k != "func"}}
            (out / "results.json").write_text(json.dumps(results, indent=2))
            plot_history(event.history).savefig(out / "curves.png", dpi=120)
            print(f"saved {event.checkpoint}, {out / 'results.json'} and {out / 'curves.png'}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0
