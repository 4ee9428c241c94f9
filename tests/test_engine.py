"""The training engine: it learns, stops, resumes on the same curve, and fails clearly."""

import math

import pytest
import torch
from helpers import small_model

from vitdemo.data import Preprocessing

from vitdemo.checkpoint import load_checkpoint
from vitdemo.data import synthetic_shapes
from vitdemo.engine import (
    RECIPES,
    DoneEvent,
    EpochEvent,
    Recipe,
    StepEvent,
    TrainingError,
    make_optimizer,
    train,
    warmup_cosine,
)

PREP = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def shapes():
    data = synthetic_shapes(num_classes=4, per_class=300, image_size=32, seed=0)
    from vitdemo.data import stratified_split

    tr, va = stratified_split(data.labels, 0.2, seed=0)
    return data.subset(tr), data.subset(va)


def run(model, shapes, recipe, **kwargs):
    events = list(train(model, shapes[0], shapes[1], recipe, preprocess=PREP, device="cpu", **kwargs))
    return events


def test_learns_synthetic_shapes_well_above_chance(shapes):
    recipe = RECIPES["small-data"].replace(epochs=10, batch_size=32, lr=3e-3, warmup=0.02, label_smoothing=0.0,
                                           crop_padding=None)
    events = run(small_model(), shapes, recipe, log_every=5)
    done = events[-1]
    assert isinstance(done, DoneEvent) and not done.stopped
    epochs = [e for e in events if isinstance(e, EpochEvent)]
    assert len(epochs) == 10
    assert epochs[-1].val_acc >= 0.4  # chance is 0.25 (240 images); 0.49 measured
    assert epochs[-1].train_loss < epochs[0].train_loss
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert steps and steps[-1].step == steps[-1].total_steps == 10 * math.ceil(960 / 32)
    assert set(done.history) >= {"train_loss", "train_acc", "test_loss", "test_acc"}
    assert len(done.history["test_acc"]) == 10


def test_stop_and_resume_continue_the_same_curve(shapes, tmp_path):
    recipe = RECIPES["small-data"].replace(epochs=2, batch_size=64)
    straight = run(small_model(), shapes, recipe)[-1].history

    gen = train(small_model(), shapes[0], shapes[1], recipe, preprocess=PREP, device="cpu", out_dir=tmp_path)
    for event in gen:
        if isinstance(event, EpochEvent):
            break
    gen.close()  # as the app's Stop button does
    first_epoch = load_checkpoint(tmp_path)[1]["metrics"]
    assert first_epoch["epoch"] == 1

    model = small_model(seed=99)  # different weights: resume must restore them
    resumed = run(model, shapes, recipe, out_dir=tmp_path, resume=True)
    assert len([e for e in resumed if isinstance(e, EpochEvent)]) == 1
    history = resumed[-1].history
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert history[key] == pytest.approx(straight[key], rel=1e-4, abs=1e-6), key


def test_should_stop_between_steps_leaves_last_checkpoint(shapes, tmp_path):
    recipe = RECIPES["small-data"].replace(epochs=3, batch_size=64)
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 20  # 15 steps per epoch: stops in epoch 2

    events = run(small_model(), shapes, recipe, out_dir=tmp_path, should_stop=should_stop)
    assert events[-1].stopped
    model, meta = load_checkpoint(tmp_path)
    assert meta["metrics"]["epoch"] == 1
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_nan_loss_stops_with_clear_message(shapes):
    model = small_model()
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="loss became nan at step 1"):
        run(model, shapes, RECIPES["small-data"].replace(epochs=1))


def test_read_back_sums_pending_steps_and_names_the_first_bad_one():
    # On a GPU the loop reads losses back once per log interval; the sums and the step named in
    # the error must be those of reading every step.
    from vitdemo.engine.loop import _read_back

    def pending(*losses):
        return [(torch.tensor(v), torch.tensor(c), 4) for v, c in zip(losses, range(1, len(losses) + 1))]

    sums, window = [0.0, 0.0, 0.0], [1.0, 1.0, 4.0, 0.0]
    steps = pending(0.5, 1.5)
    _read_back(steps, step=12, epoch=0, lr=1e-3, totals=(sums, window))
    assert steps == [] and sums == [8.0, 3.0, 8.0] and window[:3] == [9.0, 4.0, 12.0]
    with pytest.raises(TrainingError, match=r"loss became inf at step 11 \(epoch 3"):
        _read_back(pending(0.5, float("inf"), float("nan")), step=12, epoch=2, lr=1e-3, totals=(sums,))


