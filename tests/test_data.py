"""Data loading: image folders and zips (including hostile ones), CIFAR-10 offline behaviour,
the synthetic shapes, splitting, batching, normalisation and the inference path (batch
augmentation: test_augment.py)."""

import io
import stat
import struct
import tarfile
import tempfile
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from vitdemo.data import (
    CIFAR10_CLASSES,
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SHAPES,
    DataError,
    ImageData,
    iterate_batches,
    load_cifar10,
    load_image,
    load_image_folder,
    load_zip,
    model_crop,
    model_crop_batch,
    normalize,
    num_batches,
    preprocess,
    safe_extract_zip,
    stratified_split,
    synthetic_shapes,
)

CIFAR_TAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-train.tar.gz"


def rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def make_tree(root: Path, counts: dict[str, int], size: tuple[int, int] = (40, 30)) -> Path:
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            save(rgb(*size, seed=100 * c + i), root / name / f"{i:03d}.png")
    return root


def jpeg_bytes(w: int = 64, h: int = 64) -> bytes:
    buf = io.BytesIO()
    rgb(w, h).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


# ---------------------------------------------------------------------------------------------
# load_image_folder
# ---------------------------------------------------------------------------------------------


def test_folder_classes_sorted_sizes_and_labels(tmp_path):
    make_tree(tmp_path, {"zebra": 3, "ant": 2, "moose": 4}, size=(50, 30))
    save(rgb(30, 50), tmp_path / "ant" / "tall.jpg")  # portrait as well as landscape
    data = load_image_folder(tmp_path, image_size=24, progress=False)
    assert data.class_names == ["ant", "moose", "zebra"]
    assert data.images.shape == (10, 3, 24, 24) and data.images.dtype == torch.uint8
    assert data.labels.dtype == torch.int64
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert data.skipped == [] and len(data) == 10


def test_folder_resizes_shorter_side_then_crops_the_centre(tmp_path):
    # 64 x 32: red | green (middle half) | blue. Shorter side 32 -> 16 gives 32 x 16; the centre
    # 16 x 16 is exactly the green half.
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :16, 0] = 255
    a[:, 16:48, 1] = 255
    a[:, 48:, 2] = 255
    save(Image.fromarray(a), tmp_path / "a" / "x.png")
    save(rgb(16, 16), tmp_path / "b" / "y.png")
    img = load_image_folder(tmp_path, image_size=16, progress=False).images[0]
    assert img.shape == (3, 16, 16)
    inner = img[:, :, 1:-1].int()  # bicubic rings slightly at the borders of the green band
    assert (inner[1] > 240).all() and (inner[0] < 15).all() and (inner[2] < 15).all()


def test_folder_fast_path_keeps_pixels_of_images_already_the_right_size(tmp_path):
    images = [rgb(8, 8, seed=i) for i in range(4)]
    for i, im in enumerate(images):
        save(im, tmp_path / ("a" if i < 2 else "b") / f"{i}.png")
    data = load_image_folder(tmp_path, image_size=8, progress=False)
    for i, im in enumerate(images):
        assert torch.equal(data.images[i], torch.from_numpy(np.array(im)).permute(2, 0, 1))


def test_folder_skips_unreadable_files_and_ignores_hidden_ones(tmp_path):
    make_tree(tmp_path, {"cat": 2, "dog": 2})
    (tmp_path / "cat" / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (tmp_path / "cat" / "truncated.jpg").write_bytes(jpeg_bytes()[:600])
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / ".DS_Store").write_bytes(b"\0\1")
    save(rgb(8, 8), tmp_path / "__MACOSX" / "cat" / "._000.png")  # macOS debris, not a class
    save(rgb(8, 8), tmp_path / ".hidden" / "x.png")
    data = load_image_folder(tmp_path, image_size=16, progress=False)
    assert data.class_names == ["cat", "dog"]
    assert len(data) == 4 and data.labels.tolist() == [0, 0, 1, 1]
    assert len(data.skipped) == 3
    skipped = "\n".join(data.skipped)
    for name in ("corrupt.jpg", "truncated.jpg", "notes.txt"):
        assert name in skipped
    assert "truncated" in [s for s in data.skipped if "truncated.jpg" in s][0].split(":", 1)[1]


def test_folder_result_does_not_depend_on_the_number_of_threads(tmp_path):
    make_tree(tmp_path, {"a": 7, "b": 5}, size=(30, 20))
    one = load_image_folder(tmp_path, image_size=12, progress=False, num_workers=1)
    many = load_image_folder(tmp_path, image_size=12, progress=False, num_workers=4)
    assert torch.equal(one.images, many.images) and torch.equal(one.labels, many.labels)


