"""The checkpoint shipped in checkpoints/: it loads offline, describes itself, predicts deterministically."""

import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import vitdemo
from vitdemo.checkpoint import DEFAULT_CHECKPOINT, read_metadata
from vitdemo.config import PRESETS
from vitdemo.data import CIFAR10_CLASSES, checkpoint_data, preprocess, stratified_sample
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
    # The preset the model card names, trained with stochastic depth 0.1 (`--set drop_path_rate=0.1`).
    assert model.config == PRESETS["vit_cifar_4"].replace(drop_path_rate=0.1)
    assert sum(p.numel() for p in model.parameters()) == 2_103_562  # as the model card says
    assert (meta["resize"], meta["interpolation"]) == (32, "bicubic")


def drawn_images() -> list[Image.Image]:
    """Three pictures drawn here, so the test needs no file: a ship on the sea, a green blob
    with two bumps, and a yellow disc on blue."""
    ship = Image.new("RGB", (64, 64), (150, 190, 230))
    d = ImageDraw.Draw(ship)
    d.rectangle((0, 40, 64, 64), fill=(30, 70, 140))
    d.polygon([(10, 36), (54, 36), (48, 46), (16, 46)], fill=(90, 90, 100))
    d.rectangle((28, 24, 36, 36), fill=(220, 220, 220))
    blob = Image.new("RGB", (64, 64), (120, 170, 90))
    d = ImageDraw.Draw(blob)
    for box in ((16, 22, 48, 50), (20, 18, 30, 28), (34, 18, 44, 28)):
        d.ellipse(box, fill=(60, 120, 40))
    disc = Image.new("RGB", (64, 64), (30, 90, 200))
    ImageDraw.Draw(disc).ellipse((16, 16, 48, 48), fill=(240, 200, 40))
    return [ship, blob, disc]


def pinned_inputs(meta) -> torch.Tensor:
    """The drawn pictures through the model's own preprocessing, then two seeded noise images."""
    x = torch.cat([preprocess(im, meta["image_size"], meta["mean"], meta["std"]) for im in drawn_images()])
    return torch.cat([x, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))])


# The shipped weights' answers, measured once (torch 2.14.1, CPU, fp32). A re-trained or damaged
# checkpoint, a change to preprocessing or to the forward pass changes them: update them only
# together with the checkpoint, and its card.
PINNED_CLASSES = [8, 6, 2, 6, 6]  # ship, frog, bird; the noise reads as frog
PINNED_LOGITS = [
    [-0.6365, -0.4631, -0.3724, -0.4713, -0.4362, -0.4746, -0.4047, -0.4028, 4.1751, -0.5045],
    [-0.2783, -0.1630, -0.4320, -0.8229, -0.6837, -0.4552, 4.1073, -0.5827, -0.1996, -0.4241],
    [-0.3983, -0.6245, 4.0021, -0.7959, -0.6667, -0.4026, -0.4012, -0.7892, -0.6096, -0.5072],
    [-0.5477, -0.9981, 0.8779, -0.3323, 1.2925, -1.1881, 3.4129, -1.1291, -0.8358, -0.9321],
    [-0.1865, -0.6911, 0.1905, -0.5022, 0.3771, -0.6381, 3.9976, -0.9502, -0.7863, -0.7861],
]


def test_shipped_model_gives_its_pinned_answers(shipped):
    model, meta = shipped
    x = pinned_inputs(meta)
    with torch.no_grad():
        logits = model(x)
        again = vitdemo.load_checkpoint()[0](x)
    assert torch.equal(logits, again)  # deterministic, load after load
    assert logits.argmax(-1).tolist() == PINNED_CLASSES
    # 2e-3: the pins' rounding (5e-5) and other CPUs' float summation order, far below the margins (> 2).
    torch.testing.assert_close(logits, torch.tensor(PINNED_LOGITS), atol=2e-3, rtol=0)


def test_shipped_int8_export_is_of_the_shipped_weights(shipped):
    """checkpoints/vit_cifar10/model.int8.onnx (the app's default runtime for this model) must be
    re-exported whenever the weights change: `python -m vitdemo export --checkpoint
    checkpoints/vit_cifar10 --out checkpoints/vit_cifar10/model.int8.onnx --int8`."""
    from vitdemo import runtime

    model, meta = shipped
    # Refuses a stale file, or one that is not int8 (an fp32 export written over it).
    runner = runtime.load_onnx(DEFAULT_CHECKPOINT.parent / "model.int8.onnx", model, precision="int8")
    assert DEFAULT_CHECKPOINT.with_name("model.int8.onnx").stat().st_size < 0.4 * DEFAULT_CHECKPOINT.stat().st_size
    assert runner(pinned_inputs(meta)).argmax(-1).tolist() == PINNED_CLASSES
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (runner(x).argmax(-1) == model(x).argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_TAR.exists(), reason=f"needs CIFAR-10's training images at {CIFAR_TAR}")
def test_accuracy_on_1000_held_out_images(shipped, tmp_path):
    """The split the model was trained with (5,000 held out, seed 0, recorded in its metadata),
    of which 100 images per class: `python -m vitdemo evaluate --data DIR --limit 1000` prints the
    same figure (it finds the held-out images by the data's recorded digest)."""
    model, meta = shipped
    with tarfile.open(CIFAR_TAR) as tar:
        tar.extractall(tmp_path, filter="data")
    val = checkpoint_data(meta, tmp_path / "cifar10" / "train").val  # its held-out images, by their digest
    sample = stratified_sample(val, 1000)
    assert torch.bincount(sample.labels).tolist() == [100] * 10
    _, accuracy, _ = evaluate(model, sample, meta["mean"], meta["std"])
    assert accuracy >= 0.83
