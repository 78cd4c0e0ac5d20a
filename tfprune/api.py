"""`prune` and `strip`: symmetric model-cloning passes."""

from __future__ import annotations

import warnings

import keras
import numpy as np

from tfprune import handlers
from tfprune.methods import base as methods_base
from tfprune.methods.follow import Follow
from tfprune.wrapper import PruneWrapper, find_wrappers


def _check_model(model, fn):
    if not isinstance(model, keras.Model):
        raise TypeError(f"{fn}: `model` must be a keras.Model, got {type(model).__name__}.")
    if not _is_graph_model(model):
        hint = ("Wrap the layers of a subclassed model with tfprune.PruneWrapper(layer, method) "
                "directly in its __init__ (see the FAQ 'Subclassed models').")
        if fn == "strip":
            hint = ("Strip its PruneWrapper layers one by one: tfprune.strip(wrapper) returns "
                    "the plain layer with the pruned weights set to zero.")
        raise ValueError(
            f"{fn}: model '{model.name}' is a subclassed keras.Model ({type(model).__name__}); "
            f"tfprune can only rebuild Sequential and Functional models. {hint}")
    if not model.built:
        raise ValueError(
            f"{fn}: model '{model.name}' is not built; call it on data or give the "
            "first layer an input shape (keras.Input) before pruning.")


def fresh_copy(layer):
    """A new, unbuilt layer with ``layer``'s config (for cloning a model in memory).

    A `keras.layers.Lambda` is rebuilt from its in-memory function (its config
    holds Python bytecode, which Keras refuses to load in safe mode: that
    guard is for files, not for a model the user already holds).
    """
    if isinstance(layer, keras.layers.Lambda):
        return keras.layers.Lambda.from_config(layer.get_config(), safe_mode=False)
    return layer.__class__.from_config(layer.get_config())


def _is_graph_model(model):
    from keras.src.models.functional import Functional

    return isinstance(model, (keras.Sequential, Functional))


def _resolve_targets(model, method, layers):
    """Returns ``{layer name: Method}`` for the layers to wrap.

    A layer whose units reach a model output (see `_units_that_must_stay`)
    never loses units: under ``layers=None`` or a callable it gets the
    method's unit-keeping variant (`_keep_units`) or stays unwrapped; a layer
    named in ``layers`` with a unit-removing method raises.
    """
    all_layers = list(_leaf_layers(model))
    by_name = {layer.name: layer for layer in all_layers}
    targets = {}
    keep = _LazyKeep(model)
    if layers is None:
        method = methods_base.get(method)
        for layer in all_layers:
            if handlers.get_handler(layer) is None:
                continue
            m = keep.variant(layer, method)
            if m is not None:
                targets[layer.name] = m
        if not targets:
            kept = [layer.name for layer in all_layers
                    if handlers.get_handler(layer) is not None]
            if kept:
                raise ValueError(
                    f"prune: nothing to prune in model '{model.name}' with {method!r}: its only "
                    f"supported layers ({', '.join(kept)}) produce units that reach a model "
                    "output, and a structure that removes units leaves them dense. Use a "
                    "weight-level structure (e.g. structures.Unstructured()) for them, or add "
                    "hidden layers.")
    elif callable(layers) and not isinstance(layers, (list, tuple, str)):
        if method is not None:
            raise ValueError(
                "prune: give either `method` or a callable `layers` that returns a method per "
                f"layer, not both (method={method!r}); to use one method for some layers, "
                "return it from the callable.")
        for layer in all_layers:
            if handlers.get_handler(layer) is None:
                continue  # the callable is consulted only for layers tfprune can prune
            m = layers(layer)
            if m is None:
                continue
            m = keep.variant(layer, methods_base.get(m), warn=True)
            if m is not None:
                targets[layer.name] = m
    else:
        if isinstance(layers, str):
            layers = [layers]
        method = methods_base.get(method)
        for name in layers:
            if name not in by_name:
                raise ValueError(f"prune: `layers` names '{name}', which is not a layer of "
                                 f"model '{model.name}'; layers: {sorted(by_name)}.")
            if handlers.get_handler(by_name[name]) is None:
                raise ValueError(
                    f"prune: `layers` names '{name}' of type {type(by_name[name]).__name__}, "
                    f"which is not supported; supported types: "
                    f"{', '.join(handlers.supported_layer_types())}.")
            m = keep.variant(by_name[name], method, warn=True, named=True)
            if m is None:
                raise ValueError(
                    f"prune: `layers` names '{name}', whose units reach a model output "
                    f"({keep.reason(name)}); {method!r} would remove some of them and change "
                    "what the model outputs. Use a weight-level structure for this layer "
                    "(e.g. layers=lambda l: ...), or leave it out of `layers`.")
            targets[name] = m
    return targets


def _removes_units(method):
    return method.structure.removes_units or bool(getattr(method, "prune_units", False))


