"""The model itself: shapes, presets, the paper's equations, errors, gradients, resampling."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitdemo
from vitdemo.config import PRESETS, ViTConfig
from vitdemo.model import Block, VisionTransformer, resample_pos_embed


def tiny(**overrides) -> VisionTransformer:
    """A small ViT that runs in milliseconds; 48 px, patch 16 -> 3x3 grid."""
    cfg = dict(image_size=48, patch_size=16, embed_dim=32, depth=2, num_heads=4, mlp_dim=64, num_classes=5)
    cfg.update(overrides)
    return VisionTransformer(ViTConfig(**cfg))


def test_vit_b_16_parameter_count_matches_timm_and_torchvision():
    model = vitdemo.create_model("vit_b_16", num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 86_567_656


def test_default_is_vit_base():
    model = vitdemo.create_model()
    c = model.config
    assert (c.embed_dim, c.depth, c.num_heads, c.mlp_dim, c.patch_size, c.image_size) == (768, 12, 12, 3072, 16, (224, 224))
    assert c.norm_eps == 1e-6
    assert isinstance(model.blocks[0].mlp.act, torch.nn.GELU) and model.blocks[0].mlp.act.approximate == "none"


@pytest.mark.parametrize(
    "name, dim, depth, heads, mlp, patch",
    [
        ("vit_ti_16", 192, 12, 3, 768, 16),
        ("vit_s_16", 384, 12, 6, 1536, 16),
        ("vit_b_16", 768, 12, 12, 3072, 16),
        ("vit_b_32", 768, 12, 12, 3072, 32),
        ("vit_l_16", 1024, 24, 16, 4096, 16),
        ("vit_l_32", 1024, 24, 16, 4096, 32),
        ("vit_h_14", 1280, 32, 16, 5120, 14),
    ],
)
def test_presets_follow_table_1(name, dim, depth, heads, mlp, patch):
    c = PRESETS[name]
    assert (c.embed_dim, c.depth, c.num_heads, c.mlp_dim, c.patch_size) == (dim, depth, heads, mlp, patch)


def test_small_image_preset_is_pinned():
    """`vit_cifar_4`, the shipped model's architecture: changing any of it breaks that checkpoint."""
    c = PRESETS["vit_cifar_4"]
    assert (c.image_size, c.patch_size, c.in_chans, c.num_classes) == ((32, 32), 4, 3, 10)
    assert (c.embed_dim, c.depth, c.num_heads, c.mlp_dim) == (192, 7, 6, 384)
    assert (c.qkv_bias, c.drop_rate, c.attn_drop_rate, c.drop_path_rate, c.norm_eps) == (True, 0.0, 0.0, 0.0, 1e-6)
    model = vitdemo.VisionTransformer(c)
    assert model.config.grid_size == (8, 8)
    assert model.pos_embed.shape == (1, 65, 192) and model.patch_embed.proj.weight.shape == (192, 3, 4, 4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # 192 * (3 * 16 + 1 + 1 + 65) + 7 * (4 * 192 + 192 * 576 + 576 + 192 * 192 + 192 + 2 * 192 * 384 + 384 + 192)
    # + 2 * 192 + 192 * 10 + 10: patch embedding, class token, position embeddings, 7 blocks, final norm, head.
    assert sum(p.numel() for p in model.parameters()) == 2_103_562


def test_lee_et_al_preset_and_each_preset_s_own_number_of_classes():
    c = PRESETS["vit_cifar_9"]
    assert (c.image_size, c.patch_size, c.embed_dim, c.depth, c.num_heads, c.mlp_dim) == ((32, 32), 4, 192, 9, 12, 384)
    model = vitdemo.create_model("vit_cifar_9")
    assert model.head.out_features == 10  # the preset's classes, not ImageNet's
    assert sum(p.numel() for p in model.parameters()) == 2_697_610  # 2,103,562 + 2 blocks of 297,024
    assert vitdemo.create_model("vit_cifar_4").head.out_features == 10
    assert vitdemo.create_model("vit_ti_16").head.out_features == 1000
    assert vitdemo.create_model("vit_cifar_4", num_classes=4).head.out_features == 4


def test_overrides_reach_the_model():
    model = vitdemo.create_model("vit_s_16", num_classes=7, depth=3, image_size=(64, 96), drop_path_rate=0.1)
    assert len(model.blocks) == 3
    assert model.pos_embed.shape == (1, 4 * 6 + 1, 384)
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, 7)
    assert model.blocks[-1].drop_path1.p == pytest.approx(0.1)
    assert model.blocks[0].drop_path1.p == 0.0


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(image_size=225), ["image_size", "225", "patch_size", "divisible"]),
        (dict(embed_dim=100, num_heads=12), ["embed_dim", "100", "num_heads", "12", "divisible"]),
        (dict(depth=0), ["depth", "positive"]),
        (dict(patch_size=-16), ["patch_size", "positive"]),
        (dict(num_heads=0), ["num_heads", "positive"]),
        (dict(mlp_dim=0), ["mlp_dim", "positive"]),
        (dict(embed_dim=2.5), ["embed_dim", "positive integer"]),
        (dict(num_classes=-1), ["num_classes"]),
        (dict(drop_rate=1.0), ["drop_rate", "[0, 1)"]),
        (dict(image_size=(224,)), ["image_size"]),
        (dict(width=3), ["unknown", "width"]),
    ],
)
def test_bad_hyper_parameters_name_the_value_and_rule(overrides, words):
    with pytest.raises(ValueError) as err:
        vitdemo.create_model("vit_b_16", **overrides)
    for word in words:
        assert word in str(err.value)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'vit_x_99'.*vit_b_16"):
        vitdemo.create_model("vit_x_99")


