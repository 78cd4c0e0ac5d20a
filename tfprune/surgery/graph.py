"""Channel dependency graph over Sequential, Functional and nested Keras models.

`DependencyGraph(model)` walks the model's functional graph (recursing into
nested models, seeing through `keras.layers.Wrapper`s such as
`tfprune.PruneWrapper`) and finds, for every prunable output unit (a Dense
neuron, a convolution filter), the set of coupled channels that can only be
removed together: the same channel of every input of an `Add`, the channel
offsets of a `Concatenate`, the rows of a `Dense` after `Flatten`, the
per-channel weights of `BatchNormalization` and `DepthwiseConv2D`, the filters
of a grouped convolution, the channels of element-wise operation nodes (`x +
3.0`, `keras.ops.relu6(x)`, `x * y`: a Functional built from plain tensor
operations, like MobileNetV3's hard sigmoid), ...

Where it cannot follow the channels exactly (LayerNormalization over the
channels, a Lambda, an unknown layer or operation) it *stops*: `graph.stops`
names each place and why, and the channels reaching it are never removed.

Example:
    ```python
    graph = DependencyGraph(model)
    for group in graph.groups:
        if group.blocked_reason is None:
            scores = group.scores()            # L2 norm summed over coupled producers
            weakest = np.argsort(scores)[: group.size // 2]
            for layer, units in group.producers:
                print(layer.name, units[weakest])
    ```
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import numpy as np

from tfprune import handlers as _handlers

__all__ = ["DependencyGraph", "ChannelGroup", "TensorInfo", "unwrap"]

_KERAS_WRAPPERS = (keras.layers.TimeDistributed, keras.layers.Bidirectional)


def unwrap(layer):
    """The layer a `keras.layers.Wrapper` (e.g. `tfprune.PruneWrapper`) wraps, recursively.

    `TimeDistributed` and `Bidirectional` change what the inner layer computes
    and are returned as they are.
    """
    while isinstance(layer, keras.layers.Wrapper) and not isinstance(layer, _KERAS_WRAPPERS):
        layer = layer.layer
    return layer


def _producer_name(tensor):
    history = getattr(tensor, "_keras_history", None)
    return f"'{history[0].name}'" if history else f"tensor '{tensor.name}'"


def _is_graph_model(layer):
    return isinstance(layer, keras.Sequential) or (
        isinstance(layer, keras.Model) and hasattr(layer, "_nodes_by_depth"))


def functional_of(model):
    """The Functional graph of a Sequential or Functional model."""
    if isinstance(model, keras.Sequential):
        f = getattr(model, "_functional", None)
        if f is None:
            raise ValueError(f"Sequential model '{model.name}' is not built: give it an "
                             "`keras.Input` or call it once before building its graph")
        return f
    if not hasattr(model, "_nodes_by_depth"):
        raise TypeError(f"model '{model.name}' ({type(model).__name__}) is a subclassed model; "
                        "only Sequential and Functional models have a graph to follow")
    return model


def iter_nodes(f):
    """Nodes of a Functional model in execution order (inputs first)."""
    for depth in sorted(f._nodes_by_depth, reverse=True):
        yield from f._nodes_by_depth[depth]


@dataclass
class TensorInfo:
    """What the graph knows about the last axis of one Keras tensor.

    Attributes:
        slots: int array, one slot per channel; equal roots = coupled.
        const: float array, the channel's constant value (NaN: not constant).
        shape: the tensor's static shape.
    """

    slots: np.ndarray
    const: np.ndarray
    shape: tuple


@dataclass
class ChannelGroup:
    """Channels that can only be kept or removed together.

    A group has `size` channels; channel `i` of the group is unit
    `idx[i]` of every producer `(layer, idx)` in `producers`, all at once.

    Attributes:
        name: "+"-joined producer layer names.
        size: number of channels in the group.
        producers: list of `(layer, idx)`: a Dense/Conv/ConvTranspose/SeparableConv
            layer (unwrapped, same `name` as its wrapper) and the int array
            of its output units, one per group channel. A layer may appear
            more than once (e.g. its output concatenated with itself, the
            filters of a depthwise-like grouped convolution with 2 filters per
            channel, or filter `j` of every group of a grouped convolution).
        followers: list of `(layer, idx)` for per-channel layers
            (BatchNormalization, DepthwiseConv2D) whose input channels `idx`
            go with the group.
        consumers: list of `(layer, rows)`: layers that mix channels
            (Dense, Conv...) and read the group; `rows[i]` are the kernel
            input rows (Dense) or input channels (conv) channel `i` feeds,
            shape `[size, r]` (r > 1 after Flatten).
        blocked_reason: None, or why these channels can never be physically
            removed (model output, a Lambda reading them, ...). Blocked
            groups can still be masked.
    """

    name: str
    size: int
    producers: list = field(default_factory=list)
    followers: list = field(default_factory=list)
    consumers: list = field(default_factory=list)
    blocked_reason: str | None = None

    @property
    def layers(self):
        """Producer layers, each once."""
        seen = {}
        for layer, _ in self.producers:
            seen.setdefault(id(layer), layer)
        return list(seen.values())

    def scores(self, importance=None):
        """Per-channel importance summed over the coupled producers.

        Args:
            importance: callable `(layer, idx) -> array [len(idx)]`; default
                `kernel_norm` (L2 norm of each unit's kernel slice).

        Returns:
            float array of shape `[size]`.
        """
        importance = importance or kernel_norm
        total = np.zeros(self.size)
        for layer, idx in self.producers:
            total += np.asarray(importance(layer, idx), dtype=np.float64)
        return total

    def __repr__(self):
        blocked = f", blocked: {self.blocked_reason}" if self.blocked_reason else ""
        return f"ChannelGroup({self.name!r}, size={self.size}{blocked})"


def unit_slices(layer):
    """The kernel of a producer layer as `[units, fan_in]` (one row per output unit)."""
    layer = unwrap(layer)
    handler = _handlers.handler_of(layer)
    if not isinstance(handler, _handlers.ProducerHandler):
        raise TypeError(f"layer '{layer.name}' ({type(layer).__name__}) has no output units; "
                        "expected Dense, Conv, ConvTranspose or SeparableConv")
    return handler.out_slices(layer)


def kernel_norm(layer, idx):
    """L2 norm of the kernel slices of units `idx` of `layer`."""
    return np.linalg.norm(unit_slices(layer)[np.asarray(idx)], axis=1)


class DependencyGraph:
    """Coupled channels of a Keras model.

    Args:
        model: a built Sequential or Functional model (nested models and
            `keras.layers.Wrapper`s are followed).

    Attributes:
        groups: list of `ChannelGroup`, one per set of coupled producer
            layers (the groups partition the units of every Dense/Conv layer
            reached).
        stops: list of `(layer_name, reason)` where the graph could not
            follow the channels; the channels reaching or leaving those
            layers are blocked.

    Raises:
        TypeError: `model` is a subclassed model.
        ValueError: a Sequential model is not built.

    Example:
        >>> graph = DependencyGraph(model)
        >>> print(graph.summary())              # one line per coupled group
        >>> graph.stops                         # e.g. [('lambda', 'Lambda: ...')]
    """

    def __init__(self, model):
        self.model = model
        self._parent = []
        self._origin = []  # per slot: (layer, unit index) or None
        self._blocked = {}  # slot -> first reason
        self._unit_cache = {}  # id(layer) -> slots
        self._unit_const = {}  # id(layer) -> constant outputs (pre-activation) per unit
        self._reads = []  # (layer, slots, const, fold_reason)
        self._follows = []  # (layer, slots)
        self._sinks = []  # (slots, const, reason): channels read by an output or a stop
        self._calls = {}  # id(layer) -> list of (in_ids, out_ids)
        self._first_inputs = {}  # id(layer) -> TensorInfos of its first call
        self._layers = {}  # id(layer) -> layer
        self.tensors = {}  # id(KerasTensor) -> TensorInfo
        self.stops = []
        f = functional_of(model)
        infos = [self._fresh(t, "model input") for t in f.inputs]
        outs = self._walk(model, infos)
        for t, info in zip(f.outputs, outs, strict=True):
            if info is not None:
                self.block(info.slots, f"model output ({_producer_name(t)})", info.const)
        self._finalize()

    # ------------------------------------------------------------ handler API

    def new_slots(self, n, origin=None):
        start = len(self._parent)
        self._parent.extend(range(start, start + n))
        self._origin.extend(origin if origin is not None else [None] * n)
        return np.arange(start, start + n)

    def _find(self, s):
        parent = self._parent
        root = s
        while parent[root] != root:
            root = parent[root]
        while parent[s] != root:
            parent[s], s = root, parent[s]
        return root

    def union(self, a, b):
        """Couple slot arrays `a` and `b` position by position."""
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self._find(x), self._find(y)
            if rx != ry:
                self._parent[max(rx, ry)] = min(rx, ry)

    def block(self, slots, reason, const=None):
        """Mark slots as never removable.

        `const`: the values of the channels where they are blocked (None:
        not known); a blocked channel that is not constant there is alive.
        """
        slots = np.asarray(slots)
        for s in slots.tolist():
            self._blocked.setdefault(s, reason)
        if const is None:
            const = np.full(len(slots), np.nan)
        self._sinks.append((slots, np.asarray(const, np.float64), reason))

    def unit_slots(self, layer, n, const):
        """Slots of the output units of a producer layer (the same on every call)."""
        if id(layer) not in self._unit_cache:
            self._unit_cache[id(layer)] = self.new_slots(n, [(layer, i) for i in range(n)])
            self._unit_const[id(layer)] = const
        return self._unit_cache[id(layer)]

    def read(self, layer, x, fold_reason):
        """Record that `layer` mixes the channels of `x`.

        `fold_reason` is None when a constant channel of `x` can be folded
        into the layer's bias exactly, else why not.
        """
        self._reads.append((layer, x.slots, x.const, fold_reason))

    def follow(self, layer, x):
        """Record that `layer` has per-channel weights for the channels of `x`."""
        self._follows.append((layer, x.slots))

    # ------------------------------------------------------------ walking

    def _fresh(self, tensor, reason):
        shape = tuple(tensor.shape)
        if len(shape) < 2 or shape[-1] is None:
            return None
        slots = self.new_slots(int(shape[-1]))
        self.block(slots, reason)
        return TensorInfo(slots, np.full(len(slots), np.nan), shape)

    def _assign(self, tensor, info):
        old = self.tensors.get(id(tensor))
        if old is not None and info is not None:  # second call of a shared graph
            self.union(old.slots, info.slots)
            info = TensorInfo(old.slots, np.where(old.const == info.const, old.const, np.nan),
                              old.shape)
        self.tensors[id(tensor)] = info

    def _walk(self, model, input_infos):
        f = functional_of(model)
        for t, info in zip(f.inputs, input_infos, strict=True):
            self._assign(t, info)
        for node in iter_nodes(f):
            if node.is_input:
                continue
            op = node.operation
            ins = [self.tensors.get(id(t)) for t in node.input_tensors]
            if _is_graph_model(op):
                if any(x is None for x in ins):
                    outs = self._stop(op, ins, node, "input without a channel axis")
                else:
                    outs = self._walk(op, ins)
            else:
                outs = self._call(op, ins, node)
            for t, info in zip(node.output_tensors, outs, strict=True):
                self._assign(t, info)
        return [self.tensors.get(id(t)) for t in f.outputs]

    def _call(self, op, ins, node):
        layer = unwrap(op)
        self._layers[id(layer)] = layer
        self._calls.setdefault(id(layer), []).append(
            ([id(t) for t in node.input_tensors], [id(t) for t in node.output_tensors]))
        handler = _handlers.handler_of(layer)
        first = self._first_inputs.setdefault(id(layer), ins)
        if first is not ins and getattr(layer, "weights", None):  # shared: one set of weights
            if any(a is None or b is None or len(a.slots) != len(b.slots)
                   for a, b in zip(first, ins, strict=True)):
                return self._stop(layer, ins, node, "shared layer with different inputs")
            for a, b in zip(first, ins, strict=True):
                self.union(a.slots, b.slots)
        if handler is None:
            return self._stop(layer, ins, node, f"no channel handler for {type(layer).__name__}")
        if any(x is None for x in ins):
            return self._stop(layer, ins, node, "input without a static channel axis")
        try:
            pairs = handler.propagate(self, layer, ins, node)
        except _handlers.Stop as e:
            return self._stop(layer, ins, node, str(e))
        outs = []
        for t, (slots, const) in zip(node.output_tensors, pairs, strict=True):
            shape = tuple(t.shape)
            if len(slots) != shape[-1]:  # safety net against a handler bug
                return self._stop(layer, ins, node, f"handler gave {len(slots)} channels for "
                                  f"an output of shape {shape}")
            outs.append(TensorInfo(np.asarray(slots), np.asarray(const, np.float64), shape))
        return outs

    def _stop(self, layer, ins, node, reason):
        why = f"'{layer.name}' ({type(layer).__name__}): {reason}"
        self.stops.append((layer.name, reason))
        for x in ins:
            if x is not None:
                self.block(x.slots, f"read by {why}", x.const)
        return [self._fresh(t, f"output of {why}") for t in node.output_tensors]

    # ------------------------------------------------------------ results

    def _finalize(self):
        n = len(self._parent)
        self.root = np.array([self._find(s) for s in range(n)], dtype=np.int64)
        self.calls = {k: len(v) for k, v in self._calls.items()}
        blocked = {}
        for s, reason in self._blocked.items():
            blocked.setdefault(int(self.root[s]), reason)
        self.blocked = blocked  # root -> reason
        self._root_origins = {}
        for s, origin in enumerate(self._origin):
            if origin is not None:
                self._root_origins.setdefault(int(self.root[s]), []).append(origin)
        self.groups = self._make_groups()

    def _positions_by_root(self, slots):
        by_root = {}
        for p, r in enumerate(self.root[slots].tolist()):
            by_root.setdefault(r, []).append(p)
        return by_root

    def _make_groups(self):
        members = {}  # root -> {"producers": {lid: [...]}, ...}
        for s, origin in enumerate(self._origin):
            if origin is None:
                continue
            layer, i = origin
            m = members.setdefault(int(self.root[s]), {"p": {}, "f": {}, "c": {}})
            m["p"].setdefault(id(layer), []).append(i)
        first = {}
        for kind, records in (("c", self._reads), ("f", self._follows)):
            for rec in records:
                layer, slots = rec[0], rec[1]
                if (kind, id(layer)) in first:
                    continue
                first[(kind, id(layer))] = True
                for r, pos in self._positions_by_root(slots).items():
                    if r in members:
                        members[r][kind][id(layer)] = pos
        order = {lid: i for i, lid in enumerate(self._unit_cache)}
        buckets = {}
        for r, m in members.items():
            sig = (tuple(sorted(((k, len(v)) for k, v in m["p"].items()),
                                key=lambda kv: order[kv[0]])),
                   tuple(sorted((k, len(v)) for k, v in m["f"].items())),
                   tuple(sorted((k, len(v)) for k, v in m["c"].items())),
                   r in self.blocked)
            buckets.setdefault(sig, []).append(r)
        groups = []
        for sig, roots in buckets.items():
            first_layer = sig[0][0][0]
            roots.sort(key=lambda r: sorted(members[r]["p"][first_layer])[0])
            prods = []
            for lid, count in sig[0]:
                cols = np.array([sorted(members[r]["p"][lid]) for r in roots], dtype=np.int64)
                prods.extend((self._layers[lid], cols[:, j]) for j in range(count))
            fols = []
            for lid, count in sig[1]:
                cols = np.array([members[r]["f"][lid] for r in roots], dtype=np.int64)
                fols.extend((self._layers[lid], cols[:, j]) for j in range(count))
            cons = [(self._layers[lid], np.array([members[r]["c"][lid] for r in roots],
                                                 dtype=np.int64)) for lid, _ in sig[2]]
            names = []
            for layer, _ in prods:
                if layer.name not in names:
                    names.append(layer.name)
            groups.append(ChannelGroup(
                name="+".join(names), size=len(roots), producers=prods, followers=fols,
                consumers=cons, blocked_reason=self.blocked.get(roots[0])))
            groups[-1]._roots = roots
        groups.sort(key=lambda g: g.name)
        return groups

    def groups_of(self, layer_name):
        """Groups in which the layer called `layer_name` is a producer."""
        return [g for g in self.groups if any(lay.name == layer_name for lay in g.layers)]

    def summary(self):
        """A readable table of the groups."""
        lines = [f"{'group':40s} {'size':>5s}  blocked"]
        for g in self.groups:
            lines.append(f"{g.name[:40]:40s} {g.size:5d}  {g.blocked_reason or ''}")
        return "\n".join(lines)
