"""The Train tab's runs, measured as a user meets them: validation accuracy against the seconds
since the Start button (data included), on this machine.

    python benchmarks/train_tab.py                 # default run, CIFAR-10 default (if local), comparison
    python benchmarks/train_tab.py default compare

Sections:
- default: every input of the tab at its default (the built-in shapes). Goal: >= 90% validation
  accuracy within 45 s, on the slower (AVX2-only) kind of 2-core machine too.
- cifar: the tab's CIFAR-10 defaults, from a local image folder ($VITDEMO_CIFAR10 or
  ~/.cache/vitdemo/cifar10/train); skipped without one. Goal: >= 50% within 3 minutes.
- compare: "from scratch vs fine-tuned" on the default data, with the shipped model: both
  validation curves.

The handlers are the app's own (`vitdemo.app.train_tab`), called as the server calls them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from vitdemo.app import train_tab, training  # noqa: E402


def curve(outputs, t0: float) -> tuple[dict[str, list[tuple[float, int, float]]], str]:
    """Drain a Train-tab generator: per validation series, (seconds, step, accuracy %) points,
    each timed when the browser would have received it; and the final status."""
    seen: dict[str, int] = {}
    points: dict[str, list[tuple[float, int, float]]] = {}
    status = ""
    for _, acc, status, *_ in outputs:
        now = time.perf_counter() - t0
        if acc is None:  # no curve yet
            continue
        for series in sorted(set(acc["series"])):
            if not series.endswith("validation"):
                continue
            rows = acc[acc["series"] == series]
            for step, value in list(zip(rows["step"], rows["value"]))[seen.get(series, 0):]:
                points.setdefault(series, []).append((now, int(step), float(value)))
            seen[series] = len(rows)
    return points, status


def report(title: str, points: dict[str, list[tuple[float, int, float]]], status: str, goal: tuple[float, float] | None):
    print(f"\n## {title}")
    for series, rows in points.items():
        print(f"{series}:")
        print("  seconds  step  validation accuracy")
        for seconds, step, value in rows:
            print(f"  {seconds:7.1f}  {step:4d}  {value:5.1f}%")
        if goal is not None:
            target, limit = goal
            hit = next((s for s, _, v in rows if v >= target), None)
            verdict = (f"reached {target:.0f}% after {hit:.1f} s (goal: within {limit:.0f} s)" if hit is not None
                       else f"never reached {target:.0f}% (final {rows[-1][2]:.1f}%)")
            print(f"  -> {verdict}; final {rows[-1][2]:.1f}% after {rows[-1][0]:.1f} s")
    print(f"status: {status}")


def run_default() -> None:
    d = train_tab.DEFAULTS[training.SRC_SYNTHETIC]
    model = training.new_model(training.SHAPE_CLASSES, d["patch"], d["depth"], d["width"])
    print(f"\nthe default model: patch {d['patch']}, {d['depth']} layers of width {d['width']}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")
    t0 = time.perf_counter()
    points, status = curve(train_tab.train_run(), t0)
    report("Default run (every input at its default: built-in shapes)", points, status, (90.0, 45.0))


def run_cifar() -> None:
    if not any(folder.is_dir() for folder in training.cifar_folders()):
        print("\n## CIFAR-10 defaults: skipped (no local CIFAR-10 folder; set VITDEMO_CIFAR10)")
        return
    d = train_tab.DEFAULTS[training.SRC_CIFAR]
    t0 = time.perf_counter()
    points, status = curve(train_tab.train_run(training.SRC_CIFAR, None, d["per_class"], d["patch"], d["depth"],
                                               d["width"], d["epochs"], d["lr"], d["batch"]), t0)
    report("CIFAR-10 with the tab's CIFAR-10 defaults (local folder)", points, status, (50.0, 180.0))


def run_compare() -> None:
    t0 = time.perf_counter()
    points, status = curve(train_tab.compare_run(), t0)
    report("Compare: from scratch vs fine-tuned from the shipped CIFAR-10 model (shapes, 100 per class)",
           points, status, None)


def main() -> None:
    sections = {"default": run_default, "cifar": run_cifar, "compare": run_compare}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", metavar="SECTION", help=f"any of {', '.join(sections)} (default: all)")
    args = parser.parse_args()
    if unknown := [name for name in args.sections if name not in sections]:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(sections)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    for name in args.sections or list(sections):
        sections[name]()


if __name__ == "__main__":
    main()
