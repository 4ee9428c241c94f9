"""Pictures of one image's path through a ViT, drawn from a `vitdemo.trace` `Trace`: vectors as
labelled colour strips (so that a 16-number q and a 3,072-number MLP activation can be compared
at a glance), the token matrix z_0, one token's attention over the image before and after the
softmax, the residual stream's norm per token and layer, and the logit lens.

Only Pillow and matplotlib's object API (no pyplot global state: safe in a server); the numbers
come from the trace, never recomputed here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw
from torch import Tensor

from .explanations import min_max
from .figures import font
from .visualize import figure_to_image

STRIP_WIDTH = 384  # pixels of a vector strip: readable in a phone's 400 px column
LABEL_SIZE = 13
SIGNED = "RdBu_r"  # vectors: blue negative, white 0, red positive, each strip on its own symmetric scale


def _colour(values: np.ndarray, cmap: str, lo: float, hi: float) -> np.ndarray:
    return (colormaps[cmap](min_max(values, lo=lo, hi=hi))[..., :3] * 255).astype(np.uint8)


def _resized(pixels: np.ndarray, width: int, height: int) -> Image.Image:
    """An array of colours enlarged without smoothing (every number stays a sharp cell), or
    shrunk by averaging when there are more numbers than pixels."""
    image = Image.fromarray(pixels)
    smaller = width < image.size[0] or height < image.size[1]
    return image.resize((width, height), Image.Resampling.BOX if smaller else Image.Resampling.NEAREST)


def strip_columns(n: int) -> int:
    """How many numbers one row of a vector strip holds: all of a short vector, 64 per row up to
    1,024 numbers, then 128, so that a 3,072-wide MLP activation stays 24 rows high."""
    return n if n <= 64 else 64 if n <= 1024 else 128


def vector_strip(values: Tensor | np.ndarray, width: int = STRIP_WIDTH) -> Image.Image:
    """One vector as a strip of cells, left to right then row by row, on its own symmetric colour
    scale (white 0, red + max |value|, blue - max |value|)."""
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    columns = strip_columns(v.size)
    rows = math.ceil(v.size / columns)
    padded = np.full(rows * columns, np.nan, dtype=np.float32)
    padded[: v.size] = v
    scale = float(np.abs(v).max()) or 1.0
    pixels = _colour(padded.reshape(rows, columns), SIGNED, -scale, scale)
    pixels[np.isnan(padded.reshape(rows, columns))] = 255
    cell = max(1, min(24, width // columns))
    return _resized(pixels, columns * cell, max(rows * cell, 8))


def vector_stack(rows: Sequence[tuple[str, Tensor | np.ndarray]], width: int = STRIP_WIDTH) -> Image.Image:
    """Labelled strips, one under the other: above each strip, what it is and then its length and
    norm ("q, head 1" and "16 numbers, |v| = 3.21"), on one line where they fit, else on two."""
    text, small = font(LABEL_SIZE), font(LABEL_SIZE - 2)
    lines = []
    for label, v in rows:
        a = np.asarray(v, dtype=np.float64).reshape(-1)
        detail = f"{a.size:,} numbers, |v| = {float(np.linalg.norm(a)):.2f}"
        fits = text.getlength(label) + small.getlength(detail) + 12 <= width
        lines.append((label, detail, fits, vector_strip(a, width)))
    line = LABEL_SIZE + 6
    height = sum(line * (1 if fits else 2) + 2 + s.size[1] + 8 for _, _, fits, s in lines)
    out = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    y = 0
    for label, detail, fits, strip in lines:
        draw.text((0, y + 2), label, font=text, fill=(30, 30, 30))
        if fits:
            draw.text((width, y + 3), detail, font=small, fill=(100, 100, 100), anchor="ra")
        else:
            draw.text((0, y + line + 1), detail, font=small, fill=(100, 100, 100))
        y += line * (1 if fits else 2) + 2
        out.paste(strip, (0, y))
        y += strip.size[1] + 8
    return out


def token_matrix(tokens: Tensor | np.ndarray, highlight: int | None = None, width: int = STRIP_WIDTH,
                 height: int = 200) -> Image.Image:
    """The (N+1, D) tokens as a picture, one row per token (row 0 the class token), on one
    symmetric scale clipped at the 99th percentile of |value| so that a few large numbers do not
    wash out the rest; the row `highlight` outlined in green."""
    t = np.asarray(tokens, dtype=np.float32)
    scale = float(np.percentile(np.abs(t), 99)) or 1.0
    image = _resized(_colour(t, SIGNED, -scale, scale), width, height)
    if highlight is not None:
        row = height / t.shape[0]
        top = highlight * row
        ImageDraw.Draw(image).rectangle([0, top - 1, width - 1, top + max(row, 2) + 1], outline=(0, 170, 0), width=2)
    return image


def residual_norms(hidden: Sequence[Tensor], dpi: int = 90) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """|z_l| for every token (columns; 0 is the class token) after every layer (rows; 0 is z_0,
    the embeddings), drawn once per image: how the residual stream grows through the depth.
    Returns the picture and the heat map's box in it (left, top, right, bottom pixels), for
    `mark_residual_norms`, which marks a token and a layer without drawing the chart again."""
    norms = np.stack([h.float().norm(dim=-1).numpy() for h in hidden])  # (L+1, N+1)
    fig = Figure(figsize=(5.6, 3.0), layout="constrained")
    ax = fig.subplots()
    # On a log scale: the last layers' norms are often ten times the first's, which would wash them out.
    im = ax.imshow(norms, aspect="auto", cmap="magma", interpolation="nearest",
                   norm=LogNorm(max(float(norms.min()), 1e-3), max(float(norms.max()), 1e-2)))
    fig.colorbar(im, ax=ax, label="|z_l| of the token (log scale)", shrink=0.9)
    ax.set_xlabel("token (0 = class token, then the patches in reading order)", fontsize=10)
    ax.set_ylabel("z_l after layer l", fontsize=10)
    ax.tick_params(labelsize=9.5)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    ax.set_title("Residual stream norm per token and layer", fontsize=11)
    picture = figure_to_image(fig, dpi=dpi)
    # The axes' box in display pixels at the figure's own dpi, origin at the bottom left.
    x0, y0, x1, y1 = (v * dpi / fig.dpi for v in ax.get_window_extent().extents)
    h = picture.size[1]
    return picture, (x0, h - y1, x1, h - y0)


def mark_residual_norms(picture: Image.Image, box: tuple[float, float, float, float], shape: tuple[int, int],
                        token: int | None = None, layer: int | None = None) -> Image.Image:
    """A copy of `residual_norms`'s picture with the column of `token` and the row of `layer`
    (row l is z_l) outlined in green; `shape` is (L+1, N+1)."""
    out = picture.copy()
    draw = ImageDraw.Draw(out)
    (x0, y0, x1, y1), (rows, cols) = box, shape
    cw, rh = (x1 - x0) / cols, (y1 - y0) / rows
    if token is not None:
        draw.rectangle([x0 + token * cw, y0, x0 + (token + 1) * cw, y1], outline=(0, 200, 83), width=2)
    if layer is not None:
        draw.rectangle([x0, y0 + layer * rh, x1, y0 + (layer + 1) * rh], outline=(0, 200, 83), width=2)
    return out


def plot_logit_lens(probs: Tensor, class_names: Sequence[str], classes: Sequence[int]) -> Figure:
    """The logit lens: the probability of each of `classes` (the final answer first) after each
    layer, reading the class token through the final LayerNorm and the head (`Trace.layer_logits`
    softmaxed: (L, classes))."""
    p = np.asarray(probs, dtype=np.float32)
    layers = np.arange(1, p.shape[0] + 1)
    fig = Figure(figsize=(5.6, 3.0), layout="constrained")
    ax = fig.subplots()
    for rank, c in enumerate(classes):
        ax.plot(layers, p[:, c], marker="o", ms=3.5, lw=2.4 if rank == 0 else 1.3,
                label=f"{class_names[c]}{' (final answer)' if rank == 0 else ''}")
    ax.set_xlabel("after layer", fontsize=10)
    ax.set_ylabel("probability", fontsize=10)
    ax.set_ylim(-0.02, 1.02)
    ax.tick_params(labelsize=9.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.7, p.shape[0] + 0.3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9.5, loc="best")
    ax.set_title("The logit lens: the answer, layer by layer", fontsize=11)
    return fig


__all__ = ["mark_residual_norms", "plot_logit_lens", "residual_norms", "strip_columns", "token_matrix",
           "vector_stack", "vector_strip"]
