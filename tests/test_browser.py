"""End to end in a real headless Chromium: what a person sees and clicks.

Needs Debian's chromium (`apt-get install -y chromium`; `.ci/run` installs it) and the playwright
package (requirements-dev.txt); playwright cannot download its own browsers here. Screenshots
go to test-artifacts/ (the current ones are copied to docs/ for the README).
"""

import os
import re
import shutil
from pathlib import Path

import pytest
from helpers import free_port
from PIL import Image, ImageDraw

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]



@pytest.fixture(scope="module")
def app_url():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ["NO_PROXY"] = "localhost,127.0.0.1"
    from vitdemo.app import build_demo, launch_options

    demo = build_demo()
    port = free_port()
    options = {**launch_options(), "server_name": "127.0.0.1", "server_port": port, "prevent_thread_lock": True}
    demo.launch(**options)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture()
def page(browser, app_url):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(app_url)
    page.get_by_role("tab", name="Classify").wait_for()
    yield page
    context.close()


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    """A drawn ship on water, made here (never a CIFAR image)."""
    path = tmp_path_factory.mktemp("img") / "ship.png"
    img = Image.new("RGB", (224, 224), (120, 170, 230))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 140, 224, 224), fill=(20, 60, 140))
    draw.polygon([(40, 130), (190, 130), (165, 160), (65, 160)], fill=(90, 90, 90))
    draw.rectangle((100, 90, 130, 130), fill=(230, 230, 230))
    img.save(path)
    return path


def load_all_pictures(page) -> None:
    """Gradio's images load lazily, when scrolled near: load those far below the window too (at
    400 px, most of a tab), which the user would see by scrolling."""
    page.evaluate("document.querySelectorAll('img[loading=lazy]').forEach(i => { i.loading = 'eager'; })")
    page.wait_for_function("[...document.images].every(i => i.complete)")


def shot(page, name: str) -> None:
    """A full-page screenshot, every picture loaded."""
    ARTIFACTS.mkdir(exist_ok=True)
    load_all_pictures(page)
    page.mouse.move(0, 0)  # off the last button clicked, which would be drawn in its hover colour
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def upload(page, picture: Path) -> None:
    page.locator("input[type=file]").first.set_input_files(str(picture))


def visible_tab(page):
    return page.locator("[role=tabpanel]:visible").first


def settled(page, images: int = 1) -> None:
    """Wait until the visible tab shows at least `images` loaded pictures and Gradio's progress
    overlays are gone from it (its events have finished). A pending output is drawn faded under
    its status overlay (`.wrap.default` or `.wrap.center` without `hide`) even before any progress
    text shows, so the overlays must also have faded out to opacity 0."""
    page.wait_for_function(
        """(n) => {
            const panel = [...document.querySelectorAll('[role=tabpanel]')].find(p => p.offsetParent !== null);
            if (!panel) return false;
            const loaded = [...panel.querySelectorAll('img')].filter(i => i.complete && i.naturalWidth > 0);
            const busy = [...panel.querySelectorAll('.eta-bar, .progress-text')].some(e => e.offsetParent !== null);
            const faded = [...panel.querySelectorAll('.wrap.default, .wrap.center')]
                .some(w => w.offsetParent !== null && getComputedStyle(w).opacity !== '0');
            return loaded.length >= n && !busy && !faded;
        }""", arg=images, timeout=120_000)
    page.wait_for_timeout(500)


def open_tab(page, name: str):
    """Click a tab. Returns the tab's panel."""
    page.get_by_role("tab", name=name).click()
    return visible_tab(page)


def drawn_series(page, plot_title: str) -> dict[str, int]:
    """The series a visible line plot draws, with the points of each: its legend's labels, and
    for each the number of points of its line mark (Vega's SVG), read from the browser's DOM."""
    return page.evaluate(
        """(title) => {
            const plots = [...document.querySelectorAll('[role=tabpanel] .vega-embed')].filter(
                p => p.offsetParent !== null && p.querySelector(`[aria-label="Title text '${title}'"]`));
            if (plots.length !== 1) return {error: plots.length};
            const svg = plots[0];
            const legend = [...svg.querySelectorAll('.role-legend-label text')].map(t => t.textContent);
            const out = {};
            for (const name of legend) {
                const points = [...svg.querySelectorAll('[aria-label]')].filter(
                    e => (e.getAttribute('aria-label') || '').endsWith(`series: ${name}`));
                const lines = [...svg.querySelectorAll('.mark-line path')].filter(
                    p => (p.getAttribute('d') || '').length > 0);
                out[name] = points.length;
                out['lines'] = lines.length;
            }
            return out;
        }""", plot_title)