def test_folder_max_images_per_class(tmp_path):
    make_tree(tmp_path, {"a": 5, "b": 3})
    data = load_image_folder(tmp_path, image_size=8, max_images_per_class=2, progress=False)
    assert data.labels.tolist() == [0, 0, 1, 1]


def test_folder_descends_into_a_single_wrapper_folder(tmp_path):
    make_tree(tmp_path / "cifar10" / "train", {"cat": 2, "dog": 1})
    data = load_image_folder(tmp_path, image_size=8, progress=False)
    assert data.class_names == ["cat", "dog"] and len(data) == 3


def test_folder_with_train_and_test_splits_says_which_to_pick(tmp_path):
    make_tree(tmp_path / "pizza_steak_sushi" / "train", {"pizza": 1, "steak": 1})
    make_tree(tmp_path / "pizza_steak_sushi" / "test", {"pizza": 1, "steak": 1})
    with pytest.raises(DataError, match=r"\['test', 'train'\].*point at one of them"):
        load_image_folder(tmp_path, image_size=8, progress=False)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_image_folder(tmp_path / "missing", progress=False)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        load_image_folder(tmp_path / "file.png", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_image_folder(tmp_path / "empty", progress=False)

    make_tree(tmp_path / "one", {"pizza": 2})
    with pytest.raises(DataError, match=r"needs at least 2 classes, found 1: \['pizza'\]"):
        load_image_folder(tmp_path / "one", progress=False)

    for c in ("a", "b"):
        (tmp_path / "text" / c).mkdir(parents=True)
        (tmp_path / "text" / c / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match="no readable images"):
        load_image_folder(tmp_path / "text", progress=False)

    make_tree(tmp_path / "half", {"good": 2})
    (tmp_path / "half" / "broken").mkdir()
    (tmp_path / "half" / "broken" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"no readable images: \['broken'\]"):
        load_image_folder(tmp_path / "half", progress=False)


def test_folder_skips_decompression_bombs(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    save(rgb(20, 20), tmp_path / "a" / "ok.png")
    save(rgb(20, 20), tmp_path / "b" / "ok.png")
    save(rgb(40, 40), tmp_path / "a" / "warn.png")  # 1x-2x the limit: Pillow only warns
    save(rgb(50, 50), tmp_path / "b" / "error.png")  # over 2x: Pillow raises
    data = load_image_folder(tmp_path, image_size=8, progress=False)
    assert len(data) == 2 and len(data.skipped) == 2
    assert all("decompression bomb" in s for s in data.skipped)


# ---------------------------------------------------------------------------------------------
# Pixel modes, shared by the folder loader and load_image
# ---------------------------------------------------------------------------------------------


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).reshape(-1, 3).astype(int)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)
    path = save(Image.fromarray(a), tmp_path / "a" / "deep.png")
    with Image.open(path) as check:
        assert check.mode in ("I;16", "I")
    expected = [0, 128, 255, 4]  # v * 255 / 65535, rounded
    assert _pixels(load_image(path))[:, 0].tolist() == expected
    save(rgb(2, 2), tmp_path / "b" / "x.png")
    data = load_image_folder(tmp_path, image_size=2, progress=False)
    assert data.images[0].reshape(3, -1)[0].tolist() == expected
    assert torch.equal(data.images[0][0], data.images[0][2])  # grey: R == G == B


def test_32_bit_integer_mode(tmp_path):
    image = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert image.mode == "I"
    path = save(image, tmp_path / "deep.tif")
    assert _pixels(load_image(path))[:, 0].tolist() == [0, 255]


def test_transparency_is_composited_on_white():
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    got = _pixels(load_image(png_bytes(Image.fromarray(rgba, "RGBA"))))
    assert got[0].tolist() == [255, 0, 0] and got[1].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in got[2])

    la = Image.fromarray(np.array([[[0, 255], [0, 0]]], np.uint8), "LA")
    assert _pixels(load_image(png_bytes(la))).tolist() == [[0, 0, 0], [255, 255, 255]]


def test_palette_with_transparent_index():
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 255] + [10, 200, 30] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    assert _pixels(load_image(png_bytes(p))).tolist() == [[255, 255, 255], [10, 200, 30]]


