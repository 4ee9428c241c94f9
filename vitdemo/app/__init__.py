"""The Gradio app: classify an image, see it cut into patches, the position embeddings and the
attention, and train. `build_demo()` returns the `gr.Blocks`; `app.py` launches it.

One module per tab, each with `create_ui()` (its layout) and its event handlers, which are plain
functions the tests call directly; what tabs share lives in `common` (errors, reading images),
`models` (the model store, runtimes, the picker) and `examples`. This package is the only part of
vitdemo that imports gradio.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from . import about_tab, attention_tab, classify_tab, common, inside_tab, models, patches_tab, position_tab, train_tab
from .common import DELETE_CACHE, HIDDEN, MAX_FILE_SIZE, QUEUE_SIZE, check_image, image_input
from .examples import ExampleSet, examples_for
from .models import MODELS

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="amber")
CSS = """
#model-note p { margin: 0.2em 0; }
/* the CIFAR-10 and shapes examples are 32x32: enlarged to the frame without blurring, every pixel a square */
#examples img { image-rendering: pixelated; }
#input-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
.status-line { min-height: 2.6em; }
/* wide screens: the Classify tab's settings on the left, its answer on the right */
@media (min-width: 721px) { #classify-row { flex-direction: row-reverse; } }
/* Phones: every tab's name in view, in rows, instead of most of them behind a "..." menu. Gradio
   moves the tabs that do not fit, measured on a hidden copy of the tab bar, into that menu: shrink
   the copy so that all fit, and let the real bar wrap. */
@media (max-width: 720px) {
  .tab-container.visually-hidden button { font-size: 1px !important; padding: 0 !important; min-width: 0 !important; }
  [role=tablist].tab-container { flex-wrap: wrap !important; height: auto !important; row-gap: 2px; }
  .tab-wrapper { height: auto !important; padding-bottom: 4px; }
  [role=tablist].tab-container button { padding: 6px 9px !important; }
}
/* an image unlike the training data: the warning is a box of its own by the (ranked) answer */
.ood-warning { background: #fff4e5; border-left: 5px solid #f59e0b; padding: 0.6em 0.8em; border-radius: 4px;
               color: #5b3a00; margin: 0.4em 0; }
/* a dropdown's value too long for a narrow screen ends in an ellipsis before the arrow, not under it */
.wrap .secondary-wrap input { text-overflow: ellipsis; padding-right: 1.75rem; }
"""


SHOW_ANSWER_ON_PHONES = """() => {
  if (window.innerWidth <= 720) {
    setTimeout(() => document.getElementById('tabs')?.scrollIntoView({block: 'start'}), 300);
  }
}"""


def launch_options() -> dict[str, Any]:
    """What `app.py` passes to `demo.launch()` (host and port come from GRADIO_SERVER_NAME and
    GRADIO_SERVER_PORT through launch's own defaults)."""
    return {"max_file_size": MAX_FILE_SIZE, "theme": THEME, "css": CSS, "show_error": False}


def select_model(name: str | None) -> tuple[Any, ...]:
    """Everything that changes with the model picker: the note, the card, the sliders' ranges
    (layers, patch rows and columns), the attention cache (emptied), the Attention tab's class
    picker and faithfulness table (`attention_tab.model_views`), and the Inside tab's sliders
    (`inside_tab.model_views`)."""
    note = models.model_note(name)
    card = models.model_card(name)
    try:
        config, _ = models.model_spec(name)
        gh, gw, depth = config.grid_size[0], config.grid_size[1], config.depth
    except common.ModelUnavailable:
        gh = gw = depth = 1
    rows = gr.update(maximum=max(gh, 2), value=(gh + 1) // 2)
    cols = gr.update(maximum=max(gw, 2), value=(gw + 1) // 2)
    return (note, card, gr.update(maximum=max(depth, 2), value=depth), rows, cols, rows, cols, None,
            *attention_tab.model_views(name), *inside_tab.model_views(name))


def example_set(name: str | None) -> ExampleSet:
    """The examples the model `name` can know (`examples.examples_for`)."""
    try:
        _, meta = models.model_spec(name)
        names = list(meta["class_names"])
    except common.ModelUnavailable:
        names = []
    return examples_for(names, common.APP_DIR / "examples")


def example_view(name: str | None) -> dict[str, Any]:
    """The examples' Dataset settings for the model `name`: its samples (drawn as thumbnails; with
    captions Gradio would draw text buttons instead) and its title."""
    chosen = example_set(name)
    return {"samples": [[str(path)] for path, _ in chosen.items], "label": chosen.title}


def pick_example(index: int | None, name: str | None) -> Any:
    """The file of the example clicked, for the image input."""
    items = example_set(name).items
    if index is None or not 0 <= int(index) < len(items):
        return gr.skip()
    return str(items[int(index)][0])


def classify_quietly(image: Any, name: str | None, runtime: str) -> tuple[Any, Any]:
    """The image classified for the page's own events (a new image, a model picked): when that
    model cannot be used, no answer and no error popup; the answer's note
    (`classify_tab.answer_note`) says "Not available" and why, in place."""
    if image is None:
        return None, None
    try:
        return classify_tab.answer(image, name, runtime)
    except gr.Error as err:
        return None, {"unavailable": err.message}


def build_demo() -> gr.Blocks:
    """The app. Launch it with `demo.launch(**launch_options())`."""
    first = models.default_model()
    with gr.Blocks(title="vitdemo: An Image is Worth 16x16 Words", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown("# vitdemo: the Vision Transformer, explained\n"
                    "An image cut into patches, each patch a word, read by a Transformer "
                    "([Dosovitskiy et al., 2020](https://arxiv.org/abs/2010.11929)). Pick a model and an image, "
                    "then explore.")
        # Columns with a min_width wrap: on a phone the note goes under the picker instead of squeezing it
        with gr.Row(equal_height=True):
            with gr.Column(scale=2, min_width=300):
                picker = gr.Dropdown(choices=MODELS.choices(), value=first, label="Model", allow_custom_value=True,
                                     info="Used by every tab; runs you train appear here.")
            with gr.Column(scale=1, min_width=300):
                note = gr.Markdown(elem_id="model-note")
        with gr.Row():
            with gr.Column(scale=1):
                image = image_input("Image (used by every tab)", height=260, elem_id="input-image")
            with gr.Column(scale=1):
                # A Dataset, not gr.Examples, so that the model picked chooses the examples.
                examples = gr.Dataset(components=[gr.Image(type="filepath", visible=False, render=False)],
                                      type="index", samples_per_page=20, elem_id="examples",
                                      **example_view(first))

        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Classify", id="classify"):
                classify_ui = classify_tab.create_ui()
            with gr.Tab("Patches", id="patches"):
                patches_ui = patches_tab.create_ui()
            with gr.Tab("Inside the model", id="inside"):
                inside_ui = inside_tab.create_ui()
            with gr.Tab("Position embeddings", id="position"):
                position_ui = position_tab.create_ui()
            with gr.Tab("Attention", id="attention"):
                attention_ui = attention_tab.create_ui()
            with gr.Tab("Train", id="train"):
                train_ui = train_tab.create_ui()
            with gr.Tab("About", id="about"):
                about_ui = about_tab.create_ui()

        # -- wiring ----------------------------------------------------------------------------
        view = {"concurrency_limit": 2, "concurrency_id": "views"}
        checks = {"concurrency_limit": 4, "concurrency_id": "checks"}  # quick: an image read, a number checked
        model_outputs = [note, about_ui["card"], attention_ui["layer"], attention_ui["q_row"],
                         attention_ui["q_col"], position_ui["row"], position_ui["col"], attention_ui["cache"],
                         *attention_tab.model_outputs(attention_ui), *inside_tab.model_outputs(inside_ui)]
        position_inputs = [picker, position_ui["row"], position_ui["col"]]
        position_outputs = position_tab.outputs(position_ui)
        attn_inputs, attn_outputs = attention_tab.io(attention_ui, image, picker)
        patch_outputs = patches_tab.outputs(patches_ui)
        inside_inputs, inside_outputs = inside_tab.io(inside_ui, image, picker, classify_ui["runtime"])

        classify_inputs = [image, picker, classify_ui["runtime"]]
        classify_outputs = [classify_ui["label"], classify_ui["ms"]]
        classify_queue = {"concurrency_limit": 3, "concurrency_id": "classify"}
        # The page's views of the image: emptied without one, and "Not available: why" in place for
        # a model that cannot be used (no error on every picture).
        patches_view = models.if_available(patches_tab.patches, (None, None, ""), note=2)
        explain_view = models.if_available(attention_tab.explain, attention_tab.EMPTY, note=3)
        inside_view = models.if_available(inside_tab.inside, inside_tab.EMPTY, note=4)

        def show_image(ready: Any, suffix: str = "") -> None:
            """Every tab's view of the image, once `ready` (the image checked) has succeeded."""
            api = {"api_name": f"classify{suffix or '_on_change'}", **HIDDEN}
            ready.success(classify_quietly, classify_inputs, classify_outputs, **api, **classify_queue).success(
                classify_tab.answer_note, classify_ui["ms"], classify_ui["timing"], **HIDDEN)
            # The new image's views are public ("patches", "inside"); the model change's are named apart.
            ready.success(patches_view, [image, picker], patch_outputs, api_name=f"patches{suffix}", **view,
                          **(HIDDEN if suffix else {}))
            ready.success(explain_view, attn_inputs, attn_outputs, api_name=f"explain{suffix or '_on_change'}",
                          **view, **HIDDEN)
            ready.success(inside_view, inside_inputs, inside_outputs, api_name=f"inside{suffix}", **view,
                          **(HIDDEN if suffix else {}))

        def on_model_change(event: Any) -> None:
            """After the picked model changes: its note, card, sliders, examples and every view of the image."""
            done = event.then(select_model, picker, model_outputs, **HIDDEN)
            done.then(lambda name: gr.Dataset(**example_view(name)), picker, examples, **HIDDEN)
            done.then(position_tab.position_views, position_inputs, position_outputs, **HIDDEN)
            show_image(done.then(check_image, image, None, **checks, **HIDDEN), "_for_model")

        on_model_change(demo.load(models.refresh_picker, picker, picker, **HIDDEN))
        on_model_change(picker.input(lambda name: name, picker, picker, **HIDDEN))
        examples.click(pick_example, [examples, picker], image, **HIDDEN)
        # One image for every tab: a new image updates each tab's view of it; a file that cannot be
        # read is said once (by `check_image`), not once per tab.
        show_image(image.change(check_image, image, None, **checks, **HIDDEN))
        # On a phone the tabs are far below the image: bring them (and the answer) into view.
        image.change(None, None, None, js=SHOW_ANSWER_ON_PHONES)

        classify_tab.wire(classify_ui, image, picker)
        position_tab.wire(position_ui, picker, HIDDEN)
        attention_tab.wire(attention_ui, image, picker, view, HIDDEN)
        inside_tab.wire(inside_ui, image, picker, classify_ui["runtime"], view, HIDDEN)
        on_model_change(train_tab.wire(train_ui, picker))
    demo.queue(max_size=QUEUE_SIZE)
    return demo


__all__ = ["build_demo", "launch_options", "select_model"]
