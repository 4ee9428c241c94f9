"""Training speed on the device at hand: the engine's step and whole run against timm's same step.

    python benchmarks/engine_speed.py                          # CPU: batch 128, a short run
    python benchmarks/engine_speed.py step --device cpu --preset vit_cifar_9 --precision fp32 bf16
    python benchmarks/engine_speed.py --device cuda --batch 512 --images 45000 --compile default reduce-overhead

Sections (all measured in this one run, so read the ratios):
  step  one training step of the same architecture (forward, loss, backward, clipping, AdamW;
        in each --precision, "auto" being the engine's choice: bf16 autocast on a GPU and on a
        CPU with AMX) on a ready batch: vitdemo eager (on a CPU where the engine computes linear
        layers with oneDNN, also with PyTorch's own kernels: vitdemo.cpu_linear; elsewhere, with
        --onednn, also with oneDNN's), vitdemo compiled in each --compile mode, timm eager;
        images/s and the ratios
  run   the engine's whole loop (`vitdemo.engine.train`: batching, augmentation, the step, the
        epoch's validation and its checkpoint files) on random uint8 images, with and without
        the fast path (`--compile`); images/s of the second of three epochs (the first holds the
        warm-up and compilation, the last the fitting of the out-of-distribution statistics)

On a GPU, the eager step is bound by kernel launches and host work; compiling fuses kernels,
and "reduce-overhead" also replays each step as one CUDA graph.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# `--code DIR` measures the vitdemo package in DIR instead of this checkout's (an earlier version,
# for a before/after ratio in one run); it must be on the path before vitdemo is imported.
_code = sys.argv[sys.argv.index("--code") + 1] if "--code" in sys.argv[:-1] else str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, _code)

import vitdemo  # noqa: E402
from vitdemo.data import CIFAR_MEAN, CIFAR_STD, ImageData, Preprocessing  # noqa: E402
from vitdemo.engine import RECIPES, EpochEvent, make_optimizer, select_device, train  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timm_twin(config: vitdemo.ViTConfig) -> torch.nn.Module:
    import timm

    return timm.create_model("vit_base_patch16_224", pretrained=False, img_size=config.image_size, patch_size=config.patch_size,
                             embed_dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads,
                             mlp_ratio=config.mlp_dim / config.embed_dim, num_classes=config.num_classes)


def engine_kernels(model: torch.nn.Module, device: torch.device):
    """The context the engine runs a CPU forward pass in: oneDNN's linear layers where they pay
    (vitdemo.cpu_linear); None where it uses PyTorch's own, or for an engine (--code) without them."""
    try:
        from vitdemo.cpu_linear import LinearKernels, onednn_pays
    except ImportError:
        return None
    return LinearKernels(model) if device.type == "cpu" and onednn_pays() else None


def resolved_precision(precision: str, device: torch.device) -> str:
    """The arithmetic the engine trains in for `precision` ("auto": its choice on this device)."""
    try:
        from vitdemo.engine import resolve_precision
    except ImportError:  # an earlier engine (--code): bf16 autocast on a GPU only
        return precision if precision != "auto" else "bf16" if device.type == "cuda" else "fp32"
    return resolve_precision(precision, device)


