"""The Gradio app: its event functions called directly, then the launched app driven over HTTP
with gradio_client. A tiny checkpoint stands in for the shipped model; nothing is downloaded."""

import io
import os
import time
import urllib.error
import zipfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import gradio as gr
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import STAND_IN_CLASSES, free_port, reference_probabilities, stand_in_environment
from PIL import Image

import vitdemo
import vitdemo.app
from vitdemo.app import (attention_tab, classify_tab, common, examples, models, patches_tab, position_tab, train_tab,
                         training)
from vitdemo.pretrained import PretrainedUnavailable
from vitdemo.runtime import packing_available

CLASSES = STAND_IN_CLASSES


@pytest.fixture(scope="module", autouse=True)
def app_env(tmp_path_factory):
    """A tiny 'shipped' model, server folders in a temporary directory, an empty model cache."""
    root = tmp_path_factory.mktemp("app")
    with stand_in_environment(root):
        yield root


@pytest.fixture
def shipped(app_env):
    """The stand-in shipped checkpoint's path (read at test time: a test may point the app elsewhere)."""
    return Path(models.SHIPPED_CHECKPOINT)


@pytest.fixture
def photo():
    return Image.open(examples.draw_examples(common.APP_DIR / "examples")[0])


def error_message(excinfo) -> str:
    return excinfo.value.message


# ---------------------------------------------------------------------------------------------
# Classify
# ---------------------------------------------------------------------------------------------


def test_classify_returns_probabilities_and_time(photo, shipped):
    probs, timing = classify_tab.classify(photo)
    assert set(probs) == set(CLASSES)
    assert list(probs.values()) == sorted(probs.values(), reverse=True)
    # The answer is the model's: softmax of its logits on the checkpoint's own preprocessing, each
    # probability under its own class name (the prepacked runtime agrees with eager to ~1e-7). On
    # every example: the classes must come in another order than the model's for some of them.
    rankings = set()
    for path in examples.draw_examples(common.APP_DIR / "examples"):
        image = Image.open(path)
        expected = reference_probabilities(shipped, image)
        assert classify_tab.classify(image)[0] == pytest.approx(expected, abs=1e-5), path.name
        rankings.add(tuple(sorted(expected, key=expected.get, reverse=True)))
    assert len(rankings) > 1 and rankings != {tuple(CLASSES)}
    # No int8 export lies beside the stand-in model, so "auto" runs the prepacked fp32 model.
    assert timing["ms"] > 0 and timing["runtime"] == ("packed" if packing_available() else "eager")
    assert "ms" in classify_tab.answer_note(timing) and "4 classes" in classify_tab.answer_note(timing)


def test_every_runtime_gives_the_same_classes(photo):
    eager, _ = classify_tab.classify(photo, models.SHIPPED, "eager")
    for runtime in ("packed", "onnx", "int8"):
        probs, timing = classify_tab.classify(photo, models.SHIPPED, runtime)
        assert timing["runtime"] == runtime
        assert max(probs, key=probs.get) == max(eager, key=eager.get)
        assert probs == pytest.approx(eager, abs=0.05 if runtime == "int8" else 1e-4)
    with pytest.raises(gr.Error, match="Unknown runtime"):
        classify_tab.classify(photo, models.SHIPPED, "tensorrt")


def test_auto_runtime_uses_an_int8_export_shipped_beside_the_checkpoint(photo, tmp_path):
    from vitdemo import runtime

    entry = models.MODELS.get(models.SHIPPED)
    path = Path(entry.checkpoint).parent / "model.int8.onnx"
    try:
        runtime.export_onnx(entry.model, path, int8=True)
        entry.views.pop("runtime:int8", None)
        _, timing = classify_tab.classify(photo)
        assert timing["runtime"] == "int8"
        # A stale file (other weights) is not used as it is: the model is exported afresh.
        other = vitdemo.create_model("vit_cifar_4", num_classes=4, depth=2, embed_dim=64, num_heads=2, mlp_dim=128)
        runtime.export_onnx(other, path, int8=True)
        entry.views.pop("runtime:int8", None)
        run, name = models.model_runner(entry, "auto")
        assert name == "int8" and run.metadata[runtime.SOURCE_KEY] == runtime.weights_digest(entry.model)
    finally:
        path.unlink(missing_ok=True)
        entry.views.pop("runtime:int8", None)