def test_wrong_input_size_explains_set_image_size():
    with pytest.raises(ValueError, match="set_image_size"):
        tiny()(torch.randn(1, 3, 64, 64))


def test_equations_1_to_4_by_hand():
    """Recompute the forward pass from the paper's equations with plain tensor operations."""
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randn(2, 3, 48, 48)
    P, D = 16, 32
    # Eq. 1: flatten each P x P patch (channel-major, as the conv kernel is laid out) and project by E.
    patches = x.unfold(2, P, P).unfold(3, P, P)  # (B, C, 3, 3, P, P)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 9, 3 * P * P)
    E = model.patch_embed.proj.weight.reshape(D, -1).T
    z = patches @ E + model.patch_embed.proj.bias
    z = torch.cat([model.cls_token.expand(2, -1, -1), z], 1) + model.pos_embed
    for blk in model.blocks:
        h = F.layer_norm(z, (D,), blk.norm1.weight, blk.norm1.bias, 1e-6)
        q, k, v = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).split(D, dim=-1)
        heads = lambda t: t.reshape(2, 10, 4, 8).transpose(1, 2)  # noqa: E731
        a = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(8), dim=-1)
        msa = (a @ heads(v)).transpose(1, 2).reshape(2, 10, D) @ blk.attn.proj.weight.T + blk.attn.proj.bias
        z_prime = msa + z  # Eq. 2
        h = F.layer_norm(z_prime, (D,), blk.norm2.weight, blk.norm2.bias, 1e-6)
        mlp = F.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
        z = mlp + z_prime  # Eq. 3
    y = F.layer_norm(z[:, 0], (D,), model.norm.weight, model.norm.bias, 1e-6)  # Eq. 4
    expected = y @ model.head.weight.T + model.head.bias
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_block_residuals_are_the_papers_not_the_walkthroughs():
    """Eq. 3 adds MLP(LN(y)) to y = x + MSA(LN(x)); the seed computed mlp(y + x) + y."""
    torch.manual_seed(0)
    blk = Block(16, 2, 32).eval()
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        out, _ = blk(x)
        y = x + blk.attn(blk.norm1(x))[0]
        assert torch.allclose(out, y + blk.mlp(blk.norm2(y)), atol=1e-6)
        assert not torch.allclose(out, blk.mlp(blk.norm2(y + x)) + y, atol=1e-3)


def test_attention_path_gives_same_logits_and_proper_maps():
    torch.manual_seed(0)
    model = vitdemo.create_model("vit_s_16", depth=4).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        fast = model(x)
        logits, attentions = model(x, return_attention=True)
    assert (fast - logits).abs().max().item() <= 1e-5
    assert len(attentions) == 4
    for a in attentions:
        assert a.shape == (2, 6, 197, 197)
        assert (a >= 0).all()
        assert torch.allclose(a.sum(-1), torch.ones(2, 6, 197), atol=1e-5)


