"""A time budget instead of an epoch count (vitdemo.engine.budget, `vitdemo train --time-budget`):
the run ends inside its budget with its schedule completed, trains exactly as the epochs it chose,
records its plan, and resumes on it."""

import json
import time

import pytest
import torch
from helpers import small_model

from vitdemo.checkpoint import read_metadata
from vitdemo.cli import main
from vitdemo.data import Preprocessing, stratified_split, synthetic_shapes
from vitdemo.engine import RECIPES, DoneEvent, EpochEvent, PlanEvent, TrainingError, train
from vitdemo.engine.budget import MARGIN, plan

PREP = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
RECIPE = RECIPES["small-data"].replace(batch_size=64, ema_decay=0.99)


@pytest.fixture(scope="module")
def shapes():
    data = synthetic_shapes(num_classes=4, per_class=300, image_size=32, seed=0)
    train_idx, val_idx = stratified_split(data.labels, 0.2, seed=0)
    return data.subset(train_idx), data.subset(val_idx)


def budgeted(shapes, budget, **kwargs):
    torch.manual_seed(0)
    model = small_model()
    start = time.perf_counter()
    events = list(train(model, *shapes, RECIPE, preprocess=PREP, device="cpu", time_budget=budget, **kwargs))
    return model, events, time.perf_counter() - start


def weights_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_plan_fits_whole_epochs_in_what_is_left_after_the_margin():
    # 10 steps of 0.5 s, 1 s validating, 1 s saving: 7 s an epoch; 100 s less 3% less 10 s spent is 87 s.
    p = plan(100, 10, steps_per_epoch=10, step=0.5, validation=1.0, checkpoint=1.0)
    assert p.epoch == 7 and p.epochs == int((100 * (1 - MARGIN) - 10) // 7) == 12
    assert "12 epoch(s) fit" in p.reason and "7.00 s" in p.reason
    assert plan(100, 10, 10, 0.5, 1.0, 1.0, max_epochs=5).epochs == 5
    assert "capped at 5" in plan(100, 10, 10, 0.5, 1.0, 1.0, max_epochs=5).reason
    too_short = plan(5, 1, 10, 0.5, 1.0, 1.0)
    assert too_short.epochs == 1 and "overrun" in too_short.reason


@pytest.mark.slow
def test_a_20_s_budget_ends_in_20_s_with_its_schedule_completed(shapes, tmp_path):
    model, events, seconds = budgeted(shapes, 20.0, out_dir=tmp_path)
    planned = events[0]
    assert isinstance(planned, PlanEvent) and planned.plan.epochs > 10
    assert 18.0 <= seconds <= 22.0, (seconds, planned.plan.reason)
    done = events[-1]
    assert isinstance(done, DoneEvent) and not done.stopped and done.budget == planned.plan
    assert len([e for e in events if isinstance(e, EpochEvent)]) == planned.plan.epochs
    # Warm-up and cosine over the chosen epochs: the learning rate has come down to zero.
    assert done.history["lr"][-1] == 0.0 and max(done.history["lr"]) == pytest.approx(RECIPE.lr, rel=0.05)
    for path in (tmp_path / "model.safetensors", tmp_path / "ema" / "model.safetensors"):
        meta = read_metadata(path)
        assert meta["time_budget"]["budget"] == 20.0 and meta["time_budget"]["epochs"] == planned.plan.epochs
        assert meta["time_budget"]["reason"] == planned.plan.reason and meta["recipe"]["epochs"] == planned.plan.epochs


def test_a_budgeted_run_trains_exactly_as_the_epochs_it_chose(shapes):
    model, events, _ = budgeted(shapes, 3.0)
    epochs = events[0].plan.epochs
    torch.manual_seed(0)
    plain = small_model()
    history = list(train(plain, *shapes, RECIPE.replace(epochs=epochs), preprocess=PREP, device="cpu"))[-1].history
    # The measured steps were undone: weights, moving average and every recorded figure agree bit for bit.
    assert weights_equal(model, plain)
    assert events[-1].history == history


def test_a_stopped_budgeted_run_resumes_on_its_plan(shapes, tmp_path):
    torch.manual_seed(0)
    model = small_model()
    events = train(model, *shapes, RECIPE, preprocess=PREP, device="cpu", out_dir=tmp_path, time_budget=4.0)
    epochs = next(events).plan.epochs
    assert epochs >= 2
    for event in events:
        if isinstance(event, EpochEvent) and event.epoch == 1:
            events.close()  # cut off after its first epoch, as a time-out would
    with pytest.raises(TrainingError, match="planned for 4 s .*--time-budget 4"):
        list(train(small_model(), *shapes, RECIPE, preprocess=PREP, device="cpu", out_dir=tmp_path, resume=True,
                   time_budget=5.0))
    with pytest.raises(TrainingError, match="chosen by a time budget of 4 s: resume with --time-budget 4"):
        list(train(small_model(), *shapes, RECIPE, preprocess=PREP, device="cpu", out_dir=tmp_path, resume=True))
    resumed = small_model()
    done = list(train(resumed, *shapes, RECIPE, preprocess=PREP, device="cpu", out_dir=tmp_path, resume=True,
                      time_budget=4.0))[-1]
    assert done.budget.epochs == epochs and len(done.history["lr"]) == epochs and done.history["lr"][-1] == 0.0
    torch.manual_seed(0)
    plain = small_model()
    list(train(plain, *shapes, RECIPE.replace(epochs=epochs), preprocess=PREP, device="cpu"))
    assert weights_equal(resumed, plain)


def test_cli_time_budget_with_an_epoch_cap_records_its_plan(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "synthetic", "--out", str(out), "--time-budget", "60", "--epochs", "1",
                 "--batch-size", "64", "--max-images-per-class", "40", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["time_budget"]["epochs"] == results["recipe"]["epochs"] == 1
    assert "capped at 1 (epochs asked for)" in results["time_budget"]["reason"]
    assert f"1 epoch(s): {results['time_budget']['reason']}" in printed
    assert read_metadata(out / "model.safetensors")["time_budget"] == results["time_budget"]


def test_cli_refuses_a_budget_that_is_not_positive(tmp_path, capsys):
    assert main(["train", "--data", "synthetic", "--out", str(tmp_path / "run"), "--time-budget", "0"]) != 0
    assert "--time-budget must be a positive number of seconds, got 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
