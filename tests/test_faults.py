"""Faults: a checkpoint writer killed with SIGKILL at any moment, and training stopped (or its
generator closed) at any step. What is on disk afterwards is always one complete checkpoint, of
the last completed epoch, and resuming from it lands exactly on the uninterrupted run."""

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import vitdemo
from vitdemo.data import Preprocessing
from vitdemo.checkpoint import WEIGHTS_NAME, load_checkpoint
from vitdemo.data import stratified_split, synthetic_shapes
from vitdemo.engine import RECIPES, STATE_NAME, DoneEvent, EpochEvent, StepEvent, TrainingError, train

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# A checkpoint writer killed with SIGKILL
# ---------------------------------------------------------------------------------------------

# About 2.1 M parameters (8.6 MB per write, plus fsync): a write takes long enough that random
# kill moments land inside one as well as between two.
WRITER_MODEL = {"num_classes": 4, "depth": 4, "embed_dim": 256, "num_heads": 4, "mlp_dim": 512}
WRITER_CLASSES = ["a", "b", "c", "d"]

# Saves version base, base + 1, ... of the same model (the head's bias set to the version, the
# version in the metadata too) to one path, forever, printing "saved N" after each save returns.
# With "pause", every save after the first writes half the file, says so and waits to be killed.
WRITER = textwrap.dedent("""
    import sys, time
    import torch
    import vitdemo
    import vitdemo.checkpoint as ckpt

    path, base, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = vitdemo.create_model("vit_cifar_4", **{model})
    prep = vitdemo.data.Preprocessing(32, (0.5,) * 3, (0.5,) * 3)
    real_save_file = ckpt.save_file

    def half_then_wait(tensors, tmp, metadata=None):
        real_save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            data = f.read()
        with open(tmp, "wb") as f:
            f.write(data[: len(data) // 2])
        print("mid-write", tmp, flush=True)
        time.sleep(600)

    version = base
    while True:
        with torch.no_grad():
            model.head.bias.fill_(version)
        print("start", version, flush=True)
        ckpt.save_checkpoint(path, model, {classes}, prep, metrics={{"version": version}})
        print("saved", version, flush=True)
        if mode == "pause":
            ckpt.save_file = half_then_wait
        version += 1
""").format(model=WRITER_MODEL, classes=WRITER_CLASSES)

# Temporary files a kill can leave: atomic_write's (mkstemp, ".model.safetensors.XXXXXXXX.tmp") and
# safetensors' own (save_file writes ".tmpXXXXXX" next to its target, then renames it).
TEMP_NAME = re.compile(r"^(\.model\.safetensors\..+\.tmp|\.tmp\w{6})$")


