"""Benchmarks that print figures and ratios measured in one run, on this machine.

    python benchmarks/bench.py                 # everything
    python benchmarks/bench.py rollout data    # some sections

Sections:
  inference  ViT-B/16 images/s at batch 1 and 16: vitdemo (eager and "packed"), timm, torchvision
             (same weights), and the achieved GFLOP/s next to the fp32 matmul peak: the fastest of
             the matrix-product kernels PyTorch reaches here, each timed on a square product
             and on ViT-B/16's own linear-layer shapes
  int8       the ONNX Runtime fp32 and int8 runtimes against PyTorch fp32: ViT-B/16 at batch 1, the
             shipped CIFAR-10 model at batch 1 and 64 (with top-1 agreement on the same inputs)
  train      training step of the CIFAR preset: vitdemo against timm
  rollout    one image's forward with attention maps + rollout, against a plain forward
  data       training images/s through the real data path (in-memory uint8, batch augmentation)
             against the same model on ready-made tensors
  app        median latency of the app's /classify endpoint for a 224 px upload (gradio_client)

Every comparison is interleaved (A, B, A, B, ...) and repeated; the median and the spread
(min-max) are printed. Machines are noisy: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import vitdemo  # noqa: E402
from vitdemo import explanations, runtime  # noqa: E402
from vitdemo.augment import BatchAugment  # noqa: E402
from vitdemo.data import iterate_batches, synthetic_shapes  # noqa: E402
from vitdemo.engine import RECIPES, make_optimizer  # noqa: E402

# Multiply-accumulates of one ViT-B/16 forward pass at 224 px (197 tokens): the patch projection, 12 x (qkv,
# q k^T, attention x v, proj, fc1, fc2) and the head; timm's model card gives 17.6 GMACs.
VIT_B16_GMACS = 17.58


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in turn `repeats` times."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def report(title: str, times: dict[str, list[float]], per_call: float, unit: str, baseline: str | None = None) -> None:
    print(f"\n{title}")
    base = statistics.median(times[baseline]) if baseline else None
    for name, ts in times.items():
        med = statistics.median(ts)
        rate = per_call / med
        spread = f"{per_call / max(ts):.1f}-{per_call / min(ts):.1f}"
        ratio = f"  {base / med:.2f}x {baseline}" if base and name != baseline else ""
        print(f"  {name:<28} {rate:8.1f} {unit}  (range {spread}){ratio}")


def forward_calls(models: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor) -> dict[str, Callable[[], None]]:
    """For `interleaved`: one inference-mode call of each model on `x`."""
    def call(model):
        def f():
            with torch.inference_mode():
                model(x)
        return f
    return {name: call(model) for name, model in models.items()}


def matmul_kernels(m: int, k: int, n: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Every fp32 kernel PyTorch reaches here for `x @ w.T` with x (m, k) and w (n, k): its default
    (`torch.matmul`, the BLAS it was built with: MKL on x86), oneDNN with the weight prepacked
    (what `vitdemo.runtime.pack` runs), and MKL's packed GEMM. Which is fastest depends on the
    CPU (MKL does not take its AVX-512 path on AMD processors), so a peak measured with one kernel
    only can be beaten by another: the peak is the fastest of them all."""
    x, w = torch.randn(m, k), torch.randn(n, k)
    kernels: dict[str, Callable[[], torch.Tensor]] = {"torch.matmul": lambda: torch.matmul(x, w.t())}
    if runtime.packing_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        kernels["oneDNN prepacked"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    if torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"):
        mkl_packed = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
        kernels["MKL packed"] = lambda: torch.ops.mkl._mkl_linear(x, mkl_packed, w, None, m)
    return kernels


def peak_shapes() -> list[tuple[int, int, int]]:
    """(m, k, n) of the products timed for the peak: a large square one, and ViT-B/16's qkv, fc1
    and fc2 at batch 1 and 16 (197 tokens per image), the shapes the benchmarked models run."""
    return [(2048, 2048, 2048)] + [(197 * b, k, n) for b in (1, 16) for k, n in ((768, 2304), (768, 3072), (3072, 768))]


@dataclass
class Peak:
    """The fastest fp32 matrix product measured: GFLOP/s, which kernel, at which (m, k, n)."""

    gflops: float
    kernel: str
    shape: tuple[int, int, int]

    def __str__(self) -> str:
        m, k, n = self.shape
        return f"{self.gflops:.0f} GFLOP/s, {self.kernel} at {m}x{k} @ {k}x{n}"

    def share(self, gflops: float) -> str:
        """`gflops` as a share of this peak, naming it; a figure at or above it is not printed as
        a share (it would mean the peak's measurement was slowed down by something else)."""
        if gflops >= self.gflops:
            return (f"at or above the fp32 matmul peak measured in this run ({self}): that measurement was "
                    f"disturbed (a busy machine?); run again")
        return f"{gflops / self.gflops:.0%} of the fp32 matmul peak measured in this run ({self})"


def matmul_peak(repeats: int = 5, shapes: list[tuple[int, int, int]] | None = None, verbose: bool = True) -> Peak:
    """The best GFLOP/s of any kernel of `matmul_kernels` at any of `shapes` (each timed as the
    fastest of `repeats` calls, kernels interleaved)."""
    best = Peak(0.0, "", (0, 0, 0))
    if verbose:
        print("\nfp32 matmul peak: GFLOP/s of each kernel (fastest of the calls)")
    for m, k, n in shapes or peak_shapes():
        times = interleaved(matmul_kernels(m, k, n), max(repeats, 3))
        rates = {name: 2 * m * k * n / min(ts) / 1e9 for name, ts in times.items()}
        if verbose:
            print(f"  {f'{m}x{k} @ {k}x{n}':<20}" + "".join(f"  {name} {rate:5.0f}" for name, rate in rates.items()))
        name = max(rates, key=rates.get)
        if rates[name] > best.gflops:
            best = Peak(rates[name], name, (m, k, n))
    return best


def section_inference(repeats: int) -> None:
    torch.manual_seed(0)
    ours = vitdemo.create_model("vit_b_16").eval()
    models = {"vitdemo": ours, "vitdemo packed": runtime.pack(ours)}
    try:
        import timm

        models["timm"] = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
        models["timm"].load_state_dict(ours.state_dict())
    except ImportError:
        print("timm not installed: skipped")
    try:
        import torchvision

        tv = torchvision.models.vit_b_16().eval()
        models["torchvision"] = tv
    except ImportError:
        print("torchvision not installed: skipped")
    peak = matmul_peak(repeats)
    print(f"  peak: {peak}")
    for batch in (1, 16):
        x = torch.randn(batch, 3, 224, 224)
        times = interleaved(forward_calls(models, x), repeats)
        report(f"ViT-B/16 inference, batch {batch} (fp32, {torch.get_num_threads()} threads)", times, batch,
               "img/s", baseline="timm" if "timm" in models else None)
        for name in ("vitdemo", "vitdemo packed"):
            best = batch / min(times[name])
            print(f"  {name} achieves {best * VIT_B16_GMACS * 2:.0f} GFLOP/s = {peak.share(best * VIT_B16_GMACS * 2)}")


def train_step(model: torch.nn.Module, batch: int = 128) -> Callable[[], None]:
    opt = make_optimizer(model, RECIPES["small-data"])
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def step():
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def section_train(repeats: int) -> None:
    cfg = vitdemo.get_config("vit_cifar_4")
    torch.manual_seed(0)
    fns = {"vitdemo": train_step(vitdemo.create_model("vit_cifar_4", num_classes=10).train())}
    try:
        import timm

        peer = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=4,
                                 embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                                 mlp_ratio=cfg.mlp_dim / cfg.embed_dim, num_classes=10).train()
        fns["timm"] = train_step(peer)
    except ImportError:
        print("timm not installed: skipped")
    report("Training step, vit_cifar_4, batch 128 (AdamW, synthetic tensors)", interleaved(fns, repeats), 128,
           "img/s", baseline="timm" if "timm" in fns else None)