def test_grey_bilevel_and_cmyk(tmp_path):
    grey = Image.fromarray(np.array([[0, 77, 255]], np.uint8))
    assert _pixels(load_image(png_bytes(grey))).tolist() == [[0, 0, 0], [77, 77, 77], [255, 255, 255]]
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    assert _pixels(load_image(png_bytes(bilevel))).tolist() == [[0, 0, 0], [255, 255, 255]]
    cmyk = Image.new("CMYK", (1, 1), (255, 0, 0, 0))  # pure cyan
    path = save(cmyk, tmp_path / "cyan.tif")
    assert _pixels(load_image(path)).tolist() == [[0, 255, 255]]


def test_exif_orientation_is_applied(tmp_path):
    image = rgb(20, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = save(image, tmp_path / "phone.jpg", exif=exif)
    with Image.open(path) as check:
        assert check.size == (20, 10)
    assert load_image(path).size == (10, 20)


# ---------------------------------------------------------------------------------------------
# load_image and preprocess
# ---------------------------------------------------------------------------------------------


def test_load_image_rejects_garbage_truncated_and_bombs(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="not an image or corrupt"):
        load_image(np.random.default_rng(0).bytes(1000))
    png = png_bytes(rgb(64, 64))
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(DataError, match="not an image or corrupt.*cut.png"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(DataError, match="not an image or corrupt"):
        load_image(io.BytesIO(jpeg_bytes()[:600]))
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "nope.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for side in (40, 50):  # the warning band and the error band
        with pytest.raises(DataError, match="decompression bomb"):
            load_image(png_bytes(rgb(side, side)))
    assert load_image(png_bytes(rgb(20, 20))).size == (20, 20)


def test_load_image_reports_a_bug_or_the_machine_as_what_it_is_not_as_a_bad_file(tmp_path, monkeypatch):
    """A MemoryError, a PermissionError or a bug in vitdemo's own code is not "not an image or
    corrupt": the first and the last surface as they are, the second says the file cannot be read."""
    import vitdemo.data.images as D
    from PIL import ImageFile

    path = save(rgb(20, 20), tmp_path / "fine.png")

    def bug(image):
        raise AttributeError("'NoneType' object has no attribute 'convert'")

    with monkeypatch.context() as m:
        m.setattr(D, "to_rgb", bug)  # vitdemo's own conversion, after decoding
        with pytest.raises(AttributeError, match="no attribute 'convert'"):
            load_image(path)

    def no_memory(self, *args, **kwargs):
        raise MemoryError()

    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", no_memory)  # while Pillow decodes
        with pytest.raises(MemoryError):
            load_image(path)

    def denied(fp, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(fp))

    with monkeypatch.context() as m:
        m.setattr(Image, "open", denied)
        with pytest.raises(DataError, match=r"cannot read .*fine\.png: Permission denied") as err:
            load_image(path)
        assert "corrupt" not in str(err.value) and "not an image" not in str(err.value)
    assert load_image(path).size == (20, 20)


def test_folder_loader_skips_bad_files_but_surfaces_bugs(tmp_path, monkeypatch):
    """A bug must not turn every file into a skipped one ("no readable images"); a file that
    cannot be opened is skipped with the true reason."""
    import vitdemo.data.folders as D
    from PIL import ImageFile

    make_tree(tmp_path, {"cat": 2, "dog": 2})

    def bug(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for *: 'NoneType' and 'int'")

    with monkeypatch.context() as m:
        m.setattr(D, "model_crop", bug)
        with pytest.raises(TypeError, match="unsupported operand"):
            load_image_folder(tmp_path, image_size=16, progress=False)

    def no_memory(self, *args, **kwargs):
        raise MemoryError()

    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", no_memory)
        with pytest.raises(MemoryError):
            load_image_folder(tmp_path, image_size=16, progress=False, num_workers=1)

    real_open = Image.open

    def denied_for_one(fp, *args, **kwargs):
        if Path(fp).parts[-2:] == ("dog", "001.png"):
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Image, "open", denied_for_one)
        data = load_image_folder(tmp_path, image_size=16, progress=False)
    assert len(data) == 3 and data.labels.tolist() == [0, 0, 1]
    assert data.skipped == ["dog/001.png: cannot read the file (Permission denied)"]


def test_preprocess_matches_what_the_folder_loader_stored(tmp_path):
    paths = [save(rgb(45, 31, seed=1), tmp_path / "a" / "x.jpg"), save(rgb(20, 60, seed=2), tmp_path / "b" / "y.png")]
    data = load_image_folder(tmp_path, image_size=24, progress=False)
    for i, path in enumerate(paths):
        x = preprocess(load_image(path), 24, IMAGENET_MEAN, IMAGENET_STD)
        assert x.shape == (1, 3, 24, 24) and x.dtype == torch.float32
        torch.testing.assert_close(x, normalize(data.images[i : i + 1], IMAGENET_MEAN, IMAGENET_STD), rtol=0, atol=0)


def test_preprocess_resize_then_centre_crop():
    a = np.zeros((40, 40, 3), np.uint8)
    a[10:30, 10:30] = 255  # a white square in the middle half
    image = Image.fromarray(a)
    x = preprocess(image, 20, (0, 0, 0), (1, 1, 1), resize=40, interpolation="nearest")
    assert torch.equal(x, torch.ones(1, 3, 20, 20))  # no resize, only the centre kept
    y = preprocess(image, 20, (0, 0, 0), (1, 1, 1))  # shrink to 20: whole image, square in the middle
    assert y[0, :, 10, 10].min() > 0.9 and y[0, :, 0, 0].max() < 0.1
    with pytest.raises(ValueError):
        preprocess(image, 20, (0, 0, 0), (1, 1, 1), resize=10)


def marked(w: int = 96, h: int = 64, box: tuple[int, int, int, int] = (33, 17, 40, 24)) -> Image.Image:
    """Dark grey with one white rectangle (left, top, right, bottom), to find where pixels go."""
    a = np.full((h, w, 3), 40, np.uint8)
    a[box[1]:box[3], box[0]:box[2]] = 255
    return Image.fromarray(a)


def centroid(image: Image.Image) -> tuple[float, float]:
    """(x, y) centre of the white pixels."""
    ys, xs = np.nonzero(np.asarray(image)[..., 0] > 200)
    return float(xs.mean()), float(ys.mean())


def test_model_crop_is_the_square_preprocess_feeds_the_model():
    """resize 64 = the shorter side of a 96 x 64 image: no scaling, the model sees the central
    32 x 32 pixels, columns 32-63 and rows 16-47, exactly."""
    image = marked()
    crop = model_crop(image, 32, resize=64)
    assert np.array_equal(np.asarray(crop), np.asarray(image.crop((32, 16, 64, 48))))
    x = preprocess(image, 32, (0, 0, 0), (1, 1, 1), resize=64)
    assert torch.equal((x[0] * 255).round().to(torch.uint8), TF.pil_to_tensor(crop))
    # Drawn at 128 px for display: the same square, 4x larger, so the box (33-39, 17-23) lands at 4-31.
    assert centroid(model_crop(image, 32, resize=64, size=128)) == pytest.approx((18, 18), abs=0.6)


@pytest.mark.parametrize("size", [32, 128, 320])
def test_model_crop_at_any_size_is_the_same_region_when_resizing(size):
    """resize 48: the 96 x 64 image shrinks to 72 x 48 and the crop (20, 8)-(52, 40) of that is
    (26.67, 10.67)-(69.33, 53.33) of the original; the box's centre (36.5, 20.5) is drawn at
    ((36.5 - 26.67) / 42.67, (20.5 - 10.67) / 42.67) of the square, whatever its size."""
    image = marked()
    view = model_crop(image, 32, resize=48, size=size)
    assert view.size == (size, size) and view.mode == "RGB"
    expected = ((36.5 - 80 / 3) / (128 / 3) * size, (20.5 - 32 / 3) / (128 / 3) * size)
    assert centroid(view) == pytest.approx(expected, abs=max(0.75, size / 64))
    if size == 32:  # the model's own pixels: what preprocess normalises
        x = preprocess(image, 32, (0, 0, 0), (1, 1, 1), resize=48)
        assert torch.equal((x[0] * 255).round().to(torch.uint8), TF.pil_to_tensor(view))


@pytest.mark.parametrize("side, image_size, resize", [(32, 56, None), (40, 24, None), (40, 24, 30), (32, 32, 36)])
def test_model_crop_batch_gives_training_the_pixels_preprocess_gives_prediction(side, image_size, resize):
    """The app's Train tab resizes a uint8 batch (CIFAR's 32 px to a fine-tune's size); each
    image must be what `preprocess` makes of it: the same filter, antialiasing and crop. A
    bilinear resize of the tensor (what the app did) differs by up to tens of levels."""
    batch = torch.from_numpy(np.random.default_rng(side).integers(0, 256, (3, side, side, 3), dtype=np.uint8))
    out = model_crop_batch(batch.permute(0, 3, 1, 2), image_size, resize=resize)
    assert out.shape == (3, 3, image_size, image_size) and out.dtype == torch.uint8
    for i in range(3):
        x = preprocess(Image.fromarray(batch[i].numpy()), image_size, (0, 0, 0), (1, 1, 1), resize=resize)
        assert torch.equal(out[i], (x[0] * 255).round().to(torch.uint8)), i
    bilinear = F.interpolate(batch.permute(0, 3, 1, 2).float(), size=(image_size, image_size), mode="bilinear",
                             antialias=True, align_corners=False).round().clamp(0, 255).to(torch.uint8)
    if resize is None:
        assert (bilinear.int() - out.int()).abs().max() > 10  # why one resize path matters


def test_model_crop_batch_keeps_a_batch_already_at_size_and_checks_its_input():
    batch = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert model_crop_batch(batch, 8) is batch
    with pytest.raises(ValueError, match="uint8 batch"):
        model_crop_batch(batch.float(), 8)
    with pytest.raises(ValueError, match="resize"):
        model_crop_batch(batch, 8, resize=4)


def test_folder_loader_stores_the_crop_of_the_preprocessing_it_is_given(tmp_path):
    """A fine-tune from weights whose preprocessing resizes to 36 before cropping 32 must train on
    that crop, not on the whole image squeezed to 32."""
    paths = [save(rgb(50, 40, seed=3), tmp_path / "a" / "x.png"), save(rgb(30, 70, seed=4), tmp_path / "b" / "y.png")]
    data = load_image_folder(tmp_path, image_size=32, resize=36, interpolation="bilinear", progress=False)
    for i, path in enumerate(paths):
        x = preprocess(load_image(path), 32, (0, 0, 0), (1, 1, 1), resize=36, interpolation="bilinear")
        assert torch.equal(data.images[i], (x[0] * 255).round().to(torch.uint8))
    with pytest.raises(DataError, match="resize"):
        load_image_folder(tmp_path, image_size=32, resize=16)


def test_model_crop_refuses_impossible_sizes():
    with pytest.raises(ValueError, match=r"resize \(10\) must be at least image_size \(20\)"):
        model_crop(marked(), 20, resize=10)
    with pytest.raises(ValueError, match="size must be a positive integer"):
        model_crop(marked(), 20, size=0)
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        model_crop(marked(), 0)


# ---------------------------------------------------------------------------------------------
# Zips
# ---------------------------------------------------------------------------------------------


def test_safe_extract_zip_extracts_files_and_folders(tmp_path):
    zpath = make_zip(tmp_path / "ok.zip", {"top/": b"", "top/a/x.txt": b"hello", "top/b/y.bin": b"\0" * 100})
    dest = safe_extract_zip(zpath, tmp_path / "out")
    assert dest == tmp_path / "out"
    assert (dest / "top" / "a" / "x.txt").read_bytes() == b"hello"
    assert (dest / "top" / "b" / "y.bin").stat().st_size == 100


@pytest.mark.parametrize(
    "name, reason",
    [("../evil.txt", r"'\.\.'"), ("a/../../evil.txt", r"'\.\.'"), ("..\\evil.txt", r"'\.\.'"),
     ("/tmp/evil.txt", "absolute"), ("C:/evil.txt", "absolute")],
)
def test_safe_extract_zip_refuses_paths_outside_dest(tmp_path, name, reason):
    zpath = make_zip(tmp_path / "bad.zip", {"fine.txt": b"ok", name: b"pwned"})
    with pytest.raises(DataError, match=reason) as info:
        safe_extract_zip(zpath, tmp_path / "out" / "dest")
    assert repr(name) in str(info.value) or name in str(info.value)
    assert not (tmp_path / "out" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "out" / "dest" / "fine.txt").exists()  # checked before anything is written


@pytest.mark.parametrize("name, kind, content, message", [
    ("a/link", stat.S_IFLNK | 0o777, "/etc/passwd", "'a/link'.*symbolic link"),
    ("fifo", stat.S_IFIFO | 0o644, "", "not a regular file"),
])
def test_safe_extract_zip_refuses_symlinks_and_special_files(tmp_path, name, kind, content, message):
    entry = zipfile.ZipInfo(name)
    entry.external_attr = kind << 16
    with zipfile.ZipFile(tmp_path / "in.zip", "w") as z:
        z.writestr(entry, content)
    with pytest.raises(DataError, match=message):
        safe_extract_zip(tmp_path / "in.zip", tmp_path / "out")


def test_safe_extract_zip_limits_entries_and_size(tmp_path):
    zpath = make_zip(tmp_path / "many.zip", {f"f{i}.txt": b"x" for i in range(6)})
    with pytest.raises(DataError, match="6 entries, more than the limit of 5"):
        safe_extract_zip(zpath, tmp_path / "out", max_files=5)
    assert safe_extract_zip(zpath, tmp_path / "out", max_files=6) == tmp_path / "out"

    # Compresses to a few dozen bytes, declares 10,000: refused before extraction.
    bomb = make_zip(tmp_path / "bomb.zip", {"a.txt": b"x" * 10, "zeros.bin": b"\0" * 10_000})
    assert bomb.stat().st_size < 1000
    with pytest.raises(DataError, match="'zeros.bin'.*limit of 1,000 bytes"):
        safe_extract_zip(bomb, tmp_path / "bomb", max_total_bytes=1000)
    assert not (tmp_path / "bomb" / "zeros.bin").exists()


def test_safe_extract_zip_a_lying_header_cannot_bomb(tmp_path, monkeypatch):
    # The headers claim 10 bytes; the deflate stream holds 100,000. Extraction must stop near the
    # claim (and fail), never write the real size.
    raw = bytearray(make_zip(tmp_path / "x.zip", {"a.bin": b"\0" * 100_000}).read_bytes())
    struct.pack_into("<I", raw, raw.find(b"PK\x03\x04") + 22, 10)  # local header: uncompressed size
    struct.pack_into("<I", raw, raw.find(b"PK\x01\x02") + 24, 10)  # central directory: same
    (tmp_path / "liar.zip").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="'a.bin'"):
        safe_extract_zip(tmp_path / "liar.zip", tmp_path / "out", max_total_bytes=1000)
    written = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written <= 1000

    # zipfile happens to stop at the declared size; the extractor must not rely on it.
    zpath = make_zip(tmp_path / "small.zip", {"a.bin": b"\0" * 10})
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, info, *a, **k: io.BytesIO(b"\0" * 5_000_000))
    with pytest.raises(DataError, match="'a.bin'.*limit of 1,000 bytes"):
        safe_extract_zip(zpath, tmp_path / "out2", max_total_bytes=1000)
    assert (tmp_path / "out2" / "a.bin").stat().st_size <= 1000


