"""The faster inference runtimes: prepacked fp32 weights in PyTorch, and ONNX Runtime fp32 and
int8. Each must give the eager model's answers (int8: nearly always the same class)."""

import pytest
import torch
import torch.nn as nn

import vitdemo
from vitdemo.data import Preprocessing
from vitdemo import runtime
from vitdemo.cli import main
from vitdemo.checkpoint import save_checkpoint

needs_onednn = pytest.mark.skipif(not runtime.packing_available(), reason="this PyTorch build has no oneDNN")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vitdemo.create_model("vit_cifar_4", num_classes=10, depth=2, embed_dim=64, num_heads=2, mlp_dim=128).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """The model exported once as fp32 and as int8 ONNX files."""
    folder = tmp_path_factory.mktemp("onnx")
    return {precision: runtime.export_onnx(model, folder / f"m.{precision}.onnx", int8=precision == "int8")
            for precision in ("fp32", "int8")}


@needs_onednn
@pytest.mark.parametrize("batch", [1, 5])
def test_packed_matches_eager(model, images, batch):
    packed = runtime.pack(model)
    with torch.inference_mode():
        torch.testing.assert_close(packed(images[:batch]), model(images[:batch]), atol=1e-5, rtol=1e-5)
        # The attention maps come through the packed layers too.
        _, ours = packed(images[:batch], return_attention=True)
        _, theirs = model(images[:batch], return_attention=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_packed_fuses_gelu_and_leaves_the_model_alone(model):
    packed = runtime.pack(model)
    block = packed.blocks[0]
    assert isinstance(block.attn.qkv, runtime.PackedLinear) and isinstance(block.mlp.fc2, runtime.PackedLinear)
    assert block.mlp.fc1.act == "gelu" and isinstance(block.mlp.act, nn.Identity)
    assert isinstance(model.blocks[0].mlp.fc1, nn.Linear)  # a copy was packed, not the model
    # Its state dict still holds plain tensors with the original values.
    assert torch.equal(packed.state_dict()["blocks.0.attn.qkv.weight"], model.state_dict()["blocks.0.attn.qkv.weight"])


@needs_onednn
def test_packed_keeps_an_approximate_gelu_separate(images):
    torch.manual_seed(0)
    model = vitdemo.create_model("vit_cifar_4", num_classes=10, depth=1, embed_dim=32, num_heads=2, mlp_dim=64).eval()
    model.blocks[0].mlp.act = nn.GELU(approximate="tanh")
    packed = runtime.pack(model)
    assert packed.blocks[0].mlp.fc1.act == "none" and packed.blocks[0].mlp.act.approximate == "tanh"
    with torch.inference_mode():
        torch.testing.assert_close(packed(images), model(images), atol=1e-5, rtol=1e-5)


def test_packed_linear_rejects_unknown_activation():
    with pytest.raises(ValueError, match="act must be"):
        runtime.PackedLinear(nn.Linear(4, 4), act="relu")


def test_unknown_runtime_is_refused(model):
    with pytest.raises(ValueError, match="runtime must be one of eager, packed, onnx, int8"):
        runtime.prepare(model, "tensorrt")


def test_onnx_fp32_matches_eager(model, images, exported):
    runner = runtime.load_onnx(exported["fp32"], model)
    assert runner.metadata["vitdemo.precision"] == "fp32"
    with torch.inference_mode():
        for batch in (1, 5):  # the batch dimension is dynamic
            torch.testing.assert_close(runner(images[:batch]), model(images[:batch]), atol=1e-4, rtol=1e-4)


def test_int8_agrees_with_eager(model, exported):
    runner = runtime.load_onnx(exported["int8"], model)
    assert runner.metadata["vitdemo.precision"] == "int8"
    assert exported["int8"].stat().st_size < 0.5 * exported["fp32"].stat().st_size
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref, out = model(x), runner(x)
    assert (out - ref).abs().max().item() < 0.1 * ref.abs().max().item()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9


def test_int8_weights_have_one_scale_per_output_channel(exported):
    """Per-channel scales keep the int8 model's answers closer to fp32 (see `_export_onnx`)."""
    import onnx

    graph = onnx.load(exported["int8"]).graph
    dims = {init.name: list(init.dims) for init in graph.initializer}
    products = [node for node in graph.node if node.op_type == "MatMulInteger"]
    assert len(products) == 2 * 4 + 1  # qkv, proj, fc1, fc2 of each of the 2 blocks, and the head
    for node in products:
        weight, weight_zero_point = node.input[1], node.input[3]
        assert dims[weight_zero_point] == dims[weight][1:], node.name  # one per output column


def test_stale_export_is_refused_and_never_overwritten(model, exported, tmp_path):
    """A file the user named is never replaced, even when it is of other weights: `prepare`
    refuses it with a message that says what to do, and the file keeps every byte."""
    path = tmp_path / "m.onnx"
    path.write_bytes(exported["fp32"].read_bytes())
    before = path.read_bytes()
    other = vitdemo.create_model("vit_cifar_4", num_classes=10, depth=2, embed_dim=64, num_heads=2, mlp_dim=128).eval()
    with pytest.raises(ValueError, match="not exported from these weights"):
        runtime.load_onnx(path, other)
    with pytest.raises(ValueError, match=r"m\.onnx was not exported from these weights.*left as it is"):
        runtime.prepare(other, "onnx", onnx_path=path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("asked, held", [("onnx", "int8"), ("int8", "fp32")])
def test_an_export_of_the_other_precision_is_refused_and_never_overwritten(model, exported, tmp_path, asked, held):
    """The reported bug: `--runtime onnx --onnx model.int8.onnx` replaced the int8 file with an
    fp32 export under the same name."""
    path = tmp_path / f"m.{held}.onnx"
    path.write_bytes(exported[held].read_bytes())
    before = path.read_bytes()
    with pytest.raises(ValueError, match=f"holds {held} weights, not {'fp32' if asked == 'onnx' else 'int8'}"):
        runtime.prepare(model, asked, onnx_path=path)
    assert path.read_bytes() == before
    assert runtime.load_onnx(path, model).metadata["vitdemo.precision"] == held


def test_load_onnx_checks_the_precision_asked_for(model, exported):
    assert runtime.load_onnx(exported["int8"], model, precision="int8").metadata["vitdemo.precision"] == "int8"
    with pytest.raises(ValueError, match="m.fp32.onnx holds fp32 weights, not int8"):
        runtime.load_onnx(exported["fp32"], model, precision="int8")
    with pytest.raises(ValueError, match="precision must be"):
        runtime.load_onnx(exported["fp32"], model, precision="fp16")


def test_prepare_reuses_a_matching_export_and_writes_a_new_one(model, images, exported, tmp_path):
    path = tmp_path / "m.int8.onnx"
    path.write_bytes(exported["int8"].read_bytes())
    before = path.stat().st_mtime_ns
    runtime.prepare(model, "int8", onnx_path=path)
    assert path.stat().st_mtime_ns == before
    fresh = tmp_path / "new" / "m.onnx"  # a name that is not taken: exported there
    runner = runtime.prepare(model, "onnx", onnx_path=fresh)
    assert runtime.load_onnx(fresh, model, precision="fp32") is not None
    with torch.inference_mode():
        torch.testing.assert_close(runner(images), model(images), atol=1e-4, rtol=1e-4)


def test_export_without_overwrite_refuses_an_existing_file(model, tmp_path):
    path = tmp_path / "taken.onnx"
    path.write_bytes(b"the user's own file")
    with pytest.raises(FileExistsError, match="taken.onnx already exists"):
        runtime.export_onnx(model, path, overwrite=False)
    assert path.read_bytes() == b"the user's own file"
    assert [p.name for p in tmp_path.iterdir()] == ["taken.onnx"]  # no temporary file left


def test_cli_refuses_to_overwrite_an_int8_export_given_to_the_fp32_runtime(model, exported, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "run" / "model.safetensors", model, [f"c{i}" for i in range(10)],
                           Preprocessing(32, (0.5,) * 3, (0.5,) * 3))
    onnx = tmp_path / "run" / "model.int8.onnx"
    onnx.write_bytes(exported["int8"].read_bytes())
    before = onnx.read_bytes()
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    assert main(["predict", str(image), "--checkpoint", str(ckpt), "--runtime", "onnx", "--onnx", str(onnx)]) == 2
    err = capsys.readouterr().err
    assert "model.int8.onnx holds int8 weights, not fp32" in err and "Traceback" not in err
    assert onnx.read_bytes() == before


def test_cli_export_onnx_and_predict_with_each_runtime(model, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "run" / "model.safetensors", model, [f"c{i}" for i in range(10)],
                           Preprocessing(32, (0.5,) * 3, (0.5,) * 3))
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.int8.onnx"), "--int8"]) == 0
    assert "int8 weights" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.pt2"), "--int8"]) == 2
    assert "--int8 applies to ONNX" in capsys.readouterr().err
    tops = {}
    for name in runtime.RUNTIMES:
        extra = ["--onnx", str(tmp_path / "m.int8.onnx")] if name == "int8" else []
        assert main(["predict", str(image), "--checkpoint", str(ckpt), "--runtime", name, *extra]) == 0
        tops[name] = capsys.readouterr().out.split(": ")[1].split()[0]
    assert len(set(tops.values())) == 1, tops


def test_export_leaves_the_callers_model_as_it_was(tmp_path):
    torch.manual_seed(0)
    model = vitdemo.create_model("vit_cifar_4", num_classes=3, depth=1, embed_dim=32, num_heads=2, mlp_dim=64).train()
    runtime.export_onnx(model, tmp_path / "m.onnx")
    assert model.training  # exported in eval mode, handed back in training mode


def test_a_file_that_is_not_onnx_is_refused_clearly_and_kept(model, tmp_path):
    path = tmp_path / "photo.onnx"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not a model")
    with pytest.raises(ValueError, match=r"photo\.onnx is not an ONNX model that ONNX Runtime can load"):
        runtime.prepare(model, "int8", onnx_path=path)
    assert path.read_bytes() == b"\x89PNG\r\n\x1a\n not a model"
