"""`shrink`: physically remove dead units, filters and channels from a Keras model."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import keras
import numpy as np

from tfprune import handlers as _handlers
from tfprune.surgery.graph import DependencyGraph, functional_of, iter_nodes, unwrap

__all__ = ["shrink", "ShrinkInfo", "ShrinkError"]


class ShrinkError(RuntimeError):
    """The shrunk model's outputs differ from the input model's."""


@dataclass
class LayerMasks:
    """Which channels of a layer's inputs and outputs are kept.

    Attributes:
        inputs / outputs: one bool array per input / output tensor.
        input_shapes: the layer's (old) input shapes.
        fold: None, or `(positions, values)`: removed input channels that were
            constant (nonzero) and whose contribution goes into the bias.
    """

    inputs: list
    outputs: list
    input_shapes: list
    fold: tuple | None = None
    fold_channels: int = 0

    @property
    def changed(self):
        return any(not m.all() for m in self.inputs + self.outputs if m is not None)


@dataclass
class ShrinkInfo:
    """What `shrink` did.

    Attributes:
        removed: {layer name: (units before, units after)} for every
            Dense/Conv layer that lost units.
        kept: list of `(group name, channels, reason)`: channels whose
            output carries no information but that could not be removed.
        folded: {layer name: number of constant input channels folded into
            its bias}.
        stops: `(layer name, reason)` where the dependency graph stopped.
        params_before / params_after: parameter counts.

    Example:
        >>> small, info = tfprune.shrink(plain, return_info=True)  # doctest: +SKIP
        >>> info.removed                  # {'conv1': (20, 5), 'fc1': (500, 125), ...}
        >>> info.params_before, info.params_after
        >>> print(info)                   # what was removed, folded and kept, and why
    """

    removed: dict = field(default_factory=dict)
    kept: list = field(default_factory=list)
    folded: dict = field(default_factory=dict)
    stops: list = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    def kept_for(self, layer_name):
        """The `kept` entries of the groups `layer_name` produces."""
        return [k for k in self.kept if layer_name in k[0].split("+")]

    def __str__(self):
        lines = [f"shrink: {self.params_before:,} -> {self.params_after:,} parameters"]
        for name, (before, after) in self.removed.items():
            lines.append(f"  {name}: {before} -> {after} units")
        for name, n in self.folded.items():
            lines.append(f"  {name}: {n} constant input channels folded into the bias")
        for name, n, reason in self.kept:
            lines.append(f"  kept {n} dead channels of {name}: {reason}")
        for name, reason in self.stops:
            lines.append(f"  graph stops at {name}: {reason}")
        return "\n".join(lines)


def _has_wrappers(model):
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.Wrapper) and unwrap(layer) is not layer:
            return True
    return False


def _strip(model):
    try:
        from tfprune.api import strip
    except ImportError as e:
        raise ImportError(
            f"shrink: model '{model.name}' contains wrapped layers (e.g. PruneWrapper) and "
            "tfprune.api.strip is not available to remove them; strip the model first") from e
    return strip(model)


def _decide(g, info):
    """Return the bool array `removable` indexed by slot root."""
    n = len(g.root)
    alive = np.zeros(n, bool)
    reader = {}
    nofold = {}
    for layer, slots, const, fold_reason in g._reads:
        roots = g.root[slots]
        nan = np.isnan(const)
        for r in roots[nan].tolist():
            if not alive[r]:
                alive[r] = True
                reader[r] = layer.name
        reason = fold_reason
        if reason is None and g.calls.get(id(layer), 1) > 1:
            reason = f"'{layer.name}' is shared by several calls"
        if reason is not None:
            for r in roots[~nan & (const != 0)].tolist():
                nofold.setdefault(r, f"constant nonzero output, and {reason}")
    for slots, const, reason in g._sinks:
        for r in g.root[slots][np.isnan(const)].tolist():
            if not alive[r]:
                alive[r] = True
                reader[r] = reason
    removable = np.zeros(n, bool)
    is_root = g.root == np.arange(n)
    removable[is_root] = True
    removable &= ~alive
    why = {}
    for r, reason in g.blocked.items():
        removable[r] = False
        why[r] = reason
    for r, reason in nofold.items():
        if removable[r]:
            removable[r] = False
            why[r] = reason
    # never empty a tensor (a layer with zero units)
    for t in g.tensors.values():
        if t is not None and len(t.slots) and removable[g.root[t.slots]].all():
            r = int(g.root[t.slots[0]])
            removable[r] = False
            why[r] = "last channel of a tensor"
    # report dead channels that stay
    for group in g.groups:
        reasons = Counter()
        for r in group._roots:
            if removable[r]:
                continue
            if r in why and not alive[r]:
                reasons[why[r]] += 1
            elif alive[r] and _producers_constant(g, r):
                reasons[f"the producers output a constant, but not '{reader[r]}' reads it "
                        "(zero padding or a 'same' depthwise convolution of a nonzero "
                        "constant)"] += 1
        for reason, count in reasons.items():
            info.kept.append((group.name, count, reason))
    return removable


def _producers_constant(g, root):
    origins = g._root_origins.get(root, [])
    return bool(origins) and all(not np.isnan(g._unit_const[id(layer)][i])
                                 for layer, i in origins)


class _Rebuilder:
    """Rebuilds a model keeping the channels `keep` says (optionally in another dtype)."""

    def __init__(self, g, keep, dtype=None):
        self.g = g
        self.keep = keep  # id(old tensor) -> bool mask
        self.dtype = dtype
        self.new = {}  # id(old layer) -> new layer
        self.pairs = []  # (old, new, masks, handler)
        self.tmaps = {}  # id(old model) -> {id(old tensor): new tensor}

    def new_shape(self, t):
        mask = self.keep.get(id(t))
        shape = tuple(t.shape)
        return shape if mask is None else shape[:-1] + (int(mask.sum()),)

    def masks(self, layer):
        g = self.g
        in_ids, out_ids = g._calls[id(layer)][0]
        masks = LayerMasks(
            inputs=[self.keep.get(i) for i in in_ids],
            outputs=[self.keep.get(i) for i in out_ids],
            input_shapes=[g.tensors[i].shape if g.tensors.get(i) else None for i in in_ids])
        handler = _handlers.handler_of(layer)
        if (isinstance(handler, _handlers.ProducerHandler) and len(in_ids) == 1
                and masks.inputs[0] is not None and handler.reads_input(layer)):
            x = g.tensors[in_ids[0]]
            gone = ~masks.inputs[0] & ~np.isnan(x.const) & (x.const != 0)
            if gone.any():
                masks.fold = (np.nonzero(gone)[0], x.const[gone])
                masks.fold_channels = len(np.unique(g.root[x.slots[gone]]))
        return masks

    def clone(self, layer):
        if id(layer) in self.new:
            return self.new[id(layer)]
        if isinstance(layer, keras.Model):
            if isinstance(layer, keras.Sequential) or hasattr(layer, "_nodes_by_depth"):
                new = self.rebuild(layer)
            else:
                new = layer.__class__.from_config(layer.get_config())
                self.pairs.append((layer, new, None, None))
            self.new[id(layer)] = new
            return new
        handler = _handlers.handler_of(layer)
        masks = self.masks(layer) if id(layer) in self.g._calls else None
        config = layer.get_config()
        if masks is not None and (masks.changed or masks.fold is not None):
            if handler is None:
                raise ShrinkError(f"internal error: layer '{layer.name}' "
                                  f"({type(layer).__name__}) has no handler but lost channels")
            config = handler.shrink_config(layer, config, masks)
        if self.dtype is not None and "dtype" in config:
            config["dtype"] = self.dtype
        try:
            new = layer.__class__.from_config(config)
        except Exception as e:
            if _weights(layer) or (masks is not None and masks.changed):
                raise ShrinkError(f"shrink: cannot rebuild layer '{layer.name}' "
                                  f"({type(layer).__name__}) from its config: {e}") from e
            new = layer  # stateless and unchanged (e.g. a Lambda in safe mode): reuse it
        self.new[id(layer)] = new
        self.pairs.append((layer, new, masks, handler))
        return new

    def rebuild(self, model):
        f = functional_of(model)
        tmap = {}
        if isinstance(model, keras.Sequential):
            t0 = f.inputs[0]
            first = model._layers[0]
            name = first.name if isinstance(first, keras.layers.InputLayer) else None
            inp = keras.Input(batch_shape=self.new_shape(t0), dtype=t0.dtype, name=name)
            new = keras.Sequential([inp] + [self.clone(lay) for lay in model.layers],
                                   name=model.name, trainable=model.trainable)
            for old_node, new_node in zip(iter_nodes(f), iter_nodes(new._functional),
                                          strict=True):
                for a, b in zip(old_node.output_tensors, new_node.output_tensors, strict=True):
                    tmap[id(a)] = b
        else:
            for t in f.inputs:
                tmap[id(t)] = keras.Input(batch_shape=self.new_shape(t), dtype=t.dtype,
                                          name=t._keras_history[0].name)
            for node in iter_nodes(f):
                if node.is_input:
                    continue
                args, kwargs = node.arguments.fill_in(tmap)
                handler = _handlers.handler_of(node.operation)
                if hasattr(handler, "shrink_arguments") and id(node.operation) in self.g._calls:
                    args, kwargs = handler.shrink_arguments(
                        node.operation, args, kwargs, self.masks(node.operation))
                outs = self.clone(node.operation)(*args, **kwargs)
                for a, b in zip(node.output_tensors, keras.tree.flatten(outs), strict=True):
                    tmap[id(a)] = b
            inputs = keras.tree.map_structure(lambda t: tmap[id(t)], f._inputs_struct)
            outputs = keras.tree.map_structure(lambda t: tmap[id(t)], f._outputs_struct)
            new = keras.Model(inputs=inputs, outputs=outputs, name=model.name)
            new.trainable = model.trainable
        self.tmaps[id(model)] = tmap
        return new

    def load_weights(self):
        for old, new, masks, handler in self.pairs:
            if not _weights(old):  # includes operations (`x + 3.0`): no weights at all
                continue
            if handler is None or masks is None or not (masks.changed or masks.fold is not None):
                new.set_weights(old.get_weights())
                continue
            values = handler.shrink_weights(old, masks)
            if isinstance(values, (list, tuple)):  # in the order of `weights` (unnamed ones)
                values = {v.name: value for v, value in zip(new.weights, values, strict=True)}
            for v in new.weights:
                if v.name not in values:
                    raise ShrinkError(f"internal error: no value for weight '{v.name}' of "
                                      f"'{new.name}'")
                value = np.asarray(values[v.name])
                if tuple(value.shape) != tuple(v.shape):
                    raise ShrinkError(f"internal error: weight '{v.name}' of '{new.name}' has "
                                      f"shape {tuple(v.shape)}, computed {value.shape}")
                v.assign(value.astype(v.dtype))


def _weights(layer):
    """The weights of a layer; [] for a plain operation node (`x + 3.0` in a Functional)."""
    return getattr(layer, "weights", None) or []


def _random_inputs(model, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    xs = []
    for t in model.inputs:
        shape = (batch,) + tuple(8 if d is None else d for d in t.shape[1:])
        if "int" in str(t.dtype):
            xs.append(rng.integers(0, 2, size=shape).astype(t.dtype))
        else:
            xs.append(rng.standard_normal(shape).astype("float32"))
    return xs


def _close(a, b, rtol=1e-5):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        return False
    scale = max(float(np.max(np.abs(a))) if a.size else 0.0, 1e-12)
    return bool(np.allclose(b, a, rtol=rtol, atol=rtol * scale))


def _call(model, xs):
    inputs = xs[0] if len(xs) == 1 else xs
    return [keras.ops.convert_to_numpy(y) for y in keras.tree.flatten(model(inputs,
                                                                          training=False))]


def _diagnose(model, ref, new, xs):
    """Name the first layer whose (kept) outputs differ between two rebuilds of `model`."""
    f = functional_of(model)
    ma, mb = ref.tmaps[id(model)], new.tmaps[id(model)]
    pairs = [(node.operation.name, t) for node in iter_nodes(f) if not node.is_input
             for t in node.output_tensors if id(t) in ma and id(t) in mb]

    def probe(tmap):
        inputs = [tmap[id(t)] for t in f.inputs]
        outputs = [tmap[id(t)] for _, t in pairs]
        return keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs)

    a, b = _call(probe(ma), xs), _call(probe(mb), xs)
    for (name, t), ya, yb in zip(pairs, a, b, strict=True):
        mask = new.keep.get(id(t))
        if mask is not None:
            ya = ya[..., mask]
        if not _close(ya, yb):
            return name
    return None


def _check_finite_weights(model):
    """Raise ValueError naming the first layer whose weights hold NaN or Inf."""
    for var in model.weights:
        value = keras.ops.convert_to_numpy(var)
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            raise ValueError(
                f"shrink: model '{model.name}' has {bad} non-finite (NaN/Inf) weights in "
                f"`{var.path}`; shrink needs finite weights (it cannot tell pruned units "
                "from NaN ones). Training diverged or the data held NaN/Inf: retrain from a "
                "finite checkpoint.")


def _check(model, new, g, keep):
    """Raise ShrinkError unless `new` computes what `model` computes.

    Compared in float32 first; deep random-weight networks can amplify
    round-off beyond 1e-5, so a float32 mismatch is re-checked on float64
    rebuilds of both models, which also locate the first differing layer.
    """
    xs = _random_inputs(model)
    if all(_close(a, b) for a, b in zip(_call(model, xs), _call(new, xs), strict=True)):
        return
    everything = {tid: np.ones_like(m) for tid, m in keep.items()}
    ref64, new64 = _Rebuilder(g, everything, "float64"), _Rebuilder(g, keep, "float64")
    models = []
    for rb in (ref64, new64):
        models.append(rb.rebuild(model))
        rb.load_weights()
    ref, out = _call(models[0], xs), _call(models[1], xs)
    if all(_close(a, b) for a, b in zip(ref, out, strict=True)):
        return
    name = _diagnose(model, ref64, new64, xs)
    where = f"first at layer '{name}'" if name else "at the model outputs"
    raise ShrinkError(f"shrink: the shrunk model's outputs differ from model "
                      f"'{model.name}' {where}; please report this as a bug")


def shrink(model, *, check=True, verbose=False, return_info=False):
    """Build a smaller model without the units, filters and channels that carry nothing.

    A channel is removed when, wherever a layer that mixes channels (Dense,
    convolutions) reads it, it is a known constant: zero (a pruned filter:
    zero kernel slice and bias, and zero scale and offset in a following
    BatchNormalization), or a nonzero constant (a bias or BN offset left
    alive) that is folded exactly into the reader's bias (Dense, 'valid'
    or 1x1 convolutions). Coupled channels (through Add, Concatenate,
    BatchNormalization, depthwise convolutions, Flatten...) go only together.
    Channels reaching a model output or a layer the graph cannot follow
    (LayerNormalization over the channels, Lambda, custom layers, Permute...)
    stay; `return_info=True` names every such place (`ShrinkInfo.stops`) and
    the dead channels kept because of it (`ShrinkInfo.kept`). Layers and
    operation nodes that keep all their channels are copied unchanged.

    Args:
        model: a built Sequential or Functional model (nested models are
            followed). Wrapped layers (`tfprune.PruneWrapper`) are stripped
            first with `tfprune.strip`.
        check: run both models on a random batch and raise if the outputs
            differ by more than 1e-5 (relative).
        verbose: print what was removed, folded and kept.
        return_info: also return a `ShrinkInfo`.

    Returns:
        The new model (same layer names; an ordinary, uncompiled Keras model), or
        `(model, ShrinkInfo)` with `return_info=True`.

    Raises:
        ShrinkError: (a `RuntimeError`) the self-check failed; the message
            names the first layer whose outputs differ.
        ValueError: a weight is NaN or Inf (the message names the variable).
        TypeError: subclassed model.

    Example:
        ```python
        small, info = tfprune.shrink(tfprune.strip(pruned), return_info=True)
        print(info)
        ```
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"shrink: expected a keras.Model, received {type(model).__name__}")
    if _has_wrappers(model):
        model = _strip(model)
    _check_finite_weights(model)
    g = DependencyGraph(model)
    info = ShrinkInfo(stops=list(g.stops), params_before=int(model.count_params()))
    removable = _decide(g, info)
    keep = {tid: ~removable[g.root[t.slots]] for tid, t in g.tensors.items() if t is not None}
    rb = _Rebuilder(g, keep)
    new = rb.rebuild(model)
    rb.load_weights()
    for old, _, masks, handler in rb.pairs:
        if masks is None:
            continue
        if isinstance(handler, _handlers.ProducerHandler) and not masks.outputs[0].all():
            info.removed[old.name] = (len(masks.outputs[0]), int(masks.outputs[0].sum()))
        if masks.fold is not None:
            info.folded[old.name] = masks.fold_channels
    info.params_after = int(new.count_params())
    if check:
        _check(model, new, g, keep)
    if verbose:
        print(info)
    return (new, info) if return_info else new
