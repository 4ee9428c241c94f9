"""The app's Patches, Position embeddings and Attention tabs: the class picker, the cache of maps,
the faithfulness table, head maps over the image, and our messages for out-of-range inputs, called
directly and through the launched app's API. A tiny stand-in checkpoint is the shipped model."""

import io
import json
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import gradio as gr
import numpy as np
import pytest
import torch
from helpers import STAND_IN_CLASSES, free_port, stand_in_environment
from PIL import Image

import vitdemo.app
from vitdemo import explanations as ex
from vitdemo import faithfulness as FT
from vitdemo import figures as FG
from vitdemo import visualize as vz
from vitdemo.app import attention_tab, common, examples, models, patches_tab, position_tab
from vitdemo.runtime import weights_digest

A = attention_tab


@pytest.fixture(scope="module", autouse=True)
def app_env(tmp_path_factory):
    with stand_in_environment(tmp_path_factory.mktemp("views")) as checkpoint:
        yield checkpoint


@pytest.fixture
def photo():
    return Image.open(examples.draw_examples(common.APP_DIR / "examples")[0])


def explain(photo, method=A.ROLLOUT, cls=A.PREDICTED, cache=None, **kw):
    args = {"head_fusion": "mean", "discard_ratio": 0.0, "opacity": 0.6, "layer": 2, "query": A.QUERY_CLS,
            "query_row": 1, "query_col": 1, **kw}
    return A.explain(photo, models.SHIPPED, cache, method=method, explain_class=cls, **args)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


# ---------------------------------------------------------------------------------------------
# Which class to explain
# ---------------------------------------------------------------------------------------------


def attention_and_gradients(model, x, c):
    """Every layer's attention probabilities (heads, T, T) for one image and the gradient of
    class c's logit (not its softmax) with respect to each, in float64 numpy."""
    x = x.detach().clone().requires_grad_(True)  # a graph through the input: the weights need none
    with torch.enable_grad():
        logits, attentions = model.eval()(x, return_attention=True)
        grads = torch.autograd.grad(logits[0, c], attentions)
    return [a[0].detach().double().numpy() for a in attentions], [g[0].double().numpy() for g in grads]


def scaled(m):
    return (m - m.min()) / (m.max() - m.min())


def relevance_by_hand(model, x, c, grid):
    """Chefer et al.'s rule: R = I; per layer R += mean_heads((G * A)^+) @ R; the class token's
    row without itself, min-max scaled."""
    attentions, grads = attention_and_gradients(model, x, c)
    R = np.eye(attentions[0].shape[-1])
    for a, g in zip(attentions, grads):
        R = R + np.maximum(g * a, 0).mean(0) @ R
    return scaled(R[0, 1:].reshape(grid))


def gradient_rollout_by_hand(model, x, c, grid, discard):
    """Rollout of mean_heads(A * G^+) per layer: the weakest `discard` share of entries zeroed
    (never the class token's own, entry [0, 0]), the identity added, rows renormalised, the layers
    multiplied first to last; the class token's row without itself, min-max scaled."""
    attentions, grads = attention_and_gradients(model, x, c)
    T = attentions[0].shape[-1]
    result = np.eye(T)
    for a, g in zip(attentions, grads):
        fused = (a * np.maximum(g, 0)).mean(0).flatten()
        order = np.argsort(np.where(np.arange(T * T) == 0, np.inf, fused), kind="stable")
        fused[order[:int(T * T * discard)]] = 0.0
        fused = fused.reshape(T, T) + np.eye(T)
        result = (fused / fused.sum(1, keepdims=True)) @ result
    return scaled(result[0, 1:].reshape(grid))


