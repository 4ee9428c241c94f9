"""The Patches tab: the image as the model sees it, cut into numbered patches, and the token
sequence the Transformer reads (the paper's Fig. 1 and Eq. 1)."""

from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import Image

from .. import figures as FG
from .. import visualize as vz
from . import models
from .common import picture, to_rgb, user_errors
from .models import SHIPPED

READ_GRID = ("The picture is cut to exactly the pixels the model reads; each patch carries its token number, "
             "the order in which the model reads them: left to right, top to bottom.")
READ_SEQUENCE = (
    "The paper's Fig. 1 for this image: the learnable class token 0* comes first, then patches 1 to N in reading "
    "order. Each patch is flattened and projected by the same matrix E into a token (pink); every token then has "
    "its own learned position embedding added (purple, numbered), the only place the model learns where a patch "
    "was, and the N + 1 tokens enter the Transformer encoder. The class token's output is the answer.")


@user_errors
def patches(image: Any, model_name: str = SHIPPED) -> tuple[Image.Image, Image.Image, str]:
    """The image as the model sees it with its patches numbered in reading order, the paper's
    Fig. 1 for it (class token, patches, + position embedding), and a sentence counting them.
    Needs the model's config only, not its weights."""
    rgb = to_rgb(image)
    config, meta = models.model_spec(model_name)
    size, p = config.image_size[0], config.patch_size
    crop = models.crop_of(meta)
    grid = FG.numbered_patch_grid(rgb, p, size, **crop)
    sequence = vz.figure_to_image(FG.token_sequence(rgb, p, size, **crop), dpi=100)
    gh, gw = config.grid_size
    n = gh * gw
    text = (f"{size}x{size} pixels cut into {gh}x{gw} = **{n} patches of {p}x{p}** pixels -> **{n} tokens**, each "
            f"patch flattened ({3 * p * p} numbers) and projected to width D = {config.embed_dim}; with the "
            f"**class token** in front the Transformer reads **{n + 1} tokens** (Eq. 1).")
    return grid, sequence, text


def create_ui() -> dict[str, Any]:
    gr.Markdown("The model never sees pixels one by one: it cuts the image into P x P patches, the "
                "*16x16 words* of the title, and reads them as a sequence of tokens.")
    with gr.Row():
        with gr.Column(scale=2, min_width=280):
            grid = picture(height=300, label="The image as the model sees it, patches numbered",
                            alt_text="The image cut into numbered patches")
            gr.Markdown(READ_GRID)
        with gr.Column(scale=3, min_width=280):
            text = gr.Markdown()
            sequence = picture(label="The token sequence (Fig. 1)",
                                alt_text="Class token, patches in reading order, plus position embeddings")
            gr.Markdown(READ_SEQUENCE)
    return {"grid": grid, "sequence": sequence, "text": text}


def outputs(ui: dict[str, Any]) -> list[Any]:
    return [ui["grid"], ui["sequence"], ui["text"]]