@pytest.mark.parametrize("mode", ["I;16", "CMYK", "P", "RGBA", "LA", "L", "F", "1"])
def test_classify_handles_odd_modes(photo, mode, shipped):
    if mode == "I;16":
        image = Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257)
        assert image.mode == "I;16"
    else:
        image = photo.convert(mode)
    probs, _ = classify_tab.classify(image)
    # What the library's own preprocessing makes of the image in that mode, through the model.
    assert probs == pytest.approx(reference_probabilities(shipped, image), abs=1e-5)


def test_sixteen_bit_and_transparent_images_keep_their_picture():
    grey = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))  # mid-grey in 16 bits
    assert common.to_rgb(grey).getpixel((0, 0)) == (128, 128, 128)  # not clipped to white
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert common.to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)  # composited on white


def test_bad_images_give_clear_errors(monkeypatch):
    with pytest.raises(gr.Error) as excinfo:
        classify_tab.classify(None)
    assert "No image" in error_message(excinfo)
    with pytest.raises(gr.Error, match="Not an image"):
        classify_tab.classify("photo.jpg")
    monkeypatch.setattr(common, "MAX_PIXELS", 100 * 100)
    with pytest.raises(gr.Error) as excinfo:
        classify_tab.classify(Image.new("RGB", (101, 100)))
    assert "too large" in error_message(excinfo) and "10,100" in error_message(excinfo)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
    truncated = Image.open(io.BytesIO(buf.getvalue()[:-40]))  # opened lazily, as Gradio does
    with pytest.raises(gr.Error) as excinfo:
        classify_tab.classify(truncated)
    assert "could not be decoded" in error_message(excinfo)


def test_missing_shipped_model_is_explained_not_fatal(monkeypatch, tmp_path, photo):
    monkeypatch.setattr(models, "SHIPPED_CHECKPOINT", tmp_path / "none" / "model.safetensors")
    with pytest.raises(gr.Error) as excinfo:
        classify_tab.classify(photo)
    assert "No shipped model is present" in error_message(excinfo)
    note, card, *_ = vitdemo.app.select_model(models.SHIPPED)
    assert "No shipped model is present" in note and "No shipped model is present" in card
    fig, tile, text = position_tab.position_views(models.SHIPPED)
    assert fig is None and tile is None and "No shipped model" in text


def test_pretrained_offline_failure_is_cached(monkeypatch, photo):
    calls = []

    def offline(source):
        calls.append(source)
        raise PretrainedUnavailable("no network")

    monkeypatch.setattr(models, "load_pretrained", offline)
    for _ in range(2):
        with pytest.raises(gr.Error) as excinfo:
            classify_tab.classify(photo, models.PRETRAINED)
        assert "not available" in error_message(excinfo) and "no network" in error_message(excinfo)
    assert calls == ["timm"]  # the second click did not try to download again
    assert "Not available now" in models.model_card(models.PRETRAINED)
    assert "86,567,656" in models.model_card(models.PRETRAINED)  # the card needs no download


def test_unknown_model_name_is_an_error(photo):
    with pytest.raises(gr.Error, match="Unknown model"):
        classify_tab.classify(photo, "../../etc/passwd")


# ---------------------------------------------------------------------------------------------
# Patches, position embeddings, attention
# ---------------------------------------------------------------------------------------------


def test_patches_shows_grid_sequence_and_counts(photo):
    grid, strip, text = patches_tab.patches(photo)
    assert grid.size == (256, 256)  # 32 px drawn 8x larger
    assert strip.size[0] > strip.size[1] > 200  # the paper's Fig. 1, drawn (tests/test_visualize.py checks its tokens)
    assert "64 patches of 4x4" in text and "65 tokens" in text


def test_position_embedding_views(photo):
    fig = position_tab.position_figure(models.SHIPPED)
    assert isinstance(fig, Image.Image) and min(fig.size) > 200
    tile, text = position_tab.position_detail(models.SHIPPED, 3, 5)
    assert tile.size[1] == common.VIEW_SIZE  # the map, with its colour bar on its right
    assert "row 3, column 5" in text
    with pytest.raises(gr.Error, match="Row must be a whole number from 1 to 8"):  # out of range: our message
        position_tab.position_detail(models.SHIPPED, 99, -4)


