"""Distillation from a CNN teacher (vitdemo.teacher, vitdemo.engine.train_teacher, `vitdemo teacher`,
`vitdemo train --teacher`): the teacher learns, labels the very view the student sees, its labels
drive the student's loss, and a teacher of other data is refused."""

import json

import pytest
import torch
from helpers import small_model
from torch import nn

from vitdemo.checkpoint import CheckpointError, read_metadata
from vitdemo.cli import main
from vitdemo.data import Preprocessing, stratified_split, synthetic_shapes
from vitdemo.engine import RECIPES, evaluate, train, train_teacher
from vitdemo.teacher import ConvTeacher, load_teacher, save_teacher

PREP = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def shapes():
    data = synthetic_shapes(num_classes=4, per_class=150, image_size=32, seed=0)
    train_idx, val_idx = stratified_split(data.labels, 0.2, seed=0)
    return data.subset(train_idx), data.subset(val_idx)


class Stub(nn.Module):
    """A teacher that answers `answer` for every image and keeps what it was shown."""

    def __init__(self, answer: int) -> None:
        super().__init__()
        self.answer, self.seen = answer, []
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return nn.functional.one_hot(torch.full((len(x),), self.answer), 4).float() * self.scale


def test_the_teacher_learns_the_shapes_and_its_file_round_trips(shapes, tmp_path):
    model, history = train_teacher(*shapes, PREP, epochs=6, batch_size=64, width=16, device="cpu", log=lambda _: None)
    assert history["val_acc"][-1] >= 0.7, history  # chance is 0.25
    path = save_teacher(tmp_path / "teacher.safetensors", model, class_names=shapes[0].class_names, val_acc=0.5)
    loaded, meta = load_teacher(tmp_path)
    assert meta["val_acc"] == 0.5 and not loaded.training
    x = torch.randn(5, 3, 32, 32)
    assert torch.allclose(loaded(x), model(x), atol=1e-5)  # the trained one is channels-last: other kernels
    assert evaluate(loaded, shapes[1], PREP.mean, PREP.std)[1] == history["val_acc"][-1]
    assert path.exists()


def test_the_teacher_labels_the_student_s_own_augmented_and_mixed_view(shapes):
    stub, student = Stub(0), small_model()
    shown = []
    student.register_forward_pre_hook(lambda _, args: shown.append(args[0].detach().clone()) if student.training
                                      else None)
    recipe = RECIPES["small-vit"].replace(epochs=1, batch_size=64, distillation=0.5)  # AutoAugment, erasing, mixing
    list(train(student, *shapes, recipe, preprocess=PREP, device="cpu", teacher=stub))
    assert len(stub.seen) == len(shown) == 8
    assert all(torch.equal(a, b) for a, b in zip(stub.seen, shown))


def test_the_teacher_s_labels_drive_the_student(shapes):
    # Whatever the images show, a teacher that always says class 2 and the whole weight on it.
    student = small_model()
    recipe = RECIPES["small-data"].replace(epochs=3, batch_size=64, lr=3e-3, distillation=1.0)
    list(train(student, *shapes, recipe, preprocess=PREP, device="cpu", teacher=Stub(2)))
    _, _, predictions = evaluate(student, shapes[1], PREP.mean, PREP.std)
    assert (predictions == 2).float().mean() == 1.0


def test_distillation_needs_both_a_teacher_and_a_weight(shapes):
    with pytest.raises(ValueError, match="both a teacher and the recipe's distillation weight"):
        list(train(small_model(), *shapes, RECIPES["small-data"], preprocess=PREP, device="cpu", teacher=Stub(0)))
    with pytest.raises(ValueError, match="distillation"):
        list(train(small_model(), *shapes, RECIPES["small-data"].replace(distillation=0.5), preprocess=PREP,
                   device="cpu"))


def test_cli_teacher_then_student_and_a_teacher_of_other_data_refused(tmp_path, capsys):
    data = ["--data", "synthetic", "--batch-size", "64", "--device", "cpu", "--max-images-per-class", "40"]
    assert main(["teacher", *data, "--out", str(tmp_path / "t"), "--epochs", "1", "--width", "8"]) == 0
    meta = load_teacher(tmp_path / "t")[1]
    assert meta["max_images_per_class"] == 40 and meta["val_size"] == 0.1 and len(meta["history"]["val_acc"]) == 1
    assert main(["train", *data, "--out", str(tmp_path / "s"), "--epochs", "1", "--teacher", str(tmp_path / "t")]) == 0
    student = read_metadata(tmp_path / "s" / "model.safetensors")
    assert student["recipe"]["distillation"] == 0.5
    assert student["teacher"] == {k: meta[k] for k in ("width", "epochs", "seed", "val_acc", "parameters")}
    assert json.loads((tmp_path / "s" / "results.json").read_text())["recipe"]["distillation"] == 0.5
    capsys.readouterr()
    # Other images (another cap), or another split: the teacher may have seen the student's held-out images.
    for other in (["--max-images-per-class", "30"], ["--split-seed", "1"]):
        assert main(["train", *data, *other, "--out", str(tmp_path / "x"), "--epochs", "1",
                     "--teacher", str(tmp_path / "t")]) == 2
        err = capsys.readouterr().err
        assert "--teacher was trained on other data, split or crop than this run" in err and "held-out" in err
        assert str(tmp_path) not in err
    assert not (tmp_path / "x" / "model.safetensors").exists()
    assert main(["train", *data, "--out", str(tmp_path / "y"), "--distillation", "0.3"]) == 2
    assert "give --teacher too" in capsys.readouterr().err


def test_load_teacher_refuses_what_is_not_a_teacher(tmp_path):
    from vitdemo.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "vit.safetensors", small_model(), ["a", "b", "c", "d"], PREP)
    with pytest.raises(CheckpointError, match="not a CNN teacher saved by `vitdemo teacher`"):
        load_teacher(tmp_path / "vit.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.safetensors is not a readable teacher file"):
        load_teacher(tmp_path / "junk.safetensors")
    assert ConvTeacher(10, 64).head.in_features == 512
    assert sum(p.numel() for p in ConvTeacher(10, 64).parameters()) == pytest.approx(6.57e6, rel=0.01)
