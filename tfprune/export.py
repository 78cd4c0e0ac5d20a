"""TFLite/LiteRT export, inference and benchmarking for (pruned) Keras 3 models.

Conversion goes through `tf.lite.TFLiteConverter.from_keras_model`; this module
adds what the converter lacks: a checked choice of quantization x sparse
encoding (see `export_tflite`), a runner that always takes and returns float
arrays (`run_tflite`), a latency benchmark (`benchmark_tflite`), and readers
for the flatbuffer (`tflite_size`, `tflite_weights`) so that tests can check
that a sparsity pattern survived conversion.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import time
import warnings

import numpy as np

__all__ = [
    "QuantizedArray",
    "benchmark_tflite",
    "export_tflite",
    "run_tflite",
    "tflite_size",
    "tflite_weights",
]

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


# -- export -------------------------------------------------------------------------------------


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


def _representative_samples(data, names):
    """Yields one calibration sample at a time, batch 1, as float32 arrays.

    A single-input model gets a list ``[array]``; a multi-input model gets a
    dict ``{input name: array}``, so that the converter's calibrator pairs the
    arrays with the model inputs by name (the TFLite input order is not the
    Keras one). Lists of arrays are in the Keras input order (``names``).

    Raises:
        ValueError: If the data holds no samples, the wrong number of input
            arrays, unknown input names, or a NaN or infinite value.
    """
    n_inputs = len(names)

    def split(arrays):
        arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
        if not len(arrays[0]):
            raise ValueError("export_tflite: `representative_data` holds no samples.")
        for name, a in zip(names, arrays, strict=True):
            finite = np.isfinite(a.reshape(len(a), -1)).all(axis=1)
            if not finite.all():
                raise ValueError(
                    f"export_tflite: `representative_data` for input '{name}' holds NaN or "
                    f"infinite values (sample {int(np.argmin(finite))} of its batch); "
                    f"calibration needs finite inputs, or the converter silently leaves the "
                    f"model in float. Remove or fix those samples."
                )
        for i in range(len(arrays[0])):
            parts = [a[i : i + 1] for a in arrays]
            yield parts if n_inputs == 1 else dict(zip(names, parts, strict=True))

    def from_dict(mapping):
        missing = [k for k in names if k not in mapping]
        extra = [k for k in mapping if k not in names]
        if missing or extra:
            raise ValueError(
                f"export_tflite: `representative_data` keys must be the model's input names "
                f"{names}; got {list(mapping)} (missing {missing}, unknown {extra})."
            )
        return [mapping[k] for k in names]

    if callable(data):
        data = data()
    if isinstance(data, dict):  # {input name: array of samples}
        yield from split(from_dict(data))
        return
    if hasattr(data, "shape") and not isinstance(data, (list, tuple)):  # one array or tensor
        if n_inputs != 1:
            raise ValueError(
                f"export_tflite: the model has {n_inputs} inputs, so `representative_data` "
                f"must be a list of {n_inputs} arrays or an iterable of such lists; "
                f"got one array of shape {tuple(data.shape)}."
            )
        yield from split([data])
        return
    if (
        isinstance(data, (list, tuple))
        and n_inputs > 1
        and len(data) == n_inputs
        and all(hasattr(a, "shape") for a in data)
    ):
        yield from split(data)
        return
    for batch in data:  # an iterable of batches: arrays, lists of arrays, or (x, y) pairs
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], dict):
            batch = batch[0]  # ({name: x}, y)
        if isinstance(batch, dict):
            parts = from_dict(batch)
        elif isinstance(batch, (list, tuple)):
            parts = list(batch) if n_inputs > 1 else [batch[0]]
        else:
            parts = [batch]
        if n_inputs > 1 and isinstance(parts[0], (list, tuple)):  # ((x1, x2), y)
            parts = list(parts[0])
        if len(parts) != n_inputs:
            raise ValueError(
                f"export_tflite: each batch of `representative_data` must give {n_inputs} "
                f"input arrays, got {len(parts)}."
            )
        yield from split(parts)


_INPUT_NAMES_METADATA = "tfprune_input_names"
"""Flatbuffer metadata entry holding the Keras input order (a JSON list of input names)."""


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


def _signature_inputs(interpreter) -> dict:
    """``{signature input name: input detail}`` of the model's single signature, or {}."""
    try:
        if len(interpreter.get_signature_list()) != 1:
            return {}
        return dict(interpreter.get_signature_runner().get_input_details())
    except (ValueError, RuntimeError):
        return {}