# One of the classes, or, for an image unlike the training data, that it is probably none of them.
ANSWER = r"^(airplane|automobile|bird|cat|deer|dog|frog|horse|ship|truck|⚠️ Probably none of its 10 classes)$"


def test_classify_an_uploaded_image(page, picture):
    upload(page, picture)
    label = page.get_by_test_id("label-output-value")
    label.wait_for()  # classified as soon as the image arrives
    assert re.search(ANSWER, label.inner_text())
    page.get_by_role("button", name="Classify").click()
    page.get_by_text(re.compile(r"\d+(\.\d+)? ms")).first.wait_for()
    settled(page, 0)  # the note above came with the upload: wait until this click's answer is drawn, not faded
    assert re.search(ANSWER, label.inner_text())
    shot(page, "classify")


def test_one_upload_shows_in_every_tab(page, picture):
    upload(page, picture)
    page.get_by_test_id("label-output-value").wait_for()
    panel = open_tab(page, "Patches")
    panel.get_by_text(re.compile(r"patches of \d+x\d+")).first.wait_for()
    settled(page, 2)
    assert panel.locator("img").count() >= 2
    shot(page, "patches")

    panel = open_tab(page, "Position embeddings")
    panel.locator("img").first.wait_for()
    settled(page)
    shot(page, "position_embeddings")

    panel = open_tab(page, "Attention")
    panel.get_by_text(re.compile(r"Predicted .* over \d+ layers")).first.wait_for()
    settled(page)
    assert panel.get_by_alt_text(re.compile("explanation map")).count() >= 1
    shot(page, "attention")

    panel = open_tab(page, "About")
    panel.get_by_text("The Vision Transformer").first.wait_for()
    assert panel.locator(".katex").count() >= 4  # the equations are typeset
    shot(page, "about")


def shown_top5(panel) -> dict[str, float]:
    """A Label's classes and probabilities as the page draws them (its bars' values)."""
    return panel.locator("[data-testid=label] meter").evaluate_all(
        "ms => Object.fromEntries(ms.map(m => [m.getAttribute('aria-label'), Number(m.value)]))")


def test_inside_the_model_follows_a_clicked_patch_through_a_layer_to_the_classify_answer(page, picture):
    upload(page, picture)
    page.get_by_test_id("label-output-value").wait_for()
    page.wait_for_timeout(500)
    ranked = shown_top5(visible_tab(page))  # the Classify tab's ranking (its heading may say "probably none")
    classify_top = max(ranked, key=ranked.get)
    panel = open_tab(page, "Inside the model")
    panel.get_by_text(re.compile(r"is token 28\*?\*? of 65")).first.wait_for()  # the middle patch of 8x8
    settled(page, 5)
    load_all_pictures(page)
    drawn = panel.locator("img").evaluate_all("is => is.filter(i => i.complete && i.naturalWidth > 0).length")
    assert drawn >= 11, drawn  # grid, vectors, z_0, E, scores, weights, over the image, block, norms, answer, lens

    # A click on the grid picks the patch under it: row 2, column 7 of 8 is token 1 + 1 * 8 + 6 = 15.
    grid = panel.get_by_alt_text(re.compile("click one to follow it"))
    box = grid.bounding_box()
    grid.click(position={"x": box["width"] * 6.5 / 8, "y": box["height"] * 1.5 / 8})
    panel.get_by_text(re.compile(r"is token 15\*?\*? of 65")).first.wait_for()
    panel.get_by_text(re.compile(r"following token 15 \(patch 2, 7\)")).first.wait_for()

    layer = panel.get_by_label("Layer").first
    layer.fill("3")
    layer.press("Tab")  # the slider's release event fires as the number box loses focus
    panel.get_by_text(re.compile(r"Layer 3 of 7, head 1 of 6, following token 15")).first.wait_for()
    settled(page, 5)

    # Eq. 4's top 5 is the Classify tab's answer, and the text under it reads the same number.
    top5 = shown_top5(panel)
    best = max(top5, key=top5.get)
    assert len(top5) == 5 and best == classify_top, (top5, classify_top)
    panel.get_by_text(re.compile(rf"{best} {top5[best]:.1%}")).first.wait_for()
    shot(page, "inside")