def test_cpu_autocast_keeps_attention_in_fp32(monkeypatch):
    # Under CPU bf16 autocast the linear layers run in bf16 and attention in fp32 (PyTorch's CPU
    # attention is slow in bf16 for small heads): same logits as fp32 up to bf16 rounding.
    import vitdemo.model as model_module

    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", recording)
    torch.manual_seed(0)
    model = tiny().train()
    x = torch.randn(4, 3, 48, 48)
    reference = model(x)
    assert seen and all(s == (torch.float32,) * 3 + (False,) for s in seen)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(x)
    assert mixed.dtype == torch.bfloat16  # the head ran in bf16: autocast was on
    assert len(seen) == len(model.blocks) and all(s == (torch.float32,) * 3 + (False,) for s in seen)
    torch.testing.assert_close(mixed.float(), reference, atol=0.05, rtol=0.05)
    mixed.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = tiny(drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.1).train()
    loss = F.cross_entropy(model(torch.randn(4, 3, 48, 48)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_gradients_through_attention_path():
    model = tiny().train()
    logits, attentions = model(torch.randn(2, 3, 48, 48), return_attention=True)
    attentions[0][:, :, 0].max().backward(retain_graph=True)  # a value that depends on the queries and keys
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 1e-3  # the sum of softmax rows (1) has none


def test_determinism_under_a_seed():
    torch.manual_seed(123)
    a = tiny()
    torch.manual_seed(123)
    b = tiny()
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))
    torch.manual_seed(124)
    c = tiny()
    assert not torch.equal(a.pos_embed, c.pos_embed)


def test_init_is_small_not_standard_normal():
    """The seed drew class token and position embeddings from N(0, 1)."""
    torch.manual_seed(0)
    model = vitdemo.create_model("vit_b_16")
    assert model.pos_embed.std().item() == pytest.approx(0.0176, rel=0.1)
    assert model.pos_embed.abs().max().item() <= 0.04 + 1e-6  # truncated at 2 std
    assert model.cls_token.abs().max().item() < 1e-4
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.0176, rel=0.1)
    assert torch.all(model.blocks[0].mlp.fc1.bias == 0)


def test_dropout_off_at_inference_and_on_in_training():
    torch.manual_seed(0)
    model = tiny(drop_rate=0.5, attn_drop_rate=0.5, drop_path_rate=0.5)
    x = torch.randn(2, 3, 48, 48)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_resampled_position_embeddings_at_384px():
    torch.manual_seed(0)
    model = vitdemo.create_model("vit_b_16").eval()
    cls_before = model.pos_embed[:, :1].clone()
    model.set_image_size(384)
    assert model.config.image_size == (384, 384) and model.config.grid_size == (24, 24)
    assert model.pos_embed.shape == (1, 24 * 24 + 1, 768)
    assert torch.equal(model.pos_embed[:, :1], cls_before)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 384, 384)).shape == (1, 1000)


def test_resample_reproduces_smooth_embeddings():
    """A position embedding that is a linear ramp over the grid stays (nearly) a ramp; a
    constant one stays exactly constant; resampling to the same grid is the identity."""
    old = torch.zeros(1, 1 + 14 * 14, 2)
    rows, cols = torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij")
    old[0, 1:, 0] = 5.0
    old[0, 1:, 1] = (rows + cols).flatten()
    new = resample_pos_embed(old, (24, 24))
    assert new.shape == (1, 1 + 576, 2)
    assert torch.allclose(new[0, 1:, 0], torch.full((576,), 5.0), atol=1e-5)
    ramp = new[0, 1:, 1].reshape(24, 24)
    assert ramp[0, 0] < ramp[12, 12] < ramp[23, 23]
    assert torch.equal(resample_pos_embed(old, (14, 14)), old)


def test_resample_matches_timm_upsampling():
    timm = pytest.importorskip("timm")
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, 197, 16)
    ours = resample_pos_embed(pos, (24, 24))
    theirs = resample_abs_pos_embed(pos, new_size=(24, 24), num_prefix_tokens=1, interpolation="bicubic", antialias=True)
    assert torch.allclose(ours, theirs, atol=1e-5)
    del timm


def resampled_by_pil(pos, old_grid, new_grid):
    """Position embeddings (1, 1 + h*w, D) resampled independently of torch: each channel's grid
    (tokens in reading order, row by row) resized as a float image by Pillow's bicubic filter,
    which is what torch's bicubic with antialias=True reproduces; the class token kept."""
    from PIL import Image

    (h, w), (nh, nw), dim = old_grid, new_grid, pos.shape[-1]
    grid = pos[0, 1:].reshape(h, w, dim).double().numpy()
    channels = [np.asarray(Image.fromarray(grid[:, :, d].astype(np.float32), mode="F")
                           .resize((nw, nh), Image.Resampling.BICUBIC)) for d in range(dim)]  # PIL: (width, height)
    patches = torch.from_numpy(np.stack(channels, -1).reshape(1, nh * nw, dim))
    return torch.cat([pos[:, :1], patches.to(pos.dtype)], dim=1)


