"""Converter options passed through `export_tflite`, and clear conversion errors.

``converter_options`` maps attribute names of the `tf.lite.TFLiteConverter`
object to values, set after tfprune's own settings. Nested attributes are
spelled with a dot: ``"target_spec.supported_ops"`` sets
``converter.target_spec.supported_ops``. Options tfprune sets from its own
arguments (``quantize=``, ``sparse=``, ``representative_data=``,
``int8_io=``) are refused or must agree with what tfprune sets, so that the
checks `export_tflite` makes (e.g. the int8 one) keep meaning something.
"""

from __future__ import annotations

import difflib
import re

SET_BY_ARGUMENTS = {
    "optimizations": "quantize= and sparse=",
    "representative_dataset": "representative_data=",
    "inference_input_type": "int8_io=",
    "inference_output_type": "int8_io=",
}
"""Converter attributes that only `export_tflite`'s own arguments set, and those arguments."""

_NOT_OPTIONS = ("saved_model_dir", "target_spec")
"""Converter attributes that are not options: the model's source, and the nested spec object."""


def _check_options(options) -> dict:
    """Checks the form of ``converter_options`` and the names set by tfprune's own arguments.

    Returns:
        The options as a plain dict (empty for None).

    Raises:
        TypeError: If ``options`` is not a dict with string keys.
        ValueError: If an option is one that `export_tflite` sets from its own
            arguments (`SET_BY_ARGUMENTS`).
    """
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(
            f"export_tflite: `converter_options` must be a dict {{converter attribute: value}} "
            f"(e.g. {{'target_spec.supported_ops': ['TFLITE_BUILTINS', 'SELECT_TF_OPS']}}), "
            f"got {type(options).__name__}."
        )
    for name, value in options.items():
        if not isinstance(name, str):
            raise TypeError(
                f"export_tflite: `converter_options` keys must be attribute names (str), got "
                f"{name!r} ({type(name).__name__})."
            )
        if name in SET_BY_ARGUMENTS:
            raise ValueError(
                f"export_tflite: converter_options[{name!r}] (got {value!r}) is set by "
                f"export_tflite's {SET_BY_ARGUMENTS[name]} argument(s); use them instead, so "
                f"that the export is checked."
            )
    return dict(options)


def allowed_options(converter) -> list[str]:
    """The option names ``converter`` accepts: its data attributes, nested ones dotted.

    Public attributes and the converter's ``_experimental_*`` flags of the
    converter and of its ``target_spec`` (as ``"target_spec.<name>"``) are
    allowed, except the model's source and `SET_BY_ARGUMENTS`.
    """
    names = []
    for owner, prefix in ((converter, ""), (converter.target_spec, "target_spec.")):
        for name in vars(owner):
            if name.startswith("_") and not name.startswith("_experimental_"):
                continue
            if prefix + name in SET_BY_ARGUMENTS or (not prefix and name in _NOT_OPTIONS):
                continue
            names.append(prefix + name)
    return sorted(names)


def _normalize(name, value, tf):
    """Accepts names for ``supported_ops`` (``"SELECT_TF_OPS"``) and ``supported_types``."""
    if name not in ("target_spec.supported_ops", "target_spec.supported_types"):
        return value
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(
            f"export_tflite: converter_options[{name!r}] must be a list, got {value!r} "
            f"({type(value).__name__})."
        )
    if name == "target_spec.supported_types":
        try:
            return [tf.as_dtype(v) for v in value]
        except TypeError as e:
            raise TypeError(
                f"export_tflite: converter_options[{name!r}] must list dtypes (tf.float16 or "
                f"'float16'), got {list(value)!r}."
            ) from e
    allowed = [s.name for s in tf.lite.OpsSet]
    ops = []
    for v in value:
        if isinstance(v, tf.lite.OpsSet):
            ops.append(v)
        elif isinstance(v, str) and v in allowed:
            ops.append(tf.lite.OpsSet[v])
        else:
            raise ValueError(
                f"export_tflite: converter_options[{name!r}] holds {v!r}; allowed: "
                f"tf.lite.OpsSet members or their names {allowed}."
            )
    return ops