def _keep_units(method):
    """The variant of ``method`` for a layer whose units must stay, or None to skip it.

    A structure that removes units leaves such layers dense; a method that
    prunes dead units on its own (``prune_units=True``, e.g. Turbo-VBI) gets
    ``prune_units=False`` there.
    """
    if method.structure.removes_units:
        return None
    if getattr(method, "prune_units", False):
        return type(method).from_config({**method.get_config(), "prune_units": False})
    return method


class _LazyKeep:
    """The layers whose units must stay, computed from the dependency graph when first needed."""

    def __init__(self, model):
        self._model = model
        self._reasons = None

    def reason(self, name):
        if self._reasons is None:
            self._reasons = _units_that_must_stay(self._model)
        return self._reasons.get(name)

    def variant(self, layer, method, warn=False, named=False):
        """``method`` itself, its unit-keeping variant, or None (leave ``layer`` dense)."""
        if not _removes_units(method) or self.reason(layer.name) is None:
            return method
        variant = _keep_units(method)
        if warn and not (named and variant is None):  # a named layer left dense raises
            what = "left dense" if variant is None else f"pruned with {variant!r}"
            warnings.warn(
                f"prune: layer '{layer.name}' keeps all its units ({self.reason(layer.name)}): "
                f"it is {what} instead of {method!r}.", stacklevel=4)
        return variant


def _units_that_must_stay(model):
    """``{layer name: reason}`` for the producer layers whose units can never be removed.

    From `tfprune.surgery.DependencyGraph`: a layer keeps its units when any
    of them reaches a model output through unit-preserving ops (activations,
    softmax, reshapes, dropout, ``Add``...), or is read by an operation the
    graph cannot follow (which may pass it on to an output). Removing such a
    unit would change the model's outputs (e.g. drop classes) or could not be
    undone by `tfprune.shrink`.
    """
    from tfprune.surgery.graph import DependencyGraph

    try:
        graph = DependencyGraph(model)
    except (TypeError, ValueError) as e:  # no graph: fall back to the output producers
        warnings.warn(f"prune: could not follow the channels of model '{model.name}' ({e}); "
                      "only the layers producing its outputs keep their units.", stacklevel=4)
        return dict.fromkeys(_output_layer_names(model), "produces a model output")
    reasons = {}
    for group in graph.groups:
        if group.blocked_reason is None:
            continue
        for layer, _ in group.producers:
            reasons.setdefault(layer.name, group.blocked_reason)
    return reasons


def _output_layer_names(model):
    """Names of the layers that produce the model's outputs."""
    names = set()
    for tensor in keras.tree.flatten(model.outputs):
        layer, _, _ = tensor._keras_history
        while isinstance(layer, keras.Model):
            layer = layer.outputs[0]._keras_history[0] if len(layer.outputs) == 1 else layer
            if isinstance(layer, keras.Model):
                names |= _output_layer_names(layer)
                break
        names.add(layer.name)
    return names


def _leaf_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model) and _is_graph_model(layer):
            yield from _leaf_layers(layer)
        else:
            yield layer


def _consumers(model):
    """``{layer name: [consumer layers]}`` over the (nested) model graph."""
    out = {}
    for layer in _leaf_layers(model):
        cons = []
        for node in getattr(layer, "_outbound_nodes", []):
            op = node.operation
            if op is not None and op is not layer:
                cons.append(op)
        out[layer.name] = cons
    if isinstance(model, keras.Sequential):
        seq = list(model.layers)
        for a, b in zip(seq, seq[1:]):
            out.setdefault(a.name, [])
            if b not in out[a.name]:
                out[a.name].append(b)
    return out


def _bn_followers(model, targets):
    """``{bn name: producer name}`` for BatchNormalization right after a unit-removing layer."""
    followers = {}
    consumers = _consumers(model)
    for name, method in targets.items():
        if not method.structure.removes_units:
            continue
        cons = consumers.get(name, [])
        if len(cons) == 1 and isinstance(cons[0], keras.layers.BatchNormalization):
            bn = cons[0]
            if bn.axis in (-1, len(bn.input.shape) - 1):  # per-channel on the units axis
                followers[bn.name] = name
    return followers


def _check_finite(layer):
    for var in layer.weights:
        value = keras.ops.convert_to_numpy(var)
        if not np.all(np.isfinite(value)):
            raise ValueError(
                f"prune: layer '{layer.name}' has non-finite values (NaN or inf) in "
                f"`{var.name}`; fix the model's training before pruning it.")


def _copy_weights(src, dst, on_pair):
    """Walks two structurally identical models in parallel and calls ``on_pair(a, b)``."""
    for a, b in zip(src.layers, dst.layers):
        if isinstance(a, keras.Model) and _is_graph_model(a):
            _copy_weights(a, b, on_pair)
        else:
            on_pair(a, b)


