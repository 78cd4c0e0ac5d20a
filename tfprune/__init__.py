"""tfprune: structured pruning for Keras 3 that makes LiteRT models smaller and faster.

Example:
    >>> import tfprune
    >>> from tfprune import methods, structures
    >>> pruned = tfprune.prune(model, methods.Magnitude(0.5, structure=structures.Filter()))
    >>> pruned.fit(x, y, callbacks=[tfprune.callbacks.Pruning()])
    >>> small = tfprune.shrink(tfprune.strip(pruned))
"""

__version__ = "0.1.0"

from tfprune import (  # noqa: E402
    budgets,
    callbacks,
    datasets,
    latency,
    methods,
    models,
    schedules,
    structures,
)
from tfprune.api import prune, strip  # noqa: E402
from tfprune.export import benchmark_tflite, export_tflite, run_tflite  # noqa: E402
from tfprune.report import Report, sparsity_report  # noqa: E402
from tfprune.surgery import shrink  # noqa: E402
from tfprune.wrapper import PruneWrapper  # noqa: E402

__all__ = [
    "PruneWrapper", "Report", "benchmark_tflite", "budgets", "callbacks", "datasets",
    "export_tflite", "latency", "methods", "models", "prune", "run_tflite", "schedules", "shrink",
    "sparsity_report", "strip", "structures",
]
