"""Pictures of what a ViT learned and how it trained; the numbers they show (rollout, relevance,
attention distance, ...) come from `vitdemo.explanations`. Figures are matplotlib `Figure`s built
without pyplot's global state (safe in a server), arrays are numpy or torch tensors."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw
from torch import Tensor

from .data import model_crop, to_rgb
from .explanations import min_max


def plot_history(history: dict[str, list[float | None]]) -> Figure:
    """Loss and accuracy curves per epoch, train against validation (the walk-through's
    "visualising results"), and the moving average of the weights' validation when the run kept
    one. Under Mixup/CutMix the training accuracy is scored against each image's first label, so
    it reads low; validation is unaffected."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    series = (("train", "train"), ("test", "validation"), ("ema_val", "validation, EMA weights"))
    for ax, metric, title in zip(fig.subplots(1, 2), ("loss", "acc"), ("Loss", "Accuracy")):
        for split, label in series:
            values = [np.nan if v is None else v for v in history.get(f"{split}_{metric}", [])]
            if values and not np.all(np.isnan(values)):
                ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=label)
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Rows are true classes, columns predictions; each row normalised to sum to 1."""
    matrix = np.asarray(matrix, dtype=float)
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    size = max(4.0, 0.55 * len(class_names) + 2)
    fig = Figure(figsize=(size, size), layout="constrained")
    ax = fig.subplots()
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (row-normalised)")
    if len(class_names) <= 20:
        for i in ticks:
            for j in ticks:
                ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    return fig


# ---------------------------------------------------------------------------------------------
# Patches: the "16x16 words"
# ---------------------------------------------------------------------------------------------


def patch_grid(image: Image.Image, patch_size: int, image_size: int | None = None, line_color=(255, 255, 255),
               per_row: int | None = None, gap: int = 2, *, resize: int | None = None,
               interpolation: str = "bicubic") -> tuple[Image.Image, Image.Image]:
    """The image with its patch grid drawn, and the flattened sequence of patches, in the order
    the model reads them (row by row), as a strip wrapped every `per_row` patches.

    With `image_size`, the image is first cut to what the model sees (`vitdemo.data.model_crop`
    with the checkpoint's `resize` and `interpolation`: the very pixels `preprocess` gives it);
    without, it is drawn as it is."""
    if image_size is not None:
        image = model_crop(image, image_size, resize=resize, interpolation=interpolation)
    image = to_rgb(image)
    w, h = image.size
    if w % patch_size or h % patch_size:
        raise ValueError(f"image size {w}x{h} is not divisible by patch_size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    # Draw on an enlarged copy so that grid lines stay thin even for 32 px images.
    scale = max(1, 256 // max(w, h))
    grid = image.resize((w * scale, h * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(grid)
    for i in range(1, gw):
        draw.line([(i * patch_size * scale, 0), (i * patch_size * scale, h * scale)], fill=line_color, width=1)
    for j in range(1, gh):
        draw.line([(0, j * patch_size * scale), (w * scale, j * patch_size * scale)], fill=line_color, width=1)

    n = gh * gw
    per_row = per_row or min(n, 2 * gw)
    rows = math.ceil(n / per_row)
    ps = patch_size * scale
    strip = Image.new("RGB", (per_row * (ps + gap) - gap, rows * (ps + gap) - gap), (255, 255, 255))
    for k in range(n):
        r, c = divmod(k, gw)
        tile = image.crop((c * patch_size, r * patch_size, (c + 1) * patch_size, (r + 1) * patch_size))
        tile = tile.resize((ps, ps), Image.Resampling.NEAREST)
        strip.paste(tile, ((k % per_row) * (ps + gap), (k // per_row) * (ps + gap)))
    return grid, strip


# ---------------------------------------------------------------------------------------------
# Position embeddings (paper Fig. 7, centre)
# ---------------------------------------------------------------------------------------------


def _mosaic(tiles: np.ndarray, gap: int = 1, fill: float = np.nan) -> np.ndarray:
    """(R, C, h, w) tiles -> one (R*(h+gap)-gap, C*(w+gap)-gap) image, so a grid of hundreds of
    small maps draws as one imshow instead of hundreds of axes."""
    R, C, h, w = tiles.shape
    out = np.full((R * (h + gap) - gap, C * (w + gap) - gap), fill, dtype=float)
    for r in range(R):
        for c in range(C):
            out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tiles[r, c]
    return out


def plot_position_embedding_similarity(similarity: Tensor, highlight: tuple[int, int] | None = None) -> Figure:
    """The layout of Fig. 7 (centre): tile (r, c) shows how similar position (r, c) is to
    every position; tiles are placed in the image's own grid. `highlight` (row, column),
    0-based, outlines that position's tile in red."""
    gh, gw = similarity.shape[:2]
    gap = max(1, gh // 7)
    fig = Figure(figsize=(7, 5.8 * gh / gw + 0.9), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(_mosaic(similarity.numpy(), gap=gap), cmap="viridis", vmin=-1, vmax=1)
    ax.set(title="Position embedding similarity", xlabel="input patch column", ylabel="input patch row")
    ax.set_xticks([(c + 0.5) * (gw + gap) - 1 for c in range(gw)], range(1, gw + 1))
    ax.set_yticks([(r + 0.5) * (gh + gap) - 1 for r in range(gh)], range(1, gh + 1))
    ax.tick_params(length=0, labelsize=7)
    if highlight is not None:
        r, c = highlight
        if not (0 <= r < gh and 0 <= c < gw):
            raise ValueError(f"highlight must be a (row, column) of the {gh}x{gw} grid, got {highlight}")
        # Pixel (i, j) of the mosaic is centred on (j, i): a tile spans [start - 0.5, start + size - 0.5].
        ax.add_patch(Rectangle((c * (gw + gap) - 0.5, r * (gh + gap) - 0.5), gw, gh, fill=False, edgecolor="red",
                               linewidth=2.5))
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine similarity")
    return fig


# ---------------------------------------------------------------------------------------------
# Maps over the image: rollout, relevance, one head's attention (paper Fig. 6)
# ---------------------------------------------------------------------------------------------


def overlay(image: Image.Image, mask: Tensor | np.ndarray, alpha: float = 0.5, cmap: str = "inferno",
            size: int | None = None, *, image_size: int | None = None, resize: int | None = None,
            interpolation: str = "bicubic") -> Image.Image:
    """`mask` (grid_h, grid_w), values in [0, 1], upsampled smoothly and blended with opacity
    `alpha` over the part of `image` the model saw, so each patch's value lies on its pixels.

    That part is `vitdemo.data.model_crop(image, image_size, resize=..., interpolation=...)`,
    drawn at size x size (`size` defaults to `image_size`); pass the checkpoint's `image_size`,
    `resize` and `interpolation`. With only `size`, the central square is drawn at that size;
    with neither, `image` is taken to be the model's view already."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if image_size is not None or size is not None:
        image = model_crop(image, image_size or size, resize=resize, interpolation=interpolation, size=size)
    image = to_rgb(image)
    mask = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, None]
    up = F.interpolate(mask, size=image.size[::-1], mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
    heat = colormaps[cmap](up.numpy())[..., :3]
    blended = (1 - alpha) * np.asarray(image, dtype=np.float32) / 255 + alpha * heat
    return Image.fromarray((blended.clip(0, 1) * 255).round().astype(np.uint8))


def heatmap(mask: Tensor | np.ndarray, size: int = 96, cmap: str = "inferno", vmin: float | None = None,
            vmax: float | None = None) -> Image.Image:
    """One (h, w) map as a colour image, enlarged without smoothing: `vmin` to `vmax` spans the
    colour map (each defaults to the map's own minimum or maximum: min-max scaled)."""
    m = min_max(np.asarray(mask, dtype=np.float32), lo=vmin, hi=vmax)
    img = Image.fromarray((colormaps[cmap](m)[..., :3] * 255).astype(np.uint8))
    return img.resize((size, size * m.shape[0] // m.shape[1]), Image.Resampling.NEAREST)


# ---------------------------------------------------------------------------------------------
# Mean attention distance (paper Fig. 7, right)
# ---------------------------------------------------------------------------------------------


def plot_mean_attention_distance(distances: Tensor, image_size: int | None = None) -> Figure:
    """One dot per head against network depth (Fig. 7, right); layers are numbered from 1 and
    the depth axis has whole-number ticks only."""
    fig = Figure(figsize=(5, 4), layout="constrained")
    ax = fig.subplots()
    layers, heads = distances.shape
    for h in range(heads):
        ax.scatter(range(1, layers + 1), distances[:, h].numpy(), s=14, alpha=0.8)
    ax.set(xlabel="network depth (layer)", ylabel="mean attention distance (pixels)",
           title="Mean attention distance per head")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # a layer is a whole number: 1, 2, 3, not 1.5
    ax.set_xlim(0.5, layers + 0.5)
    if image_size:
        ax.set_ylim(0, image_size * 0.75)
    ax.grid(alpha=0.3)
    return fig


# ---------------------------------------------------------------------------------------------
# Patch-embedding filters (paper Fig. 7, left)
# ---------------------------------------------------------------------------------------------


def plot_patch_embedding_components(components: Tensor, columns: int = 7) -> Figure:
    n = components.shape[0]
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(columns * 0.9, rows * 0.9 + 0.5), layout="constrained")
    fig.suptitle("Principal components of the patch-embedding filters")
    for i, ax in enumerate(fig.subplots(rows, columns, squeeze=False).flat):
        ax.axis("off")
        if i < n:
            ax.imshow(components[i].permute(1, 2, 0).numpy(), interpolation="nearest")
    return fig


def image_row(images: Sequence[Image.Image], gap: int = 4) -> Image.Image:
    """Images side by side on white, e.g. one attention map per head."""
    w = sum(im.size[0] for im in images) + gap * (len(images) - 1)
    h = max(im.size[1] for im in images)
    row = Image.new("RGB", (w, h), (255, 255, 255))
    x = 0
    for im in images:
        row.paste(im, (x, 0))
        x += im.size[0] + gap
    return row


def figure_to_image(fig: Figure, dpi: int = 100) -> Image.Image:
    """Render a matplotlib figure to a PIL image (no pyplot, no display)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
