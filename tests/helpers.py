"""Helpers shared by the tests (pytest puts this folder on sys.path: `from helpers import ...`)."""

import contextlib
import socket


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on (servers in tests bind
    127.0.0.1 only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STAND_IN_CLASSES = ["circle", "square", "triangle", "cross"]


def small_model(seed=0, **overrides):
    """A two-layer, 64-wide ViT for 32 px images and four classes, its weights drawn from `seed`."""
    import torch

    import vitdemo

    torch.manual_seed(seed)
    cfg = dict(num_classes=4, depth=2, embed_dim=64, num_heads=4, mlp_dim=128)
    cfg.update(overrides)
    return vitdemo.create_model("vit_cifar_4", **cfg)


def stand_in_app(mp, root):
    """Point the app (vitdemo.app) at a tiny stand-in 'shipped' model and at server folders under
    `root`, with an empty model cache; `mp` is a pytest MonkeyPatch. Returns the stand-in checkpoint's path."""
    import torch

    import vitdemo
    from vitdemo.data import Preprocessing
    from vitdemo.app import common, models, training
    from vitdemo.checkpoint import save_checkpoint

    # Its own seed: drawn from whatever state earlier tests left (a manual_seed(0) say), the stand-in
    # could equal a model the app draws from seed 0, and a test telling the two apart would fail.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(20201022)
        model = vitdemo.create_model("vit_cifar_4", num_classes=4, depth=2, embed_dim=64, num_heads=2, mlp_dim=128)
    checkpoint = save_checkpoint(root / "shipped" / "model.safetensors", model, STAND_IN_CLASSES,
                                 Preprocessing(32, (0.5,) * 3, (0.5,) * 3),
                                 metrics={"epoch": 3, "train_acc": 0.5, "val_acc": 0.4, "val_loss": 1.3})
    mp.setattr(models, "SHIPPED_CHECKPOINT", checkpoint)
    mp.setattr(common, "APP_DIR", root / "app")
    mp.setattr(training, "RUNS_ROOT", root / "app" / "runs")
    mp.setattr(models, "MODELS", models.ModelStore())
    mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    mp.setenv("NO_PROXY", "localhost,127.0.0.1")
    mp.setenv("no_proxy", "localhost,127.0.0.1")
    return checkpoint


def rss_bytes() -> int:
    """This process's resident set size, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@contextlib.contextmanager
def stand_in_environment(root):
    """`stand_in_app` for a module's tests, with torch on one thread (tiny models: one thread is
    faster, and much faster on a busy machine); yields the stand-in checkpoint's path."""
    import pytest
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            yield stand_in_app(mp, root)
    finally:
        torch.set_num_threads(threads)


def reference_probabilities(checkpoint, image) -> dict:
    """What a correct app answers for `image` with the model saved at `checkpoint`: the softmax of
    that model's logits (loaded afresh from the file, not from the app's cache) on the checkpoint's
    own preprocessing (`vitdemo.data.preprocess` with its image_size, mean, std, resize and
    interpolation), as {class name: probability}."""
    import torch

    import vitdemo
    from vitdemo.data import preprocess

    model, meta = vitdemo.load_checkpoint(checkpoint)
    x = preprocess(image, meta["image_size"], meta["mean"], meta["std"], resize=meta.get("resize"),
                   interpolation=meta.get("interpolation", "bicubic"))
    with torch.no_grad():
        probs = model.eval()(x).double().softmax(-1)[0]
    return dict(zip(meta["class_names"], probs.tolist()))


@contextlib.contextmanager
def others_running(model, images, threads: int = 2):
    """Other threads running `model` on `images` in a loop for as long as the block runs: the
    app's other users and tabs, which share one model object."""
    import threading

    import torch

    stop = threading.Event()

    def run():
        with torch.no_grad():
            while not stop.is_set():
                model(images)

    runners = [threading.Thread(target=run) for _ in range(threads)]
    for r in runners:
        r.start()
    try:
        yield
    finally:
        stop.set()
        for r in runners:
            r.join()
