"""oneDNN's linear layers for CPU training (vitdemo.cpu_linear): the same products and gradients
as `nn.Linear`, the model unchanged outside the context, and the engine using them where they pay."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitdemo
from vitdemo.data import Preprocessing
from vitdemo import cpu_linear, engine
from vitdemo.cpu_linear import LinearKernels, OneDNNLinear
from vitdemo.data import ImageData

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_linear_pointwise"),
                                reason="this PyTorch build has no oneDNN linear product")


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return vitdemo.create_model("vit_cifar_4", num_classes=4, depth=2, embed_dim=32, num_heads=2, mlp_dim=64)


@pytest.mark.parametrize("case", ["2d", "3d", "class-token view", "no bias", "frozen input"])
def test_products_and_gradients_match_nn_linear(case):
    g = torch.Generator().manual_seed(0)
    plain = nn.Linear(48, 24, bias=case != "no bias")
    fast = OneDNNLinear(48, 24, bias=case != "no bias")
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(6, 5, 48, generator=g)
    x = {"2d": x[:, 0].contiguous(), "class-token view": x[:, 0]}.get(case, x)  # the head reads a strided view
    x.requires_grad_(case != "frozen input")
    ys = [layer(x) for layer in (plain, fast)]
    torch.testing.assert_close(ys[1], ys[0], rtol=1e-5, atol=1e-5)
    upstream = torch.randn(ys[0].shape, generator=g)
    inputs = [x] * x.requires_grad
    grads = [torch.autograd.grad(y, [*inputs, *layer.parameters()], upstream) for y, layer in zip(ys, (plain, fast))]
    assert len(grads[1]) == len(inputs) + (2 if case != "no bias" else 1)
    for mine, theirs in zip(grads[1], grads[0]):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-4)


def test_other_dtypes_and_autocast_take_pytorchs_own_path(monkeypatch):
    layer = OneDNNLinear(8, 4)
    monkeypatch.setattr(cpu_linear, "_product", lambda *a: pytest.fail("oneDNN used"))
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    half = layer.to(torch.float64)
    torch.testing.assert_close(half(x.double()), F.linear(x.double(), half.weight, half.bias))


def test_kernels_swap_plain_linears_inside_only_and_leave_the_weights_alone():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attention = nn.MultiheadAttention(8, 2)  # its out_proj is a subclass of nn.Linear: left as it is
    kernels = LinearKernels(model, None, attention)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(kernels.layers) == len(linears) == 2 * 4 + 1  # qkv, proj, fc1, fc2 per block; the head
    for _ in range(2):  # reusable
        with kernels:
            assert all(type(m) is OneDNNLinear for m in linears)
            assert type(attention.out_proj) is not OneDNNLinear
        assert all(type(m) is nn.Linear for m in linears)
    with pytest.raises(RuntimeError), kernels:
        raise RuntimeError("a failing step")
    assert all(type(m) is nn.Linear for m in linears)  # restored on an error too
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_training_steps_follow_the_same_path_as_pytorchs_kernels():
    """Five AdamW steps of a small ViT with and without oneDNN: the same losses, up to rounding."""
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 4
    losses = {}
    for fast in (False, True):
        model = tiny_vit().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        kernels = LinearKernels(model) if fast else None
        losses[fast] = []
        for _ in range(5):
            if kernels:
                with kernels:
                    loss = F.cross_entropy(model(x), y)
            else:
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[fast].append(loss.item())
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert losses[True][-1] < losses[True][0]


@pytest.mark.parametrize("pays", [True, False])
def test_engine_trains_with_onednn_where_it_pays_and_hands_back_a_plain_model(monkeypatch, pays):
    monkeypatch.setattr(engine.run, "onednn_pays", lambda: pays)  # where set_up reads it
    calls = []
    real = cpu_linear._product
    monkeypatch.setattr(cpu_linear, "_product", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    data = ImageData(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(64) % 4,
                     ["a", "b", "c", "d"])
    model = tiny_vit()
    recipe = engine.RECIPES["small-data"].replace(epochs=1, batch_size=32, ema_decay=0.9)
    # fp32: under bf16 autocast (the default on a CPU with AMX) the linear layers are PyTorch's own.
    events = list(engine.train(model, data, data, recipe, preprocess=Preprocessing(32, (0.5,) * 3, (0.5,) * 3),
                               device="cpu", precision="fp32"))
    assert isinstance(events[-1], engine.DoneEvent)
    assert bool(calls) == pays
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("cpuinfo, expected", [("vendor_id\t: AuthenticAMD\n", True),
                                                ("vendor_id\t: GenuineIntel\n", False), (None, False)])
def test_onednn_is_chosen_on_cpus_other_than_intels(monkeypatch, cpuinfo, expected):
    if not (torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available()):
        pytest.skip("this PyTorch build has no MKL: oneDNN is never chosen")

    def read_text(self, *args, **kwargs):
        if cpuinfo is None:
            raise OSError("no /proc here")
        return cpuinfo

    monkeypatch.setattr(Path, "read_text", read_text)
    assert cpu_linear.onednn_pays.__wrapped__() is expected
