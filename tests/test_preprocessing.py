"""One `Preprocessing` and one data entry point (`vitdemo.data.training_data`): training,
prediction, pictures and evaluation read the same pixels, at every image size, and `evaluate`
scores exactly a run's held-out images."""

import json
import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2 as T

import vitdemo
import vitdemo.cli as cli
from vitdemo.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from vitdemo.cli import main
from vitdemo.data import (
    CIFAR10_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    Preprocessing,
    channel_statistics,
    data_digest,
    load_source,
    training_data,
)

TINY_224 = ["--set", "patch_size=32", "depth=1", "embed_dim=32", "num_heads=1", "mlp_dim=64"]


def photos(root, classes=("cat", "dog"), per_class=4, seed=0):
    """Class folders of non-square noise photos of several sizes (none already square)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            w, h = (300, 260) if i % 2 else (250, 330)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def torchvision_crop(path, size, resize, interpolation):
    """The crop as torchvision's own transforms make it of a PIL image (independent of vitdemo's code)."""
    mode = T.InterpolationMode(interpolation)
    transform = T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(size), T.PILToTensor()])
    return transform(Image.open(path).convert("RGB"))


# ---------------------------------------------------------------------------------------------
# The value
# ---------------------------------------------------------------------------------------------


def test_preprocessing_round_trips_through_a_checkpoint(tmp_path):
    prep = Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD, resize=256, interpolation="bilinear")
    model = vitdemo.create_model("vit_b_16", num_classes=2, depth=1, embed_dim=32, num_heads=1, mlp_dim=64)
    path = save_checkpoint(tmp_path / "m.safetensors", model, ["a", "b"], prep)
    meta = read_metadata(path)
    assert Preprocessing.for_checkpoint(meta) == prep
    assert {k: meta[k] for k in Preprocessing.KEYS} == {"image_size": 224, "resize": 256, "interpolation": "bilinear",
                                                       "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    # A checkpoint without a margin records resize = image_size; interpolation names are torchvision's.
    assert Preprocessing(32, (0.5,) * 3, (0.5,) * 3).resize == 32


@pytest.mark.parametrize("fields, message", [
    (dict(image_size=0), "image_size must be a positive integer"),
    (dict(resize=16), "resize (16) must be at least image_size (32)"),
    (dict(interpolation="cubic"), "interpolation must be one of"),
    (dict(mean=(0.5, 0.5)), "mean must be three finite numbers"),
    (dict(std=(0.5, 0.0, 0.5)), "std must be positive"),
])
def test_preprocessing_refuses_what_no_model_can_read(fields, message):
    args = dict(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3) | fields
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Preprocessing(**args)


def test_a_checkpoint_with_bad_preprocessing_is_refused_on_reading(tmp_path):
    from vitdemo.checkpoint import CheckpointError, update_metadata

    model = vitdemo.create_model("vit_cifar_4", num_classes=2, depth=1, embed_dim=32, num_heads=1, mlp_dim=64)
    path = save_checkpoint(tmp_path / "m.safetensors", model, ["a", "b"], Preprocessing(32, (0.5,) * 3, (0.5,) * 3))
    update_metadata(path, resize=16)
    with pytest.raises(CheckpointError, match="invalid preprocessing: resize"):
        load_checkpoint(path)


def test_at_size_keeps_the_margin_in_proportion():
    prep = Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD, resize=256, interpolation="bilinear")
    assert prep.at_size(384) == Preprocessing(384, IMAGENET_MEAN, IMAGENET_STD, resize=439, interpolation="bilinear")
    assert Preprocessing(32, (0.5,) * 3, (0.5,) * 3).at_size(64).resize == 64


def test_channel_statistics_are_the_images_mean_and_std():
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    images[0, 0] = 255  # red: half the red pixels 1, half 0 -> mean 0.5, std 0.5
    images[:, 1] = 51  # green: 0.2 everywhere -> std 0 (kept positive)
    mean, std = channel_statistics(images)
    assert mean == (0.5, 0.2, 0.0) and std[0] == 0.5 and std[1] == std[2] == 0.001


# ---------------------------------------------------------------------------------------------
# Fine-tuning from a 256 / 224 bilinear start: the same pixels throughout
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def start_checkpoint(tmp_path):
    """A tiny 224 px model with torchvision's preprocessing (resize 256, bilinear, ImageNet's
    statistics), as `--init-from torchvision` starts from."""
    model = vitdemo.create_model("vit_b_16", num_classes=3, patch_size=32, depth=1, embed_dim=32, num_heads=1,
                             mlp_dim=64)
    prep = Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD, resize=256, interpolation="bilinear")
    return save_checkpoint(tmp_path / "start" / "model.safetensors", model, ["x", "y", "z"], prep)


def test_fine_tune_trains_predicts_and_explains_on_the_start_models_pixels(start_checkpoint, tmp_path,
                                                                           monkeypatch, capsys):
    folder = photos(tmp_path / "photos")
    files = sorted(folder.rglob("*.png"))
    seen = {}
    real_train = cli.train.engine_train

    def recording_train(model, train_data, val_data, recipe, preprocess, **kwargs):
        seen.update(train=train_data, val=val_data, prep=preprocess)
        return real_train(model, train_data, val_data, recipe, preprocess=preprocess, **kwargs)

    monkeypatch.setattr(cli.train, "engine_train", recording_train)
    out = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--init-from", str(start_checkpoint), "--out", str(out),
                 "--epochs", "1", "--batch-size", "4", "--val-size", "2", "--device", "cpu"]) == 0
    # Training read torchvision's resize-256-bilinear-then-centre-crop-224 of every photo.
    expected = torch.stack([torchvision_crop(f, 224, 256, "bilinear") for f in files])
    got = torch.cat([seen["train"].images, seen["val"].images])
    order = torch.cat([seen["train"].labels, seen["val"].labels])
    assert got.shape == (8, 3, 224, 224)
    for image, label in zip(got, order):  # each training image is one of its class's crops, exactly
        assert any(torch.equal(image, e) for e, f in zip(expected, files) if f.parent.name == ("cat", "dog")[label])
    # ... normalised and recorded as the start model's.
    start = Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD, resize=256, interpolation="bilinear")
    assert seen["prep"] == start
    model, meta = load_checkpoint(out)
    assert Preprocessing.for_checkpoint(meta) == start

    # predict: the probabilities of the model on that crop.
    capsys.readouterr()
    assert main(["predict", str(files[0]), "--checkpoint", str(out), "--topk", "2"]) == 0
    printed = capsys.readouterr().out.split(": ", 1)[1].split(", ")
    x = ((expected[0].float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1))
         / torch.tensor(IMAGENET_STD).view(3, 1, 1)).unsqueeze(0)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    for entry in printed:
        name, value = entry.split()
        assert float(value) == pytest.approx(probs[meta["class_names"].index(name)].item(), abs=1e-3)

    # explain: its patch grid is drawn over the same crop.
    views = tmp_path / "views"
    assert main(["explain", str(files[0]), "--checkpoint", str(out), "--out", str(views)]) == 0
    grid = torch.from_numpy(np.asarray(Image.open(views / "patches.png").convert("RGB"))).permute(2, 0, 1)
    assert grid.shape[-2:] == (224, 224)
    inside = torch.ones(224, 224, dtype=torch.bool)  # the pixels off the grid lines
    for line in range(0, 224, 32):
        inside[max(line - 1, 0):line + 1, :] = False
        inside[:, max(line - 1, 0):line + 1] = False
    assert torch.equal(grid[:, inside], expected[0][:, inside])


# ---------------------------------------------------------------------------------------------
# Every source at every size
# ---------------------------------------------------------------------------------------------


class StandInCIFAR10:
    """torchvision's CIFAR-10 of 40 random 32 px images (4 per class), for `--data cifar10`."""

    classes = list(CIFAR10_CLASSES)

    def __init__(self, root, train=True, download=False):
        rng = np.random.default_rng(1)
        self.data = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 10 for i in range(40)]


