"""The Inside the model tab: the app's image followed through Eqs. 1-4 of the paper with the real
tensors of one forward pass (`vitdemo.trace`): a picked patch becomes a token, one layer's
attention and MLP act on a chosen token, the residual stream through the depth, and the class
token becomes the answer (the same top 5 as the Classify tab), layer by layer (the logit lens).

Three handlers, so that a control redraws only what it changes: `embedding_step` (the patch:
Eq. 1), `block_step` (a layer, head and token: Eqs. 2, 3 and 5) and `output_step` (Eq. 4). They
share one trace per image and model, kept with the model (`_traced`); `inside` runs all three
(the page's image and model changes, and the public API).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import gradio as gr
import torch
from PIL import Image

from .. import explanations as ex
from .. import figures as FG
from .. import visualize as vz
from .. import walkthrough as WT
from ..tracing import Trace, trace
from . import models
from .common import LATEX, if_image, picture, to_rgb, user_errors
from .inputs import choice, keep_views, number_in, numeric_slider, one_of
from .models import SHIPPED, Entry

FOLLOW_PATCH = "the picked patch"
FOLLOW_CLS = "the class token"
PICK_SIZE = 320  # pixels of the clickable patch grid
TILE = 200  # pixels of each attention picture
TRACES_KEPT = 2  # traces kept per model (a ViT-B/16 trace with every block's internals is about 80 MB)
TOP = 5
_LOCK = threading.Lock()

READ_PICK = "Click a patch to follow it (its token number in the corner), or use the sliders."
READ_EMBEDDING = (
    r"**Eq. 1**, $z_0 = [x_\text{class};\, x_p^1 E;\, \dots;\, x_p^N E] + E_{pos}$: *\"we reshape the image into a "
    r"sequence of flattened 2D patches ... and map to D dimensions with a trainable linear projection\"* $E$; "
    r"*\"position embeddings are added to the patch embeddings to retain positional information.\"* Each strip is "
    r"one vector: one cell per number, red positive, blue negative, white 0, on the strip's own scale (its largest "
    r"$|x|$ in full colour).")
READ_FILTERS = (r"$E$'s first principal components, each a $P \times P$ colour picture (the paper's Fig. 7, left): "
                r"the patterns $E$ responds to. A trained model's look like smooth blobs and stripes, a new model's "
                r"like noise.")
READ_TOKENS = (r"$z_0$: all $N + 1$ tokens the encoder reads, one row each (row 0 the class token "
               r"$x_\text{class}$; the picked patch's token outlined in green), on one colour scale.")
READ_SCORES = (r"Left: the followed token's query $q$ against every patch's key $k$, the scores "
               r"$q \cdot k / \sqrt{D_h}$ (red high, blue low); middle: after the softmax over all $N + 1$ tokens "
               r"(bright: a large weight); right: those weights over the image. The picked patch is outlined.")
READ_BLOCK = (
    r"**Eq. 2**, $z'_\ell = \mathrm{MSA}(\mathrm{LN}(z_{\ell-1})) + z_{\ell-1}$, and **Eq. 3**, "
    r"$z_\ell = \mathrm{MLP}(\mathrm{LN}(z'_\ell)) + z'_\ell$: *\"Layernorm (LN) is applied before every block, and "
    r"residual connections after every block. The MLP contains two layers with a GELU non-linearity.\"* In the "
    r"attention (the paper's Eq. 5), $A = \mathrm{softmax}(q k^\top / \sqrt{D_h})$ and each token receives $A v$, "
    r"the weighted sum of every token's value $v$, per head; the heads' outputs are concatenated and projected.")
READ_DEPTH = (r"Each block adds its attention and MLP outputs to the residual stream: each token's norm "
              r"$|z_\ell|$ after each layer (green lines: the followed token and the layer shown).")
READ_OUTPUT = (
    r"**Eq. 4**, $y = \mathrm{LN}(z_L^0)$: *\"we prepend a learnable embedding to the sequence of embedded patches, "
    r"whose state at the output of the Transformer encoder serves as the image representation y\"*; the head, one "
    r"linear layer here, turns $y$ into one score (logit) per class, and the softmax into probabilities. The logit "
    r"lens (nostalgebraist 2020) reads the class token through that same LN and head after every layer: when does "
    r"the answer form?")


# ---------------------------------------------------------------------------------------------
# One trace per image and model
# ---------------------------------------------------------------------------------------------


def _traced(picked: Entry, x: torch.Tensor) -> Trace:
    """The trace of `x` through the picked model with every block's internals, computed once and
    kept with the model (the last `TRACES_KEPT` images): moving a slider runs no forward pass."""
    key = hashlib.blake2b(x.numpy().tobytes(), digest_size=16).hexdigest()
    with _LOCK:
        kept = picked.views.setdefault("traces", OrderedDict())
        if key in kept:
            kept.move_to_end(key)
            return kept[key]
        found = trace(picked.model, x, internals=True)
        kept[key] = found
        while len(kept) > TRACES_KEPT:
            kept.popitem(last=False)
        return found


def _start(image: Any, model_name: str | None) -> tuple[Image.Image, Entry, Trace]:
    rgb = to_rgb(image)
    picked = models.entry(model_name)
    return rgb, picked, _traced(picked, models.model_input(rgb, picked.meta))


def _patch(picked: Entry, row: Any, col: Any) -> tuple[int, int]:
    """(row, col), 1-based from the page, checked against the model's grid, as 0-based."""
    gh, gw = picked.model.config.grid_size
    r = number_in(row, 1, gh, "Patch row", whole=True, why=f"this model's grid has {gh} rows")
    c = number_in(col, 1, gw, "Patch column", whole=True, why=f"this model's grid has {gw} columns")
    return r - 1, c - 1