def test_freeze_backbone_trains_only_the_head(shapes):
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = RECIPES["finetune"].replace(epochs=2, batch_size=32, lr=0.05)
    run(model, shapes, recipe, freeze_backbone=True)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}


def test_cached_features_are_the_class_token_features(shapes):
    from vitdemo.data import normalize
    from vitdemo.engine import extract_features

    model = small_model().eval()
    data = shapes[1].subset(torch.arange(5))
    cached = extract_features(model, data, PREP.mean, PREP.std)
    with torch.no_grad():
        tokens = model.forward_features(normalize(data.images, PREP.mean, PREP.std))[0]
    assert cached.features.shape == (5, 64) and torch.equal(cached.labels, data.labels)
    torch.testing.assert_close(cached.features, tokens[:, 0], atol=1e-6, rtol=0)  # what the head reads


def test_resume_needs_state(tmp_path, shapes):
    with pytest.raises(TrainingError, match="cannot resume"):
        run(small_model(), shapes, RECIPES["small-data"], out_dir=tmp_path, resume=True)


def test_resume_with_another_recipe_is_refused(tmp_path, shapes):
    run(small_model(), shapes, RECIPES["small-data"].replace(epochs=1, batch_size=128), out_dir=tmp_path)
    with pytest.raises(TrainingError, match="started with recipe"):
        run(small_model(), shapes, RECIPES["small-data"].replace(epochs=1, batch_size=64), out_dir=tmp_path,
            resume=True)


def test_auto_precision_is_bf16_on_gpus_and_amx_cpus_only(monkeypatch):
    from vitdemo import engine
    from vitdemo.engine import devices

    for pays, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(devices, "bf16_pays", lambda pays=pays: pays)
        assert engine.resolve_precision("auto", torch.device("cpu")) == expected
    assert engine.resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert engine.resolve_precision("fp32", torch.device("cuda")) == "fp32"
    assert engine.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        engine.resolve_precision("fp16", torch.device("cpu"))


def test_bf16_training_on_the_cpu_is_autocast_repeatable_and_recorded(shapes, tmp_path):
    recipe = RECIPES["small-data"].replace(epochs=1, batch_size=64)
    histories = {}
    for name, precision in (("bf16", "bf16"), ("bf16 again", "bf16"), ("fp32", "fp32")):
        histories[name] = run(small_model(), shapes, recipe, precision=precision, out_dir=tmp_path / name)[-1].history
    assert histories["bf16"] == histories["bf16 again"]  # one seed, one curve
    assert histories["bf16"]["train_loss"] != histories["fp32"]["train_loss"]  # the step really ran in bf16
    assert histories["bf16"]["train_loss"] == pytest.approx(histories["fp32"]["train_loss"], rel=0.05)
    assert load_checkpoint(tmp_path / "bf16")[1]["precision"] == "bf16"
    assert load_checkpoint(tmp_path / "bf16")[0].pos_embed.dtype == torch.float32  # weights stay fp32


def test_resume_in_another_precision_is_refused(tmp_path, shapes):
    recipe = RECIPES["small-data"].replace(epochs=2, batch_size=128)
    gen = train(small_model(), shapes[0], shapes[1], recipe, preprocess=PREP, device="cpu", out_dir=tmp_path,
                precision="bf16")
    next(e for e in gen if isinstance(e, EpochEvent))
    gen.close()
    with pytest.raises(TrainingError, match="trained in bf16, and this run would train in fp32; pass --precision bf16"):
        run(small_model(), shapes, recipe, out_dir=tmp_path, resume=True, precision="fp32")


