"""The small-ViT recipe in the engine: repeated augmentation, Mixup/CutMix with soft targets,
the moving average of the weights, exact resume with all of them, and the GPU path's pieces
that also run on a CPU (fused optimiser, compiled step)."""

import json

import pytest
import torch
from helpers import small_model

from vitdemo.data import Preprocessing

from vitdemo.checkpoint import load_checkpoint
from vitdemo.data import ImageData, iterate_batches, stratified_split, synthetic_shapes
from vitdemo.engine import EMA_DIR, RECIPES, EpochEvent, Recipe, StepEvent, TrainingError, make_optimizer, train

PREP = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# Every ingredient at once, DeiT's in-batch repeats included (small-vit itself keeps them off).
BUNDLE = RECIPES["small-vit"].replace(epochs=2, batch_size=48, ema_decay=0.9, repeats=3)


@pytest.fixture(scope="module")
def shapes():
    data = synthetic_shapes(num_classes=4, per_class=120, image_size=32, seed=0)
    tr, va = stratified_split(data.labels, 0.2, seed=0)
    return data.subset(tr), data.subset(va)


def run(model, shapes, recipe, **kwargs):
    return list(train(model, shapes[0], shapes[1], recipe, preprocess=PREP, device="cpu", **kwargs))


def numbered(n):
    """n images whose first pixel is their index (mod 256) and label their index."""
    images = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n) % 256
    return ImageData(images, torch.arange(n), [str(i) for i in range(n)])


# --- repeated augmentation ---------------------------------------------------------------------


def test_repeated_batches_hold_each_image_repeats_times_spread_apart():
    data = numbered(100)
    batches = [y for _, y in iterate_batches(data, 12, shuffle=True, generator=torch.Generator().manual_seed(0),
                                             repeats=3)]
    assert sum(len(y) for y in batches) == 100  # the epoch keeps its length
    seen = set()
    for y in batches[:-1]:
        distinct = y[:4]
        assert len(set(distinct.tolist())) == 4 and torch.equal(y, distinct.repeat(3))  # a b c d a b c d ...
        assert not seen & set(distinct.tolist())  # an image is never in two batches
        seen |= set(distinct.tolist())
        assert not (y == y.flip(0)).any()  # the flipped batch (Mixup's pairing) never pairs an image with itself
    assert 30 <= len(seen | set(batches[-1].tolist())) <= 36  # about a third of the images per epoch
    plain = torch.cat([y for _, y in iterate_batches(data, 12, shuffle=True,
                                                      generator=torch.Generator().manual_seed(0))])
    assert sorted(plain.tolist()) == list(range(100))  # repeats=1 is the plain permutation


@pytest.mark.parametrize("n, batch, repeats", [(2, 8, 3), (7, 1, 3), (50, 10, 4), (64, 16, 2)])
def test_repeated_batches_cover_the_epoch_for_any_sizes(n, batch, repeats):
    labels = [y for _, y in iterate_batches(numbered(n), batch, shuffle=True,
                                            generator=torch.Generator().manual_seed(1), repeats=repeats)]
    assert sum(len(y) for y in labels) == n and all(len(y) <= batch for y in labels)
    with pytest.raises(ValueError, match="repeats"):
        next(iterate_batches(numbered(n), batch, shuffle=True, repeats=0))


def test_repeated_batches_split_over_ranks_like_one_process():
    data, g = numbered(96), lambda: torch.Generator().manual_seed(3)
    whole = torch.cat([y for _, y in iterate_batches(data, 24, True, generator=g(), repeats=3)])
    shares = [torch.cat([y for _, y in iterate_batches(data, 12, True, generator=g(), rank=r, world_size=2,
                                                         repeats=3)]) for r in range(2)]
    merged = torch.stack(shares, 1).flatten()
    assert torch.equal(merged, whole)  # each rank takes every other image of the same global batches


# --- the recipe ---------------------------------------------------------------------------------


def test_small_vit_recipe_is_lee_et_al_s():
    r = RECIPES["small-vit"]
    # Their code's values (main.py's defaults; RASampler(n, batch, 1, ra=3) makes each of its 100
    # epochs three passes: 300 plain epochs, no in-batch repeats).
    assert (r.optimizer, r.lr, r.weight_decay, r.batch_size, r.epochs, r.warmup, r.grad_clip) == (
        "adamw", 1e-3, 0.05, 128, 300, 0.1, 0.0)
    assert (r.policy, r.erasing, r.mixup_alpha, r.cutmix_alpha, r.mix_prob, r.repeats, r.label_smoothing) == (
        "autoaugment", 0.25, 1.0, 1.0, 0.5, 1, 0.1)
    assert r.mixes and not RECIPES["small-data"].mixes


