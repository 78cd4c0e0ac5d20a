"""The Method interface: what a pruning method must provide.

A method is a small serializable object holding hyperparameters only (what
`Method.get_config` returns, and values derived from them alone); it is not
changed after ``__init__``, so one instance may serve many layers. What it
creates for one layer (masks, logits, scores, posterior parameters, seeds)
lives in that layer's `LayerState`, ``wrapper.state``, which the wrapper owns:
variables by name (``wrapper.state["kernel_mask"]``), created as weights of
the wrapper in `build` so that `.keras` files restore them, and per-layer
Python values that are not saved (``wrapper.state.host``). Methods read
their state only from ``wrapper.state``.

Life cycle, for one `tfprune.PruneWrapper`:

1. `build(wrapper)`: create variables with `Method.add_state` (a weight of
   the wrapper, also tracked by name in ``wrapper.state`` so that
   `tf.saved_model.save` and `tf.train.Checkpoint` find it) and put derived
   per-layer values in ``wrapper.state.host``.
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

**Mixed precision.** Under a ``mixed_float16`` policy Keras reads float
variables at the compute dtype (float16) inside a layer's call. Methods read
their state and the kernels with `read_value` instead, compute masks, noise,
KL and penalties in the variable dtype (float32), and hand float32 effective
variables to `PruneWrapper.run_layer`: the wrapped layer casts them to its
compute dtype when it reads them. Losses added with ``add_loss`` are float32.

**Randomness.** Methods that sample draw stateless random numbers from a
saved per-layer seed and the saved step counter (`step_seed`), so a model
saved mid-training resumes with the same draws.
"""

from __future__ import annotations

import contextlib
import random
import zlib

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tfprune import structures as structures_lib
from tfprune.handlers import canonical_shape, from_canonical, to_canonical

_PKG = "tfprune"


def no_autocast():
    """A context in which Keras reads float variables in their own dtype.

    Inside a layer's call under a mixed-precision policy Keras casts float
    variables to the compute dtype when they are read; this scope (the one
    Keras layers with ``autocast=False`` use) switches that off.
    """
    try:
        from keras.src.backend import AutocastScope
    except ImportError:  # pragma: no cover - a Keras without it: no autocast to undo
        return contextlib.nullcontext()
    return AutocastScope(None)


def read_value(var, dtype=None):
    """The value of a variable (or tensor) in its own dtype, or cast to ``dtype``.

    Unlike ``ops.convert_to_tensor(var)`` inside a mixed-precision layer call,
    this is not rounded to float16 first. Gradients flow to the variable.

    Args:
        var: a `keras.Variable` or a tensor.
        dtype: None (the variable's dtype) or a dtype to cast to.

    Returns:
        A tensor.
    """
    import tensorflow as tf

    with no_autocast():
        # `ops.convert_to_tensor` returns a Keras variable unread (it reads, autocast, when
        # an op uses it): read it here, inside the scope.
        value = tf.convert_to_tensor(var.value if isinstance(var, keras.Variable) else var)
    return value if dtype is None else ops.cast(value, dtype)


def layer_seed(seed, name):
    """A per-layer ``[2]`` int seed: ``seed`` (or a draw of Python's generator) and the name's CRC.

    With ``seed=None`` the first half comes from Python's `random` (seeded by
    `keras.utils.set_random_seed`, like Keras' own default seeds), so runs are
    repeatable and layers get distinct seeds; with an int seed, the layer name
    keeps layers distinct.
    """
    first = random.randint(1, int(1e9)) if seed is None else int(seed)
    return [first, zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF]


def step_seed(seed, step, *more):
    """The stateless seed of one draw: ``seed`` with ``step`` (and ``more`` ints) folded in.

    Args:
        seed: the ``[2]`` int64 seed variable (see `Method.add_seed`).
        step: a scalar int tensor (e.g. ``wrapper.step``).
        *more: further ints or scalar int tensors (a kernel index, a replica id).

    Returns:
        An int64 ``[2]`` tensor for ``tf.random.stateless_*``.
    """
    import tensorflow as tf

    out = ops.cast(read_value(seed), "int64")
    for data in (step, *more):
        out = tf.random.experimental.stateless_fold_in(out, ops.cast(data, "int64"))
    return out


