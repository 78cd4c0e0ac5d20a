"""Shared helpers of the benchmarks: machine info, latency rounds, tables, plots."""

from __future__ import annotations

import datetime
import os
import platform
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"


def quiet_tf():
    """Silences TensorFlow's C++ logging (call before importing TensorFlow)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def data_dir():
    """The shared data folder: ``TFPRUNE_DATA_DIR`` or ``<repo>/../shared/data``; None if absent."""
    path = os.environ.get("TFPRUNE_DATA_DIR")
    path = Path(path) if path else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


def cpu_model():
    """The CPU model name from /proc/cpuinfo (Linux) or `platform.processor()`."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info():
    """Date, CPU, cores and library versions, for the header of every result file."""
    import importlib.metadata as md

    def version(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": version("tensorflow"),
        "keras": version("keras"),
        "tf_keras": version("tf_keras"),
        "tensorflow-model-optimization": version("tensorflow-model-optimization"),
        "ai-edge-litert": version("ai-edge-litert"),
        "tfprune": version("tfprune"),
    }


def machine_markdown(info):
    """The machine info as a markdown bullet list."""
    libs = ", ".join(
        f"{k} {info[k]}"
        for k in ("tensorflow", "keras", "tf_keras", "tensorflow-model-optimization",
                  "ai-edge-litert", "tfprune")
    )
    return (f"- date: {info['date']}\n- machine: {info['cpu']}, {info['cores']} cores "
            f"(shared with other jobs: compare ratios within a run)\n"
            f"- python {info['python']}; {libs}\n")


def measure_latencies(blobs, *, runs=200, rounds=3, threads=1):
    """Single-sample LiteRT latency of several flatbuffers, measured in interleaved rounds.

    The machine is shared, so a burst of load would bias whichever model was
    being timed. Every round times each model once (`tfprune.benchmark_tflite`,
    ``runs`` inferences); the result per model is the median of its round
    medians, with the min and max over all rounds.

    Args:
        blobs: dict key -> TFLite bytes.
        runs: timed inferences per model per round.
        rounds: number of rounds.
        threads: interpreter threads.

    Returns:
        dict key -> ``{"median_us", "min_us", "max_us"}``.
    """
    from tfprune import benchmark_tflite

    medians = {key: [] for key in blobs}
    mins = {key: np.inf for key in blobs}
    maxs = {key: 0.0 for key in blobs}
    for _ in range(rounds):
        for key, blob in blobs.items():
            r = benchmark_tflite(blob, runs=runs, threads=threads)
            medians[key].append(r["median_us"])
            mins[key] = min(mins[key], r["min_us"])
            maxs[key] = max(maxs[key], r["max_us"])
    return {
        key: {"median_us": float(np.median(medians[key])), "min_us": float(mins[key]),
              "max_us": float(maxs[key])}
        for key in blobs
    }


def markdown_table(header, rows, align=None):
    """A GitHub markdown table; ``align`` is a string of 'l'/'r' per column (default: l then r)."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class EpochTimer:
    """A Keras callback (built lazily for the given Keras module) recording seconds per epoch."""

    def __new__(cls, keras_module):
        class _Timer(keras_module.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.times = []

            def on_epoch_begin(self, epoch, logs=None):
                self._start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.times.append(time.perf_counter() - self._start)

        return _Timer()


def fmt_kib(n):
    return f"{n / 1024:.1f}"