def test_a_recipe_in_words_names_every_ingredient_that_is_on():
    words = RECIPES["small-vit"].describe()
    for part in ("AdamW, lr 0.001 at batch 128, weight decay 0.05, 300 epochs (warm-up 10%, then cosine)",
                 "label smoothing 0.1", "AutoAugment (CIFAR-10 policy)", "random erasing 0.25",
                 "Mixup (alpha 1) or CutMix (alpha 1) on 50% of batches"):
        assert part in words
    assert "clipping" not in words and "moving average" not in words and "times per batch" not in words
    assert "moving average of the weights (decay 0.9)" in BUNDLE.describe()
    assert "each image 3 times per batch" in BUNDLE.describe()
    assert Recipe(crop_padding=None, flip=False).describe().endswith("gradient clipping at 1; label smoothing 0.1; "
                                                                      "augmentation: none")
    assert RECIPES["finetune"].describe().startswith("SGD with momentum 0.9, lr 0.01 at batch 64")


def test_recipes_read_back_from_checkpoints_of_any_version():
    saved = json.loads(json.dumps(RECIPES["small-vit"].to_dict()))  # as a checkpoint's metadata holds it
    assert Recipe.from_saved(saved) == RECIPES["small-vit"]
    older = {k: v for k, v in RECIPES["small-data"].to_dict().items()
             if k not in ("policy", "erasing", "mixup_alpha", "cutmix_alpha", "mix_prob", "repeats", "ema_decay")}
    assert Recipe.from_saved({**older, "randaugment": True}) == RECIPES["small-data"].replace(policy="randaugment")


@pytest.mark.parametrize("bad", [dict(policy="trivial"), dict(erasing=1.5), dict(mixup_alpha=-1),
                                 dict(repeats=0), dict(ema_decay=1.0), dict(mix_prob=2.0)])
def test_bad_recipe_settings_are_refused_with_the_rule(bad):
    with pytest.raises(ValueError, match="policy|invalid recipe"):
        Recipe(**bad)


def test_runs_saved_before_the_new_settings_resume(shapes, tmp_path):
    recipe = RECIPES["small-data"].replace(epochs=2, batch_size=96, policy="randaugment")
    gen = train(small_model(), shapes[0], shapes[1], recipe, preprocess=PREP, device="cpu", out_dir=tmp_path)
    next(e for e in gen if isinstance(e, EpochEvent))
    gen.close()
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    old = {k: v for k, v in state["recipe"].items()
           if k not in ("policy", "erasing", "mixup_alpha", "cutmix_alpha", "mix_prob", "repeats", "ema_decay")}
    state["recipe"] = {**old, "randaugment": True}  # as the engine wrote it before those settings existed
    torch.save(state, tmp_path / "train_state.pt")
    assert len([e for e in run(small_model(), shapes, recipe, out_dir=tmp_path, resume=True)
                if isinstance(e, EpochEvent)]) == 1
    with pytest.raises(TrainingError, match="started with recipe"):
        run(small_model(), shapes, recipe.replace(policy="autoaugment"), out_dir=tmp_path, resume=True)


# --- the bundle in the loop -------------------------------------------------------------------------


def test_mixed_batches_train_on_soft_targets(shapes, monkeypatch):
    from vitdemo.engine import loop

    seen = []
    real = loop.soft_cross_entropy

    def recording(logits, targets):
        seen.append(targets.detach().clone())
        return real(logits, targets)

    monkeypatch.setattr(loop, "soft_cross_entropy", recording)
    run(small_model(), shapes, RECIPES["small-data"].replace(epochs=1, batch_size=48, mixup_alpha=0.8))
    assert len(seen) == 8  # every step of the epoch (384 images / 48)
    for targets in seen:
        torch.testing.assert_close(targets.sum(1), torch.ones(len(targets)))
    assert any((t.max(1).values < 0.9).any() for t in seen)  # mixed: two classes share the weight
    seen.clear()
    run(small_model(), shapes, RECIPES["small-data"].replace(epochs=1, batch_size=48))
    assert seen == []  # no mixing: hard labels with label smoothing, as before


