"""The Position embeddings tab: the paper's Fig. 7 (centre) for the picked model, with one
position highlighted, and that position's similarity map, large."""

from __future__ import annotations

from typing import Any

import gradio as gr
import torch
from PIL import Image

from .. import explanations as ex
from .. import figures as FG
from .. import visualize as vz
from . import models
from .common import VIEW_SIZE, picture, user_errors
from .inputs import keep_views, number_in, numeric_slider
from .models import SHIPPED, Entry

OUTLINE = (255, 0, 0)  # red, as the highlight in the Fig. 7 mosaic: visible on every viridis colour
READ_FIGURE = ("Tile (r, c) shows how similar position (r, c)'s learned embedding is to every position's (yellow = "
               "alike; the chosen position is outlined in red): a bright spot around each tile's own place means the "
               "model learned the image's 2-D layout from 1-D position numbers.")


def _similarity(picked: Entry) -> torch.Tensor:
    if "similarity" not in picked.views:
        picked.views["similarity"] = ex.position_embedding_similarity(picked.model)
    return picked.views["similarity"]


def _position(picked: Entry, row: Any, col: Any) -> tuple[int, int]:
    """(row, col), 1-based from the page, checked against the model's grid, as 0-based."""
    gh, gw = picked.model.config.grid_size
    r = number_in(row, 1, gh, "Row", whole=True, why=f"this model's grid has {gh} rows")
    c = number_in(col, 1, gw, "Column", whole=True, why=f"this model's grid has {gw} columns")
    return r - 1, c - 1


@user_errors
def position_figure(model_name: str = SHIPPED, row: int | None = None, col: int | None = None) -> Image.Image:
    """Fig. 7 (centre) for the model: every position's cosine similarity to every other, with
    position (row, col) (1-based) outlined when given."""
    picked = models.entry(model_name)
    cell = None if row is None or col is None else _position(picked, row, col)
    key = ("position_figure", cell)
    if key not in picked.views:
        fig = vz.plot_position_embedding_similarity(_similarity(picked), highlight=cell)
        image = vz.figure_to_image(fig, dpi=90)
        # Keep the plain figure and the latest highlighted one only: a 14x14 grid has 196 positions.
        for old in [k for k in picked.views if isinstance(k, tuple) and k[0] == "position_figure" and k[1]]:
            del picked.views[old]
        picked.views[key] = image
    return picked.views[key]


@user_errors
def position_detail(model_name: str = SHIPPED, row: int = 1, col: int = 1) -> tuple[Image.Image, str]:
    """One position's similarity map, large, on Fig. 7's colour scale with its colour bar, the
    position outlined (row and col 1-based)."""
    picked = models.entry(model_name)
    sim = _similarity(picked)
    gh, gw = sim.shape[:2]
    r, c = _position(picked, row, col)
    tile = vz.heatmap(sim[r, c], size=VIEW_SIZE, cmap="viridis", vmin=-1.0, vmax=1.0)
    tile = FG.outline_cell(tile, (r, c), (gh, gw), colour=OUTLINE)
    tile = FG.with_colorbar(tile, cmap="viridis", vmin=-1.0, vmax=1.0, ticks=[-1, -0.5, 0, 0.5, 1],
                            label="cosine similarity")
    others = torch.cat([sim[r, c].flatten()[: r * gw + c], sim[r, c].flatten()[r * gw + c + 1:]])
    text = (f"Position (row {r + 1}, column {c + 1}) of {gh}x{gw}: the cosine similarity of its embedding with every "
            f"position's, on the same colours as the figure (outlined: itself, 1.0). Highest elsewhere: "
            f"{float(others.max()):.2f}, lowest: {float(others.min()):.2f}. Nearby rows and columns look alike when "
            f"the model has learned the 2-D layout.")
    return tile, text


def position_at(model_name: str = SHIPPED, row: int = 1, col: int = 1) -> tuple[Any, Any, str]:
    """The figure with (row, col) highlighted, its map and its note; errors as messages."""
    tile, text = position_detail(model_name, row, col)
    return position_figure(model_name, row, col), tile, text


def position_views(model_name: str = SHIPPED, row: int = 1, col: int = 1) -> tuple[Any, Any, str]:
    """Both position views, or none and a note when the model is not available (no error
    popup: this runs when the page loads and when the picker changes)."""
    try:
        return position_at(model_name, row, col)
    except gr.Error as err:
        return None, None, f"Not available: {err.message}"


def create_ui() -> dict[str, Any]:
    gr.Markdown("Each patch position has a learned embedding, added to its patch's token (Eq. 1); nothing tells "
                "the model that position 9 lies below position 1. The paper's Fig. 7 (centre) shows what it learned.")
    with gr.Row():
        with gr.Column(scale=3, min_width=300):
            figure = picture(label="Position embedding similarity (Fig. 7, centre)",
                              alt_text="Cosine similarity of every position embedding with every other")
            gr.Markdown(READ_FIGURE)
        with gr.Column(scale=2, min_width=300):
            row = numeric_slider(1, 8, value=4, step=1, label="Row")
            col = numeric_slider(1, 8, value=4, step=1, label="Column")
            detail = picture(label="One position, large", alt_text="One position's similarity map")
            note = gr.Markdown()
    return {"figure": figure, "row": row, "col": col, "detail": detail, "note": note}


def outputs(ui: dict[str, Any]) -> list[Any]:
    return [ui["figure"], ui["detail"], ui["note"]]


def wire(ui: dict[str, Any], picker: gr.Dropdown, hidden: dict[str, Any]) -> None:
    inputs = [picker, ui["row"], ui["col"]]
    for slider in (ui["row"], ui["col"]):
        slider.release(keep_views(position_at, 3), inputs, outputs(ui), **hidden)