@pytest.mark.parametrize("source", ["synthetic", "cifar10"])
def test_every_source_trains_a_224_px_model(source, tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", StandInCIFAR10)
    out = tmp_path / "run"
    limit = ["--max-images-per-class", "3"] if source == "synthetic" else []
    assert main(["train", "--data", source, "--image-size", "224", "--out", str(out), "--epochs", "1",
                 "--batch-size", "8", "--val-size", "0.25", "--device", "cpu", *limit, *TINY_224]) == 0
    model, meta = load_checkpoint(out)
    assert model.config.image_size == (224, 224) and meta["image_size"] == 224
    results = json.loads((out / "results.json").read_text())
    assert len(results["history"]["train_loss"]) == 1


def test_a_new_model_is_normalised_with_its_training_images_statistics(tmp_path):
    folder = photos(tmp_path / "photos")
    data = training_data(folder, 48, val_size=2)
    train = data.train.images.double() / 255
    mean = train.mean(dim=(0, 2, 3))
    assert data.preprocessing.mean == tuple(round(v, 4) for v in mean.tolist())
    assert data.preprocessing.std == tuple(round(v, 4) for v in train.std(dim=(0, 2, 3), unbiased=False).tolist())
    assert data.preprocessing.resize == 48 and data.preprocessing.interpolation == "bicubic"


# ---------------------------------------------------------------------------------------------
# evaluate: a run's held-out images, wherever its data are
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def folder_run(tmp_path):
    folder = photos(tmp_path / "photos", classes=("cat", "dog", "owl"), per_class=6)
    out = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--image-size", "32", "--out", str(out), "--epochs", "1",
                 "--batch-size", "6", "--val-size", "6", "--split-seed", "3", "--device", "cpu",
                 "--set", "depth=1", "embed_dim=32", "num_heads=1", "mlp_dim=64"]) == 0
    return folder, out


