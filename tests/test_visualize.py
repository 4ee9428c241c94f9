"""The pictures pin what they draw, not just their shapes: patch grids and maps over the very
pixels the model read, colour scales, and figures that read like the paper's. The numbers they
show are tested in test_explanations.py."""

import numpy as np
import pytest
import torch
from PIL import Image

import vitdemo
from vitdemo.data import Preprocessing
from vitdemo import explanations as E
from vitdemo import visualize as V


def test_patch_grid_and_sequence():
    img = Image.new("RGB", (300, 200), (10, 200, 30))
    grid, strip = V.patch_grid(img, 16, image_size=224)
    assert grid.size == (224, 224)
    ps = 16
    per_row = 28
    assert strip.size == (per_row * (ps + 2) - 2, 7 * (ps + 2) - 2)  # 196 patches, 28 a row
    # Grid lines are drawn between patches: pixel on a line is white, inside a patch green.
    assert grid.getpixel((16, 5)) == (255, 255, 255)
    assert grid.getpixel((8, 8)) == (10, 200, 30)
    with pytest.raises(ValueError, match="divisible"):
        V.patch_grid(Image.new("RGB", (50, 50)), 16)


def test_patch_sequence_order_is_row_major():
    img = Image.new("RGB", (32, 32))
    img.paste((255, 0, 0), (16, 0, 32, 16))  # patch (0, 1) is red -> second in the sequence
    _, strip = V.patch_grid(img, 16, per_row=4, gap=0)
    scale = 256 // 32
    assert strip.getpixel((16 * scale + 3, 3)) == (255, 0, 0)
    assert strip.getpixel((3, 3)) == (0, 0, 0)


def test_overlay_opacity():
    img = Image.new("RGB", (64, 64), (0, 0, 255))
    mask = torch.rand(4, 4)
    assert np.array_equal(np.asarray(V.overlay(img, mask, alpha=0.0)), np.asarray(img))
    full = np.asarray(V.overlay(img, torch.ones(4, 4), alpha=1.0, cmap="gray"))
    assert (full == 255).all()
    with pytest.raises(ValueError, match="alpha"):
        V.overlay(img, mask, alpha=1.5)


# ---------------------------------------------------------------------------------------------
# One crop for the model and its pictures (a checkpoint whose resize exceeds its image_size,
# as fine-tunes from torchvision or timm weights have: 256 or 248 for 224)
# ---------------------------------------------------------------------------------------------


def marked(w=96, h=64, box=(33, 17, 40, 24)):
    """Dark grey with one white rectangle (left, top, right, bottom)."""
    a = np.full((h, w, 3), 40, np.uint8)
    a[box[1]:box[3], box[0]:box[2]] = 255
    return Image.fromarray(a)


def brightest_patch(image, image_size=32, resize=64, patch=8):
    """The (row, col) of the patch the model reads as brightest, from its own input tensor."""
    from vitdemo.data import preprocess

    x = preprocess(image, image_size, (0, 0, 0), (1, 1, 1), resize=resize)[0].mean(0)
    g = image_size // patch
    per_patch = x.reshape(g, patch, g, patch).mean((1, 3))
    return divmod(int(per_patch.argmax()), g), per_patch