class LayerState(tf.Module):
    """The pruning state of one wrapped layer, owned by its `PruneWrapper` (``wrapper.state``).

    A `Method` holds hyperparameters only; everything it creates for one
    layer lives here:

    * **variables**, by name: ``state["kernel_mask"]``. `Method.add_state`
      and `Method.add_seed` create them as weights of the wrapper (so `.keras`
      files save them under their names, in creation order) and register them
      here, where they are tracked, so `tf.saved_model.save` and
      `tf.train.Checkpoint` find them;
    * **host values**: ``state.host``, a plain dict of per-layer Python
      values that are not saved, e.g. metadata derived at build (DPP's runs
      of each kernel) or host-side caches and flags (Taylor's resolved
      criterion). They must be derivable again from the layer, the
      hyperparameters and the variables.

    Example:
        >>> wrapper = tfprune.PruneWrapper(keras.layers.Dense(4), methods.Magnitude(0.5))
        >>> _ = wrapper(keras.ops.ones((1, 3)))
        >>> wrapper.state.names()
        ['kernel_mask']
        >>> wrapper.state["kernel_mask"].shape
        (3, 4)
    """

    def __init__(self):
        super().__init__(name="layer_state")
        self._vars = {}  # tracked (a TF dict wrapper): name -> variable, in creation order
        # Not tracked, not saved: plain Python values.
        object.__setattr__(self, "host", {})

    def add(self, name, variable):
        """Registers ``variable`` under ``name`` (unique within the layer) and returns it."""
        if name in self._vars:
            raise ValueError(f"LayerState: a state variable named '{name}' already exists "
                             f"(existing: {self.names()}); state names must be unique per "
                             "layer.")
        self._vars[name] = variable
        return variable

    def __getitem__(self, name):
        try:
            return self._vars[name]
        except KeyError:
            raise KeyError(f"LayerState: no state variable '{name}'; this layer has "
                           f"{self.names()}.") from None

    def __contains__(self, name):
        return name in self._vars

    def __len__(self):
        return len(self._vars)

    def get(self, name, default=None):
        """The variable ``name``, or ``default`` if the layer has none of that name."""
        return self._vars.get(name, default)

    def names(self):
        """The variables' names, in creation order."""
        return list(self._vars)

    def items(self):
        """``[(name, variable)]``, in creation order."""
        return list(self._vars.items())

    def __repr__(self):
        return f"LayerState({self.names()}, host={sorted(self.host)})"