def evaluation(capsys, *args):
    capsys.readouterr()
    assert main(["evaluate", *args]) == 0
    return capsys.readouterr().out.splitlines()[0]


def test_evaluate_scores_exactly_the_runs_held_out_images_wherever_they_are(folder_run, tmp_path, capsys):
    folder, out = folder_run
    model, meta = load_checkpoint(out)
    assert meta["data"] == str(folder.resolve()) and meta["data_digest"]
    # The held-out 6 of 18 (split seed 3), recomputed with the split alone.
    from vitdemo.data import stratified_split

    data = load_source(folder, Preprocessing.for_checkpoint(meta))
    assert data_digest(data) == meta["data_digest"]
    held_out = data.subset(stratified_split(data.labels, 6, seed=3)[1])
    prep = Preprocessing.for_checkpoint(meta)
    with torch.no_grad():
        accuracy = (model(prep.normalize(held_out.images)).argmax(-1) == held_out.labels).double().mean().item()
    want = f"6 images, eager runtime: loss"
    first = evaluation(capsys, "--checkpoint", str(out), "--data", str(folder))
    assert first.startswith(want) and first.endswith(f"top-1 accuracy {accuracy:.4f}")
    # The same images in another folder are found by their digest; the run's split still applies.
    copy = tmp_path / "elsewhere"
    shutil.copytree(folder, copy)
    assert evaluation(capsys, "--checkpoint", str(out), "--data", str(copy)) == first
    # Other images are a test set: every one of them is scored.
    other = photos(tmp_path / "test", classes=("cat", "dog", "owl"), per_class=2, seed=9)
    assert evaluation(capsys, "--checkpoint", str(out), "--data", str(other)).startswith("6 images")
    # ... or the split asked for: on other data the run's own split is no constraint.
    assert evaluation(capsys, "--checkpoint", str(out), "--data", str(other), "--val-size", "3").startswith("3 images")
    assert evaluation(capsys, "--checkpoint", str(out), "--data", str(photos(
        tmp_path / "test2", classes=("cat", "dog", "owl"), per_class=5, seed=8))).startswith("15 images")


def test_evaluate_refuses_another_split_of_the_runs_own_data(folder_run, capsys):
    folder, out = folder_run
    assert main(["evaluate", "--checkpoint", str(out), "--data", str(folder), "--split-seed", "0"]) == 2
    assert "--split-seed 0 is not the split the model was trained with (3)" in capsys.readouterr().err


def test_evaluate_of_a_run_without_held_out_images_says_so(tmp_path, capsys):
    folder = photos(tmp_path / "photos")
    out = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--image-size", "32", "--out", str(out), "--epochs", "1",
                 "--val-size", "0", "--device", "cpu", "--set", "depth=1", "embed_dim=32", "num_heads=1",
                 "mlp_dim=64"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out), "--data", str(folder)]) == 2
    assert "trained on every image" in capsys.readouterr().err


def test_a_source_with_one_class_or_too_few_images_is_refused_in_words(tmp_path):
    with pytest.raises(DataError, match="at least 2 classes, found 1"):
        training_data(photos(tmp_path / "one", classes=("cat",)), 32)
    with pytest.raises(DataError, match="too few images to train and validate: 4 for 2 classes"):
        training_data(photos(tmp_path / "two", per_class=2), 32, val_size=3)


def test_set_with_init_from_is_refused_before_the_data_load(start_checkpoint, tmp_path, monkeypatch, capsys):
    """--set describes a new model; a fine-tune keeps its start's architecture (it used to be
    ignored without a word)."""
    monkeypatch.setattr(cli.train, "training_data", lambda *a, **k: pytest.fail("data loaded before the refusal"))
    assert main(["train", "--data", "synthetic", "--init-from", str(start_checkpoint), "--out", str(tmp_path / "run"),
                 "--set", "depth=2"]) == 2
    assert "--set depth=2 changes a new model" in capsys.readouterr().err
