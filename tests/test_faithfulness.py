"""The perturbation test (Chefer et al., CVPR 2021) on a model whose answer depends on one known patch."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from vitdemo import faithfulness as FT

P, GRID = 2, (4, 5)  # 8 x 10 px images, 20 patches: a non-square grid
KEY = 7  # the one patch the model reads: row 1, column 2


class OnePatchModel(nn.Module):
    """Class 0 if patch KEY is bright, 1 if dark, 2 (wrong for every image here) once it holds
    the mean (0): the answer depends on that patch alone."""

    def forward(self, x):
        r, c = divmod(KEY, GRID[1])
        s = x[:, :, r * P:(r + 1) * P, c * P:(c + 1) * P].mean(dim=(1, 2, 3))
        return torch.stack([s, -s, torch.full_like(s, 0.5)], dim=1)


def images(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, GRID[0] * P, GRID[1] * P, generator=gen) * 0.2
    labels = torch.arange(n) % 2
    r, c = divmod(KEY, GRID[1])
    x[:, :, r * P:(r + 1) * P, c * P:(c + 1) * P] = (1 - 2 * labels.float())[:, None, None, None]
    return x, labels


def key_first_maps(n):
    """A map that ranks the key patch above every other (the others at random below it)."""
    maps = torch.rand(n, *GRID, generator=torch.Generator().manual_seed(5)) * 0.5
    maps.view(n, -1)[:, KEY] = 1.0
    return maps


def test_positive_curve_drops_at_the_first_step_and_negative_does_not():
    x, labels = images()
    model = OnePatchModel()
    order = FT.removal_order(key_first_maps(len(x)))
    assert (order[:, 0] == KEY).all()
    positive = FT.perturbation_hits(model, x, labels, order, P, positive=True).float().mean(1)
    negative = FT.perturbation_hits(model, x, labels, order, P, positive=False).float().mean(1)
    assert positive.tolist() == [1.0] + [0.0] * 9  # the key patch goes with the first 10% (2 patches)
    assert negative.tolist() == [1.0] * 10  # it is the last to go, and 90% never reaches it
    assert FT.perturbation_auc(FT.FRACTIONS, positive) == 0.0
    assert FT.perturbation_auc(FT.FRACTIONS, negative) == pytest.approx(80.0)
    # The reverse ranking (key patch last) swaps the two curves.
    reverse = FT.removal_order(-key_first_maps(len(x)))
    assert FT.perturbation_hits(model, x, labels, reverse, P, positive=False).float().mean(1).tolist() == \
        [1.0] + [0.0] * 9


def test_random_order_lies_between():
    """A random order removes the key patch at a random step: the fraction of images still right
    after removing k of 20 patches is the chance the key patch was not among them, (20 - k) / 20."""
    n = 4000
    x, labels = images(n)
    order = FT.random_order(n, 20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(order.sort(1).values, torch.arange(20).expand(n, 20))  # each row a permutation
    acc = FT.perturbation_hits(OnePatchModel(), x, labels, order, P).float().mean(1).numpy()
    expected = [(20 - FT.removed_count(f, 20)) / 20 for f in FT.FRACTIONS]
    np.testing.assert_allclose(acc, expected, atol=0.03)


def test_remove_patches_replaces_exactly_the_named_patches_by_the_fill():
    x = torch.randn(2, 3, 8, 10)
    fill = torch.tensor([0.1, -0.2, 0.3])
    out = FT.remove_patches(x, torch.tensor([[0, 19], [7, 7]]), P, fill)
    removed = torch.zeros(2, 8, 10, dtype=torch.bool)
    removed[0, 0:2, 0:2] = removed[0, 6:8, 8:10] = removed[1, 2:4, 4:6] = True
    for b in range(2):
        for ch in range(3):
            assert (out[b, ch][removed[b]] == fill[ch]).all()
            assert torch.equal(out[b, ch][~removed[b]], x[b, ch][~removed[b]])
    assert torch.equal(FT.remove_patches(x, torch.empty(2, 0, dtype=torch.long), P), x)


def test_removal_order_ranks_by_score_and_breaks_ties_at_random_but_reproducibly():
    maps = torch.tensor([[[0.2, 0.9, 0.2], [0.2, 0.5, 0.2]]]).expand(200, 2, 3)
    orders = FT.removal_order(maps, generator=torch.Generator().manual_seed(0))
    assert (orders[:, 0] == 1).all() and (orders[:, 1] == 4).all()
    assert len({tuple(o[2:].tolist()) for o in orders}) > 10  # the four tied patches in many orders
    again = FT.removal_order(maps, generator=torch.Generator().manual_seed(0))
    assert torch.equal(orders, again)


def test_removed_count_and_auc_by_hand():
    assert [FT.removed_count(f, 64) for f in FT.FRACTIONS] == [0, 6, 12, 19, 25, 32, 38, 44, 51, 57]
    assert FT.removed_count(0.3, 10) == 3
    acc = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    # Trapezoids over 0.1 ... 0.9: 0.1 * (0.8/2 + 0.7 + ... + 0.1 + 0/2) = 0.32
    assert FT.perturbation_auc(FT.FRACTIONS, acc) == pytest.approx(32.0)
    assert FT.perturbation_auc(FT.FRACTIONS, acc, start=0.0) == pytest.approx(32.0 + 100 * 0.1 * (0.9 + 0.8) / 2)
    with pytest.raises(ValueError, match="fraction"):
        FT.removed_count(1.5, 10)
    # One curve per image: the mean of the images' areas is the area of the mean curve.
    hits = np.random.default_rng(0).random((10, 7)) > 0.5
    areas = FT.perturbation_auc(FT.FRACTIONS, hits)
    assert areas.shape == (7,) and set(np.round(areas, 6)) <= {round(5 * k, 6) for k in range(17)}
    assert areas.mean() == pytest.approx(FT.perturbation_auc(FT.FRACTIONS, hits.mean(1)))


def test_results_are_read_beside_a_checkpoint_and_summarised(tmp_path):
    method = {"key": "relevance", "name": "Relevance", "class_specific": True,
              "predicted": {"positive_auc": 17.0, "negative_auc": 54.2},
              "true": {"positive_auc": 16.0, "negative_auc": 55.0}}
    (tmp_path / FT.RESULTS_NAME).write_text(json.dumps({"methods": [method]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    results = FT.read_results(tmp_path)
    assert results == FT.read_results(tmp_path / "model.safetensors") == {"methods": [method]}
    assert FT.summary_rows(results) == [["Relevance", "yes", 17.0, 54.2, 16.0, 55.0]]
    assert len(FT.SUMMARY_HEADERS) == 6
    (tmp_path / "empty").mkdir()
    assert FT.read_results(tmp_path / "empty") is None
    (tmp_path / FT.RESULTS_NAME).write_text("{not json")
    assert FT.read_results(tmp_path) is None


def test_shipped_results_measure_the_shipped_weights():
    """checkpoints/vit_cifar10/faithfulness.json (shown by the app, quoted in README) must be
    measured again whenever the weights change: `python benchmarks/faithfulness.py`."""
    import vitdemo
    from vitdemo.checkpoint import DEFAULT_CHECKPOINT
    from vitdemo.runtime import weights_digest

    results = FT.read_results(DEFAULT_CHECKPOINT.parent)
    assert results is not None
    model, _ = vitdemo.load_checkpoint()
    assert results["weights_sha256"] == weights_digest(model)
    assert results["images"] >= 1000 and results["fractions"] == list(FT.FRACTIONS)
    assert {m["key"] for m in results["methods"]} == {"rollout_mean", "rollout_max", "last_layer_cls",
                                                      "gradient_rollout", "relevance", "random"}
    for m in results["methods"]:
        for target in ("predicted", "true"):
            for sign in ("positive", "negative"):
                r = m[target]
                assert r[f"{sign}_curve"][0] == results["accuracy_intact"]
                assert r[f"{sign}_auc"] == pytest.approx(FT.perturbation_auc(FT.FRACTIONS, r[f"{sign}_curve"]),
                                                         abs=0.01)
                assert 0 < r[f"{sign}_auc_se"] < 5
        if not m["class_specific"]:
            assert m["predicted"] == m["true"]
