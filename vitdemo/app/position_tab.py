"""The Position embeddings tab: the paper's Fig. 7 (centre) for the picked model, and one
position's similarity map, large."""

from __future__ import annotations

from typing import Any

import gradio as gr
import torch
from PIL import Image, ImageDraw

from .. import visualize as vz
from . import models
from .common import VIEW_SIZE, clamp, user_errors
from .models import SHIPPED, Entry


def _similarity(picked: Entry) -> torch.Tensor:
    if "similarity" not in picked.views:
        picked.views["similarity"] = vz.position_embedding_similarity(picked.model)
    return picked.views["similarity"]


@user_errors
def position_figure(model_name: str = SHIPPED) -> Image.Image:
    """Fig. 7 (centre) for the model: every position's cosine similarity to every other."""
    picked = models.entry(model_name)
    if "position_figure" not in picked.views:
        fig = vz.plot_position_embedding_similarity(_similarity(picked))
        picked.views["position_figure"] = vz.figure_to_image(fig, dpi=90)
    return picked.views["position_figure"]


@user_errors
def position_detail(model_name: str = SHIPPED, row: int = 1, col: int = 1) -> tuple[Image.Image, str]:
    """One position's similarity map, large, with the position outlined (row and col 1-based)."""
    picked = models.entry(model_name)
    sim = _similarity(picked)
    gh, gw = sim.shape[:2]
    r, c = clamp(row, 1, gh) - 1, clamp(col, 1, gw) - 1
    tile = vz.heatmap(sim[r, c], size=VIEW_SIZE)
    cell = VIEW_SIZE / gw
    ImageDraw.Draw(tile).rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], outline=(0, 255, 255),
                                   width=max(1, int(cell // 12)))
    others = torch.cat([sim[r, c].flatten()[: r * gw + c], sim[r, c].flatten()[r * gw + c + 1:]])
    text = (f"Position (row {r + 1}, column {c + 1}) of {gh}x{gw}: cosine similarity of its embedding with every "
            f"position's (outlined: itself, 1.0). Highest elsewhere: {float(others.max()):.2f}, lowest: "
            f"{float(others.min()):.2f}. Nearby rows and columns look alike when the model has learned the 2-D layout.")
    return tile, text


def position_views(model_name: str = SHIPPED, row: int = 1, col: int = 1) -> tuple[Any, Any, str]:
    """Both position views, or none and a note when the model is not available (no error
    popup: this runs when the page loads and when the picker changes)."""
    try:
        fig = position_figure(model_name)
        tile, text = position_detail(model_name, row, col)
        return fig, tile, text
    except gr.Error as err:
        return None, None, f"Not available: {err.message}"


def create_ui() -> dict[str, Any]:
    gr.Markdown("Each patch position has a learned embedding. The paper's Fig. 7 (centre): tile (r, c) "
                "shows the cosine similarity of position (r, c)'s embedding with every position's.")
    with gr.Row():
        figure = gr.Image(format="png", label="Position embedding similarity (Fig. 7, centre)",
                          interactive=False, scale=3)
        with gr.Column(scale=2):
            row = gr.Slider(1, 8, value=4, step=1, label="Row")
            col = gr.Slider(1, 8, value=4, step=1, label="Column")
            detail = gr.Image(format="png", label="One position, large", interactive=False)
            note = gr.Markdown()
    return {"figure": figure, "row": row, "col": col, "detail": detail, "note": note}


def outputs(ui: dict[str, Any]) -> list[Any]:
    return [ui["figure"], ui["detail"], ui["note"]]


def wire(ui: dict[str, Any], picker: gr.Dropdown, hidden: dict[str, Any]) -> None:
    inputs = [picker, ui["row"], ui["col"]]
    for slider in (ui["row"], ui["col"]):
        slider.release(position_detail, inputs, [ui["detail"], ui["note"]], **hidden)
