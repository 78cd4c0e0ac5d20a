"""Small internal helpers shared by several modules."""

from __future__ import annotations

import keras


def iter_layers(model):
    """Yields every layer of ``model``, descending into nested models (depth first)."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer)


def check_fraction(value, name, *, owner, allow_one=False):
    """Checks that ``value`` is a float in [0, 1) (or [0, 1]) and returns it as float."""
    hi = "1]" if allow_one else "1)"
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{owner}: `{name}` must be a number in [0, {hi}, got {value!r}.") from None
    if not (0.0 <= v <= 1.0) or (v == 1.0 and not allow_one) or v != v:
        raise ValueError(f"{owner}: `{name}` must be in [0, {hi}, got {value!r}.")
    return v


def check_int(value, name, *, owner, minimum=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: `{name}` must be an int, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}: `{name}` must be >= {minimum}, got {value!r}.")
    return value
