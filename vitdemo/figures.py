"""Drawn figures that explain the model rather than measure it: the paper's Fig. 1 (an image as a
numbered token sequence, with the position embeddings added), a patch grid numbered in reading
order, a picture with a colour bar that says what its colours mean, and labelled tiles (one map
per attention head). matplotlib's object API (no pyplot global state: safe in a server) and Pillow.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from matplotlib import font_manager
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch
from PIL import Image, ImageDraw, ImageFont

from .data import model_crop, to_rgb
from .visualize import figure_to_image, patch_grid

CLASS_TOKEN = "0*"  # the paper's Fig. 1 marks the extra learnable [class] embedding with a star
PATCH_COLOUR = "#f4b6c2"  # Fig. 1's patch embeddings are pink, its position embeddings purple
POSITION_COLOUR = "#7e57c2"


@functools.lru_cache(maxsize=16)
def font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans, which matplotlib ships, so that pictures drawn with Pillow look alike everywhere."""
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def model_view(image: Image.Image, image_size: int | None = None, *, resize: int | None = None,
               interpolation: str = "bicubic") -> Image.Image:
    """The pixels the model reads (`vitdemo.data.model_crop`), as RGB; `image` itself without `image_size`."""
    if image_size is not None:
        image = model_crop(image, image_size, resize=resize, interpolation=interpolation)
    return to_rgb(image)


# ---------------------------------------------------------------------------------------------
# Patches as tokens (the paper's Fig. 1 and Eq. 1)
# ---------------------------------------------------------------------------------------------


def numbered_patch_grid(image: Image.Image, patch_size: int, image_size: int | None = None, *,
                        resize: int | None = None, interpolation: str = "bicubic",
                        min_cell: int = 28) -> Image.Image:
    """`visualize.patch_grid`'s picture with every patch's token number in its corner: 1 + r * grid_w + c
    for patch (r, c), the order in which the model reads them (token 0 is the class token). Enlarged
    (without smoothing) until a cell is at least `min_cell` pixels, so that three digits fit."""
    image = model_view(image, image_size, resize=resize, interpolation=interpolation)
    grid, _ = patch_grid(image, patch_size)
    gh, gw = image.size[1] // patch_size, image.size[0] // patch_size
    cell = grid.size[0] / gw
    if cell < min_cell:
        k = math.ceil(min_cell / cell)
        grid = grid.resize((grid.size[0] * k, grid.size[1] * k), Image.Resampling.NEAREST)
        cell *= k
    draw = ImageDraw.Draw(grid)
    text = font(max(8, min(22, int(cell * 0.34))))
    for r in range(gh):
        for c in range(gw):
            draw.text((c * cell + 2, r * cell + 1), str(1 + r * gw + c), font=text, fill=(255, 255, 255),
                      stroke_width=2, stroke_fill=(0, 0, 0))
    return grid


def sequence_columns(num_patches: int, first: int = 5) -> list[tuple[str, int | None]]:
    """The columns Fig. 1 draws: the class token, the first `first` patches, an ellipsis and the
    last patch (all of them when at most `first` + 1). Each is (its label, its patch's index in
    reading order, or None for the class token and the ellipsis)."""
    if num_patches <= first + 1:
        shown = list(range(num_patches))
    else:
        shown = [*range(first), None, num_patches - 1]
    return [(CLASS_TOKEN, None)] + [("…", None) if k is None else (str(k + 1), k) for k in shown]


