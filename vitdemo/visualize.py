"""Pictures of what a ViT learned and how it trained. Figures are matplotlib `Figure`s built
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
from .model import VisionTransformer


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


@torch.no_grad()
def position_embedding_similarity(model: VisionTransformer) -> Tensor:
    """Cosine similarity between the learned position embedding of every patch position and
    every other's, (grid_h, grid_w, grid_h, grid_w). The class token's embedding is left out."""
    gh, gw = model.config.grid_size
    pos = F.normalize(model.pos_embed[0, 1:].float(), dim=-1)  # (N, D), the class token dropped
    return (pos @ pos.T).reshape(gh, gw, gh, gw).cpu()


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
# Attention maps and rollout (paper Fig. 6; Abnar and Zuidema, 2020)
# ---------------------------------------------------------------------------------------------


def _grid(num_tokens: int, grid_size: tuple[int, int] | None) -> tuple[int, int]:
    n = num_tokens - 1  # the class token
    if grid_size is not None:
        if grid_size[0] * grid_size[1] != n:
            raise ValueError(f"grid {grid_size} does not hold {n} patch tokens")
        return tuple(grid_size)
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} patch tokens are not a square grid; pass grid_size")
    return side, side


def _fuse_heads(attn: Tensor, head_fusion: str) -> Tensor:
    if head_fusion == "mean":
        return attn.mean(1)
    if head_fusion == "max":
        return attn.amax(1)
    if head_fusion == "min":
        return attn.amin(1)
    raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")


def _rollout(fused: list[Tensor], discard_ratio: float, grid: tuple[int, int]) -> Tensor:
    """Multiply per-layer (B, T, T) attention, with the residual identity, first to last."""
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    B, T, _ = fused[0].shape
    eye = torch.eye(T, dtype=torch.float64, device=fused[0].device)
    result = eye.expand(B, T, T)
    for a in fused:
        a = a.double()
        if discard_ratio > 0:
            # Zero the weakest entries of every image's matrix (not only the first image's),
            # never the class token's attention to itself (flat index 0).
            flat = a.reshape(B, -1)
            k = int(flat.shape[1] * discard_ratio)
            if k:
                scores = flat.clone()
                scores[:, 0] = float("inf")
                flat = flat.scatter(1, scores.topk(k, dim=1, largest=False).indices, 0.0)
            a = flat.reshape(B, T, T)
        a = a + eye  # the residual path: half attention, half identity after renormalising
        a = a / a.sum(dim=-1, keepdim=True)  # rows sum to 1 (keepdim: divide each row by its own sum)
        result = a @ result
    mask = result[:, 0, 1:].reshape(B, *grid)  # what the class token gathered from each patch
    lo = mask.amin(dim=(1, 2), keepdim=True)
    hi = mask.amax(dim=(1, 2), keepdim=True)
    return ((mask - lo) / (hi - lo).clamp_min(1e-12)).float()


def attention_rollout(attentions: Sequence[Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0,
                      grid_size: tuple[int, int] | None = None) -> Tensor:
    """Attention rollout (Abnar and Zuidema, 2020), as in the paper's Fig. 6.

    `attentions` is what `model(x, return_attention=True)` returns: one (B, heads, T, T) tensor
    per layer. Per layer: fuse heads (`mean`, `max` or `min`), optionally zero the weakest
    `discard_ratio` share of entries, add the identity for the residual path, renormalise each
    row to sum to 1; multiply the layers from first to last. The class token's row without its
    own column, reshaped to the patch grid and scaled to [0, 1] per image, is the map:
    (B, grid_h, grid_w).
    """
    grid = _grid(attentions[0].shape[-1], grid_size)
    return _rollout([_fuse_heads(a.detach(), head_fusion) for a in attentions], discard_ratio, grid)


def _class_gradients(model: VisionTransformer, x: Tensor, class_index: int | Sequence[int] | Tensor | None
                     ) -> tuple[list[Tensor], list[Tensor]]:
    """Every layer's attention (B, heads, T, T) and the gradient of the chosen class's logit
    (not its softmax) with respect to it, in eval mode (default class: each image's prediction).

    `torch.autograd.grad` reaches the attention maps only, so no parameter's `.grad` is written
    and a model whose weights have `requires_grad=False` (one shared by a server) works: the
    graph is then built through the input instead."""
    was_training = model.training
    model.eval()  # dropout and stochastic depth off, as for a prediction
    try:
        with torch.enable_grad():
            if not x.requires_grad and not any(p.requires_grad for p in model.parameters()):
                x = x.detach().requires_grad_(True)
            logits, attentions = model(x, return_attention=True)
            target = _target_classes(logits, class_index)
            # Images do not interact, so the gradient of the sum is each image's own gradient.
            grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), attentions)
    finally:
        model.train(was_training)
    return [a.detach() for a in attentions], [g.detach() for g in grads]


def _target_classes(logits: Tensor, class_index: int | Sequence[int] | Tensor | None) -> Tensor:
    """(B,) class indices: the predicted ones, one for all images, or one per image."""
    B, num_classes = logits.shape
    if class_index is None:
        return logits.argmax(-1)
    target = torch.as_tensor(class_index, dtype=torch.long, device=logits.device).reshape(-1)
    if target.numel() not in (1, B):
        raise ValueError(f"class_index must be one class or one per image ({B}), got {target.numel()}")
    if ((target < 0) | (target >= num_classes)).any():
        raise ValueError(f"class_index must be in [0, {num_classes}), got {target.tolist()}")
    return target.expand(B)


def gradient_rollout(model: VisionTransformer, x: Tensor, class_index: int | Sequence[int] | Tensor | None = None,
                     discard_ratio: float = 0.0) -> Tensor:
    """Rollout with every layer's attention weighted by the ReLU of the gradient of the chosen
    class's logit with respect to that same layer's attention (default: each image's predicted
    class; an int for all images or one per image), then averaged over heads.
    (B, grid_h, grid_w), scaled to [0, 1]. The model's weights get no gradient."""
    attentions, grads = _class_gradients(model, x, class_index)
    fused = [(a * g.clamp_min(0)).mean(1) for a, g in zip(attentions, grads)]  # layer l with its own gradient
    return _rollout(fused, discard_ratio, model.config.grid_size)


def relevance(model: VisionTransformer, x: Tensor, class_index: int | Sequence[int] | Tensor | None = None) -> Tensor:
    """Class-specific relevance of every patch (Chefer, Gur and Wolf, "Generic Attention-model
    Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV 2021, the
    rules for self-attention).

    R starts as the identity (tokens x tokens). For each layer, first to last, with A its
    attention probabilities (heads x T x T) and G the gradient of the class's logit (not the
    softmax) with respect to A:

        Abar = mean over heads of (G * A)^+      (clamped at zero before the mean)
        R    = R + Abar @ R                      (no row normalisation, unlike rollout)

    The map is the class token's row of R without its own column, on the patch grid, scaled
    to [0, 1] per image: (B, grid_h, grid_w). `class_index`: default each image's predicted
    class; an int for all images, or one per image. Unlike rollout it depends on the class.
    The model's weights get no gradient.
    """
    attentions, grads = _class_gradients(model, x, class_index)
    B, _, T, _ = attentions[0].shape
    R = torch.eye(T, dtype=torch.float64, device=x.device).expand(B, T, T)
    for a, g in zip(attentions, grads):
        abar = (g.double() * a.double()).clamp_min(0).mean(1)  # each layer with its own gradient
        R = R + abar @ R
    mask = R[:, 0, 1:].reshape(B, *model.config.grid_size)  # what the class token draws from each patch
    lo = mask.amin(dim=(1, 2), keepdim=True)
    hi = mask.amax(dim=(1, 2), keepdim=True)
    return ((mask - lo) / (hi - lo).clamp_min(1e-12)).float()


def token_attention(attentions: Sequence[Tensor], layer: int, query: int = 0,
                    grid_size: tuple[int, int] | None = None) -> Tensor:
    """What token `query` (0 = the class token, 1 + r * grid_w + c = patch (r, c)) attends to
    among the patches in `layer`, per head: (B, heads, grid_h, grid_w), rows as the model
    computed them (not rescaled)."""
    attn = attentions[layer]
    grid = _grid(attn.shape[-1], grid_size)
    if not 0 <= query < attn.shape[-1]:
        raise ValueError(f"query must be in [0, {attn.shape[-1]}), got {query}")
    return attn[:, :, query, 1:].reshape(attn.shape[0], attn.shape[1], *grid).detach()


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
    m = np.asarray(mask, dtype=np.float32)
    lo = float(m.min()) if vmin is None else vmin
    hi = float(m.max()) if vmax is None else vmax
    m = ((m - lo) / max(hi - lo, 1e-12)).clip(0, 1)
    img = Image.fromarray((colormaps[cmap](m)[..., :3] * 255).astype(np.uint8))
    return img.resize((size, size * m.shape[0] // m.shape[1]), Image.Resampling.NEAREST)


# ---------------------------------------------------------------------------------------------
# Mean attention distance (paper Fig. 7, right)
# ---------------------------------------------------------------------------------------------


def mean_attention_distance(attentions: Sequence[Tensor], patch_size: int,
                            grid_size: tuple[int, int] | None = None) -> Tensor:
    """For each layer and head, the average distance in pixels across which patches attend:
    sum_j A_ij * d_ij for each query patch i, averaged over queries and over the batch.
    Returns (layers, heads).

    The class token is left out as query and as key; each query's weights over the patches
    are renormalised to sum to 1, so the result is a true expected distance. d_ij is the
    Euclidean distance between patch centres, in pixels.
    """
    grid = _grid(attentions[0].shape[-1], grid_size)
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).double() * patch_size
    dist = torch.cdist(centres, centres)  # (N, N)
    out = []
    for attn in attentions:
        a = attn.detach()[:, :, 1:, 1:].double()
        a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
        out.append((a * dist.to(a.device)).sum(-1).mean(dim=(0, 2)))  # (heads,)
    return torch.stack(out).float().cpu()


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


@torch.no_grad()
def patch_embedding_components(model: VisionTransformer, n: int = 28) -> Tensor:
    """The top `n` principal components of the D learned patch filters E (each 3 x P x P),
    each scaled to [0, 1] for display: (n, 3, P, P)."""
    w = model.patch_embed.proj.weight.detach().float().cpu()  # (D, 3, P, P)
    flat = w.reshape(w.shape[0], -1)
    flat = flat - flat.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    comps = vh[: min(n, vh.shape[0])].reshape(-1, *w.shape[1:])
    lo = comps.amin(dim=(1, 2, 3), keepdim=True)
    hi = comps.amax(dim=(1, 2, 3), keepdim=True)
    return (comps - lo) / (hi - lo).clamp_min(1e-12)


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
