"""The app with a checkpoint whose preprocessing resizes before it crops: image_size 32, resize 40,
bilinear (the stand-in shipped model reads 32/32, bicubic, where a view that ignores `resize` or
`interpolation` cannot be told from one that does). Classify answers what the model makes of the
checkpoint's own crop, and every picture shows that same centre crop, computed here by hand."""

import os
import shutil

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import numpy as np
import pytest
import torch
from helpers import STAND_IN_CLASSES, reference_probabilities, stand_in_environment
from PIL import Image

import vitdemo
from vitdemo.app import attention_tab, classify_tab, common, examples, models, patches_tab
from vitdemo.checkpoint import read_metadata, update_metadata
from vitdemo.data import preprocess

RESIZED = "Run 0: the stand-in read at 40 px, bilinear (finished)"
SIZE, RESIZE, FILTER = 32, 40, "bilinear"
MEAN = STD = (0.5, 0.5, 0.5)  # the stand-in's normalisation


@pytest.fixture(scope="module", autouse=True)
def checkpoints(tmp_path_factory):
    """(the 32/32 shipped stand-in, the same weights with resize 40 and bilinear in their metadata,
    registered in the app's model store as a trained run is)."""
    root = tmp_path_factory.mktemp("resize")
    with stand_in_environment(root) as shipped:
        meta = read_metadata(shipped)
        assert (meta["image_size"], meta["resize"], meta["interpolation"]) == (SIZE, SIZE, "bicubic")
        assert (tuple(meta["mean"]), tuple(meta["std"])) == (MEAN, STD)
        (root / "resized").mkdir()
        resized = update_metadata(shutil.copy(shipped, root / "resized" / "model.safetensors"),
                                  resize=RESIZE, interpolation=FILTER)
        models.MODELS.register(RESIZED, vitdemo.load_checkpoint(resized)[0], read_metadata(resized), resized)
        yield shipped, resized


def sample_images():
    """The drawn examples (128 px squares) and a wide picture, whose crop is off-centre in x only."""
    images = [Image.open(p) for p in examples.draw_examples(common.APP_DIR / "examples")]
    wide = images[0].convert("RGB").resize((160, 96), Image.Resampling.BICUBIC)
    return images[:3] + [wide]


def crop_by_hand(image, resize, resample):
    """The model's 32 px view, computed here: the shorter side to `resize` (the longer in
    proportion, truncated), then the central 32 x 32 (offsets rounded), as torchvision's
    resize and center_crop do on a PIL image."""
    image = image.convert("RGB")
    w, h = image.size
    new_w, new_h = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    left, top = round((new_w - SIZE) / 2), round((new_h - SIZE) / 2)
    return image.resize((new_w, new_h), resample).crop((left, top, left + SIZE, top + SIZE)), (new_w, new_h, left, top)


def view_by_hand(image, size):
    """The same square of the original (resize 40, bilinear) drawn at size x size straight from the
    original's pixels, as the overlays draw it: the crop box mapped back to the original."""
    image = image.convert("RGB")
    _, (new_w, new_h, left, top) = crop_by_hand(image, RESIZE, Image.Resampling.BILINEAR)
    sx, sy = image.width / new_w, image.height / new_h
    box = (left * sx, top * sy, (left + SIZE) * sx, (top + SIZE) * sy)
    return image.resize((size, size), Image.Resampling.BILINEAR, box=box)


def pixels(image):
    return np.asarray(image.convert("RGB")).astype(int)


@pytest.mark.parametrize("index", range(4))
def test_classify_answers_for_the_checkpoints_own_crop(checkpoints, index):
    shipped, resized = checkpoints
    image = sample_images()[index]
    probs = classify_tab.classify(image, RESIZED)[0]
    # The model on the crop of resize 40, bilinear...
    model, _ = vitdemo.load_checkpoint(resized)
    x = preprocess(image, SIZE, MEAN, STD, resize=RESIZE, interpolation=FILTER)
    crop, _ = crop_by_hand(image, RESIZE, Image.Resampling.BILINEAR)  # ...which is this crop, normalised
    torch.testing.assert_close(x, ((torch.from_numpy(pixels(crop)).permute(2, 0, 1)[None] / 255 - 0.5) / 0.5).float(),
                               atol=1e-6, rtol=0)
    with torch.no_grad():
        expected = dict(zip(STAND_IN_CLASSES, model.eval()(x).double().softmax(-1)[0].tolist()))
    assert probs == pytest.approx(expected, abs=1e-5)
    assert expected == pytest.approx(reference_probabilities(resized, image), abs=1e-9)
    # ...not the answer of the same weights on the 32/32 crop.
    plain = classify_tab.classify(image, models.SHIPPED)[0]
    assert plain == pytest.approx(reference_probabilities(shipped, image), abs=1e-5)
    assert max(abs(probs[c] - plain[c]) for c in STAND_IN_CLASSES) > 1e-3


@pytest.mark.parametrize("index", [0, 3])
def test_patch_grid_shows_the_checkpoints_crop(index):
    """The numbered grid is the 32 px view enlarged 8 times (no smoothing): the centre of each
    enlarged pixel below the numbers (the lower half of each 32 px cell) is the view's pixel."""
    image = sample_images()[index]
    grids = {name: pixels(patches_tab.patches(image, name)[0]) for name in (RESIZED, models.SHIPPED)}
    assert grids[RESIZED].shape == (256, 256, 3)
    rows = [i for i in range(SIZE) if i % 4 >= 2]  # the lower half of every 4 px patch
    sample = {name: grid[4::8, 4::8][rows] for name, grid in grids.items()}
    expected = {RESIZED: crop_by_hand(image, RESIZE, Image.Resampling.BILINEAR)[0],
                models.SHIPPED: crop_by_hand(image, SIZE, Image.Resampling.BICUBIC)[0]}
    for name, crop in expected.items():
        assert np.array_equal(sample[name], pixels(crop)[rows]), name
    assert np.abs(sample[RESIZED] - sample[models.SHIPPED]).mean() > 5  # the two crops differ


@pytest.mark.parametrize("index", [0, 3])
def test_overlays_show_the_checkpoints_crop(index):
    """At opacity 0 the attention map's picture (left of its colour bar) and each head's tile are
    the checkpoint's crop of the image, drawn from the original's pixels."""
    image = sample_images()[index]
    out = attention_tab.explain(image, RESIZED, None, opacity=0.0)
    rollout = pixels(out[0])[:, :common.VIEW_SIZE]
    expected = pixels(view_by_hand(image, common.VIEW_SIZE))
    assert np.abs(rollout - expected).max() <= 1
    plain = pixels(attention_tab.explain(image, models.SHIPPED, None, opacity=0.0)[0])[:, :common.VIEW_SIZE]
    assert np.abs(plain - expected).mean() > 5  # the 32/32 checkpoint's picture: another square

    band = 13 + 6  # `tile_grid`'s label band at its default label size
    tile = pixels(out[1])[band:band + attention_tab.HEAD_TILE, :attention_tab.HEAD_TILE]
    crop, _ = crop_by_hand(image, RESIZE, Image.Resampling.BILINEAR)
    assert np.abs(tile - pixels(crop.resize((attention_tab.HEAD_TILE,) * 2))).max() <= 1

