"""The Method interface: what a pruning method must provide.

A method is a small serializable object holding hyperparameters. The wrapper
gives each layer its own copy (`Method.clone`), and the copy creates the
layer's state (masks, logits, posterior parameters) as variables of the
wrapper in `build`, so that `.keras` files and checkpoints restore it.

Life cycle, for one `tfprune.PruneWrapper`:

1. `build(wrapper)`: create variables with ``wrapper.add_weight``.
2. `initialize(wrapper)`: once, after `tfprune.prune` copied the trained
   weights in (e.g. initialize logits from magnitudes).
3. `effective_variables(wrapper, training)`: in ``call``, a dict
   ``{variable name: tensor}`` of the values the layer computes with
   (``kernel * mask``, a sampled kernel, a masked bias...).
4. `update(wrapper, step)`: from `tfprune.callbacks.Pruning`, before each
   training step (Python int ``step``); returns True if masks changed.
5. `on_epoch_end(wrapper, epoch)`: optional per-epoch work.
6. `final_masks(wrapper)`: the hard inference masks, used by `tfprune.strip`
   and the report: ``{variable name: numpy array of 0/1}``.
7. `logs(wrapper)`: scalars for TensorBoard.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from tfprune import structures as structures_lib
from tfprune.handlers import canonical_shape, from_canonical, to_canonical

_PKG = "tfprune"


class Method:
    """Base class of all pruning methods.

    See the module docstring for the life cycle. A new method subclasses
    `Method` (or `MaskedMethod`), registers itself with Keras and implements
    at least `build`, `effective_variables` and `final_masks`.

    Args:
        structure: a `tfprune.structures.Structure`, its name, or None
            (`Unstructured()`).

    Example:
        >>> @keras.saving.register_keras_serializable(package="my_methods")
        ... class Random(MaskedMethod):
        ...     \"\"\"Removes random groups once, at the first step.\"\"\"
        ...     def __init__(self, sparsity, structure=None):
        ...         super().__init__(structure)
        ...         self.sparsity = sparsity
        ...     def get_config(self):
        ...         return {**super().get_config(), "sparsity": self.sparsity}
        ...     def update(self, wrapper, step):
        ...         if step != 0:
        ...             return False
        ...         for spec in self.kernel_specs(wrapper):
        ...             scores = keras.random.uniform(self.group_scores(wrapper, spec).shape)
        ...             self.set_group_mask(wrapper, spec, structures.select_groups(
        ...                 self.structure, scores, self.sparsity))
        ...         return True
        >>> pruned = tfprune.prune(model, Random(0.5))
    """

    def __init__(self, structure=None):
        self.structure = structures_lib.get(structure)

    # -- configuration -----------------------------------------------------
    def get_config(self):
        return {"structure": structures_lib.serialize(self.structure)}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def clone(self):
        """A fresh copy with the same hyperparameters and no state."""
        return type(self).from_config(self.get_config())

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "structure")
        return f"{type(self).__name__}({args}, structure={self.structure!r})"

    # -- life cycle ----------------------------------------------------------
    def validate(self, wrapper):
        """Raises a clear error if this method/structure cannot prune ``wrapper.layer``."""

    def build(self, wrapper):
        raise NotImplementedError

    def initialize(self, wrapper):
        """Called once after trained weights were copied into ``wrapper.layer``."""

    def effective_variables(self, wrapper, training):
        raise NotImplementedError

    def call(self, wrapper, inputs, training, **kwargs):
        """The wrapped layer's forward pass; default: run it with `effective_variables`.

        Override for methods that need more than substituted weights (e.g. the
        local reparameterization trick: `PruneWrapper.run_layer` with
        ``use_activation=False``). Add regularization losses here with
        ``wrapper.add_loss``.
        """
        values = self.effective_variables(wrapper, training)
        return wrapper.run_layer(inputs, values, training=training, **kwargs)

    def on_train_begin(self, wrapper, params):
        """Called by `tfprune.callbacks.Pruning` when a fit starts (default: nothing).

        Args:
            wrapper: the `PruneWrapper`.
            params: the fit's callback params (``{"epochs": int, "steps": int or
                None, ...}``; empty in a custom loop), e.g. to resolve a schedule
                length from the fit's total number of steps.
        """

    def update(self, wrapper, step):
        return False

    def on_epoch_end(self, wrapper, epoch):
        """Per-epoch work (default: none)."""

    def final_masks(self, wrapper):
        raise NotImplementedError

    def final_weight(self, wrapper, name, value):
        """The value `tfprune.strip` stores for variable ``name`` after masking (numpy).

        Default: ``value`` unchanged. Override to fold an inference-time
        transform (e.g. fake quantization) into the stripped weights.
        """
        return value

    def unit_mask(self, wrapper):
        """Inference mask over the layer's output units (1 = kept), numpy, or None.

        Defined when the structure removes whole units (`Filter`).
        """
        return None

    def logs(self, wrapper):
        """Scalars for TensorBoard (``{name: float}``); sparsity is logged by the callback."""
        return {}

    #: Whether the state advances only through `tfprune.callbacks.Pruning`.
    requires_callback = True


class MaskedMethod(Method):
    """A method whose state is one 0/1 mask per kernel (plus the bias for units).

    Subclasses override `update` (and the per-epoch hooks) and set the masks
    with `set_group_mask` (a mask on the structure's group grid, e.g. from
    `tfprune.structures.select_groups` on `group_scores`) or `set_unit_mask`.
    The effective kernel is ``kernel * mask``; `Magnitude` is the reference
    subclass.

    Example:
        >>> class Magnitude(MaskedMethod):           # the essence of methods.Magnitude
        ...     def update(self, wrapper, step):
        ...         for spec in self.kernel_specs(wrapper):
        ...             scores = self.group_scores(wrapper, spec)
        ...             self.set_group_mask(wrapper, spec, structures.select_groups(
        ...                 self.structure, scores, 0.5))
        ...         return True
    """

    def build(self, wrapper):
        self._masks = {}
        for spec in wrapper.handler.kernels:
            var = getattr(wrapper.layer, spec.name)
            self._masks[spec.name] = wrapper.add_weight(
                name=f"{spec.name}_mask", shape=tuple(var.shape), initializer="ones",
                trainable=False, dtype=var.dtype, aggregation="only_first_replica")
        self._bias_mask = None
        bias = getattr(wrapper.layer, wrapper.handler.bias or "", None)
        if self.structure.removes_units and bias is not None:
            self._bias_mask = wrapper.add_weight(
                name="bias_mask", shape=tuple(bias.shape), initializer="ones", trainable=False,
                dtype=bias.dtype, aggregation="only_first_replica")

    def effective_variables(self, wrapper, training):
        out = {}
        for name, mask in self._masks.items():
            out[name] = getattr(wrapper.layer, name) * mask
        if self._bias_mask is not None:
            bias = wrapper.handler.bias
            out[bias] = getattr(wrapper.layer, bias) * self._bias_mask
        return out

    def kernel_specs(self, wrapper):
        """Kernels this method prunes (all of them; `Filter` only the unit kernel)."""
        if self.structure.removes_units:
            return [wrapper.handler.unit_spec()]
        return list(wrapper.handler.kernels)

    def group_scores(self, wrapper, spec):
        """Per-group score on the structure's grid: squared L2 norm of the masked kernel.

        Scoring the masked kernel keeps pruned groups pruned (as tfmot, which
        zeroes them in place) when the sparsity rises step by step.
        """
        kernel = ops.convert_to_tensor(getattr(wrapper.layer, spec.name)) * self._masks[spec.name]
        canon = to_canonical(kernel, spec.layout)
        return self.structure.reduce(ops.square(ops.cast(canon, "float32")))

    def set_group_mask(self, wrapper, spec, group_mask):
        """Expands a group mask and assigns it (and the bias mask for units)."""
        var = getattr(wrapper.layer, spec.name)
        cshape = canonical_shape(var.shape, spec.layout)
        mask = from_canonical(self.structure.expand(group_mask, cshape), var.shape, spec.layout)
        self._masks[spec.name].assign(ops.cast(mask, var.dtype))
        if self._bias_mask is not None and spec.produces_units:
            self._bias_mask.assign(ops.cast(ops.reshape(group_mask, (-1,)), self._bias_mask.dtype))

    def set_unit_mask(self, wrapper, unit_mask):
        """Sets the mask of whole units (used for coupled `Filter` pruning)."""
        spec = wrapper.handler.unit_spec()
        self.set_group_mask(wrapper, spec, ops.reshape(ops.convert_to_tensor(unit_mask), (-1, 1)))

    def final_masks(self, wrapper):
        out = {name: np.asarray(ops.convert_to_numpy(m)) for name, m in self._masks.items()}
        if self._bias_mask is not None:
            out[wrapper.handler.bias] = np.asarray(ops.convert_to_numpy(self._bias_mask))
        return out

    def unit_mask(self, wrapper):
        if not self.structure.removes_units:
            return None
        spec = wrapper.handler.unit_spec()
        mask = ops.convert_to_numpy(self._masks[spec.name])
        canon = np.asarray(to_canonical(mask, spec.layout))
        return (np.abs(canon).sum(axis=(0, 1)) > 0).astype("float32")


def get(identifier):
    """Resolves a method name (``"magnitude"``), config dict or instance.

    Args:
        identifier: a `Method`, a name of `tfprune.methods.BY_NAME` (built
            with its default arguments), or a config dict from
            ``keras.saving.serialize_keras_object(method)``.

    Returns:
        A `Method`.

    Raises:
        ValueError: unknown name. TypeError: anything else.

    Example:
        >>> methods.get(methods.Magnitude(0.5))
        Magnitude(sparsity=0.5, schedule=None, structure=Unstructured())
        >>> methods.get(keras.saving.serialize_keras_object(methods.DPP(2, 4)))  # doctest: +SKIP
    """
    from tfprune import methods as methods_pkg

    if isinstance(identifier, Method):
        return identifier
    if isinstance(identifier, str):
        key = identifier.lower().replace("-", "_")
        if key in methods_pkg.BY_NAME:
            return methods_pkg.BY_NAME[key]()
        raise ValueError(f"Unknown method {identifier!r}; allowed: {sorted(methods_pkg.BY_NAME)}.")
    if isinstance(identifier, dict):
        obj = keras.saving.deserialize_keras_object(identifier)
        if isinstance(obj, Method):
            return obj
    raise TypeError(
        "`method` must be a tfprune.methods.Method (e.g. methods.Magnitude(0.5)), "
        f"got {identifier!r}."
    )