def test_attention_views_and_cache(photo, monkeypatch):
    rollout, heads, distance, caption, cache, heads_caption = attention_tab.explain(
        photo, models.SHIPPED, None, "max", 0.5, 0.6, attention_tab.ROLLOUT, 2, attention_tab.QUERY_PATCH, 3, 4)
    assert rollout.size[1] == common.VIEW_SIZE  # the map, with its colour bar on its right
    assert isinstance(heads, Image.Image)  # one map per head (tests/test_app_views.py checks them)
    assert isinstance(distance, Image.Image)
    assert "row 3, column 4" in heads_caption and "layer 2" in heads_caption
    assert len(cache["attentions"]) == 2

    forwards = []
    real = attention_tab._forward
    monkeypatch.setattr(attention_tab, "_forward", lambda *a: forwards.append(1) or real(*a))
    again = attention_tab.explain(photo, models.SHIPPED, cache, "min", 0.0, 0.3, attention_tab.GRADIENT, 1,
                                  attention_tab.QUERY_CLS)
    assert forwards == [] and again[4] is cache  # display controls only: no new forward pass
    assert "Gradient rollout" in again[3]
    attention_tab.explain(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), models.SHIPPED, cache)
    assert forwards == [1]  # a new image: computed again
    assert all(p.grad is None for p in models.MODELS.get(models.SHIPPED).model.parameters())


def test_model_card_and_picker():
    card = models.model_card(models.SHIPPED)
    assert "74,692" in card and "circle" in card and "40.0%" in card
    assert "| property | value |" in card and "Recipe" not in card  # saved without one
    note, card, layer, rows, cols, *_ = vitdemo.app.select_model(models.SHIPPED)
    assert layer["maximum"] == 2 and rows["maximum"] == 8
    assert models.SHIPPED in models.model_choices() and models.PRETRAINED in models.model_choices()


# ---------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------

TINY_RUN = dict(per_class=24, depth=1, width=64, epochs=1, lr=1e-3, batch_size=32)


def test_training_streams_curves_and_registers_the_model(photo):
    outputs = list(train_tab.train_run(training.SRC_SYNTHETIC, None, **TINY_RUN))
    for loss, acc, status, _, _ in outputs:
        if loss is not None:  # no plot until the first frame that holds every series
            assert list(loss.columns) == ["step", "value", "series"] and list(acc.columns) == ["step", "value", "series"]
        assert isinstance(status, str)
    loss, acc, status, name, checkpoint = outputs[-1]
    assert set(loss["series"]) == {"train", "validation"} and set(acc["series"]) == {"train", "validation"}
    assert "Finished" in status and "Use this model" in status
    assert name in models.model_choices() and "(finished)" in name
    assert os.path.isfile(checkpoint)
    model, meta = vitdemo.load_checkpoint(checkpoint)
    assert meta["class_names"] == list(vitdemo.data.SHAPES[:4]) and meta["metrics"]["epoch"] == 1

    # The curves' values, recomputed here: the tab holds out 10% of the 4 x 24 built-in shapes
    # (seed 0), stratified (seed 0); a new model's weights are drawn from seed 0 (patch 8 by default).
    data = vitdemo.data.synthetic_shapes(num_classes=4, per_class=TINY_RUN["per_class"], image_size=32, seed=0)
    train_idx, val_idx = vitdemo.data.stratified_split(data.labels, round(0.1 * len(data)), seed=0)
    assert f"on {len(train_idx)} images ({len(val_idx)} for validation)" in outputs[1][2]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        initial = vitdemo.create_model("vit_cifar_4", num_classes=4, patch_size=8, depth=TINY_RUN["depth"],
                                       embed_dim=TINY_RUN["width"], num_heads=2, mlp_dim=2 * TINY_RUN["width"])

    # A new model normalises with its training images' own statistics, per channel (4 decimals).
    pixels = data.images[train_idx].double() / 255
    mean = pixels.mean(dim=(0, 2, 3))
    std = (pixels.square().mean(dim=(0, 2, 3)) - mean.square()).sqrt()
    assert meta["mean"] == [round(v, 4) for v in mean.tolist()] and meta["std"] == [round(v, 4) for v in std.tolist()]
    mean, std = torch.tensor(meta["mean"]).view(3, 1, 1), torch.tensor(meta["std"]).view(3, 1, 1)

    def figures(net, idx):  # (mean cross-entropy, accuracy in %) on the images `idx`, unaugmented
        x = (data.images[idx].float() / 255 - mean) / std
        with torch.no_grad():
            logits = net.eval()(x)
        y = data.labels[idx]
        return torch.nn.functional.cross_entropy(logits, y).item(), 100 * (logits.argmax(1) == y).double().mean().item()

    def point(frame, series, step):
        (value,) = frame[(frame.series == series) & (frame.step == step)]["value"]
        return value

    last = int(acc[acc.series == "validation"]["step"].max())
    assert last == 3  # 86 training images in batches of 32: the epoch's 3 steps
    expected = {(0, "train"): figures(initial, train_idx), (0, "validation"): figures(initial, val_idx),
                (last, "validation"): figures(model, val_idx)}  # the finished model: the saved weights
    for (step, series), (want_loss, want_acc) in expected.items():
        assert point(loss, series, step) == pytest.approx(want_loss, rel=1e-4), (step, series)
        assert point(acc, series, step) == pytest.approx(want_acc, abs=1e-6), (step, series)
    assert meta["metrics"]["val_loss"] == pytest.approx(expected[last, "validation"][0], rel=1e-4)
    assert 100 * meta["metrics"]["val_acc"] == pytest.approx(expected[last, "validation"][1], abs=1e-6)
    probs, _ = classify_tab.classify(photo, name)
    assert probs == pytest.approx(reference_probabilities(checkpoint, photo), abs=1e-5)  # the saved model's answer


