"""Model configuration: one dataclass that fully describes a ViT, and the named presets.

A `ViTConfig` is the single source of truth for a model's shape. It is stored inside every
checkpoint (see `vitdemo.checkpoint`) so a model can always be rebuilt exactly.

Sizes follow Table 1 of Dosovitskiy et al. (2020), "An Image is Worth 16x16 Words"
(Base, Large, Huge), plus Tiny and Small from DeiT (Touvron et al., 2021).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if is_int(value):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(is_int(v) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"image_size must be an int or a pair of ints (height, width), got {value!r}")


@dataclass(frozen=True)
class ViTConfig:
    """Every hyper-parameter of a Vision Transformer.

    Names follow the paper: `patch_size` is P, `embed_dim` is the width D, `depth` the number of
    layers L, `mlp_dim` the hidden size of the MLP ("MLP size" in Table 1).
    """

    image_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = True
    drop_rate: float = 0.0  # dropout after the embeddings and after every dense layer but qkv
    attn_drop_rate: float = 0.0  # dropout on the attention weights
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly to this value with depth
    norm_eps: float = 1e-6  # the JAX reference, timm and torchvision all use 1e-6

    def __post_init__(self) -> None:
        # Normalise image_size so (224, 224), [224, 224] and 224 give equal configs.
        object.__setattr__(self, "image_size", _pair(self.image_size))
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the bad value and the rule it breaks."""
        for name in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 0:
            raise ValueError(
                f"num_classes must be a non-negative integer (0 means no head), got {self.num_classes!r}"
            )
        for side in self.image_size:
            if side <= 0:
                raise ValueError(f"image_size must be positive, got {self.image_size}")
            if side % self.patch_size:
                raise ValueError(
                    f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}"
                )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}"
            )
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if not isinstance(self.norm_eps, (int, float)) or self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches along height and width."""
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        """N = HW / P^2 in the paper."""
        return self.grid_size[0] * self.grid_size[1]

    def replace(self, **changes: Any) -> "ViTConfig":
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(
                f"unknown hyper-parameter(s) {sorted(unknown)}; known: "
                f"{[f.name for f in dataclasses.fields(self)]}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ViTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown hyper-parameter(s) in config: {sorted(unknown)}")
        return cls(**d)


def _preset(image_size: int, patch: int, dim: int, depth: int, heads: int, mlp: int) -> ViTConfig:
    return ViTConfig(
        image_size=image_size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, mlp_dim=mlp
    )


# name -> config. Ti and S are DeiT's; B, L, H are the paper's Table 1.
PRESETS: dict[str, ViTConfig] = {
    "vit_ti_16": _preset(224, 16, 192, 12, 3, 768),
    "vit_s_16": _preset(224, 16, 384, 12, 6, 1536),
    "vit_b_16": _preset(224, 16, 768, 12, 12, 3072),
    "vit_b_32": _preset(224, 32, 768, 12, 12, 3072),
    "vit_l_16": _preset(224, 16, 1024, 24, 16, 4096),
    "vit_l_32": _preset(224, 32, 1024, 24, 16, 4096),
    "vit_h_14": _preset(224, 14, 1280, 32, 16, 5120),
    # For 32 px images such as CIFAR-10: patch 4 gives an 8x8 grid (64 tokens + class token),
    # the small patches that from-scratch ViTs on CIFAR-10 use (e.g. "Vision Transformer for
    # Small-Size Datasets", Lee et al., 2021: width 192, patch 4): width 192, 7 layers, 6 heads of
    # 32, MLP ratio 2; 2,103,562 parameters with 10 classes. The shipped checkpoint uses it.
    "vit_cifar_4": dataclasses.replace(_preset(32, 4, 192, 7, 6, 384), num_classes=10),
    # Lee, Lee and Song's plain-ViT baseline for CIFAR (93.6% with the "small-vit" recipe, 300
    # passes over 50,000 images): width 192, 9 layers, 12 heads of 16, MLP ratio 2, patch 4;
    # 2,697,610 parameters with 10 classes.
    "vit_cifar_9": dataclasses.replace(_preset(32, 4, 192, 9, 12, 384), num_classes=10),
}

DEFAULT_PRESET = "vit_b_16"


def list_presets() -> list[str]:
    return list(PRESETS)


def get_config(name: str = DEFAULT_PRESET, **overrides: Any) -> ViTConfig:
    """The preset `name` with any hyper-parameter overridden, e.g. `get_config("vit_s_16", depth=6)`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {list_presets()}")
    return PRESETS[name].replace(**overrides)


__all__ = ["ViTConfig", "PRESETS", "DEFAULT_PRESET", "list_presets", "get_config"]
