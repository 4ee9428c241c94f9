"""The command line, end to end on the built-in synthetic data (no files, no network)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vitdemo.checkpoint import load_checkpoint
from vitdemo.cli import build_parser, main

TINY = ["--set", "depth=1", "embed_dim=32", "num_heads=2", "mlp_dim=64"]
README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def held_out_shapes():
    """The built-in shapes' held-out 10% as a `--data synthetic` run splits them: the 1,200 images
    of seed 0, 120 held out with split seed 0 (computed here without the CLI's data loading)."""
    from vitdemo.data import stratified_split, synthetic_shapes

    data = synthetic_shapes(image_size=32, seed=0)
    return data.subset(stratified_split(data.labels, 120, seed=0)[1])


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


def test_precision_is_saved_and_a_resume_in_another_one_is_refused(tmp_path, capsys):
    common = ["train", "--data", "synthetic", "--out", str(tmp_path), "--epochs", "1", "--batch-size", "256",
              "--device", "cpu", *TINY]
    assert main([*common, "--precision", "bf16"]) == 0
    assert load_checkpoint(tmp_path)[1]["precision"] == "bf16"
    capsys.readouterr()
    assert main([*common, "--precision", "fp32", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "trained in bf16, and this run would train in fp32; pass --precision bf16" in err
    assert len(err.strip().splitlines()) == 1


def test_evaluate_reports_accuracy_and_confusion_matrix(run_dir, tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(run_dir), "--data", "synthetic", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "evaluation.json").read_text())
    # The held-out 10% of the 1,200 synthetic images (split seed 0), classified here by hand.
    import torch

    from vitdemo.data import normalize

    model, meta = load_checkpoint(run_dir)
    val = held_out_shapes()
    with torch.no_grad():
        preds = model(normalize(val.images, meta["mean"], meta["std"])).argmax(-1)
    assert report["images"] == len(val) == 120
    assert report["accuracy"] == pytest.approx((preds == val.labels).float().mean().item(), abs=1e-6)
    matrix = torch.tensor(report["confusion_matrix"])  # rows: true class, columns: predicted
    assert torch.equal(matrix.sum(1), torch.bincount(val.labels, minlength=4))
    assert torch.equal(matrix.sum(0), torch.bincount(preds, minlength=4))
    assert matrix.trace().item() == (preds == val.labels).sum().item()
    assert (tmp_path / "confusion_matrix.png").is_file()
    assert (tmp_path / "curves.png").is_file()  # from the history stored in the checkpoint
    assert "top-1 accuracy" in capsys.readouterr().out


def test_evaluate_int8_scores_each_image_on_its_own(run_dir, tmp_path, capsys):
    """int8 quantises activations over the batch, so evaluate runs it one image at a time: each
    image is scored as the app and `predict` score it, whatever else is held out."""
    import torch

    from vitdemo.data import normalize
    from vitdemo.runtime import prepare

    assert main(["evaluate", "--checkpoint", str(run_dir), "--data", "synthetic", "--runtime", "int8",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "evaluation.json").read_text())
    model, meta = load_checkpoint(run_dir)
    val = held_out_shapes()
    run = prepare(model, "int8")
    x = normalize(val.images, meta["mean"], meta["std"])
    logits = torch.cat([run(x[i:i + 1]) for i in range(len(x))])
    singly = logits.argmax(-1)
    # The loss tells batches from single images apart even where no answer changes.
    assert report["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, val.labels).item(), rel=1e-5)
    matrix = torch.tensor(report["confusion_matrix"])
    assert torch.equal(matrix.sum(0), torch.bincount(singly, minlength=4))
    assert report["accuracy"] == pytest.approx((singly == val.labels).float().mean().item(), abs=1e-6)
    assert "agreement with the eager PyTorch fp32 model" in capsys.readouterr().out


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


# ---------------------------------------------------------------------------------------------
# Offline and bad input: one clear line naming the option to use, exit code 2, nothing left behind
# ---------------------------------------------------------------------------------------------


def one_error_line(capsys) -> str:
    """The error: the last line, the only one saying "error" (a download's progress bar may come
    before it), and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("error: "), err
    assert sum("error" in line.lower() for line in lines) == 1, err
    return lines[-1]


def test_cifar10_missing_names_the_options(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "cifar10", "--out", "run"]) == 2
    line = one_error_line(capsys)
    assert "--download" in line and "--data FOLDER" in line and "download=True" not in line
    assert list(tmp_path.iterdir()) == []
    assert "README, 'CIFAR-10 as an image folder'" in line and "\n### CIFAR-10 as an image folder\n" in README


class _DroppedDownload:
    """What urllib gives torchvision when the connection drops: a response that yields one chunk
    of the archive, then fails (so torchvision has made its folder and a partial archive)."""

    def __init__(self, request, *args, **kwargs):
        self.url, self.length, self.method = request.full_url, 1 << 20, request.get_method()
        self.chunks = 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, size=-1):
        if self.chunks:
            self.chunks -= 1
            return b"\x1f\x8b" + b"\0" * 100
        raise ConnectionResetError(104, "Connection reset by peer")


@pytest.mark.parametrize("existing", [False, True])
def test_cifar10_failed_download_leaves_nothing_behind(existing, tmp_path, monkeypatch, capsys):
    import urllib.request

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", _DroppedDownload)
    if existing:  # a --data-root the user had already: only what the download added goes
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "keep.txt").write_text("mine")
    assert main(["train", "--data", "cifar10", "--download", "--out", "run"]) == 2
    line = one_error_line(capsys)
    assert "could not download CIFAR-10" in line and "Connection reset" in line and "--data FOLDER" in line
    assert "load_image_folder" not in line
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == (["data", "data/keep.txt"] if existing else [])


def test_init_from_torchvision_offline(tmp_path, monkeypatch, capsys):
    import urllib.error

    import torchvision.models._api as tv_api

    def offline(url, *args, **kwargs):  # what torch.hub's download raises without a network
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    assert main(["train", "--data", "synthetic", "--init-from", "torchvision", "--recipe", "finetune",
                 "--out", "run"]) == 2
    line = one_error_line(capsys)
    assert "--init-from torchvision" in line and "Name or service not known" in line and "--init-source" in line
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def hub(monkeypatch):
    """huggingface_hub's download, recorded: a cache miss for local lookups; the network calls
    are what the tests below must not reach when offline."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def download(repo_id, filename, local_files_only=False, **kwargs):
        calls.append("cache" if local_files_only else "network")
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        raise AssertionError("the hub was asked although it is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_init_from_timm_offline_fails_at_once(hub, tmp_path, monkeypatch, capsys):
    import socket

    import vitdemo.pretrained

    probes = []

    def unreachable(address, timeout=None):
        probes.append(address)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(vitdemo.pretrained.socket, "create_connection", unreachable)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "synthetic", "--init-from", "timm", "--recipe", "finetune", "--out", "run"]) == 2
    line = one_error_line(capsys)
    assert "--init-from timm" in line and "huggingface.co is not reachable" in line
    assert hub == ["cache"] and probes == [("huggingface.co", 443)]  # no hub request, so no retries
    assert list(tmp_path.iterdir()) == []


def test_timm_weights_with_hf_hub_offline_do_not_probe(hub, monkeypatch):
    from huggingface_hub import constants

    import vitdemo.pretrained

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(vitdemo.pretrained.socket, "create_connection", lambda *a, **k: pytest.fail("probed"))
    with pytest.raises(vitdemo.pretrained.PretrainedUnavailable, match="HF_HUB_OFFLINE"):
        vitdemo.pretrained.load_pretrained("timm")
    assert hub == ["cache"]


def test_timm_weights_download_when_reachable(tmp_path, monkeypatch):
    import huggingface_hub
    import torch
    from huggingface_hub.errors import LocalEntryNotFoundError
    from safetensors.torch import save_file

    import vitdemo.pretrained

    save_file({"w": torch.arange(3.0)}, tmp_path / "model.safetensors")

    def download(repo_id, filename, local_files_only=False, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        return str(tmp_path / filename)

    class Connection:
        def close(self):
            pass

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(vitdemo.pretrained.socket, "create_connection", lambda *a, **k: Connection())
    assert torch.equal(vitdemo.pretrained._fetch_timm()["w"], torch.arange(3.0))


def test_predict_topk_must_be_positive(run_dir, tmp_path, capsys):
    img = tmp_path / "red.png"
    Image.new("RGB", (50, 40), (200, 20, 20)).save(img)
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(img), "--checkpoint", str(run_dir), "--topk", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--topk" in err.splitlines()[-1] and "at least 1" in err
    assert main(["predict", str(img), "--checkpoint", str(run_dir), "--topk", "9"]) == 0
    assert capsys.readouterr().out.count(",") == 3  # all 4 classes: no more than the model has


def test_missing_cuda_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--data", "synthetic", "--out", "run", "--device", "cuda"]) == 2
    line = one_error_line(capsys)
    assert "--device auto or cpu" in line and "README, 'On a GPU'" in line and "\n### On a GPU\n" in README
    assert main(["train", "--data", "synthetic", "--out", "run", "--device", "gpu"]) == 2
    assert "is not a device" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_installed_without_the_shipped_model(tmp_path, monkeypatch, capsys):
    import vitdemo.cli.support

    img = tmp_path / "red.png"
    Image.new("RGB", (50, 40), (200, 20, 20)).save(img)
    monkeypatch.setattr(vitdemo.cli.support, "DEFAULT_CHECKPOINT", tmp_path / "none" / "model.safetensors")
    assert main(["predict", str(img)]) == 2
    line = one_error_line(capsys)
    assert "--checkpoint" in line and "pip install -e ." in line


# ---------------------------------------------------------------------------------------------
# Help
# ---------------------------------------------------------------------------------------------


def commands():
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices


def test_every_command_has_a_description():
    for name, p in commands().items():
        assert p.description and len(p.description) > 20, name
        assert p.format_help().count(p.description.split()[0]) >= 1


def test_help_shows_every_default():
    import argparse

    for name, p in commands().items():
        text = " ".join(p.format_help().split())  # unwrapped
        for action in p._actions:
            if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
                continue
            help_text = " ".join(p._get_formatter()._expand_help(action).split())
            assert "default" in help_text and help_text in text, f"{name} {action.option_strings}: {help_text}"
            shown = "auto" if action.dest == "device" else str(action.default)  # "auto (default)"
            assert shown in help_text, f"{name} {action.option_strings}: {help_text}"


def test_recipe_defaults_are_in_the_help():
    from vitdemo.engine import RECIPES

    train = commands()["train"]
    helps = {action.dest: train._get_formatter()._expand_help(action) for action in train._actions}
    for field in ("epochs", "batch_size", "lr", "weight_decay", "warmup", "label_smoothing"):
        values = {f"{getattr(recipe, field):g}" for recipe in RECIPES.values()}
        assert "default from --recipe" in helps[field] and all(v in helps[field] for v in values), helps[field]
    assert "finetune 64" in helps["batch_size"] and "small-data 128" in helps["batch_size"]
    assert "paper 0.003" in helps["lr"] and "finetune 0.01" in helps["lr"]


# ---------------------------------------------------------------------------------------------
# The int8 export that ships beside a checkpoint
# ---------------------------------------------------------------------------------------------


def test_int8_runtime_uses_the_shipped_export(tmp_path, monkeypatch, capsys):
    import vitdemo.cli.support
    from vitdemo.checkpoint import DEFAULT_CHECKPOINT

    if not (DEFAULT_CHECKPOINT.parent / "model.int8.onnx").is_file():
        pytest.skip("the shipped model's int8 export is not in this checkout")
    monkeypatch.setattr(vitdemo.cli.support, "prepare", lambda *a, **k: pytest.fail("exported again"))
    img = tmp_path / "red.png"
    Image.new("RGB", (50, 40), (200, 20, 20)).save(img)
    assert main(["predict", str(img), "--runtime", "int8", "--topk", "3"]) == 0
    captured = capsys.readouterr()
    assert "model.int8.onnx beside the checkpoint" in captured.err and captured.out.count(",") == 2


def test_int8_runtime_exports_afresh_when_the_file_beside_is_of_other_weights(run_dir, tmp_path, monkeypatch, capsys):
    import shutil

    import vitdemo.cli.support
    from vitdemo.checkpoint import DEFAULT_CHECKPOINT

    shipped = DEFAULT_CHECKPOINT.parent / "model.int8.onnx"
    if not shipped.is_file():
        pytest.skip("the shipped model's int8 export is not in this checkout")
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    shutil.copy(shipped, run / "model.int8.onnx")  # the shipped model's export: other weights
    prepared = []

    def prepare(model, runtime, onnx_path=None):
        prepared.append((runtime, onnx_path))
        return model

    monkeypatch.setattr(vitdemo.cli.support, "prepare", prepare)
    img = tmp_path / "red.png"
    Image.new("RGB", (50, 40), (200, 20, 20)).save(img)
    assert main(["predict", str(img), "--checkpoint", str(run), "--runtime", "int8"]) == 0
    assert prepared == [("int8", None)]  # a temporary export; the file beside is left as it is
    assert "not of these weights" in capsys.readouterr().err
    assert (run / "model.int8.onnx").read_bytes() == shipped.read_bytes()


def test_recipe_options_override_the_recipe_and_ema_is_saved_beside_the_run(tmp_path, capsys):
    assert main(["train", "--data", "synthetic", "--out", str(tmp_path), "--epochs", "1", "--device", "cpu",
                 "--max-images-per-class", "40", "--recipe", "small-vit", "--policy", "none", "--mixup", "0",
                 "--repeats", "2", "--ema", "0.9", *TINY]) == 0
    recipe = json.loads((tmp_path / "results.json").read_text())["recipe"]
    assert recipe["policy"] is None and recipe["mixup_alpha"] == 0 and recipe["repeats"] == 2
    assert recipe["cutmix_alpha"] == 1.0 and recipe["erasing"] == 0.25  # the rest from small-vit
    assert "ema_val_acc: " in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "ema")[1]["metrics"]["epoch"] == 1
    assert main(["train", "--data", "synthetic", "--out", str(tmp_path / "r"), "--epochs", "1", "--device", "cpu",
                 "--max-images-per-class", "40", "--randaugment", *TINY]) == 0
    assert json.loads((tmp_path / "r" / "results.json").read_text())["recipe"]["policy"] == "randaugment"
