"""On a hosted Space the paper's model leads: an app that finds timm's ViT-B/16 in the hub's local
cache (where README's `preload_from_hub` puts it) opens with it, reads it without any network,
and classifies with ImageNet's classes; without it, the shipped CIFAR-10 model leads. Offline
failures are said in plain words, and only a download's failures are reported as one.

The cache entry is written here in the hub's own layout, with random weights of timm's layout."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import urllib.error

import gradio as gr
import huggingface_hub.constants
import pytest
import torch
from helpers import stand_in_environment
from PIL import Image
from safetensors.torch import save_file

import vitdemo.app
from vitdemo import pretrained
from vitdemo.app import classify_tab, common, examples, models

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module", autouse=True)
def app_env(tmp_path_factory):
    with stand_in_environment(tmp_path_factory.mktemp("hosted")) as checkpoint:
        yield checkpoint


@pytest.fixture(scope="module")
def timm_state():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in timm.create_model("vit_base_patch16_224", pretrained=False).state_dict().items()}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache, offline: `HF_HUB_OFFLINE=1` and no way out."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(models, "MODELS", models.ModelStore())
    return cache


def preload(cache, state) -> None:
    """What the Space's build does: the file in `models--timm--<name>/snapshots/<commit>/`, `refs/main`."""
    repo = cache / ("models--" + pretrained.TIMM_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / pretrained.TIMM_FILE))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


@pytest.mark.slow
def test_preloaded_weights_make_the_papers_model_the_default(hub_cache, timm_state):
    assert models.default_model() == models.SHIPPED and pretrained.cached_timm_weights() is None
    preload(hub_cache, timm_state)
    assert pretrained.cached_timm_weights() is not None
    assert models.default_model() == models.PRETRAINED
    picked = models.entry(models.PRETRAINED)  # offline: read from the cache
    ours = picked.model.state_dict()
    torch.testing.assert_close(ours["blocks.3.attn.qkv.weight"], timm_state["blocks.3.attn.qkv.weight"])
    torch.testing.assert_close(ours["head.weight"], timm_state["head.weight"])
    assert picked.meta["resize"] == 248 and picked.meta["interpolation"] == "bicubic"
    photo = Image.open(examples.draw_examples(common.APP_DIR / "examples")[0])
    labels, _ = classify_tab.classify(photo, models.PRETRAINED, "eager")
    assert set(labels) <= set(pretrained.imagenet_class_names()) and len(labels) == 10
    assert "read from this server's hub cache" in models.model_card(models.PRETRAINED)
    # The page opens on it.
    demo = vitdemo.app.build_demo()
    picker = next(b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.label == "Model")
    assert picker.value == models.PRETRAINED
    demo.close()


def test_without_the_weights_the_shipped_model_leads_and_offline_is_said_plainly(hub_cache):
    assert models.default_model() == models.SHIPPED
    with pytest.raises(common.ModelUnavailable) as err:
        models.entry(models.PRETRAINED)
    message = str(err.value)
    assert "not available here" in message and "Pick the shipped CIFAR-10 ViT" in message
    assert "no internet connection" in message
    assert "Error" not in message and "<" not in message  # no exception names, no "<urlopen error ...>"
    assert models.default_model() == models.SHIPPED  # a remembered failure keeps it so


@pytest.mark.parametrize("raised, words", [
    (urllib.error.URLError(OSError(-2, "Name or service not known")), "no internet connection (Name or service not known)"),
    (PermissionError(13, "Permission denied", "/root/.cache/x"), "the download cache cannot be written"),
    (OSError("huggingface.co is not reachable: timed out"), "no internet connection"),
])
def test_a_downloads_failures_are_reported_in_words(monkeypatch, raised, words):
    def fetch():
        raise raised

    monkeypatch.setitem(pretrained.FETCHERS, "timm", fetch)
    with pytest.raises(pretrained.PretrainedUnavailable) as err:
        pretrained.load_pretrained("timm")
    assert words in str(err.value) and words in err.value.reason


@pytest.mark.parametrize("bug", [TypeError("a bug"), MemoryError(), KeyError("state")])
def test_anything_else_surfaces_as_itself(monkeypatch, bug):
    def fetch():
        raise bug

    monkeypatch.setitem(pretrained.FETCHERS, "timm", fetch)
    with pytest.raises(type(bug)):
        pretrained.load_pretrained("timm")