def test_overlay_puts_a_hot_patch_on_the_pixels_that_made_it():
    """Image 96 x 64, model image_size 32, resize 64, patch 8: the model reads the centre
    columns 32-63, rows 16-47, and the white box (33-39, 17-23) falls in its patch (0, 0). A map
    hot at that patch, drawn at 128 px, must be hot over the box as drawn there (4-31 px):
    pictures that ignore `resize` (the centre 64 x 64 square) put the box at 34-47 px instead."""
    image = marked()
    (r, c), per_patch = brightest_patch(image)
    assert (r, c) == (0, 0)
    mask = (per_patch == per_patch.max()).float()
    crop = dict(image_size=32, resize=64)
    heat = np.asarray(V.overlay(image, mask, alpha=1.0, cmap="gray", size=128, **crop))[..., 0].astype(float)
    picture = np.asarray(V.overlay(image, mask, alpha=0.0, size=128, **crop))[..., 0]
    ys, xs = np.nonzero(picture > 200)  # the box, where the overlay draws it
    assert (xs.mean(), ys.mean()) == pytest.approx((18, 18), abs=0.6)
    cells = heat.reshape(4, 32, 4, 32).mean((1, 3))  # the heat on the model's 4 x 4 grid
    assert np.unravel_index(cells.argmax(), cells.shape) == (int(ys.mean()) // 32, int(xs.mean()) // 32) == (0, 0)
    assert heat[picture > 200].mean() > 0.6 * 255  # the box is under the hot part of the map


def test_patch_grid_draws_the_pixels_the_model_reads_in_each_patch():
    image = marked()
    (r, c), _ = brightest_patch(image)
    grid, strip = V.patch_grid(image, 8, image_size=32, resize=64, per_row=16, gap=0)
    assert grid.size == (256, 256)  # 32 px drawn 8x larger
    assert grid.getpixel((36, 36)) == (255, 255, 255)  # the box's centre (36.5 - 32, 20.5 - 16) x 8
    tiles = np.asarray(strip)[..., 0].reshape(64, 16, 64)  # one row of 16 tiles of 64 px (8 px patches, 8x)
    white = [k for k in range(16) if (tiles[:, k] > 200).any()]
    assert white == [r * 4 + c] == [0]


def test_explain_draws_its_maps_over_the_crop_the_model_saw(tmp_path, monkeypatch):
    """`python -m vitdemo explain` with a checkpoint of resize 64 > image_size 32."""
    from vitdemo.checkpoint import save_checkpoint
    from vitdemo.cli import main

    torch.manual_seed(0)
    model = vitdemo.create_model("vit_cifar_4", num_classes=2, patch_size=8, depth=1, embed_dim=32, num_heads=2,
                                 mlp_dim=64)
    ckpt = save_checkpoint(tmp_path / "m.safetensors", model, ["a", "b"],
                           Preprocessing(32, (0.5,) * 3, (0.5,) * 3, resize=64))
    marked().save(tmp_path / "in.png")
    (r, c), _ = brightest_patch(marked())
    hot = torch.zeros(1, 4, 4)
    hot[0, r, c] = 1.0  # maps hot where the model read the box, whatever this random model attends to
    monkeypatch.setattr(E, "attention_rollout", lambda *args, **kwargs: hot)
    monkeypatch.setattr(E, "gradient_rollout", lambda *args, **kwargs: hot)
    assert main(["explain", str(tmp_path / "in.png"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "v")]) == 0
    with Image.open(tmp_path / "v" / "patches.png") as grid:
        assert grid.size == (256, 256) and grid.getpixel((36, 36)) == (255, 255, 255)
    for name in ("rollout.png", "gradient_rollout.png"):
        with Image.open(tmp_path / "v" / name) as im:
            assert im.size == (256, 256)
            # Inside the box (drawn at 8-55 px) and in the flat-hot corner of the upsampled map
            # (0-31 px): a white picture under the map's hottest colour, every channel high. A
            # picture of another crop has its grey background (40) here: red 146 at most.
            assert min(im.convert("RGB").getpixel((20, 20))) > 180, name


# ---------------------------------------------------------------------------------------------
# Figures that read like the paper's: colour scales, highlights, integer layers, Fig. 1
# ---------------------------------------------------------------------------------------------


def test_heatmap_on_a_fixed_scale_keeps_values_comparable():
    """With vmin/vmax a value has one colour whatever else the map holds (the similarity map
    uses -1..1, as its colour bar says); without, the map is min-max scaled."""
    from matplotlib import colormaps

    m = np.array([[0.0, 0.5]])
    fixed = np.asarray(V.heatmap(m, size=2, cmap="viridis", vmin=-1, vmax=1))
    expected = (colormaps["viridis"](np.array([0.5, 0.75]))[:, :3] * 255).astype(np.uint8)
    np.testing.assert_array_equal(fixed[0], expected)
    scaled = np.asarray(V.heatmap(m, size=2, cmap="viridis"))
    np.testing.assert_array_equal(scaled[0], (colormaps["viridis"](np.array([0.0, 1.0]))[:, :3] * 255).astype(np.uint8))


def test_position_figure_outlines_the_chosen_tile():
    """On a 2 x 3 grid (non-square, so a transposed highlight fails), the red rectangle encloses
    exactly the mosaic pixels of tile (1, 2): position (1, 2)'s similarities."""
    from matplotlib.patches import Rectangle

    sim = torch.arange(36, dtype=torch.float32).reshape(2, 3, 2, 3) / 36
    fig = V.plot_position_embedding_similarity(sim, highlight=(1, 2))
    ax = fig.axes[0]
    (rect,) = [p for p in ax.patches if isinstance(p, Rectangle)]
    mosaic = ax.images[0].get_array()
    x0, y0 = round(rect.get_x() + 0.5), round(rect.get_y() + 0.5)
    assert (rect.get_width(), rect.get_height()) == (3, 2)
    np.testing.assert_allclose(mosaic[y0:y0 + 2, x0:x0 + 3], sim[1, 2].numpy())
    assert not [p for p in V.plot_position_embedding_similarity(sim).axes[0].patches if isinstance(p, Rectangle)]
    with pytest.raises(ValueError, match="highlight"):
        V.plot_position_embedding_similarity(sim, highlight=(2, 0))


@pytest.mark.parametrize("layers", [4, 12])
def test_attention_distance_plot_numbers_layers_with_whole_numbers(layers):
    ax = V.plot_mean_attention_distance(torch.rand(layers, 3) * 10, image_size=32).axes[0]
    lo, hi = ax.get_xlim()
    shown = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert all(float(t).is_integer() for t in shown) and shown[0] >= 1 and shown[-1] <= layers
    if layers == 4:
        assert shown == [1, 2, 3, 4]  # not 1.0, 1.5, 2.0, ...


def test_sequence_columns_are_class_token_then_patches_in_reading_order():
    from vitdemo.figures import sequence_columns

    assert sequence_columns(64, first=5) == [("0*", None), ("1", 0), ("2", 1), ("3", 2), ("4", 3), ("5", 4),
                                             ("…", None), ("64", 63)]
    assert sequence_columns(6, first=5) == [("0*", None)] + [(str(k + 1), k) for k in range(6)]


def test_token_sequence_draws_each_patch_as_its_numbered_token():
    """Fig. 1 for a 3 x 2 grid of distinct patches: each thumbnail labelled "token k" holds exactly
    patch k's pixels in reading order (row by row: a column-major order fails), every token gets a
    "+" (its position embedding), the class token 0* comes first, and N + 1 tokens are counted."""
    from vitdemo.figures import token_sequence

    a = np.zeros((32, 48, 3), np.uint8)
    for k in range(6):
        r, c = divmod(k, 3)
        a[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = (40 * k, 255 - 40 * k, 7 * k)
    a[3, 5] = (1, 2, 3)  # a pixel that tells the inside of patch 1 from a flipped copy
    ax = token_sequence(Image.fromarray(a), 16).axes[0]
    thumbs = {im.get_label(): np.asarray(im.get_array()) for im in ax.images}
    assert sorted(thumbs) == [f"token {k}" for k in range(1, 7)]
    for k in range(6):
        r, c = divmod(k, 3)
        np.testing.assert_array_equal(thumbs[f"token {k + 1}"], a[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16])
    xs = {im.get_label(): im.get_extent()[0] for im in ax.images}
    assert sorted(xs, key=xs.get) == [f"token {k}" for k in range(1, 7)]  # drawn left to right in order
    texts = [t.get_text() for t in ax.texts]
    tokens = [t for t in ax.texts if t.get_text() in {"0*", *map(str, range(1, 7))}]
    assert [t.get_text() for t in sorted(tokens, key=lambda t: t.get_position()[0])] == ["0*", "1", "2", "3", "4", "5",
                                                                                        "6"]
    assert texts.count("+") == 7 and any("7 tokens" in t for t in texts)
    with pytest.raises(ValueError, match="divisible"):
        token_sequence(Image.new("RGB", (50, 32)), 16)


def test_numbered_patch_grid_numbers_patches_row_by_row():
    """A 14 x 14 grid (ViT-B/16 at 224): cells are enlarged to fit three digits, and the ink of
    each number is as wide as its digits: cell (0, 9) holds "10" (two digits; column-major order
    would write "127"), cell (7, 1) "100" (column-major: "22"), cell (0, 3) "4" (column-major:
    "43"). The rest of each cell is the picture with its grid, as `patch_grid` draws it."""
    from vitdemo.figures import numbered_patch_grid

    img = Image.new("RGB", (224, 224), (0, 120, 0))
    grid = numbered_patch_grid(img, 16, 224)
    assert grid.size == (448, 448)
    plain = V.patch_grid(img, 16, 224)[0].resize((448, 448), Image.Resampling.NEAREST)
    ink = (np.asarray(grid) != np.asarray(plain)).any(-1)
    cell = 32

    def ink_width(r, c):
        box = ink[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
        assert not box[cell // 2 + 2:, cell // 2:].any()  # the bottom-right quarter is the picture
        cols = np.nonzero(box.any(0))[0]
        return cols.max() - cols.min() + 1

    one, two, three = ink_width(0, 3), ink_width(0, 9), ink_width(7, 1)
    assert one < two < three


def test_with_colorbar_keeps_the_picture_and_runs_low_to_high_upwards():
    from matplotlib import colormaps
    from vitdemo.figures import with_colorbar

    rng = np.random.default_rng(0)
    pic = Image.fromarray(rng.integers(0, 256, (120, 150, 3), dtype=np.uint8))
    out = with_colorbar(pic, cmap="viridis", vmin=-1, vmax=1, label="cosine similarity", bar_width=90)
    assert out.size == (240, 120)
    assert np.abs(np.asarray(out)[:, :150].astype(int) - np.asarray(pic).astype(int)).max() <= 2
    bar = np.asarray(out)[:, 150 + 12 + 7].astype(int)  # the middle of the 14 px bar
    top, bottom = bar[14], bar[-14]
    hi, lo = (np.array(colormaps["viridis"](v)[:3]) * 255 for v in (1.0, 0.0))
    assert np.abs(top - hi).max() < 30 and np.abs(bottom - lo).max() < 30


def test_tile_grid_writes_labels_above_the_tiles_not_over_them():
    from vitdemo.figures import tile_grid

    tiles = [Image.new("RGB", (20, 10), (10 * k, 50, 200)) for k in range(5)]
    out = tile_grid(tiles, [f"head {k + 1}" for k in range(5)], columns=3, gap=4, label_size=10)
    band = 10 + 6
    assert out.size == (3 * 24 - 4, 2 * (10 + band + 4) - 4)
    a = np.asarray(out)
    for k in range(5):
        r, c = divmod(k, 3)
        x, y = c * 24, r * (10 + band + 4) + band
        assert (a[y:y + 10, x:x + 20] == (10 * k, 50, 200)).all()  # every pixel of the tile is its own
        assert (a[y - band:y, x:x + 20] != 255).any()  # its label is written in the band above
    with pytest.raises(ValueError, match="one label per tile"):
        tile_grid(tiles, ["a"], columns=2)


def test_history_plot_draws_each_series_it_has_and_skips_missing_values():
    history = {"train_loss": [2.0, 1.5], "train_acc": [0.2, 0.4], "test_loss": [None, 1.2],
               "test_acc": [None, 0.6], "ema_val_loss": [1.9, 1.3], "ema_val_acc": [0.3, 0.55]}
    loss_ax, acc_ax = V.plot_history(history).axes
    lines = {line.get_label(): line.get_ydata() for line in acc_ax.get_lines()}
    assert list(lines) == ["train", "validation", "validation, EMA weights"]
    np.testing.assert_allclose(lines["validation, EMA weights"], [0.3, 0.55])
    assert np.isnan(lines["validation"][0]) and lines["validation"][1] == 0.6
    # A run without the moving average draws no third line.
    without = {k: v for k, v in history.items() if not k.startswith("ema")}
    assert [line.get_label() for line in V.plot_history(without).axes[0].get_lines()] == ["train", "validation"]