def prune(model, method=None, *, layers=None):
    """Returns a copy of ``model`` with its layers wrapped in `PruneWrapper`.

    The input model is left untouched; the trained weights are carried over.
    Layers that tfprune does not support pass through unchanged. With a
    structure that removes units (`structures.Filter`), a BatchNormalization
    that directly follows a pruned layer is wrapped with `methods.Follow`
    so that pruned channels output exactly zero.

    Args:
        model: a built Sequential or Functional `keras.Model` (nested models
            are handled). Subclassed models raise a `ValueError`: wrap their
            layers with `PruneWrapper` directly.
        method: a `tfprune.methods.Method` used for every selected layer
            (None with a callable ``layers``).
        layers: None (every supported layer), a list of layer names, or a
            callable ``layer -> Method or None`` for per-layer methods,
            consulted only for the layers tfprune supports (then ``method``
            must be None). Layers whose units reach a model output (through
            activations, softmax, reshapes, dropout, ``Add``..., found with
            `tfprune.surgery.DependencyGraph`) keep all their units: with a
            structure that removes units they are left dense, a method with
            ``prune_units=True`` gets ``prune_units=False`` there (with a
            warning when a callable chose the method); naming such a layer
            with a unit-removing structure raises.

    Returns:
        A new `keras.Model` (not compiled).

    Raises:
        ValueError: subclassed or unbuilt model, unknown or unsupported layer
            names, a named layer whose units reach an output with a
            unit-removing structure, ``method`` given with a callable
            ``layers``, non-finite weights.

    Example:
        >>> import keras, tfprune
        >>> from tfprune import methods, structures
        >>> model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(300),
        ...                           keras.layers.Dense(10)])
        >>> pruned = tfprune.prune(model, methods.Magnitude(0.9))
        >>> pruned = tfprune.prune(model, layers=lambda l: methods.Magnitude(0.5)
        ...                        if l.name != model.layers[-1].name else None)
    """
    _check_model(model, "prune")
    if find_wrappers(model):
        raise ValueError(f"prune: model '{model.name}' is already pruned (contains "
                         "PruneWrapper layers); call tfprune.strip(model) first.")
    if method is None and not callable(layers):
        raise ValueError("prune: give a `method` (e.g. methods.Magnitude(0.5)), or a callable "
                         "`layers` that returns one per layer.")
    targets = _resolve_targets(model, method, layers)
    if not targets:
        raise ValueError(f"prune: model '{model.name}' has no layer to prune; supported types: "
                         f"{', '.join(handlers.supported_layer_types())}.")
    for layer in _leaf_layers(model):
        if layer.name in targets:
            _check_finite(layer)
    followers = _bn_followers(model, targets)

    def clone_fn(layer):
        new = fresh_copy(layer)
        if layer.name in targets:
            return PruneWrapper(new, targets[layer.name])
        if layer.name in followers:
            return PruneWrapper(new, Follow(followers[layer.name]))
        return new

    pruned = keras.models.clone_model(model, clone_function=clone_fn, recursive=True)

    def copy(a, b):
        if isinstance(b, PruneWrapper):
            b.layer.set_weights(a.get_weights())
            b.method.initialize(b)
        else:
            b.set_weights(a.get_weights())

    _copy_weights(model, pruned, copy)
    return pruned


def strip(model):
    """Removes every `PruneWrapper`: ordinary layers whose pruned weights are exactly zero.

    The plain layers keep their names; outputs equal the pruned model's
    inference outputs. Works on models without wrappers too (returns a copy).

    Args:
        model: a pruned Sequential or Functional model, or a single `PruneWrapper`.

    Returns:
        A new `keras.Model` (or layer) with no tfprune objects in it.

    Example:
        >>> plain = tfprune.strip(pruned)
        >>> plain.save("plain.keras")      # loads without tfprune installed
    """
    if isinstance(model, PruneWrapper):
        layer = model.layer.__class__.from_config(model.layer.get_config())
        layer.build_from_config(model.layer.get_build_config())
        layer.set_weights(_finite_masked_weights(model))
        return layer
    _check_model(model, "strip")

    def clone_fn(layer):
        return fresh_copy(layer.layer if isinstance(layer, PruneWrapper) else layer)

    plain = keras.models.clone_model(model, clone_function=clone_fn, recursive=True)

    def copy(a, b):
        b.set_weights(_finite_masked_weights(a) if isinstance(a, PruneWrapper)
                      else a.get_weights())

    _copy_weights(model, plain, copy)
    return plain


def _finite_masked_weights(wrapper):
    """``wrapper.masked_weights()``, or a ValueError if one holds NaN or Inf.

    A NaN times a zero mask is NaN: `strip` would write NaN where a weight
    was pruned (and keep NaN weights), so it refuses instead.
    """
    values = wrapper.masked_weights()
    for var, value in zip(wrapper.layer.weights, values, strict=True):
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        if bad:
            raise ValueError(
                f"strip: layer '{wrapper.name}' has {bad} non-finite (NaN/Inf) values of "
                f"{np.size(value)} in `{var.path}` after masking; a stripped model must "
                "hold finite weights. Training diverged or the data held NaN/Inf: retrain "
                "from a finite checkpoint (keras.callbacks.TerminateOnNaN() stops training "
                "at the first NaN loss).")
    return values
