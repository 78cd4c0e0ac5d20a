"""Whole-model budgets: prune until the *shrunk* model meets a FLOPs, parameter or latency target.

`tfprune.prune(model, method, budget=budgets.FLOPs(0.5))` ranks the coupled
unit groups of the whole model (`tfprune.groups`) by the method's importance
and removes the least important units, in every layer at once, until the
model that `tfprune.shrink` would produce keeps at most ``keep`` of the dense
model's cost. The per-layer sparsity of the method is then not used (it may
be None); its schedule only times the pruning: with ``schedule=None`` the
target holds from the first pruning step, with a schedule the cost moves from
the dense cost to the target along the schedule's curve
(`tfprune.schedules.PruningSchedule.progress`) and meets it at ``end_step``.

**Importance normalization.** Layers score their units on different scales
(an L2 norm grows with the fan-in). Each member layer's unit scores are
divided by their mean over the layer's units before they are summed over
the members of a group (``normalize="mean"``, the default), so a group is
compared with the groups of other layers by how it ranks within its own
layers. ``normalize="none"`` sums raw scores; ``normalize="cost"`` divides the
group's mean-normalized importance by the cost one of its channels saves
(cheap channels are kept longer).

**Cost model.** `CostModel` computes from the dependency graph, without
shrinking, what `tfprune.sparsity_report` (FLOPs) and ``count_params``
(parameters) give for the shrunk model: every kernel keeps
``size x kept inputs / inputs x kept units / units`` weights, a per-channel
layer (BatchNormalization, a depthwise convolution) keeps its kept channels'
weights. `budgets.Latency` uses per-layer LiteRT latency tables measured on
this machine (`tfprune.latency.LatencyTable`) instead.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from tfprune import handlers
from tfprune._utils import Configurable, check_fraction

_PKG = "tfprune"
_NORMALIZE = ("mean", "none", "cost")


class Budget(Configurable):
    """Base class: a whole-model target ``keep`` (0 < keep <= 1) of the dense cost.

    Args:
        keep: the fraction of the dense model's cost the shrunk model may keep.
        normalize: how unit importances are made comparable across layers:
            ``"mean"`` (default), ``"none"`` or ``"cost"`` (see the module docstring).
    """

    #: The cost measured: "flops", "params" or "latency".
    kind = None

    def __init__(self, keep, normalize="mean"):
        name = type(self).__name__
        self.keep = check_fraction(keep, "keep", owner=name, allow_one=True)
        if self.keep <= 0:
            raise ValueError(f"{name}: `keep` must be in (0, 1], got {keep!r}.")
        if normalize not in _NORMALIZE:
            raise ValueError(f"{name}: `normalize` must be one of {_NORMALIZE}, "
                             f"got {normalize!r}.")
        self.normalize = normalize

    def get_config(self):
        return {"keep": self.keep, "normalize": self.normalize}

    def cost_model(self, model):
        """The `CostModel` of ``model`` for this budget's kind of cost."""
        return CostModel(model, self.kind)


@keras.saving.register_keras_serializable(package=_PKG)
class FLOPs(Budget):
    """The shrunk model keeps at most ``keep`` of the dense model's FLOPs.

    FLOPs as `tfprune.sparsity_report` counts them: 2 x multiply-adds of one
    sample in the prunable layers (Dense, convolutions).

    Example:
        >>> pruned = tfprune.prune(model, methods.Magnitude(structure=structures.Filter()),
        ...                        budget=tfprune.budgets.FLOPs(0.5))
    """

    kind = "flops"


@keras.saving.register_keras_serializable(package=_PKG)
class Params(Budget):
    """The shrunk model keeps at most ``keep`` of the dense model's parameters (``count_params``).

    Example:
        >>> pruned = tfprune.prune(model, methods.Taylor(), budget=tfprune.budgets.Params(0.3))
    """

    kind = "params"