def test_warmup_then_cosine_to_zero():
    f = warmup_cosine(100, 0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=0.01)
    assert f(99) < 0.01
    values = [f(s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = small_model()
    opt = make_optimizer(model, RECIPES["small-data"])
    decay, no_decay = ({id(p) for p in g["params"]} for g in opt.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in no_decay} >= {"cls_token", "pos_embed", "norm.weight", "blocks.0.attn.qkv.bias"}
    assert "blocks.0.attn.qkv.weight" in {names[i] for i in decay}
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["weight_decay"] == 0.0


def one_step_from_4(recipe: Recipe) -> float:
    """A weight of 4 after one step whose loss gradient is zero: only weight decay moves it."""
    layer = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(4.0)
    optimizer = make_optimizer(layer, recipe)
    layer.weight.grad = torch.zeros_like(layer.weight)
    optimizer.step()
    return layer.weight.item()


@pytest.mark.parametrize("optimizer, expected", [("adamw", 3.8), ("adam", 3.9), ("sgd", 3.8)])
def test_each_optimizer_name_applies_weight_decay_its_own_way(optimizer, expected):
    """lr 0.1, weight decay 0.5. AdamW (Loshchilov and Hutter) decays the weight itself,
    4 * (1 - 0.1 * 0.5) = 3.8. Adam adds the decay to the gradient (0.5 * 4 = 2), and its first
    step, normalised by the gradient's own size, moves the weight by lr: 4 - 0.1 = 3.9. SGD adds it
    to the gradient too, unnormalised: 4 - 0.1 * 2 = 3.8."""
    recipe = Recipe(optimizer=optimizer, lr=0.1, weight_decay=0.5, momentum=0.9)
    assert one_step_from_4(recipe) == pytest.approx(expected, abs=1e-6)


def test_paper_recipe_is_table_3_with_decoupled_weight_decay():
    r = RECIPES["paper"]
    assert (r.optimizer, r.betas, r.lr, r.weight_decay, r.grad_clip) == ("adamw", (0.9, 0.999), 3e-3, 0.3, 1.0)
    optimizer = make_optimizer(small_model(), r)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["betas"] == (0.9, 0.999)
    assert one_step_from_4(r.replace(lr=0.1, weight_decay=0.5)) == pytest.approx(3.8, abs=1e-6)
    finetune = make_optimizer(small_model(), RECIPES["finetune"])
    assert type(finetune) is torch.optim.SGD and finetune.defaults["momentum"] == 0.9
    assert [g["weight_decay"] for g in finetune.param_groups] == [0.0, 0.0]  # the paper fine-tunes without it


@pytest.mark.parametrize("bad", [dict(lr=0), dict(epochs=0), dict(batch_size=-1), dict(warmup=1.0),
                                 dict(optimizer="lamb"), dict(label_smoothing=-0.1)])
def test_bad_recipe(bad):
    with pytest.raises(ValueError):
        Recipe(**bad)


def test_unknown_recipe_setting():
    with pytest.raises(ValueError, match="unknown recipe setting"):
        RECIPES["paper"].replace(learning_rate=1)


def test_empty_training_set(shapes):
    empty = shapes[0].subset(torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        list(train(small_model(), empty, None, RECIPES["small-data"], preprocess=PREP, device="cpu"))


def test_augmenting_batches_ahead_augments_each_image_once_and_keeps_the_order():
    from vitdemo.engine.batches import augmented

    calls = []

    def augment(x, generator=None, host_generator=None):
        calls.append(len(x))
        return x.float() + 0.5

    batches = [(torch.full((n, 3, 2, 2), i, dtype=torch.uint8), torch.full((n,), i)) for i, n in enumerate([4, 4, 4, 4, 3])]
    out = list(augmented(iter(batches), augment, torch.device("cpu"), torch.Generator(), torch.Generator(), ahead=2))
    assert calls == [8, 8, 3]  # one call per 2 batches, the last one short
    assert [len(y) for _, y in out] == [4, 4, 4, 4, 3]
    for i, (x, y) in enumerate(out):
        assert torch.equal(x, torch.full_like(x, i + 0.5)) and torch.equal(y, torch.full_like(y, i))
