"""Each model gets examples it can know: the shipped model answers every one of its examples right
and flags none; the CIFAR-10 examples are the 20 held-out images recorded in examples.json (and,
with ../shared's copy of CIFAR-10, are shown to be exactly those held-out images)."""

import json
import os
import tarfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import numpy as np
import pytest
from PIL import Image

import vitdemo.app
from vitdemo.app import classify_tab, examples, models
from vitdemo.checkpoint import read_metadata
from vitdemo.data import CIFAR10_CLASSES, SHAPES, stratified_split

CIFAR_TAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train.tar.gz"
FOLDER = examples.ASSETS / "cifar10"


def test_the_shipped_model_answers_every_example_right_and_flags_none(tmp_path):
    assert Path(models.SHIPPED_CHECKPOINT).is_file(), "the shipped checkpoint is part of the repository"
    chosen = vitdemo.app.example_set(models.SHIPPED)
    assert len(chosen.items) == 20 and "never trained on" in chosen.title
    for path, caption in chosen.items:
        truth = caption.split(" ")[0]
        for runtime in ("auto", "eager"):  # what the page shows (int8), and fp32
            labels, info = classify_tab.classify(Image.open(path), models.SHIPPED, runtime)
            assert max(labels, key=labels.get) == truth, (path.name, runtime, labels)
            assert not info["ood"]["flagged"], (path.name, runtime, info["ood"])


def test_the_cifar_examples_are_the_twenty_in_the_manifest():
    manifest = json.loads((FOLDER / "examples.json").read_text())
    files = [f for entry in manifest["classes"].values() for f in entry["files"]]
    assert list(manifest["classes"]) == list(CIFAR10_CLASSES)
    assert all(len(entry["files"]) == 2 for entry in manifest["classes"].values())
    assert sorted(p.name for p in FOLDER.glob("*.png")) == sorted(files)  # no other CIFAR image in the repository
    assert all(Image.open(FOLDER / f).size == (32, 32) for f in files)
    meta = read_metadata(models.SHIPPED_CHECKPOINT)
    assert manifest["split"] == {"val_size": meta["val_size"], "split_seed": meta["split_seed"]}


def test_each_kind_of_model_gets_its_own_examples(tmp_path):
    imagenet = examples.examples_for(["c"] * 1000, tmp_path)
    assert imagenet.title.startswith("Photos") and {p.name for p, _ in imagenet.items} <= set(examples.PHOTOS)
    shapes = examples.examples_for(list(SHAPES[:4]), tmp_path)
    assert [c for _, c in shapes.items] == [n for n in SHAPES[:4] for _ in range(2)]
    assert all(Image.open(p).size == (32, 32) for p, _ in shapes.items)
    other = examples.examples_for(["red", "blue"], tmp_path)
    assert other.title == "Drawn pictures" and len(other.items) >= 4
    assert vitdemo.app.example_set(models.PRETRAINED).title.startswith("Photos")  # needs no download


def test_a_click_on_an_example_loads_that_file():
    items = vitdemo.app.example_set(models.SHIPPED).items
    assert vitdemo.app.pick_example(3, models.SHIPPED) == str(items[3][0])
    assert isinstance(vitdemo.app.pick_example(99, models.SHIPPED), type(vitdemo.app.gr.skip()))


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_TAR.exists(), reason=f"needs CIFAR-10's training images at {CIFAR_TAR}")
def test_the_cifar_examples_are_held_out_images_pixel_for_pixel(tmp_path):
    """Rebuilt as scripts/pick_examples.py reads them: every example is the image at its index in
    the folder, and that index is in the shipped model's held-out split."""
    from vitdemo.data import load_image_folder

    with tarfile.open(CIFAR_TAR) as tar:
        tar.extractall(tmp_path, filter="data")
    meta = read_metadata(models.SHIPPED_CHECKPOINT)
    data = load_image_folder(tmp_path / "cifar10" / "train", image_size=32, progress=False)
    _, held_out = stratified_split(data.labels, int(meta["val_size"]), seed=int(meta["split_seed"]))
    held_out = set(held_out.tolist())
    manifest = json.loads((FOLDER / "examples.json").read_text())
    for name, entry in manifest["classes"].items():
        for file in entry["files"]:
            index = int(file.rsplit("-", 1)[1].removesuffix(".png"))
            assert index in held_out and data.class_names[int(data.labels[index])] == name
            shipped = np.asarray(Image.open(FOLDER / file))
            assert np.array_equal(shipped, data.images[index].permute(1, 2, 0).numpy())
