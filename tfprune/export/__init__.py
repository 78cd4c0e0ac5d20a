"""TFLite/LiteRT export, inference and benchmarking for (pruned) Keras 3 models.

Conversion goes through `tf.lite.TFLiteConverter`; this package adds what the
converter lacks: a checked choice of quantization x sparse encoding and a
checked pass-through of converter options (`export_tflite`, in
``tfprune.export.converter``), a runner that always takes and returns float
arrays and a latency benchmark (`run_tflite`, `benchmark_tflite`, in
``tfprune.export.runner``), and readers for the flatbuffer (`tflite_size`,
`tflite_weights`, in ``tfprune.export.flatbuffer``) so that tests can check
that a sparsity pattern survived conversion.
"""

from tfprune.export.converter import (
    AUTO_SPARSITY_THRESHOLD,
    DEAD_UNITS_WARNING,
    QUANTIZE_MODES,
    SPARSE_MODES,
    export_tflite,
)
from tfprune.export.flatbuffer import QuantizedArray, tflite_size, tflite_weights
from tfprune.export.runner import benchmark_tflite, run_tflite

__all__ = [
    "AUTO_SPARSITY_THRESHOLD",
    "DEAD_UNITS_WARNING",
    "QUANTIZE_MODES",
    "SPARSE_MODES",
    "QuantizedArray",
    "benchmark_tflite",
    "export_tflite",
    "run_tflite",
    "tflite_size",
    "tflite_weights",
]
