"""The Attention tab: attention rollout (the paper's Fig. 6), gradient rollout, each head's
attention for a query, and the mean attention distance (the paper's Fig. 7, right)."""

from __future__ import annotations

import hashlib
from typing import Any

import gradio as gr
import torch
from PIL import Image, ImageDraw

from .. import visualize as vz
from . import models
from .common import VIEW_SIZE, clamp, if_image, to_rgb, user_errors
from .models import SHIPPED, Entry

QUERY_CLS = "class token"
QUERY_PATCH = "a patch (row, column)"


def _fingerprint(name: str, picked: Entry, x: torch.Tensor) -> str:
    return f"{name}|{id(picked.model)}|{hashlib.blake2b(x.numpy().tobytes(), digest_size=16).hexdigest()}"


def _forward(picked: Entry, x: torch.Tensor, key: str) -> dict[str, Any]:
    with torch.inference_mode():
        logits, attentions = picked.model(x, return_attention=True)
    probs = logits.float().softmax(-1)[0]
    return {"key": key, "x": x, "attentions": [a.float() for a in attentions],
            "pred": int(probs.argmax()), "prob": float(probs.max()), "gradient": {}}


def _head_tiles(maps: torch.Tensor, query_cell: tuple[int, int] | None,
                size: int = 128) -> list[tuple[Image.Image, str]]:
    tiles = []
    gh, gw = maps.shape[-2:]
    for h, m in enumerate(maps):
        tile = vz.heatmap(m, size=size)
        if query_cell is not None:
            r, c = query_cell
            cell = size / gw
            ImageDraw.Draw(tile).rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1],
                                           outline=(0, 255, 255), width=max(1, int(cell // 10)))
        tiles.append((tile, f"head {h + 1}"))
    return tiles


@user_errors
def explain(
    image: Any,
    model_name: str = SHIPPED,
    cache: dict[str, Any] | None = None,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    opacity: float = 0.6,
    gradient: bool = False,
    layer: int = 1,
    query: str = QUERY_CLS,
    query_row: int = 1,
    query_col: int = 1,
) -> tuple[Image.Image, list[tuple[Image.Image, str]], Image.Image, str, dict[str, Any]]:
    """Attention rollout overlay, one map per head for a layer and query, the mean attention
    distance plot, a caption, and the cache: the forward pass's attention maps, reused when
    called again with the same image and model (only display controls changed)."""
    rgb = to_rgb(image)
    picked = models.entry(model_name)
    x = models.model_input(rgb, picked.meta)
    key = _fingerprint(model_name, picked, x)
    if not isinstance(cache, dict) or cache.get("key") != key:  # a new image or model: one forward pass
        cache = _forward(picked, x, key)
    attentions = cache["attentions"]
    config = picked.model.config
    gh, gw = config.grid_size
    fusion = head_fusion if head_fusion in ("mean", "max", "min") else "mean"
    discard = min(max(float(discard_ratio or 0.0), 0.0), 0.95)
    alpha = min(max(float(opacity if opacity is not None else 0.6), 0.0), 1.0)
    class_name = picked.meta["class_names"][cache["pred"]]

    if gradient:
        done = cache["gradient"]  # discard ratio -> map
        if round(discard, 4) not in done:
            x = cache["x"].clone().requires_grad_(True)  # the weights stay gradient-free (shared model)
            done[round(discard, 4)] = vz.gradient_rollout(picked.model, x, discard_ratio=discard)[0]
        mask = done[round(discard, 4)]
        how = f"gradient rollout for the predicted class, discard ratio {discard:.2f}"
    else:
        mask = vz.attention_rollout(attentions, head_fusion=fusion, discard_ratio=discard, grid_size=(gh, gw))[0]
        how = f"attention rollout, {fusion} over heads, discard ratio {discard:.2f}"
    rollout = vz.overlay(rgb, mask, alpha=alpha, size=VIEW_SIZE, image_size=config.image_size[0],
                         **models.crop_of(picked.meta))

    layer_index = clamp(layer, 1, len(attentions)) - 1
    if query == QUERY_PATCH:
        r, c = clamp(query_row, 1, gh) - 1, clamp(query_col, 1, gw) - 1
        q, cell, who = 1 + r * gw + c, (r, c), f"patch (row {r + 1}, column {c + 1}, outlined)"
    else:
        q, cell, who = 0, None, "the class token"
    maps = vz.token_attention(attentions, layer_index, q, grid_size=(gh, gw))[0]
    gallery = _head_tiles(maps, cell)

    distances = vz.mean_attention_distance(attentions, config.patch_size, grid_size=(gh, gw))
    fig = vz.plot_mean_attention_distance(distances, image_size=config.image_size[0])
    fig.axes[0].set_title("")  # the component's label says it
    distance_plot = vz.figure_to_image(fig, dpi=90)

    caption = (f"Predicted **{class_name}** ({cache['prob']:.0%}). Left: {how}, over {len(attentions)} layers. "
               f"Gallery: what {who} attends to in layer {layer_index + 1}, one map per head "
               f"(each scaled to its own range).")
    return rollout, gallery, distance_plot, caption, cache


def create_ui() -> dict[str, Any]:
    with gr.Row():
        with gr.Column(scale=1):
            fusion = gr.Radio(["mean", "max", "min"], value="mean", label="Head fusion (rollout)")
            discard = gr.Slider(0.0, 0.95, value=0.0, step=0.05, label="Discard ratio (weakest attention zeroed)")
            opacity = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="Overlay opacity")
            gradient = gr.Checkbox(False, label="Gradient rollout for the predicted class")
            button = gr.Button("Explain", variant="primary")
        with gr.Column(scale=2):
            caption = gr.Markdown()
            with gr.Row():
                rollout = gr.Image(format="png", label="Rollout", interactive=False)
                distance = gr.Image(format="png", interactive=False,
                                    label="Mean attention distance per head, this image (Fig. 7, right)")
            with gr.Row():
                layer = gr.Slider(1, 7, value=7, step=1, label="Layer")
                query = gr.Radio([QUERY_CLS, QUERY_PATCH], value=QUERY_CLS, label="Query")
                q_row = gr.Slider(1, 8, value=1, step=1, label="Query row")
                q_col = gr.Slider(1, 8, value=1, step=1, label="Query column")
            heads = gr.Gallery(format="png", label="Attention of the query, one map per head", show_label=False,
                               columns=6, height=260, object_fit="contain", interactive=False)
    return {"fusion": fusion, "discard": discard, "opacity": opacity, "gradient": gradient, "button": button,
            "caption": caption, "rollout": rollout, "distance": distance, "layer": layer, "query": query,
            "q_row": q_row, "q_col": q_col, "heads": heads, "cache": gr.State(None, time_to_live=1800)}


def io(ui: dict[str, Any], image: gr.Image, picker: gr.Dropdown) -> tuple[list[Any], list[Any]]:
    """The inputs and outputs of `explain`."""
    inputs = [image, picker, ui["cache"], ui["fusion"], ui["discard"], ui["opacity"], ui["gradient"], ui["layer"],
              ui["query"], ui["q_row"], ui["q_col"]]
    outputs = [ui["rollout"], ui["heads"], ui["distance"], ui["caption"], ui["cache"]]
    return inputs, outputs


def wire(ui: dict[str, Any], image: gr.Image, picker: gr.Dropdown, view: dict[str, Any],
         hidden: dict[str, Any]) -> None:
    inputs, outputs = io(ui, image, picker)
    ui["button"].click(explain, inputs, outputs, api_name="explain", **view)
    on_change = if_image(explain, (None, [], None, "", None))
    for control in (ui["fusion"], ui["gradient"], ui["query"]):
        control.change(on_change, inputs, outputs, **view, **hidden)
    for control in (ui["discard"], ui["opacity"], ui["layer"], ui["q_row"], ui["q_col"]):
        control.release(on_change, inputs, outputs, **view, **hidden)
