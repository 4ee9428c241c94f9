"""The benchmark's fp32 matmul peak: an upper bound built from every kernel PyTorch reaches, and
"% of peak" figures that name the peak and never read 100% or more. Tiny shapes: no timing is
asserted, only what is measured and how it is reported."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from vitdemo import runtime

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench", None)


def test_every_kernel_computes_the_product_it_is_timed_for(bench):
    torch.manual_seed(0)
    m, k, n = 5, 24, 7
    kernels = bench.matmul_kernels(m, k, n)
    if runtime.packing_available():  # what the "packed" runtime runs: it must be in the peak
        assert "oneDNN prepacked" in kernels
    if torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"):
        assert "MKL packed" in kernels
    reference = kernels["torch.matmul"]()
    assert reference.shape == (m, n)
    for name, kernel in kernels.items():
        torch.testing.assert_close(kernel(), reference, rtol=1e-5, atol=1e-5, msg=name)


def test_peak_shapes_include_the_benchmarked_models_linear_layers(bench):
    shapes = bench.peak_shapes()
    for batch in (1, 16):
        for k, n in ((768, 2304), (768, 3072), (3072, 768)):  # ViT-B/16's qkv, fc1, fc2
            assert (197 * batch, k, n) in shapes


def test_peak_is_the_fastest_kernel_and_shape(bench, monkeypatch):
    """With timings that give known GFLOP/s, the peak is the best kernel at its best shape."""
    rates = {(8, 8, 8): {"torch.matmul": 1.0, "oneDNN prepacked": 3.0},
             (16, 8, 8): {"torch.matmul": 2.0, "oneDNN prepacked": 1.5}}
    timing = []

    def kernels(m, k, n):
        timing.append((m, k, n))
        return dict.fromkeys(rates[(m, k, n)])

    def interleaved(fns, repeats):  # seconds per call that give the rates above
        m, k, n = timing[-1]
        return {name: [2 * m * k * n / 1e9 / rates[(m, k, n)][name]] * repeats for name in fns}

    monkeypatch.setattr(bench, "matmul_kernels", kernels)
    monkeypatch.setattr(bench, "interleaved", interleaved)
    peak = bench.matmul_peak(repeats=1, shapes=list(rates), verbose=False)
    assert timing == list(rates)
    assert peak.kernel == "oneDNN prepacked" and peak.shape == (8, 8, 8) and peak.gflops == pytest.approx(3.0)


def test_share_of_peak_names_the_peak_and_stays_below_100_percent(bench):
    peak = bench.Peak(400.0, "oneDNN prepacked", (197, 768, 3072))
    line = peak.share(300.0)
    assert line.startswith("75% of the fp32 matmul peak")
    assert "400 GFLOP/s, oneDNN prepacked at 197x768 @ 768x3072" in line
    for above in (400.0, 436.0):  # a peak that is beaten was measured wrong: no figure of 100% or more
        line = peak.share(above)
        assert "%" not in line and "disturbed" in line and "run again" in line
