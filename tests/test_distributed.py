"""Two CPU processes (gloo) train with DistributedDataParallel and end with identical weights, the
weights one process reaches with the same global batch on the same data; each rank draws its own
augmentation."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port
import torch
import torch.distributed as dist

import vitdemo
from vitdemo import engine
from vitdemo.checkpoint import load_checkpoint
from vitdemo.data import Preprocessing

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_torchrun_two_cpu_processes_end_identical(tmp_path):
    """`torchrun --nproc_per_node=2 -m vitdemo train` on the synthetic set: each rank saves its
    final weights, and the two must be equal (gradients were averaged) and trained (changed)."""
    out = tmp_path / "run"
    dump = tmp_path / "rank{rank}.pt"
    script = tmp_path / "dump_weights.py"
    # Run the real CLI, then have every rank write its own copy of the weights.
    script.write_text(
        "import os, sys, torch\n"
        "import vitdemo.cli as cli\n"
        "import vitdemo.cli.train as train_command\n"
        "import vitdemo.engine as engine\n"
        "orig = engine.train\n"
        "def spy(model, *a, **k):\n"
        "    yield from orig(model, *a, **k)\n"
        f"    torch.save(model.state_dict(), r'{dump}'.format(rank=os.environ['RANK']))\n"
        "train_command.engine_train = spy\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), "train", "--data", "synthetic", "--out", str(out),
           "--epochs", "1", "--batch-size", "32", "--set", "depth=1", "embed_dim=32", "num_heads=2", "mlp_dim=64",
           "--device", "cpu", "--log-every", "5"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    torch.manual_seed(0)
    initial = vitdemo.create_model("vit_cifar_4", num_classes=4, depth=1, embed_dim=32, num_heads=2, mlp_dim=64)
    assert not torch.equal(initial.state_dict()["blocks.0.attn.qkv.weight"], a["blocks.0.attn.qkv.weight"])
    model, meta = load_checkpoint(out)  # written once, by rank 0
    assert torch.equal(model.state_dict()["head.weight"], a["head.weight"])
    assert result.stdout.count("Epoch: 1 |") == 1  # rank-0 logging only


# The DDP run against one process. Each of 2 ranks takes every 2nd image of the same shuffled order
# in batches of LOCAL_BATCH, so together they see exactly the single run's batches of
# 2 * LOCAL_BATCH; DDP averages the gradients, so every step is the single run's step, up to
# float rounding (sums in another order). Two things would make the runs differ for reasons
# other than DDP, and are switched off:
# - augmentation: each rank draws crops and flips from a stream of its own (see the last test),
#   while the single run draws for a batch twice as long from one; the same images would get
#   other crops and flips;
# - dropout and stochastic depth (0 in this model), whose masks are each rank's own too.
# And the step runs in fp32: "auto" is bf16 on a CPU with AMX, whose rounding (about 1e-3 of the
# weights' change here) would hide a small difference in what the runs compute.
# SGD rather than AdamW, and no gradient clipping: Adam's update hardly depends on the gradient's
# scale, and clipping caps it, so a run that summed the ranks' gradients instead of averaging
# them could pass; with plain SGD and momentum it moves twice as far.
LOCAL_BATCH = 8
DDP_RECIPE = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.05, "epochs": 2, "warmup": 0.25,
              "label_smoothing": 0.1, "grad_clip": 0.0, "crop_padding": None, "flip": False}


def _tiny_run(batch_size):
    """(model, data, recipe, preprocessing) of the comparison, the same in every process."""
    data = vitdemo.data.synthetic_shapes(num_classes=4, per_class=16, image_size=32, seed=0)  # 64 images
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = vitdemo.create_model("vit_cifar_4", num_classes=4, depth=1, embed_dim=32, num_heads=2, mlp_dim=64)
    recipe = engine.Recipe(**DDP_RECIPE, batch_size=batch_size)
    return model, data, recipe, Preprocessing(32, (0.5,) * 3, (0.5,) * 3)


def _train(batch_size):
    model, data, recipe, prep = _tiny_run(batch_size)
    with torch.random.fork_rng(devices=[]):  # the engine seeds the global generator per epoch
        events = list(engine.train(model, data, None, recipe, preprocess=prep, seed=3, device="cpu", log_every=1,
                                   precision="fp32"))
    return model.state_dict(), [e for e in events if isinstance(e, engine.StepEvent)]


def _ddp_rank(rank, world, port, out):
    """One rank of the DDP run (torch.multiprocessing.spawn): train, then save the weights."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        weights, steps = _train(LOCAL_BATCH)
        torch.save({"weights": weights, "steps": [e.step for e in steps]}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_on_two_processes_equals_one_process_with_the_same_global_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, single_steps = _train(2 * LOCAL_BATCH)
        local_only, _ = _train(LOCAL_BATCH)  # one process with a rank's batch: not the same training
    finally:
        torch.set_num_threads(threads)
    initial = _tiny_run(LOCAL_BATCH)[0].state_dict()

    assert ranks[0]["steps"] == ranks[1]["steps"] == [e.step for e in single_steps] == list(range(1, 9))  # 4 a epoch
    for key in single:
        def named(message, key=key):
            return f"{key}: {message}"

        torch.testing.assert_close(ranks[0]["weights"][key], ranks[1]["weights"][key], atol=0, rtol=0, msg=named)
        torch.testing.assert_close(ranks[0]["weights"][key], single[key], atol=1e-6, rtol=0, msg=named)
    # The tolerance tells trainings apart: the weights moved far more than it, and training on the
    # local batch alone (what DDP without averaging would do per rank) ends far from the DDP run.
    def farthest(a, b):
        return max((a[k] - b[k]).abs().max().item() for k in single)

    assert farthest(single, initial) > 1e-2
    assert farthest(local_only, single) > 1e-3


# Augmentation per rank. Every image of the run is the same picture, so what a rank's model reads
# differs from the other rank's only by the augmentation drawn (which images a rank gets, the
# shared batch order, is invisible here; the test above checks it).
def _augmented_inputs(batch_size):
    """The batches the model read (augmented and normalised) in one epoch on 64 copies of an image."""
    model, data, _, prep = _tiny_run(batch_size)
    data = dataclasses.replace(data, images=data.images[:1].repeat(len(data), 1, 1, 1))
    recipe = engine.Recipe(**{**DDP_RECIPE, "crop_padding": 4, "flip": True, "epochs": 1}, policy="randaugment",
                           erasing=0.5, batch_size=batch_size)
    seen = []
    model.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    with torch.random.fork_rng(devices=[]):
        list(engine.train(model, data, None, recipe, preprocess=prep, seed=3, device="cpu", precision="fp32"))
    return seen


def _augmenting_rank(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_augmented_inputs(LOCAL_BATCH), os.path.join(out, f"inputs{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_each_rank_draws_its_own_augmentation_and_rank_0_that_of_one_process(tmp_path):
    """Seeded alike, the ranks would crop, flip, pick a policy and erase their i-th images alike:
    the same augmentation repeated on every rank's share of each global batch."""
    import torch.multiprocessing as mp

    mp.spawn(_augmenting_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"inputs{r}.pt", weights_only=True) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # 32 images a rank, batches of 8
    for step, (a, b) in enumerate(zip(*ranks)):
        differing = [i for i in range(LOCAL_BATCH) if not torch.equal(a[i], b[i])]
        assert len(differing) >= LOCAL_BATCH // 2, f"step {step}: only images {differing} differ"
    # Rank 0 draws what one process draws (for the same number of images): single-process runs
    # are unchanged by the rank's part in the seeds.
    single = _augmented_inputs(LOCAL_BATCH)
    for a, b in zip(ranks[0], single):
        assert torch.equal(a, b)