def _add_metadata(blob: bytes, name: str, data: bytes) -> bytes:
    """The flatbuffer with one more (or a replaced) metadata entry ``name`` holding ``data``."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(blob), 0)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(data, dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = name
    entry.buffer = len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != name.encode()] + [entry]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _read_metadata(blob: bytes, name: str):
    """The bytes of metadata entry ``name`` of the flatbuffer, or None."""
    from ai_edge_litert import schema_py_generated as schema

    root = schema.Model.GetRootAs(blob, 0)
    for i in range(root.MetadataLength()):
        entry = root.Metadata(i)
        if entry.Name() is not None and entry.Name().decode() == name:
            buffer = root.Buffers(entry.Buffer())
            return buffer.DataAsNumpy().tobytes() if buffer.DataLength() else b""
    return None


def _check_int8(blob, model_name):
    """Raises if an int8 export holds no int8 activation (the converter fell back to float)."""
    from ai_edge_litert.interpreter import Interpreter

    constants = set(tflite_weights(blob))
    for detail in Interpreter(model_content=blob).get_tensor_details():
        if detail["dtype"] == np.int8 and detail["quantization"][0]:
            if detail["name"] not in constants:
                return
    raise ValueError(
        f"export_tflite: quantize='int8' gave a model of '{model_name}' with no int8 "
        f"activations: the converter fell back to float (calibration produced no usable "
        f"ranges). Check `representative_data` (real, varied input samples)."
    )


def export_tflite(
    model,
    path=None,
    *,
    quantize=None,
    representative_data=None,
    int8_io=False,
    sparse="auto",
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

    Returns:
        The flatbuffer bytes.

    Raises:
        TypeError: If ``model`` is not a Keras model.
        ValueError: If ``quantize`` or ``sparse`` is not an allowed value,
            ``quantize="int8"`` comes without ``representative_data``,
            ``int8_io`` is used without ``quantize="int8"``, the model is
            not built, ``representative_data`` holds NaN/inf values or does
            not match the inputs, the int8 conversion fell back to float (no
            int8 activation in the result), or a mixed-precision model cannot
            be rebuilt in float32.

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
        if dead_units >= DEAD_UNITS_WARNING * units:
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
    converter.optimizations = optimizations
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        converter.representative_dataset = lambda: _representative_samples(
            representative_data, names
        )
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
            tf.lite.OpsSet.TFLITE_BUILTINS,
        ]
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
            # The calibrator pairs dict samples by name with tf.lite's (deprecated) Interpreter.
            warnings.filterwarnings("ignore", message=r"\s*Warning: tf.lite.Interpreter")
            blob = converter.convert()
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
        signature = set(_signature_inputs(_interpreter(blob)))
        if signature == set(names):
            blob = _add_metadata(blob, _INPUT_NAMES_METADATA, json.dumps(names).encode())
    if path is not None:
        with open(path, "wb") as f:
            f.write(blob)
    return blob


# -- running ------------------------------------------------------------------------------------


def _load(model) -> bytes:
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model)
    if isinstance(model, (str, os.PathLike)):
        with open(model, "rb") as f:
            return f.read()
    raise TypeError(
        f"`model` must be the .tflite bytes or a path to a .tflite file, "
        f"got {type(model).__name__}."
    )


def _interpreter(blob, threads=None, shapes=None):
    """An allocated Interpreter, with input shapes resized to ``shapes`` if given.

    Uses the default delegate (XNNPACK) and falls back to builtin kernels when
    the delegate refuses the model (e.g. sparse quantized FULLY_CONNECTED).
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    errors = []
    for resolver in (OpResolverType.AUTO, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES):
        interpreter = Interpreter(
            model_content=blob, num_threads=threads, experimental_op_resolver_type=resolver
        )
        try:
            if shapes is not None:
                for detail, shape in zip(interpreter.get_input_details(), shapes, strict=True):
                    if tuple(detail["shape"]) != tuple(shape):
                        interpreter.resize_tensor_input(detail["index"], list(shape))
            interpreter.allocate_tensors()
        except RuntimeError as e:
            errors.append(e)
            if "delegate" not in str(e).lower():
                raise
            continue
        return interpreter
    raise errors[-1]


