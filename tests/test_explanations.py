"""The explanations pin the mathematics of the paper's figures, not just shapes: rollout against
the textbook algorithm, attention distance and the Fig. 7 analyses by hand, and the one min-max
scaling every map and colour scale goes through. (Relevance has its own file, test_relevance.py.)"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitdemo
from vitdemo import explanations as E
from vitdemo import visualize as V


# ---------------------------------------------------------------------------------------------
# min_max
# ---------------------------------------------------------------------------------------------


def test_min_max_scales_each_map_over_the_given_dims_only():
    """Two 2 x 2 maps scaled one by one over dims (1, 2): each its own 0 and 1, whatever the
    other holds. Over all dims the second map's low values would not reach 0."""
    maps = torch.tensor([[[0.0, 1.0], [2.0, 4.0]],
                         [[10.0, 12.0], [14.0, 18.0]]], dtype=torch.float64)
    expected = torch.tensor([[[0.0, 0.25], [0.5, 1.0]],
                             [[0.0, 0.25], [0.5, 1.0]]], dtype=torch.float64)
    scaled = E.min_max(maps, dims=(1, 2))
    assert scaled.dtype == torch.float64
    torch.testing.assert_close(scaled, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(E.min_max(maps), maps / 18, rtol=0, atol=1e-12)  # one range for all


def test_min_max_of_a_constant_map_is_zeros_not_nan():
    maps = torch.stack([torch.full((3, 3), 0.7), torch.arange(9.0).reshape(3, 3)])
    scaled = E.min_max(maps, dims=(1, 2))
    assert torch.equal(scaled[0], torch.zeros(3, 3))
    torch.testing.assert_close(scaled[1], torch.arange(9.0).reshape(3, 3) / 8)
    assert np.array_equal(E.min_max(np.full((2, 5), -3.0, dtype=np.float32)), np.zeros((2, 5), np.float32))


def test_min_max_with_a_fixed_range_clips_and_keeps_numpy_and_nan():
    """`lo`/`hi` as the colour scales use them: -1..1 maps 0 to 0.5; values outside are clipped;
    the NaN of a padded cell stays NaN (drawn white later); a float32 array stays float32."""
    values = np.array([-2.0, -1.0, 0.0, 0.5, 3.0, np.nan], dtype=np.float32)
    scaled = E.min_max(values, lo=-1, hi=1)
    assert isinstance(scaled, np.ndarray) and scaled.dtype == np.float32
    np.testing.assert_array_equal(scaled, np.array([0.0, 0.0, 0.5, 0.75, 1.0, np.nan], dtype=np.float32))
    only_lo = E.min_max(torch.tensor([1.0, 2.0, 5.0]), lo=0.0)  # hi: the maximum, 5
    torch.testing.assert_close(only_lo, torch.tensor([0.2, 0.4, 1.0]))


# ---------------------------------------------------------------------------------------------
# Rollout, gradient rollout, one token's attention, attention distance, Fig. 7
# ---------------------------------------------------------------------------------------------


def random_attention(layers=3, batch=2, heads=4, grid=(2, 3), seed=0):
    gen = torch.Generator().manual_seed(seed)
    T = grid[0] * grid[1] + 1
    return [torch.randn(batch, heads, T, T, generator=gen).softmax(-1) for _ in range(layers)]


def rollout_by_hand(attentions, fusion, grid):
    """The textbook algorithm, one image at a time, in numpy float64."""
    maps = []
    for b in range(attentions[0].shape[0]):
        result = None
        for attn in attentions:
            a = getattr(attn[b].double().numpy(), fusion)(axis=0)
            a = a + np.eye(a.shape[0])
            a = a / a.sum(axis=1)[:, None]
            result = a if result is None else a @ result
        m = result[0, 1:].reshape(grid)
        maps.append((m - m.min()) / (m.max() - m.min()))
    return np.stack(maps)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_rollout_matches_hand_computation_on_non_square_grid(fusion):
    att = random_attention(grid=(2, 3))
    ours = E.attention_rollout(att, head_fusion=fusion, grid_size=(2, 3))
    assert ours.shape == (2, 2, 3)
    np.testing.assert_allclose(ours.numpy(), rollout_by_hand(att, fusion, (2, 3)), atol=1e-5)


def test_rollout_is_per_image_also_with_discard():
    """vit-explain discarded entries of the first image only; a batch must equal each image alone."""
    att = random_attention(batch=2, grid=(3, 3), seed=1)
    both = E.attention_rollout(att, discard_ratio=0.5)
    for b in range(2):
        alone = E.attention_rollout([a[b:b + 1] for a in att], discard_ratio=0.5)
        assert torch.allclose(both[b], alone[0], atol=1e-6)


def test_rollout_of_identity_attention_has_nothing_to_show():
    T = 10
    att = [torch.eye(T).expand(1, 2, T, T) for _ in range(4)]
    assert torch.equal(E.attention_rollout(att), torch.zeros(1, 3, 3))


def test_rollout_follows_the_class_token_to_one_patch():
    """Every layer: the class token attends only to patch 4, every patch only to itself."""
    T = 10
    a = torch.eye(T)
    a[0] = 0
    a[0, 5] = 1.0  # token 5 = patch index 4 = grid position (1, 1)
    m = E.attention_rollout([a.expand(1, 3, T, T)] * 3)[0]
    assert m[1, 1] == 1.0 and m.sum() == 1.0


def test_rollout_of_uniform_attention_by_hand():
    """Uniform attention: per layer (U + I)/2; for the class token row over patches the value
    is the same for every patch, so after scaling the map is constant (0)."""
    T = 5
    u = torch.full((1, 1, T, T), 1 / T)
    m = E.attention_rollout([u, u])
    assert torch.equal(m, torch.zeros(1, 2, 2))
    # Before scaling: after one layer the class token keeps (1/T + 1)/2 on itself.
    a = (u[0, 0].double() + torch.eye(T, dtype=torch.float64)) / 2
    assert a.sum(1).allclose(torch.ones(T, dtype=torch.float64))
    assert a[0, 0].item() == pytest.approx((1 / T + 1) / 2)


def test_discard_drops_the_weakest_entry_but_never_class_token_self_attention():
    T = 5
    a = torch.full((T, T), 0.2)
    a[0] = torch.tensor([0.01, 0.49, 0.2, 0.2, 0.1])  # [0, 0] is the weakest entry of all
    ours = E.attention_rollout([a.expand(1, 1, T, T)], discard_ratio=1 / 25, grid_size=(2, 2))
    by_hand = a.clone().double()
    by_hand[0, 4] = 0  # the weakest entry apart from [0, 0]
    by_hand = by_hand + torch.eye(T, dtype=torch.float64)
    by_hand = by_hand / by_hand.sum(1, keepdim=True)
    m = by_hand[0, 1:]
    expected = ((m - m.min()) / (m.max() - m.min())).reshape(2, 2)
    assert torch.allclose(ours[0].double(), expected, atol=1e-6)


def test_bad_rollout_options():
    att = random_attention(grid=(2, 2))
    with pytest.raises(ValueError, match="head_fusion"):
        E.attention_rollout(att, head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        E.attention_rollout(att, discard_ratio=1.0)
    with pytest.raises(ValueError, match="not a square grid"):
        E.attention_rollout(random_attention(grid=(2, 3)))


def test_gradient_rollout_pairs_each_layer_with_its_own_gradient():
    torch.manual_seed(0)
    model = vitdemo.create_model("vit_cifar_4", num_classes=3, depth=3, embed_dim=32, num_heads=2, mlp_dim=64).eval()
    x = torch.randn(2, 3, 32, 32)
    ours = E.gradient_rollout(model, x, class_index=1)
    logits, att = model(x, return_attention=True)
    grads = torch.autograd.grad(logits[:, 1].sum(), att)
    fused = [(a.detach() * g.clamp_min(0)).mean(1) for a, g in zip(att, grads)]
    expected = E._rollout(fused, 0.0, (8, 8))
    assert torch.allclose(ours, expected, atol=1e-6)
    reversed_pairs = [(a.detach() * g.clamp_min(0)).mean(1) for a, g in zip(att, reversed(grads))]
    assert not torch.allclose(ours, E._rollout(reversed_pairs, 0.0, (8, 8)), atol=1e-3)


def test_token_attention_is_the_query_row():
    att = random_attention(grid=(2, 3))
    maps = E.token_attention(att, layer=1, query=4, grid_size=(2, 3))
    assert maps.shape == (2, 4, 2, 3)
    assert torch.equal(maps[1, 2].flatten(), att[1][1, 2, 4, 1:])
    with pytest.raises(ValueError, match="query"):
        E.token_attention(att, layer=0, query=7, grid_size=(2, 3))


def test_attention_distance_of_self_attention_is_zero():
    T = 17
    att = [torch.eye(T).expand(2, 3, T, T) for _ in range(2)]
    assert torch.equal(E.mean_attention_distance(att, patch_size=16), torch.zeros(2, 3))


def test_attention_distance_of_uniform_attention_by_hand():
    grid, P = 3, 10
    T = grid * grid + 1
    att = [torch.full((1, 2, T, T), 1 / T)]
    centres = [(r * P, c * P) for r in range(grid) for c in range(grid)]
    expected = np.mean([[math.dist(p, q) for q in centres] for p in centres])  # renormalised over patches
    d = E.mean_attention_distance(att, patch_size=P)
    assert d.shape == (1, 2)
    assert d[0, 0].item() == pytest.approx(expected, rel=1e-6)


def test_attention_distance_neighbour():
    """Each patch attends only to its right neighbour (wrapping off the edge to itself)."""
    grid, P = 4, 8
    T = grid * grid + 1
    a = torch.zeros(T, T)
    a[0, 0] = 1
    for i in range(grid * grid):
        r, c = divmod(i, grid)
        j = i + 1 if c < grid - 1 else i
        a[1 + i, 1 + j] = 1
    d = E.mean_attention_distance([a.expand(1, 1, T, T)], patch_size=P)
    assert d.item() == pytest.approx(P * 12 / 16)


def test_position_similarity_is_the_cosine_of_each_pair_of_patch_positions():
    """Entry (r1, c1, r2, c2) compares patch (r1, c1), token 1 + r1 * grid_w + c1 (token 0 is
    the class token), with patch (r2, c2). A unit diagonal and symmetry alone would let an
    off-by-one (the class token's embedding kept, the last patch's dropped) or a transposed grid
    pass; the values, on a 4 x 6 grid, do not."""
    model = vitdemo.create_model("vit_s_16", depth=1, image_size=(64, 96))
    sim = E.position_embedding_similarity(model)
    assert sim.shape == (4, 6, 4, 6)
    pos = model.pos_embed[0].detach()
    for r1, c1, r2, c2 in [(0, 0, 0, 1), (1, 2, 3, 5), (3, 5, 0, 0), (2, 0, 1, 4)]:
        expected = F.cosine_similarity(pos[1 + r1 * 6 + c1], pos[1 + r2 * 6 + c2], dim=0).item()
        assert sim[r1, c1, r2, c2].item() == pytest.approx(expected, abs=1e-6)
    by_hand = F.cosine_similarity(pos[1:, None], pos[None, 1:], dim=-1).reshape(4, 6, 4, 6)
    torch.testing.assert_close(sim, by_hand, atol=1e-6, rtol=0)
    flat = sim.reshape(24, 24)
    assert torch.allclose(flat.diag(), torch.ones(24), atol=1e-5)
    assert torch.allclose(flat, flat.T, atol=1e-6)
    assert V.figure_to_image(V.plot_position_embedding_similarity(sim)).size[0] > 300


def test_patch_embedding_components():
    model = vitdemo.create_model("vit_cifar_4", num_classes=10)
    comps = E.patch_embedding_components(model, n=12)
    assert comps.shape == (12, 3, 4, 4)
    assert comps.min() >= 0 and comps.max() <= 1
    w = model.patch_embed.proj.weight.detach().reshape(192, -1)
    _, _, vh = torch.linalg.svd(w - w.mean(0), full_matrices=False)
    first = comps[0].flatten()
    for sign in (1, -1):  # a principal direction is defined up to its sign
        v = sign * vh[0]
        if torch.allclose(first, (v - v.min()) / (v.max() - v.min()), atol=1e-5):
            break
    else:
        raise AssertionError("first component is not the direction of largest variance")
    V.plot_patch_embedding_components(comps)