def step_fn(model: torch.nn.Module, batch: int, device: torch.device, compile_mode: str | None, kernels=None,
            precision: str = "bf16"):
    """One training step as the engine takes it, on a fixed batch (its forward pass inside
    `kernels`, a context from `engine_kernels`, if given; under bf16 autocast if `precision` is bf16)."""
    model = model.to(device).train()
    opt = make_optimizer(model, RECIPES["small-vit"], fused=device.type == "cuda")
    net = torch.compile(model, mode=None if compile_mode == "default" else compile_mode) if compile_mode else model
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"), \
                kernels or contextlib.nullcontext():
            logits = net(x).float()
        loss = F.cross_entropy(logits, y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step


def time_steps(step, device: torch.device, steps: int, repeats: int) -> list[float]:
    for _ in range(3):  # warm-up (and compilation)
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        times.append((time.perf_counter() - start) / steps)
    return times


def print_ratios(rates: dict[str, float], baseline: str) -> None:
    for name, rate in rates.items():
        if baseline in rates and name != baseline:
            print(f"  {name} / {baseline}: {rate / rates[baseline]:.2f}x")


def section_step(args, device: torch.device) -> None:
    config = vitdemo.get_config(args.preset, num_classes=10)
    fns = {}
    precisions = [resolved_precision(p, device) for p in args.precision]
    for precision in precisions:
        tag = f" {precision}" if len(precisions) > 1 else ""
        for mode in [None, *args.compile]:
            torch.manual_seed(0)
            model = vitdemo.create_model(args.preset, num_classes=10)
            kernels = engine_kernels(model, device) if mode is None else None
            fns["vitdemo " + (mode or "eager") + tag] = step_fn(model, args.batch, device, mode, kernels, precision)
            if kernels is not None and precision == "fp32":
                torch.manual_seed(0)
                fns["vitdemo eager, PyTorch's linear"] = step_fn(vitdemo.create_model(args.preset, num_classes=10),
                                                                 args.batch, device, None, precision=precision)
            elif args.onednn and mode is None and device.type == "cpu" and precision == "fp32":
                from vitdemo.cpu_linear import LinearKernels  # where the engine keeps PyTorch's: try oneDNN's

                torch.manual_seed(0)
                model = vitdemo.create_model(args.preset, num_classes=10)
                fns["vitdemo eager, oneDNN's linear"] = step_fn(model, args.batch, device, None, LinearKernels(model),
                                                                precision)
        try:
            torch.manual_seed(0)
            fns["timm eager" + tag] = step_fn(timm_twin(config), args.batch, device, None, precision=precision)
        except ImportError:
            print("timm not installed: no peer")
    print(f"\nTraining step, {args.preset}, batch {args.batch}, {device}, precision {' and '.join(precisions)} "
          f"(bf16: autocast), median of {args.repeats} x {args.steps} steps")
    rates = {}
    for name, fn in fns.items():
        try:
            times = time_steps(fn, device, args.steps, args.repeats)
        except Exception as err:  # a compile mode this machine cannot run: say so, measure the rest
            print(f"  {name:<32} failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
            continue
        rates[name] = args.batch / statistics.median(times)
        print(f"  {name:<32} {statistics.median(times) * 1e3:8.2f} ms/step  {rates[name]:9.0f} img/s"
              f"  (min-max {min(times) * 1e3:.2f}-{max(times) * 1e3:.2f} ms)")
    for precision in precisions:
        tag = f" {precision}" if len(precisions) > 1 else ""
        print_ratios({k: v for k, v in rates.items() if k.endswith(tag)}, "timm eager" + tag)
    print_ratios({k: v for k, v in rates.items() if k in ("vitdemo eager", "vitdemo eager fp32",
                                                          "vitdemo eager, PyTorch's linear")},
                 "vitdemo eager, PyTorch's linear")
    print_ratios({k: v for k, v in rates.items() if k in ("vitdemo eager", "vitdemo eager fp32",
                                                          "vitdemo eager, oneDNN's linear")},
                 "vitdemo eager fp32" if "vitdemo eager fp32" in rates else "vitdemo eager")
    if len(precisions) > 1:
        print_ratios({k: v for k, v in rates.items() if k.startswith("vitdemo eager ")}, "vitdemo eager fp32")


def section_run(args, device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    data = ImageData(torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g),
                     torch.randint(0, 10, (args.images,), generator=g), [str(i) for i in range(10)])
    val = ImageData(data.images[:args.val_images], data.labels[:args.val_images], data.class_names)
    recipe = RECIPES[args.recipe].replace(epochs=3, batch_size=args.batch)
    prep = Preprocessing(32, CIFAR_MEAN, CIFAR_STD)
    print(f"\nWhole engine loop, {args.preset}, recipe {args.recipe} (batch {args.batch}), {args.images} images per "
          f"epoch + {args.val_images} validated, {device}: images/s of epoch 2")
    rates = {}
    for mode in [None, *args.compile]:
        torch.manual_seed(0)
        model = vitdemo.create_model(args.preset, num_classes=10)
        name = "fast path, compile " + mode if mode else "eager"
        try:
            fast = {"compile": mode} if mode else {}  # an earlier engine (--code) knows no such options
            if args.precision != ["auto"]:
                fast["precision"] = args.precision[0]
            with tempfile.TemporaryDirectory() as out:
                epochs = [e for e in train(model, data, val, recipe, preprocess=prep, device=device, out_dir=out,
                                           log_every=10**9, **fast) if isinstance(e, EpochEvent)]
        except Exception as err:
            print(f"  {name:<36} failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
            continue
        rates[name] = args.images / epochs[1].seconds
        print(f"  {name:<36} {rates[name]:9.0f} img/s  (epoch 1 incl. warm-up: {epochs[0].seconds:.1f} s, "
              f"epoch 2: {epochs[1].seconds:.1f} s)")
    print_ratios(rates, "eager")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", choices=["step", "run", []], help="sections to run (default: both)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: the best available)")
    parser.add_argument("--preset", default="vit_cifar_4", help="model preset (default vit_cifar_4)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 512 on a GPU, 128 on a CPU)")
    parser.add_argument("--compile", nargs="*", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile modes to measure (default: none on a CPU, default and "
                             "reduce-overhead on a GPU)")
    parser.add_argument("--precision", nargs="+", default=["auto"], choices=["auto", "fp32", "bf16"],
                        help="training arithmetic(s) to measure; 'step' measures each, 'run' the first "
                             "(default auto: the engine's choice on this device, vitdemo.engine.resolve_precision)")
    parser.add_argument("--onednn", action="store_true",
                        help="on a CPU where the engine keeps PyTorch's linear kernels (Intel's), also time "
                             "the fp32 eager step with oneDNN's (vitdemo.cpu_linear.LinearKernels)")
    parser.add_argument("--steps", type=int, default=None, help="steps per measurement (default 50 GPU, 3 CPU)")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per implementation (default 5)")
    parser.add_argument("--images", type=int, default=None, help="training images per epoch in 'run' "
                                                                 "(default 45000 on a GPU, 1024 on a CPU)")
    parser.add_argument("--val-images", type=int, default=None, help="validation images (default images/9)")
    parser.add_argument("--recipe", default="small-vit", choices=list(RECIPES), help="recipe of 'run' (default small-vit)")
    parser.add_argument("--code", help="directory holding the vitdemo package to measure (default: this checkout)")
    args = parser.parse_args()
    device = select_device(args.device)
    gpu = device.type == "cuda"
    args.batch = args.batch or (512 if gpu else 128)
    args.compile = args.compile if args.compile is not None else (["default", "reduce-overhead"] if gpu else [])
    args.steps = args.steps or (50 if gpu else 3)
    args.images = args.images or (45_000 if gpu else 1024)
    args.val_images = args.val_images or max(1, args.images // 9)
    print(f"vitdemo from {Path(vitdemo.__file__).parent.parent}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name(device) if gpu else 'CPU'}, "
          f"{torch.get_num_threads()} CPU threads")
    for section in args.sections or ["step", "run"]:
        {"step": section_step, "run": section_run}[section](args, device)


if __name__ == "__main__":
    main()