def section_rollout(repeats: int) -> None:
    torch.manual_seed(0)
    model = vitdemo.create_model("vit_b_16").eval()
    x = torch.randn(1, 3, 224, 224)

    def plain():
        with torch.inference_mode():
            model(x)

    def with_rollout():
        with torch.inference_mode():
            _, attentions = model(x, return_attention=True)
            explanations.attention_rollout(attentions)

    report("ViT-B/16, one image: forward with attention maps and rollout", interleaved(
        {"plain forward": plain, "forward + attention + rollout": with_rollout}, repeats), 1, "img/s",
        baseline="plain forward")
    print("  (a ratio of 0.67x or more meets the goal: rollout costs at most 1.5x a plain forward)")


def section_data(repeats: int) -> None:
    torch.manual_seed(0)
    model = vitdemo.create_model("vit_cifar_4", num_classes=10).train()
    opt = make_optimizer(model, RECIPES["small-data"])
    data = synthetic_shapes(num_classes=8, per_class=128, image_size=32, seed=0)
    batch = 128
    for policy in (None, "randaugment"):
        augment = BatchAugment(32, (0.5,) * 3, (0.5,) * 3, policy=policy)
        ready = [(torch.randn(batch, 3, 32, 32), torch.randint(0, 8, (batch,))) for _ in range(8)]

        def step(x, y):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def real_path():
            gen = torch.Generator().manual_seed(0)
            for images, labels in iterate_batches(data, batch, shuffle=True, generator=gen):
                step(augment(images, generator=gen), labels)

        def tensors():
            for x, y in ready:
                step(x, y)

        times = interleaved({"synthetic tensors": tensors, "real data path": real_path}, repeats)
        name = "crop + flip + RandAugment" if policy else "crop + flip"
        report(f"Training vit_cifar_4 with data path ({name}), 8 batches of 128", times, 8 * batch, "img/s",
               baseline="synthetic tensors")
        cost = statistics.median(times["real data path"]) / statistics.median(times["synthetic tensors"]) - 1
        print(f"  the data path costs {cost:+.1%} (goal: under 10%)")