@keras.saving.register_keras_serializable(package=_PKG)
class Latency(Budget):
    """The shrunk model keeps at most ``keep`` of the dense model's *measured* LiteRT latency.

    At the start of training the dense model's layers are timed on this
    machine at a grid of widths (`tfprune.latency.LatencyTable`, NetAdapt
    style, cached per model, machine and versions, with a progress bar); the
    units are then chosen so that the latency the table predicts for the
    shrunk model is at most ``keep`` of the measured dense latency. Check the
    result with `verify`, which times the shrunk model itself.

    Args:
        keep: fraction of the dense median latency the shrunk model may take.
        threads: LiteRT interpreter threads (as in `tfprune.benchmark_tflite`).
        normalize: see `Budget`.
        fractions: width fractions of the per-layer grid.
        runs: timed inferences per grid point (median taken).
        cache_dir: where tables are cached (None: ``$TFPRUNE_CACHE_DIR`` or
            ``~/.cache/tfprune/latency``).

    Example:
        >>> budget = tfprune.budgets.Latency(0.4)
        >>> pruned = tfprune.prune(model, methods.Magnitude(structure=structures.Filter()),
        ...                        budget=budget)
        >>> pruned.fit(x, y, callbacks=[tfprune.callbacks.Pruning()])
        >>> small = tfprune.shrink(tfprune.strip(pruned))
        >>> budget.verify(model, small)        # predicted vs measured, same run
    """

    kind = "latency"

    def __init__(self, keep, threads=1, normalize="mean", fractions=(1.0, 0.75, 0.5, 0.25, 0.125),
                 runs=50, cache_dir=None):
        super().__init__(keep, normalize)
        from tfprune._utils import check_int

        self.threads = check_int(threads, "threads", owner="Latency", minimum=1)
        self.fractions = tuple(float(f) for f in fractions)
        self.runs = check_int(runs, "runs", owner="Latency", minimum=1)
        self.cache_dir = None if cache_dir is None else str(cache_dir)

    def get_config(self):
        return {**super().get_config(), "threads": self.threads,
                "fractions": list(self.fractions), "runs": self.runs,
                "cache_dir": self.cache_dir}

    def table(self, model):
        """The (cached) `tfprune.latency.LatencyTable` of ``model``'s dense architecture."""
        from tfprune.api import strip
        from tfprune.latency import LatencyTable

        plain = strip(model)  # also for a plain model: the same config, the same cache key
        return LatencyTable.measure(plain, threads=self.threads, fractions=self.fractions,
                                    runs=self.runs, cache_dir=self.cache_dir)

    def cost_model(self, model):
        return CostModel(model, "latency", table=self.table(model))

    def verify(self, model, shrunk_model):
        """Times ``shrunk_model`` and compares it with the table's prediction and the dense latency.

        Args:
            model: the dense (or pruned) model the budget was set for.
            shrunk_model: the result of `tfprune.shrink`.

        Returns:
            ``{"predicted_us", "measured_us", "ratio", "dense_us", "measured_over_dense",
            "target_us", "met"}``; ``met`` is ``measured_us <= keep * dense_us``.
        """
        table = self.table(model)
        result = table.verify(shrunk_model)
        result.update(dense_us=table.dense_us,
                      measured_over_dense=result["measured_us"] / table.dense_us,
                      target_us=self.keep * table.dense_us,
                      met=result["measured_us"] <= self.keep * table.dense_us)
        return result


def get(identifier):
    """Resolves None, a `Budget` or its config dict."""
    if identifier is None or isinstance(identifier, Budget):
        return identifier
    if isinstance(identifier, dict):
        obj = keras.saving.deserialize_keras_object(identifier)
        if isinstance(obj, Budget):
            return obj
    raise TypeError(
        "`budget` must be None or a tfprune.budgets object (budgets.FLOPs(keep), "
        f"budgets.Params(keep), budgets.Latency(keep)), got {identifier!r}.")


# ---------------------------------------------------------------------------
# The cost model.


def _spatial(shape):
    dims = list(shape[1:-1])
    if any(d is None for d in dims):
        return None
    return math.prod(dims) if dims else 1