def test_stopping_training_keeps_the_model_so_far(photo):
    run = train_tab.train_run(training.SRC_SYNTHETIC, None, **dict(TINY_RUN, epochs=5))
    for loss, _, status, _, _ in run:
        if loss is not None and loss["step"].max() > 0:  # the first step is done
            break
    run.close()  # what Gradio does on Stop
    status, name, checkpoint = train_tab.after_stop(timeout=5)
    assert "Stopped" in status
    assert name.endswith("(stopped)") and name in models.model_choices()
    assert os.path.isfile(checkpoint)
    card = models.model_card(name)
    assert "Stopped by the user at step" in card
    assert "**Recipe:** AdamW" in card and "augmentation: random crop (padding 4), flip" in card  # how it was trained
    assert classify_tab.classify(photo, name)[0]


def test_training_input_errors(tmp_path):
    def start(source, zip_file=None, **kwargs):
        for _ in train_tab.train_run(source, zip_file, **dict(TINY_RUN, **kwargs)):
            pass

    with pytest.raises(gr.Error, match="Upload a .zip"):
        start(training.SRC_ZIP)
    flat = tmp_path / "flat.zip"
    with zipfile.ZipFile(flat, "w") as z:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="PNG")
        z.writestr("a.png", buf.getvalue())
    with pytest.raises(gr.Error, match="class folders"):
        start(training.SRC_ZIP, str(flat))
    fake = tmp_path / "fake.zip"
    fake.write_text("not a zip")
    with pytest.raises(gr.Error, match="not a valid zip"):
        start(training.SRC_ZIP, str(fake))
    with pytest.raises(gr.Error, match="Freeze the backbone"):
        start(training.SRC_SYNTHETIC, freeze_backbone=True)
    with pytest.raises(gr.Error, match="learning rate"):
        start(training.SRC_SYNTHETIC, lr=5.0)


def test_fine_tuning_with_a_frozen_backbone_trains_only_a_new_head():
    outputs = list(train_tab.train_run(training.SRC_SYNTHETIC, None, **TINY_RUN, finetune=True, freeze_backbone=True,
                                model_name=models.SHIPPED))
    name = outputs[-1][3]
    assert "fine-tuned from" in name and "head only" in name
    tuned, shipped = models.MODELS.get(name).model, models.MODELS.get(models.SHIPPED).model
    assert torch.equal(tuned.blocks[0].attn.qkv.weight, shipped.blocks[0].attn.qkv.weight)  # backbone kept
    assert not torch.equal(tuned.head.weight, shipped.head.weight)
    assert all(not p.requires_grad for p in shipped.parameters())  # the shared model was not touched


