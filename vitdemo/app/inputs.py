"""Numbers and choices from the page or the API, checked with our own messages.

Gradio checks a slider's range and a radio's choices before the handler runs, with its own words
("Value 5 is greater than maximum value 0.1", "Value: 'x' (type: <class 'str'>) is not in the
list of choices"), and only against the range the component was built with, while the real range
of a layer or patch slider depends on the model picked. So `numeric` and `choice` take Gradio's
check off those components, and the handlers call `number_in` and `one_of`, which name the
allowed range or choices in a `common.user_error`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def numeric(slider: gr.Slider) -> gr.Slider:
    """`slider` without Gradio's range check: its handler checks the value with `number_in`
    (a range that may depend on the model). The value is passed on as sent."""
    # An instance attribute rather than a subclass (a subclass makes Gradio write a .pyi stub at
    # import time). Gradio rebuilds a component whose settings an event updates (a new maximum),
    # dropping this; the rebuilt slider then clamps in the page, and the handler still checks.
    slider.preprocess = lambda payload: payload
    return slider


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


__all__ = ["choice", "number_in", "numeric", "one_of"]