def _quantize_input(x, detail):
    dtype = detail["dtype"]
    scale, zero_point = detail["quantization"]
    if dtype in (np.int8, np.uint8, np.int16) and scale:
        info = np.iinfo(dtype)
        q = np.round(np.asarray(x, np.float32) / scale + zero_point)
        return np.clip(q, info.min, info.max).astype(dtype)
    return np.asarray(x).astype(dtype, copy=False)


def _dequantize_output(y, detail):
    scale, zero_point = detail["quantization"]
    if detail["dtype"] in (np.int8, np.uint8, np.int16) and scale:
        return (y.astype(np.float32) - zero_point) * np.float32(scale)
    return y


def _output_order(interpreter):
    """Output details in the model's output order (``output_0, output_1, ...`` of the signature)."""
    details = interpreter.get_output_details()
    try:
        signature = interpreter.get_signature_runner().get_output_details()
    except (ValueError, RuntimeError):
        return details
    numbered = {}
    for name, detail in signature.items():
        match = re.fullmatch(r"output_(\d+)", name)
        if match is None:
            return details
        numbered[int(match.group(1))] = detail["index"]
    by_index = {d["index"]: d for d in details}
    if set(numbered.values()) != set(by_index):
        return details
    return [by_index[numbered[k]] for k in sorted(numbered)]


def _ordered_inputs(blob, interpreter, x):
    """Pairs the user's arrays with the interpreter's input details.

    Returns ``[(label, detail, array)]`` in the interpreter's input order.
    """
    details = interpreter.get_input_details()
    signature = _signature_inputs(interpreter)
    by_index = {d["index"]: d for d in details}
    if isinstance(x, dict):
        if not signature:
            raise ValueError(
                "run_tflite: `x` is a dict but the model has no (single) signature giving its "
                "input names; pass a list of arrays in the interpreter's input order."
            )
        missing = sorted(set(signature) - set(x))
        extra = sorted(set(x) - set(signature))
        if missing or extra:
            raise ValueError(
                f"run_tflite: `x` keys must be the model's input names {sorted(signature)}; "
                f"got {sorted(x)} (missing {missing}, unknown {extra})."
            )
        return [(k, by_index[signature[k]["index"]], x[k]) for k in signature]
    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    if len(xs) != len(details):
        raise ValueError(
            f"run_tflite: the model has {len(details)} input(s), got {len(xs)} array(s)."
        )
    if len(details) == 1:
        label = next(iter(signature), details[0]["name"])
        return [(label, details[0], xs[0])]
    recorded = _read_metadata(blob, _INPUT_NAMES_METADATA)
    names = json.loads(recorded.decode()) if recorded is not None else None
    if names is None or set(names) != set(signature):
        raise ValueError(
            f"run_tflite: the model has {len(details)} inputs and its Keras input order is "
            f"unknown (it was not exported by tfprune.export_tflite), so a list of arrays "
            f"cannot be paired safely with them; pass a dict keyed by input name "
            f"{sorted(signature) or [d['name'] for d in details]}."
        )
    return [(k, by_index[signature[k]["index"]], a) for k, a in zip(names, xs, strict=True)]


