"""The app's answers while it trains, measured through its HTTP API as a browser meets them.

    python benchmarks/serving.py                  # with the training thread's priority as shipped, then at nice 0
    python benchmarks/serving.py --requests 40

The app is launched here with the shipped model; one client classifies an image again and again
(one request at a time, as one user clicking), first while nothing trains, then while the Train
tab's default run trains (started through the API, as the Start button does). Then Stop, as the
page sends it: the Stop button's own answer ("Stopping...", outside the queue), the cancel of the
run, and the time until the stopped run is saved. All of it twice in the same run: with the
training thread at `training.TRAINING_NICE` and at nice 0, so the ratio shows what the lower
priority buys. Goals: Stop answered within 1 s; a classification while training within a few
times its idle latency.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_PROXY", "localhost,127.0.0.1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from vitdemo.app import build_demo, examples, launch_options, models, train_tab, training  # noqa: E402


def cpu_flags() -> str:
    """The lscpu flags that decide this machine's kind (AVX-512 and bf16, or AVX2 only)."""
    try:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "lscpu not available"
    line = next((x for x in flags.splitlines() if x.startswith("Flags:")), "")
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return ", ".join(f for f in wanted if f" {f}" in line) or "none of avx2/avx512f/avx512_bf16/amx_bf16"


def latencies(client, image, count: int) -> list[float]:
    seconds = []
    for _ in range(count):
        start = time.perf_counter()
        client.predict(image, api_name="/classify")
        seconds.append(time.perf_counter() - start)
    return seconds


def summary(seconds: list[float]) -> str:
    ms = sorted(1000 * s for s in seconds)
    p95 = statistics.quantiles(ms, n=20, method="inclusive")[18] if len(ms) > 1 else ms[0]
    return f"p50 {statistics.median(ms):7.1f} ms, p95 {p95:7.1f} ms, max {ms[-1]:7.1f} ms"


def measure(url: str, image, requests: int, nice: int) -> dict[str, float]:
    from gradio_client import Client

    training.TRAINING_NICE = nice
    downloads = tempfile.mkdtemp(prefix="vitdemo-bench-")
    user = Client(url, analytics_enabled=False, verbose=False, download_files=downloads)
    trainer = Client(url, analytics_enabled=False, verbose=False, download_files=downloads)
    idle = latencies(user, image, requests)
    d = train_tab.DEFAULTS[training.SRC_SYNTHETIC]
    job = trainer.submit(training.SRC_SYNTHETIC, None, d["per_class"], d["patch"], d["depth"], d["width"],
                         d["epochs"], d["lr"], d["batch"], False, False, models.SHIPPED, api_name="/train")
    deadline = time.monotonic() + 300
    while not any(r.steps > 0 for runs in train_tab._ACTIVE.values() for r in runs if not r.finished.is_set()):
        if job.done() or time.monotonic() > deadline:
            raise SystemExit(f"the training run did not start: {job.exception()}")
        time.sleep(0.05)
    (run,) = [r for runs in train_tab._ACTIVE.values() for r in runs if not r.finished.is_set()]
    busy = latencies(user, image, requests)
    steps = run.steps
    start = time.perf_counter()
    trainer.predict(api_name="/stop")  # the Stop button's own event, outside the queue (as the page sends it)
    stop_answer = time.perf_counter() - start
    start = time.perf_counter()
    job.cancel()  # what the page does for the events the Stop button cancels
    cancel = time.perf_counter() - start
    run.finished.wait(120)
    saved = time.perf_counter() - start
    return {"idle": idle, "busy": busy, "stop": stop_answer, "cancel": cancel, "saved": saved, "steps": steps,
            "message": run.message}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20, help="classifications per phase (default 20)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"lscpu flags: {cpu_flags()}")
    with socket.socket() as s:  # a free port on the loopback interface
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_demo()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                            **launch_options())
    try:
        from gradio_client import handle_file

        image = handle_file(str(examples.draw_examples(Path(tempfile.mkdtemp(prefix="vitdemo-bench-")))[0]))
        shipped = training.TRAINING_NICE
        results = {nice: measure(url, image, args.requests, nice) for nice in (shipped, 0)}
    finally:
        demo.close()
    for nice, r in results.items():
        ratio = statistics.median(r["busy"]) / statistics.median(r["idle"])
        print(f"\n## training thread at nice {nice}" + (" (as shipped)" if nice == shipped else ""))
        print(f"classify, nothing training:   {summary(r['idle'])}")
        print(f"classify, while training:     {summary(r['busy'])}   ({ratio:.2f}x the idle p50)")
        print(f"Stop answered ('Stopping...'): {1000 * r['stop']:7.1f} ms (goal: within 1000 ms)")
        print(f"cancel answered:              {1000 * r['cancel']:7.1f} ms; run saved {r['saved']:.1f} s after "
              f"the cancel, at step {r['steps']}+")
        print(f"status: {r['message']}")
    a, b = (statistics.median(results[n]["busy"]) for n in (shipped, 0))
    if shipped != 0:
        print(f"\nclassify p50 while training, nice {shipped} / nice 0: {a / b:.2f}")


if __name__ == "__main__":
    main()