def test_class_picker_drives_relevance_and_gradient_rollout_not_rollout(photo, app_env):
    # The expected maps are computed here, from the checkpoint's file: its model, its preprocessing
    # (vitdemo.data.preprocess with its metadata) and each method's rule written out.
    model, meta = vitdemo.load_checkpoint(app_env)
    x = vitdemo.data.preprocess(photo, meta["image_size"], meta["mean"], meta["std"], resize=meta.get("resize"),
                                interpolation=meta.get("interpolation", "bicubic"))
    grid = model.config.grid_size
    with torch.no_grad():
        pred = int(model.eval()(x).argmax())
    other = (pred + 1) % len(STAND_IN_CLASSES)
    picked = models.MODELS.get(models.SHIPPED)

    def assert_map(key, expected):
        np.testing.assert_allclose(cache["maps"][key].numpy(), expected, atol=1e-5, err_msg=str(key))

    out = explain(photo, A.RELEVANCE, STAND_IN_CLASSES[other])
    cache = out[4]
    assert_map((A.RELEVANCE, None, other, None), relevance_by_hand(model, x, other, grid))
    assert f"Explaining **{STAND_IN_CLASSES[other]}**" in out[3]
    predicted = explain(photo, A.RELEVANCE, A.PREDICTED, cache)
    assert_map((A.RELEVANCE, None, pred, None), relevance_by_hand(model, x, pred, grid))
    assert not np.array_equal(pixels(out[0]), pixels(predicted[0]))  # another class, another map

    g = explain(photo, A.GRADIENT, STAND_IN_CLASSES[other], cache, discard_ratio=0.25)
    assert_map((A.GRADIENT, None, other, 0.25), gradient_rollout_by_hand(model, x, other, grid, 0.25))
    assert "Gradient rollout for " + STAND_IN_CLASSES[other] in g[3]

    rollouts = [explain(photo, A.ROLLOUT, c, cache) for c in (A.PREDICTED, *STAND_IN_CLASSES)]
    assert all(np.array_equal(pixels(r[0]), pixels(rollouts[0][0])) for r in rollouts)
    assert "does not depend on the class" in rollouts[0][3]
    assert "class picker does not change it" in rollouts[1 + other][3]
    assert all(p.grad is None for p in picked.model.parameters())  # the shared weights stay untouched


def test_maps_are_computed_once_per_method_class_and_discard(photo, monkeypatch):
    calls = []
    real = ex.relevance
    monkeypatch.setattr(ex, "relevance", lambda *a, **k: calls.append(k["class_index"]) or real(*a, **k))
    cache = explain(photo, A.RELEVANCE, STAND_IN_CLASSES[0])[4]
    for opacity in (0.2, 0.9):  # display controls only
        assert explain(photo, A.RELEVANCE, STAND_IN_CLASSES[0], cache, opacity=opacity)[4] is cache
    explain(photo, A.RELEVANCE, STAND_IN_CLASSES[1], cache)
    explain(photo, A.RELEVANCE, STAND_IN_CLASSES[0], cache)  # back to the first class: from the cache
    assert calls == [0, 1]


def test_unknown_class_is_named_with_the_models_classes(photo):
    with pytest.raises(gr.Error) as excinfo:
        explain(photo, A.RELEVANCE, "tabby cat")
    assert "no class 'tabby cat'" in excinfo.value.message and "circle" in excinfo.value.message


def test_class_choices_follow_the_model():
    choices, table, note = A.model_views(models.SHIPPED)
    assert [v for _, v in choices["choices"]] == [A.PREDICTED, *STAND_IN_CLASSES]
    assert choices["value"] == A.PREDICTED
    assert [v for _, v in A.class_choices(models.PRETRAINED)][1:4] == ["tench", "goldfish", "great white shark"]


# ---------------------------------------------------------------------------------------------
# The measured faithfulness, beside the method picker
# ---------------------------------------------------------------------------------------------


def results_for(digest: str) -> dict:
    method = {"name": "Relevance (Chefer et al. 2021)", "class_specific": True,
              "predicted": {"positive_auc": 21.9, "negative_auc": 43.8},
              "true": {"positive_auc": 20.7, "negative_auc": 45.3}}
    return {"weights_sha256": digest, "images": 1000, "command": "python benchmarks/faithfulness.py --threads 1",
            "accuracy_intact": 0.846, "methods": [method]}