def run_tflite(model, x):
    """Runs a TFLite model with the LiteRT interpreter on a batch of inputs.

    Inputs are paired with the model's input tensors by name: the TFLite input
    order generally differs from the Keras one. Each array's per-sample shape
    is checked against the input's shape. The input tensors are resized to
    the batch size; a model with a fixed batch size runs in chunks of that
    size. Quantized (int8) inputs and outputs are handled here: inputs are
    quantized with the input tensor's scale and zero point, outputs
    dequantized, so callers always pass and get floats. When the default
    XNNPACK delegate refuses the model, LiteRT's builtin kernels run it.

    Args:
        model: The flatbuffer bytes (as returned by `export_tflite`) or a path
            to a ``.tflite`` file.
        x: A batch: an array whose first axis is the batch (single-input
            model); a dict ``{input name: array}`` (the Keras input names,
            kept by the converter; ``input_0, input_1, ...`` for a subclassed
            model); or a list of arrays in the Keras model's input order
            (``model.inputs``), for models exported by `export_tflite`, which
            records that order.

    Returns:
        A float ``numpy.ndarray`` with the batch on the first axis, or a list
        of them (in the model's output order) for a multi-output model.

    Raises:
        TypeError: If ``model`` is neither bytes nor a path.
        ValueError: If the number or names of the inputs, their per-sample
            shapes or their batch sizes do not match the model, or a list is
            given for a multi-input model whose Keras input order is unknown.

    Example:
        >>> blob = export_tflite(model)  # doctest: +SKIP
        >>> np.allclose(run_tflite(blob, x), model.predict(x), atol=1e-5)  # doctest: +SKIP
        True
    """
    blob = _load(model)
    probe = _interpreter(blob)
    inputs = _ordered_inputs(blob, probe, x)
    order = {d["index"]: i for i, d in enumerate(probe.get_input_details())}
    inputs.sort(key=lambda item: order[item[1]["index"]])
    xs = []
    for label, detail, a in inputs:
        a = np.asarray(a)
        expected = tuple(int(d) for d in detail["shape_signature"])
        sample = tuple(None if d < 0 else d for d in expected[1:])
        if a.ndim != len(expected) or any(
            e is not None and e != g for e, g in zip(sample, a.shape[1:], strict=True)
        ):
            raise ValueError(
                f"run_tflite: input '{label}' takes samples of shape {sample} (a batch of shape "
                f"{(None, *sample)}), got an array of shape {a.shape}."
            )
        xs.append(a)
    n = len(xs[0])
    if not n:
        raise ValueError(f"run_tflite: `x` holds no samples (batch of shape {xs[0].shape}).")
    if any(len(a) != n for a in xs):
        raise ValueError(
            f"run_tflite: all inputs need the same batch size, got {[len(a) for a in xs]}."
        )
    batch = int(inputs[0][1]["shape_signature"][0])

    def invoke(interpreter, arrays):
        for detail, a in zip(interpreter.get_input_details(), arrays, strict=True):
            interpreter.set_tensor(detail["index"], _quantize_input(a, detail))
        interpreter.invoke()
        return [
            _dequantize_output(interpreter.get_tensor(d["index"]), d)
            for d in _output_order(interpreter)
        ]

    def chunked(size):
        interpreter = _interpreter(blob, shapes=[(size,) + a.shape[1:] for a in xs])
        parts = [invoke(interpreter, [a[i : i + size] for a in xs]) for i in range(0, n, size)]
        for out in parts:
            if any(len(o) != size for o in out):
                raise ValueError(
                    f"run_tflite: the model's outputs do not have the batch on their first "
                    f"axis (batches of {size} gave {[len(o) for o in out]} rows)."
                )
        return [np.concatenate(p) for p in zip(*parts, strict=True)]

    if batch > 0:  # fixed batch size
        if n % batch:
            raise ValueError(
                f"run_tflite: the model has a fixed batch size of {batch}; got a batch of {n} "
                f"samples, not a multiple of it."
            )
        outputs = chunked(batch)
    else:
        try:
            outputs = invoke(_interpreter(blob, shapes=[a.shape for a in xs]), xs)
        except RuntimeError:  # the graph does not resize: one sample at a time
            outputs = chunked(1)
        else:
            if any(len(o) != n for o in outputs):
                outputs = chunked(1)
    return outputs[0] if len(outputs) == 1 else outputs


