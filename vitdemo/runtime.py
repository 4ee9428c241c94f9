"""Faster CPU inference for a trained ViT, chosen by name (see `RUNTIMES`).

- "eager": the model as it is, PyTorch fp32.
- "packed": the same fp32 arithmetic, with every encoder linear layer's weight laid out once for
  oneDNN's matrix product (weight prepacking) and the bias, and in the MLP the GELU, applied
  inside that product instead of in separate passes over memory. This is what
  `torch.compile` with freezing does to linear layers, without a compiler or a warm-up.
  Besides the matrix products (`addmm`), the eager model makes a separate pass over memory for
  the bias and for GELU: the packed product removes them, and is faster at batch 1 too
  (`python benchmarks/bench.py inference`).
- "onnx": the model exported to ONNX and run by ONNX Runtime, fp32.
- "int8": that ONNX model with its matrix-product weights quantised to int8, one scale per
  output channel (activations quantised on the fly, per batch): ONNX Runtime's dynamic
  quantisation, 2.4x to 5.2x fp32 for ViT-B/16 at batch 1, by CPU (`python benchmarks/bench.py int8`).
  PyTorch's own eager int8 path (`torch.ao.quantization.quantize_dynamic`) is deprecated, and
  torchao's int8 without `torch.compile` was far slower in a trial here. Because activations
  are quantised per batch, an image's logits depend slightly on the other images in its batch:
  `vitdemo evaluate --runtime int8` therefore scores one image at a time, as the app and
  `vitdemo predict` run it.

Each runtime is a callable from a normalised image batch (B, 3, H, W) to logits (B, classes);
attention maps always come from the PyTorch model itself.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from .checkpoint import atomic_write
from .model import VisionTransformer

RUNTIMES = ("eager", "packed", "onnx", "int8")
Runtime = Callable[[Tensor], Tensor]


class RuntimeUnavailable(RuntimeError):
    """The runtime cannot run here (a package or a CPU feature is missing); the message says why."""


# ---------------------------------------------------------------------------------------------
# "packed": fp32 with prepacked oneDNN weights
# ---------------------------------------------------------------------------------------------


def packing_available() -> bool:
    """Whether this PyTorch build has oneDNN's prepacked linear (x86 and ARM builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """`act(x @ W.T + b)` with `W` prepacked for oneDNN; `act` is "none" or "gelu" (exact, erf).
    Inference only, on the CPU. `weight` and `bias` stay ordinary buffers, so `state_dict()`
    still holds plain tensors."""

    def __init__(self, linear: nn.Linear, act: str = "none") -> None:
        super().__init__()
        if act not in ("none", "gelu"):
            raise ValueError(f"act must be 'none' or 'gelu', got {act!r}")
        self.act = act
        self.register_buffer("weight", linear.weight.detach().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight)  # an opaque oneDNN tensor

    def forward(self, x: Tensor) -> Tensor:
        # The last argument picks GELU's algorithm: "none" is the exact erf form, as nn.GELU().
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, self.act, [], "none" if self.act == "gelu" else "")

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, act={self.act}"


def pack(model: VisionTransformer) -> VisionTransformer:
    """An inference-only copy of `model` whose encoder linear layers are `PackedLinear`s, the
    MLP's GELU fused into `fc1`. Same outputs as `model` within float rounding (1e-5)."""
    if not packing_available():
        raise RuntimeUnavailable("this PyTorch build has no oneDNN (mkldnn) linear; use the 'eager' runtime")
    packed = copy.deepcopy(model).cpu().eval().requires_grad_(False)
    for block in packed.blocks:
        block.attn.qkv = PackedLinear(block.attn.qkv)
        block.attn.proj = PackedLinear(block.attn.proj)
        if isinstance(block.mlp.act, nn.GELU) and block.mlp.act.approximate == "none":
            block.mlp.fc1, block.mlp.act = PackedLinear(block.mlp.fc1, act="gelu"), nn.Identity()
        else:
            block.mlp.fc1 = PackedLinear(block.mlp.fc1)
        block.mlp.fc2 = PackedLinear(block.mlp.fc2)
    return packed


# ---------------------------------------------------------------------------------------------
# "onnx" and "int8": ONNX Runtime
# ---------------------------------------------------------------------------------------------