class _Layer:
    """Cost bookkeeping of one layer: its kernels, its input rows and units."""

    def __init__(self, layer, kind, io):
        self.layer = layer
        self.name = layer.name
        handler = handlers.get_handler(layer)
        self.prunable = handler is not None
        self.rows = int(io.input.shape[-1])
        self.removed_rows = set()
        self.removed_units = set()
        self.units = handler.num_units(layer) if self.prunable else 0
        self.const = 0.0
        self.terms = []  # (weight, scales_with_rows, scales_with_units)
        groups = int(getattr(layer, "groups", 1) or 1)
        depthwise_like = groups > 1 and groups == self.rows
        if self.prunable:
            out_spatial = _spatial(io.output.shape)
            in_spatial = _spatial(io.input.shape)
            for spec in handler.kernels:
                var = getattr(layer, spec.name)
                size = float(np.prod(var.shape))
                if kind == "flops":
                    spatial = in_spatial if spec.layout == handlers.TRANSPOSED else out_spatial
                    if spatial is None:
                        raise ValueError(
                            f"budgets.FLOPs: layer '{layer.name}' has an unknown spatial size "
                            f"({tuple(io.output.shape)}); give the model a fixed input shape.")
                    size *= 2 * spatial
                if spec.layout == handlers.DEPTHWISE:
                    self.terms.append((size, True, False))  # units go with input channels
                elif depthwise_like:
                    self.terms.append((size, False, spec.produces_units))
                else:
                    self.terms.append((size, True, spec.produces_units))
            bias = getattr(layer, handler.bias or "", None) if handler.bias else None
            if bias is not None and kind == "params":
                depthwise = handler.unit_spec().layout == handlers.DEPTHWISE
                self.terms.append((float(np.prod(bias.shape)), depthwise, not depthwise))
        elif kind == "params":
            self.const = float(sum(np.prod(v.shape) for v in layer.weights))

    def follower(self, kind):
        """Makes this (non-prunable) layer's weights scale with its kept input channels."""
        if kind == "params" and not self.prunable and self.const:
            self.terms.append((self.const, True, False))
            self.const = 0.0

    def cost(self):
        fin = 1.0 - len(self.removed_rows) / self.rows if self.rows else 1.0
        fout = 1.0 - len(self.removed_units) / self.units if self.units else 1.0
        total = self.const
        for size, by_rows, by_units in self.terms:
            total += size * (fin if by_rows else 1.0) * (fout if by_units else 1.0)
        return total