def section_app(repeats: int) -> None:
    """Latency of the app's /classify endpoint for a 224 px PNG upload, over loopback: through
    Gradio's HTTP API as any client (or the browser) uses it (upload, call, read the result
    stream), and through gradio_client, whose own polling adds tens of milliseconds."""
    import socket
    import tempfile

    import httpx
    from PIL import Image

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ["NO_PROXY"] = "localhost,127.0.0.1"
    from gradio_client import Client, handle_file

    from vitdemo.app import build_demo, launch_options
    from vitdemo.app.models import SHIPPED

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo = build_demo()
    demo.launch(**{**launch_options(), "server_name": "127.0.0.1", "server_port": port,
                   "prevent_thread_lock": True, "quiet": True})
    api = f"http://127.0.0.1:{port}/gradio_api"
    try:
        with tempfile.TemporaryDirectory() as tmp, httpx.Client(timeout=60) as http:
            path = Path(tmp) / "upload.png"
            gen = torch.Generator().manual_seed(0)
            pixels = torch.randint(0, 256, (224, 224, 3), dtype=torch.uint8, generator=gen).numpy()
            Image.fromarray(pixels).save(path)

            def over_http(runtime):
                def call():
                    with open(path, "rb") as f:
                        uploaded = http.post(f"{api}/upload", files={"files": ("upload.png", f, "image/png")}).json()[0]
                    image = {"path": uploaded, "meta": {"_type": "gradio.FileData"}}
                    # Over raw HTTP every input is sent (gradio_client fills in the defaults itself).
                    data = [image, SHIPPED, runtime]
                    event = http.post(f"{api}/call/classify", json={"data": data}).json()["event_id"]
                    with http.stream("GET", f"{api}/call/classify/{event}") as response:
                        lines = list(response.iter_lines())
                    if not any(line.startswith("event: complete") for line in lines):
                        raise RuntimeError(f"/classify failed: {lines}")
                return call

            client = Client(f"http://127.0.0.1:{port}/", analytics_enabled=False, verbose=False)

            def over_client():
                client.predict(handle_file(str(path)), SHIPPED, api_name="/classify")

            times = interleaved({"HTTP API, auto (int8)": over_http("auto"), "HTTP API, eager fp32": over_http("eager"),
                                 "gradio_client, auto": over_client}, repeats * 5, warmup=3)
    finally:
        demo.close()
    print(f"\nApp /classify, 224 px PNG upload, shipped model, {repeats * 5} requests each over loopback")
    for name, ts in times.items():
        ms = sorted(t * 1000 for t in ts)
        print(f"  {name:<22} median {statistics.median(ms):5.0f} ms, p95 {ms[int(0.95 * (len(ms) - 1))]:5.0f} ms"
              f"  (goal: median under 100 ms)")


def section_int8(repeats: int) -> None:
    torch.manual_seed(0)
    shipped = Path(__file__).resolve().parent.parent / "checkpoints" / "vit_cifar10"
    cases = [("ViT-B/16 (random weights)", vitdemo.create_model("vit_b_16").eval(), (1,))]
    if shipped.is_dir():
        cases.append(("shipped CIFAR-10 model", vitdemo.load_checkpoint(shipped)[0], (1, 64)))
    for title, model, batches in cases:
        runners = {"PyTorch fp32": model, "PyTorch packed": runtime.pack(model),
                   "ONNX Runtime fp32": runtime.prepare(model, "onnx"), "ONNX Runtime int8": runtime.prepare(model, "int8")}
        size = model.config.image_size
        for batch in batches:
            x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(batch))
            times = interleaved(forward_calls(runners, x), repeats)
            report(f"{title}, batch {batch}", times, batch, "img/s", baseline="PyTorch fp32")
            with torch.inference_mode():
                ref = model(x)
                for name in ("ONNX Runtime fp32", "ONNX Runtime int8"):
                    out = runners[name](x)
                    print(f"  {name}: max |logit difference| {(out - ref).abs().max().item():.1e}, "
                          f"top-1 agreement {(out.argmax(-1) == ref.argmax(-1)).float().mean().item():.1%}")


SECTIONS = {"inference": section_inference, "int8": section_int8, "train": section_train, "rollout": section_rollout, "data": section_data,
            "app": section_app}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", choices=[*SECTIONS, []], help="sections to run (default: all)")
    parser.add_argument("--repeats", type=int, default=7, help="measurements per implementation (default 7)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name in args.sections or SECTIONS:
        SECTIONS[name](args.repeats)


if __name__ == "__main__":
    main()
