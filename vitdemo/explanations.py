"""The numbers behind the pictures of what a ViT attends to and learned; `vitdemo.visualize` draws them.

- `attention_rollout`: Abnar and Zuidema, "Quantifying Attention Flow in Transformers" (ACL 2020),
  as in the ViT paper's Fig. 6 (Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers
  for Image Recognition at Scale", 2020).
- `gradient_rollout`: the same rollout with each layer's attention weighted by the positive part
  of its gradient for one class, so that the map depends on the class.
- `relevance`: Chefer, Gur and Wolf, "Generic Attention-model Explainability for Interpreting
  Bi-Modal and Encoder-Decoder Transformers" (ICCV 2021), the rules for self-attention.
- `token_attention`: one token's attention over the patches, per head, as the model computed it.
- `mean_attention_distance`, `position_embedding_similarity`, `patch_embedding_components`: the
  analyses of Dosovitskiy et al. (2020), Fig. 7 (right, centre and left).

`min_max` is the one min-max scaling of the library: the maps here and the pictures' colour scales.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .model import VisionTransformer

# The smallest range divided by: a constant map (max == min) scales to 0s instead of 0 / 0 = NaN.
_TINY_RANGE = 1e-12


def min_max(values: Tensor | np.ndarray, dims: int | tuple[int, ...] | None = None, *,
            lo: float | None = None, hi: float | None = None) -> Tensor | np.ndarray:
    """`values` scaled so that `lo` becomes 0 and `hi` 1, clipped to [0, 1]. `lo` and `hi` default
    to the minimum and maximum over `dims` (all dimensions by default), one pair for each index of
    the other dimensions. A constant map gives 0s, not NaN; NaN stays NaN. A tensor gives a tensor,
    anything else a numpy array; a floating dtype is kept, integers become float64."""
    if isinstance(values, Tensor):
        values = values if values.is_floating_point() else values.double()
        if lo is None:
            lo = values.amin() if dims is None else values.amin(dim=dims, keepdim=True)
        if hi is None:
            hi = values.amax() if dims is None else values.amax(dim=dims, keepdim=True)
        span = torch.as_tensor(hi - lo, dtype=values.dtype, device=values.device).clamp_min(_TINY_RANGE)
        return ((values - lo) / span).clamp(0, 1)
    values = np.asarray(values)
    values = values if values.dtype.kind == "f" else values.astype(np.float64)
    lo = values.min(axis=dims, keepdims=True) if lo is None else lo
    hi = values.max(axis=dims, keepdims=True) if hi is None else hi
    # The range in float64 and the rest in the array's dtype, as the colour scales' Python-float
    # bounds always did: the same colours, to the bit.
    span = np.maximum(np.subtract(hi, lo, dtype=np.float64), _TINY_RANGE).astype(values.dtype)
    return ((values - np.asarray(lo, dtype=values.dtype)) / span).clip(0, 1)


# ---------------------------------------------------------------------------------------------
# Attention rollout (paper Fig. 6; Abnar and Zuidema, 2020), gradient rollout and relevance
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
    return min_max(mask, dims=(1, 2)).float()


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
    return min_max(mask, dims=(1, 2)).float()


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


# ---------------------------------------------------------------------------------------------
# What the model learned (paper Fig. 7: filters left, position embeddings centre, distance right)
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


@torch.no_grad()
def position_embedding_similarity(model: VisionTransformer) -> Tensor:
    """Cosine similarity between the learned position embedding of every patch position and
    every other's, (grid_h, grid_w, grid_h, grid_w). The class token's embedding is left out."""
    gh, gw = model.config.grid_size
    pos = F.normalize(model.pos_embed[0, 1:].float(), dim=-1)  # (N, D), the class token dropped
    return (pos @ pos.T).reshape(gh, gw, gh, gw).cpu()


@torch.no_grad()
def patch_embedding_components(model: VisionTransformer, n: int = 28) -> Tensor:
    """The top `n` principal components of the D learned patch filters E (each 3 x P x P),
    each scaled to [0, 1] for display: (n, 3, P, P)."""
    w = model.patch_embed.proj.weight.detach().float().cpu()  # (D, 3, P, P)
    flat = w.reshape(w.shape[0], -1)
    flat = flat - flat.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    comps = vh[: min(n, vh.shape[0])].reshape(-1, *w.shape[1:])
    return min_max(comps, dims=(1, 2, 3))
