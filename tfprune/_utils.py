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


def _name_key(name):
    """``"Turbo-VBI"``, ``"turbo_vbi"`` and ``"TurboVBI"`` all give ``"turbovbi"``."""
    return name.lower().replace("-", "").replace("_", "")


_NO_NONE = object()


def resolve_identifier(identifier, *, argument, base, names, kind, example, prefix,
                       needs_arguments=(), none=_NO_NONE, none_means=""):
    """The one ``get()`` behaviour of `tfprune.methods`, `tfprune.structures`, `tfprune.schedules`.

    Accepts, in this order:

    * None: ``none()`` when ``none`` is given (what None means for this
      argument), else a TypeError;
    * an instance of ``base``: returned as is;
    * a name of ``names`` (case, ``-`` and ``_`` do not matter, so
      ``"turbo-vbi"``, ``"turbo_vbi"`` and ``"TurboVBI"`` are the same): the
      class built with its default arguments. A name in ``needs_arguments``,
      or whose class cannot be built without arguments, is a ValueError that
      says so; an unknown name is a ValueError listing the allowed names;
    * a config dict from ``keras.saving.serialize_keras_object``: the
      deserialized object; a ValueError if it is not such a dict or cannot be
      deserialized, a TypeError if the object is not an instance of ``base``.

    Anything else is a TypeError naming ``argument``, the value and what is
    allowed.

    Args:
        identifier: the value given.
        argument: the argument's name for the messages (e.g. ``"structure"``).
        base: the class every result is an instance of.
        names: ``{registered name: class}``.
        kind: what ``base`` is called in messages (e.g.
            ``"a tfprune.structures.Structure"``).
        example: an instance expression for the messages (e.g.
            ``"structures.Filter()"``).
        prefix: how the module is written in messages (e.g. ``"structures."``).
        needs_arguments: names of ``names`` whose class must be given as an
            instance (its arguments have no meaningful default).
        none: a callable returning what None means for this argument; not
            given: None is a TypeError.
        none_means: what None means, for the messages (e.g. ``"= Unstructured()"``).

    Returns:
        An instance of ``base`` (or what ``none()`` returns).

    Raises:
        ValueError: unknown name, a name of a class that needs arguments, or a
            dict that is not a config dict or cannot be deserialized.
        TypeError: any other type, a class instead of an instance, or a config
            dict of another kind of object.
    """
    keys = {_name_key(name): name for name in names}
    buildable = [n for n in names if n not in needs_arguments]
    if identifier is None and none is not _NO_NONE:
        return none()
    if isinstance(identifier, base):
        return identifier
    if isinstance(identifier, str):
        name = keys.get(_name_key(identifier))
        if name is None:
            allowed = [f"allowed names: {_names_text(buildable)}"] if buildable else []
            if needs_arguments:
                allowed.append(f"names of classes that need arguments (pass an instance, e.g. "
                               f"{example}): {_names_text(needs_arguments)}")
            raise ValueError(
                f"`{argument}`={identifier!r} is not a known name; {'; '.join(allowed)} (case, "
                "'-' and '_' do not matter).")
        cls = names[name]
        if name in needs_arguments:
            raise ValueError(
                f"`{argument}`={identifier!r} names {cls.__name__}, which needs arguments: pass "
                f"an instance, {prefix}{cls.__name__}(...).")
        try:
            return cls()
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"`{argument}`={identifier!r} names {cls.__name__}, which needs arguments "
                f"({err}); pass an instance, {prefix}{cls.__name__}(...).") from err
    if isinstance(identifier, dict):
        if "class_name" not in identifier:
            raise ValueError(
                f"`{argument}`: the dict {identifier!r} is not a config dict (it has no "
                "'class_name'); a config dict must come from keras.saving.serialize_keras_object.")
        try:
            obj = keras.saving.deserialize_keras_object(identifier)
        except Exception as err:  # Keras raises several kinds; all mean a bad config
            raise ValueError(
                f"`{argument}`: the config dict {identifier!r} cannot be deserialized ({err}); "
                "a config dict must come from keras.saving.serialize_keras_object.") from err
        if not isinstance(obj, base):
            raise TypeError(
                f"`{argument}`: the config dict {identifier!r} deserializes to {obj!r} "
                f"({type(obj).__name__}), which is not {kind}.")
        return obj
    if isinstance(identifier, type) and issubclass(identifier, base):
        raise TypeError(
            f"`{argument}` must be an instance, got the class {identifier.__name__}; pass "
            f"{prefix}{identifier.__name__}(...).")
    allowed = [f"{kind} (e.g. {example})"]
    if buildable:
        allowed.append(f"a name ({_names_text(buildable)})")
    allowed.append("a config dict from keras.saving.serialize_keras_object")
    if none is not _NO_NONE:
        allowed.append(f"None ({none_means})" if none_means else "None")
    allowed = ", ".join(allowed[:-1]) + " or " + allowed[-1]
    raise TypeError(
        f"`{argument}` must be {allowed}; got {identifier!r} ({type(identifier).__name__}).")


def _names_text(names):
    return ", ".join(repr(n) for n in names)


class Configurable:
    """A small value object defined by its ``get_config()``: rebuilt with
    ``cls(**config)``, equal when the configs are, shown as ``Name(arg=value, ...)``."""

    def get_config(self):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    __hash__ = None

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"