# The checkpoint's weights digest and the precision travel inside an exported file, so a stale
# export, or one of the other precision, is noticed wherever it is loaded.
SOURCE_KEY = "vitdemo.weights_sha256"
PRECISION_KEY = "vitdemo.precision"
PRECISIONS = ("fp32", "int8")


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the model's state dict (names, shapes and values), in key order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def export_onnx(model: VisionTransformer, path: str | Path, *, int8: bool = False, overwrite: bool = True) -> Path:
    """Write `model` as an ONNX file with a dynamic batch size, fp32, or with int8 weights if
    `int8`; the weights' digest and the precision are stored in its metadata (`SOURCE_KEY`,
    `PRECISION_KEY`). With `overwrite=False` an existing file is left alone (`FileExistsError`)."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as err:
        raise RuntimeUnavailable(f"ONNX export needs the onnx and onnxscript packages ({err}); "
                                 "pip install \"vitdemo[onnx]\" (or pip install -e \".[onnx]\" in a clone)") from None
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu()  # leave the caller's model where it is
    was_training = model.training
    model.eval()
    try:
        return _export_onnx(model, path, int8, overwrite)
    finally:
        model.train(was_training)


def _export_onnx(model: VisionTransformer, path: str | Path, int8: bool, overwrite: bool) -> Path:
    import onnx

    height, width = model.config.image_size
    example = torch.randn(2, 3, height, width)  # batch 2: a batch of 1 would be fixed as a constant
    digest = weights_digest(model)
    with tempfile.TemporaryDirectory() as tmp:
        exported = Path(tmp) / "model.onnx"
        with _quiet("torch.onnx", "onnxscript", "onnx_ir"):
            torch.onnx.export(model, (example,), exported, dynamo=True, dynamic_shapes=({0: "batch"},),
                              input_names=["images"], output_names=["logits"], external_data=False, verbose=False)
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = Path(tmp) / "model.int8.onnx"
            with _quiet("root"):  # it logs advice about calibration pre-processing we do not need
                # One scale per output channel rather than per matrix. README's int8 paragraph
                # gives the shipped model's top-1 agreement with fp32 and the command measuring it
                # (`python -m vitdemo evaluate ... --runtime int8`).
                quantize_dynamic(exported, quantized, weight_type=QuantType.QInt8, per_channel=True)
            exported = quantized
        proto = onnx.load(exported)
        onnx.helper.set_model_props(proto, {SOURCE_KEY: digest, PRECISION_KEY: "int8" if int8 else "fp32"})
        return atomic_write(path, lambda tmp_path: onnx.save(proto, tmp_path), overwrite=overwrite)


class _quiet:
    """Silence some loggers' INFO and WARNING lines for the duration of a block."""

    def __init__(self, *names: str) -> None:
        self.loggers = [logging.getLogger() if n == "root" else logging.getLogger(n) for n in names]

    def __enter__(self) -> None:
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)


class OnnxModel:
    """An ONNX file run by ONNX Runtime on the CPU, called like the model: images -> logits."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise RuntimeUnavailable(f"the onnx and int8 runtimes need onnxruntime ({err}); "
                                     "pip install \"vitdemo[onnx]\" (or pip install -e \".[onnx]\" in a clone)") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        # Idle threads sleep instead of spinning: on a few cores shared with PyTorch (the app's
        # other views, a training run) spinning threads steal the CPU from the work.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except (ort_errors.NoSuchFile, ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.Fail) as err:
            # What a missing, foreign or damaged file raises; its text names the full path, ours the file.
            raise ValueError(f"{self.path.name} is not an ONNX model that ONNX Runtime can load "
                             f"({type(err).__name__})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, images: Tensor) -> Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def load_onnx(path: str | Path, model: VisionTransformer | None = None, *, precision: str | None = None) -> OnnxModel:
    """Open an exported file; with `model`, refuse a file exported from other weights, and with
    `precision` ("fp32" or "int8"), a file of the other precision (`ValueError` for both)."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    runner = OnnxModel(path)
    if model is not None and runner.metadata.get(SOURCE_KEY) != weights_digest(model):
        raise ValueError(f"{Path(path).name} was not exported from these weights (export it again)")
    held = runner.metadata.get(PRECISION_KEY, "an unknown precision of")
    if precision is not None and held != precision:
        raise ValueError(f"{Path(path).name} holds {held} weights, not {precision}")
    return runner


# ---------------------------------------------------------------------------------------------
# One entry point
# ---------------------------------------------------------------------------------------------


def prepare(model: VisionTransformer, runtime: str = "eager", *, onnx_path: str | Path | None = None) -> Runtime:
    """`model` as a callable for `runtime` (one of `RUNTIMES`). For "onnx" and "int8": an
    existing `onnx_path` is used if it was exported from these weights at this precision and
    refused (`ValueError`) otherwise, never overwritten; a new `onnx_path` receives the export;
    without one the model is exported to a temporary file."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    if runtime == "eager":
        return model.eval()
    if runtime == "packed":
        return pack(model)
    int8 = runtime == "int8"
    precision = "int8" if int8 else "fp32"
    if onnx_path is None:
        with tempfile.TemporaryDirectory(prefix="vitdemo-onnx-") as tmp:  # the session keeps its own copy
            return OnnxModel(export_onnx(model, Path(tmp) / f"model.{runtime}.onnx", int8=int8))
    onnx_path = Path(onnx_path)
    if not onnx_path.exists():
        try:
            return OnnxModel(export_onnx(model, onnx_path, int8=int8, overwrite=False))
        except FileExistsError:
            pass  # created meanwhile by someone else: check it below like any existing file
    try:
        return load_onnx(onnx_path, model, precision=precision)
    except ValueError as err:
        # The user named this file: replacing it would destroy their export (an int8 file
        # silently turned fp32 under its old name). Say what to do instead.
        raise ValueError(f"{err}; it is left as it is. Give another file name to export to, or export this "
                         f"checkpoint at {precision} with `python -m vitdemo export --checkpoint CHECKPOINT "
                         f"--out NEW.onnx{' --int8' if int8 else ''}`") from None


__all__ = ["PRECISIONS", "PRECISION_KEY", "RUNTIMES", "SOURCE_KEY", "OnnxModel", "PackedLinear", "RuntimeUnavailable",
           "export_onnx", "load_onnx", "pack", "packing_available", "prepare", "weights_digest"]
