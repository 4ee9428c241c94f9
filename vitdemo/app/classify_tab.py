"""The Classify tab: the model's answer for the app's image, with the runtime that computed it."""

from __future__ import annotations

import time
from typing import Any

import gradio as gr
import torch

from .. import ood
from . import models
from .common import HIDDEN, ModelUnavailable, to_rgb, user_errors
from .models import RUNTIME_CHOICES, RUNTIME_NAMES, SHIPPED

TOP_K = 10  # classes returned by `classify` (the label shows the top 5)


@user_errors
def classify(image: Any, model_name: str = SHIPPED, runtime: str = "auto") -> tuple[dict[str, float], dict[str, Any]]:
    """Class probabilities (the `TOP_K` most likely, all of them for up to 10 classes), and what
    the answer stands on: the time taken in milliseconds (preprocessing and forward pass) with the
    runtime that ran, the image's size, and the out-of-distribution verdict where the model
    carries the statistics for one (`vitdemo.ood`)."""
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
    info = {"ms": ms, "runtime": resolved, "size": list(rgb.size), "model": model_name or SHIPPED}
    if ood.has_stats(picked.meta):
        verdict = ood.check(picked.model, x, picked.meta)[0]
        info["ood"] = {"score": verdict.score, "threshold": verdict.threshold, "flagged": verdict.flagged,
                       "relative": verdict.relative, "rate": picked.meta["ood"].get("false_alarm_rate", 0.05)}
    return labels, info


def flagged_heading(info: dict[str, Any] | None, classes: int) -> str | None:
    """What the answer's heading says instead of a class when the image is flagged as unlike the
    training data: the model still ranks its classes, but the answer is probably none of them."""
    verdict = (info or {}).get("ood")
    if verdict and verdict["flagged"]:
        return f"⚠️ Probably none of its {classes} classes"
    return None


def answer(image: Any, model_name: str = SHIPPED, runtime: str = "auto") -> tuple[dict[str, Any], dict[str, Any]]:
    """`classify` as the page and the API show it: for an image flagged as unlike the training
    data the label's heading says "Probably none of its N classes" instead of naming the top class
    (the ranked classes stay under it), so the warning is part of the answer, not a footnote."""
    labels, info = classify(image, model_name, runtime)
    heading = flagged_heading(info, len(models.model_spec(model_name)[1]["class_names"]))
    return ({"heading": heading, "confidences": labels} if heading else labels), info


def answer_label(**kwargs: Any) -> gr.Label:
    """A `gr.Label` that also takes {"heading": text, "confidences": {class: p}} (from `answer`):
    the ranked classes with `text` as its heading. An instance attribute, not a subclass (Gradio
    writes a .pyi stub next to a module that subclasses a component)."""
    label = gr.Label(**kwargs)
    postprocess = label.postprocess

    def with_heading(value: Any) -> Any:
        if isinstance(value, dict) and "heading" in value:
            data = postprocess(value["confidences"])
            data.label = value["heading"]
            return data
        return postprocess(value)

    label.postprocess = with_heading
    return label


def times_threshold(relative: float) -> str:
    """The out-of-distribution score as a multiple of the threshold (above 1 is flagged), with as
    many decimals as it takes to stay on the same side of 1: a flagged 1.04 must not read "1.0x"."""
    def side(x: float) -> int:
        return (x > 1) - (x < 1)

    for digits in (1, 2, 3, 4):
        if side(float(f"{relative:.{digits}f}")) == side(relative):
            break
    return f"{relative:.{digits}f}x"


def answer_note(info: dict[str, Any] | None) -> str:
    """What the answer can and cannot mean: the model's classes and input size, a warning for an
    image unlike the training data or far smaller than the model's input, and the time taken."""
    if not info:
        return ""
    if "unavailable" in info:
        return f"Not available: {info['unavailable']}"
    try:
        config, meta = models.model_spec(info.get("model"))
    except ModelUnavailable:
        return ""
    names = list(meta["class_names"])
    side = config.image_size[0]
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    lines = [f"This model knows **{len(names)} classes** ({shown}) and reads **{side}x{side} pixels**: "
             f"every answer is one of these classes."]
    w, h = info.get("size", (side, side))
    if min(w, h) < side / 2:
        lines.append(f"⚠️ **Tiny image** ({w}x{h} pixels): the model reads {side}x{side}, so it was enlarged; "
                     f"the details it would need are not there. Treat the answer as a guess.")
    verdict = info.get("ood")
    times = times_threshold(verdict["relative"]) if verdict else ""
    if verdict and verdict["flagged"]:
        # A box of its own (CSS `.ood-warning`), in words a stakeholder understands, then the figures.
        lines.append(f'<div class="ood-warning"><strong>This picture does not look like anything this model was '
                     f'trained on.</strong> It can only answer with one of its {len(names)} classes, so the '
                     f'ranking below is probably meaningless. (Out-of-distribution score {times} the threshold '
                     f'that {1 - verdict["rate"]:.0%} of held-out training-like images stay under.)</div>')
    elif verdict:
        acc = (meta.get("metrics") or {}).get("val_acc")
        known = f", which it gets right {acc:.0%} of the time on held-out images" if isinstance(acc, float) else ""
        lines.append(f"Not flagged as unlike the training data (out-of-distribution score {times} "
                     f"the threshold). That does not make the answer right: it is still one of the {len(names)} "
                     f"classes{known}, even when the picture shows none of them.")
    if "ms" in info:
        lines.append(f"Inference: {info['ms']:.1f} ms with {RUNTIME_NAMES[info['runtime']]} (preprocessing and "
                     f"forward pass, {torch.get_num_threads()} CPU threads).")
    return "\n\n".join(lines)


def create_ui() -> dict[str, Any]:
    """The tab's components (inside a `gr.Tab`)."""
    # The answer first in the page's order, so that on a phone (columns stacked) it comes before the
    # settings; on a wide screen the settings column is drawn on the left (CSS `#classify-row`).
    with gr.Row(elem_id="classify-row"):
        with gr.Column(elem_id="classify-answer"):
            label = answer_label(num_top_classes=5, label="Top 5")
            timing = gr.Markdown(elem_classes="answer-note")
        with gr.Column():
            runtime = gr.Dropdown(RUNTIME_CHOICES, value="auto", label="Runtime",
                                  info="int8: faster on the CPU, the same class as fp32 for 99% of images. "
                                       "An ONNX export takes seconds on first use.")
            button = gr.Button("Classify", variant="primary")
    return {"runtime": runtime, "button": button, "label": label, "timing": timing, "ms": gr.State(None)}


def wire(ui: dict[str, Any], image: gr.Image, picker: gr.Dropdown) -> None:
    outputs = [ui["label"], ui["ms"]]
    inputs = [image, picker, ui["runtime"]]
    same_queue = {"concurrency_limit": 3, "concurrency_id": "classify"}
    ui["button"].click(answer, inputs, outputs, api_name="classify", **same_queue).success(
        answer_note, ui["ms"], ui["timing"], **HIDDEN)
