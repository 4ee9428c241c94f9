"""The Attention tab: which patches an explanation says the answer stands on (attention rollout,
the paper's Fig. 6; gradient rollout; relevance, Chefer et al. 2021) for any class, how faithful
each method measured, each head's attention for a query laid over the image, and the mean
attention distance (the paper's Fig. 7, right)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import gradio as gr
import torch

from .. import explanations as ex
from .. import faithfulness as FT
from .. import figures as FG
from .. import visualize as vz
from ..runtime import weights_digest
from . import models
from .common import ModelUnavailable, VIEW_SIZE, if_image, picture, to_rgb, user_error, user_errors
from .inputs import choice, keep_views, number_in, numeric_slider, one_of
from .models import SHIPPED, Entry

QUERY_CLS = "class token"
QUERY_PATCH = "a patch (row, column)"
ROLLOUT, GRADIENT, RELEVANCE = "rollout", "gradient rollout", "relevance"
METHODS = [("Attention rollout", ROLLOUT), ("Gradient rollout", GRADIENT),
           ("Relevance (Chefer et al. 2021)", RELEVANCE)]
PREDICTED = "predicted"  # the class picker's default: explain each image's predicted class
FUSIONS = ("mean", "max", "min")
MAX_DISCARD = 0.95
HEAD_TILE = 160  # pixels per head map
EMPTY = (None, None, None, "", None, "")  # the outputs of `explain` when the image is removed

READ_FAITHFULNESS = (
    "Patches are removed in the order each map ranks them: a faithful map makes accuracy fall fast when the most "
    "relevant go first (lower positive AUC) and keeps it when the least relevant go first (higher negative AUC); "
    "random order is the floor.")
READ_DISTANCE = (
    "Each dot is one head: the average distance in pixels between a patch and the patches it attends to, on this "
    "image (the paper's Fig. 7, right, averages 128 images); low dots look nearby, like a convolution, high dots "
    "across the whole image.")


def _fingerprint(name: str, picked: Entry, x: torch.Tensor) -> str:
    return f"{name}|{id(picked.model)}|{hashlib.blake2b(x.numpy().tobytes(), digest_size=16).hexdigest()}"


def _forward(picked: Entry, x: torch.Tensor, key: str) -> dict[str, Any]:
    with torch.inference_mode():
        logits, attentions = picked.model(x, return_attention=True)
    probs = logits.float().softmax(-1)[0]
    return {"key": key, "x": x, "attentions": [a.float() for a in attentions], "probs": probs.tolist(),
            "pred": int(probs.argmax()), "maps": {}}


def class_index(explain_class: Any, class_names: list[str], pred: int) -> int:
    """The class to explain: the predicted one (`PREDICTED`, empty or None) or one of the model's
    class names; anything else gets a message naming the classes."""
    if explain_class in (None, "", PREDICTED):
        return pred
    if explain_class in class_names:
        return class_names.index(explain_class)
    some = ", ".join(class_names[:8]) + (f", ... ({len(class_names)} in all)" if len(class_names) > 8 else "")
    raise user_error(f"The model picked has no class {explain_class!r}: choose {PREDICTED!r} or one of its classes "
                     f"({some}).")


def _explanation(picked: Entry, cache: dict[str, Any], method: str, fusion: str, discard: float,
                 target: int) -> torch.Tensor:
    """The (grid_h, grid_w) map of `method`, computed once per (method, fusion, class, discard)."""
    grid = picked.model.config.grid_size
    key = (method, fusion if method == ROLLOUT else None, None if method == ROLLOUT else target,
           None if method == RELEVANCE else round(discard, 4))
    if key not in cache["maps"]:
        if method == ROLLOUT:
            cache["maps"][key] = ex.attention_rollout(cache["attentions"], head_fusion=fusion, discard_ratio=discard,
                                                      grid_size=grid)[0]
        elif method == GRADIENT:  # the weights stay gradient-free: the graph is built through the input
            cache["maps"][key] = ex.gradient_rollout(picked.model, cache["x"], class_index=target,
                                                     discard_ratio=discard)[0]
        else:
            cache["maps"][key] = ex.relevance(picked.model, cache["x"], class_index=target)[0]
    return cache["maps"][key]


def _head_maps(rgb: Any, maps: torch.Tensor, picked: Entry, alpha: float, query_cell: tuple[int, int] | None) -> Any:
    """One map per head laid over the model's view of the image, each scaled to its own range,
    labelled above (not over) the picture, with one colour bar."""
    config = picked.model.config
    view = FG.model_view(rgb, config.image_size[0], **models.crop_of(picked.meta))
    view = view.resize((HEAD_TILE, HEAD_TILE * view.size[1] // view.size[0]))
    tiles = []
    for m in maps:
        tile = vz.overlay(view, ex.min_max(m), alpha=alpha)
        tiles.append(FG.outline_cell(tile, query_cell, config.grid_size) if query_cell else tile)
    heads = len(tiles)
    columns = heads if heads <= 4 else 3 if heads <= 6 else 4 if heads <= 12 else 6
    grid = FG.tile_grid(tiles, [f"head {h + 1}" for h in range(heads)], columns)
    return FG.with_colorbar(grid, ticks=[0, 1], tick_labels=["low", "high"], label="attention, each head scaled")


def _how_to_read(method: str, fusion: str, discard: float, layers: int, cls: str, explained: bool) -> str:
    """One sentence on what the map shows and how to read it."""
    if method == ROLLOUT:
        note = ("the class picker does not change it: plain rollout does not depend on the class" if explained
                else "it does not depend on the class: every class gets this map")
        return (f"**Attention rollout** ({fusion} over heads, discard ratio {discard:.2f}; Abnar and Zuidema 2020, the "
                f"paper's Fig. 6) follows the attention over {layers} layers, residual path included: bright "
                f"patches are those the class token draws on most; {note}.")
    if method == GRADIENT:
        return (f"**Gradient rollout for {cls}** (discard ratio {discard:.2f}) is rollout over {layers} layers with "
                f"each layer's attention weighted by the positive part of its gradient for the score of {cls}: "
                f"bright patches are those that push the answer towards {cls}.")
    return (f"**Relevance for {cls}** (Chefer, Gur and Wolf 2021) weights each layer's attention by its gradient for "
            f"the score of {cls}, keeps the positive part and accumulates it over {layers} layers: bright patches "
            f"are those the score of {cls} depends on most; pick another class to see what argues for it.")


@user_errors
def explain(
    image: Any,
    model_name: str = SHIPPED,
    cache: dict[str, Any] | None = None,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    opacity: float = 0.6,
    method: str = ROLLOUT,
    layer: int = 1,
    query: str = QUERY_CLS,
    query_row: int = 1,
    query_col: int = 1,
    explain_class: str = PREDICTED,
) -> tuple[Any, Any, Any, str, dict[str, Any], str]:
    """The explanation map over the image (with its colour bar), one map per head for a layer and
    query, the mean attention distance plot, the map's caption, the cache, and the heads' caption.

    The cache holds the forward pass's attention maps and every map computed, per (method, head
    fusion, class, discard ratio): calling again with the same image and model (only display
    controls changed) runs no new forward pass, and going back to a map recomputes nothing.
    `explain_class` is a class name, or `PREDICTED`; it matters for gradient rollout and relevance."""
    rgb = to_rgb(image)
    picked = models.entry(model_name)
    config = picked.model.config
    gh, gw = config.grid_size
    depth = config.depth
    method = one_of(method or ROLLOUT, [value for _, value in METHODS], "The explanation method")
    fusion = one_of(head_fusion or "mean", FUSIONS, "Head fusion")
    discard = number_in(discard_ratio, 0.0, MAX_DISCARD, "The discard ratio")
    alpha = number_in(opacity, 0.0, 1.0, "The overlay opacity")
    layer_index = number_in(layer, 1, depth, "Layer", whole=True, why=f"this model has {depth} layers") - 1
    query = one_of(query or QUERY_CLS, [QUERY_CLS, QUERY_PATCH], "The query")
    if query == QUERY_PATCH:
        r = number_in(query_row, 1, gh, "Query row", whole=True, why=f"this model's grid has {gh} rows") - 1
        c = number_in(query_col, 1, gw, "Query column", whole=True, why=f"this model's grid has {gw} columns") - 1

    x = models.model_input(rgb, picked.meta)
    key = _fingerprint(model_name, picked, x)
    if not isinstance(cache, dict) or cache.get("key") != key or "maps" not in cache:  # a new image or model
        cache = _forward(picked, x, key)
    names = picked.meta["class_names"]
    target = class_index(explain_class, names, cache["pred"])
    mask = _explanation(picked, cache, method, fusion, discard, target)
    overlay = vz.overlay(rgb, mask, alpha=alpha, size=VIEW_SIZE, image_size=config.image_size[0],
                         **models.crop_of(picked.meta))
    what = "relevance" if method == RELEVANCE else "attention flow"
    picture = FG.with_colorbar(overlay, ticks=[0, 0.5, 1], label=f"{what}, scaled to this image")

    probs = cache["probs"]
    head = f"Predicted **{names[cache['pred']]}** ({probs[cache['pred']]:.0%})."
    if method != ROLLOUT:
        head += f" Explaining **{names[target]}** ({probs[target]:.0%})."
    explained = explain_class not in (None, "", PREDICTED) and target != cache["pred"]
    caption = f"{head} {_how_to_read(method, fusion, discard, depth, names[target], explained)}"

    if query == QUERY_PATCH:
        q, cell, who = 1 + r * gw + c, (r, c), f"the patch at row {r + 1}, column {c + 1} (outlined)"
    else:
        q, cell, who = 0, None, "the class token"
    maps = ex.token_attention(cache["attentions"], layer_index, q, grid_size=(gh, gw))[0]
    heads = _head_maps(rgb, maps, picked, alpha, cell)
    heads_caption = (f"What {who} attends to in layer {layer_index + 1} of {depth}, one map per head over the image "
                     f"the model saw: bright is where that head looks most (each map scaled to its own range: compare "
                     f"where heads look, not how strongly).")

    distances = ex.mean_attention_distance(cache["attentions"], config.patch_size, grid_size=(gh, gw))
    fig = vz.plot_mean_attention_distance(distances, image_size=config.image_size[0])
    fig.axes[0].set_title("Mean attention distance per head, this image", fontsize=10)
    distance_plot = vz.figure_to_image(fig, dpi=90)
    return picture, heads, distance_plot, caption, cache, heads_caption


# ---------------------------------------------------------------------------------------------
# What changes with the model: the class picker's choices and the measured faithfulness
# ---------------------------------------------------------------------------------------------


def _checkpoint_dir(name: str | None) -> tuple[Path | None, Entry | None]:
    name = name or SHIPPED
    try:
        picked = models.entry(name) if name == SHIPPED else models.MODELS.cached(name)
    except ModelUnavailable:
        return None, None
    if picked is None or picked.checkpoint is None:
        return None, None
    return Path(picked.checkpoint).parent, picked


def faithfulness(name: str | None) -> tuple[list[list] | None, str]:
    """The measured faithfulness table (`faithfulness.summary_rows`) and its note, for a model
    whose checkpoint folder holds `faithfulness.json` measured on these very weights; (None, "")
    for any other."""
    folder, picked = _checkpoint_dir(name)
    results = FT.read_results(folder) if folder is not None else None
    if results is None:
        return None, ""
    if "weights_digest" not in picked.views:
        picked.views["weights_digest"] = weights_digest(picked.model)
    if results.get("weights_sha256") != picked.views["weights_digest"]:
        return None, ""  # measured on other weights: not this model's evidence
    try:
        rows = FT.summary_rows(results)
    except (KeyError, TypeError):
        return None, ""
    intact = results.get("accuracy_intact")
    measured = (f"Measured for this model on {results.get('images', '?'):,} held-out images"
                f"{f' (intact accuracy {intact:.1%})' if isinstance(intact, float) else ''} with "
                f"`{results.get('command', 'python benchmarks/faithfulness.py')}`.")
    return rows, f"**How faithful is each map?** {READ_FAITHFULNESS} {measured}"


def class_choices(name: str | None) -> list[tuple[str, str]]:
    """The class picker's choices for a model: the predicted class first, then its classes."""
    try:
        _, meta = models.model_spec(name)
        names = list(meta["class_names"])
    except ModelUnavailable:
        names = []
    return [("the predicted class", PREDICTED), *((n, n) for n in names)]


