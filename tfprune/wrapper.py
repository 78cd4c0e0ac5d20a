"""`PruneWrapper`: runs a Keras layer with the effective weights of a pruning method."""

from __future__ import annotations

import inspect
import threading
import weakref

import keras
import tensorflow as tf
from keras import ops

from tfprune import handlers
from tfprune.methods import base as methods_base

_PKG = "tfprune"

# Graphs (traces of a training step) in which a wrapper has already counted its step:
# {graph: {(id(wrapper), thread id)}}. A shared layer called twice in one traced step
# counts one step; each replica of a MirroredStrategy runs in its own thread.
_COUNTED = weakref.WeakKeyDictionary()


class _StepGate:
    """How `tfprune.callbacks.Pruning` announces training steps to a wrapper.

    Not saved (set again at every fit): ``clock`` is a variable shared by all
    the wrappers of a model, the number of training steps the callback
    announced since the fit began; ``base`` is the wrapper's step when the fit
    began. A training call counts one step only while
    ``step < base + clock``, and raises otherwise.

    Attributes:
        clock: the shared ``int64`` variable, or None before the first fit.
        base: this wrapper's ``int64`` base variable, or None.
        active: True between the callback's ``on_train_begin`` and ``on_train_end``.
    """

    def __init__(self):
        self.clock = None
        self.base = None
        self.active = False


