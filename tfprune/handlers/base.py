"""`LayerHandler`: everything tfprune knows about one layer type, and shared helpers.

A handler has two sides that read the same description of the layer:

- **pruning** (`PruneWrapper`, structures, methods, the report): the prunable
  kernels (`kernels`, a tuple of `KernelSpec` with their layout), which of
  them produces the layer's units (`unit_spec`) and the bias (`bias`). A
  handler with no kernels describes a layer tfprune does not prune.
- **surgery** (`DependencyGraph`, `shrink`): how the channels of the layer's
  inputs map to the channels of its outputs (`propagate`), and how to slice
  its config and weights once some channels are gone (`shrink_config`,
  `shrink_weights`).

Channels are always the last axis (``channels_last``). A layer that cannot be
followed raises `Stop(reason)` in `propagate`: the graph then marks the
channels reaching it and leaving it as not removable, with the reason.

Internally every position of a tensor's last axis carries a *slot* (an int);
slots that must be removed together are merged by the graph (union-find).
Alongside the slots the graph propagates the *constant value* of each
channel (NaN when the channel is not a known constant); this is what decides
whether a channel carries no information and can be removed exactly.
"""

from __future__ import annotations

import keras
import numpy as np

from tfprune.handlers.layout import KernelSpec, canonical_shape


class Stop(Exception):
    """Raised by `LayerHandler.propagate` when a layer cannot be followed."""


# Activations that act on each element on its own (removing a unit cannot
# change another unit's output). Anything else (softmax, custom functions)
# stops the graph at the layer's outputs.
ELEMENTWISE_ACTIVATIONS = (
    "linear", "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu",
    "swish", "hard_silu", "hard_swish", "sigmoid", "hard_sigmoid", "log_sigmoid",
    "tanh", "hard_tanh", "softplus", "softsign", "sparse_plus", "squareplus",
    "mish", "exponential", "tanh_shrink", "soft_shrink", "hard_shrink",
)


def _elementwise_fns():
    fns = {}
    for name in ELEMENTWISE_ACTIVATIONS:
        fn = getattr(keras.activations, name, None)
        if fn is not None:
            fns[id(fn)] = name
    return fns


_ELEMENTWISE_FNS = _elementwise_fns()


def is_elementwise(activation):
    """True when `activation` is a known element-wise Keras activation (or None)."""
    return activation is None or id(activation) in _ELEMENTWISE_FNS


def apply_elementwise(fn, const):
    """Apply an element-wise function to a constant vector, keeping NaN (= not constant)."""
    const = np.asarray(const, dtype=np.float64)
    known = ~np.isnan(const)
    if fn is None or not known.any():
        return const
    x = np.where(known, const, 0.0).astype("float32")[None]
    y = keras.ops.convert_to_numpy(fn(x))[0].astype(np.float64)
    return np.where(known, y, np.nan)


def weight(layer, name):
    """The numpy value of the weight called `name` of `layer` (None if absent)."""
    for v in layer.weights:
        if v.name == name:
            return keras.ops.convert_to_numpy(v).astype(np.float64)
    return None


def channels_last(layer):
    """Raise `Stop` unless `layer` works on the last axis (``channels_last``)."""
    fmt = getattr(layer, "data_format", None)
    if fmt not in (None, "channels_last"):
        raise Stop(f"data_format={fmt!r} (only 'channels_last' is followed)")


def same_last(inputs):
    """Raise `Stop` unless every input has the same number of channels."""
    sizes = {len(x.slots) for x in inputs}
    if len(sizes) != 1:
        raise Stop(f"inputs with different channel counts {sorted(sizes)} (broadcast)")


def last_axis_only(layer, rank):
    """Raise `Stop` unless ``layer.axis`` is exactly the channel axis."""
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    if [a % rank for a in axes] != [rank - 1]:
        raise Stop(f"axis={layer.axis} (only the last axis is followed)")


class LayerHandler:
    """Describes a layer type: its prunable kernels and how channels flow through it.

    The built-in handlers cover Dense, convolutions and the channel-only
    layers the dependency graph follows (see `tfprune.handlers`). Subclass
    one of them (or this class) for a custom layer and register it with
    `tfprune.handlers.register_handler`; a plain ``LayerHandler(kernels=...)``
    makes a layer prunable only: the dependency graph stops at it (its units
    are masked, never physically removed).

    Args:
        kernels: the prunable kernels (`KernelSpec`); default: the class's.
        bias: attribute name of the bias, or None; default: the class's.

    Attributes:
        kernels: the prunable kernels (`KernelSpec`), empty for a layer
            tfprune does not prune.
        bias: attribute name of the bias, or None.
        role: for the dependency graph: "producer" (creates new units:
            Dense, Conv), "follower" (carries per-channel weights of its
            input: BatchNormalization, DepthwiseConv2D) or None.
    """

    kernels: tuple = ()
    bias: str | None = "bias"
    role = None

    def __init__(self, kernels=None, bias="bias"):
        if kernels is not None:
            kernels = tuple(kernels)
            bad = [k for k in kernels if not isinstance(k, KernelSpec)]
            if bad:
                raise TypeError(f"{type(self).__name__}: `kernels` must hold KernelSpec "
                                f"objects, got {bad[0]!r}.")
            self.kernels = kernels
        self.bias = bias

    def __repr__(self):
        return f"{type(self).__name__}(kernels={self.kernels!r}, bias={self.bias!r})"

    # ------------------------------------------------------------ pruning side

    @property
    def prunable(self):
        """True when the layer has prunable kernels."""
        return bool(self.kernels)

    def unit_spec(self):
        """The `KernelSpec` whose output axis is the layer's units."""
        for spec in self.kernels:
            if spec.produces_units:
                return spec
        raise ValueError(f"{type(self).__name__}: no kernel produces units (kernels: "
                         f"{self.kernels!r}); mark one with KernelSpec(produces_units=True).")

    def num_units(self, layer):
        """Number of output units of ``layer``."""
        spec = self.unit_spec()
        return canonical_shape(getattr(layer, spec.name).shape, spec.layout)[2]

    # ------------------------------------------------------------ surgery side

    def propagate(self, g, layer, inputs, node):
        """Map input channels to output channels.

        Args:
            g: the `DependencyGraph` under construction (for `g.read`,
                `g.unit_slots`, `g.union`, `g.block`, `g.follow`).
            layer: the (unwrapped) layer.
            inputs: list of `TensorInfo` (`.slots`, `.const`, `.shape`).
            node: the Keras node of this call.

        Returns:
            A list with one `(slots, const)` pair per output tensor.

        Raises:
            Stop: the layer cannot be followed.
        """
        if self.kernels:
            raise Stop(f"registered for pruning only: its handler ({type(self).__name__}) "
                       "does not say how channels pass through it; register a handler that "
                       "subclasses tfprune.handlers.DenseHandler (or ConvHandler...) or "
                       "defines `propagate` to let the graph and shrink follow it")
        raise Stop("no channel handler")

    def shrink_config(self, layer, config, masks):
        """Return the config of the smaller layer (`masks`: `LayerMasks`)."""
        return config

    def shrink_weights(self, layer, masks):
        """Return {weight name: new numpy value} for the smaller layer.

        A list of values, one per weight in the order of `layer.weights`, is also
        accepted (for weights created without a name).
        """
        return {v.name: keras.ops.convert_to_numpy(v) for v in layer.weights}

