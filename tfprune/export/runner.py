"""Running and timing TFLite flatbuffers with the LiteRT interpreter.

`run_tflite` always takes and returns float arrays (it quantizes int8 inputs
and dequantizes int8 outputs), pairs arrays with inputs by name and falls
back to builtin kernels when the default XNNPACK delegate refuses a model;
`benchmark_tflite` measures single-sample latency.
"""

from __future__ import annotations

import json
import re
import time

import numpy as np

from tfprune.export.flatbuffer import _INPUT_NAMES_METADATA, _flex_ops, _load, _read_metadata


def _signature_inputs(interpreter) -> dict:
    """``{signature input name: input detail}`` of the model's single signature, or {}."""
    try:
        if len(interpreter.get_signature_list()) != 1:
            return {}
        return dict(interpreter.get_signature_runner().get_input_details())
    except (ValueError, RuntimeError):
        return {}


def _interpreter(blob, threads=None, shapes=None, allocate=True):
    """An allocated Interpreter, with input shapes resized to ``shapes`` if given.

    Uses the default delegate (XNNPACK) and falls back to builtin kernels when
    the delegate refuses the model (e.g. sparse quantized FULLY_CONNECTED).
    With ``allocate=False``, returns the interpreter unallocated (enough to
    read the inputs and signatures, also of models LiteRT cannot run).

    Raises:
        ValueError: If the model holds Select TF (Flex) ops, which the
            ai-edge-litert interpreter cannot run.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    if not allocate:
        return Interpreter(model_content=blob, num_threads=threads)
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
            flex = _flex_ops(blob)
            if flex:
                raise ValueError(
                    f"The model holds Select TF (Flex) ops {flex} (exported with "
                    f"'SELECT_TF_OPS' in target_spec.supported_ops), which the ai-edge-litert "
                    f"interpreter cannot run: it has no Flex delegate. Run it on a LiteRT "
                    f"runtime linked with the Flex delegate (e.g. Android's "
                    f"tensorflow-lite-select-tf-ops), or export it with builtin ops only."
                ) from e
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