def test_moving_average_is_of_the_weights_after_every_step_and_saved_apart(shapes, tmp_path):
    recipe = RECIPES["small-data"].replace(epochs=1, batch_size=96, ema_decay=0.8)
    model = small_model()
    snapshots = []
    events = []
    for event in train(model, shapes[0], shapes[1], recipe, preprocess=PREP, device="cpu", out_dir=tmp_path,
                       log_every=1):
        events.append(event)
        if isinstance(event, StepEvent):
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert len(snapshots) == 4
    expected = snapshots[0]  # the average starts at the first step's weights
    for weights in snapshots[1:]:
        expected = {k: 0.8 * expected[k] + 0.2 * weights[k] for k in expected}
    ema_model, ema_meta = load_checkpoint(tmp_path / EMA_DIR)
    for name, value in ema_model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    trained, meta = load_checkpoint(tmp_path)
    assert not torch.equal(trained.head.weight, ema_model.head.weight)
    assert "moving average" in ema_meta["weights"] and "weights" not in meta
    epoch = next(e for e in events if isinstance(e, EpochEvent))
    from vitdemo.engine import evaluate

    _, acc, _ = evaluate(ema_model, shapes[1], PREP.mean, PREP.std)
    assert epoch.ema_val_acc == ema_meta["metrics"]["val_acc"] == pytest.approx(acc)
    assert events[-1].history["ema_val_acc"] == [epoch.ema_val_acc]
    assert events[-1].ema_checkpoint == tmp_path / EMA_DIR / "model.safetensors"


def test_the_whole_bundle_resumes_on_the_same_curve(shapes, tmp_path):
    straight = run(small_model(), shapes, BUNDLE)[-1].history
    gen = train(small_model(), shapes[0], shapes[1], BUNDLE, preprocess=PREP, device="cpu", out_dir=tmp_path)
    next(e for e in gen if isinstance(e, EpochEvent))
    gen.close()
    resumed = run(small_model(seed=5), shapes, BUNDLE, out_dir=tmp_path, resume=True)[-1].history
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "ema_val_loss", "ema_val_acc"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-5, abs=1e-7), key
    again = run(small_model(), shapes, BUNDLE)[-1].history
    assert again == straight  # same seed, same run, bit for bit


# --- the GPU path's pieces, on the CPU ---------------------------------------------------------


def test_fused_optimizer_takes_the_same_step():
    recipe = RECIPES["small-vit"]
    steps = []
    for fused in (False, True):
        model = small_model()
        opt = make_optimizer(model, recipe, fused=fused)
        assert opt.defaults.get("fused") == (fused or None)
        for _ in range(3):
            model(torch.ones(2, 3, 32, 32)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        steps.append(model.head.weight.detach().clone())
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_step_follows_the_eager_curve(shapes):
    recipe = RECIPES["small-data"].replace(epochs=1, batch_size=96)
    eager = [e.loss for e in run(small_model(depth=1), shapes, recipe, log_every=1) if isinstance(e, StepEvent)]
    compiled = [e.loss for e in run(small_model(depth=1), shapes, recipe, log_every=1, compile="default")
                if isinstance(e, StepEvent)]
    assert compiled == pytest.approx(eager, rel=1e-3)
    with pytest.raises(ValueError, match="compile"):
        run(small_model(), shapes, recipe, compile="fastest")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_augments_on_a_side_stream_the_batches_the_main_stream_would():
    import dataclasses

    from vitdemo.augment import BatchAugment
    from vitdemo.engine.batches import augmented

    data = synthetic_shapes(num_classes=4, per_class=64, image_size=32, seed=0)
    data = dataclasses.replace(data, images=data.images.cuda(), labels=data.labels.cuda())
    aug = BatchAugment(32, (0.5,) * 3, (0.5,) * 3, policy="autoaugment", erasing=0.25)

    def batches():
        return iterate_batches(data, 32, True, generator=torch.Generator().manual_seed(0), repeats=2)

    got = list(augmented(batches(), aug, torch.device("cuda"), torch.Generator("cuda").manual_seed(1),
                          torch.Generator().manual_seed(2), ahead=4))
    group = list(batches())
    expected = aug(torch.cat([x for x, _ in group[:4]]), generator=torch.Generator("cuda").manual_seed(1),
                   host_generator=torch.Generator().manual_seed(2))
    assert torch.equal(torch.cat([x for x, _ in got[:4]]), expected)
    assert torch.equal(torch.cat([y for _, y in got]), torch.cat([y for _, y in group]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_run_with_the_bundle_repeats_itself(shapes):
    runs = [list(train(small_model(), shapes[0], shapes[1], BUNDLE.replace(epochs=1), preprocess=PREP,
                       device="cuda"))[-1].history for _ in range(2)]
    for key in ("train_loss", "test_acc", "ema_val_acc"):
        assert runs[0][key] == pytest.approx(runs[1][key], rel=1e-3), key
