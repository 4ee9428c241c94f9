"""Errors that tell the truth: a failure the user can act on (offline, a missing or damaged
file, a contradicting option) gets our words; a bug, MemoryError, a full disk or an interrupt
inside the same guarded code is not reported as the user's fault, but surfaces as it is."""

import errno
import tarfile
import urllib.error

import pytest
import torch
import torchvision
from helpers import small_model

import vitdemo.checkpoint as ckpt
from vitdemo import cli
from vitdemo.checkpoint import CheckpointError, atomic_write, load_peer_weights
from vitdemo.cli import main
from vitdemo.data import DataError, load_cifar10


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("error: "), err
    return lines[-1]


# ---------------------------------------------------------------------------------------------
# CIFAR-10: offline, missing or damaged is the user's to fix; anything else surfaces
# ---------------------------------------------------------------------------------------------


def failing_cifar(exc, made=None):
    """A torchvision.datasets.CIFAR10 that raises `exc`, after creating `made` (a partial download)."""
    def cifar(root, train=True, download=False):
        if made is not None:
            made.mkdir(parents=True, exist_ok=True)
            (made / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b partial")
        raise exc

    return cifar


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), TypeError("a bug"), MemoryError(),
                                 OSError(errno.ENOSPC, "No space left on device"),
                                 PermissionError(errno.EACCES, "Permission denied")])
@pytest.mark.parametrize("download", [False, True])
def test_cifar10_failures_that_are_not_offline_surface(exc, download, tmp_path, monkeypatch):
    root = tmp_path / "data"
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", failing_cifar(exc, root if download else None))
    with pytest.raises(type(exc)) as info:
        load_cifar10(root, download=download)
    assert info.value is exc  # not a DataError saying "not found" or "offline?"
    assert not root.exists()  # a failed download still leaves nothing behind


@pytest.mark.parametrize("exc, message", [
    (urllib.error.URLError("[Errno -3] Temporary failure in name resolution"), r"\(offline\?\).*name resolution"),
    (ConnectionResetError(104, "Connection reset by peer"), r"\(offline\?\).*Connection reset"),
    (TimeoutError("The read operation timed out"), r"\(offline\?\).*timed out"),
    (RuntimeError("File not found or corrupted."), r"File not found or corrupted\. Try again"),
    (tarfile.ReadError("unexpected end of data"), r"archive arrived damaged \(ReadError: unexpected end of data"),
])
def test_cifar10_download_failures_are_explained(exc, message, tmp_path, monkeypatch):
    root = tmp_path / "data"
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", failing_cifar(exc, root))
    with pytest.raises(DataError, match="could not download CIFAR-10") as info:
        load_cifar10(root, download=True)
    assert info.match(message) and info.value.__cause__ is exc
    assert not root.exists()


def test_cifar10_missing_is_still_explained_by_the_real_torchvision(tmp_path):
    with pytest.raises(DataError, match="not found in .*download=True"):
        load_cifar10(tmp_path / "nothing_here", download=False)


def test_cli_full_disk_during_download_is_not_called_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10",
                        failing_cifar(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "data"))
    assert main(["train", "--data", "cifar10", "--download", "--out", "run"]) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and "offline" not in line and "internet" not in line
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic writes and other implementations' weights files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [MemoryError(), KeyboardInterrupt(), TypeError("a bug")])
def test_atomic_write_lets_what_is_not_a_write_error_surface(exc, tmp_path):
    path = tmp_path / "m.bin"
    path.write_bytes(b"old")

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise exc

    with pytest.raises(type(exc)) as info:
        atomic_write(path, write)
    assert info.value is exc and "cannot write" not in str(info.value)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.bin"]


def test_atomic_write_still_names_the_file_on_a_full_disk(tmp_path):
    def write(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"cannot write .*m\.bin: No space left on device"):
        atomic_write(tmp_path / "m.bin", write)


@pytest.fixture
def peer_file(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(small_model(depth=1, embed_dim=32, num_heads=2, mlp_dim=64).state_dict(), path)
    return path


@pytest.mark.parametrize("exc", [TypeError("a bug"), AttributeError("a bug"), MemoryError()])
def test_peer_weights_bug_or_memory_is_not_the_files_fault(exc, peer_file, monkeypatch):
    def load(*args, **kwargs):
        raise exc

    monkeypatch.setattr(ckpt.torch, "load", load)
    with pytest.raises(type(exc)) as info:
        load_peer_weights(peer_file, "timm")
    assert info.value is exc


class _WrongArguments:
    """Pickles as a call of torch's own tensor rebuilder with one argument too many: a damaged
    file whose error (a TypeError) is raised inside torch's unpickler."""

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, tuple(range(8)))


@pytest.mark.parametrize("content", ["text", "truncated", "wrong arguments", "garbage safetensors"])
def test_damaged_peer_weights_are_the_files_fault(content, peer_file, tmp_path):
    path = peer_file
    if content == "text":
        path.write_text("hello world\n")
    elif content == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif content == "wrong arguments":
        torch.save({"w": _WrongArguments()}, path)
    else:
        path = tmp_path / "w.safetensors"
        path.write_bytes(b"\x89PNG\r\n\x1a\n not a model" * 10)
    with pytest.raises(CheckpointError, match=f"cannot read weights from .*{path.name}"):
        load_peer_weights(path, "timm")


# ---------------------------------------------------------------------------------------------
# train --set num_classes: the data decide
# ---------------------------------------------------------------------------------------------


def test_set_num_classes_agreeing_with_the_data_is_honoured(tmp_path, monkeypatch):
    built = []

    def train(model, *args, **kwargs):  # the model is what matters here, not training it
        built.append(model)
        return iter(())

    monkeypatch.setattr(cli.train, "engine_train", train)
    assert main(["train", "--data", "synthetic", "--out", str(tmp_path), "--device", "cpu",
                 "--set", "num_classes=4", "depth=1", "embed_dim=32", "num_heads=2", "mlp_dim=64"]) == 0
    assert built[0].config.num_classes == 4 and built[0].config.depth == 1


def test_set_num_classes_contradicting_the_data_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli.train, "engine_train", lambda *a, **k: pytest.fail("trained"))
    assert main(["train", "--data", "synthetic", "--out", str(tmp_path), "--device", "cpu",
                 "--set", "num_classes=6"]) == 2
    line = one_error_line(capsys)
    assert "--set num_classes=6 contradicts --data synthetic, which has 4 classes" in line
    assert "multiple values" not in line
