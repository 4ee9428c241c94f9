"""Class-specific relevance (Chefer, Gur and Wolf, ICCV 2021) against the rule written out by hand,
and the class choice shared with gradient rollout."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitdemo
from vitdemo import explanations as E

GRID = (2, 3)  # a non-square grid: 8 x 12 px images, 4 px patches


def tiny_model(seed=0):
    """Two classes, a 2 x 3 grid; weights drawn wider than the initialisation so that attention
    is far from uniform and the maps differ between rules."""
    torch.manual_seed(seed)
    model = vitdemo.create_model("vit_cifar_4", image_size=(8, 12), num_classes=2, depth=3, embed_dim=16,
                                 num_heads=2, mlp_dim=32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4)
    return model


def forward_by_hand(model, x):
    """The forward pass of one image written out in float64 (Eqs. 1-4); returns the logits and
    each layer's attention probabilities (heads, T, T), part of the autograd graph."""
    P, D, H = 4, model.config.embed_dim, model.config.num_heads
    w = {name: p.detach().double() for name, p in model.named_parameters()}
    x = x.double().requires_grad_(True)  # the weights are plain tensors: the graph runs through x
    patches = x.unfold(2, P, P).unfold(3, P, P).permute(0, 2, 3, 1, 4, 5).reshape(1, -1, 3 * P * P)
    z = patches @ w["patch_embed.proj.weight"].reshape(D, -1).T + w["patch_embed.proj.bias"]
    z = torch.cat([w["cls_token"], z], 1) + w["pos_embed"]
    T = z.shape[1]
    attentions = []
    for i in range(model.config.depth):
        b = lambda name: w[f"blocks.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(z, (D,), b("norm1.weight"), b("norm1.bias"), 1e-6)
        q, k, v = (h @ b("attn.qkv.weight").T + b("attn.qkv.bias")).split(D, dim=-1)
        heads = lambda t: t.reshape(T, H, D // H).transpose(0, 1)  # noqa: E731
        a = torch.softmax(heads(q[0]) @ heads(k[0]).transpose(-1, -2) / math.sqrt(D // H), dim=-1)
        attentions.append(a)
        msa = (a @ heads(v[0])).transpose(0, 1).reshape(1, T, D) @ b("attn.proj.weight").T + b("attn.proj.bias")
        z = z + msa
        h = F.layer_norm(z, (D,), b("norm2.weight"), b("norm2.bias"), 1e-6)
        z = z + F.gelu(h @ b("mlp.fc1.weight").T + b("mlp.fc1.bias")) @ b("mlp.fc2.weight").T + b("mlp.fc2.bias")
    y = F.layer_norm(z[:, 0], (D,), w["norm.weight"], w["norm.bias"], 1e-6)
    return y @ w["head.weight"].T + w["head.bias"], attentions


def relevance_by_hand(model, x, c, clamp_after_mean=False, use_softmax=False, normalise_rows=False):
    """The rule for one image and class c, in numpy: R = I; per layer Abar = mean_h (G * A)^+,
    R = R + Abar R; the class token's row without itself, min-max scaled. The keyword arguments
    give the plausible wrong variants, to show the test tells them apart."""
    logits, attentions = forward_by_hand(model, x)
    score = logits.softmax(-1)[0, c] if use_softmax else logits[0, c]
    grads = torch.autograd.grad(score, attentions)
    T = attentions[0].shape[-1]
    R = np.eye(T)
    for a, g in zip(attentions, grads):
        weighted = g.numpy() * a.detach().numpy()
        abar = np.maximum(weighted.mean(0), 0) if clamp_after_mean else np.maximum(weighted, 0).mean(0)
        R = R + abar @ R
        if normalise_rows:
            R = R / R.sum(1, keepdims=True)
    m = R[0, 1:].reshape(GRID)
    return (m - m.min()) / (m.max() - m.min())


def test_relevance_matches_the_rule_written_out_for_two_classes_and_two_images():
    model = tiny_model()
    x = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(1))
    for c in (0, 1):
        ours = E.relevance(model, x, class_index=c)
        assert ours.shape == (2, *GRID)
        for i in range(2):
            expected = relevance_by_hand(model, x[i:i + 1], c)
            np.testing.assert_allclose(ours[i].numpy(), expected, atol=1e-5)
            # The test can tell the rule from its plausible wrong variants.
            for wrong in (dict(clamp_after_mean=True), dict(use_softmax=True), dict(normalise_rows=True)):
                assert np.abs(relevance_by_hand(model, x[i:i + 1], c, **wrong) - expected).max() > 1e-3, wrong


def test_relevance_depends_on_the_class_and_takes_one_class_per_image():
    model = tiny_model()
    x = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(2))
    for_0, for_1 = E.relevance(model, x, 0), E.relevance(model, x, 1)
    assert (for_0 - for_1).abs().amax(dim=(1, 2)).min() > 1e-2  # "why class 0?" is not "why class 1?"
    mixed = E.relevance(model, x, class_index=torch.tensor([1, 0]))
    assert torch.allclose(mixed[0], for_1[0], atol=1e-6) and torch.allclose(mixed[1], for_0[1], atol=1e-6)
    predicted = model(x).argmax(-1)
    assert torch.allclose(E.relevance(model, x), E.relevance(model, x, predicted), atol=1e-6)
    assert E.relevance(model, x).amin() == 0 and E.relevance(model, x).amax() == 1


@pytest.mark.parametrize("explain", [E.relevance, E.gradient_rollout])
def test_explaining_writes_no_gradient_into_the_weights(explain):
    model = tiny_model()
    x = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(3))
    expected = explain(model, x, class_index=1)
    assert all(p.grad is None for p in model.parameters())
    model.requires_grad_(False)  # a read-only model shared by a server
    assert torch.allclose(explain(model, x, class_index=1), expected, atol=1e-6)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    model.train()
    explain(model, x)
    assert model.training  # the mode is given back


@pytest.mark.parametrize("explain", [E.relevance, E.gradient_rollout])
def test_bad_class_index_is_named(explain):
    model = tiny_model()
    x = torch.randn(2, 3, 8, 12)
    with pytest.raises(ValueError, match=r"class_index must be in \[0, 2\)"):
        explain(model, x, class_index=2)
    with pytest.raises(ValueError, match="one per image"):
        explain(model, x, class_index=[0, 1, 0])


def test_gradient_rollout_follows_the_chosen_class_per_image():
    model = tiny_model()
    x = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(4))
    for_0, for_1 = E.gradient_rollout(model, x, 0), E.gradient_rollout(model, x, 1)
    assert not torch.allclose(for_0, for_1, atol=1e-3)
    mixed = E.gradient_rollout(model, x, class_index=torch.tensor([0, 1]))
    assert torch.allclose(mixed, torch.stack([for_0[0], for_1[1]]), atol=1e-6)
