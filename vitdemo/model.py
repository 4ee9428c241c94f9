"""The Vision Transformer of Dosovitskiy et al. (2020), "An Image is Worth 16x16 Words".

Read top to bottom: the building blocks (patch embedding, attention, MLP, encoder block), the
model, its weight initialisation, and position-embedding resampling. Parameter names follow
timm's, so timm checkpoints load without renaming (`vitdemo.convert` maps the other peers).

The four equations of the paper (section 3.1), with x_p^i the i-th flattened patch:

    Eq. 1  z_0  = [x_class; x_p^1 E; ...; x_p^N E] + E_pos      PatchEmbed, VisionTransformer
    Eq. 2  z'_l = MSA(LN(z_{l-1})) + z_{l-1}                    Block (Attention)
    Eq. 3  z_l  = MLP(LN(z'_l)) + z'_l                          Block (Mlp)
    Eq. 4  y    = LN(z_L^0)                                     VisionTransformer.norm, head
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ViTConfig

# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Cut the image into P x P patches and project each linearly to D dimensions (Eq. 1, x_p E).

    A convolution with kernel and stride P is exactly a linear map E applied to every flattened
    patch, and faster than unfolding the patches first.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order


class Attention(nn.Module):
    """Multi-head self-attention, MSA in Eq. 2 (paper appendix A, Eqs. 5-8).

    q, k and v come from one fused linear layer (`qkv`, rows ordered q; k; v as in timm and
    torchvision). The normal path calls `F.scaled_dot_product_attention`, which never
    materialises the attention matrix. With `return_attention=True` the same mathematics runs
    explicitly, softmax(q k^T / sqrt(d)) (Eq. 6), so the weights can be returned.
    """

    def __init__(
        self, dim: int, num_heads: int = 12, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        # Split on the q/k/v axis first, then move the heads forward: backward then stacks the
        # three gradients straight into qkv's own layout, one copy fewer per layer than timm's
        # permute-then-split (1.5% faster training steps, benchmarks/bench.py train).
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (B, heads, N, head_dim)
        dropout_p = self.attn_drop if self.training else 0.0
        if return_attention:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # Eq. 6
            x = F.dropout(attn, dropout_p, self.training) @ v
        else:
            attn = None
            if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
                # Under CPU bf16 autocast only the linear layers gain (AMX matrix units); PyTorch's
                # CPU attention kernel is slow in bf16 for small heads (its backward took 9x the fp32
                # time at head_dim 16), so attention itself runs in fp32.
                with torch.autocast("cpu", enabled=False):
                    x = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p)
            else:
                x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        x = x.transpose(1, 2).reshape(B, N, C)  # concatenate the heads (Eq. 8)
        return self.proj_drop(self.proj(x)), attn


class Mlp(nn.Module):
    """The MLP of Eq. 3: two dense layers with a GELU between them (exact GELU, as timm,
    torchvision and Hugging Face use; the JAX reference's tanh form differs by about 1e-3)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016): in training, skip a sample's residual branch with
    probability `p` and scale the kept ones by 1 / (1 - p). Identity at inference."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """One pre-norm Transformer encoder layer: Eq. 2 then Eq. 3.

    Each residual adds to the stream it came from: the MLP sees LN(x) of the stream *after*
    the attention residual, and its output is added to that same stream (not to `x + y`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim, drop=drop)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        y, attn = self.attn(self.norm1(x), return_attention)
        x = x + self.drop_path1(y)  # Eq. 2
        x = x + self.drop_path2(self.mlp(self.norm2(x)))  # Eq. 3
        return x, attn


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class VisionTransformer(nn.Module):
    """ViT: patch embedding, class token, learned 1-D position embeddings, L pre-norm encoder
    blocks, final LayerNorm and a linear head on the class token.

    Build it from a `ViTConfig` (defaults are ViT-B/16), optionally overriding fields:
    `VisionTransformer(config, depth=6)`. `model.config` always describes the model exactly.

    `model(x)` returns logits (B, num_classes); `model(x, return_attention=True)` returns
    `(logits, attentions)`, a list of one (B, heads, N+1, N+1) tensor per layer, post-softmax.
    """

    def __init__(self, config: ViTConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        config = config or ViTConfig()
        if overrides:
            config = config.replace(**overrides)
        self.config = config
        dim = config.embed_dim

        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))  # x_class
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, dim))  # E_pos
        self.pos_drop = nn.Dropout(config.drop_rate)
        # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last.
        rates = torch.linspace(0, config.drop_path_rate, config.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(
                dim,
                config.num_heads,
                config.mlp_dim,
                qkv_bias=config.qkv_bias,
                drop=config.drop_rate,
                attn_drop=config.attn_drop_rate,
                drop_path=rate,
                norm_eps=config.norm_eps,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.head_drop = nn.Dropout(config.drop_rate)
        self.head = nn.Linear(dim, config.num_classes) if config.num_classes > 0 else nn.Identity()
        init_weights(self)

    # -- forward ---------------------------------------------------------------------------

    def forward_features(self, x: Tensor, return_attention: bool = False) -> tuple[Tensor, list[Tensor]]:
        """All tokens after the final LayerNorm, (B, N+1, D), and the attention maps if asked."""
        if x.ndim != 4 or tuple(x.shape[-3:]) != (self.config.in_chans, *self.config.image_size):
            raise ValueError(
                f"expected input of shape (batch, {self.config.in_chans}, {self.config.image_size[0]}, "
                f"{self.config.image_size[1]}), got {tuple(x.shape)}; "
                "call model.set_image_size(...) to run at another resolution"
            )
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = self.pos_drop(torch.cat([cls, x], dim=1) + self.pos_embed)  # Eq. 1
        attentions = []
        for block in self.blocks:
            x, attn = block(x, return_attention)
            if return_attention:
                attentions.append(attn)
        return self.norm(x), attentions  # LN of Eq. 4 (applied to all tokens; the head reads z_L^0)

    def forward_head(self, tokens: Tensor) -> Tensor:
        """Eq. 4: the head reads the class token y = LN(z_L^0)."""
        return self.head(self.head_drop(tokens[:, 0]))

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        tokens, attentions = self.forward_features(x, return_attention)
        logits = self.forward_head(tokens)
        return (logits, attentions) if return_attention else logits

    # -- changing the model's shape ------------------------------------------------------------

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a new, freshly initialised one (for fine-tuning)."""
        self.config = self.config.replace(num_classes=num_classes)
        ref = self.norm.weight
        self.head = nn.Linear(self.config.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head.to(device=ref.device, dtype=ref.dtype)
        _init_linear(self.head)

    def set_image_size(self, image_size: int | tuple[int, int]) -> None:
        """Run at another resolution: resample the position embeddings to the new patch grid
        (see `resample_pos_embed`), as the paper does for fine-tuning at 384 px."""
        new = self.config.replace(image_size=image_size)
        if new.grid_size != self.config.grid_size:
            resampled = resample_pos_embed(self.pos_embed.data, new.grid_size, self.config.grid_size)
            self.pos_embed = nn.Parameter(resampled)
        self.config = new


# ---------------------------------------------------------------------------------------------
# Weight initialisation
# ---------------------------------------------------------------------------------------------


def _trunc_normal(tensor: Tensor, std: float) -> None:
    # Cut at two standard deviations, as JAX's truncated_normal does. (torch's a/b bounds are
    # absolute values, so the common `trunc_normal_(w, std=.02)` is not truncated at all.)
    nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        _trunc_normal(module.weight, std=0.02)
        if module.bias is not None:  # qkv has none with qkv_bias=False
            nn.init.zeros_(module.bias)


@torch.no_grad()
def init_weights(model: VisionTransformer) -> None:
    """Initialise from pieces of the reference implementations, matching none of them exactly:
    truncated normal std 0.02 for every linear layer (the head included) and the position
    embeddings, and N(0, 1e-6) for the class token, as timm's default scheme does; LeCun normal
    (truncated, std sqrt(1 / fan_in)) for the patch projection, as torchvision and the JAX code do
    (timm keeps PyTorch's default there); zero biases and unit LayerNorms. torchvision and the JAX
    code also use Xavier for the MLP and a zero head. Never N(0, 1): embeddings that large swamp
    the patch signal at the start of training."""
    _trunc_normal(model.pos_embed, std=0.02)
    nn.init.normal_(model.cls_token, std=1e-6)
    proj = model.patch_embed.proj
    fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    _trunc_normal(proj.weight, std=math.sqrt(1.0 / fan_in))
    nn.init.zeros_(proj.bias)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            _init_linear(module)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------
# Position-embedding resampling
# ---------------------------------------------------------------------------------------------


def resample_pos_embed(
    pos_embed: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None, num_prefix_tokens: int = 1
) -> Tensor:
    """Resample learned position embeddings (1, prefix + old_h*old_w, D) to a new patch grid.

    The class token's embedding is kept as it is; the patch embeddings are reshaped to their 2-D
    grid, interpolated bicubically and flattened back: the 2-D interpolation of the paper's
    section 3.2. Settings are timm's (align_corners=False, antialias=True, which in PyTorch also
    selects the PIL-style bicubic kernel when enlarging), so checkpoints resampled by timm and
    by vitdemo agree; torchvision uses align_corners=True without antialias, which gives
    slightly different values.
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if old_grid is None:
        side = math.isqrt(patches.shape[1])
        if side * side != patches.shape[1]:
            raise ValueError(f"cannot infer a square grid from {patches.shape[1]} position embeddings")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != patches.shape[1]:
        raise ValueError(f"old grid {old_grid} does not match {patches.shape[1]} position embeddings")
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed.clone()
    dim = patches.shape[-1]
    grid = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=True)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)