def _numbers(values: torch.Tensor, first: int = 8) -> str:
    shown = ", ".join(f"{v:.2f}" for v in values[:first].tolist())
    return f"{shown}{', ...' if values.numel() > first else ''}"


def _top(values: torch.Tensor, k: int, gw: int) -> str:
    """The `k` largest attention weights of a row over the N+1 tokens, by place."""
    best = values.topk(min(k, values.numel()))
    where = ["the class token" if i == 0 else f"patch ({(i - 1) // gw + 1}, {(i - 1) % gw + 1})"
             for i in best.indices.tolist()]
    return ", ".join(f"{w} {p:.2f}" for w, p in zip(where, best.values.tolist()))


# ---------------------------------------------------------------------------------------------
# Step 1, Eq. 1: a patch becomes a token
# ---------------------------------------------------------------------------------------------


def _filters(picked: Entry) -> Image.Image:
    if "filters" not in picked.views:
        fig = vz.plot_patch_embedding_components(ex.patch_embedding_components(picked.model, 28))
        picked.views["filters"] = vz.figure_to_image(fig, dpi=80)
    return picked.views["filters"]


def patch_at(x: float, y: float, grid_size: tuple[int, int], size: tuple[int, int] = (PICK_SIZE, PICK_SIZE)) -> tuple[int, int]:
    """The 1-based (row, column) of the patch under pixel (x, y) of the clickable grid."""
    gh, gw = grid_size
    w, h = size
    return min(int(y * gh / h), gh - 1) + 1, min(int(x * gw / w), gw - 1) + 1


