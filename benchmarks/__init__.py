"""Benchmarks: tfprune against dense training and tfmot, and shrink latency.

Entry points (run from the repository root):

- ``python -m benchmarks.run --quick|--full``: accuracy, sparsity, FLOPs,
  TFLite size and LiteRT latency of dense, tfprune methods and tfmot.
- ``python -m benchmarks.shrink_latency``: LiteRT speed-up of `tfprune.shrink`
  against the FLOPs reduction.

This package must not import TensorFlow at import time: `benchmarks.tfmot_baseline`
runs in its own process and sets ``TF_USE_LEGACY_KERAS=1`` before importing it.
"""