def model_views(name: str | None) -> tuple[Any, Any, Any]:
    """What `select_model` updates in this tab: the class picker (back to the predicted class),
    the faithfulness table and its note (hidden for a model without measured results)."""
    rows, note = faithfulness(name)
    shown = rows is not None
    return (gr.update(choices=class_choices(name), value=PREDICTED),
            gr.update(value=rows if shown else None, visible=shown), gr.update(value=note, visible=shown))


# ---------------------------------------------------------------------------------------------
# Layout and wiring
# ---------------------------------------------------------------------------------------------


def create_ui() -> dict[str, Any]:
    with gr.Row():
        with gr.Column(scale=2, min_width=300):
            method = choice(gr.Radio(METHODS, value=ROLLOUT, label="Explanation method"), "The explanation method")
            target = gr.Dropdown(class_choices(SHIPPED), value=PREDICTED, label="Explain which class?",
                                 allow_custom_value=True, filterable=True,
                                 info="Used by gradient rollout and relevance. Plain attention rollout does not "
                                      "depend on the class.")
            button = gr.Button("Explain", variant="primary")
        with gr.Column(scale=5, min_width=300):
            # Filled by `model_views` when the page loads and when the model changes.
            faith_note = gr.Markdown(visible=False)
            faith_table = gr.Dataframe(headers=list(FT.SUMMARY_HEADERS), visible=False, interactive=False, wrap=True,
                                       show_label=False, buttons=[], max_height=640, pinned_columns=1,
                                       column_widths=["170px", "90px"] + ["100px"] * 4)
    with gr.Row():
        with gr.Column(scale=2, min_width=300):
            fusion = choice(gr.Radio(list(FUSIONS), value="mean", label="Head fusion (attention rollout)"),
                            "Head fusion")
            discard = numeric_slider(0.0, MAX_DISCARD, value=0.0, step=0.05,
                                        label="Discard ratio (rollouts: weakest attention zeroed)")
            opacity = numeric_slider(0.0, 1.0, value=0.6, step=0.05, label="Overlay opacity")
            gr.Markdown("**Each head's attention** (the maps below)")
            layer = numeric_slider(1, 7, value=7, step=1, label="Layer")
            query = choice(gr.Radio([QUERY_CLS, QUERY_PATCH], value=QUERY_CLS, label="Query"), "The query")
            with gr.Row():
                q_row = numeric_slider(1, 8, value=1, step=1, label="Query row", min_width=140)
                q_col = numeric_slider(1, 8, value=1, step=1, label="Query column", min_width=140)
        with gr.Column(scale=5, min_width=300):
            with gr.Row():
                with gr.Column(min_width=300):
                    explanation = picture(label="Rollout or relevance map over the image",
                                           alt_text="The explanation map over the image, with its colour bar")
                    caption = gr.Markdown()
                with gr.Column(min_width=300):
                    distance = picture(label="Mean attention distance per head (Fig. 7, right)",
                                        alt_text="Mean attention distance of every head against layer")
                    gr.Markdown(READ_DISTANCE)
            heads = picture(label="Each head's attention over the image",
                             alt_text="One attention map per head, over the image")
            heads_caption = gr.Markdown()
    return {"method": method, "target": target, "fusion": fusion, "discard": discard, "opacity": opacity,
            "button": button, "faith_note": faith_note, "faith_table": faith_table, "caption": caption,
            "explanation": explanation, "distance": distance, "layer": layer, "query": query, "q_row": q_row,
            "q_col": q_col, "heads": heads, "heads_caption": heads_caption,
            "cache": gr.State(None, time_to_live=1800)}


