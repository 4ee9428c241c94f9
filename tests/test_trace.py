"""vitdemo.trace (vitdemo/tracing.py): every recorded tensor checked against an independent computation from the
model's parameters (or its own modules), at a square and a non-square image size."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import small_model

import vitdemo

SIZES = [(32, 32), (32, 48)]  # 8x8 and 8x12 patches: a non-square grid catches rows and columns swapped
B, P, D, HEADS, L = 2, 4, 64, 4, 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()  # tiny models: one thread is faster on a busy machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(image_size, **overrides):
    """A 3-layer model whose every parameter is random: the initialisation's zero biases, unit
    LayerNorms and near-zero class token would hide a bias or a token put in the wrong place."""
    model = small_model(seed=0, depth=L, image_size=image_size, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def images(image_size, seed=1):
    return torch.randn(B, 3, *image_size, generator=torch.Generator().manual_seed(seed))


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("size", SIZES)
def test_tokens_are_equation_1_from_the_pixels_and_the_parameters(size):
    model, x = random_model(size), images(size)
    t = vitdemo.trace(model, x)
    rows, cols = size[0] // P, size[1] // P
    assert t.grid_size == (rows, cols)
    assert t.patches.shape == (B, rows * cols, 3 * P * P)
    # Patch n = r * cols + c is the pixels of row r, column c, channel-major then row then column.
    for r, c in [(0, 0), (0, cols - 1), (rows - 1, 0), (rows - 1, cols - 1), (1, 2)]:
        assert torch.equal(t.patches[:, r * cols + c], x[:, :, r * P:(r + 1) * P, c * P:(c + 1) * P].reshape(B, -1))
    unfolded = F.unfold(x, kernel_size=P, stride=P).transpose(1, 2)
    assert torch.equal(t.patches, unfolded)
    proj = model.patch_embed.proj
    embedded = unfolded @ proj.weight.reshape(D, -1).T + proj.bias  # x_p E
    close(t.embedded, embedded)
    z0 = torch.cat([model.cls_token.expand(B, -1, -1), embedded], dim=1) + model.pos_embed
    close(t.tokens, z0)
    assert t.tokens.shape == (B, rows * cols + 1, D)
    assert t.hidden[0] is t.tokens


@pytest.mark.parametrize("size", SIZES)
def test_each_hidden_state_is_the_model_s_block_applied_to_the_one_before(size):
    model = random_model(size)
    t = vitdemo.trace(model, images(size))
    assert len(t.hidden) == L + 1
    with torch.no_grad():
        for layer, block in enumerate(model.blocks):
            close(t.hidden[layer + 1], block(t.hidden[layer])[0])
        close(model.norm(t.hidden[-1]), model.forward_features(images(size))[0])


@pytest.mark.parametrize("size", SIZES)
def test_attention_and_logits_are_the_model_s(size):
    model, x = random_model(size), images(size)
    t = vitdemo.trace(model, x)
    with torch.no_grad():
        fast = model(x)
        logits, attention = model(x, return_attention=True)
    assert t.logits.shape == (B, 4)
    close(t.logits, fast)
    assert len(t.attention) == L
    n = size[0] * size[1] // P**2 + 1
    for ours, theirs in zip(t.attention, attention):
        assert ours.shape == (B, HEADS, n, n)
        close(ours, theirs)


@pytest.mark.parametrize("size", SIZES)
def test_layer_logits_are_the_head_read_at_every_layer(size):
    model = random_model(size)
    t = vitdemo.trace(model, images(size))
    assert t.layer_logits.shape == (B, L, 4)
    close(t.layer_logits[:, -1], t.logits, tol=1e-6)
    with torch.no_grad():
        for layer in range(L):
            close(t.layer_logits[:, layer], model.head(model.norm(t.hidden[layer + 1][:, 0])), tol=1e-6)
    assert not torch.allclose(t.layer_logits[:, 0], t.layer_logits[:, -1], atol=1e-2)  # the layers differ


@pytest.mark.parametrize("size", SIZES)
def test_block_internals_by_hand_from_the_weights(size):
    model = random_model(size)
    t = vitdemo.trace(model, images(size), internals=True)
    assert sorted(t.blocks) == list(range(L))
    hd = D // HEADS
    heads = lambda z: z.reshape(B, -1, HEADS, hd).transpose(1, 2)  # noqa: E731  (B, N+1, D) -> (B, heads, N+1, hd)
    with torch.no_grad():
        for layer, block in enumerate(model.blocks):
            bt, z = t.blocks[layer], t.hidden[layer]
            ln1 = F.layer_norm(z, (D,), block.norm1.weight, block.norm1.bias, 1e-6)
            close(bt.ln1, ln1)
            w, b = block.attn.qkv.weight, block.attn.qkv.bias
            for i, name in enumerate("qkv"):  # rows q; k; v of the fused layer
                rows = slice(i * D, (i + 1) * D)
                close(getattr(bt, name), heads(F.linear(ln1, w[rows], b[rows])))
            close(bt.scores, bt.q @ bt.k.transpose(-2, -1) / math.sqrt(hd))
            close(bt.scores.softmax(-1), t.attention[layer])
            mixed = (t.attention[layer] @ bt.v).transpose(1, 2).reshape(B, -1, D)  # heads concatenated
            close(bt.mixed, mixed)
            close(bt.attn_out, F.linear(mixed, block.attn.proj.weight, block.attn.proj.bias))
            close(bt.mid, z + bt.attn_out)  # Eq. 2
            ln2 = F.layer_norm(bt.mid, (D,), block.norm2.weight, block.norm2.bias, 1e-6)
            close(bt.ln2, ln2)
            hidden = F.gelu(F.linear(ln2, block.mlp.fc1.weight, block.mlp.fc1.bias))
            assert bt.mlp_hidden.shape == (B, z.shape[1], 128)
            close(bt.mlp_hidden, hidden)
            close(bt.mlp_out, F.linear(hidden, block.mlp.fc2.weight, block.mlp.fc2.bias))
            close(t.hidden[layer + 1], bt.mid + bt.mlp_out)  # Eq. 3


def test_internals_are_off_by_default_and_only_the_asked_layers_are_kept():
    model, x = random_model(SIZES[0]), images(SIZES[0])
    assert vitdemo.trace(model, x).blocks == {}
    assert vitdemo.trace(model, x, internals=False).blocks == {}
    assert list(vitdemo.trace(model, x, internals=[1]).blocks) == [1]
    assert list(vitdemo.trace(model, x, internals=(-1, 0, 0)).blocks) == [0, L - 1]
    assert list(vitdemo.trace(model, x, internals=[]).blocks) == []
    for bad in ([L], [-L - 1], [True], ["0"]):
        with pytest.raises(ValueError, match="internals"):
            vitdemo.trace(model, x, internals=bad)
    # The hooks are gone: a later forward records nothing, and a second trace is the same.
    before = vitdemo.trace(model, x, internals=[1])
    assert all(not m._forward_hooks for m in model.modules())
    again = vitdemo.trace(model, x, internals=[1])
    assert len(again.hidden) == L + 1 and torch.equal(again.blocks[1].mid, before.blocks[1].mid)


def test_traces_in_eval_mode_and_restores_every_module_s_training_flag():
    size = SIZES[1]
    model, x = random_model(size, drop_rate=0.5, attn_drop_rate=0.5), images(size)
    with torch.no_grad():
        expected = model(x)  # eval: no dropout
    model.train()
    model.blocks[1].eval()  # a mixed state, which model.train(flag) alone would not restore
    flags = [m.training for m in model.modules()]
    t = vitdemo.trace(model, x, internals=True)
    assert [m.training for m in model.modules()] == flags
    close(t.logits, expected)
    assert not t.logits.requires_grad and not t.blocks[0].q.requires_grad
    with torch.no_grad():  # also under the caller's no_grad
        close(vitdemo.trace(model, x).logits, expected)
    assert [m.training for m in model.modules()] == flags
    with pytest.raises(ValueError, match="set_image_size"):  # the model's own check, flags restored after it
        vitdemo.trace(model, images(SIZES[0]))
    assert [m.training for m in model.modules()] == flags
    assert all(not m._forward_hooks for m in model.modules())


def test_exports():
    assert vitdemo.trace is sys.modules["vitdemo.tracing"].trace
    assert {"trace", "Trace", "BlockTrace"} <= set(vitdemo.__all__)
    with pytest.raises(AttributeError):  # frozen
        vitdemo.trace(random_model(SIZES[0]), images(SIZES[0])).logits = None


def test_forward_passes_of_other_threads_on_the_same_model_are_not_recorded():
    """A server shares one model between users and tabs: while one thread traces it, others run
    it on other images. Their passes fire the trace's hooks too, and were recorded as more layers
    (the Inside tab once drew 14 layers of a 7-layer model) with other images' internals."""
    from helpers import others_running

    model, x = random_model((32, 32)), images((32, 32))
    alone = vitdemo.trace(model, x, internals=True)
    with others_running(model, images((32, 32), seed=2)):
        traced = [vitdemo.trace(model, x, internals=True) for _ in range(20)]
    for t in traced:
        assert len(t.hidden) == L + 1
        for got, want in zip(t.hidden, alone.hidden):
            close(got, want)
        close(t.blocks[1].q, alone.blocks[1].q)
        close(t.blocks[1].mlp_out, alone.blocks[1].mlp_out)
