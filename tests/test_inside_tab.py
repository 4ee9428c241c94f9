"""The Inside the model tab and its pictures (`vitdemo.walkthrough`): every number it shows is the
model's own (against the trace and independent computations), its top 5 is the Classify tab's,
one forward pass serves every control, our messages for out-of-range inputs, clicks on the patch
grid, and the named API endpoint. A tiny stand-in checkpoint is the shipped model."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import re

import gradio as gr
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import STAND_IN_CLASSES, free_port, stand_in_environment
from PIL import Image

import vitdemo.app
from vitdemo import walkthrough as WT
from vitdemo.app import classify_tab, common, examples, inside_tab, models

I = inside_tab


@pytest.fixture(scope="module", autouse=True)
def app_env(tmp_path_factory):
    with stand_in_environment(tmp_path_factory.mktemp("inside")) as checkpoint:
        yield checkpoint


@pytest.fixture
def photo():
    return Image.open(examples.draw_examples(common.APP_DIR / "examples")[1])


def shipped_input(photo):
    picked = models.entry(models.SHIPPED)
    return picked, models.model_input(common.to_rgb(photo), picked.meta)


def numbers_in(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+", text)]


# ---------------------------------------------------------------------------------------------
# The pictures
# ---------------------------------------------------------------------------------------------


def test_vector_strip_colours_each_number_in_place_by_its_sign_and_size():
    values = torch.tensor([0.0, 2.0, -2.0, 1.0])
    strip = np.asarray(WT.vector_strip(values, width=40)).astype(int)
    cell = strip.shape[1] // 4
    centres = [strip[strip.shape[0] // 2, cell * i + cell // 2] for i in range(4)]
    zero, plus, minus, half = centres
    assert (np.abs(zero - 247) <= 10).all()  # RdBu_r's middle is (nearly) white
    assert plus[0] > plus[2] + 50 and minus[2] > minus[0] + 50  # red positive, blue negative (RdBu_r ends dark)
    assert plus[0] - plus[1] > half[0] - half[1]  # the largest |number| is the fullest colour
    assert WT.strip_columns(16) == 16 and WT.strip_columns(192) == 64 and WT.strip_columns(3072) == 128
    tall = WT.vector_strip(torch.randn(3072))
    assert tall.size[0] <= WT.STRIP_WIDTH and tall.size[1] == 24 * (WT.STRIP_WIDTH // 128)


def test_vector_stack_and_token_matrix():
    one = WT.vector_stack([("q", torch.randn(16))])
    three = WT.vector_stack([("q", torch.randn(16)), ("k", torch.randn(16)), ("a long label " * 5, torch.randn(192))])
    assert one.size[0] == three.size[0] == WT.STRIP_WIDTH and three.size[1] > 3 * one.size[1]
    tokens = torch.randn(65, 192)
    plain, marked = WT.token_matrix(tokens), WT.token_matrix(tokens, highlight=10)
    diff = np.argwhere((np.asarray(plain) != np.asarray(marked)).any(-1))
    rows = diff[:, 0]
    assert 10 * 200 / 65 - 3 <= rows.min() and rows.max() <= 11 * 200 / 65 + 3  # the outline is on row 10


def test_logit_lens_chart_draws_the_probabilities_it_is_given():
    probs = torch.rand(4, 10).softmax(-1)
    fig = WT.plot_logit_lens(probs, [f"c{i}" for i in range(10)], [3, 1])
    lines = fig.axes[0].get_lines()
    np.testing.assert_allclose(lines[0].get_ydata(), probs[:, 3].numpy())
    np.testing.assert_allclose(lines[1].get_xdata(), [1, 2, 3, 4])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["c3 (final answer)", "c1"]


# ---------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------


def test_answer_is_the_classify_tabs_top5(photo):
    label, _, _, text = I.output_step(photo, models.SHIPPED, "eager")
    theirs, _ = classify_tab.classify(photo, models.SHIPPED, "eager")
    top5 = dict(list(theirs.items())[:5])
    assert list(label) == list(top5)
    np.testing.assert_allclose(list(label.values()), list(top5.values()), atol=1e-6)
    assert "These are the Classify tab's numbers" in text
    # The logit lens's last layer is the answer itself.
    picked, x = shipped_input(photo)
    t = vitdemo.trace(picked.model, x)
    last = t.layer_logits[0, -1].softmax(-1).max()
    assert re.search(rf"{picked.model.config.depth}: {float(last):.0%}\)", text)


def test_patch_step_shows_the_picked_patch_and_its_numbers(photo):
    picked, x = shipped_input(photo)
    gh, gw = picked.model.config.grid_size
    p = picked.model.config.patch_size
    pick, vectors, tokens, filters, text = I.embedding_step(photo, models.SHIPPED, 3, 6)
    token = 1 + 2 * gw + 5
    assert f"is token {token}** of {gh * gw + 1}" in text and f"{gh * gw + 1} \\times 64" in text
    # The numbers quoted are the patch's own pixels, normalised, in E's order (Conv2d weight layout).
    patch = F.unfold(x, kernel_size=p, stride=p)[0, :, token - 1]
    quoted = numbers_in(text.split("std):")[1])[:8]
    np.testing.assert_allclose(quoted, patch[:8].numpy(), atol=0.006)
    # The green outline sits on patch (3, 6) of the clickable grid.
    green = np.argwhere((np.asarray(pick)[..., 1] > 150) & (np.asarray(pick)[..., 0] < 60) & (np.asarray(pick)[..., 2] < 60))
    cell = I.PICK_SIZE / gw
    assert green[:, 0].min() >= 2 * cell - 2 and green[:, 0].max() <= 3 * cell + 2
    assert green[:, 1].min() >= 5 * cell - 2 and green[:, 1].max() <= 6 * cell + 2
    assert all(isinstance(im, Image.Image) for im in (vectors, tokens, filters))


def test_click_on_the_grid_picks_the_patch_under_it():
    for r in range(8):
        for c in range(8):
            x, y = (c + 0.5) * I.PICK_SIZE / 8, (r + 0.5) * I.PICK_SIZE / 8
            assert I.patch_at(x, y, (8, 8)) == (r + 1, c + 1)
    assert I.patch_at(I.PICK_SIZE, I.PICK_SIZE, (8, 8)) == (8, 8)  # the last pixel row and column


def test_block_step_reports_the_models_own_attention(photo):
    picked, x = shipped_input(photo)
    with torch.no_grad():
        _, attentions = picked.model(x, return_attention=True)
    gw = picked.model.config.grid_size[1]
    for follow, token in [(I.FOLLOW_PATCH, 1 + 1 * gw + 2), (I.FOLLOW_CLS, 0)]:
        *pictures, text = I.block_step(photo, models.SHIPPED, 2, 3, follow, 2, 2)
        weights = attentions[1][0, 1, token]
        best = weights.topk(3)
        where = ["the class token" if i == 0 else f"patch ({(i - 1) // gw + 1}, {(i - 1) % gw + 1})"
                 for i in best.indices.tolist()]
        expected = ", ".join(f"{w} {v:.2f}" for w, v in zip(where, best.values.tolist()))
        assert f"The largest: {expected}" in text
        assert "Layer 2 of 2, head 2 of 2" in text and "sum to 1.00" in text
        assert len(pictures) == 5 and all(isinstance(im, Image.Image) for im in pictures)
    # Another layer or head is another picture.
    a = np.asarray(I.block_step(photo, models.SHIPPED, 2, 3, I.FOLLOW_PATCH, 1, 1)[1])
    b = np.asarray(I.block_step(photo, models.SHIPPED, 2, 3, I.FOLLOW_PATCH, 2, 1)[1])
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_one_forward_pass_serves_every_control(photo, monkeypatch):
    calls = []
    real = I.trace
    monkeypatch.setattr(I, "trace", lambda *a, **k: calls.append(1) or real(*a, **k))
    models.entry(models.SHIPPED).views.pop("traces", None)
    I.inside(photo, models.SHIPPED, 1, 1, I.FOLLOW_PATCH, 1, 1)
    for layer in (1, 2):
        for head in (1, 2):
            I.block_step(photo, models.SHIPPED, 4, 5, I.FOLLOW_CLS, layer, head)
    I.embedding_step(photo, models.SHIPPED, 8, 8)
    assert len(calls) == 1
    I.output_step(Image.new("RGB", (40, 40), "red"), models.SHIPPED)  # another image: another pass
    assert len(calls) == 2 and len(models.entry(models.SHIPPED).views["traces"]) <= I.TRACES_KEPT


def test_out_of_range_inputs_get_our_messages(photo):
    cases = [(lambda: I.block_step(photo, models.SHIPPED, 1, 1, I.FOLLOW_PATCH, 3, 1),
              "Layer must be a whole number from 1 to 2 (this model has 2 layers); got 3."),
             (lambda: I.block_step(photo, models.SHIPPED, 1, 1, I.FOLLOW_PATCH, 1, 0),
              "Head must be a whole number from 1 to 2 (this model has 2 heads); got 0."),
             (lambda: I.block_step(photo, models.SHIPPED, 1, 1, "the moon", 1, 1),
              "The token to follow must be one of: 'the picked patch', 'the class token'"),
             (lambda: I.embedding_step(photo, models.SHIPPED, 9, 1),
              "Patch row must be a whole number from 1 to 8 (this model's grid has 8 rows); got 9."),
             (lambda: I.embedding_step(None, models.SHIPPED, 1, 1), "No image")]
    for call, message in cases:
        with pytest.raises(gr.Error) as err:
            call()
        assert message in err.value.message
    assert I.model_views(models.SHIPPED)[2]["maximum"] == 2 and I.model_views(models.SHIPPED)[0]["value"] == 4


@pytest.mark.slow
def test_api_inside_endpoint_answers_as_classify_does(tmp_path, photo):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    path = tmp_path / "photo.png"
    photo.save(path)
    demo = vitdemo.app.build_demo()
    try:
        _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                                quiet=True, **vitdemo.app.launch_options())
        client = Client(url, analytics_enabled=False, verbose=False, download_files=str(tmp_path / "downloads"))
        out = client.predict(handle_file(str(path)), models.SHIPPED, 2, 7, I.FOLLOW_PATCH, 2, 1, "eager",
                             api_name="/inside")
        assert len(out) == len(I.EMPTY)
        assert "is token 15** of 65" in out[4] and "Layer 2 of 2, head 1 of 2" in out[10]
        label = out[11]
        classified = client.predict(handle_file(str(path)), models.SHIPPED, "eager", api_name="/classify")
        assert label["label"] == classified["label"] in STAND_IN_CLASSES
        ours = {c["label"]: c["confidence"] for c in label["confidences"]}
        theirs = {c["label"]: c["confidence"] for c in classified["confidences"][:5]}
        assert list(ours) == list(theirs) and np.allclose(list(ours.values()), list(theirs.values()), atol=1e-6)
        assert Image.open(out[0]).size == (I.PICK_SIZE, I.PICK_SIZE)
        with pytest.raises(AppError, match=r"Layer must be a whole number from 1 to 2 \(this model has 2 layers\)"):
            client.predict(handle_file(str(path)), models.SHIPPED, 1, 1, I.FOLLOW_PATCH, 5, 1, "eager",
                           api_name="/inside")
    finally:
        demo.close()


def test_residual_norm_chart_marks_the_token_and_layer_asked():
    hidden = [torch.randn(1 + 16, 8) * (l + 1) for l in range(5)]  # z_0 ... z_4 of 16 patches
    chart, (x0, y0, x1, y1) = WT.residual_norms(hidden)
    assert 0 <= x0 < x1 <= chart.size[0] and 0 <= y0 < y1 <= chart.size[1]
    marked = np.asarray(WT.mark_residual_norms(chart, (x0, y0, x1, y1), (5, 17), token=3, layer=2)).astype(int)
    changed = np.argwhere((marked != np.asarray(chart).astype(int)).any(-1))
    cw, rh = (x1 - x0) / 17, (y1 - y0) / 5
    in_column = (changed[:, 1] >= x0 + 3 * cw - 2) & (changed[:, 1] <= x0 + 4 * cw + 2)
    in_row = (changed[:, 0] >= y0 + 2 * rh - 2) & (changed[:, 0] <= y0 + 3 * rh + 2)
    assert len(changed) > 0 and (in_column | in_row).all()