class Method:
    """Base class of all pruning methods.

    See the module docstring for the life cycle. A new method subclasses
    `Method` (or `MaskedMethod`), registers itself with Keras and implements
    at least `build`, `effective_variables` and `final_masks`.

    **Where state lives.** The method object holds hyperparameters only
    (what `get_config` returns, and values derived from them alone) and is
    not changed after ``__init__``: the same instance may drive many layers.
    Everything per layer goes into the wrapper's `LayerState`,
    ``wrapper.state``: variables created with `add_state` / `add_seed` (read
    them back as ``wrapper.state[name]``) and Python values that are not
    saved in ``wrapper.state.host``. Never store per-layer values on
    ``self`` or as attributes of the wrapper.

    Args:
        structure: a `tfprune.structures.Structure`, its name, or None
            (`Unstructured()`).

    Example:
        >>> @keras.saving.register_keras_serializable(package="my_methods")
        ... class RandomMask(Method):
        ...     \"\"\"Keeps each kernel weight with probability ``keep``, drawn at build.\"\"\"
        ...     def __init__(self, keep, structure=None):
        ...         super().__init__(structure)
        ...         self.keep = keep                  # a hyperparameter: nothing per layer
        ...     def get_config(self):
        ...         return {**super().get_config(), "keep": self.keep}
        ...     def build(self, wrapper):              # per-layer state: in wrapper.state
        ...         shape = wrapper.layer.kernel.shape
        ...         mask = self.add_state(wrapper, "kernel_mask", shape, initializer="ones")
        ...         mask.assign(ops.cast(keras.random.uniform(shape) < self.keep, mask.dtype))
        ...     def effective_variables(self, wrapper, training):
        ...         mask = read_value(wrapper.state["kernel_mask"])
        ...         return {"kernel": read_value(wrapper.layer.kernel) * mask}
        ...     def final_masks(self, wrapper):
        ...         return {"kernel": ops.convert_to_numpy(wrapper.state["kernel_mask"])}
        >>> pruned = tfprune.prune(model, RandomMask(0.5))
        >>> pruned.get_layer("dense").state["kernel_mask"]    # the layer's own mask
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
        """A fresh copy with the same hyperparameters (a method holds no per-layer state)."""
        return type(self).from_config(self.get_config())

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "structure")
        return f"{type(self).__name__}({args}, structure={self.structure!r})"

    # -- life cycle ----------------------------------------------------------
    def validate(self, wrapper):
        """Raises a clear error if this method/structure cannot prune ``wrapper.layer``."""

    def build(self, wrapper):
        raise NotImplementedError

    def add_state(self, wrapper, name, shape, dtype="float32", initializer="zeros",
                  trainable=False):
        """Creates one variable of the layer's pruning state, owned by ``wrapper``.

        The variable is a weight of the wrapper (saved in `.keras` files
        under ``name``, in creation order) and is registered by name in the
        wrapper's `LayerState` (``wrapper.state[name]``), which is tracked, so
        `tf.saved_model.save` and `tf.train.Checkpoint` find it. Non-trainable
        state is the first replica's under a distribution strategy (methods
        update it from the callback).

        Args:
            wrapper: the `PruneWrapper` being built.
            name: variable name, unique within the layer (e.g. ``"kernel_mask"``).
            shape: the variable's shape.
            dtype: its dtype (float state: the layer's variable dtype, float32
                under mixed precision).
            initializer: a Keras initializer or its name.
            trainable: whether the optimizer trains it.

        Returns:
            The variable (also ``wrapper.state[name]``).

        Raises:
            ValueError: the layer already has a state variable ``name``.
        """
        state = wrapper.state
        if name in state:
            raise ValueError(f"{type(self).__name__}: layer '{wrapper.name}' already has a state "
                             f"variable '{name}' (existing: {state.names()}); state names must "
                             "be unique per layer.")
        var = wrapper.add_weight(
            name=name, shape=tuple(shape), dtype=dtype, initializer=initializer,
            trainable=trainable, aggregation="none" if trainable else "only_first_replica")
        return state.add(name, var)

    def add_seed(self, wrapper, seed=None, name="noise_seed"):
        """A saved ``[2]`` int64 seed variable of ``wrapper`` (see `layer_seed`, `step_seed`).

        The seed is drawn at build (deterministic under
        `keras.utils.set_random_seed`, distinct per layer) and saved with the
        model, so the per-step draws ``step_seed(seed, wrapper.step, ...)``
        are the same after reloading a model saved mid-training. Like every
        state variable it is ``wrapper.state[name]``.
        """
        value = layer_seed(seed, wrapper.name)
        return self.add_state(wrapper, name, (2,), dtype="int64",
                              initializer=keras.initializers.Constant(value))

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

    # -- coupled units (`tfprune.groups`) ---------------------------------------
    @property
    def removes_units(self):
        """True if this method can empty whole output units (so `tfprune.shrink` removes them).

        Default: the structure's ``removes_units`` (`structures.Filter`).
        """
        return self.structure.removes_units

    def keep_units(self):
        """The variant of this method for a layer whose units must all stay, or None.

        `tfprune.prune` uses it for layers whose units reach a model output or
        cannot be removed by `tfprune.shrink`. Default: None (leave the layer
        dense) when the structure removes units, else the method itself.
        """
        return None if self.structure.removes_units else self

    #: How a method that removes units shares one decision with the other
    #: members of a coupled group (channels joined by ``Add``, a grouped
    #: convolution...): ``"select"``: when a member updates its masks, the group
    #: picks its units from the sum of the members' `unit_scores` at their
    #: largest `unit_sparsity`, and imposes them with `set_unit_mask`;
    #: ``"tie"``: the members' `unit_parameters` are averaged before every step
    #: and they `share_noise`, so each samples the same mask; ``"union"``
    #: (default): each member decides and a channel is removed only where all
    #: members removed it.
    coupling = "union"

    def check_budget(self, budget):
        """Raises a ValueError if this method cannot be used with ``budget`` (None: without one).

        A budget (`tfprune.budgets`) ranks units over the whole model: it needs
        a method that removes units and scores them (``coupling = "select"``).
        """
        if budget is not None and not (self.removes_units and self.coupling == "select"):
            raise ValueError(
                f"{type(self).__name__}: a budget ({budget!r}) ranks units over the whole model "
                "and needs a method that scores whole units (coupling 'select': e.g. "
                f"methods.Magnitude or methods.Taylor with structures.Filter()); got {self!r}.")

    def budget_progress(self, step):
        """``(due, progress)`` under a budget: whether units are re-selected before ``step``,
        and the fraction of the way from the dense cost to the budget's target (in [0, 1]).

        Default: once, at the first step, straight to the target.
        """
        return step == 0, 1.0

    def scored(self, wrapper):
        """False while the method has no unit scores yet (a budget then waits); default True."""
        return True

    def on_units_selected(self, wrapper):
        """Called after a budget (or a coupled group) imposed this layer's units (default: none)."""

    def unit_sparsity(self, step):
        """Fraction of the output units to remove at ``step`` (for ``coupling = "select"``)."""
        raise NotImplementedError(f"{type(self).__name__} has no unit sparsity.")

    def unit_scores(self, wrapper):
        """Importance of each output unit, numpy ``[units]`` (for ``coupling = "select"``)."""
        raise NotImplementedError(f"{type(self).__name__} has no unit scores.")

    def set_unit_mask(self, wrapper, unit_mask):
        """Imposes a 0/1 mask over the output units (for ``coupling = "select"``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot impose a unit mask.")

    def unit_parameters(self, wrapper):
        """The variable holding one trainable parameter per output unit, first axis = units
        (for ``coupling = "tie"``)."""
        raise NotImplementedError(f"{type(self).__name__} has no per-unit parameters.")

    def tie_key(self, wrapper):
        """Hashable summary of what must be equal for two layers to share a mask (e.g. how
        many units they keep); for ``coupling = "tie"``."""
        return None

    def share_noise(self, wrapper, other):
        """Makes ``wrapper`` draw the same random noise as ``other`` (for ``coupling = "tie"``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot share its noise.")


class MaskedMethod(Method):
    """A method whose state is one 0/1 mask per kernel (plus the bias for units).

    `build` creates, in ``wrapper.state``, the variable ``"<kernel>_mask"``
    of every kernel of the layer (``wrapper.state["kernel_mask"]``, with
    the kernel's shape) and, when the structure removes units and the layer
    has a bias, ``"bias_mask"``. Subclasses override `update` (and the
    per-epoch hooks) and set the masks with `set_group_mask` (a mask on the
    structure's group grid, e.g. from `tfprune.structures.select_groups` on
    `group_scores`) or `set_unit_mask`; more state of their own goes through
    `add_state` after ``super().build(wrapper)``. The effective kernel is
    ``kernel * mask``; `Magnitude` is the reference subclass.

    Example:
        >>> class Magnitude(MaskedMethod):           # the essence of methods.Magnitude
        ...     def update(self, wrapper, step):
        ...         for spec in self.kernel_specs(wrapper):
        ...             scores = self.group_scores(wrapper, spec)
        ...             self.set_group_mask(wrapper, spec, structures.select_groups(
        ...                 self.structure, scores, 0.5))
        ...         return True
        >>> pruned = tfprune.prune(model, Magnitude(structure=structures.Filter()))
        >>> dense = pruned.get_layer("dense")
        >>> dense.state["kernel_mask"], dense.state["bias_mask"]   # the layer's masks
    """

    @staticmethod
    def mask_name(name):
        """The state name of the mask of variable ``name`` (``"kernel"`` -> ``"kernel_mask"``)."""
        return f"{name}_mask"

    def build(self, wrapper):
        for spec in wrapper.handler.kernels:
            var = getattr(wrapper.layer, spec.name)
            self.add_state(wrapper, self.mask_name(spec.name), var.shape, dtype=var.dtype,
                           initializer="ones")
        bias = getattr(wrapper.layer, wrapper.handler.bias or "", None)
        if self.structure.removes_units and bias is not None:
            self.add_state(wrapper, "bias_mask", bias.shape, dtype=bias.dtype,
                           initializer="ones")

    def _masks(self, wrapper):
        """``[(kernel name, mask variable)]`` of the layer's kernels."""
        return [(spec.name, wrapper.state[self.mask_name(spec.name)])
                for spec in wrapper.handler.kernels]

    def effective_variables(self, wrapper, training):
        out = {}
        for name, mask in self._masks(wrapper):
            out[name] = read_value(getattr(wrapper.layer, name)) * read_value(mask)
        bias_mask = wrapper.state.get("bias_mask")
        if bias_mask is not None:
            bias = wrapper.handler.bias
            out[bias] = read_value(getattr(wrapper.layer, bias)) * read_value(bias_mask)
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
        mask = wrapper.state[self.mask_name(spec.name)]
        kernel = read_value(getattr(wrapper.layer, spec.name)) * read_value(mask)
        canon = to_canonical(kernel, spec.layout)
        return self.structure.reduce(ops.square(ops.cast(canon, "float32")))

    def set_group_mask(self, wrapper, spec, group_mask):
        """Expands a group mask and assigns it (and the bias mask for units)."""
        var = getattr(wrapper.layer, spec.name)
        cshape = canonical_shape(var.shape, spec.layout)
        mask = from_canonical(self.structure.expand(group_mask, cshape), var.shape, spec.layout)
        wrapper.state[self.mask_name(spec.name)].assign(ops.cast(mask, var.dtype))
        bias_mask = wrapper.state.get("bias_mask")
        if bias_mask is not None and spec.produces_units:
            bias_mask.assign(ops.cast(ops.reshape(group_mask, (-1,)), bias_mask.dtype))

    def unit_scores(self, wrapper):
        """L2 norm of each unit's (masked) kernel slice, numpy ``[units]``."""
        if not self.structure.removes_units:
            return super().unit_scores(wrapper)
        spec = wrapper.handler.unit_spec()
        scores = ops.convert_to_numpy(self.group_scores(wrapper, spec))  # [O, 1]: squared norms
        return np.sqrt(np.asarray(scores, np.float64).reshape(-1))

    def set_unit_mask(self, wrapper, unit_mask):
        """Sets the mask of whole units (used for coupled `Filter` pruning)."""
        spec = wrapper.handler.unit_spec()
        self.set_group_mask(wrapper, spec, ops.reshape(ops.convert_to_tensor(unit_mask), (-1, 1)))

    def final_masks(self, wrapper):
        out = {name: np.asarray(ops.convert_to_numpy(m)) for name, m in self._masks(wrapper)}
        bias_mask = wrapper.state.get("bias_mask")
        if bias_mask is not None:
            out[wrapper.handler.bias] = np.asarray(ops.convert_to_numpy(bias_mask))
        return out

    def unit_mask(self, wrapper):
        if not self.structure.removes_units:
            return None
        spec = wrapper.handler.unit_spec()
        mask = ops.convert_to_numpy(wrapper.state[self.mask_name(spec.name)])
        canon = np.asarray(to_canonical(mask, spec.layout))
        return (np.abs(canon).sum(axis=(0, 1)) > 0).astype("float32")


def get(identifier):
    """Resolves a method instance, name or config dict (the shared ``get()`` rules).

    The rules of `tfprune.methods.get`, `tfprune.structures.get` and
    `tfprune.schedules.get` are the same: an instance is returned as is; a
    registered name (case, ``-`` and ``_`` do not matter) builds the class
    with its default arguments, and a class that needs arguments is a
    ValueError saying so; a config dict from
    ``keras.saving.serialize_keras_object`` is deserialized; None is accepted
    only where it means something (not here: a method is required).

    Args:
        identifier: a `Method`; a name of `tfprune.methods.BY_NAME`
            (``"turbo_vbi"``, ``"TurboVBI"``: `TurboVBI()`; ``"dpp"`` and
            ``"magnitude"`` need arguments, so their names are errors); or a
            config dict from ``keras.saving.serialize_keras_object(method)``.

    Returns:
        A `Method`.

    Raises:
        ValueError: an unknown name (the message lists the allowed ones), the
            name of a method that needs arguments, or a config dict that
            cannot be deserialized.
        TypeError: None or any other type, a class instead of an instance, or
            a config dict of something that is not a `Method`.

    Example:
        >>> methods.get(methods.Magnitude(0.5))
        Magnitude(sparsity=0.5, schedule=None, structure=Unstructured())
        >>> methods.get("turbo-vbi")  # doctest: +SKIP
        >>> methods.get(keras.saving.serialize_keras_object(methods.DPP(2, 4)))  # doctest: +SKIP
    """
    from tfprune import methods as methods_pkg
    from tfprune._utils import resolve_identifier

    return resolve_identifier(
        identifier, argument="method", base=Method, names=methods_pkg.BY_NAME,
        kind="a tfprune.methods.Method", example="methods.Magnitude(0.5)",
        prefix="methods.")
