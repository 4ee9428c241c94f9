"""Map the state dicts of other ViT implementations onto vitdemo's parameter names.

vitdemo uses timm's names, so `"timm"` only checks the keys. `"torchvision"` and `"hf"`
(Hugging Face `ViTModel` / `ViTForImageClassification`, both the hub-file names of
transformers 4.x and the in-memory names of 5.x) are renamed, and Hugging Face's separate
query, key and value projections are concatenated into one `qkv` (rows q; k; v).

A checkpoint without a classification head (a backbone, e.g. timm with num_classes=0) converts
to a dict without `head.*`; load it with `strict=False` or after `reset_classifier`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

SOURCES = ("timm", "torchvision", "hf")

# Parameters every block must have, in vitdemo (= timm) names.
_BLOCK_KEYS = tuple(
    f"{layer}.{kind}"
    for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    for kind in ("weight", "bias")
)
_TOP_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias")
_HEAD_KEYS = ("head.weight", "head.bias")

# (pattern on the peer's key, replacement in vitdemo's names), tried in order; \1 is a layer index.
_RENAMES: dict[str, list[tuple[str, str]]] = {
    "timm": [
        (r"(cls_token|pos_embed|patch_embed\.proj\.(?:weight|bias)|norm\.(?:weight|bias)|head\.(?:weight|bias))", r"\1"),
        (
            r"blocks\.(\d+)\.((?:norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(?:weight|bias))",
            r"blocks.\1.\2",
        ),
    ],
    "torchvision": [
        (r"class_token", "cls_token"),
        (r"encoder\.pos_embedding", "pos_embed"),
        (r"conv_proj\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"encoder\.ln\.(weight|bias)", r"norm.\1"),
        (r"heads\.head\.(weight|bias)", r"head.\1"),
        (r"encoder\.layers\.encoder_layer_(\d+)\.ln_1\.(weight|bias)", r"blocks.\1.norm1.\2"),
        (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
        (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
        (r"encoder\.layers\.encoder_layer_(\d+)\.ln_2\.(weight|bias)", r"blocks.\1.norm2.\2"),
        (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:0|linear_1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
        (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:3|linear_2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    ],
    # Layer prefix: "vit.encoder.layer.N." in 4.x hub files, "vit.layers.N." in 5.x memory.
    "hf": [
        (r"(?:vit\.)?embeddings\.cls_token", "cls_token"),
        (r"(?:vit\.)?embeddings\.position_embeddings", "pos_embed"),
        (r"(?:vit\.)?embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"(?:vit\.)?layernorm\.(weight|bias)", r"norm.\1"),
        (r"classifier\.(weight|bias)", r"head.\1"),
        (r"{L}\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
        (r"{L}\.attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)", r"qkv:\1:\2:\3"),
        (r"{L}\.attention\.(?:output\.dense|o_proj)\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
        (r"{L}\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
        (r"{L}\.(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
        (r"{L}\.(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    ],
}
_HF_LAYER = r"(?:vit\.)?(?:encoder\.layer|layers)\.(\d+)"
_QKV_ORDER = {"query": 0, "key": 1, "value": 2, "q_proj": 0, "k_proj": 1, "v_proj": 2}


def _compile(source: str) -> list[tuple[re.Pattern[str], str]]:
    return [(re.compile(p.replace("{L}", _HF_LAYER)), r) for p, r in _RENAMES[source]]


def convert_state_dict(state_dict: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Return `state_dict` (from `source`: "timm", "torchvision" or "hf") with vitdemo's names.

    Raises `ValueError` naming every key it does not recognise and every key a complete ViT
    needs that is missing. A leading "module." (from DataParallel/DDP) is removed.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {SOURCES}")
    rules = _compile(source)
    out: dict[str, Tensor] = {}
    qkv_parts: dict[tuple[str, str], dict[int, Tensor]] = {}
    unexpected = []
    for key, value in state_dict.items():
        name = key.removeprefix("module.")
        for pattern, repl in rules:
            match = pattern.fullmatch(name)
            if match:
                new = match.expand(repl)
                break
        else:
            unexpected.append(key)
            continue
        if new.startswith("qkv:"):  # Hugging Face: one of query/key/value, joined below
            _, layer, which, kind = new.split(":")
            qkv_parts.setdefault((layer, kind), {})[_QKV_ORDER[which]] = value
        else:
            out[new] = value
    if unexpected:
        raise ValueError(f"unexpected keys for source {source!r}: {unexpected}")

    for (layer, kind), parts in sorted(qkv_parts.items()):
        if len(parts) != 3:
            names = [n for n, i in (("query", 0), ("key", 1), ("value", 2)) if i not in parts]
            raise ValueError(f"missing keys: layer {layer} attention {kind} of {names}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)

    missing = _missing_keys(out)
    if missing:
        raise ValueError(f"missing keys after converting from {source!r}: {missing}")
    return out


def _missing_keys(converted: Mapping[str, Tensor]) -> list[str]:
    """Keys a complete ViT needs but `converted` lacks. The head may be absent as a whole."""
    layers = {int(m.group(1)) for k in converted if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(layers) + 1 if layers else 0
    needed = list(_TOP_KEYS) + [f"blocks.{i}.{k}" for i in range(depth) for k in _BLOCK_KEYS]
    if depth == 0:
        needed.append("blocks.0.*")
    if any(k in converted for k in _HEAD_KEYS):
        needed += _HEAD_KEYS
    return [k for k in needed if k not in converted]


def load_weights(model: torch.nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Load converted weights into `model` (vitdemo names), adapting what fine-tuning changes:

    - position embeddings for another patch grid are resampled in 2-D to the model's grid
      (the paper's section 3.2, see `resample_pos_embed`);
    - a head of another size (or none) is skipped, so the model keeps its fresh head.

    Everything else must match exactly. Returns notes on what was adapted.
    """
    from .model import resample_pos_embed

    state = dict(state_dict)
    target = model.state_dict()
    notes = []
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != target["pos_embed"].shape:
        old = pos.shape[1] - 1
        side = int(old**0.5)
        old_grid = (side, side) if side * side == old else None
        if old_grid is None:
            raise ValueError(f"cannot resample {old} position embeddings: not a square grid")
        state["pos_embed"] = resample_pos_embed(pos, model.config.grid_size, old_grid)
        notes.append(f"position embeddings resampled from {old_grid[0]}x{old_grid[1]} to "
                     f"{model.config.grid_size[0]}x{model.config.grid_size[1]}")
    head = [k for k in ("head.weight", "head.bias") if k in state]
    if head and any(k not in target or state[k].shape != target[k].shape for k in head):
        for k in head:
            del state[k]
        notes.append("head skipped (different number of classes): the model keeps its new head")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
    if not head and "head.weight" in target:
        notes.append("no head in the weights: the model keeps its new head")
    return notes
