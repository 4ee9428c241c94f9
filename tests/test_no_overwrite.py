"""The command line never replaces what the user made: `train`, `export`, `evaluate` and
`explain` refuse an --out that already holds their files, in one line naming --force (and, for
a run, --resume), before any work; the old files stay byte for byte; with --force they are
replaced."""

import json

import pytest
from helpers import STAND_IN_CLASSES, small_model
from PIL import Image

from vitdemo.data import Preprocessing

from vitdemo import cli
from vitdemo.checkpoint import load_checkpoint, save_checkpoint
from vitdemo.cli import main
from vitdemo.data import DataError

TINY = ["--set", "depth=1", "embed_dim=32", "num_heads=2", "mlp_dim=64"]
OLD = b"the user's own bytes"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Any data or checkpoint loaded means the refusal came too late."""
    def reached(*args, **kwargs):
        raise AssertionError("work started before the refusal")

    for command in (cli.common, *cli.COMMANDS):
        for name in ("training_data", "load_source", "load_checkpoint", "engine_train", "export_onnx"):
            if hasattr(command, name):
                monkeypatch.setattr(command, name, reached)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny 32 px model for the synthetic set's four classes, with a history (so `evaluate`
    also writes curves.png)."""
    history = {"train_loss": [1.3, 1.1], "train_acc": [0.3, 0.5], "test_loss": [1.2, 1.0], "test_acc": [0.4, 0.5],
               "lr": [1e-3, 5e-4]}
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    return save_checkpoint(path, small_model(depth=1, embed_dim=32, num_heads=2, mlp_dim=64), STAND_IN_CLASSES,
                           Preprocessing(32, (0.5,) * 3, (0.5,) * 3), history=history)


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "train_state.pt", "results.json"])
def test_train_refuses_a_folder_that_holds_a_run(name, tmp_path, no_work, capsys):
    (tmp_path / name).write_bytes(OLD)
    assert main(["train", "--data", "synthetic", "--out", str(tmp_path), "--device", "cpu"]) == 2
    line = one_error_line(capsys)
    assert f"already holds a training run ({name})" in line
    assert "--resume" in line and "--force" in line and "a new folder" in line
    assert (tmp_path / name).read_bytes() == OLD
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_train_in_an_empty_new_or_unrelated_folder_goes_ahead(tmp_path, monkeypatch, capsys):
    def reached(*args, **kwargs):
        raise DataError("reached the data")

    monkeypatch.setattr(cli.train, "training_data", reached)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    for out in ("empty", "new", "notes"):
        assert main(["train", "--data", "synthetic", "--out", str(tmp_path / out)]) == 2
        assert "reached the data" in one_error_line(capsys)


def test_train_refuses_resume_with_force_and_a_file_as_out(tmp_path, no_work, capsys):
    assert main(["train", "--data", "synthetic", "--out", str(tmp_path), "--resume", "--force"]) == 2
    assert "give one of them" in one_error_line(capsys)
    (tmp_path / "run").write_bytes(OLD)
    assert main(["train", "--data", "synthetic", "--out", str(tmp_path / "run")]) == 2
    assert "is a file" in one_error_line(capsys)
    assert (tmp_path / "run").read_bytes() == OLD


