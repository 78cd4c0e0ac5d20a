"""The pruning plan: which layers `tfprune.prune` wraps, and with which method.

`plan(model, method, layers)` decides it from the model's dependency graph
(`tfprune.surgery.DependencyGraph`), built once:

1. **Candidates.** The supported layers chosen by ``layers`` (None: all of
   them; a list of names; a callable ``layer -> Method or None``, consulted
   only for supported layers).
2. **Can the method handle the layer?** (`Method.validate`, the structure on
   each kernel). If not, the layer is skipped with a warning, or, when it was
   named in ``layers``, `prune` raises.
3. **Units only where `tfprune.shrink` can remove them.** A method that
   removes whole units (a `structures.Filter` structure, or ``prune_units``)
   is kept for a layer only if every unit of the layer lies in a coupled group
   that is not blocked (it reaches no model output and no operation the graph
   cannot follow) and whose producers all remove units. Otherwise the layer
   gets the method's unit-keeping variant (`keep_units`): silently for the
   units that reach a model output, with a warning for other reasons; a layer
   named in ``layers`` raises. This is repeated until nothing changes (one
   layer keeping its units keeps the units of the layers coupled with it).
4. **Followers.** A per-channel layer (BatchNormalization, DepthwiseConv) in a
   group whose producers remove units is wrapped with `methods.Follow`, so a
   removed channel is exactly zero after it too. A follower that the user
   gave a weight-level method keeps it.
"""

from __future__ import annotations

import dataclasses
import types
import warnings

import keras

from tfprune import handlers
from tfprune.methods import base as methods_base

#: Layers that can follow the channel mask of a producer (`methods.Follow`).
FOLLOWER_TYPES = (keras.layers.BatchNormalization, keras.layers.DepthwiseConv1D,
                  keras.layers.DepthwiseConv2D)


@dataclasses.dataclass
class Plan:
    """What `tfprune.prune` does to each layer.

    Attributes:
        targets: ``{layer name: Method}`` for the layers wrapped with a method.
        followers: ``{layer name: producer name}`` for the per-channel
            layers wrapped with `methods.Follow`.
        kept_units: ``{layer name: reason}`` for layers whose units are kept
            although the method removes units.
        skipped: ``{layer name: reason}`` for candidate layers left unwrapped.
    """

    targets: dict
    followers: dict
    kept_units: dict
    skipped: dict


def removes_units(method):
    """True if ``method`` removes whole output units (`Method.removes_units`)."""
    return method.removes_units


def keep_units(method):
    """The variant of ``method`` for a layer whose units must stay, or None to skip it
    (`Method.keep_units`)."""
    return method.keep_units()


def leaf_layers(model):
    """The layers of ``model``, descending into nested Sequential/Functional models."""
    for layer in model.layers:
        if isinstance(layer, keras.Model) and _is_graph_model(layer):
            yield from leaf_layers(layer)
        else:
            yield layer


def _is_graph_model(model):
    from keras.src.models.functional import Functional

    return isinstance(model, (keras.Sequential, Functional))


def check_method_fits(layer, method):
    """Raises ValueError if ``method`` (and its structure) cannot prune ``layer``."""
    handler = handlers.get_handler(layer)
    method.validate(types.SimpleNamespace(layer=layer, handler=handler))
    for spec in handler.kernels:
        var = getattr(layer, spec.name, None)
        if var is not None:
            method.structure.validate(handlers.canonical_shape(var.shape, spec.layout),
                                      layer_name=layer.name, kernel_name=spec.name)


def _supported(layer):
    return handlers.get_handler(layer) is not None


def _unsupported_error(name, layer):
    return ValueError(
        f"prune: `layers` names '{name}' of type {type(layer).__name__}, which is not "
        f"supported; supported types: {', '.join(handlers.supported_layer_types())}.")


def _candidates(model, method, layers, all_layers):
    """``[(layer, Method, named)]`` from the ``layers`` argument."""
    by_name = {layer.name: layer for layer in all_layers}
    if layers is None:
        method = methods_base.get(method)
        return [(layer, method, False) for layer in all_layers if _supported(layer)]
    if callable(layers) and not isinstance(layers, (list, tuple, str)):
        if method is not None:
            raise ValueError(
                "prune: give either `method` or a callable `layers` that returns a method per "
                f"layer, not both (method={method!r}); to use one method for some layers, "
                "return it from the callable.")
        out = []
        for layer in all_layers:
            if not _supported(layer):
                continue  # the callable is consulted only for layers tfprune can prune
            m = layers(layer)
            if m is not None:
                out.append((layer, methods_base.get(m), False))
        return out
    names = [layers] if isinstance(layers, str) else list(layers)
    method = methods_base.get(method)
    out = []
    for name in names:
        if name not in by_name:
            raise ValueError(f"prune: `layers` names '{name}', which is not a layer of "
                             f"model '{model.name}'; layers: {sorted(by_name)}.")
        if not _supported(by_name[name]):
            raise _unsupported_error(name, by_name[name])
        out.append((by_name[name], method, True))
    return out