class CostModel:
    """The FLOPs or parameters of the model `tfprune.shrink` would give, from unit masks.

    Args:
        model: a (pruned, stripped or plain) Sequential or Functional model.
        kind: ``"flops"`` or ``"params"``.

    Example:
        >>> cm = CostModel(pruned, "flops")
        >>> cm.dense, cm.cost()                  # before / after removing the masked units
    """

    def __init__(self, model, kind="flops", table=None):
        from tfprune.surgery.graph import DependencyGraph, unwrap

        if kind not in ("flops", "params", "latency"):
            raise ValueError("CostModel: `kind` must be 'flops', 'params' or 'latency', "
                             f"got {kind!r}.")
        if (kind == "latency") != (table is not None):
            raise ValueError("CostModel: kind='latency' needs a `table` "
                             "(tfprune.latency.LatencyTable), and only it.")
        self.kind = kind
        self.table = table
        self.graph = DependencyGraph(model)
        self.layers = {}
        from tfprune._utils import iter_layers

        for layer in iter_layers(model):
            inner = unwrap(layer)
            if isinstance(inner, keras.Model) or not inner.weights:
                continue
            try:
                layer.input  # noqa: B018 - a layer never called has no input to measure
            except (AttributeError, ValueError):
                continue
            self.layers[inner.name] = _Layer(inner, kind, layer)
        # Per group: which (layer, rows) go with each channel.
        self.effects = []
        for g in self.graph.groups:
            eff = [[] for _ in range(g.size)]
            for layer, idx in g.producers:
                rec = self.layers.get(layer.name)
                if rec is not None:
                    for i, u in enumerate(np.asarray(idx).tolist()):
                        eff[i].append((rec, "unit", (u,)))
            for layer, rows in g.consumers:
                rec = self.layers.get(layer.name)
                if rec is not None:
                    rows = np.asarray(rows).reshape(g.size, -1)
                    for i in range(g.size):
                        eff[i].append((rec, "row", tuple(rows[i].tolist())))
            for layer, idx in g.followers:
                rec = self.layers.get(layer.name)
                if rec is not None:
                    rec.follower(kind)
                    for i, p in enumerate(np.asarray(idx).tolist()):
                        eff[i].append((rec, "row", (p,)))
            self.effects.append(eff)
        self.dense = self.cost()

    def cost(self):
        """The current total cost (with the removals applied so far)."""
        if self.kind == "latency":
            return float(self.table.predict(self.kept()))
        return float(sum(rec.cost() for rec in self.layers.values()))

    def kept(self):
        """``{layer name: (kept input features, kept units)}`` of the prunable layers the
        latency table knows (for ``kind="latency"``)."""
        out = {}
        for name, rec in self.layers.items():
            if rec.prunable and name in self.table.layers:
                entry = self.table.layers[name]
                fin = rec.rows - len(rec.removed_rows)
                in_kept = int(round(entry.in_total * fin / rec.rows))
                if entry.kind == "depthwise":  # the units go with the input channels
                    out[name] = (in_kept, None)
                else:
                    out[name] = (in_kept, rec.units - len(rec.removed_units))
        return out

    def remove(self, group_index, channel):
        """Applies the removal of ``channel`` of group ``group_index``; returns the cost saved."""
        if self.kind == "latency":
            before = self.cost()
            for rec, what, items in self.effects[group_index][channel]:
                (rec.removed_units if what == "unit" else rec.removed_rows).update(items)
            return before - self.cost()
        recs = {id(rec): rec for rec, _, _ in self.effects[group_index][channel]}
        before = sum(rec.cost() for rec in recs.values())
        for rec, what, items in self.effects[group_index][channel]:
            (rec.removed_units if what == "unit" else rec.removed_rows).update(items)
        return before - sum(rec.cost() for rec in recs.values())

    def saving(self, group_index, channel):
        """The cost one more removed ``channel`` of group ``group_index`` saves (now)."""
        recs = {id(rec): rec for rec, _, _ in self.effects[group_index][channel]}
        saved = [(rec, set(rec.removed_units), set(rec.removed_rows)) for rec in recs.values()]
        delta = self.remove(group_index, channel)
        for rec, units, rows in saved:
            rec.removed_units, rec.removed_rows = units, rows
        return delta

    def reset(self):
        for rec in self.layers.values():
            rec.removed_rows, rec.removed_units = set(), set()


def select(groups, importance, cost_model, target, *, min_keep=None, removed=None):
    """Greedy global selection: removes the least important group channels until the cost
    is at most ``target``.

    Args:
        groups: the group indices (in ``cost_model.graph.groups``) that may lose channels.
        importance: ``{group index: float array [size]}``.
        cost_model: a `CostModel` (reset first).
        target: the cost to reach.
        min_keep: ``{group index: int}``, the fewest channels a group keeps (default 1).
        removed: ``{group index: bool array}`` of channels already removed (kept removed).

    Returns:
        ``({group index: bool keep mask}, reached cost)``.
    """
    cost_model.reset()
    keep = {gi: np.ones(len(importance[gi]), bool) for gi in groups}
    if removed:
        for gi, gone in removed.items():
            if gi in keep:
                for c in np.flatnonzero(gone):
                    keep[gi][c] = False
                    cost_model.remove(gi, int(c))
    order = sorted(((float(importance[gi][c]), gi, c) for gi in groups
                    for c in range(len(importance[gi])) if keep[gi][c]),
                   key=lambda t: (t[0], t[1], t[2]))
    cost = cost_model.cost()
    min_keep = min_keep or {}
    for _, gi, c in order:
        if cost <= target:
            break
        if keep[gi].sum() <= max(1, min_keep.get(gi, 1)):
            continue
        keep[gi][c] = False
        cost -= cost_model.remove(gi, c)
    return keep, cost_model.cost()
