"""Numbers and choices from the page or the API, checked with our own messages.

Gradio checks a slider's range and a radio's choices before the handler runs, with its own words
("Value 5 is greater than maximum value 0.1", "Value: 'x' (type: <class 'str'>) is not in the
list of choices"), and only against the range the component was built with, while the real range
of a layer or patch slider depends on the model picked. So `numeric_slider` and `choice` take
Gradio's check off those components, and the handlers call `number_in` and `one_of`, which name the
allowed range or choices in a `common.user_error`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr

from .common import user_error


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def number_in(value: Any, lo: float, hi: float, name: str, *, whole: bool = False, why: str = "") -> float:
    """`value` as a number (an int with `whole`) in [lo, hi], or a message naming the range;
    `why` says where the range comes from ("this model has 4 layers")."""
    kind = "a whole number" if whole else "a number"
    reason = f" ({why})" if why else ""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise user_error(f"{name} must be {kind} from {_fmt(lo)} to {_fmt(hi)}{reason}; got {value!r}.") from None
    if math.isnan(x) or not lo <= x <= hi or (whole and not x.is_integer()):
        raise user_error(f"{name} must be {kind} from {_fmt(lo)} to {_fmt(hi)}{reason}; got {_fmt(x)}.")
    return int(x) if whole else x


def one_of(value: Any, choices: Sequence[str], name: str) -> str:
    """`value` if it is one of `choices`, or a message listing them."""
    if value not in choices:
        raise user_error(f"{name} must be one of: {', '.join(repr(c) for c in choices)}; got {value!r}.")
    return value


NUMERIC = "vitdemo-numeric"  # the CSS class that marks a slider whose handler checks its range
_gradio_slider_preprocess = gr.Slider.preprocess


def _slider_preprocess(self: gr.Slider, payload: Any) -> Any:
    if NUMERIC in (self.elem_classes or []):
        return payload  # the handler checks it, against the range of the model picked (`number_in`)
    return _gradio_slider_preprocess(self, payload)


# Gradio rebuilds a component whose settings an event updates (a slider's maximum follows the
# model picked) from its constructor arguments, so a per-instance replacement of `preprocess`
# would be lost after the first model change, and typing 99 into the layer box would get
# Gradio's generic message again. The marker travels in `elem_classes`, one of those arguments;
# sliders without it keep Gradio's check.
gr.Slider.preprocess = _slider_preprocess


def numeric_slider(minimum: float, maximum: float, **kwargs: Any) -> gr.Slider:
    """A `gr.Slider` without Gradio's range check: its handler checks the value with `number_in`
    (a range that may depend on the model), and the value is passed on as sent."""
    classes = kwargs.pop("elem_classes", None) or []
    classes = [classes] if isinstance(classes, str) else list(classes)
    return gr.Slider(minimum, maximum, elem_classes=[*classes, NUMERIC], **kwargs)


def choice(radio: gr.Radio, name: str) -> gr.Radio:
    """`radio` with our message, naming the choices, for a value that is not one of them."""
    values = [value for _, value in radio.choices]
    gradio_check = radio.preprocess

    def preprocess(payload: Any) -> Any:
        if payload is not None:
            one_of(payload, values, name)
        return gradio_check(payload)

    radio.preprocess = preprocess
    return radio


def keep_views(fn: Callable, outputs: int) -> Callable:
    """`fn` for a control's own event (a slider released, a choice made): a message it raises is
    shown, until closed, as a warning, and the `outputs` views keep what they showed; Gradio would
    otherwise blank every output of a failed event. Buttons and the API keep the error itself."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        try:
            return fn(*args)
        except gr.Error as err:
            gr.Warning(err.message, duration=None)
            return tuple(gr.skip() for _ in range(outputs))

    return wrapper


__all__ = ["NUMERIC", "keep_views", "choice", "number_in", "numeric_slider", "one_of"]