class _Units:
    """What the dependency graph says about the units of each producer layer."""

    def __init__(self, model):
        from tfprune.surgery.graph import DependencyGraph

        self.groups = None
        try:
            graph = DependencyGraph(model)
        except (TypeError, ValueError) as e:  # no graph: fall back to the output producers
            warnings.warn(f"prune: could not follow the channels of model '{model.name}' ({e}); "
                          "only the layers producing its outputs keep their units.",
                          stacklevel=4)
            self.fallback = dict.fromkeys(_output_layer_names(model),
                                          "it produces a model output")
            return
        self.groups = graph.groups
        self.outputs = _output_layer_names(model)
        self.producer_groups = {}
        self.follower_groups = {}
        for g in self.groups:
            for layer in g.layers:
                self.producer_groups.setdefault(layer.name, []).append(g)
            for layer, _ in g.followers:
                lst = self.follower_groups.setdefault(layer.name, [])
                if g not in lst:
                    lst.append(g)

    def is_follower(self, name):
        return (self.groups is not None and name in self.follower_groups
                and name not in self.producer_groups)

    def blocker(self, name, unit_layers):
        """Why the units of layer ``name`` cannot all be removed, or None.

        Returns ``(reason, reaches_output)``.
        """
        if self.groups is None:
            reason = self.fallback.get(name)
            return (reason, True) if reason else None
        groups = self.producer_groups.get(name)
        if not groups:
            return ("the dependency graph does not reach its units", False)
        for g in groups:
            if g.blocked_reason is not None:
                return (g.blocked_reason, name in self.outputs)
        for g in groups:
            for layer in g.layers:
                if layer.name not in unit_layers:
                    return (f"its units are coupled with those of '{layer.name}' (group "
                            f"'{g.name}'), which keeps its units", False)
        return None


def _output_layer_names(model):
    """Names of the prunable layers whose units reach a model output.

    Walks back from every model output through the layers that do not mix
    channels with a kernel (activations, softmax, BatchNormalization,
    reshapes, dropout, ``Add``, ``Lambda``, nested models...) and stops at the
    first supported (prunable) layer of each path.
    """
    names, seen = set(), set()
    stack = list(keras.tree.flatten(model.outputs))
    while stack:
        tensor = stack.pop()
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            continue
        op, node_index, tensor_index = history
        key = (id(op), node_index, tensor_index)
        if key in seen:
            continue
        seen.add(key)
        if isinstance(op, keras.Model) and _is_graph_model(op):
            stack.append(keras.tree.flatten(op.outputs)[tensor_index])
            continue
        if isinstance(op, keras.layers.Layer) and handlers.get_handler(op) is not None:
            names.add(op.name)
            continue
        node = op._inbound_nodes[node_index]
        stack.extend(keras.tree.flatten(node.input_tensors))
    return names


def plan(model, method, layers):
    """Decides what `tfprune.prune` wraps (see the module docstring).

    Args:
        model: a built Sequential or Functional model.
        method: a `Method` (or None with a callable ``layers``).
        layers: None, a list of layer names, or a callable ``layer -> Method or None``.

    Returns:
        A `Plan`.

    Raises:
        ValueError: unknown or unsupported names in ``layers``; a named layer
            the method cannot handle, or whose units would be removed although
            they cannot be; ``method`` given with a callable ``layers``.
    """
    all_layers = list(leaf_layers(model))
    candidates = _candidates(model, method, layers, all_layers)
    targets, named, skipped = {}, set(), {}
    for layer, m, is_named in candidates:
        try:
            check_method_fits(layer, m)
        except ValueError as e:
            if is_named:
                raise ValueError(f"prune: `layers` names '{layer.name}', which {m!r} cannot "
                                 f"prune: {e}") from None
            skipped[layer.name] = str(e)
            warnings.warn(f"prune: layer '{layer.name}' is left unpruned: {e}", stacklevel=3)
            continue
        targets[layer.name] = m
        if is_named:
            named.add(layer.name)

    units = None
    if any(removes_units(m) for m in targets.values()):
        units = _Units(model)
    kept = {}
    changed = units is not None
    while changed:  # one layer keeping its units keeps those of the layers coupled with it
        changed = False
        unit_layers = {n for n, m in targets.items() if removes_units(m)}
        for name in sorted(unit_layers):
            method_ = targets[name]
            if units.is_follower(name):
                blocker = ("its channels are chosen by the layer it follows (a per-channel "
                           "layer)", False)
            else:
                blocker = units.blocker(name, unit_layers)
            if blocker is None:
                continue
            reason, reaches_output = blocker
            variant = keep_units(method_)
            if name in named and variant is None and not units.is_follower(name):
                what = ("reach a model output" if reaches_output
                        else "cannot be removed by tfprune.shrink")
                raise ValueError(
                    f"prune: `layers` names '{name}', whose units {what} ({reason}); "
                    f"{method_!r} would remove some of them and "
                    + ("change what the model outputs. " if reaches_output
                       else "cost accuracy for no speed-up. ")
                    + "Use a weight-level structure for this layer (e.g. layers=lambda l: ...), "
                      "or leave it out of `layers`.")
            if variant is None:
                del targets[name]
                skipped[name] = reason
            else:
                targets[name] = variant
            kept[name] = reason
            changed = True
            silent = reaches_output and layers is None or units.is_follower(name)
            if not silent:
                what = "left dense" if variant is None else f"pruned with {variant!r}"
                warnings.warn(
                    f"prune: layer '{name}' keeps all its units ({reason}): it is {what} "
                    f"instead of {method_!r}.", stacklevel=3)

    followers = {}
    if units is not None and units.groups is not None:
        unit_layers = {n for n, m in targets.items() if removes_units(m)}
        for g in units.groups:
            producers = [layer.name for layer in g.layers if layer.name in unit_layers]
            if not producers:
                continue
            for layer, _ in g.followers:
                if not isinstance(layer, FOLLOWER_TYPES) or layer.name in followers:
                    continue
                if layer.name in targets:
                    continue  # the user's weight-level method for this layer stays
                if layer.name in skipped and not units.is_follower(layer.name):
                    continue
                followers[layer.name] = producers[0]
                skipped.pop(layer.name, None)
    return Plan(targets=targets, followers=followers, kept_units=kept, skipped=skipped)