@user_errors
def embedding_step(image: Any, model_name: str = SHIPPED, row: int = 1, col: int = 1
                   ) -> tuple[Image.Image, Image.Image, Image.Image, Image.Image, str]:
    """Eq. 1 for the patch at (row, col) (1-based): the clickable patch grid with it outlined, its
    vectors (pixels x_p, x_p E, E_pos, z_0), the N+1 tokens of z_0, E's principal components
    (Fig. 7, left), and the numbers in words."""
    rgb, picked, t = _start(image, model_name)
    config = picked.model.config
    (r, c), (gh, gw), p = _patch(picked, row, col), config.grid_size, config.patch_size
    token = 1 + r * gw + c
    grid = FG.numbered_patch_grid(rgb, p, config.image_size[0], **models.crop_of(picked.meta))
    pick = FG.outline_cell(grid.resize((PICK_SIZE, PICK_SIZE * grid.size[1] // grid.size[0]), Image.Resampling.NEAREST),
                           (r, c), (gh, gw), colour=(0, 200, 0))
    pixels, embedded, z0 = t.patches[0, token - 1], t.embedded[0, token - 1], t.tokens[0, token]
    position = picked.model.pos_embed[0, token].detach()
    vectors = WT.vector_stack([
        (f"x_p, the patch's pixels ({config.in_chans}x{p}x{p}, R then G then B)", pixels),
        ("x_p E, projected by E", embedded),
        (f"E_pos[{token}], its position embedding", position),
        (f"z_0[{token}] = x_p E + E_pos, the token", z0),
    ])
    tokens = WT.token_matrix(t.tokens[0], highlight=token)
    d, n = config.embed_dim, gh * gw
    text = (f"**Patch (row {r + 1}, column {c + 1}) is token {token}** of {n + 1}. Its ${p} \\times {p}$ pixels "
            f"in {config.in_chans} channels are **{pixels.numel()} numbers** $x_p$ (normalised with the model's "
            f"mean and std): {_numbers(pixels)}. $E$, a ${pixels.numel()} \\times {d}$ matrix, maps them to "
            f"**$D = {d}$ numbers** ({_numbers(embedded, 5)}); adding $E_{{pos}}[{token}]$ gives the token "
            f"$z_0[{token}]$, of norm {float(z0.norm()):.2f}. With the class token in front, $z_0$ is "
            f"**${n + 1} \\times {d}$**.")
    return pick, vectors, tokens, _filters(picked), text


# ---------------------------------------------------------------------------------------------
# Step 2, Eqs. 2, 3 and 5: one layer acts on one token
# ---------------------------------------------------------------------------------------------


def _norms(picked: Entry, t: Trace) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """The residual-norm chart of this trace, drawn once (a chart costs more than the rest of a step)."""
    found = picked.views.get("norm_chart")
    if found is None or found[0] is not t:  # one image's chart at a time, per model
        found = (t, WT.residual_norms([z[0] for z in t.hidden]))
        picked.views["norm_chart"] = found
    return found[1]


def _labelled(image: Image.Image, label: str) -> Image.Image:
    return FG.tile_grid([image], [label], 1)


@user_errors
def block_step(image: Any, model_name: str = SHIPPED, row: int = 1, col: int = 1, follow: str = FOLLOW_PATCH,
               layer: int = 1, head: int = 1) -> tuple[Image.Image, Image.Image, Image.Image, Image.Image, Image.Image, str]:
    """Layer `layer` (1-based) for the followed token (the picked patch's or the class token) and
    head `head`: its scores over the patches, their softmax, that softmax over the image, the
    token's vectors through the block (z_{l-1}, LN, q, k, v, the weighted sum, MSA, z'_l, LN, the
    MLP's GELU, MLP, z_l), the residual norms, and the numbers in words."""
    rgb, picked, t = _start(image, model_name)
    config = picked.model.config
    (r, c), (gh, gw) = _patch(picked, row, col), config.grid_size
    follow = one_of(follow or FOLLOW_PATCH, [FOLLOW_PATCH, FOLLOW_CLS], "The token to follow")
    depth, heads = config.depth, config.num_heads
    i = number_in(layer, 1, depth, "Layer", whole=True, why=f"this model has {depth} layers") - 1
    h = number_in(head, 1, heads, "Head", whole=True, why=f"this model has {heads} heads") - 1
    token = 0 if follow == FOLLOW_CLS else 1 + r * gw + c
    who = "the class token" if token == 0 else f"token {token} (patch {r + 1}, {c + 1})"
    b, dh = t.blocks[i], config.embed_dim // heads
    scores, weights = b.scores[0, h, token], t.attention[i][0, h, token]

    view = FG.model_view(rgb, config.image_size[0], **models.crop_of(picked.meta)).resize((TILE, TILE))
    cell = None if token == 0 else (r, c)

    def on_grid(values: torch.Tensor, cmap: str, **scale: float) -> Image.Image:
        tile = vz.heatmap(values[1:].reshape(gh, gw), size=TILE, cmap=cmap, **scale)
        return FG.outline_cell(tile, cell, (gh, gw), colour=(0, 200, 0)) if cell else tile

    spread = float(scores[1:].abs().max()) or 1.0
    lit = weights[1:] / weights[1:].max().clamp_min(1e-12)
    over = vz.overlay(view, lit.reshape(gh, gw), alpha=0.6)
    if cell:
        over = FG.outline_cell(over, cell, (gh, gw), colour=(0, 200, 0))
    attention = [_labelled(on_grid(scores, WT.SIGNED, vmin=-spread, vmax=spread), "scores q.k/sqrt(D_h)"),
                 _labelled(on_grid(weights, "inferno", vmin=0.0), "softmax: the weights"),
                 _labelled(over, "the weights over the image")]

    part = slice(h * dh, (h + 1) * dh)
    vectors = WT.vector_stack([
        (f"z_{i}[{token}], into layer {i + 1}", t.hidden[i][0, token]),
        ("LN(z)", b.ln1[0, token]),
        (f"q, head {h + 1}", b.q[0, h, token]),
        (f"k, head {h + 1}", b.k[0, h, token]),
        (f"v, head {h + 1}", b.v[0, h, token]),
        (f"head {h + 1}'s weighted sum of every token's v", b.mixed[0, token, part]),
        (f"MSA: {heads} heads concatenated and projected", b.attn_out[0, token]),
        (f"z'_{i + 1} = MSA + z_{i} (Eq. 2)", b.mid[0, token]),
        ("LN(z')", b.ln2[0, token]),
        ("MLP hidden layer, after the GELU", b.mlp_hidden[0, token]),
        ("MLP output", b.mlp_out[0, token]),
        (f"z_{i + 1} = MLP + z'_{i + 1} (Eq. 3)", t.hidden[i + 1][0, token]),
    ])
    norms = WT.mark_residual_norms(*_norms(picked, t), (depth + 1, gh * gw + 1), token=token, layer=i + 1)
    active = int((b.mlp_hidden[0, token] > 0).sum())
    text = (f"**Layer {i + 1} of {depth}, head {h + 1} of {heads}, following {who}.** Its query $q$ ({dh} "
            f"numbers) meets the {gh * gw + 1} keys $k$: scores from {float(scores.min()):.2f} to "
            f"{float(scores.max()):.2f}, softmaxed into weights that sum to {float(weights.sum()):.2f}. The largest: "
            f"{_top(weights, 3, gw)} (the class token's: {float(weights[0]):.2f}). The MLP widens the token to "
            f"{config.mlp_dim} numbers ({active} positive after the GELU) and back to {config.embed_dim}. The "
            f"residual stream: $|z_{{{i}}}|$ = {float(t.hidden[i][0, token].norm()):.2f}, plus MSA (norm "
            f"{float(b.attn_out[0, token].norm()):.2f}), plus MLP (norm {float(b.mlp_out[0, token].norm()):.2f}) "
            f"gives $|z_{{{i + 1}}}|$ = {float(t.hidden[i + 1][0, token].norm()):.2f}.")
    return (*attention, vectors, norms, text)


# ---------------------------------------------------------------------------------------------
# Step 3, Eq. 4: the class token becomes the answer
# ---------------------------------------------------------------------------------------------


def _as_classified(picked: Entry, x: torch.Tensor, runtime: str, names: list[str], probs: torch.Tensor) -> str:
    """How the Classify tab's answer, with its runtime, relates to the traced fp32 numbers."""
    run, resolved = models.model_runner(picked, runtime or "auto")
    if resolved in ("eager", "packed"):
        return (f"These are the Classify tab's numbers (its runtime is {models.RUNTIME_NAMES[resolved]}, the same "
                f"fp32 computation).")
    with torch.inference_mode():
        theirs = run(x).float().softmax(-1)[0]
    k = int(theirs.argmax())
    same = "the same class" if k == int(probs.argmax()) else "**another class**"
    return (f"The Classify tab's runtime, {models.RUNTIME_NAMES[resolved]}, computes with rounded weights and says "
            f"{names[k]} {float(theirs[k]):.1%}: {same}; the fp32 model traced here says "
            f"{names[int(probs.argmax())]} {float(probs.max()):.1%}. Pick *PyTorch fp32* there to see these numbers.")


@user_errors
def output_step(image: Any, model_name: str = SHIPPED, runtime: str = "auto"
                ) -> tuple[dict[str, float], Image.Image, Image.Image, str]:
    """Eq. 4: the top 5 of the traced fp32 forward pass (the Classify tab's with an fp32 runtime;
    the text compares it with the answer of `runtime`, the Classify tab's), the class token's
    vectors (z_L^0, LN, logits), the logit lens chart, and the numbers in words."""
    rgb, picked, t = _start(image, model_name)
    names = list(picked.meta["class_names"])
    probs = t.logits[0].float().softmax(-1)
    best = probs.topk(min(TOP, probs.numel()))
    label = {names[k]: float(p) for p, k in zip(best.values.tolist(), best.indices.tolist())}
    with torch.no_grad():
        final = picked.model.norm(t.hidden[-1][0, 0])
    depth = len(t.hidden) - 1
    vectors = WT.vector_stack([(f"z_{depth}[0], the class token after the last layer", t.hidden[-1][0, 0]),
                               ("y = LN(z_L[0]) (Eq. 4)", final),
                               (f"the head's logits, one per class ({len(names)})", t.logits[0])])
    lens = t.layer_logits[0].float().softmax(-1)  # (L, classes)
    shown = best.indices.tolist()[:3]
    chart = vz.figure_to_image(WT.plot_logit_lens(lens, names, shown), dpi=90)
    answer = shown[0]
    formed = next(l + 1 for l in range(depth) if all(int(lens[j].argmax()) == answer for j in range(l, depth)))
    steps = ", ".join(f"{l + 1}: {float(lens[l, answer]):.0%}" for l in range(depth))
    x = models.model_input(rgb, picked.meta)
    text = (f"The class token after layer {depth}, $z_{{{depth}}}^0$, normalised, times the head's "
            f"${len(names)} \\times {picked.model.config.embed_dim}$ weights: **{names[answer]} "
            f"{float(probs[answer]):.1%}**. Read through the same LN and head after every layer, the class token "
            f"answers {names[answer]} from layer {formed} on (its probability after each layer: {steps}). "
            f"{_as_classified(picked, x, runtime, names, probs)}")
    return label, vectors, chart, text


# ---------------------------------------------------------------------------------------------
# All steps (the API), the picker's ranges, clicks on the grid
# ---------------------------------------------------------------------------------------------

EMPTY = (None, None, None, None, "", None, None, None, None, None, "", None, None, None, "")  # `inside` without an image


def inside(image: Any, model_name: str = SHIPPED, row: int = 1, col: int = 1, follow: str = FOLLOW_PATCH,
           layer: int = 1, head: int = 1, runtime: str = "auto") -> tuple[Any, ...]:
    """Every step for the image: `embedding_step`, `block_step` and `output_step`'s outputs in
    order (4 pictures and a text; 5 pictures and a text; the top 5, 2 pictures and a text);
    `runtime` is the Classify tab's, which the answer's text compares with."""
    pick, vectors, tokens, filters, text = embedding_step(image, model_name, row, col)
    return (pick, vectors, tokens, filters, text, *block_step(image, model_name, row, col, follow, layer, head),
            *output_step(image, model_name, runtime))


def model_views(name: str | None) -> tuple[Any, Any, Any, Any]:
    """What the picker changes here: the row, column, layer and head sliders' ranges (the middle
    patch, layer 1 and head 1 picked)."""
    try:
        config, _ = models.model_spec(name)
        (gh, gw), depth, heads = config.grid_size, config.depth, config.num_heads
    except models.ModelUnavailable:
        gh = gw = depth = heads = 1
    return (gr.update(maximum=max(gh, 2), value=(gh + 1) // 2), gr.update(maximum=max(gw, 2), value=(gw + 1) // 2),
            gr.update(maximum=max(depth, 2), value=1), gr.update(maximum=max(heads, 2), value=1))


def picked_on_grid(model_name: str | None, event: gr.SelectData) -> tuple[int, int]:
    """The (row, column) sliders' values for a click on the patch grid."""
    try:
        config, _ = models.model_spec(model_name)
    except models.ModelUnavailable:
        return gr.skip(), gr.skip()
    x, y = event.index
    return patch_at(x, y, config.grid_size)


# ---------------------------------------------------------------------------------------------
# Layout and wiring
# ---------------------------------------------------------------------------------------------


def _captioned(alt_text: str, caption: str, **kwargs: Any) -> gr.Image:
    """A picture in a column of its own with its caption (Markdown, equations typeset) under it."""
    with gr.Column(min_width=300):
        shown = picture(label=alt_text, alt_text=alt_text, **kwargs)
        gr.Markdown(caption, latex_delimiters=LATEX)
    return shown


def create_ui() -> dict[str, Any]:
    gr.Markdown("One image through the model, with the real numbers of one forward pass: click a patch (or use "
                "the sliders), then move through the layers. Every picture below is a tensor the model computed.")
    ui: dict[str, Any] = {}
    gr.Markdown("### 1. A patch becomes a token (Eq. 1)")
    with gr.Row():
        with gr.Column(scale=2, min_width=300):
            gr.Markdown(READ_PICK)
            ui["pick"] = picture(label="Click a patch", alt_text="The image cut into patches; click one to follow it",
                                 height=PICK_SIZE)
            with gr.Row():
                ui["row"] = numeric_slider(1, 8, value=4, step=1, label="Patch row", min_width=140)
                ui["col"] = numeric_slider(1, 8, value=4, step=1, label="Patch column", min_width=140)
        with gr.Column(scale=3, min_width=300):
            ui["embed_text"] = gr.Markdown(latex_delimiters=LATEX)
            ui["vectors"] = picture(label="The patch's vectors", alt_text="x_p, x_p E, E_pos and z_0 as colour strips")
            gr.Markdown(READ_EMBEDDING, latex_delimiters=LATEX)
    with gr.Row():
        ui["tokens"] = _captioned("All tokens of z_0, one row each", READ_TOKENS)
        ui["filters"] = _captioned("Principal components of E (Fig. 7, left)", READ_FILTERS, height=300)

    gr.Markdown("### 2. One layer: attention, then MLP (Eqs. 2 and 3)")
    with gr.Row():
        ui["follow"] = choice(gr.Radio([FOLLOW_PATCH, FOLLOW_CLS], value=FOLLOW_PATCH, label="Follow which token?",
                                       min_width=200), "The token to follow")
        ui["layer"] = numeric_slider(1, 7, value=1, step=1, label="Layer", min_width=200)
        ui["head"] = numeric_slider(1, 6, value=1, step=1, label="Head", min_width=200)
    ui["block_text"] = gr.Markdown(latex_delimiters=LATEX)
    with gr.Row():
        ui["scores"] = picture(label="Scores", alt_text="Attention scores over the patch grid", min_width=180)
        ui["weights"] = picture(label="Weights", alt_text="Attention weights over the patch grid", min_width=180)
        ui["over"] = picture(label="Weights over the image", alt_text="Attention weights over the image", min_width=180)
    gr.Markdown(READ_SCORES, latex_delimiters=LATEX)
    with gr.Row():
        ui["block"] = _captioned("The token's vectors through the block", READ_BLOCK)
        ui["norms"] = _captioned("Each token's norm after each layer", READ_DEPTH)

    gr.Markdown("### 3. The answer (Eq. 4)")
    with gr.Row():
        with gr.Column(min_width=300):
            ui["label"] = gr.Label(num_top_classes=TOP, label="Top 5")
            ui["final"] = picture(label="The class token becomes the answer", alt_text="z_L[0], y and the logits")
        with gr.Column(min_width=300):
            ui["output_text"] = gr.Markdown(latex_delimiters=LATEX)
            ui["lens"] = picture(label="The logit lens", alt_text="The probability of the top classes after each layer")
            gr.Markdown(READ_OUTPUT, latex_delimiters=LATEX)
    return ui


def embedding_outputs(ui: dict[str, Any]) -> list[Any]:
    return [ui["pick"], ui["vectors"], ui["tokens"], ui["filters"], ui["embed_text"]]


def block_outputs(ui: dict[str, Any]) -> list[Any]:
    return [ui["scores"], ui["weights"], ui["over"], ui["block"], ui["norms"], ui["block_text"]]


def output_outputs(ui: dict[str, Any]) -> list[Any]:
    return [ui["label"], ui["final"], ui["lens"], ui["output_text"]]


def io(ui: dict[str, Any], image: gr.Image, picker: gr.Dropdown, runtime: gr.Dropdown) -> tuple[list[Any], list[Any]]:
    """The inputs and outputs of `inside` (`runtime`: the Classify tab's)."""
    inputs = [image, picker, ui["row"], ui["col"], ui["follow"], ui["layer"], ui["head"], runtime]
    return inputs, [*embedding_outputs(ui), *block_outputs(ui), *output_outputs(ui)]


def model_outputs(ui: dict[str, Any]) -> list[Any]:
    """The outputs of `model_views`."""
    return [ui["row"], ui["col"], ui["layer"], ui["head"]]


def wire(ui: dict[str, Any], image: gr.Image, picker: gr.Dropdown, runtime: gr.Dropdown, view: dict[str, Any],
         hidden: dict[str, Any]) -> None:
    block_inputs = [image, picker, ui["row"], ui["col"], ui["follow"], ui["layer"], ui["head"]]
    on_patch = keep_views(embedding_step, 5)
    on_block = keep_views(block_step, 6)
    ui["pick"].select(picked_on_grid, [picker], [ui["row"], ui["col"]], **hidden).then(
        on_patch, [image, picker, ui["row"], ui["col"]], embedding_outputs(ui), **view, **hidden).then(
        on_block, block_inputs, block_outputs(ui), **view, **hidden)
    for slider in (ui["row"], ui["col"]):
        slider.release(on_patch, [image, picker, ui["row"], ui["col"]], embedding_outputs(ui), **view, **hidden).then(
            on_block, block_inputs, block_outputs(ui), **view, **hidden)
    ui["follow"].input(on_block, block_inputs, block_outputs(ui), **view, **hidden)
    for slider in (ui["layer"], ui["head"]):
        slider.release(on_block, block_inputs, block_outputs(ui), **view, **hidden)
    # The answer's text compares with the Classify tab's runtime: say it again when that changes.
    runtime.input(keep_views(if_image(output_step, (None, None, None, "")), 4), [image, picker, runtime],
                  output_outputs(ui), **view, **hidden)
