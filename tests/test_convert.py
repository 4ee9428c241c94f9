"""convert_state_dict: errors name the keys; the timm mapping is an exact key check."""

import pytest
import torch

import vitdemo
from vitdemo.convert import convert_state_dict


def small_state() -> dict:
    return vitdemo.create_model("vit_ti_16", depth=2).state_dict()


def test_timm_names_are_ours():
    state = small_state()
    converted = convert_state_dict(state, "timm")
    assert converted.keys() == state.keys()
    assert all(converted[k] is state[k] for k in state)


def test_module_prefix_from_ddp_is_removed():
    state = {"module." + k: v for k, v in small_state().items()}
    assert set(convert_state_dict(state, "timm")) == set(small_state())


def test_unexpected_keys_are_named():
    state = small_state()
    state["blocks.0.ls1.gamma"] = torch.ones(192)
    state["fc_norm.weight"] = torch.ones(192)
    with pytest.raises(ValueError, match=r"unexpected keys.*blocks\.0\.ls1\.gamma.*fc_norm\.weight"):
        convert_state_dict(state, "timm")


def test_missing_keys_are_named():
    state = small_state()
    del state["blocks.1.mlp.fc2.bias"]
    del state["pos_embed"]
    with pytest.raises(ValueError, match=r"missing keys.*pos_embed.*blocks\.1\.mlp\.fc2\.bias"):
        convert_state_dict(state, "timm")


def test_half_a_head_is_missing():
    state = small_state()
    del state["head.bias"]
    with pytest.raises(ValueError, match="head.bias"):
        convert_state_dict(state, "timm")


def test_backbone_without_head_converts():
    state = {k: v for k, v in small_state().items() if not k.startswith("head.")}
    converted = convert_state_dict(state, "timm")
    model = vitdemo.create_model("vit_ti_16", depth=2, num_classes=0)
    model.load_state_dict(converted, strict=True)


def test_hf_missing_value_projection_is_named():
    from_hf = {
        "vit.layers.0.attention.q_proj.weight": torch.zeros(4, 4),
        "vit.layers.0.attention.k_proj.weight": torch.zeros(4, 4),
    }
    with pytest.raises(ValueError, match=r"missing keys.*layer 0.*value"):
        convert_state_dict(from_hf, "hf")


def test_empty_state_dict():
    with pytest.raises(ValueError, match="missing keys"):
        convert_state_dict({}, "torchvision")


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown source 'jax'.*timm"):
        convert_state_dict({}, "jax")


def test_torchvision_names_map_to_ours():
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.models.vit_b_32(weights=None).state_dict()
    converted = convert_state_dict(tv, "torchvision")
    assert set(converted) == set(vitdemo.create_model("vit_b_32").state_dict())
    assert torch.equal(converted["blocks.3.attn.qkv.weight"], tv["encoder.layers.encoder_layer_3.self_attention.in_proj_weight"])


def test_load_weights_resamples_position_embeddings_and_skips_a_foreign_head():
    torch.manual_seed(0)
    source = vitdemo.create_model("vit_ti_16", depth=2)  # 224 px, 1000 classes
    target = vitdemo.create_model("vit_ti_16", depth=2, image_size=384, num_classes=10)
    fresh_head = target.head.weight.clone()
    notes = vitdemo.load_weights(target, source.state_dict())
    assert any("resampled from 14x14 to 24x24" in n for n in notes)
    assert any("head skipped" in n for n in notes)
    assert torch.equal(target.head.weight, fresh_head)
    assert torch.equal(target.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert torch.equal(target.pos_embed[:, 0], source.pos_embed[:, 0])
    assert target(torch.randn(1, 3, 384, 384)).shape == (1, 10)


def test_load_weights_refuses_another_architecture():
    source = vitdemo.create_model("vit_ti_16", depth=2)
    target = vitdemo.create_model("vit_ti_16", depth=3)
    with pytest.raises(ValueError, match="missing.*blocks.2"):
        vitdemo.load_weights(target, source.state_dict())
