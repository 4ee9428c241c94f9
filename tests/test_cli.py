"""The command line, end to end on the built-in synthetic data (no files, no network)."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from vitdemo.checkpoint import load_checkpoint
from vitdemo.cli import build_parser, main

TINY = ["--set", "depth=1", "embed_dim=32", "num_heads=2", "mlp_dim=64"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main(["train", "--data", "synthetic", "--out", str(out), "--epochs", "2", "--batch-size", "64",
                 "--device", "cpu", *TINY])
    assert code == 0
    return out


def test_train_writes_checkpoint_results_and_curves(run_dir, capsys):
    for name in ("model.safetensors", "train_state.pt", "results.json", "curves.png"):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert len(results["history"]["train_loss"]) == 2
    model, meta = load_checkpoint(run_dir)
    assert meta["class_names"] == ["circle", "square", "triangle", "cross"]
    assert model.config.depth == 1 and model.config.embed_dim == 32
    assert Image.open(run_dir / "curves.png").size[0] > 500


def test_train_prints_walkthrough_style_epoch_lines(tmp_path, capsys):
    main(["train", "--data", "synthetic", "--out", str(tmp_path), "--epochs", "1", "--device", "cpu", *TINY])
    out = capsys.readouterr().out
    assert "Epoch: 1 | train_loss: " in out and "| test_acc: " in out


def test_resume_finished_run_is_a_no_op(run_dir, capsys):
    assert main(["train", "--data", "synthetic", "--out", str(run_dir), "--epochs", "2", "--batch-size", "64",
                 "--device", "cpu", "--resume", *TINY]) == 0
    assert "Epoch:" not in capsys.readouterr().out


def test_evaluate_reports_accuracy_and_confusion_matrix(run_dir, tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(run_dir), "--data", "synthetic", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert 0 <= report["accuracy"] <= 1 and report["images"] > 0
    assert sum(map(sum, report["confusion_matrix"])) == report["images"]
    assert (tmp_path / "confusion_matrix.png").is_file()
    assert (tmp_path / "curves.png").is_file()  # from the history stored in the checkpoint
    assert "top-1 accuracy" in capsys.readouterr().out


def test_predict(run_dir, tmp_path, capsys):
    img = tmp_path / "red.png"
    Image.new("RGB", (50, 40), (200, 20, 20)).save(img)
    assert main(["predict", str(img), "--checkpoint", str(run_dir), "--topk", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(img)) and line.count(",") == 1


def test_predict_bad_image_is_a_clear_error(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["predict", str(bad), "--checkpoint", str(run_dir)]) == 2
    assert "error:" in capsys.readouterr().err


def test_export_matches_eager(run_dir, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "m.pt2")]) == 0
    out = capsys.readouterr().out
    diff = float(out.rsplit("eager ", 1)[1].split(")")[0])
    assert diff < 1e-5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "/no/such/dir", "--out", "x"], "error:"),
        (["train", "--data", "synthetic", "--out", "x", "--lr", "-1"], "invalid recipe"),
        (["train", "--data", "synthetic", "--out", "x", "--set", "depth=0"], "depth must be a positive"),
        (["train", "--data", "synthetic", "--out", "x", "--set", "colour=3"], "unknown hyper-parameter"),
        (["evaluate", "--checkpoint", "/no/such.safetensors", "--data", "synthetic"], "no checkpoint at"),
    ],
)
def test_bad_options_give_clear_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_help_explains_every_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"{name} --{action.dest} has no help"


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "vitdemo", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "train" in result.stdout and "predict" in result.stdout


def test_explain_writes_every_view(run_dir, tmp_path, capsys):
    img = tmp_path / "in.png"
    Image.new("RGB", (40, 40), (20, 200, 20)).save(img)
    out = tmp_path / "views"
    assert main(["explain", str(img), "--checkpoint", str(run_dir), "--out", str(out), "--discard-ratio", "0.5"]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"patches.png", "patch_sequence.png", "position_similarity.png", "rollout.png",
                     "gradient_rollout.png", "attention_distance.png", "embedding_filters.png",
                     "heads_last_layer.png"}
    for name in names:
        with Image.open(out / name) as im:
            assert im.size[0] > 30 and im.size[1] > 10, name
    assert capsys.readouterr().out.startswith("predicted ")


def test_fine_tune_from_peer_weights_file(tmp_path, capsys):
    """A timm-named .pth of a 48 px model fine-tunes at 32 px on other classes."""
    import torch

    import vitdemo

    peer = vitdemo.create_model("vit_cifar_4", num_classes=7, image_size=48, depth=1, embed_dim=32, num_heads=2,
                                mlp_dim=64)
    torch.save(peer.state_dict(), tmp_path / "peer.pth")
    out = tmp_path / "ft"
    assert main(["train", "--data", "synthetic", "--out", str(out), "--epochs", "1", "--device", "cpu",
                 "--init-from", str(tmp_path / "peer.pth"), "--init-source", "timm", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "resampled from 12x12 to 8x8" in printed and "head skipped" in printed
    model, meta = load_checkpoint(out)
    assert model.config.num_classes == 4


def test_fine_tune_from_checkpoint_with_frozen_backbone(run_dir, tmp_path):
    import torch

    out = tmp_path / "frozen"
    assert main(["train", "--data", "synthetic", "--out", str(out), "--epochs", "1", "--device", "cpu",
                 "--init-from", str(run_dir), "--freeze-backbone", "--recipe", "finetune"]) == 0
    before, _ = load_checkpoint(run_dir)
    after, _ = load_checkpoint(out)
    assert torch.equal(before.blocks[0].attn.qkv.weight, after.blocks[0].attn.qkv.weight)
    assert not torch.equal(before.head.weight, after.head.weight)