def _show(value) -> str:
    """``value`` for a message: enum members (``tf.lite.OpsSet``) and dtypes by name."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    name = getattr(value, "name", None)
    return repr(name) if isinstance(name, str) else repr(value)


def _apply_options(converter, settings, options, quantize, tf):
    """Sets tfprune's ``settings``, then the user's ``options``, on ``converter``.

    Both map dotted attribute names to values. An option may repeat one of
    tfprune's settings only if it keeps it: a list must contain tfprune's
    values (e.g. ``quantize="int8"`` needs ``TFLITE_BUILTINS_INT8`` in
    ``target_spec.supported_ops``), another value must be equal.

    Raises:
        ValueError: If an option name is not an attribute of the converter
            (the message lists the allowed names) or conflicts with a setting
            tfprune made for the chosen ``quantize``.
    """

    def assign(name, value):
        owner, _, attribute = name.rpartition(".")
        setattr(converter.target_spec if owner else converter, attribute, value)

    for name, value in settings.items():
        assign(name, value)
    allowed = allowed_options(converter)
    for name, value in options.items():
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=3)
            raise ValueError(
                f"export_tflite: unknown converter option {name!r} in `converter_options`"
                f"{f' (did you mean {close}?)' if close else ''}; allowed: the attributes of "
                f"{type(converter).__name__}, nested ones dotted: {allowed}."
            )
        value = _normalize(name, value, tf)
        if name in settings:
            ours = settings[name]
            if isinstance(ours, (list, tuple, set)):
                keeps = all(v in list(value) for v in ours)
                rule = f"it must contain {_show(ours)}"
            else:
                keeps = value == ours
                rule = f"it must be {_show(ours)}"
            if not keeps:
                raise ValueError(
                    f"export_tflite: converter_options[{name!r}] = {_show(value)} conflicts "
                    f"with what export_tflite sets for quantize={quantize!r}: {rule}. Change "
                    f"`quantize` or the option."
                )
        assign(name, value)


_OP = re.compile(r"'(tf\.\w+)' op|failed to legalize operation '(tf\.\w+)'")
_NODE = re.compile(r'fused\["(\w+):", "([^"@]+)@')

SELECT_OPS_HINT = (
    "converter_options={'target_spec.supported_ops': ['TFLITE_BUILTINS', 'SELECT_TF_OPS']}"
)


def _conversion_error(error, model_name, options) -> ValueError:
    """A ValueError naming the op(s) the converter failed on and the options that may help."""
    text = str(error)
    ops, nodes = [], []
    for data in getattr(error, "errors", None) or []:
        name = getattr(getattr(data, "operator", None), "name", "")
        if name and name != "tf.Const" and name not in ops:  # constants are never the cause
            ops.append(name)
    for match in _OP.finditer(text):
        name = match.group(1) or match.group(2)
        if name not in ops:
            ops.append(name)
    for match in _NODE.finditer(text):
        if f"tf.{match.group(1)}" in ops and match.group(2) not in nodes:
            nodes.append(match.group(2))
    first = next(
        (
            line.split("): ", 1)[-1].strip()
            for line in text.splitlines()
            if "error:" in line and "loc(" in line
        ),
        text.strip().splitlines()[0] if text.strip() else type(error).__name__,
    )
    where = f" at op(s) {ops}" + (f" (graph nodes {nodes[:3]})" if nodes else "") if ops else ""
    if "tensor list" in text.lower() or any("TensorList" in op for op in ops):
        hint = (
            "Recurrent layers (LSTM, GRU, RNN) with a variable batch size need TensorList ops: "
            "pass converter_options={'_experimental_default_to_single_batch_in_tensor_list_ops':"
            " True} to keep builtin ops (LiteRT runs them; run_tflite feeds one sample at a "
            "time), or " + SELECT_OPS_HINT[:-1] + ", '_experimental_lower_tensor_list_ops': "
            "False} for Select TF (Flex) ops, which need a runtime linked with the Flex delegate "
            "(ai-edge-litert's Python interpreter is not)."
        )
    elif "SELECT_TF_OPS" in _show(options.get("target_spec.supported_ops", [])):
        hint = (
            "The op is not in the Select TF ops set either: "
            "converter_options={'allow_custom_ops': True} keeps it as a custom op (the runtime "
            "then needs a kernel registered for it), or replace the layer."
        )
    else:
        hint = (
            f"If the op has no TFLite builtin kernel, {SELECT_OPS_HINT} converts it as a Select "
            f"TF (Flex) op, which needs a runtime linked with the Flex delegate (ai-edge-litert's "
            f"Python interpreter is not); otherwise replace the layer."
        )
    given = f" with converter_options {sorted(options)}" if options else ""
    return ValueError(
        f"export_tflite: the TFLite converter failed on model '{model_name}'{given}{where}: "
        f"{first}. {hint}"
    )
