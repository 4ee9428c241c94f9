"""How long the Inside the model tab makes a user wait, handler by handler, on this machine.

    python benchmarks/inside_tab.py                 # the shipped model, and ViT-B/16 (random weights)
    python benchmarks/inside_tab.py --repeats 20 --models shipped

For each model, with one image: a new image (`inside`: the forward pass with every block's
internals traced, then every picture), a patch picked (`embedding_step` then `block_step`, as the
page chains them), a layer, head or token changed (`block_step`), and the answer (`output_step`);
beside them, in the same run, a plain forward pass and the Attention tab's `explain` for the same
image (its slowest neighbour). ViT-B/16's weights are random: the same computation as the
pre-trained model's, without a download. Goal: a step change under 0.5 s for the shipped model on
two CPU cores. Server time only: a browser adds the transfer of the pictures (tens of kB).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import vitdemo  # noqa: E402
from vitdemo.app import attention_tab, common, examples, inside_tab, models  # noqa: E402
from vitdemo.app.models import PRETRAINED, SHIPPED, Entry  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import cpu_flags  # noqa: E402


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up: first-use costs (Fig. 7's SVD, the runtimes) are not what a slider pays
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def random_vit_b16() -> None:
    """ViT-B/16 with random weights in the store under the pre-trained model's name."""
    config, meta = models.model_spec(PRETRAINED)
    model = vitdemo.VisionTransformer(config).eval().requires_grad_(False)
    models.MODELS._entries[PRETRAINED] = Entry(model, dict(meta))


def measure(name: str, image: Image.Image, repeats: int) -> dict[str, list[float]]:
    picked = models.entry(name)
    x = models.model_input(common.to_rgb(image), picked.meta)
    gh, gw = picked.model.config.grid_size
    depth = picked.model.config.depth
    state = {"layer": 0, "row": 0}

    def new_image() -> None:
        picked.views.pop("traces", None)  # as a new upload: nothing traced yet
        inside_tab.inside(image, name, gh // 2 + 1, gw // 2 + 1, inside_tab.FOLLOW_PATCH, 1, 1, "eager")

    def patch() -> None:
        state["row"] = state["row"] % gh + 1
        inside_tab.embedding_step(image, name, state["row"], 2)
        inside_tab.block_step(image, name, state["row"], 2, inside_tab.FOLLOW_PATCH, 1, 1)

    def layer() -> None:
        state["layer"] = state["layer"] % depth + 1
        inside_tab.block_step(image, name, 2, 2, inside_tab.FOLLOW_PATCH, state["layer"], 1)

    def forward() -> None:
        with torch.inference_mode():
            picked.model(x)

    def explain() -> None:
        attention_tab.explain(image, name, None, layer=depth)

    fns = {"plain forward pass": forward, "Attention tab, new image (explain)": explain,
           "new image (inside)": new_image, "patch picked (embedding + block)": patch,
           "layer, head or token changed (block)": layer,
           "answer (output_step)": lambda: inside_tab.output_step(image, name, "eager")}
    return {label: timed(fn, repeats) for label, fn in fns.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", nargs="+", choices=["shipped", "vit_b_16"], default=["shipped", "vit_b_16"])
    args = parser.parse_args()
    image = Image.open(examples.draw_examples(common.APP_DIR / "examples")[0])
    print(f"CPU: {cpu_flags()}; {torch.get_num_threads()} torch threads; torch {torch.__version__}")
    for which in args.models:
        if which == "vit_b_16":
            random_vit_b16()
        name = SHIPPED if which == "shipped" else PRETRAINED
        results = measure(name, image, args.repeats)
        forward = statistics.median(results["plain forward pass"])
        print(f"\n{which}: median (min-max) of {args.repeats}, and the ratio to a plain forward pass")
        for label, seconds in results.items():
            med = statistics.median(seconds)
            print(f"  {label:40s} {med * 1000:8.1f} ms ({min(seconds) * 1000:.1f}-{max(seconds) * 1000:.1f})"
                  f"  {med / forward:6.1f}x")
        step = max(statistics.median(results[k]) for k in ("patch picked (embedding + block)",
                                                            "layer, head or token changed (block)"))
        print(f"  slowest step change: {step * 1000:.0f} ms (goal for the shipped model: under 500 ms)")


if __name__ == "__main__":
    main()