def _expected_writer_state(version: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = vitdemo.create_model("vit_cifar_4", **WRITER_MODEL)
    with torch.no_grad():
        model.head.bias.fill_(version)
    return model.state_dict()


def _run_writer_and_kill(path: Path, base: int, mode: str, delay: float) -> tuple[list[str], int]:
    """Start the writer, wait for its first complete save (and, in "pause" mode, for it to be
    half-way through the next), sleep `delay`, SIGKILL it. Returns its output lines and the
    kill's return code."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(base), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    lines: list[str] = []
    ready = threading.Event()
    wanted = "mid-write" if mode == "pause" else f"saved {base}"

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith(wanted):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not ready.wait(180):
            raise AssertionError(f"the writer never got going: {lines} {proc.stderr.read() if proc.poll() is not None else ''}")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        returncode = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
    reader.join(60)
    proc.stderr.close()
    return lines, returncode


@pytest.mark.slow
def test_checkpoint_writer_killed_at_random_moments_leaves_a_complete_checkpoint(tmp_path):
    folder = tmp_path / "run"
    path = folder / WEIGHTS_NAME
    rng = random.Random(20240607)
    # Random moments (between two writes or inside one, by chance), then two that are certainly
    # mid-write: half the temporary file written when the kill comes.
    rounds = [("loop", rng.uniform(0.0, 0.6)) for _ in range(5)] + [("pause", 0.0), ("pause", 0.2)]
    saves, leftovers = [], []
    for number, (mode, delay) in enumerate(rounds):
        base = 1000 * (number + 1)
        lines, returncode = _run_writer_and_kill(path, base, mode, delay)
        assert returncode == -signal.SIGKILL
        saved = [int(line.split()[1]) for line in lines if line.startswith("saved ")]
        assert saved and saved[0] == base

        # Whatever the moment, the path holds one complete version: the last one reported saved,
        # or the one after it (renamed into place just before the kill, not yet reported).
        model, meta = load_checkpoint(folder)  # by folder: as the app and the CLI open runs
        version = meta["metrics"]["version"]
        assert version in (saved[-1], saved[-1] + 1), (version, saved[-1])
        if mode == "pause":
            assert version == saved[-1] == base  # the half-written version never replaced it
        expected = _expected_writer_state(version)
        state = model.state_dict()
        assert state.keys() == expected.keys()
        for key in expected:
            assert torch.equal(state[key], expected[key]), key  # weights of that very version
        assert meta["class_names"] == WRITER_CLASSES

        # SIGKILL gives atomic_write no chance to delete its temporary file: one may be left
        # behind (it always is when killed mid-write). Temporary files have hidden names of their
        # own, so nothing that opens the run (by folder or by file) takes one for the checkpoint.
        others = sorted(p.name for p in folder.iterdir() if p.name != WEIGHTS_NAME)
        assert all(TEMP_NAME.match(name) for name in others), others
        if mode == "pause":
            half = [line.split(maxsplit=1)[1] for line in lines if line.startswith("mid-write")]
            assert len(half) == 1 and Path(half[0]).name in others
            assert Path(half[0]).stat().st_size < path.stat().st_size
        saves.append(len(saved))
        leftovers.append(len(others))
    print(f"\nkilled writer: {len(rounds)} rounds, saves per round {saves}, temporary files left (cumulative) "
          f"{leftovers}")


# ---------------------------------------------------------------------------------------------
# Training stopped at any step
# ---------------------------------------------------------------------------------------------

PREP = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
RECIPE = RECIPES["small-data"].replace(epochs=3, batch_size=32)
STEPS_PER_EPOCH = 4  # 128 training images in batches of 32
TOTAL = 3 * STEPS_PER_EPOCH


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return vitdemo.create_model("vit_cifar_4", num_classes=4, depth=1, embed_dim=32, num_heads=2, mlp_dim=64)


@pytest.fixture(scope="module")
def data():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same threads for the reference and every run: the same numbers
    shapes = synthetic_shapes(num_classes=4, per_class=40, image_size=32, seed=0)
    tr, va = stratified_split(shapes.labels, 0.2, seed=0)
    yield shapes.subset(tr), shapes.subset(va)
    torch.set_num_threads(threads)


def events_of(model, data, out_dir=None, **kwargs):
    return train(model, data[0], data[1], RECIPE, preprocess=PREP, device="cpu", out_dir=out_dir, log_every=1,
                 **kwargs)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(data):
    """The uninterrupted run: the weights after every step (0: the initial ones) and its history."""
    assert len(data[0]) == STEPS_PER_EPOCH * RECIPE.batch_size
    model = tiny_model()
    steps = {0: snapshot(model)}
    history = None
    for event in events_of(model, data):
        if isinstance(event, StepEvent):
            steps[event.step] = snapshot(model)
        elif isinstance(event, DoneEvent):
            history = event.history
    assert sorted(steps) == list(range(TOTAL + 1))
    return steps, history


def assert_same_weights(state, expected):
    assert state.keys() == expected.keys()
    for key in expected:
        assert torch.equal(state[key], expected[key]), key


def assert_disk_holds_epoch(out_dir: Path, epochs: int, reference, data) -> None:
    """The run folder holds the checkpoint of epoch `epochs` (weights equal to the uninterrupted
    run's at that point, the state file agreeing), or nothing at all when no epoch was completed."""
    if epochs == 0:
        assert not (out_dir / WEIGHTS_NAME).exists() and not (out_dir / STATE_NAME).exists()
        with pytest.raises(TrainingError, match="cannot resume"):
            list(events_of(tiny_model(), data, out_dir, resume=True))
        return
    model, meta = load_checkpoint(out_dir)
    assert meta["metrics"]["epoch"] == epochs
    assert_same_weights(model.state_dict(), reference[0][epochs * STEPS_PER_EPOCH])
    state = torch.load(out_dir / STATE_NAME, weights_only=True)
    assert (state["epoch"], state["step"]) == (epochs, epochs * STEPS_PER_EPOCH)
    assert_same_weights(state["model"], reference[0][epochs * STEPS_PER_EPOCH])
    assert {p.name for p in out_dir.iterdir()} == {WEIGHTS_NAME, STATE_NAME}  # no temporary file left


def resume_to_the_end(out_dir: Path, data, reference) -> None:
    """Resuming (into a model with other weights) finishes exactly as the uninterrupted run."""
    model = tiny_model(seed=99)
    events = list(events_of(model, data, out_dir, resume=True))
    done = events[-1]
    assert isinstance(done, DoneEvent) and not done.stopped
    assert_same_weights(snapshot(model), reference[0][TOTAL])
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert done.history[key] == pytest.approx(reference[1][key], rel=1e-6, abs=1e-9), key
    assert_disk_holds_epoch(out_dir, RECIPE.epochs, reference, data)


# k steps done, then should_stop() says stop: before the first step, inside epoch 1, right after
# epoch 1's checkpoint, one step into epoch 2, right after epoch 2's, one step before the end,
# and never (the run completes).
@pytest.mark.parametrize("k", [0, 2, 3, 4, 5, 8, 11, 12])
def test_should_stop_after_any_step(data, reference, tmp_path, k):
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > k

    model = tiny_model()
    events = list(events_of(model, data, tmp_path, should_stop=should_stop))
    done = events[-1]
    epochs = k // STEPS_PER_EPOCH
    assert isinstance(done, DoneEvent)
    assert done.stopped == (k < TOTAL)
    assert [e.epoch for e in events if isinstance(e, EpochEvent)] == list(range(1, epochs + 1))
    assert [e.step for e in events if isinstance(e, StepEvent)] == list(range(1, k + 1))
    assert len(done.history["train_loss"]) == epochs
    # In memory: the weights after the last completed step. On disk: the last completed epoch.
    assert_same_weights(snapshot(model), reference[0][k])
    assert done.checkpoint == (tmp_path / WEIGHTS_NAME if epochs else None)
    assert_disk_holds_epoch(tmp_path, epochs, reference, data)
    if epochs:
        resume_to_the_end(tmp_path, data, reference)


# The generator closed (the app's Stop) after the event of step s: mid-epoch, after the last step
# of an epoch but before its checkpoint (the StepEvent comes first), and one step later.
@pytest.mark.parametrize("s", [1, 2, STEPS_PER_EPOCH, STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH])
def test_closing_the_generator_after_any_step(data, reference, tmp_path, s):
    model = tiny_model()
    gen = events_of(model, data, tmp_path)
    seen = []
    for event in gen:
        seen.append(event)
        if isinstance(event, StepEvent) and event.step == s:
            break
    gen.close()
    assert_same_weights(snapshot(model), reference[0][s])
    epochs = (s - 1) // STEPS_PER_EPOCH  # the epoch of step s is not saved: its checkpoint comes after
    assert len([e for e in seen if isinstance(e, EpochEvent)]) == epochs
    assert_disk_holds_epoch(tmp_path, epochs, reference, data)
    with pytest.raises(StopIteration):
        next(gen)  # closed for good
    if epochs:
        resume_to_the_end(tmp_path, data, reference)


def test_stopped_resumed_and_stopped_again_still_ends_on_the_same_curve(data, reference, tmp_path):
    def stop_after(k):
        calls = []
        return lambda: calls.append(1) or len(calls) > k

    list(events_of(tiny_model(), data, tmp_path, should_stop=stop_after(5)))  # epoch 1 saved, 1 step more
    assert_disk_holds_epoch(tmp_path, 1, reference, data)
    model = tiny_model(seed=7)
    events = list(events_of(model, data, tmp_path, resume=True, should_stop=stop_after(2)))
    assert events[-1].stopped and not any(isinstance(e, EpochEvent) for e in events)
    assert_same_weights(snapshot(model), reference[0][STEPS_PER_EPOCH + 2])  # resumed at step 4, 2 more
    assert events[-1].checkpoint == tmp_path / WEIGHTS_NAME  # epoch 1's, from the first run
    assert_disk_holds_epoch(tmp_path, 1, reference, data)
    resume_to_the_end(tmp_path, data, reference)
