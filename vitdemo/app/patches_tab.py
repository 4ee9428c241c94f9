"""The Patches tab: the image as the model sees it, cut into patches, and the token sequence."""

from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import Image

from .. import visualize as vz
from . import models
from .common import to_rgb, user_errors
from .models import SHIPPED


@user_errors
def patches(image: Any, model_name: str = SHIPPED) -> tuple[Image.Image, Image.Image, str]:
    """The image as the model sees it with its patch grid, the sequence of patches, and a
    sentence counting them. Needs the model's config only, not its weights."""
    rgb = to_rgb(image)
    config, meta = models.model_spec(model_name)
    size, p = config.image_size[0], config.patch_size
    grid, strip = vz.patch_grid(rgb, p, size, **models.crop_of(meta))
    gh, gw = config.grid_size
    n = gh * gw
    text = (f"{size}x{size} pixels cut into {gh}x{gw} = **{n} patches of {p}x{p}** pixels -> **{n} tokens**, each "
            f"patch flattened ({3 * p * p} numbers) and projected to width D = {config.embed_dim}; with the "
            f"**class token** in front the Transformer reads **{n + 1} tokens** (Eq. 1).")
    return grid, strip, text


def create_ui() -> dict[str, Any]:
    gr.Markdown("The model never sees pixels one by one: it cuts the image into P x P patches, the "
                "*16x16 words* of the title, and reads them row by row.")
    with gr.Row():
        grid = gr.Image(format="png", interactive=False, label="The image as the model sees it, with its patches")
        with gr.Column():
            text = gr.Markdown()
            sequence = gr.Image(format="png", label="The sequence of patches (tokens 1, 2, ...)", interactive=False)
    return {"grid": grid, "sequence": sequence, "text": text}


def outputs(ui: dict[str, Any]) -> list[Any]:
    return [ui["grid"], ui["sequence"], ui["text"]]
