"""Where and in what arithmetic training runs: the device, the precision of the step, and the
processes of a distributed run."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..cpu_linear import bf16_pays

PRECISIONS = ("auto", "fp32", "bf16")


def select_device(name: str | None = None) -> torch.device:
    """`name` if given, else the best available: CUDA, then Apple's MPS, then the CPU."""
    if name and name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """The arithmetic of the training step: "auto" is bf16 autocast on a GPU and on a CPU with AMX
    matrix units (`vitdemo.cpu_linear.bf16_pays`), fp32 elsewhere (a CPU without native bf16
    emulates it, several times slower)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and bf16_pays()) else "fp32"


def autocast(device: torch.device, precision: str | None = None):
    """The context of a forward pass: bf16 autocast for the "bf16" step. Evaluation (precision
    None) uses bf16 on GPUs only, so CPU figures stay fp32 wherever they run."""
    bf16 = precision == "bf16" if precision is not None else device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes: (0, 1) outside `torch.distributed`."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum metric counters over all processes (a no-op on one)."""
    if rank_and_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