def test_safe_extract_zip_not_a_zip(tmp_path):
    (tmp_path / "photo.zip").write_bytes(jpeg_bytes())
    with pytest.raises(DataError, match="not a valid zip file"):
        safe_extract_zip(tmp_path / "photo.zip", tmp_path / "out")
    with pytest.raises(DataError, match="not found"):
        safe_extract_zip(tmp_path / "missing.zip", tmp_path / "out")


def test_load_zip_with_top_folder_nested_zip_and_cleanup(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    inner = make_zip(tmp_path / "inner.zip", {"pizza/x.png": png_bytes(rgb(8, 8))}).read_bytes()
    entries = {f"pizza_steak_sushi/{c}/{i}.png": png_bytes(rgb(12, 9, seed=i)) for c in ("pizza", "steak") for i in range(2)}
    entries["pizza_steak_sushi/steak/inner.zip"] = inner  # stays a file, so it is skipped as not an image
    entries["__MACOSX/pizza_steak_sushi/._x"] = b"\0"
    data = load_zip(make_zip(tmp_path / "food.zip", entries), image_size=8, progress=False)
    assert data.class_names == ["pizza", "steak"] and len(data) == 4
    assert len(data.skipped) == 1 and data.skipped[0].startswith("steak/inner.zip")
    assert list(scratch.iterdir()) == []  # the temporary folder is gone

    one_class = make_zip(tmp_path / "one.zip", {"pizza/0.png": png_bytes(rgb(8, 8))})
    with pytest.raises(DataError, match="at least 2 classes"):
        load_zip(one_class, image_size=8, progress=False)
    with pytest.raises(DataError, match="'..'"):
        load_zip(make_zip(tmp_path / "evil.zip", {"../x.png": b""}), image_size=8, progress=False)
    assert list(scratch.iterdir()) == []  # also after errors


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (offline)
# ---------------------------------------------------------------------------------------------


def test_load_cifar10_not_present_and_offline(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="not found.*download=True.*load_image_folder"):
        load_cifar10(tmp_path / "nothing_here", download=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match=r"could not download CIFAR-10 \(offline\?\).*name resolution"):
        load_cifar10(tmp_path, download=True)

    def broken(*args, **kwargs):
        raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", broken)
    with pytest.raises(DataError, match="could not download CIFAR-10"):
        load_cifar10(tmp_path, download=True)


def test_load_cifar10_converts_nhwc_to_nchw(tmp_path, monkeypatch):
    data = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            self.data, self.targets, self.classes = data, [3, 1, 4, 1, 5], list(CIFAR10_CLASSES)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    got = load_cifar10(tmp_path)
    assert got.images.shape == (5, 3, 32, 32) and got.images.is_contiguous()
    assert torch.equal(got.images[2, 1], torch.from_numpy(data[2, :, :, 1]))
    assert got.labels.tolist() == [3, 1, 4, 1, 5] and got.class_names == list(CIFAR10_CLASSES)


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_TAR.exists(), reason=f"the CIFAR-10 ImageFolder archive is not at {CIFAR_TAR}")
def test_cifar10_image_folder_copy(tmp_path):
    per_class: dict[str, int] = {}

    def first_30_per_class(member: tarfile.TarInfo, path: str):
        parts = member.name.split("/")
        if member.isfile() and len(parts) == 4 and per_class.get(parts[2], 0) < 30:
            per_class[parts[2]] = per_class.get(parts[2], 0) + 1
            return tarfile.data_filter(member, path)
        return None

    with tarfile.open(CIFAR_TAR) as tar:
        tar.extractall(tmp_path, filter=first_30_per_class)
    data = load_image_folder(tmp_path, image_size=32, progress=False)
    assert tuple(data.class_names) == CIFAR10_CLASSES
    assert data.images.shape == (300, 3, 32, 32) and data.skipped == []
    assert torch.bincount(data.labels).tolist() == [30] * 10


