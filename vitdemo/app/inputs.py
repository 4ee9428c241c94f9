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

from .common import for_users, user_error


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


class OutOfRange(gr.Error):
    """A number outside its range (or not whole where it must be): the message names the range;
    `value` is the number sent and `nearest` the closest allowed one, what a slider's box shows
    after it clamps a typed number (`keep_views` and `warn_out_of_range` use it)."""

    def __init__(self, message: str, value: float, nearest: float) -> None:
        super().__init__(for_users(message), duration=None, print_exception=False)
        self.value, self.nearest = value, nearest


def number_in(value: Any, lo: float, hi: float, name: str, *, whole: bool = False, why: str = "") -> float:
    """`value` as a number (an int with `whole`) in [lo, hi], or a message naming the range
    (`OutOfRange` for a number outside it); `why` says where the range comes from ("this model
    has 4 layers")."""
    kind = "a whole number" if whole else "a number"
    reason = f" ({why})" if why else ""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise user_error(f"{name} must be {kind} from {_fmt(lo)} to {_fmt(hi)}{reason}; got {value!r}.") from None
    if math.isnan(x):
        raise user_error(f"{name} must be {kind} from {_fmt(lo)} to {_fmt(hi)}{reason}; got {_fmt(x)}.")
    if not lo <= x <= hi or (whole and not x.is_integer()):
        nearest = min(max(float(round(x)) if whole else x, lo), hi)
        raise OutOfRange(f"{name} must be {kind} from {_fmt(lo)} to {_fmt(hi)}{reason}; got {_fmt(x)}.", x,
                         int(nearest) if whole else nearest)
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


def _is(arg: Any, value: float) -> bool:
    try:
        return float(arg) == value
    except (TypeError, ValueError):
        return False


def keep_views(fn: Callable, outputs: int) -> Callable:
    """`fn` for a control's own event (a slider released, a choice made). A number out of range is
    drawn at the nearest allowed value, the one the slider's box shows once it has clamped what
    was typed, so that the control and the pictures agree, and a warning says so. Any other
    message is shown, until closed, as a warning, and the `outputs` views keep what they showed
    (Gradio would otherwise blank every output of a failed event). One warning per event; buttons
    and the API keep the error itself."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        args, notes = list(args), []
        for _ in range(len(args) + 1):  # each out-of-range number is snapped once
            try:
                out = fn(*args)
                break
            except OutOfRange as err:
                where = next((i for i, arg in enumerate(args) if _is(arg, err.value)), None)
                if where is None:
                    gr.Warning(err.message, duration=None)
                    return tuple(gr.skip() for _ in range(outputs))
                args[where] = err.nearest
                notes.append(f"{err.message} Showing {_fmt(err.nearest)}.")
            except gr.Error as err:
                gr.Warning(" ".join([*notes, err.message]), duration=None)
                return tuple(gr.skip() for _ in range(outputs))
        if notes:
            gr.Warning(" ".join(notes), duration=None)
        return out

    return wrapper


def warn_out_of_range(lo: float, hi: float, name: str, *, whole: bool = True) -> Callable[[Any], None]:
    """For a slider whose value a button uses later (the Train tab's): a number typed outside the
    range is clamped by the slider's box without a word; this says so at once, and that the
    clamped value is what the button will use."""

    def check(value: Any) -> None:
        try:
            number_in(value, lo, hi, name, whole=whole)
        except OutOfRange as err:
            gr.Warning(f"{err.message} It is set to {_fmt(err.nearest)}, which is what Start will use.",
                       duration=None)
        except gr.Error as err:
            gr.Warning(err.message, duration=None)

    return check


__all__ = ["NUMERIC", "OutOfRange", "choice", "keep_views", "number_in", "numeric_slider", "one_of",
           "warn_out_of_range"]