def io(ui: dict[str, Any], image: gr.Image, picker: gr.Dropdown) -> tuple[list[Any], list[Any]]:
    """The inputs and outputs of `explain`."""
    inputs = [image, picker, ui["cache"], ui["fusion"], ui["discard"], ui["opacity"], ui["method"], ui["layer"],
              ui["query"], ui["q_row"], ui["q_col"], ui["target"]]
    outputs = [ui["explanation"], ui["heads"], ui["distance"], ui["caption"], ui["cache"], ui["heads_caption"]]
    return inputs, outputs


def model_outputs(ui: dict[str, Any]) -> list[Any]:
    """The outputs of `model_views`."""
    return [ui["target"], ui["faith_table"], ui["faith_note"]]


def wire(ui: dict[str, Any], image: gr.Image, picker: gr.Dropdown, view: dict[str, Any],
         hidden: dict[str, Any]) -> None:
    inputs, outputs = io(ui, image, picker)
    ui["button"].click(explain, inputs, outputs, api_name="explain", **view)
    on_change = keep_views(if_image(explain, EMPTY), len(outputs))
    for control in (ui["method"], ui["fusion"], ui["query"], ui["target"]):
        control.input(on_change, inputs, outputs, **view, **hidden)
    for control in (ui["discard"], ui["opacity"], ui["layer"], ui["q_row"], ui["q_col"]):
        control.release(on_change, inputs, outputs, **view, **hidden)
