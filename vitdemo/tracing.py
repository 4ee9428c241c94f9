"""Everything one forward pass of a ViT computes, kept for inspection: `trace(model, images)`.

The names follow the paper's equations (Dosovitskiy et al., 2020, section 3.1):

    Eq. 1  z_0  = [x_class; x_p^1 E; ...; x_p^N E] + E_pos     patches, embedded, tokens
    Eq. 2  z'_l = MSA(LN(z_{l-1})) + z_{l-1}                   BlockTrace.ln1 ... attn_out, mid
    Eq. 3  z_l  = MLP(LN(z'_l)) + z'_l                         BlockTrace.ln2 ... mlp_out, hidden
    Eq. 4  y    = LN(z_L^0)                                    logits (and layer_logits per layer)

Nothing is recomputed: the model runs once, its own `forward(x, return_attention=True)`, and
forward hooks on its own modules record their inputs and outputs, so a trace cannot drift from
the model. The two values no module returns are derived from recorded tensors only: q, k, v
(the fused `qkv` output, split the way `Attention.forward` splits it) and the pre-softmax scores.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class BlockTrace:
    """The internals of one encoder block, model.blocks[i], mapping z_{i} to z_{i+1} (paper layer i+1).

    ln1 (B, N+1, D): LN(z_{l-1}).  q, k, v (B, heads, N+1, head_dim): the rows q; k; v of `qkv`.
    scores (B, heads, N+1, N+1): q k^T / sqrt(head_dim), before the softmax (Eq. 5).
    mixed (B, N+1, D): attention @ v, heads concatenated, before `proj`.  attn_out: MSA(LN(z_{l-1})).
    mid: z'_l of Eq. 2.  ln2: LN(z'_l).  mlp_hidden (B, N+1, mlp_dim): after the GELU.  mlp_out: MLP(LN(z'_l)).
    """

    ln1: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    scores: Tensor
    mixed: Tensor
    attn_out: Tensor
    mid: Tensor
    ln2: Tensor
    mlp_hidden: Tensor
    mlp_out: Tensor


@dataclass(frozen=True)
class Trace:
    """One forward pass, in eval mode. B images, N patches, D width, L layers.

    patches (B, N, C*P*P): x_p, raster order, each flattened channel-major then row then column,
        the layout of the projection's weight (`patches @ proj.weight.view(D, -1).T + proj.bias == embedded`).
    embedded (B, N, D): x_p E.  tokens (B, N+1, D): z_0 of Eq. 1 (class token first, plus E_pos).
    hidden: L+1 tensors (B, N+1, D), z_0 ... z_L.  attention: L tensors (B, heads, N+1, N+1), post-softmax.
    logits (B, classes): the model's output.  layer_logits (B, L, classes): the "logit lens",
        head(norm(z_l^0)) for l = 1 ... L; the last is `logits`.
    blocks: {i: BlockTrace} for the layers asked with `internals` (i indexes model.blocks); empty by default.
    grid_size: (rows, columns) of patches, to lay N back out as an image.
    """

    patches: Tensor
    embedded: Tensor
    tokens: Tensor
    hidden: list[Tensor]
    attention: list[Tensor]
    logits: Tensor
    layer_logits: Tensor
    grid_size: tuple[int, int]
    blocks: dict[int, BlockTrace] = field(default_factory=dict)


def _layers(internals: bool | Sequence[int], depth: int) -> list[int]:
    """The block indices asked for, negatives counted from the end as in Python."""
    if isinstance(internals, bool):
        return list(range(depth)) if internals else []
    layers = []
    for i in internals:
        if isinstance(i, bool) or not isinstance(i, int) or not -depth <= i < depth:
            raise ValueError(f"internals: layer {i!r} is not a block index of a {depth}-layer model")
        layers.append(i % depth)
    return sorted(set(layers))


def trace(model: nn.Module, images: Tensor, *, internals: bool | Sequence[int] = False) -> Trace:
    """Run `model` (a `VisionTransformer`) once on a normalised batch `images` (B, C, H, W), exactly
    as the model takes it, and return a `Trace`. `internals`: True for every block's `BlockTrace`,
    or a sequence of block indices (0 is the first block; memory grows with how many are asked).

    Runs in eval mode under no_grad; every module's training flag is restored afterwards.
    """
    layers = _layers(internals, len(model.blocks))
    seen: dict[str, Tensor] = {}
    hooks = []
    # The hooks sit on the model itself, which a server shares between threads: a forward pass
    # that another thread runs meanwhile (another user, another tab) must not be recorded here.
    owner = threading.get_ident()

    def record(module: nn.Module, name: str, take: Callable[[tuple, object], Tensor]) -> None:
        def hook(_: nn.Module, inputs: tuple, output: object) -> None:
            if threading.get_ident() == owner:
                seen[name] = take(inputs, output)

        hooks.append(module.register_forward_hook(hook))

    def out(inputs: tuple, output: object) -> Tensor:
        return output

    record(model.patch_embed, "embedded", out)
    record(model.pos_drop, "tokens", out)  # z_0 as the blocks receive it
    for i in layers:
        block = model.blocks[i]
        record(block.norm1, f"{i}.ln1", out)
        record(block.attn.qkv, f"{i}.qkv", out)
        record(block.attn.proj, f"{i}.mixed", lambda inputs, _: inputs[0])
        record(block.attn, f"{i}.attn_out", lambda _, output: output[0])  # after proj_drop, what Eq. 2 adds
        record(block.norm2, f"{i}.mid", lambda inputs, _: inputs[0])  # z'_l enters norm2 and nothing else
        record(block.norm2, f"{i}.ln2", out)
        record(block.mlp.act, f"{i}.mlp_hidden", out)
        record(block.mlp, f"{i}.mlp_out", out)
    z: list[Tensor] = []  # z_1 ... z_L, in the order the blocks run

    def block_output(_: nn.Module, __: tuple, output: tuple) -> None:
        if threading.get_ident() == owner:
            z.append(output[0])

    hooks += [block.register_forward_hook(block_output) for block in model.blocks]

    # model.train(flag) would set every submodule alike; restore each one's own flag instead.
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            try:
                logits, attention = model(images, return_attention=True)
            finally:
                for hook in hooks:  # gone before the logit lens below calls model.norm again
                    hook.remove()
            hidden = [seen["tokens"], *z]
            # Eq. 4 applied to the class token of every z_l, not just z_L.
            layer_logits = model.head(model.norm(torch.stack([h[:, 0] for h in hidden[1:]], dim=1)))
            P = model.patch_embed.patch_size
            # unfold's (B, C*P*P, N) is channel-major, then row, then column: the Conv2d weight's order.
            patches = F.unfold(images, kernel_size=P, stride=P).transpose(1, 2)
            blocks = {i: _block_trace(model.blocks[i].attn, seen, i) for i in layers}
    finally:
        for module, flag in flags:
            module.training = flag
    grid = (images.shape[-2] // P, images.shape[-1] // P)
    return Trace(patches, seen["embedded"], seen["tokens"], hidden, list(attention), logits, layer_logits, grid, blocks)


def _block_trace(attn: nn.Module, seen: dict[str, Tensor], i: int) -> BlockTrace:
    qkv = seen[f"{i}.qkv"]
    B, N, _ = qkv.shape
    # The same split as Attention.forward: (B, N, 3, heads, head_dim), q; k; v, heads moved forward.
    q, k, v = (t.transpose(1, 2) for t in qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).unbind(2))
    # Attention.forward scales q before the product; doing the same keeps softmax(scores) bit-equal.
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    names = ("ln1", "mixed", "attn_out", "mid", "ln2", "mlp_hidden", "mlp_out")
    return BlockTrace(q=q, k=k, v=v, scores=scores, **{n: seen[f"{i}.{n}"] for n in names})


__all__ = ["BlockTrace", "Trace", "trace"]