def test_faithfulness_table_shows_only_for_the_weights_it_measured(app_env):
    path = app_env.parent / FT.RESULTS_NAME
    picked = models.MODELS.get(models.SHIPPED)
    try:
        assert A.faithfulness(models.SHIPPED) == (None, "")  # nothing measured: nothing shown
        _, table, note = A.model_views(models.SHIPPED)
        assert table["visible"] is False and note["visible"] is False

        path.write_text(json.dumps(results_for(weights_digest(picked.model))))
        rows, note = A.faithfulness(models.SHIPPED)
        assert rows == [["Relevance (Chefer et al. 2021)", "yes", 21.9, 43.8, 20.7, 45.3]]
        assert A.READ_FAITHFULNESS in note and "1,000 held-out images" in note
        assert "python benchmarks/faithfulness.py --threads 1" in note
        _, table, shown = A.model_views(models.SHIPPED)
        assert table["visible"] is True and table["value"] == rows and shown["visible"] is True

        path.write_text(json.dumps(results_for("0" * 64)))  # measured on other weights
        assert A.faithfulness(models.SHIPPED) == (None, "")
        assert A.faithfulness(models.PRETRAINED) == (None, "")  # no checkpoint folder of ours
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Pictures: over the image, with colour bars, nothing written over them
# ---------------------------------------------------------------------------------------------


def test_head_maps_lie_over_the_image_the_model_saw(photo):
    """At opacity 0 each head's tile is the model's view of the image; at opacity 1 it is the map
    alone, its hottest patch where the head attends most. The label sits above the tile."""
    picked = models.MODELS.get(models.SHIPPED)
    gh, gw = picked.model.config.grid_size
    band = 13 + 6  # `tile_grid`'s label band at its default label size
    view = FG.model_view(common.to_rgb(photo), 32, **models.crop_of(picked.meta)).resize((A.HEAD_TILE, A.HEAD_TILE))
    clear = pixels(explain(photo, opacity=0.0)[1])
    for h in range(2):  # the stand-in has 2 heads, side by side
        x = h * (A.HEAD_TILE + 8)
        assert np.abs(clear[band:band + A.HEAD_TILE, x:x + A.HEAD_TILE] - pixels(view)).max() <= 1

    out = explain(photo, opacity=1.0, layer=2)
    heads = pixels(out[1])
    maps = ex.token_attention(out[4]["attentions"], 1, 0, grid_size=(gh, gw))[0]
    cell = A.HEAD_TILE // gw
    for h in range(2):
        x = h * (A.HEAD_TILE + 8)
        tile = heads[band:band + A.HEAD_TILE, x:x + A.HEAD_TILE].sum(-1)
        centres = tile[cell // 2::cell, cell // 2::cell]  # each patch's centre pixel
        hottest = np.unravel_index(int(maps[h].argmax()), (gh, gw))
        assert np.unravel_index(centres.argmax(), centres.shape) == hottest


def test_views_have_colour_bars_and_keep_their_size(photo):
    rollout = explain(photo)[0]
    assert rollout.size[1] == common.VIEW_SIZE and rollout.size[0] > common.VIEW_SIZE + 50  # the bar on the right
    tile, _ = position_tab.position_detail(models.SHIPPED, 2, 3)
    assert tile.size[1] == common.VIEW_SIZE and tile.size[0] > common.VIEW_SIZE + 50
    # The similarity map uses Fig. 7's fixed scale: its own position (similarity 1) is yellow.
    sim = ex.position_embedding_similarity(models.MODELS.get(models.SHIPPED).model)
    assert float(sim[1, 2, 1, 2]) == pytest.approx(1.0, abs=1e-5)
    cell = common.VIEW_SIZE // 8
    r, g, b = pixels(tile)[1 * cell + cell // 2, 2 * cell + cell // 2]
    assert r > 200 and g > 200 and b < 100  # viridis at +1


def test_position_figure_follows_the_chosen_position():
    first = position_tab.position_figure(models.SHIPPED, 2, 3)
    again = position_tab.position_figure(models.SHIPPED, 2, 3)
    other = position_tab.position_figure(models.SHIPPED, 5, 1)
    plain = position_tab.position_figure(models.SHIPPED)
    assert again is first  # cached
    assert not np.array_equal(pixels(first), pixels(other))

    def red(im):
        r, g, b = np.moveaxis(pixels(im), -1, 0)
        return ((r > 200) & (g < 60) & (b < 60)).sum()

    assert red(plain) == 0 and red(first) > 50


def test_patches_tab_numbers_the_patches_and_draws_fig_1(photo):
    grid, sequence, text = patches_tab.patches(photo)
    assert grid.size == (256, 256)  # 8 x 8 patches of 32 px: room for two digits, no enlargement
    plain = vz.patch_grid(common.to_rgb(photo), 4, 32)[0]
    changed = (pixels(grid) != pixels(plain)).any(-1)
    assert changed[:16, :16].any() and changed[224:240, 224:240].any()  # "1" and "64" in their corners
    assert sequence.size[0] > sequence.size[1]
    assert "65 tokens" in text


# ---------------------------------------------------------------------------------------------
# Numbers out of range: our message, naming the allowed range
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"layer": 3}, "Layer must be a whole number from 1 to 2 (this model has 2 layers); got 3."),
    ({"layer": 1.5}, "Layer must be a whole number from 1 to 2"),
    ({"discard_ratio": 5}, "The discard ratio must be a number from 0 to 0.95; got 5."),
    ({"opacity": -0.1}, "The overlay opacity must be a number from 0 to 1; got -0.1."),
    ({"opacity": "lots"}, "The overlay opacity must be a number from 0 to 1; got 'lots'."),
    ({"query": A.QUERY_PATCH, "query_row": 9},
     "Query row must be a whole number from 1 to 8 (this model's grid has 8 rows)"),
    ({"query": A.QUERY_PATCH, "query_col": 0}, "Query column must be a whole number from 1 to 8"),
    ({"head_fusion": "median"}, "Head fusion must be one of: 'mean', 'max', 'min'; got 'median'."),
])
def test_out_of_range_inputs_get_our_message(photo, kwargs, message):
    with pytest.raises(gr.Error) as excinfo:
        explain(photo, **kwargs)
    assert excinfo.value.message.startswith(message)
    assert "/" not in excinfo.value.message  # no server path


