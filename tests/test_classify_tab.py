"""Classify with the shipped model says what the answer can mean: the model's classes and input
size, a warning for an image unlike its training data or far smaller than its input."""

import os
import tarfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vitdemo.app import classify_tab, models
from vitdemo.data import CIFAR10_CLASSES

CIFAR_TAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train.tar.gz"


@pytest.fixture(scope="module", autouse=True)
def shipped_model():
    """The real shipped checkpoint (it carries the out-of-distribution statistics)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "SHIPPED_CHECKPOINT", models.DEFAULT_CHECKPOINT)
        mp.setattr(models, "MODELS", models.ModelStore())
        yield


def note_for(image) -> tuple[dict, str]:
    labels, info = classify_tab.classify(image, models.SHIPPED, "eager")
    return labels, classify_tab.answer_note(info)


def test_the_answer_names_the_classes_and_the_input_size():
    image = Image.new("RGB", (64, 64), (120, 170, 230))
    labels, note = note_for(image)
    assert set(labels) <= set(CIFAR10_CLASSES)
    assert "10 classes" in note and "32x32 pixels" in note and "airplane" in note and "truck" in note


@pytest.mark.parametrize("kind", ["noise", "flat", "text"])
def test_images_unlike_the_training_data_are_flagged_and_still_answered(kind):
    rng = np.random.default_rng(0)
    if kind == "noise":
        image = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    elif kind == "flat":
        image = Image.new("RGB", (96, 96), (200, 30, 200))
    else:
        image = Image.new("RGB", (96, 96), "white")
        draw = ImageDraw.Draw(image)
        for y in range(4, 92, 8):
            draw.text((4, y), "The quick brown fox jumps", fill="black")
    labels, note = note_for(image)
    assert labels  # the answer is still shown...
    assert "does not look like anything this model was trained on" in note  # ...with the warning in words
    # ...and the answer itself says so: its heading is not a class, the ranking stays under it.
    shown, _ = classify_tab.answer(image, models.SHIPPED, "eager")
    assert shown == {"heading": "⚠️ Probably none of its 10 classes", "confidences": labels}
    label = classify_tab.answer_label(num_top_classes=5, render=False)
    drawn = label.postprocess(shown)
    assert drawn.label == shown["heading"] and [c.label for c in drawn.confidences] == list(labels)[:5]


def test_an_image_like_the_training_data_is_answered_with_its_class(monkeypatch):
    image = Image.new("RGB", (64, 64), (120, 170, 230))
    labels, info = classify_tab.classify(image, models.SHIPPED, "eager")
    info["ood"]["flagged"] = False
    monkeypatch.setattr(classify_tab, "classify", lambda *args: (labels, info))
    shown, _ = classify_tab.answer(image, models.SHIPPED, "eager")
    assert shown is labels
    assert classify_tab.answer_label(render=False).postprocess(shown).label == max(labels, key=labels.get)


@pytest.mark.parametrize(("relative", "shown"), [
    (2.53, "2.5x"), (0.93, "0.9x"), (1.04, "1.04x"), (0.96, "0.96x"), (1.0004, "1.0004x"), (1.0, "1.0x")])
def test_the_score_shown_is_on_the_same_side_of_the_threshold_as_the_verdict(relative, shown):
    """A flagged score of 1.04 must not read "1.0x the threshold", as if it were at it."""
    assert classify_tab.times_threshold(relative) == shown


def test_a_tiny_image_gets_a_warning():
    _, note = note_for(Image.new("RGB", (1, 1), (10, 200, 30)))
    assert "Tiny image" in note and "1x1" in note


@pytest.mark.skipif(not CIFAR_TAR.exists(), reason=f"needs CIFAR-10's training images at {CIFAR_TAR}")
def test_training_like_images_are_mostly_not_flagged(tmp_path):
    """CIFAR-10 images (any 50 of the archive): the threshold lets at most about 5% of unseen ones
    through as false alarms, more of these were trained on, so nearly all must pass."""
    with tarfile.open(CIFAR_TAR) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".jpg")][::1000][:50]
        tar.extractall(tmp_path, members=members, filter="data")
    flagged = 0
    for member in members:
        _, info = classify_tab.classify(Image.open(tmp_path / member.name), models.SHIPPED, "eager")
        flagged += info["ood"]["flagged"]
    assert flagged <= 5, f"{flagged} of {len(members)} CIFAR-10 images flagged"


def test_a_model_change_classifies_the_image_again_or_quietly_shows_nothing(monkeypatch):
    """After the picker changes, the Classify tab answers with the new model; a model that cannot
    be used (the pre-trained one, offline) empties the answer instead of raising a second message,
    and the answer's note says why in place."""
    import vitdemo.app

    image = Image.new("RGB", (64, 64), (120, 170, 230))
    labels, info = vitdemo.app.classify_quietly(image, models.SHIPPED, "eager")
    labels = labels.get("confidences", labels)  # flagged or not, the ranked classes
    assert set(labels) <= set(CIFAR10_CLASSES) and info["model"] == models.SHIPPED
    models.MODELS.remember_failure(models.PRETRAINED, "offline")
    labels, info = vitdemo.app.classify_quietly(image, models.PRETRAINED, "eager")
    assert labels is None and classify_tab.answer_note(info) == "Not available: offline"
    assert vitdemo.app.classify_quietly(None, models.SHIPPED, "eager") == (None, None)