# ---------------------------------------------------------------------------------------------
# Synthetic shapes
# ---------------------------------------------------------------------------------------------


def test_synthetic_shapes_deterministic_balanced_and_private_rng():
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    a = synthetic_shapes(num_classes=4, per_class=50, image_size=32, seed=3)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()
    b = synthetic_shapes(num_classes=4, per_class=50, image_size=32, seed=3)
    c = synthetic_shapes(num_classes=4, per_class=50, image_size=32, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (200, 3, 32, 32) and a.images.dtype == torch.uint8
    assert a.labels.dtype == torch.int64 and torch.bincount(a.labels).tolist() == [50] * 4
    assert a.class_names == list(SHAPES[:4])
    assert a.images.float().std() > 30  # varied images, not blank


def test_synthetic_shapes_sizes_and_limits():
    d = synthetic_shapes(num_classes=len(SHAPES), per_class=3, image_size=48)
    assert d.images.shape == (3 * len(SHAPES), 3, 48, 48) and d.class_names == list(SHAPES)
    # Every image holds a shape: a region that differs from its local background.
    assert (d.images.float().std(dim=(2, 3)).mean(dim=1) > 15).all()
    with pytest.raises(DataError, match="num_classes"):
        synthetic_shapes(num_classes=len(SHAPES) + 1)
    with pytest.raises(DataError, match="num_classes"):
        synthetic_shapes(num_classes=1)


# ---------------------------------------------------------------------------------------------
# Splitting and batching
# ---------------------------------------------------------------------------------------------


def test_stratified_split_cifar_sized():
    labels = torch.arange(10).repeat_interleave(5000)[torch.randperm(50_000, generator=torch.Generator().manual_seed(0))]
    train, val = stratified_split(labels, 5000, seed=0)
    assert len(val) == 5000 and len(train) == 45_000
    assert torch.bincount(labels[val]).tolist() == [500] * 10
    assert torch.equal(torch.sort(torch.cat([train, val])).values, torch.arange(50_000))
    again_train, again_val = stratified_split(labels, 5000, seed=0)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    assert not torch.equal(val, stratified_split(labels, 5000, seed=1)[1])
    assert torch.equal(stratified_split(labels, 0.1, seed=0)[1], val)


def test_stratified_split_unbalanced_is_proportional():
    labels = torch.tensor([0] * 100 + [1] * 50 + [2] * 10)
    train, val = stratified_split(labels, 0.2)
    assert torch.bincount(labels[val]).tolist() == [20, 10, 2]
    assert torch.bincount(labels[train]).tolist() == [80, 40, 8]


def test_stratified_split_impossible():
    with pytest.raises(DataError, match="single image"):
        stratified_split(torch.tensor([0, 0, 0, 1]), 2)
    with pytest.raises(DataError, match="each of the 3 classes"):
        stratified_split(torch.tensor([0, 0, 1, 1, 2, 2]), 2)
    with pytest.raises(DataError, match="between 1 and"):
        stratified_split(torch.tensor([0, 0, 1, 1]), 4)
    with pytest.raises(DataError, match=r"\(0, 1\)"):
        stratified_split(torch.tensor([0, 0, 1, 1]), 1.5)


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(2, 40), min_size=2, max_size=6), frac=st.floats(0.05, 0.95), seed=st.integers(0, 9))
def test_stratified_split_properties(counts, frac, seed):
    labels = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
    n, k = len(labels), len(counts)
    val_size = min(max(round(frac * n), k), n - k)
    train, val = stratified_split(labels, val_size, seed=seed)
    assert len(val) == val_size and len(set(train.tolist()) | set(val.tolist())) == n
    per_class = torch.bincount(labels[val], minlength=k)
    assert (per_class >= 1).all() and (per_class <= torch.tensor(counts) - 1).all()
    if all(1 <= c * val_size / n <= c - 1 for c in counts):  # no class needed clamping
        assert ((per_class - torch.tensor(counts) * val_size / n).abs() < 1).all()


