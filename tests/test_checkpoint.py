"""Checkpoints: round trip, metadata that matches the weights, atomic writes, hostile files."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import vitdemo
from vitdemo.data import Preprocessing
from vitdemo.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    load_peer_weights,
    read_metadata,
    save_checkpoint,
    unwrap,
)

CLASSES = ["a", "b", "c"]
PREP = Preprocessing(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def small_model():
    torch.manual_seed(0)
    return vitdemo.create_model("vit_cifar_4", num_classes=3, depth=2, embed_dim=32, num_heads=2, mlp_dim=64)


def test_round_trip(tmp_path):
    model = small_model().eval()
    path = save_checkpoint(tmp_path / "m.safetensors", model, CLASSES, PREP, metrics={"val_acc": 0.5})
    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    assert loaded.config == model.config
    assert meta["class_names"] == CLASSES
    assert (meta["image_size"], meta["mean"], meta["std"]) == (32, [0.5] * 3, [0.25] * 3)
    assert meta["metrics"] == {"val_acc": 0.5}
    assert meta["vitdemo_version"] == vitdemo.__version__
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_directory_path_finds_model_file(tmp_path):
    save_checkpoint(tmp_path / "model.safetensors", small_model(), CLASSES, PREP)
    assert load_checkpoint(tmp_path)[1]["class_names"] == CLASSES


def test_class_names_must_match_outputs(tmp_path):
    with pytest.raises(CheckpointError, match="2 class names for a model with 3 outputs"):
        save_checkpoint(tmp_path / "m.safetensors", small_model(), ["a", "b"], PREP)


def write_raw(path, tensors, metadata):
    save_file(tensors, str(path), metadata={"vitdemo": json.dumps(metadata)} if metadata is not None else None)


def good_metadata(model):
    return {"format": "vitdemo-checkpoint", "format_version": 1, "config": model.config.to_dict(),
            "class_names": CLASSES, **PREP.to_dict()}


@pytest.mark.parametrize("field, value, message", [
    ("depth", 3, "weights do not match the config"),  # valid config, but not these weights
    ("num_heads", 5, "invalid config.*divisible"),  # 32 is not divisible by 5
    ("colour", 1, "invalid config.*unknown hyper-parameter"),
])
def test_config_that_does_not_describe_the_weights(tmp_path, field, value, message):
    model = small_model()
    meta = good_metadata(model)
    meta["config"][field] = value
    write_raw(tmp_path / "m.safetensors", model.state_dict(), meta)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "m.safetensors")


def test_wrong_shapes(tmp_path):
    model = small_model()
    state = model.state_dict()
    state["pos_embed"] = torch.zeros(1, 10, 32)
    write_raw(tmp_path / "m.safetensors", state, good_metadata(model))
    with pytest.raises(CheckpointError, match="pos_embed"):
        load_checkpoint(tmp_path / "m.safetensors")


@pytest.mark.parametrize("drop", ["class_names", "mean", "config"])
def test_missing_metadata(tmp_path, drop):
    model = small_model()
    meta = good_metadata(model)
    del meta[drop]
    write_raw(tmp_path / "m.safetensors", model.state_dict(), meta)
    with pytest.raises(CheckpointError, match=f"lacks.*{drop}"):
        load_checkpoint(tmp_path / "m.safetensors")


def test_good_metadata_written_by_hand_loads(tmp_path):
    model = small_model().eval()
    write_raw(tmp_path / "m.safetensors", model.state_dict(), good_metadata(model))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / "m.safetensors")[0](x), model(x))


@pytest.mark.parametrize("changes, message", [
    ({"format_version": 2, "vitdemo_version": "9.0"},
     r"written by a newer vitdemo \(9\.0, checkpoint format 2\); this vitdemo \(.+\) reads format 1: update vitdemo"),
    ({"format_version": "1"}, "invalid checkpoint format version: '1'"),
    ({"format_version": None}, "invalid checkpoint format version: None"),
    ({"format": "someone-else"}, "not a vitdemo checkpoint \\(format 'someone-else'"),
])
def test_format_and_version_are_checked_on_load(tmp_path, changes, message):
    """A newer format may mean something else by the same fields: refuse it, saying what to do."""
    model = small_model()
    write_raw(tmp_path / "m.safetensors", model.state_dict(), {**good_metadata(model), **changes})
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=message):
        read_metadata(tmp_path / "m.safetensors")


def test_metadata_that_is_not_an_object(tmp_path):
    save_file(small_model().state_dict(), str(tmp_path / "m.safetensors"), metadata={"vitdemo": "[1, 2]"})
    with pytest.raises(CheckpointError, match="corrupt metadata: not a JSON object"):
        load_checkpoint(tmp_path / "m.safetensors")


def test_no_vitdemo_metadata(tmp_path):
    write_raw(tmp_path / "m.safetensors", small_model().state_dict(), None)
    with pytest.raises(CheckpointError, match="no vitdemo metadata"):
        load_checkpoint(tmp_path / "m.safetensors")


def test_truncated_file(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", small_model(), CLASSES, PREP)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        load_checkpoint(path)


def test_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "m.safetensors"
    path.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    pth = tmp_path / "m.pth"
    torch.save({"x": Evil()}, pth)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_peer_weights(pth, "timm")
    assert not marker.exists()


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_peer_pth_is_converted(tmp_path):
    model = vitdemo.create_model("vit_ti_16", depth=1)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pth")
    state = load_peer_weights(tmp_path / "w.pth", "timm")
    assert set(state) == set(model.state_dict())


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, small_model(), CLASSES, PREP)
    before = path.read_bytes()

    def fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left


def test_full_disk_gives_clear_error_and_keeps_old_file(tmp_path, monkeypatch):
    import errno

    import vitdemo.checkpoint as ckpt

    path = save_checkpoint(tmp_path / "m.safetensors", small_model(), CLASSES, PREP)
    before = path.read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", no_space)
    with pytest.raises(OSError, match="cannot write .*No space left on device"):
        save_checkpoint(path, small_model(), CLASSES, PREP)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_unwritable_path_gives_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="cannot write"):
        save_checkpoint(blocker / "m.safetensors", small_model(), CLASSES, PREP)


def test_read_metadata_without_weights(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", small_model(), CLASSES, PREP, recipe={"lr": 1e-3})
    assert read_metadata(path)["recipe"] == {"lr": 1e-3}


def test_unwrap():
    model = small_model()

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert unwrap(Wrapper(model)) is model
    with pytest.raises(TypeError):
        unwrap(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_checkpoint_file_has_ordinary_permissions(tmp_path, umask, mode):
    """As open() would create it under the process's umask, not mkstemp's 0600 (expected modes
    written out, not computed by the code under test)."""
    old = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path / "m.safetensors", small_model(), CLASSES, PREP)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode
