"""oneDNN's fp32 matrix products for a model's linear layers while it trains on the CPU.

PyTorch's official wheels compute `nn.Linear` on the CPU with Intel's MKL, forward and both
gradients. On an AMD CPU, MKL does not pick its fastest kernels: on this project's 2-core AMD
EPYC, oneDNN (the library PyTorch ships for its CPU convolutions and uses for `vitdemo.runtime`'s
packed inference) ran more than twice as fast as MKL on a 2048 x 2048 product and on ViT-B/16's
batch-16 linear-layer shapes (`python benchmarks/bench.py inference --repeats 1`), and a whole
`vit_cifar_9` training step ran 1.44x faster with oneDNN's products (`python
benchmarks/engine_speed.py step --device cpu --preset vit_cifar_9 --steps 3 --repeats 3`). The
training engine therefore wraps its forward passes in `LinearKernels` where `onednn_pays()`;
elsewhere nothing changes.

The products are the same up to float rounding (a different summation order); the parameters,
their names and the state dict are untouched, so checkpoints do not know which kernel ran.

On a CPU with AMX matrix units (recent Xeons) the fastest products are bf16 ones: there
`bf16_pays()`, and the engine's default precision ("auto") trains under bf16 autocast, as it does
on a GPU.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .runtime import packing_available


@cache
def onednn_pays() -> bool:
    """Whether to train linear layers with oneDNN here: PyTorch's BLAS is MKL, oneDNN is built
    in, and the CPU is not Intel's (where MKL runs its own tuned kernels and stays)."""
    if not (torch.backends.mkl.is_available() and packing_available()):
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux: keep PyTorch's default
        return False
    return "vendor_id" in cpuinfo and "GenuineIntel" not in cpuinfo


@cache
def bf16_pays() -> bool:
    """Whether training on this CPU should compute its linear layers in bf16 (autocast): only where
    the CPU has AMX matrix units. On this project's 2-core Xeon with AMX, a whole `vit_cifar_9`
    training step ran 1.6x faster with bf16 linear layers than in fp32 (`python
    benchmarks/engine_speed.py step --device cpu --preset vit_cifar_9 --precision fp32 bf16`);
    without AMX a CPU emulates bf16 and is several times slower than in fp32."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(amx and amx())


def _product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight.T (+ bias) by oneDNN, for x of any leading shape."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinearFunction(torch.autograd.Function):
    """y = x W^T + b, with the gradients dL/dx = g W and dL/dW = g^T x also computed by oneDNN
    (dL/db = the sum of g over all rows)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _product(rows, weight.t().contiguous(), None).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = _product(rows.t(), x.reshape(-1, x.shape[-1]).t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0)
        return grad_x, grad_w, grad_b


class OneDNNLinear(nn.Linear):
    """`nn.Linear` computed by oneDNN for fp32 tensors on the CPU, and as usual otherwise (a GPU,
    another dtype, autocast). `LinearKernels` gives a model's layers this class for a while."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu")):
            return _OneDNNLinearFunction.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class LinearKernels:
    """A reusable context: inside it, every plain `nn.Linear` of `modules` computes with oneDNN
    (its class is `OneDNNLinear`); on leaving, they are plain again. Gradients of a forward pass
    taken inside are computed by oneDNN too, wherever `backward()` is called. Entering costs a
    class assignment per layer, so the engine enters it around every forward pass: the model
    outside it is the user's, unchanged."""

    def __init__(self, *modules: nn.Module | None) -> None:
        self.layers = [m for root in modules if root is not None for m in root.modules() if type(m) is nn.Linear]

    def __enter__(self) -> "LinearKernels":
        for layer in self.layers:
            layer.__class__ = OneDNNLinear
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers:
            layer.__class__ = nn.Linear
