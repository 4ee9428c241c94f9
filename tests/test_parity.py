"""vitdemo computes what timm, torchvision and Hugging Face compute, given the same weights.

Every peer is built locally with random weights (no downloads). The weights are perturbed
away from their initial values (LayerNorm scales not 1, biases not 0) so that a swapped or
dropped parameter cannot hide behind an identity initialisation.
"""

import pytest
import torch

import vitdemo

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

TOL = 1e-4


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def images(n: int = 2, size: int = 224) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def load_converted(peer_state: dict, source: str, preset: str, **overrides) -> vitdemo.VisionTransformer:
    model = vitdemo.create_model(preset, **overrides).eval()
    model.load_state_dict(vitdemo.convert_state_dict(peer_state, source), strict=True)
    return model


def test_timm_gradients():
    """Training computes timm's gradients too (our attention splits q, k, v in another order)."""
    peer = randomise(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                                       depth=2, num_classes=10))
    ours = load_converted(peer.state_dict(), "timm", "vit_ti_16", image_size=32, patch_size=4, depth=2,
                          num_classes=10)
    x, y = images(4, 32), torch.arange(4)
    for model in (peer, ours):
        torch.nn.functional.cross_entropy(model.train()(x), y).backward()
    theirs = dict(peer.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, theirs[name].grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "timm_name, preset",
    [("vit_base_patch16_224", "vit_b_16"), ("vit_small_patch16_224", "vit_s_16"), ("vit_tiny_patch16_224", "vit_ti_16")],
)
def test_timm_logits(timm_name, preset):
    peer = randomise(timm.create_model(timm_name, pretrained=False))
    ours = load_converted(peer.state_dict(), "timm", preset)
    x = images()
    with torch.no_grad():
        diff = (ours(x) - peer(x)).abs().max().item()
    assert diff <= TOL


def test_timm_attention_maps_match():
    peer = randomise(timm.create_model("vit_small_patch16_224", pretrained=False))
    for block in peer.blocks:
        block.attn.fused_attn = False  # timm's extractor needs the explicit softmax
    from timm.utils import AttentionExtract

    theirs = list(AttentionExtract(peer, method="fx")(images()).values())
    ours = load_converted(peer.state_dict(), "timm", "vit_s_16")
    with torch.no_grad():
        _, attentions = ours(images(), return_attention=True)
    assert len(attentions) == len(theirs) == 12
    for a, b in zip(attentions, theirs):
        assert a.shape == b.shape == (2, 6, 197, 197)
        assert (a - b).abs().max().item() <= 1e-5


def test_torchvision_logits():
    peer = randomise(torchvision.models.vit_b_16(weights=None))
    ours = load_converted(peer.state_dict(), "torchvision", "vit_b_16")
    x = images()
    with torch.no_grad():
        diff = (ours(x) - peer(x)).abs().max().item()
    assert diff <= TOL


def test_torchvision_old_mlp_names():
    """Older torchvision files call the MLP layers linear_1 / linear_2."""
    peer = randomise(torchvision.models.vit_b_32(weights=None))
    state = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v for k, v in peer.state_dict().items()}
    assert any("linear_1" in k for k in state)
    ours = load_converted(state, "torchvision", "vit_b_32")
    x = images(1)
    with torch.no_grad():
        assert (ours(x) - peer(x)).abs().max().item() <= TOL


def hf_model(**config):
    cfg = transformers.ViTConfig(layer_norm_eps=1e-6, num_labels=1000, **config)
    return randomise(transformers.ViTForImageClassification(cfg))


def to_hub_names(state: dict) -> dict:
    """transformers 5.x in-memory names -> the 4.x names found in hub files."""
    renames = [
        ("vit.layers.", "vit.encoder.layer."),
        (".attention.q_proj.", ".attention.attention.query."),
        (".attention.k_proj.", ".attention.attention.key."),
        (".attention.v_proj.", ".attention.attention.value."),
        (".attention.o_proj.", ".attention.output.dense."),
        (".mlp.fc1.", ".intermediate.dense."),
        (".mlp.fc2.", ".output.dense."),
    ]
    out = {}
    for key, value in state.items():
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    return out


@pytest.mark.parametrize("names", ["memory", "hub"])
def test_hf_logits(names):
    peer = hf_model()
    state = peer.state_dict()
    if names == "hub":
        state = to_hub_names(state)
        assert "vit.encoder.layer.0.attention.attention.query.weight" in state
    else:
        assert "vit.layers.0.attention.q_proj.weight" in state
    ours = load_converted(state, "hf", "vit_b_16")
    x = images()
    with torch.no_grad():
        diff = (ours(x) - peer(pixel_values=x).logits).abs().max().item()
    assert diff <= TOL


def test_hf_default_eps_is_why_eps_matters():
    """Hugging Face's default LayerNorm eps (1e-12) is not the reference's 1e-6; loading such a
    model needs norm_eps=1e-12 to match, which shows the override reaches every LayerNorm."""
    cfg = transformers.ViTConfig(num_labels=10, num_hidden_layers=2)
    assert cfg.layer_norm_eps == 1e-12
    peer = randomise(transformers.ViTForImageClassification(cfg))
    ours = load_converted(peer.state_dict(), "hf", "vit_b_16", num_classes=10, depth=2, norm_eps=1e-12)
    x = images(1)
    with torch.no_grad():
        assert (ours(x) - peer(pixel_values=x).logits).abs().max().item() <= TOL
