"""Per-layer LiteRT latency tables (NetAdapt-style): the cost model of ``budgets.Latency``.

`LatencyTable.measure` times, for every prunable layer of a model, a one-layer
model with the same configuration and input shape at a grid of widths
(input channels x output units), with the LiteRT interpreter (float32, single
sample, median after warm-up). The cost of a pruned model is then predicted
as

    predict(kept) = rest_us + sum over layers of layer_latency(layer, in_kept, out_kept)

where ``rest_us = dense_us - sum of the layers' latencies at their dense
widths`` gathers what the tables do not see (pooling, BatchNormalization
folded or not, the interpreter's fixed cost per inference minus the copies of
it that every one-layer model pays, fusion). Tables are cached per model
architecture, machine and library versions, so a second `LatencyTable.measure`
of the same model loads instantly.

What ``in_kept`` and ``out_kept`` mean for each layer type:

- ``in_kept``: the number of input features along the channel axis (the last
  one, or axis 1 for ``data_format="channels_first"``) of the layer's input:
  the input channels of a convolution, the fan-in of a Dense layer (for a
  Dense layer after ``Flatten``, the flattened features: kept channels x
  spatial positions).
- ``out_kept``: the layer's units (``units`` of Dense, ``filters`` of a
  convolution). A depthwise layer (``DepthwiseConv1D/2D``, or a grouped
  convolution with one input channel per group) has no free output width: its
  outputs go with its inputs (``out_kept = in_kept x depth_multiplier``), its
  grid is 1-D and ``out_kept`` may be given as None. A grouped convolution
  (``1 < groups < in_channels``) keeps both widths multiples of ``groups``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np

from tfprune import handlers
from tfprune._utils import is_int
from tfprune.export import benchmark_tflite, export_tflite

DEFAULT_FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.125)
"""Default width fractions of the grid (of each layer's input channels and units)."""

CACHE_ENV = "TFPRUNE_CACHE_DIR"
"""Environment variable naming the cache directory (default ``~/.cache/tfprune/latency``)."""

_SCHEMA = 2  # bump when the measurement or the file layout changes: old caches then miss


# --------------------------------------------------------------------------- the model's layers


@dataclass
class LayerEntry:
    """The latency table of one prunable layer.

    Attributes:
        name: the layer's name.
        type: the layer's class name.
        kind: ``"standard"`` (2-D grid over input channels x units),
            ``"depthwise"`` (1-D grid: outputs go with the inputs) or
            ``"grouped"`` (2-D grid of multiples of ``groups``).
        in_total: dense number of input features (see the module docstring).
        out_total: dense number of output units.
        in_grid: measured input widths, ascending (``in_total`` included).
        out_grid: measured output widths, ascending; for ``"depthwise"`` the
            output width of each ``in_grid`` entry.
        us: measured median latency in microseconds: ``us[i][j]`` at
            ``(in_grid[i], out_grid[j])`` (``us[i]`` for ``"depthwise"``),
            summed over the layer's calls.
        multiplier: outputs per input channel (``"depthwise"``), else 1.
        groups: the convolution's ``groups`` (``"grouped"``), else 1.
        calls: the layer's calls: ``[{"input_shape": [...], "count": n}]``
            (batch axis excluded); a layer called more than once is measured
            once per distinct input shape and counted once per call.
        positions: output positions per unit, summed over the calls (the
            product of the output's spatial sizes; 1 for a Dense layer on a
            flat input): ``positions * out_kept`` is the layer's output size,
            which weighs it in the activation fraction that scales the rest.
    """

    name: str
    type: str
    kind: str
    in_total: int
    out_total: int
    in_grid: list
    out_grid: list
    us: list
    multiplier: int = 1
    groups: int = 1
    calls: list = field(default_factory=list)
    positions: int = 1

    @property
    def dense_us(self) -> float:
        """The measured latency at the dense widths."""
        return float(self.us[-1] if self.kind == "depthwise" else self.us[-1][-1])


def _graph_nodes(model):
    from tfprune.surgery.graph import functional_of, iter_nodes

    return iter_nodes(functional_of(model))


def _is_graph_model(layer):
    return isinstance(layer, keras.Sequential) or (
        isinstance(layer, keras.Model) and hasattr(layer, "_nodes_by_depth"))


def _channel_axis(layer, rank):
    return 1 if getattr(layer, "data_format", None) == "channels_first" and rank > 2 else rank - 1


def _collect_calls(model, count=1, found=None):
    """``{name: (layer, {input shape without batch: [calls, output positions per call]})}``."""
    found = {} if found is None else found
    for node in _graph_nodes(model):
        op = node.operation
        if _is_graph_model(op):
            _collect_calls(op, count, found)
            continue
        if not isinstance(op, keras.layers.Layer) or handlers.get_handler(op) is None:
            continue
        inputs = node.input_tensors
        if len(inputs) != 1:
            raise ValueError(
                f"LatencyTable: layer '{op.name}' ({type(op).__name__}) is called on "
                f"{len(inputs)} input tensors; only single-input prunable layers can be timed.")
        shape = tuple(inputs[0].shape[1:])
        if any(d is None for d in shape):
            raise ValueError(
                f"LatencyTable: layer '{op.name}' has an input of shape {(None, *shape)} with an "
                f"unknown non-batch dimension; latency depends on it, so build the model with a "
                f"fixed input shape (e.g. keras.Input((224, 224, 3))) to measure it.")
        layer, shapes = found.setdefault(op.name, (op, {}))
        if layer is not op:
            raise ValueError(
                f"LatencyTable: two different layers are named '{op.name}' (nested models?); "
                f"tables are keyed by layer name, so rename one of them.")
        out = tuple(node.output_tensors[0].shape[1:])
        out_axis = _channel_axis(op, len(out) + 1) - 1
        positions = int(np.prod([d for k, d in enumerate(out) if k != out_axis] or [1]))
        shapes.setdefault(shape, [0, positions])[0] += count
    return found


def _grid(total, fractions, step=1):
    """Sorted unique widths ``round(f * total)`` (multiples of ``step``, at least ``step``)."""
    counts = {total}
    for f in fractions:
        counts.add(max(step, step * math.floor(f * total / step + 0.5)))
    return sorted(c for c in counts if c <= total)


def _describe(layer, shapes, fractions):
    """A `LayerEntry` without measurements (``us`` empty) for ``layer``."""
    handler = handlers.get_handler(layer)
    shape = next(iter(shapes))
    axis = _channel_axis(layer, len(shape) + 1) - 1
    in_total = int(shape[axis])
    out_total = int(handler.num_units(layer))
    config = layer.get_config()
    groups = int(config.get("groups", 1) or 1)
    kind, multiplier, step = "standard", 1, 1
    if isinstance(handler, handlers.DepthwiseHandler):
        kind, multiplier = "depthwise", out_total // in_total
    elif groups > 1 and groups == in_total:
        kind, multiplier = "depthwise", out_total // in_total
    elif groups > 1:
        kind, step = "grouped", groups
    if kind != "depthwise" and "units" not in config and "filters" not in config:
        raise ValueError(
            f"LatencyTable: layer '{layer.name}' ({type(layer).__name__}) has no 'units' or "
            f"'filters' in its config, so it cannot be rebuilt at other widths to time it.")
    for other in shapes:
        if int(other[_channel_axis(layer, len(other) + 1) - 1]) != in_total:  # pragma: no cover
            raise ValueError(f"LatencyTable: layer '{layer.name}' is called on inputs with "
                             f"different channel counts {sorted(shapes)}.")
    in_grid = _grid(in_total, fractions, step)
    out_grid = ([c * multiplier for c in in_grid] if kind == "depthwise"
                else _grid(out_total, fractions, step))
    return LayerEntry(
        name=layer.name, type=type(layer).__name__, kind=kind, in_total=in_total,
        out_total=out_total, in_grid=in_grid, out_grid=out_grid, us=[],
        multiplier=multiplier, groups=groups if kind == "grouped" else 1,
        calls=[{"input_shape": list(s), "count": c} for s, (c, _) in shapes.items()],
        positions=sum(c * p for c, p in shapes.values()))


def _probe_model(layer, entry, input_shape, in_kept, out_kept):
    """A one-layer float32 model: ``layer``'s config at the given widths, random weights."""
    config = dict(layer.get_config())
    config["name"] = "probe"
    config["dtype"] = "float32"
    if entry.kind == "depthwise":
        if "groups" in config and "filters" in config:  # grouped conv, one input per group
            config["groups"] = in_kept
            config["filters"] = in_kept * entry.multiplier
    else:
        config["units" if "units" in config else "filters"] = out_kept
    shape = list(input_shape)
    shape[_channel_axis(layer, len(shape) + 1) - 1] = in_kept
    inputs = keras.Input(tuple(shape), name="x")
    probe = layer.__class__.from_config(config)
    return keras.Model(inputs, probe(inputs), name=f"latency_{entry.name}")


def _kept_of_layer(layer, shape):
    handler = handlers.get_handler(layer)
    axis = _channel_axis(layer, len(shape) + 1) - 1
    return int(shape[axis]), int(handler.num_units(layer))


def _check_model(model, fn):
    from tfprune.wrapper import find_wrappers

    if not isinstance(model, keras.Model):
        raise TypeError(f"{fn}: `model` must be a built keras.Model, got {type(model).__name__}.")
    if not _is_graph_model(model):
        raise ValueError(
            f"{fn}: model '{model.name}' is a subclassed keras.Model ({type(model).__name__}); "
            f"latency tables need a Sequential or Functional model (its layers' input shapes "
            f"come from the graph).")
    if not model.built or (isinstance(model, keras.Sequential)
                           and getattr(model, "_functional", None) is None):
        raise ValueError(f"{fn}: model '{model.name}' is not built; give it a keras.Input "
                         f"(or call it once on data) first.")
    wrappers = find_wrappers(model)
    if wrappers:
        raise ValueError(
            f"{fn}: model '{model.name}' holds PruneWrapper layers "
            f"({', '.join(repr(w.name) for w in wrappers[:3])}{'...' if len(wrappers) > 3 else ''}"
            f"); time the plain model: tfprune.strip(model) first (and tfprune.shrink it for "
            f"`verify`).")


def _scaled_copy(model, fraction):
    """A copy of ``model`` whose prunable layers keep ``round(fraction * units)`` units.

    Layers producing a model output keep their width (as `tfprune.shrink`
    does); the weights are fresh (latency does not depend on their values).

    Raises:
        ValueError: the model has grouped convolutions (their ``groups``
            would have to follow the widths).
        Exception: whatever Keras raises when the narrower graph does not
            build (e.g. a Reshape to a fixed size).
    """
    outputs = {t._keras_history[0].name for t in model.outputs if hasattr(t, "_keras_history")}

    def clone(layer):
        config = layer.get_config()
        if handlers.get_handler(layer) is not None and layer.name not in outputs:
            if int(config.get("groups", 1) or 1) > 1:
                raise ValueError(f"grouped convolution '{layer.name}'")
            for key in ("units", "filters"):
                if key in config:
                    config[key] = max(1, math.floor(fraction * config[key] + 0.5))
        return layer.__class__.from_config(config)

    return keras.models.clone_model(model, clone_function=clone, recursive=True)


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$TFPRUNE_CACHE_DIR`` if set, else ``~/.cache/tfprune/latency``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tfprune" / "latency"


def _versions():
    from importlib import metadata

    import tensorflow as tf

    import tfprune

    try:
        litert = metadata.version("ai-edge-litert")
    except metadata.PackageNotFoundError:  # pragma: no cover - a dependency
        litert = "unknown"
    return {"tfprune": tfprune.__version__, "ai-edge-litert": litert,
            "tensorflow": tf.__version__, "keras": keras.__version__}


def _jsonable(obj):
    if hasattr(obj, "get_config"):
        return {"class": type(obj).__name__, "config": obj.get_config()}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return type(obj).__name__  # never repr(): memory addresses would change the key


def _cache_key(model, calls, *, threads, fractions, runs, warmup, calibration):
    """What a table depends on: architecture (not weights), measurement, machine, versions."""
    return {
        "schema": _SCHEMA,
        "architecture": json.loads(json.dumps(
            {"model": model.get_config(),
             "calls": {n: sorted([list(s), c] for s, (c, _) in shapes.items())
                       for n, (_, shapes) in sorted(calls.items())}},
            sort_keys=True, default=_jsonable)),
        "threads": threads,
        "fractions": [float(f) for f in fractions],
        "calibration": [float(f) for f in calibration],
        "runs": runs,
        "warmup": warmup,
        "machine": {"processor": platform.processor(), "machine": platform.machine(),
                    "node": platform.node(), "cpus": os.cpu_count()},
        "versions": _versions(),
    }


def _key_hash(key):
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- interpolation


def _bracket(grid, x):
    """``(i0, i1, t)``: ``x`` lies at ``(1 - t) * grid[i0] + t * grid[i1]`` (clamped below)."""
    if x <= grid[0]:
        return 0, 0, 0.0
    i1 = int(np.searchsorted(grid, x))  # grid[i1 - 1] < x <= grid[i1]
    if grid[i1] == x:
        return i1, i1, 0.0
    lo, hi = grid[i1 - 1], grid[i1]
    return i1 - 1, i1, (x - lo) / (hi - lo)


def _check_width(value, name, what, total, owner, step=1):
    if not is_int(value):
        raise TypeError(f"{owner}: {what} of layer '{name}' must be an int, got {value!r}.")
    if not 1 <= value <= total or value % step:
        multiple = f" and a multiple of groups={step}" if step > 1 else ""
        raise ValueError(f"{owner}: {what} of layer '{name}' must be in [1, {total}]{multiple}, "
                         f"got {value}.")
    return int(value)


# --------------------------------------------------------------------------- the table


class LatencyTable:
    """Measured per-layer LiteRT latencies of one model, and predictions from them.

    Build one with `LatencyTable.measure` (or `LatencyTable.from_dict`).
    ``predict(kept) = rest_at(kept) + the layers' latencies``. The rest is
    what the one-layer models do not see (pooling, BatchNormalization,
    activations, Flatten, the interpreter's fixed cost, fusion). At the dense
    widths it is ``rest_us = dense_us - the layers' dense latencies``, kept
    signed (a negative rest means the one-layer models together cost more than
    the whole model), so ``predict`` returns exactly the measured ``dense_us``
    there. Most of the rest works on the layers' outputs and shrinks with
    them: the whole model is also timed at uniformly narrower widths
    (``calibration``) and the rest is interpolated linearly in the kept
    fraction of the layers' output activations between those points (and held
    constant below the narrowest). A prediction never goes under
    ``min(dense_us, the slowest single layer at its kept widths)``: a model is
    not faster than one of its layers alone.

    Attributes:
        model_name: the measured model's name.
        threads: LiteRT interpreter threads used.
        fractions: the width fractions of the grid.
        runs: timed inferences per point (median taken).
        warmup: untimed inferences before them.
        dense_us: measured median latency of the whole dense model.
        dense_check_us: the same, measured again after the layer sweep (its
            difference to ``dense_us`` shows the machine's drift and noise).
        layers: ``{layer name: LayerEntry}``, in graph order.
        calibration: the whole model timed at uniformly narrower widths:
            ``[{"fraction", "activations", "measured_us", "layers_us",
            "rest_us"}]`` (``activations``: kept fraction of the layers'
            output activations; ``rest_us = measured_us - layers_us``).
            Empty when no narrower copy could be built
            (``calibration_note`` says why): the rest is then constant.
        calibration_note: why calibration was skipped, or "".
        seconds: wall time the measurement took.
        key: what the cache key was made of (architecture, threads,
            fractions, runs, warm-up, machine, versions).
        from_cache: True when this table was loaded from the cache.
    """

    def __init__(self, *, model_name, threads, fractions, runs, warmup, dense_us,
                 dense_check_us, layers, calibration=(), calibration_note="", seconds=0.0,
                 key=None, from_cache=False):
        self.model_name = model_name
        self.threads = threads
        self.fractions = tuple(fractions)
        self.runs = runs
        self.warmup = warmup
        self.dense_us = float(dense_us)
        self.dense_check_us = float(dense_check_us)
        self.layers = dict(layers)
        self.calibration = [dict(c) for c in calibration]
        self.calibration_note = calibration_note
        self.seconds = float(seconds)
        self.key = key
        self.from_cache = from_cache

    # ------------------------------------------------------------------ measuring

    @classmethod
    def measure(cls, model, *, threads=1, fractions=DEFAULT_FRACTIONS, runs=50, warmup=10,
                calibration=(0.5, 0.25), cache_dir=None, cache=True, progress=True):
        """Measures (or loads from the cache) the latency table of ``model``.

        For each prunable layer (``tfprune.handlers.get_handler(layer)`` not
        None) a one-layer model with the layer's config, at the input shape
        of its call(s) and at every grid width, is exported with
        `tfprune.export_tflite` (float32, ``sparse=False``) and timed with
        `tfprune.benchmark_tflite` (batch 1, ``threads``, median of ``runs``
        after ``warmup``). The grid of a layer is ``round(f * total)`` for
        each fraction ``f`` (at least 1, unique, the dense width always
        included) of its input channels x its units (1-D for depthwise
        layers). The whole model is timed before and after the sweep, and at
        each ``calibration`` fraction of its prunable layers' units (a copy
        with fresh weights; layers producing model outputs keep their width)
        to calibrate the rest (see `LatencyTable`).

        Cost: one conversion (~0.2-0.4 s) plus ``runs + warmup`` inferences
        per grid point, about 25 points per layer with the default fractions.

        Args:
            model: a built Sequential or Functional Keras model without
                `PruneWrapper` layers (`tfprune.strip` it first); nested
                models are followed. Its non-batch input dimensions must be
                known.
            threads: LiteRT interpreter threads.
            fractions: width fractions in (0, 1] of the grid.
            runs: timed inferences per point.
            warmup: untimed inferences per point.
            calibration: width fractions in (0, 1) at which the whole model
                is timed to calibrate the rest; ``()`` for a constant rest.
            cache_dir: directory of the JSON cache files (default:
                `default_cache_dir`: ``$TFPRUNE_CACHE_DIR`` or
                ``~/.cache/tfprune/latency``).
            cache: False to neither read nor write the cache.
            progress: show a tqdm progress bar over the measurements.

        Returns:
            A `LatencyTable`.

        Raises:
            TypeError: ``model`` is not a keras.Model, or an argument has the
                wrong type.
            ValueError: the model is subclassed, not built, holds
                PruneWrapper layers, has no prunable layer or an unknown
                non-batch input dimension; or an argument is out of range.

        Example:
            >>> table = LatencyTable.measure(tfprune.models.lenet5())  # doctest: +SKIP
            >>> table.predict({"fc1": (800, 250)}) < table.dense_us  # doctest: +SKIP
            True
        """
        owner = "LatencyTable.measure"
        _check_model(model, owner)
        for name, value, minimum in (("threads", threads, 1), ("runs", runs, 1),
                                     ("warmup", warmup, 0)):
            if not is_int(value):
                raise TypeError(f"{owner}: `{name}` must be an int >= {minimum}, got {value!r}.")
            if value < minimum:
                raise ValueError(f"{owner}: `{name}` must be an int >= {minimum}, got {value}.")
        fractions = cls._check_fractions(fractions, owner)
        calibration = cls._check_fractions(calibration, owner, "calibration", empty=True)
        if 1.0 in calibration:
            raise ValueError(f"{owner}: `calibration` fractions must be < 1 (the dense model "
                             f"is always timed), got {calibration!r}.")
        calls = _collect_calls(model)
        if not calls:
            raise ValueError(
                f"{owner}: model '{model.name}' has no prunable layer (supported types: "
                f"{', '.join(handlers.supported_layer_types())}); there is nothing to tabulate.")
        key = _cache_key(model, calls, threads=threads, fractions=fractions, runs=runs,
                         warmup=warmup, calibration=calibration)
        path = None
        if cache:
            directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
            path = directory / f"{model.name}-{_key_hash(key)}.json"
            table = cls._load(path, key)
            if table is not None:
                return table
        table = cls._measure(model, calls, key, threads=threads, fractions=fractions, runs=runs,
                             warmup=warmup, calibration=calibration, progress=progress)
        if path is not None:
            table._save(path)
        return table

    @staticmethod
    def _check_fractions(fractions, owner, name="fractions", empty=False):
        try:
            values = tuple(fractions)
        except TypeError:
            raise TypeError(f"{owner}: `{name}` must be a sequence of numbers in (0, 1], got "
                            f"{fractions!r}.") from None
        if not values and not empty:
            raise ValueError(f"{owner}: `{name}` must hold at least one number in (0, 1], "
                             f"got {fractions!r}.")
        for f in values:
            if isinstance(f, bool) or not isinstance(f, (int, float, np.integer, np.floating)):
                raise TypeError(f"{owner}: `{name}` must hold numbers in (0, 1], got {f!r} "
                                f"in {fractions!r}.")
            if not 0.0 < float(f) <= 1.0:
                raise ValueError(f"{owner}: `{name}` must hold numbers in (0, 1], got {f!r} "
                                 f"in {fractions!r}.")
        return tuple(sorted({float(f) for f in values}, reverse=True))

    @classmethod
    def _measure(cls, model, calls, key, *, threads, fractions, runs, warmup, calibration,
                 progress):
        from tqdm.auto import tqdm

        start = time.perf_counter()

        def bench(keras_model):
            blob = export_tflite(keras_model, sparse=False)
            return benchmark_tflite(blob, runs=runs, warmup=warmup, threads=threads)["median_us"]

        entries = {name: _describe(layer, shapes, fractions)
                   for name, (layer, shapes) in calls.items()}
        points = sum(len(e.calls) * len(e.in_grid) * (1 if e.kind == "depthwise"
                                                       else len(e.out_grid))
                     for e in entries.values())
        with tqdm(total=points + 2 + len(calibration), desc=f"latency table '{model.name}'",
                  unit="point", disable=not progress, leave=False) as bar:
            dense_blob = export_tflite(model, sparse=False)
            dense_us = benchmark_tflite(dense_blob, runs=runs, warmup=warmup,
                                        threads=threads)["median_us"]
            bar.update()
            for name, entry in entries.items():
                layer = calls[name][0]
                bar.set_postfix_str(name)
                outs = [None] if entry.kind == "depthwise" else entry.out_grid
                grid = np.zeros((len(entry.in_grid), len(outs)))
                for call in entry.calls:
                    for i, n_in in enumerate(entry.in_grid):
                        for j, n_out in enumerate(outs):
                            probe = _probe_model(layer, entry, call["input_shape"], n_in, n_out)
                            grid[i, j] += call["count"] * bench(probe)
                            bar.update()
                entry.us = (grid[:, 0] if entry.kind == "depthwise" else grid).tolist()
            table = cls(model_name=model.name, threads=threads, fractions=fractions, runs=runs,
                        warmup=warmup, dense_us=dense_us, dense_check_us=dense_us,
                        layers=entries, key=key)
            bar.set_postfix_str("whole model")
            for fraction in calibration:
                try:
                    narrow = _scaled_copy(model, fraction)
                    kept = table.kept_of(narrow)
                except Exception as e:  # noqa: BLE001 - any reason: fall back to a constant rest
                    table.calibration_note = (
                        f"no uniformly narrower copy of '{model.name}' ({type(e).__name__}: {e})")
                    bar.update(len(calibration) - len(table.calibration))
                    table.calibration = []
                    break
                measured = bench(narrow)
                layers_us = sum(table.layer_latency(n, *k) for n, k in kept.items())
                table.calibration.append({
                    "fraction": fraction, "activations": table.activations(kept),
                    "measured_us": measured, "layers_us": layers_us,
                    "rest_us": measured - layers_us})
                bar.update()
            table.dense_check_us = benchmark_tflite(dense_blob, runs=runs, warmup=warmup,
                                                    threads=threads)["median_us"]
            bar.update()
        table.seconds = time.perf_counter() - start
        return table

    # ------------------------------------------------------------------ cache files

    def to_dict(self) -> dict:
        """A JSON-serializable dict of the table (`from_dict` reads it back)."""
        return {"schema": _SCHEMA, "model_name": self.model_name, "threads": self.threads,
                "fractions": list(self.fractions), "runs": self.runs, "warmup": self.warmup,
                "dense_us": self.dense_us, "dense_check_us": self.dense_check_us,
                "calibration": self.calibration, "calibration_note": self.calibration_note,
                "seconds": self.seconds, "key": self.key,
                "layers": [asdict(e) for e in self.layers.values()]}

    @classmethod
    def from_dict(cls, data, *, from_cache=False):
        """The table saved by `to_dict`."""
        layers = {e["name"]: LayerEntry(**e) for e in data["layers"]}
        return cls(model_name=data["model_name"], threads=data["threads"],
                   fractions=data["fractions"], runs=data["runs"], warmup=data["warmup"],
                   dense_us=data["dense_us"], dense_check_us=data["dense_check_us"],
                   layers=layers, calibration=data.get("calibration", ()),
                   calibration_note=data.get("calibration_note", ""),
                   seconds=data.get("seconds", 0.0), key=data.get("key"),
                   from_cache=from_cache)

    @classmethod
    def _load(cls, path, key):
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # unreadable or half-written: measure again
            return None
        if data.get("schema") != _SCHEMA or data.get("key") != key:
            return None  # a hash collision or an older layout
        try:
            return cls.from_dict(data, from_cache=True)
        except (KeyError, TypeError):
            return None

    def _save(self, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file

    # ------------------------------------------------------------------ predictions

    @property
    def rest_us(self) -> float:
        """``dense_us`` minus the layers' latencies at their dense widths (may be negative)."""
        return self.dense_us - sum(e.dense_us for e in self.layers.values())

    def _checked_kept(self, kept, owner):
        """``{name: (in_kept, out_kept)}`` for every layer (dense widths where not given)."""
        kept = {} if kept is None else kept
        if not isinstance(kept, dict):
            raise TypeError(f"{owner}: `kept` must be a dict {{layer name: (in_kept, out_kept)}}, "
                            f"got {type(kept).__name__}.")
        for name, pair in kept.items():
            self._entry(name, owner)
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"{owner}: kept[{name!r}] must be a pair (in_kept, out_kept), "
                                 f"got {pair!r}.")
        return {name: tuple(kept.get(name, (e.in_total, e.out_total)))
                for name, e in self.layers.items()}

    def activations(self, kept=None) -> float:
        """Kept fraction of the layers' output activations (``positions x out_kept``), in (0, 1].

        Args:
            kept: as in `predict`.
        """
        kept = self._checked_kept(kept, "LatencyTable.activations")
        total = sum(e.positions * e.out_total for e in self.layers.values())
        done = 0
        for name, e in self.layers.items():
            n_in, n_out = kept[name]
            if e.kind == "depthwise":
                n_out = n_in * e.multiplier
            done += e.positions * n_out
        return done / total

    def rest_at(self, kept=None) -> float:
        """The rest (microseconds) at the given widths: ``rest_us`` calibrated (see the class).

        Args:
            kept: as in `predict`.
        """
        x = self.activations(kept)
        points = {1.0: self.rest_us}
        for c in self.calibration:
            if c["activations"] < 1.0:
                points.setdefault(float(c["activations"]), float(c["rest_us"]))
        xs = sorted(points)
        return float(np.interp(x, xs, [points[k] for k in xs]))

    def _entry(self, name, owner):
        entry = self.layers.get(name)
        if entry is None:
            raise ValueError(f"{owner}: layer {name!r} is not in the latency table of "
                             f"'{self.model_name}'; its layers are {list(self.layers)}.")
        return entry

    def layer_latency(self, layer_name, in_kept, out_kept=None) -> float:
        """Interpolated latency (microseconds) of one layer at the given widths.

        Bilinear between grid points (linear for depthwise layers), exact at
        them; below the smallest grid width the smallest width's value is
        used (no extrapolated savings).

        Args:
            layer_name: a layer of the table.
            in_kept: kept input features, in ``[1, in_total]`` (see the
                module docstring for what they are per layer type).
            out_kept: kept units in ``[1, out_total]``; for a depthwise
                layer None or ``in_kept * multiplier``.

        Raises:
            ValueError: unknown layer, or a width out of range (or not a
                multiple of ``groups``, or for a depthwise layer not
                ``in_kept * multiplier``).
            TypeError: a width is not an int.
        """
        owner = "LatencyTable.layer_latency"
        entry = self._entry(layer_name, owner)
        step = entry.groups
        in_kept = _check_width(in_kept, layer_name, "in_kept", entry.in_total, owner, step)
        i0, i1, s = _bracket(entry.in_grid, in_kept)
        if entry.kind == "depthwise":
            if out_kept is not None and out_kept != in_kept * entry.multiplier:
                raise ValueError(
                    f"{owner}: layer '{layer_name}' is depthwise ({entry.multiplier} output(s) "
                    f"per input channel), so out_kept must be None or in_kept x "
                    f"{entry.multiplier} = {in_kept * entry.multiplier}, got {out_kept!r}.")
            us = entry.us
            return float((1 - s) * us[i0] + s * us[i1])
        if out_kept is None:
            raise ValueError(f"{owner}: layer '{layer_name}' ({entry.type}) needs out_kept "
                             f"(kept units in [1, {entry.out_total}]), got None.")
        out_kept = _check_width(out_kept, layer_name, "out_kept", entry.out_total, owner, step)
        j0, j1, t = _bracket(entry.out_grid, out_kept)
        us = entry.us
        return float((1 - s) * ((1 - t) * us[i0][j0] + t * us[i0][j1])
                     + s * ((1 - t) * us[i1][j0] + t * us[i1][j1]))

    def predict(self, kept=None) -> float:
        """Predicted latency (microseconds) of the model with the given widths.

        `rest_at` plus every layer's `layer_latency`, at least
        ``min(dense_us, the largest single layer latency)``. At the dense
        widths this is ``dense_us`` (up to float rounding).

        Args:
            kept: ``{layer name: (in_kept, out_kept)}``; layers not named keep
                their dense widths. None: the dense model.

        Raises:
            ValueError: an unknown layer name, a width out of range, or a
                value that is not an ``(in_kept, out_kept)`` pair.
        """
        given = {} if kept is None else kept
        kept = self._checked_kept(given, "LatencyTable.predict")
        total, largest = self.rest_at(kept), 0.0
        for name, entry in self.layers.items():
            us = self.layer_latency(name, *kept[name]) if name in given else entry.dense_us
            total += us
            largest = max(largest, us)
        return float(max(total, min(self.dense_us, largest)))

    # ------------------------------------------------------------------ shrunk models

    def kept_of(self, model) -> dict:
        """``{layer name: (in_kept, out_kept)}`` read from a (shrunk) model's layers.

        Every layer of the table must be in ``model`` (matched by name) with
        the spatial input shapes the table was measured at, and ``model``
        must have no other prunable layer.

        Raises:
            ValueError: a layer is missing, extra, or called at other shapes
                (plus the errors of `LatencyTable.measure` about the model).
        """
        owner = "LatencyTable.kept_of"
        _check_model(model, owner)
        calls = _collect_calls(model)
        missing = [n for n in self.layers if n not in calls]
        extra = [n for n in calls if n not in self.layers]
        if missing or extra:
            raise ValueError(
                f"{owner}: model '{model.name}' does not match the latency table of "
                f"'{self.model_name}': table layers missing from it {missing}, prunable layers "
                f"not in the table {extra}. Pass the shrunk version of the measured model.")
        kept = {}
        for name, (layer, shapes) in calls.items():
            entry = self.layers[name]

            def spatial(shape, layer=layer):
                axis = _channel_axis(layer, len(shape) + 1) - 1
                return [int(d) for k, d in enumerate(shape) if k != axis]

            if sorted(spatial(s) for s in shapes) != sorted(
                    spatial(c["input_shape"]) for c in entry.calls):
                raise ValueError(
                    f"{owner}: layer '{name}' of model '{model.name}' is called on inputs of "
                    f"shape(s) {[list(s) for s in shapes]}; the table measured it at "
                    f"{[c['input_shape'] for c in entry.calls]} (other spatial sizes).")
            kept[name] = _kept_of_layer(layer, next(iter(shapes)))
        return kept

    def verify(self, shrunk_model, *, runs=None, warmup=None) -> dict:
        """Measures the real latency of a (shrunk) model and compares it with `predict`.

        The kept widths are read from ``shrunk_model`` (`kept_of`); the model
        is exported (float32, ``sparse=False``) and timed like the table
        (same threads; ``runs``/``warmup`` default to the table's).

        Returns:
            ``{"predicted_us", "measured_us", "ratio", "kept"}`` with
            ``ratio = measured_us / predicted_us`` (above 1: slower than
            predicted) and ``kept`` the widths read.

        Raises:
            ValueError: see `kept_of`; widths out of the table's range.
        """
        kept = self.kept_of(shrunk_model)
        predicted = self.predict(kept)
        blob = export_tflite(shrunk_model, sparse=False)
        measured = benchmark_tflite(
            blob, runs=self.runs if runs is None else runs,
            warmup=self.warmup if warmup is None else warmup, threads=self.threads)["median_us"]
        return {"predicted_us": predicted, "measured_us": float(measured),
                "ratio": float(measured) / predicted, "kept": kept}

    # ------------------------------------------------------------------ reporting

    def summary(self) -> str:
        """A readable table: each layer's grid and latencies, the rest, predicted vs measured."""
        source = "loaded from cache" if self.from_cache else "measured"
        points = sum(len(e.calls) * len(e.in_grid) * (1 if e.kind == "depthwise"
                                                       else len(e.out_grid))
                     for e in self.layers.values())
        lines = [
            f"LiteRT latency table of '{self.model_name}' (float32, {self.threads} thread(s), "
            f"median of {self.runs} runs after {self.warmup} warm-up; {points} points, "
            f"{source}, measured in {self.seconds:.1f} s)",
            "",
            f"{'layer':<20} {'type':<16} {'in':>6} {'out':>6} {'grid':>7} "
            f"{'dense us':>10} {'min us':>9} {'share':>6}",
        ]
        for e in self.layers.values():
            grid = (f"{len(e.in_grid)}" if e.kind == "depthwise"
                    else f"{len(e.in_grid)}x{len(e.out_grid)}")
            low = e.us[0] if e.kind == "depthwise" else e.us[0][0]
            lines.append(f"{e.name[:20]:<20} {e.type[:16]:<16} {e.in_total:>6} {e.out_total:>6} "
                         f"{grid:>7} {e.dense_us:>10.1f} {low:>9.1f} "
                         f"{e.dense_us / self.dense_us:>6.0%}")
        layer_sum = sum(e.dense_us for e in self.layers.values())
        drift = self.dense_check_us / self.dense_us - 1 if self.dense_us else 0.0
        lines += [
            "",
            f"{'sum of the layers at dense widths':<44} {layer_sum:>10.1f} us",
            f"{'rest (dense - sum; kept signed)':<44} {self.rest_us:>10.1f} us",
            f"{'predicted dense (rest + sum)':<44} {self.predict():>10.1f} us",
            f"{'measured dense':<44} {self.dense_us:>10.1f} us",
            f"{'measured dense again, after the sweep':<44} {self.dense_check_us:>10.1f} us "
            f"({drift:+.1%})",
        ]
        if self.calibration:
            lines += ["", "rest calibration (whole model at uniformly narrower widths):",
                      f"{'fraction':>10} {'activations':>12} {'measured us':>12} "
                      f"{'layers us':>10} {'rest us':>9}"]
            lines += [f"{c['fraction']:>10.3g} {c['activations']:>12.1%} "
                      f"{c['measured_us']:>12.1f} {c['layers_us']:>10.1f} {c['rest_us']:>9.1f}"
                      for c in self.calibration]
        else:
            lines.append(f"rest constant: {self.calibration_note or 'no calibration asked'}")
        return "\n".join(lines)

    def __repr__(self):
        return (f"LatencyTable('{self.model_name}', {len(self.layers)} layers, threads="
                f"{self.threads}, dense {self.dense_us:.1f} us, rest {self.rest_us:.1f} us)")