def test_train_force_starts_over_but_only_once_the_data_are_there(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "ema").mkdir(parents=True)
    old = {"model.safetensors": OLD, "results.json": b'{"old": true}', "ema/model.safetensors": OLD}
    for name, data in old.items():
        (run / name).write_bytes(data)
    (run / "notes.txt").write_text("mine")
    # A mistake in the command keeps the old run as it was, --force or not.
    assert main(["train", "--data", str(tmp_path / "no-such-folder"), "--out", str(run), "--force"]) == 2
    capsys.readouterr()
    assert all((run / name).read_bytes() == data for name, data in old.items())

    assert main(["train", "--data", "synthetic", "--out", str(run), "--force", "--epochs", "1", "--batch-size", "256",
                 "--device", "cpu", *TINY]) == 0
    model, meta = load_checkpoint(run)  # the new run's
    assert model.config.depth == 1 and meta["metrics"]["epoch"] == 1
    assert "history" in json.loads((run / "results.json").read_text())
    assert not (run / "ema").exists()  # the old run's EMA would pass for this one's
    assert (run / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.pt2", "model.onnx"])
def test_export_refuses_an_existing_file(name, tmp_path, no_work, capsys):
    out = tmp_path / name
    out.write_bytes(OLD)
    assert main(["export", "--checkpoint", "unused", "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert f"--out {out} already exists" in line and "--force" in line
    assert out.read_bytes() == OLD and [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("name", ["model.pt2", "model.onnx"])
def test_export_force_replaces_the_file(name, checkpoint, tmp_path, capsys):
    if name.endswith(".onnx"):
        pytest.importorskip("onnx")
        pytest.importorskip("onnxscript")
    out = tmp_path / name
    out.write_bytes(OLD)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--force"]) == 0
    assert "max |difference| to eager" in capsys.readouterr().out
    assert out.read_bytes() != OLD and [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left


def test_pt2_export_is_atomic(checkpoint, tmp_path, monkeypatch, capsys):
    import torch

    out = tmp_path / "model.pt2"
    out.write_bytes(OLD)

    def interrupted(program, f, **kwargs):
        f.write(b"half an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.export, "save", interrupted)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--force"]) == 130
    capsys.readouterr()
    assert out.read_bytes() == OLD and [p.name for p in tmp_path.iterdir()] == ["model.pt2"]


# ---------------------------------------------------------------------------------------------
# evaluate and explain
# ---------------------------------------------------------------------------------------------


def test_evaluate_refuses_to_replace_its_files(checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "curves.png").write_bytes(OLD)  # e.g. --out given the run's own folder
    monkeypatch.setattr(cli.common, "load_source", lambda *a, **k: pytest.fail("evaluated before the refusal"))
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", "synthetic", "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert f"--out {out} already holds curves.png" in line and "--force" in line
    assert (out / "curves.png").read_bytes() == OLD and [p.name for p in out.iterdir()] == ["curves.png"]


def test_evaluate_force_replaces_and_other_files_stay(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "evaluation.json").write_bytes(OLD)
    (out / "notes.txt").write_bytes(OLD)
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", "synthetic", "--limit", "20",
                 "--device", "cpu", "--out", str(out), "--force"]) == 0
    assert json.loads((out / "evaluation.json").read_text())["images"] == 20
    assert (out / "notes.txt").read_bytes() == OLD
    assert {p.name for p in out.iterdir()} == {"evaluation.json", "confusion_matrix.png", "curves.png", "notes.txt"}


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (40, 40), (20, 200, 20)).save(path)
    return path


def test_explain_refuses_to_replace_its_views(checkpoint, image, tmp_path, no_work, capsys):
    out = tmp_path / "views"
    out.mkdir()
    (out / "rollout.png").write_bytes(OLD)
    (out / "notes.txt").write_bytes(OLD)
    assert main(["explain", str(image), "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert f"--out {out} already holds rollout.png" in line and "--force" in line
    assert (out / "rollout.png").read_bytes() == OLD and len(list(out.iterdir())) == 2


def test_explain_force_replaces_every_view(checkpoint, image, tmp_path, capsys):
    out = tmp_path / "views"
    out.mkdir()
    for name in cli.explain.VIEWS:
        (out / name).write_bytes(OLD)
    assert main(["explain", str(image), "--checkpoint", str(checkpoint), "--out", str(out), "--force"]) == 0
    # What was checked before is exactly what was written.
    assert sorted(p.name for p in out.iterdir()) == sorted(cli.explain.VIEWS)
    for name in cli.explain.VIEWS:
        with Image.open(out / name) as im:
            assert im.size[0] > 10, name
