"""Conversion of (pruned) Keras 3 models to TFLite/LiteRT flatbuffers: `export_tflite`.

Conversion goes through `tf.lite.TFLiteConverter` (``from_keras_model``, or a
SavedModel for subclassed models); this module adds what the converter lacks:
a checked choice of quantization x sparse encoding, float32 rebuilding of
mixed-precision models, checked calibration data, the Keras input order in
the flatbuffer's metadata, checked pass-through of converter options and a
clear error when the conversion fails.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np

from tfprune.export.calibration import _check_int8, _representative_samples
from tfprune.export.flatbuffer import _INPUT_NAMES_METADATA, _add_metadata
from tfprune.export.options import _apply_options, _check_options, _conversion_error
from tfprune.export.runner import _interpreter, _signature_inputs

QUANTIZE_MODES = (None, "dynamic", "float16", "int8")
"""Allowed values of `export_tflite`'s ``quantize`` argument."""

SPARSE_MODES = ("auto", True, False)
"""Allowed values of `export_tflite`'s ``sparse`` argument."""

AUTO_SPARSITY_THRESHOLD = 0.3
"""``sparse="auto"`` encodes sparsity when some kernel has at least this fraction of zeros."""

DEAD_UNITS_WARNING = 0.2
"""``sparse="auto"`` warns (shrink first) when at least this fraction of all units is all zero."""

# Quantization modes in which the sparse encoding gave wrong outputs (float16: NaN
# for Block((4, 1)) Dense kernels and for Conv2DTranspose under XNNPACK).
_SPARSE_WRONG = ("float16",)
# Modes in which outputs are right with LiteRT's builtin kernels, but the default
# XNNPACK delegate refuses the sparse FULLY_CONNECTED / CONV_2D, so that a default
# `Interpreter` fails in `allocate_tensors`.
_SPARSE_NO_XNNPACK = ("dynamic", "int8")


def _kernel_sparsity(model) -> tuple[float, int, int]:
    """Sparsity LiteRT's sparse encoding could use, and the all-zero and total unit counts.

    Returns the largest fraction of exact zeros over the model's kernels
    (Dense, conv, depthwise...) counted in the *live* output units only, and
    the numbers of units (last kernel axis) whose kernel is entirely zero and
    of all units.
    Whole dead units are not a job for the sparse encoding (it made a
    Filter-masked MLP 1.6x slower than dense): `tfprune.shrink` removes them.
    """
    best, dead, total = 0.0, 0, 0
    for weight in model.weights:
        if not weight.path.split("/")[-1].endswith("kernel"):
            continue
        value = np.asarray(weight.numpy())
        if not value.size:
            continue
        columns = value.reshape(-1, value.shape[-1]) if value.ndim > 1 else value[:, None]
        alive = np.any(columns != 0, axis=0)
        dead += int(np.sum(~alive))
        total += alive.size
        if alive.any():
            best = max(best, float(np.mean(columns[:, alive] == 0)))
    return best, dead, total


def _strip_wrappers(model):
    try:
        from tfprune.wrapper import find_wrappers
    except ImportError:  # pragma: no cover - the wrapper module is part of the package
        return model
    if find_wrappers(model):
        from tfprune.api import strip

        return strip(model)
    return model


def _compute_dtypes(model) -> set:
    """The compute dtypes of every layer of ``model``, nested models included."""
    dtypes, stack = set(), [model]
    while stack:
        layer = stack.pop()
        policy = getattr(layer, "dtype_policy", None)
        if policy is not None and getattr(policy, "compute_dtype", None):
            dtypes.add(policy.compute_dtype)
        stack.extend(getattr(layer, "layers", ()) or ())
    return dtypes


def _float32_model(model):
    """A float32 copy of a mixed-precision (float16/bfloat16 compute) model, same weights.

    LiteRT has no float16 MatMul/Conv kernels, so a ``mixed_float16`` graph does
    not convert. Every layer is re-created from its config with a float32 dtype
    policy (`keras.models.clone_model`, nested models included) and the weights
    (float32 variables under mixed precision) are copied.

    Raises:
        ValueError: If the model cannot be cloned (e.g. a subclassed model).
    """
    import keras

    def clone_layer(layer):
        config = layer.get_config()
        if "dtype" in config:
            config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
        clone.set_weights(model.get_weights())
    except Exception as e:
        raise ValueError(
            f"export_tflite: model '{model.name}' computes in "
            f"{sorted(_compute_dtypes(model) - {'float32'})} (mixed precision) and could not be "
            f"rebuilt in float32 ({type(e).__name__}: {e}); LiteRT has no float16 kernels for "
            f"it. Build the same model under keras.config.set_dtype_policy('float32'), copy the "
            f"weights with set_weights(model.get_weights()) and export that (use "
            f"quantize='float16' for float16 weights)."
        ) from e
    finally:
        keras.config.set_dtype_policy(previous)
    return clone