def test_range_checks_survive_gradio_rebuilding_a_slider():
    """An event that sets a slider's maximum (the model picker does) makes Gradio rebuild it from
    its constructor arguments: the check must stay ours, or a typed 99 gets "Value 99 is greater
    than maximum value 7". Sliders not marked keep Gradio's own check."""
    from vitdemo.app.inputs import numeric_slider

    ours = numeric_slider(1, 7, value=7, step=1, label="Layer", render=False)
    rebuilt = gr.Slider(**{**ours.constructor_args, "maximum": 12, "render": False})
    assert rebuilt.preprocess(99) == 99  # passed on for `number_in`, which names the model's range
    plain = gr.Slider(1, 7, render=False)
    with pytest.raises(gr.Error, match="greater than maximum"):
        plain.preprocess(99)


def test_a_controls_own_event_draws_what_the_slider_shows_and_warns(monkeypatch):
    """A typed 9 on a 1-4 slider: the slider's box clamps it to 4, so the views are drawn at 4 (not
    left at the last value, which the box no longer shows), and one warning says so. Any other
    message keeps the views as they were."""
    from vitdemo.app.inputs import keep_views, number_in, one_of

    shown = []
    monkeypatch.setattr(gr, "Warning", lambda message, duration=None: shown.append((message, duration)))
    fn = keep_views(lambda layer, head: (number_in(layer, 1, 4, "Layer", whole=True),
                                         number_in(head, 1, 2, "Head", whole=True), "drawn"), 3)
    assert fn(2, 1) == (2, 1, "drawn") and shown == []
    assert fn(9, 0) == (4, 1, "drawn")
    assert shown == [("Layer must be a whole number from 1 to 4; got 9. Showing 4. "
                      "Head must be a whole number from 1 to 2; got 0. Showing 1.", None)]
    shown.clear()
    other = keep_views(lambda method: one_of(method, ["rollout"], "The method"), 3)
    out = other("saliency")
    assert len(out) == 3 and all(isinstance(o, type(gr.skip())) for o in out)
    assert shown == [("The method must be one of: 'rollout'; got 'saliency'.", None)]


def test_the_train_tabs_sliders_say_when_they_clamp(monkeypatch):
    from vitdemo.app.inputs import warn_out_of_range

    shown = []
    monkeypatch.setattr(gr, "Warning", lambda message, duration=None: shown.append(message))
    check = warn_out_of_range(1, 8, "Layers")
    check(4)
    assert shown == []
    check(50)
    assert shown == ["Layers must be a whole number from 1 to 8; got 50. It is set to 8, which is what Start will use."]


