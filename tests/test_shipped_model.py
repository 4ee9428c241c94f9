"""The checkpoint shipped in checkpoints/: it loads offline, describes itself, predicts deterministically."""

import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import vitdemo
from vitdemo.checkpoint import DEFAULT_CHECKPOINT, read_metadata
from vitdemo.cli import load_data, split, stratified_sample
from vitdemo.data import CIFAR10_CLASSES, preprocess
from vitdemo.engine import evaluate

# CIFAR-10's training images, beside the project's checkout (absent from a user's clone).
CIFAR_TAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train.tar.gz"


@pytest.fixture(scope="module")
def shipped():
    return vitdemo.load_checkpoint()


def test_default_checkpoint_is_small_and_found_by_default(shipped):
    assert DEFAULT_CHECKPOINT.is_file()
    assert DEFAULT_CHECKPOINT.stat().st_size <= 25 * 1024 * 1024
    model, meta = shipped
    assert sum(p.numel() for p in model.parameters()) <= 6_000_000


def test_metadata_matches_weights(shipped):
    model, meta = shipped
    assert meta["class_names"] == list(CIFAR10_CLASSES)
    assert model.config.num_classes == len(meta["class_names"]) == model.head.weight.shape[0]
    assert meta["image_size"] == model.config.image_size[0] == 32
    assert model.pos_embed.shape[1] == model.config.num_patches + 1
    assert len(meta["mean"]) == len(meta["std"]) == 3
    assert meta == read_metadata(DEFAULT_CHECKPOINT)
    # A plain ViT of the paper's design: class token and learned position embeddings.
    assert model.cls_token.shape == (1, 1, model.config.embed_dim)


def test_prediction_is_deterministic(shipped):
    model, meta = shipped
    image = Image.new("RGB", (64, 64), (30, 90, 200))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(240, 200, 40))
    x = preprocess(image, meta["image_size"], meta["mean"], meta["std"])
    with torch.no_grad():
        first = model(x)
        again = vitdemo.load_checkpoint()[0](x)
    assert torch.equal(first, again)
    assert first.softmax(-1).sum().item() == pytest.approx(1.0)


def test_shipped_int8_export_is_of_the_shipped_weights(shipped):
    """checkpoints/vit_cifar10/model.int8.onnx (the app's default runtime for this model) must be
    re-exported whenever the weights change: `python -m vitdemo export --checkpoint
    checkpoints/vit_cifar10 --out checkpoints/vit_cifar10/model.int8.onnx --int8`."""
    from vitdemo import runtime

    model, meta = shipped
    runner = runtime.load_onnx(DEFAULT_CHECKPOINT.parent / "model.int8.onnx", model)  # refuses stale files
    assert runner.metadata["vitdemo.precision"] == "int8"
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (runner(x).argmax(-1) == model(x).argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_TAR.exists(), reason=f"needs CIFAR-10's training images at {CIFAR_TAR}")
def test_accuracy_on_1000_held_out_images(shipped, tmp_path):
    """The split the model was trained with (5,000 held out, seed 0, recorded in its metadata),
    of which 100 images per class: `python -m vitdemo evaluate --data DIR --val-size 5000
    --split-seed 0 --limit 1000` prints the same figure."""
    model, meta = shipped
    with tarfile.open(CIFAR_TAR) as tar:
        tar.extractall(tmp_path, filter="data")
    data, _, _ = load_data(str(tmp_path / "cifar10" / "train"), meta["image_size"])
    _, val = split(data, meta["val_size"], meta["split_seed"])
    sample = stratified_sample(val, 1000)
    assert torch.bincount(sample.labels).tolist() == [100] * 10
    _, accuracy, _ = evaluate(model, sample, meta["mean"], meta["std"])
    assert accuracy >= 0.83