def toasts(page) -> list[str]:
    return [t for t in page.locator(".toast-body").all_inner_texts() if t.strip()]


def test_messages_a_presenter_can_read_aloud(page, picture, tmp_path):
    """A file that is not an image: one message, not one per tab. A model that cannot be had
    (ViT-B/16 offline here): each tab says so in place, no error badges. A typed layer beyond the
    slider: the maps are drawn at the layer the slider shows, and a warning says so."""
    page.locator("#examples").get_by_text(re.compile("CIFAR-10 images the shipped model never trained on")).wait_for()
    bad = tmp_path / "broken.png"
    data = picture.read_bytes()
    bad.write_bytes(data[: len(data) // 3])  # truncated
    upload(page, bad)
    page.wait_for_timeout(4000)
    said = toasts(page)
    assert len(said) == 1 and "could not be" in said[0], said
    page.locator(".toast-close").first.click()

    upload(page, picture)
    page.get_by_test_id("label-output-value").wait_for()
    panel = open_tab(page, "Attention")
    settled(page)
    layer = panel.get_by_label("Layer").first
    layer.fill("99")
    layer.press("Tab")
    panel.get_by_text(re.compile(r"attends to in layer 7 of 7")).first.wait_for()
    page.wait_for_timeout(1000)
    assert layer.input_value() == "7"
    said = toasts(page)
    assert len(said) == 1 and "Layer must be a whole number from 1 to 7" in said[0] and "Showing 7" in said[0], said
    page.locator(".toast-close").first.click()

    picker = page.get_by_label("Model").first
    picker.click()
    page.get_by_role("option", name=re.compile(r"ViT-B.16 ImageNet")).click()
    page.locator("#model-note").get_by_text(re.compile("not available here")).wait_for(timeout=60_000)
    page.locator("#examples").get_by_text("Photos (shipped with gradio)").wait_for()  # the examples follow the model
    panel.get_by_text(re.compile(r"^Not available: ")).first.wait_for()
    page.wait_for_timeout(1500)
    assert panel.get_by_text("Error", exact=True).count() == 0  # no red badge on the pictures
    assert toasts(page) == []  # said in place, not in a popup
    shot(page, "attention_offline_model")
    panel = open_tab(page, "Classify")
    panel.get_by_text(re.compile(r"^Not available: ")).first.wait_for()


def test_default_training_run_draws_both_curves_and_stop_keeps_the_model(page):
    """Every input at its default: the run the README shows. Both series are drawn, not only sent;
    then Stop says so at once and the model as it is becomes a model in the picker. (That the whole
    default run reaches 90% is test_train_tab's, through the server; this waits for the curves.)"""
    panel = open_tab(page, "Train")
    panel.get_by_role("button", name="Start training").click()
    status = page.locator(".status-line").first
    drawn = {}
    for _ in range(600):  # up to 5 minutes on a slow CPU: validation points after step 0 and the train line, drawn
        drawn = {title: drawn_series(page, title) for title in ("Loss", "Accuracy (%)")}
        if all(d.get("validation", 0) >= 3 and d.get("train", 0) >= 3 for d in drawn.values()):
            break
        page.wait_for_timeout(500)
    for title, series in drawn.items():
        assert set(series) == {"train", "validation", "lines"} and series["lines"] >= 2, (title, series)
        assert series["validation"] >= 3, (title, series)  # step 0 and a validation after it, joined by a line
    assert re.search(r"Step \d+/\d+|Epoch \d+/\d+ done", status.inner_text())
    shot(page, "train_running")

    panel.get_by_role("button", name="Stop").click()
    # Answered outside the queue, before the run is saved (the benchmark, benchmarks/serving.py, times it).
    status.get_by_text(re.compile(r"Stopping")).wait_for(timeout=10_000)
    status.get_by_text(re.compile(r"Stopped")).wait_for(timeout=120_000)
    assert re.search(r"Run \d+: .*\(stopped\)", status.inner_text())
    # The stopped run joins the picker, but the picked model stays until the user picks another.
    use = panel.get_by_role("button", name=re.compile("Use this model in every tab"))
    use.wait_for()
    page.wait_for_timeout(1000)
    picker = page.get_by_label("Model").first
    assert picker.input_value() == "Shipped CIFAR-10 ViT"
    shot(page, "train_stopped")
    use.click()
    for _ in range(40):  # the picker's value, as the page shows it
        if "(stopped)" in picker.input_value():
            break
        page.wait_for_timeout(250)
    assert re.search(r"Run \d+: .*\(stopped\)", picker.input_value())


def test_compare_draws_both_runs(page, monkeypatch):
    """From scratch vs fine-tuned from the shipped model, on the same little data: both runs'
    validation curves in one plot, labelled. Shortened (the app runs in this process): the whole
    comparison's time is `python benchmarks/train_tab.py compare`'s to measure."""
    from vitdemo.app import train_tab

    monkeypatch.setattr(train_tab, "COMPARE_EPOCHS", 2)
    monkeypatch.setattr(train_tab, "COMPARE_PER_CLASS", 30)
    panel = open_tab(page, "Train")
    panel.get_by_role("button", name=re.compile("Compare")).click()
    status = page.locator(".status-line").first
    status.get_by_text(re.compile(r"Done")).wait_for(timeout=600_000)
    page.wait_for_timeout(1000)
    drawn = drawn_series(page, "Accuracy (%)")
    assert {"from scratch: validation", "fine-tuned: validation"} <= set(drawn), drawn
    assert drawn["from scratch: validation"] >= 8 and drawn["fine-tuned: validation"] >= 8, drawn
    shot(page, "train_compare")


@pytest.mark.parametrize("tab", ["Classify", "Inside the model", "Train"])
def test_phone_width(browser, app_url, picture, tab):
    """At 400 px: every tab's name in view (the bar wraps: no "..." menu to hunt in), the answer in
    view right after the upload, and each tab laid out for the width."""
    context = browser.new_context(viewport={"width": 400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        page.goto(app_url)
        page.locator("#model-note").get_by_text(re.compile(r"\w")).first.wait_for()
        # The model's note goes under the picker, which keeps the width to show the model's name
        # (measured before the upload, which scrolls the page to the answer).
        picker = page.get_by_label("Model").first.bounding_box()
        note = page.locator("#model-note").bounding_box()
        assert picker["width"] >= 250 and note["y"] >= picker["y"] + picker["height"], (picker, note)
        upload(page, picture)
        page.get_by_test_id("label-output-value").wait_for()
        names = ["Classify", "Patches", "Inside the model", "Position embeddings", "Attention", "Train", "About"]
        assert page.get_by_role("tab").all_inner_texts() == names
        assert page.get_by_role("button", name="More tabs").count() == 0
        page.wait_for_timeout(1000)
        answer = page.get_by_test_id("label-output-value").first.bounding_box()  # scrolled into view
        assert 0 <= answer["y"] and answer["y"] + answer["height"] <= 900, answer
        if tab == "Inside the model":
            page.get_by_role("tab", name=tab).click()
            panel = visible_tab(page)
            panel.get_by_text(re.compile(r"is token \d+\*?\*? of 65")).first.wait_for()
            settled(page, 1)
            load_all_pictures(page)
            # Every picture fits the phone's width: none needs sideways scrolling.
            widths = panel.locator("img").evaluate_all("is => is.map(i => i.getBoundingClientRect().right)")
            assert max(widths) <= 400, widths
        if tab == "Train":
            page.get_by_role("tab", name="Train").click()
            panel = visible_tab(page)
            panel.get_by_label("Epochs").first.fill("1")
            panel.get_by_label("Images per class (at most)").first.fill("300")  # a short run: the layout is tested
            panel.get_by_role("button", name="Start training").click()
            page.locator(".status-line").first.get_by_text(re.compile("Finished")).wait_for(timeout=300_000)
            page.wait_for_timeout(1000)
            assert set(drawn_series(page, "Loss")) == {"train", "validation", "lines"}
        shot(page, f"{tab.split()[0].lower()}_400px")
    finally:
        context.close()