def benchmark_tflite(model, *, runs=200, threads=1, warmup=20) -> dict:
    """Measures the latency of one single-sample inference with the LiteRT interpreter.

    Inputs are resized to batch 1 and filled with random values; after
    ``warmup`` untimed runs, each of ``runs`` calls to ``invoke()`` is timed
    with `time.perf_counter_ns`.

    Args:
        model: The flatbuffer bytes or a path to a ``.tflite`` file.
        runs: Number of timed inferences.
        threads: Interpreter threads (1 by default, for comparable numbers).
        warmup: Number of untimed inferences first.

    Returns:
        A dict with ``median_us``, ``mean_us``, ``min_us``, ``max_us``,
        ``p90_us`` (latency in microseconds), ``runs``, ``threads`` and
        ``size_bytes`` (the flatbuffer size).

    Raises:
        ValueError: If ``runs`` < 1 or ``threads`` < 1.

    Example:
        >>> benchmark_tflite(export_tflite(model))["median_us"]  # doctest: +SKIP
        41.7
    """
    for name, value, minimum in (("runs", runs, 1), ("threads", threads, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(
                f"benchmark_tflite: `{name}` must be an int >= {minimum}, got {value!r}."
            )
    blob = _load(model)
    probe = _interpreter(blob, threads=threads)
    shapes = [(1,) + tuple(d["shape"][1:]) for d in probe.get_input_details()]
    interpreter = _interpreter(blob, threads=threads, shapes=shapes)
    rng = np.random.default_rng(0)
    for detail in interpreter.get_input_details():
        sample = rng.random(detail["shape"], dtype=np.float32)
        interpreter.set_tensor(detail["index"], _quantize_input(sample, detail))
    for _ in range(warmup):
        interpreter.invoke()
    times = np.empty(runs, dtype=np.float64)
    for i in range(runs):
        start = time.perf_counter_ns()
        interpreter.invoke()
        times[i] = time.perf_counter_ns() - start
    times /= 1000.0
    return {
        "median_us": float(np.median(times)),
        "mean_us": float(np.mean(times)),
        "min_us": float(np.min(times)),
        "max_us": float(np.max(times)),
        "p90_us": float(np.percentile(times, 90)),
        "runs": runs,
        "threads": threads,
        "size_bytes": len(blob),
    }


# -- reading the flatbuffer ---------------------------------------------------------------------


def tflite_size(model) -> dict:
    """Sizes of a TFLite flatbuffer: raw and gzip-compressed (what a download costs).

    Args:
        model: The flatbuffer bytes or a path to a ``.tflite`` file.

    Returns:
        ``{"bytes": raw size, "gzip_bytes": gzip-compressed size}``.

    Example:
        >>> tflite_size(export_tflite(model))  # doctest: +SKIP
        {'bytes': 39336, 'gzip_bytes': 35571}
    """
    blob = _load(model)
    return {"bytes": len(blob), "gzip_bytes": len(gzip.compress(blob, compresslevel=9))}


class QuantizedArray(np.ndarray):
    """The raw integer values of a quantized weight tensor, with its quantization parameters.

    Attributes:
        scale: Per-tensor (shape ``(1,)``) or per-channel scales.
        zero_point: Zero points, same shape as ``scale``.
        axis: The quantized (channel) dimension for per-channel scales.
    """

    def __new__(cls, values, scale, zero_point, axis):
        obj = np.asarray(values).view(cls)
        obj.scale = np.asarray(scale, np.float32)
        obj.zero_point = np.asarray(zero_point, np.int64)
        obj.axis = int(axis)
        return obj

    def __array_finalize__(self, obj):
        self.scale = getattr(obj, "scale", None)
        self.zero_point = getattr(obj, "zero_point", None)
        self.axis = getattr(obj, "axis", 0)

    def dequantize(self) -> np.ndarray:
        """The float values: ``(q - zero_point) * scale`` (per channel along ``axis``)."""
        shape = [1] * self.ndim
        if self.scale.size > 1:
            shape[self.axis] = -1
        q = np.asarray(self, dtype=np.float32)
        zero_point = self.zero_point.astype(np.float32).reshape(shape)
        return (q - zero_point) * self.scale.reshape(shape)


_TENSOR_DTYPES = {
    "FLOAT32": np.float32,
    "FLOAT16": np.float16,
    "FLOAT64": np.float64,
    "INT32": np.int32,
    "INT64": np.int64,
    "INT16": np.int16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "BOOL": np.bool_,
}


def _index_vector(schema, kind, table):
    """Reads a SparseIndexVector union member as an int64 array."""
    classes = {
        schema.SparseIndexVector.Int32Vector: schema.Int32Vector,
        schema.SparseIndexVector.Uint16Vector: schema.Uint16Vector,
        schema.SparseIndexVector.Uint8Vector: schema.Uint8Vector,
    }
    vector = classes[kind]()
    vector.Init(table.Bytes, table.Pos)
    return vector.ValuesAsNumpy().astype(np.int64)


def _densify(schema, values, sparsity, shape):
    """Expands the compressed ``values`` of a sparse tensor to its dense ``shape``.

    The encoding (TFLite's ``SparsityParameters``): the dense shape, with each
    blocked dimension split into (blocks, block size), is traversed in
    ``traversal_order``; a DENSE level enumerates all its positions, a
    SPARSE_CSR level only those listed in ``array_indices`` between the
    parent's ``array_segments``. The stored values follow that traversal.
    """
    order = sparsity.TraversalOrderAsNumpy().astype(int)
    block_map = sparsity.BlockMapAsNumpy().astype(int) if sparsity.BlockMapLength() else []
    levels = len(order)
    prev = np.zeros(1, dtype=np.int64)  # position of each node in its level's storage
    coords = np.zeros((1, levels), dtype=np.int64)  # coordinate per traversal level
    sizes = np.zeros(levels, dtype=np.int64)
    for level in range(levels):
        meta = sparsity.DimMetadata(level)
        if meta.Format() == schema.DimensionType.DENSE:
            size = meta.DenseSize()
            sizes[level] = size
            prev = (prev[:, None] * size + np.arange(size)).reshape(-1)
            coords = np.repeat(coords, size, axis=0)
            coords[:, level] = np.tile(np.arange(size), len(coords) // max(size, 1))
        else:
            segments = _index_vector(schema, meta.ArraySegmentsType(), meta.ArraySegments())
            indices = _index_vector(schema, meta.ArrayIndicesType(), meta.ArrayIndices())
            counts = segments[prev + 1] - segments[prev]
            starts = np.repeat(segments[prev], counts)
            offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            prev = starts + offsets
            coords = np.repeat(coords, counts, axis=0)
            coords[:, level] = indices[prev]
    if len(prev) != values.size:
        raise ValueError(
            f"tflite_weights: sparse tensor holds {values.size} values, its index "
            f"describes {len(prev)}."
        )
    expanded = np.zeros((len(prev), levels), dtype=np.int64)
    expanded[:, order] = coords
    expanded_sizes = np.zeros(levels, dtype=np.int64)
    expanded_sizes[order] = sizes
    dense_index = expanded[:, : len(shape)].copy()
    for j, dim in enumerate(block_map):
        block_size = expanded_sizes[len(shape) + j]
        dense_index[:, dim] = dense_index[:, dim] * block_size + expanded[:, len(shape) + j]
    dense = np.zeros(shape, dtype=values.dtype)
    dense[tuple(dense_index.T)] = values.reshape(-1)
    return dense


def tflite_weights(model, *, dequantize=False) -> dict:
    """Reads the constant tensors (weights, biases, constants) back from a TFLite flatbuffer.

    Sparse-encoded tensors are expanded to their dense shape, so zeros show as
    zeros whatever the encoding. Quantized tensors come back as their raw
    integer values (a `QuantizedArray` with ``scale``, ``zero_point`` and
    ``axis``), or as floats with ``dequantize=True``. float16 weights keep
    their dtype.

    Args:
        model: The flatbuffer bytes or a path to a ``.tflite`` file.
        dequantize: Return quantized tensors as float32 values.

    Returns:
        ``{tensor name: numpy array}`` for every tensor of the main subgraph
        whose data is stored in the flatbuffer; names are those the converter
        gave (e.g. ``"functional/dense/MatMul"``). A Dense kernel appears in
        TFLite's ``[units, fan_in]`` layout (transposed).

    Example:
        >>> w = tflite_weights(export_tflite(model, quantize="int8", representative_data=x))
        ... # doctest: +SKIP
        >>> kernel = w["functional/dense/MatMul"]  # doctest: +SKIP
        >>> kernel.dtype, kernel.scale.shape  # doctest: +SKIP
        (dtype('int8'), (16,))
    """
    from ai_edge_litert import schema_py_generated as schema

    blob = _load(model)
    root = schema.Model.GetRootAs(blob, 0)
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    graph = root.Subgraphs(0)
    out = {}
    for t in range(graph.TensorsLength()):
        tensor = graph.Tensors(t)
        buffer = root.Buffers(tensor.Buffer())
        if buffer is None:
            continue
        if buffer.Offset() > 1:  # data stored after the flatbuffer (models over 2 GB)
            raw = blob[buffer.Offset() : buffer.Offset() + buffer.Size()]
        elif buffer.DataLength():
            raw = buffer.DataAsNumpy().tobytes()
        else:
            continue
        dtype = _TENSOR_DTYPES.get(type_names.get(tensor.Type()))
        if dtype is None:
            continue
        values = np.frombuffer(raw, dtype=dtype)
        shape = tuple(int(s) for s in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
        sparsity = tensor.Sparsity()
        if sparsity is not None:
            values = _densify(schema, values, sparsity, shape)
        else:
            values = values.reshape(shape)
        quant = tensor.Quantization()
        if quant is not None and quant.ScaleLength() and np.issubdtype(dtype, np.integer):
            q = QuantizedArray(
                values,
                quant.ScaleAsNumpy(),
                quant.ZeroPointAsNumpy() if quant.ZeroPointLength() else np.zeros(1),
                quant.QuantizedDimension(),
            )
            values = q.dequantize() if dequantize else q
        name = tensor.Name().decode()
        out[name] = values if isinstance(values, QuantizedArray) else np.array(values)
    return out