@keras.saving.register_keras_serializable(package=_PKG)
class PruneWrapper(keras.layers.Wrapper):
    """Wraps a layer so that it computes with pruned (masked or sampled) weights.

    The wrapper is thin: the method (`tfprune.methods`) is a set of
    hyperparameters that creates the layer's pruning state in the wrapper's
    `tfprune.methods.base.LayerState`, ``state`` (variables of the wrapper,
    saved in `.keras` files and tracked for SavedModel and checkpoints), and
    provides the *effective* kernel the wrapped layer then runs its own
    ``call`` with. The wrapper takes the inner layer's name, so
    ``model.get_layer(name)`` works before and after `tfprune.strip`.

    Supported layers: Dense, Conv1D/2D/3D, Conv1D/2D/3DTranspose,
    DepthwiseConv1D/2D, SeparableConv1D/2D (both kernels), and
    BatchNormalization with the `Follow` method (added by `tfprune.prune`).
    Register more with `tfprune.handlers.register_handler`.

    Training needs `tfprune.callbacks.Pruning` (it advances the schedules);
    training without it raises a clear error. The wrapper's step counter
    (``step``, saved with the model) advances once per training step the
    callback announced, however many times the layer is called in the
    step (a shared layer); an unannounced training step raises (see
    `tfprune.callbacks.Pruning`).

    Args:
        layer: the layer to wrap (built or not).
        method: a `tfprune.methods.Method` (or its name or config); it holds
            only hyperparameters, so one instance may be shared by many
            wrappers.
        budget: None, or the model's `tfprune.budgets` object (set by
            `tfprune.prune`): the units are then chosen over the whole model.
        **kwargs: passed to `keras.layers.Wrapper` (``name`` defaults to the
            layer's name).

    Example:
        >>> import keras, tfprune
        >>> from tfprune import methods
        >>> layer = tfprune.PruneWrapper(keras.layers.Dense(10), methods.Magnitude(0.5))
        >>> y = layer(keras.ops.ones((2, 4)))
        >>> y.shape
        TensorShape([2, 10])
        >>> layer.state["kernel_mask"].shape   # the layer's pruning state
        (4, 10)

    Attributes:
        method: the `tfprune.methods.Method` (hyperparameters only).
        state: the layer's `tfprune.methods.base.LayerState`: the method's
            variables by name (``state["kernel_mask"]``) and per-layer Python
            values (``state.host``).
        step: the saved training-step counter (int64 variable).
    """

    def __init__(self, layer, method, budget=None, **kwargs):
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(f"PruneWrapper: `layer` must be a keras Layer, got {layer!r}.")
        if isinstance(layer, PruneWrapper):
            raise ValueError(f"PruneWrapper: layer '{layer.name}' is already wrapped.")
        kwargs.setdefault("name", layer.name)
        super().__init__(layer, **kwargs)
        self.method = methods_base.get(method)
        # The layer's pruning state: the method creates it here in `build` (never on itself).
        self.state = methods_base.LayerState()
        self.handler = _handler_for(layer, self.method)
        self.method.validate(self)
        from tfprune import budgets

        self.budget = budgets.get(budget)
        if self.handler is not None:
            self.method.check_budget(self.budget)
        self._callback_attached = False
        # A plain Python object: its variables are neither tracked nor saved.
        self._gate = _StepGate()
        self._call_has_training = "training" in inspect.signature(layer.call).parameters

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        if self.handler is not None:
            for spec in self.handler.kernels:
                var = getattr(self.layer, spec.name, None)
                if var is None:
                    raise ValueError(f"PruneWrapper: layer '{self.layer.name}' has no "
                                     f"variable `{spec.name}` after build.")
                self.method.structure.validate(
                    handlers.canonical_shape(var.shape, spec.layout),
                    layer_name=self.layer.name, kernel_name=spec.name)
        self.step = self.add_weight(name="pruning_step", shape=(), dtype="int64",
                                    initializer="zeros", trainable=False,
                                    aggregation="only_first_replica")
        self.method.build(self)
        self.built = True

    def call(self, inputs, training=None, **kwargs):
        if training:
            if self._gate.active:
                self._count_step()
            else:
                if self.method.requires_callback and not self._callback_attached:
                    raise RuntimeError(
                        f"PruneWrapper '{self.name}' is being trained without "
                        "tfprune.callbacks.Pruning(): nothing would be pruned. Pass "
                        "`callbacks=[tfprune.callbacks.Pruning()]` to fit(), or in a custom "
                        "training loop call the callback's set_model(), on_train_begin() and "
                        "on_train_batch_begin() yourself (see the docs).")
                self.step.assign_add(1)
        return self.method.call(self, inputs, bool(training), **kwargs)

    def _count_step(self):
        """Counts one training step, once per traced step, if the callback announced it.

        In a traced step (``fit``, a ``tf.function``) the first training call
        of the wrapper in the trace counts the step, later calls (a shared
        layer) do not; the check runs in the graph, so a trace reused without
        the callback's ``on_train_batch_begin`` raises too. In eager execution
        every training call counts one step.
        """
        gate = self._gate
        limit = ops.convert_to_tensor(gate.base) + ops.convert_to_tensor(gate.clock)
        if tf.executing_eagerly():
            step, limit = int(ops.convert_to_numpy(self.step)), int(limit)
            if step >= limit:
                raise RuntimeError(self._unannounced_message(
                    f" (step {step}, announced up to {limit})"))
            self.step.assign(step + 1)
            return
        counted = _COUNTED.setdefault(tf.compat.v1.get_default_graph(), set())
        key = (id(self), threading.get_ident())
        if key in counted:
            return
        counted.add(key)
        step = ops.convert_to_tensor(self.step)
        ok = ops.less(step, limit)
        check = tf.debugging.Assert(ok, [self._unannounced_message(""), "step:", step,
                                         "announced up to:", limit])
        with tf.control_dependencies([check]):
            # Under XLA (jit_compile) the assertion is a no-op: the step then stays capped.
            self.step.assign(step + ops.cast(ok, "int64"))

    def _unannounced_message(self, values):
        return (
            f"PruneWrapper '{self.name}': a training step{values} was not announced by "
            "tfprune.callbacks.Pruning(), so its schedules would not advance. In a custom "
            "training loop call the callback's on_train_batch_begin() before every training "
            "step, and call on_train_begin() again before reusing a traced training step "
            "after on_train_end(). In eager execution (run_eagerly=True, or a loop without "
            "tf.function) every training call of a layer counts one step: run a layer that "
            "is called several times per step (a shared layer) in a tf.function.")

    def run_layer(self, inputs, values, training=None, use_activation=True, **kwargs):
        """Runs the inner layer's own ``call`` with some variables replaced.

        Args:
            inputs: the layer inputs.
            values: ``{variable attribute name: tensor}`` (e.g. ``{"kernel": k * m}``).
            training: passed on to layers whose ``call`` takes it.
            use_activation: False runs the layer without its activation (for
                methods that sample pre-activations, e.g. the local
                reparameterization trick); apply ``wrapper.layer.activation``
                yourself afterwards.
        """
        mapping = [(getattr(self.layer, name), value) for name, value in values.items()]
        if self._call_has_training:
            kwargs["training"] = training
        activation = getattr(self.layer, "activation", None)
        if not use_activation and activation is not None:
            self.layer.activation = keras.activations.linear
        try:
            with keras.StatelessScope(state_mapping=mapping) as scope:
                outputs = self.layer.call(inputs, **kwargs)
        finally:
            if not use_activation and activation is not None:
                self.layer.activation = activation
        # Apply the layer's own state updates (e.g. BatchNormalization statistics).
        for var in self.layer.non_trainable_variables:
            new = scope.get_current_value(var)
            if new is not None:
                var.assign(new)
        return outputs

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def compute_output_spec(self, *args, **kwargs):
        return self.layer.compute_output_spec(*args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config["method"] = keras.saving.serialize_keras_object(self.method)
        if self.budget is not None:
            config["budget"] = keras.saving.serialize_keras_object(self.budget)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(config.pop("layer"),
                                                      custom_objects=custom_objects)
        method = keras.saving.deserialize_keras_object(config.pop("method"),
                                                       custom_objects=custom_objects)
        budget = config.pop("budget", None)
        if budget is not None:
            budget = keras.saving.deserialize_keras_object(budget, custom_objects=custom_objects)
        return cls(layer, method, budget=budget, **config)

    # -- helpers used by strip/report/callback --------------------------------
    def masked_weights(self):
        """The inner layer's weights with the final masks applied (numpy), by variable path."""
        masks = self.method.final_masks(self)
        out = []
        for var in self.layer.weights:
            value = ops.convert_to_numpy(var)
            for name, mask in masks.items():
                if getattr(self.layer, name, None) is var:
                    value = self.method.final_weight(self, name, value * mask)
            out.append(value)
        return out


def _handler_for(layer, method):
    from tfprune.methods.follow import Follow

    if isinstance(method, Follow):
        return None
    handler = handlers.get_handler(layer)
    if handler is None:
        raise ValueError(
            f"PruneWrapper: layer '{layer.name}' of type {type(layer).__name__} is not supported; "
            f"supported types: {', '.join(handlers.supported_layer_types())}.")
    return handler


def find_wrappers(model):
    """All `PruneWrapper` layers of ``model`` (nested models included), in order."""
    from tfprune._utils import iter_layers

    if isinstance(model, PruneWrapper):
        return [model]
    return [layer for layer in iter_layers(model) if isinstance(layer, PruneWrapper)]