def test_out_of_range_position_gets_our_message():
    message = r"Column must be a whole number from 1 to 8 \(this model's grid has 8 columns\); got 9"
    with pytest.raises(gr.Error, match=message):
        position_tab.position_at(models.SHIPPED, 1, 9)
    fig, tile, note = position_tab.position_views(models.SHIPPED, 0, 1)  # on page load: a note, not a popup
    assert fig is None and "Row must be a whole number from 1 to 8" in note


# ---------------------------------------------------------------------------------------------
# Through the launched app's API
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_api_class_picker_changes_relevance_not_rollout_and_ranges_are_ours(tmp_path, photo):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    path = tmp_path / "photo.png"
    photo.save(path)
    demo = vitdemo.app.build_demo()
    try:
        _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                                quiet=True, **vitdemo.app.launch_options())
        client = Client(url, analytics_enabled=False, verbose=False, download_files=str(tmp_path / "downloads"))

        def call(method, cls, **kw):
            args = {"head_fusion": "mean", "discard_ratio": 0.0, "opacity": 0.6, "layer": 2, "query": A.QUERY_CLS,
                    "query_row": 1, "query_col": 1, **kw}
            return client.predict(handle_file(str(path)), models.SHIPPED, method=method, explain_class=cls,
                                  api_name="/explain", **args)

        def picture(result):
            return pixels(Image.open(result[0]))

        rollout = [picture(call(A.ROLLOUT, c)) for c in ("circle", "square")]
        assert np.array_equal(*rollout)
        circle, square = call(A.RELEVANCE, "circle"), call(A.RELEVANCE, "square")
        assert not np.array_equal(picture(circle), picture(square))
        assert "Relevance for circle" in circle[3] and "Relevance for square" in square[3]

        # Gradio's own range check ("Value 5 is greater than maximum value 0.95") is replaced by ours.
        for kw, message in [({"discard_ratio": 5}, "The discard ratio must be a number from 0 to 0.95"),
                            ({"layer": 12}, "Layer must be a whole number from 1 to 2 (this model has 2 layers)")]:
            with pytest.raises(AppError, match=message.replace("(", r"\(").replace(")", r"\)")):
                call(A.ROLLOUT, A.PREDICTED, **kw)
        with pytest.raises(AppError, match="The explanation method must be one of: 'rollout'"):
            call("saliency", A.PREDICTED)
        with pytest.raises(AppError, match="has no class 'tabby cat'"):
            call(A.RELEVANCE, "tabby cat")

        grid, sequence, text = client.predict(handle_file(str(path)), models.SHIPPED, api_name="/patches")
        assert Image.open(grid).size == (256, 256) and "65 tokens" in text
    finally:
        demo.close()


def test_a_model_that_cannot_be_had_empties_each_view_and_says_so_in_place(photo, monkeypatch):
    from vitdemo.app import inside_tab

    monkeypatch.setattr(models, "MODELS", models.ModelStore())
    models.MODELS.remember_failure(models.PRETRAINED, "its weights could not be downloaded")
    views = [(models.if_available(patches_tab.patches, (None, None, ""), note=2), 2),
             (models.if_available(A.explain, A.EMPTY, note=3), 3),
             (models.if_available(inside_tab.inside, inside_tab.EMPTY, note=4), 4)]
    for view, note in views:
        out = view(photo, models.PRETRAINED)
        assert out[note] == "Not available: its weights could not be downloaded"
        assert all(o is None or isinstance(o, str) for o in out)  # no stale picture
        assert view(None, models.PRETRAINED)[note] == ""  # no image: nothing to say
    grid, _, text = views[0][0](photo, models.SHIPPED)  # an available model is drawn as usual
    assert grid is not None and "patches" in text


def test_image_errors_in_these_tabs_are_ours():
    with pytest.raises(gr.Error, match="No image"):
        A.explain(None)
    with pytest.raises(gr.Error, match="No image"):
        patches_tab.patches(None)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
    with pytest.raises(gr.Error, match="could not be decoded"):
        patches_tab.patches(Image.open(io.BytesIO(buf.getvalue()[:-40])))
