"""Calibration data for full-integer export, and the check that the result is int8."""

from __future__ import annotations

import numpy as np

from tfprune.export.flatbuffer import tflite_weights


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