def small_data(n: int) -> ImageData:
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 2, 2).contiguous()
    return ImageData(images, torch.arange(n) % 3, ["a", "b", "c"])


def test_iterate_batches_covers_every_index_once():
    data = small_data(23)
    batches = list(iterate_batches(data, 5, shuffle=False))
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3] == [5] * 4 + [3]
    assert torch.cat([x[:, 0, 0, 0] for x, _ in batches]).tolist() == list(range(23))
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([x[:, 0, 0, 0] for x, _ in iterate_batches(data, 5, shuffle=True, generator=g)])
    assert sorted(seen.tolist()) == list(range(23)) and seen.tolist() != list(range(23))
    dropped = list(iterate_batches(data, 5, shuffle=True, generator=g, drop_last=True))
    assert [len(y) for _, y in dropped] == [5] * 4 == [5] * num_batches(23, 5, drop_last=True)
    for x, y in iterate_batches(data, 4, shuffle=True, generator=g):
        assert torch.equal(y, x[:, 0, 0, 0].long() % 3)  # labels travel with their images


@pytest.mark.parametrize("n, world_size", [(24, 3), (23, 4), (5, 2)])
def test_iterate_batches_ranks_are_disjoint_and_even(n, world_size):
    data = small_data(n)
    per_rank = []
    for rank in range(world_size):
        g = torch.Generator().manual_seed(7)  # every rank seeds the same permutation
        batches = list(iterate_batches(data, 3, True, generator=g, rank=rank, world_size=world_size))
        assert len(batches) == num_batches(n, 3, world_size=world_size)
        per_rank.append(torch.cat([x[:, 0, 0, 0] for x, _ in batches]).tolist())
    assert len({len(p) for p in per_rank}) == 1  # same number of samples everywhere
    everything = sum(per_rank, [])
    assert sorted(set(everything)) == list(range(n))
    assert len(everything) - n == (-n) % world_size  # only the padding repeats
    if n % world_size == 0:
        assert len(everything) == len(set(everything))


def test_image_data_subset_and_validation():
    data = small_data(6)
    sub = data.subset(torch.tensor([4, 1]))
    assert sub.labels.tolist() == [1, 1] and sub.images[:, 0, 0, 0].tolist() == [4, 1]
    assert sub.class_names == data.class_names
    with pytest.raises(DataError):
        ImageData(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), ["a"])  # float images
    with pytest.raises(DataError):
        ImageData(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), ["a"])


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


def batch(b: int = 16, s: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_normalize():
    x = batch()
    mean, std = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)
    torch.testing.assert_close(normalize(x, CIFAR_MEAN, CIFAR_STD), (x / 255.0 - mean) / std)
    assert normalize(x[0], CIFAR_MEAN, CIFAR_STD).shape == (3, 8, 8)


def test_unpadded_ranks_split_evaluation_exactly():
    data = synthetic_shapes(num_classes=2, per_class=5, image_size=8, seed=0)  # 10 images
    seen = []
    for rank in range(3):
        for _, labels in iterate_batches(data, 2, shuffle=False, rank=rank, world_size=3, pad=False):
            seen.append(len(labels))
    assert sum(seen) == 10  # no image counted twice (padding would give 12)