@pytest.mark.parametrize("old_grid", [(14, 14), (6, 10), (10, 6)])
def test_resample_to_a_non_square_grid_matches_an_independent_resampling(old_grid):
    """14x14 (and non-square grids) -> 12x20: fewer rows, more columns. Each token lands where
    Pillow's resize of the grid puts it, and the class token is kept as it was."""
    pos = torch.randn(1, 1 + old_grid[0] * old_grid[1], 6, generator=torch.Generator().manual_seed(0))
    new = resample_pos_embed(pos, (12, 20), None if old_grid == (14, 14) else old_grid)
    assert new.shape == (1, 1 + 12 * 20, 6)
    assert torch.equal(new[:, 0], pos[:, 0])
    torch.testing.assert_close(new, resampled_by_pil(pos, old_grid, (12, 20)), atol=2e-5, rtol=0)
    # By hand in torch too: the grid interpolated as one (D, h, w) image.
    grid = pos[0, 1:].reshape(*old_grid, 6).permute(2, 0, 1)[None]
    by_hand = F.interpolate(grid, size=(12, 20), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(new[0, 1:], by_hand[0].permute(1, 2, 0).reshape(240, 6), atol=1e-6, rtol=0)


def test_resampled_rows_and_columns_keep_their_direction():
    """A row ramp stays a function of the row alone and a column ramp of the column alone, both
    increasing: a grid resampled transposed (12x20 taken as 20x12) cannot pass."""
    rows, cols = torch.meshgrid(torch.arange(6.0), torch.arange(10.0), indexing="ij")
    pos = torch.zeros(1, 1 + 60, 2)
    pos[0, 1:, 0], pos[0, 1:, 1] = rows.flatten(), cols.flatten()
    new = resample_pos_embed(pos, (12, 20), (6, 10))[0, 1:].reshape(12, 20, 2)
    row_ramp, col_ramp = new[..., 0], new[..., 1]
    assert torch.allclose(row_ramp, row_ramp[:, :1].expand(12, 20), atol=1e-5)  # constant along a row
    assert torch.allclose(col_ramp, col_ramp[:1].expand(12, 20), atol=1e-5)  # constant down a column
    assert (row_ramp[1:, 0] >= row_ramp[:-1, 0]).all() and row_ramp[-1, 0] - row_ramp[0, 0] > 4
    assert (col_ramp[0, 1:] >= col_ramp[0, :-1]).all() and col_ramp[0, -1] - col_ramp[0, 0] > 8


def test_a_model_set_to_a_non_square_image_size_resamples_its_grid():
    """32 px (8x8 patches of 4) -> 48x80 px (12x20): the position embeddings are the 8x8 grid
    resampled, the model reads 48x80 images, and a timm-style checkpoint loads into a non-square model."""
    torch.manual_seed(0)
    model = vitdemo.create_model("vit_cifar_4", num_classes=3, depth=1, embed_dim=16, num_heads=2, mlp_dim=32).eval()
    before = model.pos_embed.detach().clone()
    model.set_image_size((48, 80))
    assert model.config.image_size == (48, 80) and model.config.grid_size == (12, 20)
    torch.testing.assert_close(model.pos_embed.detach(), resampled_by_pil(before, (8, 8), (12, 20)), atol=2e-5, rtol=0)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 80)).shape == (2, 3)
    with pytest.raises(ValueError, match="set_image_size"):
        model(torch.randn(1, 3, 80, 48))  # the grid is 12 rows of 20, not 20 of 12

    source = vitdemo.create_model("vit_ti_16", depth=1)  # 224 px: 14x14
    target = vitdemo.create_model("vit_ti_16", depth=1, image_size=(192, 320), num_classes=2)  # 12x20
    notes = vitdemo.load_weights(target, source.state_dict())
    assert any("resampled from 14x14 to 12x20" in n for n in notes)
    expected = resampled_by_pil(source.pos_embed.detach(), (14, 14), (12, 20))
    torch.testing.assert_close(target.pos_embed.detach(), expected, atol=2e-5, rtol=0)


def test_reset_classifier_for_fine_tuning():
    model = tiny()
    model.reset_classifier(3)
    assert model.config.num_classes == 3
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 32)  # features, no head


def test_config_round_trip():
    cfg = vitdemo.get_config("vit_cifar_4", depth=4)
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        ViTConfig.from_dict({**cfg.to_dict(), "colour": 3})


def test_qkv_without_bias():
    model = tiny(qkv_bias=False)
    assert model.blocks[0].attn.qkv.bias is None
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 5)