def token_sequence(image: Image.Image, patch_size: int, image_size: int | None = None, *,
                   resize: int | None = None, interpolation: str = "bicubic", first: int = 5) -> Figure:
    """The paper's Fig. 1 for one image: the class token 0* first, then patches 1..N in reading
    order (left to right, top to bottom); each patch is flattened and projected by E, and every
    token gets its position embedding added (Eq. 1: z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos).

    The first `first` patches and the last are drawn (`sequence_columns`). Each patch thumbnail is
    an image labelled "token k", so the pixels drawn for each token can be checked."""
    image = model_view(image, image_size, resize=resize, interpolation=interpolation)
    w, h = image.size
    if w % patch_size or h % patch_size:
        raise ValueError(f"image size {w}x{h} is not divisible by patch_size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    n = gh * gw
    columns = sequence_columns(n, first)
    pixels = np.asarray(image)
    step = 1.3  # boxes one unit wide, 0.3 apart
    width = len(columns) * step - 0.3
    room = max(width, 10.1)  # short sequences are centred, with room for the captions
    fig = Figure(figsize=((room + 0.3) * 0.6, 6.3 * 0.6))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.15 - (room - width) / 2, width + 0.15 + (room - width) / 2)
    ax.set_ylim(-0.2, 6.1)
    ax.set_axis_off()
    line = {"color": "#555555", "lw": 1.0}

    def box(x: float, y: float, w: float, colour: str, text: str = "", text_colour: str = "black",
            dashed: bool = False, size: float = 13, weight: str = "bold") -> None:
        ax.add_patch(FancyBboxPatch((x + 0.05, y + 0.05), w - 0.1, 0.6, boxstyle="round,pad=0.04", facecolor=colour,
                                    edgecolor="#444444", linewidth=1.0, linestyle="--" if dashed else "-"))
        if text:
            ax.text(x + w / 2, y + 0.35, text, ha="center", va="center", fontsize=size, color=text_colour,
                    fontweight=weight)

    def arrow(x: float, y0: float, y1: float) -> None:
        ax.annotate("", xy=(x, y1), xytext=(x, y0), arrowprops={"arrowstyle": "->", **line})

    ax.text(width / 2, 5.85, "token = patch embedding (pink) + position embedding (purple)",
            ha="center", va="center", fontsize=12, color="#222222")
    for i, (name, k) in enumerate(columns):
        x = i * step
        if name == "…":
            for y in (4.6, 2.55, 1.3):
                ax.text(x + 0.5, y, "…", ha="center", va="center", fontsize=18)
            continue
        if k is None:  # the class token: no patch, a learnable embedding
            box(x, 4.15, 1, "white", "[class]", dashed=True, size=10.5)
            arrow(x + 0.5, 4.2, 2.9)
        else:
            r, c = divmod(k, gw)
            patch = pixels[r * patch_size:(r + 1) * patch_size, c * patch_size:(c + 1) * patch_size]
            thumb = ax.imshow(patch, extent=(x, x + 1, 4.1, 5.1), interpolation="nearest", zorder=2)
            thumb.set_label(f"token {k + 1}")
            ax.add_patch(FancyBboxPatch((x, 4.1), 1, 1, boxstyle="square,pad=0", fill=False, edgecolor="#444444",
                                        linewidth=0.8, zorder=3))
            arrow(x + 0.5, 4.08, 3.78)
            arrow(x + 0.5, 3.22, 2.9)
        box(x, 2.2, 1, PATCH_COLOUR, "*" if k is None else "")
        ax.text(x + 0.5, 1.92, "+", ha="center", va="center", fontsize=16, fontweight="bold", color="#333333")
        box(x, 0.95, 1, POSITION_COLOUR, name, text_colour="white")
        arrow(x + 0.5, 1.0, 0.58)
    what = "linear projection E of the flattened patches" if width - step > 6.5 else "linear projection E"
    box(step - 0.05, 3.1, width - step + 0.1, "#fff3e0", what, size=12, weight="normal")
    box(-0.05, -0.1, width + 0.1, "#e8eaf6", f"Transformer encoder: {n + 1} tokens", size=12, weight="normal")
    return fig


# ---------------------------------------------------------------------------------------------
# Pictures whose colours carry a value
# ---------------------------------------------------------------------------------------------


def with_colorbar(image: Image.Image, cmap: str = "inferno", vmin: float = 0.0, vmax: float = 1.0, label: str = "",
                  ticks: Sequence[float] | None = None, tick_labels: Sequence[str] | None = None,
                  bar_width: int = 92) -> Image.Image:
    """`image` unchanged (pixel for pixel) with a vertical colour bar on its right that says what
    its colours mean: `cmap` from `vmin` to `vmax`, with `label`. Same height, `bar_width` wider."""
    image = to_rgb(image)
    w, h = image.size
    total = w + bar_width
    dpi = 100
    fig = Figure(figsize=(total / dpi, h / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, w / total, 1))
    ax.imshow(np.asarray(image), interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    margin = min(12, h // 10)
    cax = fig.add_axes(((w + 12) / total, margin / h, 14 / total, 1 - 2 * margin / h))
    bar = fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap), cax=cax, ticks=ticks)
    if tick_labels is not None:
        bar.set_ticklabels(list(tick_labels))
    bar.ax.tick_params(labelsize=8)
    bar.set_label(label, fontsize=8.5)
    return figure_to_image(fig, dpi=dpi)


def tile_grid(tiles: Sequence[Image.Image], labels: Sequence[str], columns: int, gap: int = 8,
              label_size: int = 13) -> Image.Image:
    """Tiles on white in rows of `columns`, each with its label written above it (never over it)."""
    if len(tiles) != len(labels) or not tiles:
        raise ValueError(f"need one label per tile, got {len(tiles)} tiles and {len(labels)} labels")
    tw = max(t.size[0] for t in tiles)
    th = max(t.size[1] for t in tiles)
    band = label_size + 6
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    out = Image.new("RGB", (columns * (tw + gap) - gap, rows * (th + band + gap) - gap), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    text = font(label_size)
    for i, (tile, name) in enumerate(zip(tiles, labels)):
        r, c = divmod(i, columns)
        x, y = c * (tw + gap), r * (th + band + gap)
        draw.text((x + tw / 2, y + band / 2), name, font=text, fill=(30, 30, 30), anchor="mm")
        out.paste(to_rgb(tile), (x, y + band))
    return out


def outline_cell(image: Image.Image, cell: tuple[int, int], grid_size: tuple[int, int],
                 colour: tuple[int, int, int] = (0, 255, 255)) -> Image.Image:
    """`image` (a map of a grid_h x grid_w grid) with grid cell (row, column) outlined, in place."""
    (r, c), (gh, gw) = cell, grid_size
    cw, ch = image.size[0] / gw, image.size[1] / gh
    ImageDraw.Draw(image).rectangle([c * cw, r * ch, (c + 1) * cw - 1, (r + 1) * ch - 1], outline=colour,
                                    width=max(2, round(min(cw, ch) / 10)))
    return image


__all__ = ["CLASS_TOKEN", "font", "model_view", "numbered_patch_grid", "outline_cell", "sequence_columns",
           "tile_grid", "token_sequence", "with_colorbar"]
