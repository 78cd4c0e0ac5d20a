"""Small internal helpers shared by several modules."""

from __future__ import annotations

import math
import numbers

import keras
import numpy as np


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


def is_int(value):
    """True for Python and NumPy integers (not bools), as tfmot accepts."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_int(value, name, *, owner, minimum=None):
    """Checks that ``value`` is an integer (Python or NumPy) >= ``minimum``; returns an int."""
    if not is_int(value):
        raise TypeError(f"{owner}: `{name}` must be an int, got {value!r}.")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}: `{name}` must be >= {minimum}, got {value!r}.")
    return value


def check_positive(value, name, *, owner):
    """Checks that ``value`` is a finite real number > 0 (Python or NumPy); returns a float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: `{name}` must be a positive number, got {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: `{name}` must be a finite number > 0, got {value!r}.")
    return float(value)
