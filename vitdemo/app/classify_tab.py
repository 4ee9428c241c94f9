"""The Classify tab: the model's answer for the app's image, with the runtime that computed it."""

from __future__ import annotations

import time
from typing import Any

import gradio as gr
import torch

from . import models
from .common import HIDDEN, to_rgb, user_errors
from .models import RUNTIME_CHOICES, RUNTIME_NAMES, SHIPPED

TOP_K = 10  # classes returned by `classify` (the label shows the top 5)


@user_errors
def classify(image: Any, model_name: str = SHIPPED, runtime: str = "auto") -> tuple[dict[str, float], dict[str, Any]]:
    """Class probabilities (the `TOP_K` most likely, all of them for up to 10 classes), and the
    time taken in milliseconds (preprocessing and forward pass) with the runtime that ran."""
    rgb = to_rgb(image)
    picked = models.entry(model_name)
    run, resolved = models.model_runner(picked, runtime)
    start = time.perf_counter()
    x = models.model_input(rgb, picked.meta)
    with torch.inference_mode():
        probs = run(x).float().softmax(-1)[0]
    ms = (time.perf_counter() - start) * 1000
    top = probs.topk(min(TOP_K, probs.numel()))
    names = picked.meta["class_names"]
    labels = {names[i]: float(p) for p, i in zip(top.values.tolist(), top.indices.tolist())}
    return labels, {"ms": ms, "runtime": resolved}


def timing_text(timing: dict[str, Any] | None) -> str:
    if not timing:
        return ""
    return (f"Inference: **{timing['ms']:.1f} ms** with {RUNTIME_NAMES[timing['runtime']]} (preprocessing and "
            f"forward pass, {torch.get_num_threads()} CPU threads).")


def create_ui() -> dict[str, Any]:
    """The tab's components (inside a `gr.Tab`)."""
    with gr.Row():
        with gr.Column():
            runtime = gr.Dropdown(RUNTIME_CHOICES, value="auto", label="Runtime",
                                  info="int8: faster on the CPU, the same class as fp32 for 99% of images. "
                                       "An ONNX export takes seconds on first use.")
            button = gr.Button("Classify", variant="primary")
        with gr.Column():
            label = gr.Label(num_top_classes=5, label="Top 5")
            timing = gr.Markdown()
    return {"runtime": runtime, "button": button, "label": label, "timing": timing, "ms": gr.State(None)}


def wire(ui: dict[str, Any], image: gr.Image, picker: gr.Dropdown) -> None:
    outputs = [ui["label"], ui["ms"]]
    inputs = [image, picker, ui["runtime"]]
    same_queue = {"concurrency_limit": 3, "concurrency_id": "classify"}
    ui["button"].click(classify, inputs, outputs, api_name="classify", **same_queue).success(
        timing_text, ui["ms"], ui["timing"], **HIDDEN)