def test_cifar_offline_is_explained_once(monkeypatch):
    calls = []

    def offline(*args, **kwargs):
        calls.append(1)
        # What torchvision's download raises offline, wrapped as the data module wraps it.
        raise vitdemo.data.DataError("could not download") from urllib.error.URLError(
            OSError(-2, "Name or service not known"))

    monkeypatch.setattr(vitdemo.data.sources, "load_cifar10", offline)
    monkeypatch.setattr(training, "cifar_folders", lambda: [])
    for _ in range(2):
        with pytest.raises(gr.Error) as excinfo:
            training.load_training_data(training.SRC_CIFAR, None, 10)
        message = error_message(excinfo)
        assert "could not be downloaded: no internet connection (Name or service not known)." in message
        assert "class folders in `~/.cache/vitdemo/cifar10/train`" in message  # the documented place, whole
        assert "Error" not in message and "urlopen" not in message
    assert calls == [1]


def test_plot_points_are_bounded():
    rows = [(i, 1.0, "train") for i in range(2000)] + [(i * 200, 0.5, "validation") for i in range(10)]
    frame = training.frame(rows)
    assert isinstance(frame, pd.DataFrame) and len(frame) <= training.MAX_PLOT_POINTS
    assert (frame["series"] == "validation").sum() == 10
    assert frame["step"].iloc[0] == 0 and frame[frame.series == "train"]["step"].iloc[-1] == 1999


# ---------------------------------------------------------------------------------------------
# The launched app, over HTTP
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_launched_app_classifies_and_refuses_bad_files(tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    demo = vitdemo.app.build_demo()
    try:
        _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                                quiet=True, **vitdemo.app.launch_options())
        client = Client(url, analytics_enabled=False, verbose=False, download_files=str(tmp_path / "downloads"))
        example = examples.draw_examples(tmp_path / "examples")[1]
        result = client.predict(handle_file(str(example)), api_name="/classify")
        expected = reference_probabilities(models.SHIPPED_CHECKPOINT, Image.open(example))
        assert result["label"] == max(expected, key=expected.get)
        assert {c["label"]: c["confidence"] for c in result["confidences"]} == pytest.approx(expected, abs=1e-5)

        # Training through Gradio's queue, stopped as the Stop button does: the run becomes a model.
        before = set(models.model_choices())
        job = client.submit(training.SRC_SYNTHETIC, None, 24, 8, 1, 64, 20, 1e-3, 32, False, False, models.SHIPPED,
                            api_name="/train")
        deadline = time.monotonic() + 30
        while not any(out[0] and len(out[0]["data"]) for out in job.outputs()) and time.monotonic() < deadline:
            time.sleep(0.05)
        job.cancel()
        deadline = time.monotonic() + 30
        while not (new := set(models.model_choices()) - before) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(new) == 1 and new.pop().endswith("(stopped)")

        bad = tmp_path / "not-an-image.png"
        bad.write_text("hello, I am text")
        with pytest.raises(AppError, match="not an image"):
            client.predict(handle_file(str(bad)), api_name="/classify")
    finally:
        demo.close()


def test_app_py_builds_the_demo_without_launching_it():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("vitdemo_app", Path(__file__).parent.parent / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)  # would block here if it launched the server on import
    assert isinstance(app.demo, gr.Blocks)
    assert app.demo.get_api_info()["named_endpoints"]["/classify"]["parameters"][0]["parameter_name"] == "image"


def test_a_picture_returned_again_is_not_rewritten_under_a_reader(tmp_path):
    """Gradio's own cache writer truncates and rewrites the file of a picture returned a second
    time, while a browser may still be reading it; ours leaves the complete file as it is and writes
    a new one whole, under its final name only at the end."""
    from gradio import processing_utils

    assert processing_utils.save_pil_to_cache is common.save_pil_to_cache  # what Gradio's components call
    picture = Image.new("RGB", (40, 30), (200, 30, 90))
    first = Path(processing_utils.save_pil_to_cache(picture, str(tmp_path)))
    reader = first.open("rb")  # a download in progress
    before = first.stat()
    again = Path(processing_utils.save_pil_to_cache(picture.copy(), str(tmp_path)))
    assert again == first and first.stat().st_mtime_ns == before.st_mtime_ns and first.stat().st_ino == before.st_ino
    assert reader.read() == processing_utils.encode_pil_to_bytes(picture, "webp")  # whole, as the reader began it
    reader.close()
    other = Path(processing_utils.save_pil_to_cache(Image.new("RGB", (40, 30), (0, 0, 0)), str(tmp_path)))
    assert other != first and Image.open(other).getpixel((0, 0)) == (0, 0, 0)
    assert not [p for p in tmp_path.rglob("*.tmp")]
