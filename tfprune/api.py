"""`prune` and `strip`: symmetric model-cloning passes."""

from __future__ import annotations

import keras
import numpy as np

from tfprune import handlers
from tfprune import plan as plan_lib
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


def prune(model, method=None, *, layers=None, budget=None):
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
        budget: None (every layer to its method's own sparsity), or a
            `tfprune.budgets` target (`budgets.FLOPs(keep)`, `Params(keep)`,
            `Latency(keep)`): the coupled unit groups of the whole model are
            ranked by the method's importance and the least important units
            removed until the shrunk model meets the target (the method's
            sparsity may then be None; its schedule only times the pruning).

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
    from tfprune import budgets as budgets_lib

    budget = budgets_lib.get(budget)
    plan = plan_lib.plan(model, method, layers)
    targets, followers = plan.targets, plan.followers
    if budget is not None:
        budgeted = [n for n, m in targets.items() if m.removes_units]
        if not budgeted:
            raise ValueError(
                f"prune: the budget {budget!r} ranks units over the whole model, but no layer "
                f"of model "
                f"'{model.name}' may lose units with this method (use a structure that removes "
                "units, e.g. structures.Filter(), on layers whose units shrink can remove).")
        for m in targets.values():
            m.check_budget(budget if m.removes_units else None)
    if not targets:
        if plan.kept_units or plan.skipped:
            reasons = {**plan.skipped, **plan.kept_units}
            detail = "; ".join(f"'{n}': {r}" for n, r in sorted(reasons.items()))
            raise ValueError(
                f"prune: nothing to prune in model '{model.name}': every candidate layer was "
                f"left unwrapped ({detail}). With a structure that removes units, layers whose "
                "units reach a model output keep them: use a weight-level structure (e.g. "
                "structures.Unstructured()) for them, or add hidden layers.")
        raise ValueError(f"prune: model '{model.name}' has no layer to prune; supported types: "
                         f"{', '.join(handlers.supported_layer_types())}.")
    for layer in plan_lib.leaf_layers(model):
        if layer.name in targets:
            _check_finite(layer)

    def clone_fn(layer):
        new = fresh_copy(layer)
        if layer.name in targets:
            m = targets[layer.name]
            return PruneWrapper(new, m, budget=budget if m.removes_units else None)
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
