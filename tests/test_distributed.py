"""Two CPU processes (gloo) train with DistributedDataParallel and end with identical weights."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port
import torch

import vitdemo
from vitdemo.checkpoint import load_checkpoint

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
        "import vitdemo.engine as engine\n"
        "orig = engine.train\n"
        "def spy(model, *a, **k):\n"
        "    yield from orig(model, *a, **k)\n"
        f"    torch.save(model.state_dict(), r'{dump}'.format(rank=os.environ['RANK']))\n"
        "cli.train = spy\n"
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
