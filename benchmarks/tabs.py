"""What a new image costs in each tab, for the shipped model and for ViT-B/16, on this machine.

    python benchmarks/tabs.py                  # both models, 5 repeats
    python benchmarks/tabs.py --repeats 3 --models vit_b_16

Each tab's handler for a new image (the work the server does when the image or the model
changes), called in a worker thread as Gradio calls handlers (its anyio thread pool), not in the
main thread, which PyTorch's OpenMP threads favour. ViT-B/16's weights are random: the same
computation as the pre-trained model's, without a download; the Compare button refuses models of
its size (it would train it twice), so it is not timed. Median and range of `--repeats` calls,
after one warm-up call (the first use of a model prepares its runtimes and figures).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from inside_tab import random_vit_b16  # noqa: E402
from serving import cpu_flags  # noqa: E402
from vitdemo.app import attention_tab, classify_tab, common, examples, inside_tab, models, patches_tab, position_tab  # noqa: E402
from vitdemo.app.models import PRETRAINED, SHIPPED  # noqa: E402


def handlers(name: str, image: Image.Image) -> dict[str, object]:
    def inside() -> None:
        models.entry(name).views.pop("traces", None)  # a new image: nothing traced yet
        inside_tab.inside(image, name)

    return {
        "Classify (runtime auto)": lambda: classify_tab.answer(image, name, "auto"),
        "Patches": lambda: patches_tab.patches(image, name),
        "Inside the model": inside,
        "Position embeddings": lambda: position_tab.position_views(name),
        "Attention (explain)": lambda: attention_tab.explain(image, name, None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", choices=["shipped", "vit_b_16"], default=["shipped", "vit_b_16"])
    args = parser.parse_args()
    print(f"CPU: {cpu_flags()}; {torch.get_num_threads()} torch threads; torch {torch.__version__}")
    image = Image.open(examples.draw_examples(common.APP_DIR / "examples")[0])
    with ThreadPoolExecutor(max_workers=1) as worker:
        for which in args.models:
            if which == "vit_b_16":
                random_vit_b16()
            name = SHIPPED if which == "shipped" else PRETRAINED
            print(f"\n{which}: a new image, median (min-max) of {args.repeats}")
            for label, fn in handlers(name, image).items():
                def timed(fn=fn) -> float:
                    start = time.perf_counter()
                    fn()
                    return time.perf_counter() - start

                worker.submit(timed).result()  # warm-up
                seconds = [worker.submit(timed).result() for _ in range(args.repeats)]
                print(f"  {label:28s} {statistics.median(seconds) * 1000:8.0f} ms "
                      f"({min(seconds) * 1000:.0f}-{max(seconds) * 1000:.0f})")


if __name__ == "__main__":
    main()