def _subclassed_converter(model, tf):
    """A converter for a built subclassed model and its input names, in call order.

    The inputs' shapes are those of the model's first call; they are named
    ``input_0, input_1, ...`` in the flattened order of the call arguments.
    """
    import shutil
    import tempfile

    import keras
    from keras.src.export.export_utils import get_input_signature

    try:
        signature = get_input_signature(model)
    except ValueError as e:
        raise ValueError(
            f"export_tflite: subclassed model '{model.name}' has no known input shape; call it "
            f"once on a batch of data (or build it) before exporting ({e})."
        ) from e
    names = []

    def spec(s):
        names.append(f"input_{len(names)}")
        return tf.TensorSpec(s.shape, s.dtype or "float32", name=names[-1])

    signature = keras.tree.map_structure(spec, signature)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", lambda *args: model(*args, training=False), signature)
    directory = tempfile.mkdtemp(prefix="tfprune_export_")
    try:
        archive.write_out(directory, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(directory)
        converter._tfprune_directory = directory  # removed after convert()
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return converter, names


def _is_converter_error(error) -> bool:
    """Whether ``error`` is the converter's own ``ConverterError`` (its class is not public)."""
    try:
        from tensorflow.lite.python.convert_phase import ConverterError
    except ImportError:  # pragma: no cover - private module moved
        return type(error).__name__ == "ConverterError"
    return isinstance(error, ConverterError)


def export_tflite(
    model,
    path=None,
    *,
    quantize=None,
    representative_data=None,
    int8_io=False,
    sparse="auto",
    converter_options=None,
) -> bytes:
    """Converts a Keras 3 model to a TFLite/LiteRT flatbuffer.

    Pruning wrappers are stripped first (`tfprune.strip`), so a pruned model
    exports with its pruned weights exactly zero.

    Sparse encoding (``tf.lite.Optimize.EXPERIMENTAL_SPARSITY``) stores zero
    weights compactly; the converter picks the tensors worth it (at least ~30%
    zeros). Each quantization x sparsity combination was checked against Keras
    on Dense (unstructured, Block((4, 1)), Block((1, 4)) zeros) and every conv
    layer type, with the default interpreter (XNNPACK) and with builtin kernels:

    - ``quantize=None`` (float32): correct everywhere. A Dense kernel with
      Block((4, 1)) zeros is kept sparse and runs on LiteRT's sparse
      FULLY_CONNECTED kernel (about 7x smaller file at 90% sparsity); other
      patterns are densified once at load time (smaller file, same speed).
      ``sparse="auto"`` enables the encoding here.
    - ``"float16"``: wrong outputs (NaN) for Block((4, 1)) Dense kernels and for
      Conv2DTranspose under XNNPACK, so never enabled; ``sparse=True`` raises.
    - ``"dynamic"`` and ``"int8"``: outputs are right with builtin kernels, but
      the default XNNPACK delegate refuses the sparse FULLY_CONNECTED (and the
      dynamic-range sparse CONV_2D), so a default ``Interpreter`` fails to
      allocate. Never enabled by ``"auto"``; ``sparse=True`` forces it with a
      warning (for runtimes without XNNPACK; `run_tflite` falls back to builtin
      kernels by itself). The gzip-compressed size barely changes there.

    Inputs keep their Keras names in the flatbuffer's signature (subclassed
    models: ``input_0, input_1, ...`` in the flattened order of the call
    arguments, with the shapes of the first call). LiteRT orders the input
    tensors its own way, so for a multi-input model the Keras input order is
    recorded in the flatbuffer's metadata (``"tfprune_input_names"``), and
    `run_tflite` pairs arrays with inputs by name.

    A mixed-precision model (``mixed_float16``/``mixed_bfloat16`` compute,
    which LiteRT cannot run) is rebuilt in float32 with the same weights and
    that is exported; the global dtype policy is left as it was. Subclassed
    models cannot be rebuilt: they raise, saying what to do.

    Args:
        model: A built Keras 3 model (Sequential, Functional or subclassed and
            called once on data), possibly containing `PruneWrapper` layers.
        path: If given, the flatbuffer is also written to this file.
        quantize: None (float32), ``"dynamic"`` (int8 weights, float
            activations), ``"float16"`` (float16 weights) or ``"int8"``
            (full integer: int8 weights and activations, calibrated on
            ``representative_data``; ops without an int8 kernel stay float).
        representative_data: Calibration inputs for ``quantize="int8"``: an
            array (or a list of arrays in the Keras input order, or a dict
            ``{input name: array}``) whose first axis enumerates samples, an
            iterable of batches (arrays, lists of arrays, dicts, or ``(x, y)``
            pairs, e.g. a ``tf.data.Dataset``), or a callable returning such
            an iterable. A few hundred samples suffice. Every value must be
            finite.
        int8_io: With ``quantize="int8"``, makes the model's inputs and outputs
            int8 too (otherwise they stay float32 with quantize/dequantize ops
            inside). `run_tflite` hides the difference.
        sparse: ``"auto"`` (default): sparse encoding for float32 models having
            a kernel with at least `AUTO_SPARSITY_THRESHOLD` zeros. ``True``:
            always (float32; dynamic/int8 with a warning; float16 raises).
            ``False``: never.
        converter_options: Extra settings of the `tf.lite.TFLiteConverter`,
            ``{attribute name: value}``, set after tfprune's own. Nested
            attributes are dotted: ``"target_spec.supported_ops"`` (whose
            list may name `tf.lite.OpsSet` members as strings, e.g.
            ``["TFLITE_BUILTINS", "SELECT_TF_OPS"]``) or
            ``"target_spec.supported_types"``. Any public or
            ``_experimental_*`` attribute of the converter or of its
            ``target_spec`` is allowed (e.g. ``"allow_custom_ops"``,
            ``"_experimental_lower_tensor_list_ops"``), except those set by the
            arguments above (``optimizations``, ``representative_dataset``,
            ``inference_input_type``, ``inference_output_type``). An option
            tfprune also sets for ``quantize`` must keep tfprune's value: with
            ``quantize="int8"``, ``target_spec.supported_ops`` must contain
            ``TFLITE_BUILTINS_INT8`` and ``TFLITE_BUILTINS``; with
            ``"float16"``, ``target_spec.supported_types`` must contain
            ``float16``. Recurrent layers (LSTM, GRU) convert with
            ``{"_experimental_default_to_single_batch_in_tensor_list_ops":
            True}`` (builtin ops, LiteRT runs them) or with
            ``{"target_spec.supported_ops": ["TFLITE_BUILTINS",
            "SELECT_TF_OPS"], "_experimental_lower_tensor_list_ops": False}``
            (Select TF ops: they need a runtime linked with the Flex delegate,
            which ai-edge-litert's Python interpreter, hence `run_tflite`, is
            not).

    Returns:
        The flatbuffer bytes.

    Raises:
        TypeError: If ``model`` is not a Keras model or ``converter_options``
            is not a dict with string keys.
        ValueError: If ``quantize`` or ``sparse`` is not an allowed value,
            ``quantize="int8"`` comes without ``representative_data``,
            ``int8_io`` is used without ``quantize="int8"``, the model is
            not built, ``representative_data`` holds NaN/inf values or does
            not match the inputs, the int8 conversion fell back to float (no
            int8 activation in the result), a mixed-precision model cannot
            be rebuilt in float32, a converter option is unknown or conflicts
            with ``quantize``/``int8_io``/``representative_data``, or the
            converter fails (the message names the failing op(s), graph
            node(s) and the options that may help).

    Example:
        >>> blob = export_tflite(model, "model.tflite", quantize="int8",
        ...                      representative_data=x_train[:256])  # doctest: +SKIP
        >>> y = run_tflite(blob, x_test)  # doctest: +SKIP
    """
    import keras
    import tensorflow as tf

    if not isinstance(model, keras.Model):
        raise TypeError(
            f"export_tflite: `model` must be a keras.Model, got {type(model).__name__}."
        )
    if quantize not in QUANTIZE_MODES:
        raise ValueError(
            f"export_tflite: `quantize` must be one of {QUANTIZE_MODES}, got {quantize!r}."
        )
    if not (isinstance(sparse, bool) or (isinstance(sparse, str) and sparse == "auto")):
        raise ValueError(f"export_tflite: `sparse` must be one of {SPARSE_MODES}, got {sparse!r}.")
    if quantize == "int8" and representative_data is None:
        raise ValueError(
            "export_tflite: `quantize='int8'` (full integer) needs `representative_data` "
            "(a few hundred input samples to calibrate activation ranges), got None."
        )
    options = _check_options(converter_options)
    if int8_io and quantize != "int8":
        raise ValueError(
            f"export_tflite: `int8_io=True` needs `quantize='int8'`, got quantize={quantize!r}."
        )
    if sparse is True and quantize in _SPARSE_WRONG:
        raise ValueError(
            f"export_tflite: `sparse=True` is not allowed with quantize={quantize!r}: the sparse "
            f"encoding gives wrong (NaN) outputs there. Use sparse=False or 'auto'."
        )
    from keras.src.models.functional import Functional

    graph_model = isinstance(model, (keras.Sequential, Functional))
    if not model.built or (graph_model and not model.inputs):
        raise ValueError(
            f"export_tflite: model '{model.name}' has no known inputs; build it first "
            f"(e.g. start it with keras.Input(shape) or call it once on data)."
        )

    model = _strip_wrappers(model)
    if _compute_dtypes(model) - {"float32"}:
        if not graph_model:
            raise ValueError(
                f"export_tflite: subclassed model '{model.name}' computes in "
                f"{sorted(_compute_dtypes(model) - {'float32'})} (mixed precision), which "
                f"LiteRT cannot run, and only Sequential/Functional models can be rebuilt in "
                f"float32 here. Create the model under keras.config.set_dtype_policy('float32'), "
                f"call it once, copy the weights with set_weights(model.get_weights()) and "
                f"export that (use quantize='float16' for float16 weights)."
            )
        model = _float32_model(model)
    if sparse == "auto":
        sparsity, dead_units, units = _kernel_sparsity(model)
        use_sparse = quantize is None and sparsity >= AUTO_SPARSITY_THRESHOLD
        if dead_units and dead_units >= DEAD_UNITS_WARNING * units:
            warnings.warn(
                f"export_tflite: model '{model.name}' has {dead_units} units whose weights are "
                f"all zero; LiteRT still computes them. Call tfprune.shrink(model) first to "
                f"remove them and make the model smaller and faster.",
                UserWarning,
                stacklevel=2,
            )
    else:
        use_sparse = bool(sparse)
    if use_sparse and quantize in _SPARSE_NO_XNNPACK:
        warnings.warn(
            f"export_tflite: sparse encoding with quantize={quantize!r} gives a model that "
            f"LiteRT's default XNNPACK delegate refuses; run it with builtin kernels "
            f"(OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES).",
            UserWarning,
            stacklevel=2,
        )

    if graph_model:
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        names = [t.name for t in model.inputs]
    else:
        converter, names = _subclassed_converter(model, tf)
    optimizations = set()
    if quantize is not None:
        optimizations.add(tf.lite.Optimize.DEFAULT)
    if use_sparse:
        optimizations.add(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    settings = {"optimizations": optimizations}
    if quantize == "float16":
        settings["target_spec.supported_types"] = [tf.float16]
    elif quantize == "int8":
        settings["representative_dataset"] = lambda: _representative_samples(
            representative_data, names
        )
        settings["target_spec.supported_ops"] = [
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
            tf.lite.OpsSet.TFLITE_BUILTINS,
        ]
        if int8_io:
            settings["inference_input_type"] = tf.int8
            settings["inference_output_type"] = tf.int8
    try:
        _apply_options(converter, settings, options, quantize, tf)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
            # The calibrator pairs dict samples by name with tf.lite's (deprecated) Interpreter.
            warnings.filterwarnings("ignore", message=r"\s*Warning: tf.lite.Interpreter")
            blob = converter.convert()
    except Exception as e:
        if _is_converter_error(e):
            raise _conversion_error(e, model.name, options) from e
        if options and not str(e).startswith("export_tflite:"):
            raise ValueError(
                f"export_tflite: the conversion of model '{model.name}' with converter_options "
                f"{sorted(options)} failed ({type(e).__name__}: {e}); check those options' "
                f"values."
            ) from e
        raise
    finally:
        directory = getattr(converter, "_tfprune_directory", None)
        if directory is not None:
            import shutil

            shutil.rmtree(directory, ignore_errors=True)
    if quantize == "int8":
        _check_int8(blob, model.name)
    if len(names) > 1:
        # The TFLite input order is not the Keras one: record the Keras order so that
        # run_tflite can pair a list of arrays with the inputs by name.
        signature = set(_signature_inputs(_interpreter(blob, allocate=False)))
        if signature == set(names):
            blob = _add_metadata(blob, _INPUT_NAMES_METADATA, json.dumps(names).encode())
    if path is not None:
        with open(path, "wb") as f:
            f.write(blob)
    return blob
