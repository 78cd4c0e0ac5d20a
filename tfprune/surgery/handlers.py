"""Per-layer-type channel handlers for the dependency graph and for `shrink`.

A handler says, for one family of Keras layers, how the channels of the
layer's inputs map to the channels of its outputs (`propagate`), and how to
slice the layer's config and weights once some channels are gone
(`shrink_config`, `shrink_weights`). Handlers are chosen by `isinstance`;
`register_handler` adds or overrides one.

Channels are always the last axis (`channels_last`). A layer that cannot be
followed raises `Stop(reason)` in `propagate`: the graph then marks the
channels reaching it and leaving it as not removable, with the reason.

Internally every position of a tensor's last axis carries a *slot* (an int);
slots that must be removed together are merged by the graph (union-find).
Alongside the slots the graph propagates the *constant value* of each
channel (NaN when the channel is not a known constant); this is what decides
whether a channel carries no information and can be removed exactly.
"""

from __future__ import annotations

import math

import keras
import numpy as np

__all__ = ["Handler", "Stop", "register_handler", "get_handler", "ELEMENTWISE_ACTIVATIONS"]


class Stop(Exception):
    """Raised by `Handler.propagate` when a layer cannot be followed."""


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


def _channels_last(layer):
    fmt = getattr(layer, "data_format", None)
    if fmt not in (None, "channels_last"):
        raise Stop(f"data_format={fmt!r} (only 'channels_last' is followed)")


def _same_last(inputs):
    sizes = {len(x.slots) for x in inputs}
    if len(sizes) != 1:
        raise Stop(f"inputs with different channel counts {sorted(sizes)} (broadcast)")


class Handler:
    """How one family of layers moves channels.

    Attributes:
        role: "producer" (creates new units: Dense, Conv), "follower" (carries
            per-channel weights of its input: BatchNormalization,
            DepthwiseConv2D) or None (no per-channel weights).
    """

    role = None

    def propagate(self, g, layer, inputs, node):
        """Map input channels to output channels.

        Args:
            g: the `DependencyGraph` under construction (for `g.read`,
                `g.unit_slots`, `g.union`, `g.block`).
            layer: the (unwrapped) layer.
            inputs: list of `TensorInfo` (`.slots`, `.const`, `.shape`).
            node: the Keras node of this call.

        Returns:
            A list with one `(slots, const)` pair per output tensor.

        Raises:
            Stop: the layer cannot be followed.
        """
        raise Stop("no channel handler")

    def shrink_config(self, layer, config, masks):
        """Return the config of the smaller layer (`masks`: `LayerMasks`)."""
        return config

    def shrink_weights(self, layer, masks):
        """Return {weight name: new numpy value} for the smaller layer."""
        return {v.name: keras.ops.convert_to_numpy(v) for v in layer.weights}


class PassThrough(Handler):
    """Identity on channels and on constants (Dropout at inference, Cropping...)."""

    def propagate(self, g, layer, inputs, node):
        _channels_last(layer)
        (x,) = inputs
        return [(x.slots, x.const)]


class ZeroPadding(PassThrough):
    """Zero borders: a zero channel stays zero, another constant does not stay constant."""

    def propagate(self, g, layer, inputs, node):
        _channels_last(layer)
        (x,) = inputs
        const = np.where(x.const == 0, 0.0, np.nan)
        return [(x.slots, const)]


class ElementwiseActivation(Handler):
    def propagate(self, g, layer, inputs, node):
        (x,) = inputs
        if isinstance(layer, keras.layers.Activation) and not is_elementwise(layer.activation):
            raise Stop(f"activation {getattr(layer.activation, '__name__', layer.activation)!r}"
                       " is not element-wise")
        return [(x.slots, apply_elementwise(layer, x.const))]


class Merge(Handler):
    """Add, Subtract, Multiply, Average, Maximum, Minimum: channel c of every input is one."""

    def propagate(self, g, layer, inputs, node):
        _same_last(inputs)
        for x in inputs[1:]:
            g.union(inputs[0].slots, x.slots)
        consts = np.stack([x.const for x in inputs])
        with np.errstate(invalid="ignore"):
            if isinstance(layer, keras.layers.Add):
                const = consts.sum(0)
            elif isinstance(layer, keras.layers.Subtract):
                const = consts[0] - consts[1]
            elif isinstance(layer, keras.layers.Average):
                const = consts.mean(0)
            elif isinstance(layer, keras.layers.Maximum):
                const = consts.max(0)
            elif isinstance(layer, keras.layers.Minimum):
                const = consts.min(0)
            else:  # Multiply: a zero factor makes the product zero
                const = np.where((consts == 0).any(0), 0.0, consts.prod(0))
        return [(inputs[0].slots, const)]


class Concat(Handler):
    def propagate(self, g, layer, inputs, node):
        rank = len(node.output_tensors[0].shape)
        if layer.axis % rank == rank - 1:
            return [(np.concatenate([x.slots for x in inputs]),
                     np.concatenate([x.const for x in inputs]))]
        # concatenation along another axis: channel c of every input is one channel
        _same_last(inputs)
        for x in inputs[1:]:
            g.union(inputs[0].slots, x.slots)
        consts = np.stack([x.const for x in inputs])
        const = np.where((consts == consts[0]).all(0), consts[0], np.nan)
        return [(inputs[0].slots, const)]


def _spatial_size(shape, what):
    dims = shape[1:-1]
    if any(d is None for d in dims):
        raise Stop(f"{what} of an input with unknown spatial shape {tuple(shape)}")
    return int(math.prod(dims))


class Flatten(Handler):
    def propagate(self, g, layer, inputs, node):
        _channels_last(layer)
        (x,) = inputs
        s = _spatial_size(x.shape, "flatten")
        return [(np.tile(x.slots, s), np.tile(x.const, s))]


class Reshape(Handler):
    """Reshape to a flat vector (like Flatten) or keeping the last axis as is."""

    def propagate(self, g, layer, inputs, node):
        (x,) = inputs
        out = node.output_tensors[0].shape
        if len(out) == 2 and len(x.shape) > 2:
            s = _spatial_size(x.shape, "reshape")
            if out[-1] == s * len(x.slots):
                return [(np.tile(x.slots, s), np.tile(x.const, s))]
        if out[-1] == x.shape[-1]:
            return [(x.slots, x.const)]
        raise Stop(f"reshape {tuple(x.shape)} -> {tuple(out)} mixes the channel axis")

    def shrink_config(self, layer, config, masks):
        n_in = int(masks.inputs[0].sum())
        target = list(config["target_shape"])
        if len(target) == 1 and len(masks.input_shapes[0]) > 2:
            target = [int(masks.outputs[0].sum())]
        else:
            target[-1] = n_in
        config["target_shape"] = tuple(target)
        return config


# ---------------------------------------------------------------- producers


class _Producer(Handler):
    role = "producer"
    kernel_name = "kernel"

    def fold_reason(self, layer):
        """None if a constant input channel can be folded into the bias exactly."""
        return None

    def check(self, layer):
        pass

    def out_slices(self, layer):
        """[units, fan_in] view of the kernel (one row per output unit)."""
        k = weight(layer, self.kernel_name)
        return np.moveaxis(k, -1, 0).reshape(k.shape[-1], -1)

    def propagate(self, g, layer, inputs, node):
        self.check(layer)
        if len(inputs) != 1:
            raise Stop("more than one input")
        (x,) = inputs
        g.read(layer, x, self.fold_reason(layer))
        rows = self.out_slices(layer)
        bias = weight(layer, "bias")
        if bias is None:
            bias = np.zeros(rows.shape[0])
        const = np.where((rows == 0).all(1), bias, np.nan)
        slots = g.unit_slots(layer, rows.shape[0], const)
        if not is_elementwise(layer.activation):
            g.block(slots, f"the activation of '{layer.name}' is not element-wise")
        return [(slots, apply_elementwise(layer.activation, const))]

    def shrink_config(self, layer, config, masks):
        key = "units" if "units" in config else "filters"
        config[key] = int(masks.outputs[0].sum())
        if masks.fold is not None and not config.get("use_bias", True):
            config["use_bias"] = True
        return config

    def fold_contribution(self, layer, removed, values):
        """Bias change from input channels `removed` held at constant `values`."""
        k = weight(layer, self.kernel_name)
        k = k.reshape(-1, k.shape[-2], k.shape[-1]).sum(0)  # [in, out]
        return values @ k[removed]

    def slice_kernel(self, k, in_mask, out_mask):
        return k[..., in_mask, :][..., out_mask]

    def shrink_weights(self, layer, masks):
        in_mask, out_mask = masks.inputs[0], masks.outputs[0]
        out = {self.kernel_name: self.slice_kernel(weight(layer, self.kernel_name),
                                                   in_mask, out_mask)}
        bias = weight(layer, "bias")
        if masks.fold is not None:
            removed, values = masks.fold
            delta = self.fold_contribution(layer, removed, values)
            bias = delta if bias is None else bias + delta
        if bias is not None:
            out["bias"] = bias[out_mask]
        return out


class DenseHandler(_Producer):
    def check(self, layer):
        if getattr(layer, "lora_enabled", False):
            raise Stop("LoRA-enabled Dense")
        if getattr(layer, "quantization_mode", None):
            raise Stop("quantized Dense")

    def fold_contribution(self, layer, removed, values):
        return values @ weight(layer, "kernel")[removed]


def _conv_fold_reason(layer):
    if layer.padding == "valid" or all(k == 1 for k in layer.kernel_size):
        return None
    return (f"'{layer.name}' has padding={layer.padding!r}: a constant input channel does "
            "not contribute a constant at the borders")


class ConvHandler(_Producer):
    def check(self, layer):
        _channels_last(layer)
        if getattr(layer, "groups", 1) != 1:
            raise Stop(f"grouped convolution (groups={layer.groups})")

    def fold_reason(self, layer):
        return _conv_fold_reason(layer)


class ConvTransposeHandler(_Producer):
    """Kernel layout [*k, filters, in_channels]."""

    def check(self, layer):
        _channels_last(layer)

    def fold_reason(self, layer):
        return f"'{layer.name}' is a transposed convolution"

    def out_slices(self, layer):
        k = weight(layer, "kernel")
        return np.moveaxis(k, -2, 0).reshape(k.shape[-2], -1)

    def slice_kernel(self, k, in_mask, out_mask):
        return k[..., out_mask, :][..., in_mask]


class SeparableConvHandler(_Producer):
    """Depthwise [*k, in, m] then pointwise [1.., in*m, filters]."""

    kernel_name = "pointwise_kernel"

    def check(self, layer):
        _channels_last(layer)

    def fold_reason(self, layer):
        return _conv_fold_reason(layer)

    def fold_contribution(self, layer, removed, values):
        dk = weight(layer, "depthwise_kernel")
        pk = weight(layer, "pointwise_kernel")
        m = dk.shape[-1]
        dsum = dk.reshape(-1, dk.shape[-2], m).sum(0)  # [in, m]
        pk = pk.reshape(-1, pk.shape[-1]).reshape(dk.shape[-2], m, pk.shape[-1])
        per_channel = np.einsum("im,imo->io", dsum, pk)  # [in, out]
        return values @ per_channel[removed]

    def shrink_weights(self, layer, masks):
        in_mask, out_mask = masks.inputs[0], masks.outputs[0]
        dk = weight(layer, "depthwise_kernel")
        pk = weight(layer, "pointwise_kernel")
        m = dk.shape[-1]
        out = {
            "depthwise_kernel": dk[..., in_mask, :],
            "pointwise_kernel": pk[..., np.repeat(in_mask, m), :][..., out_mask],
        }
        bias = weight(layer, "bias")
        if masks.fold is not None:
            removed, values = masks.fold
            delta = self.fold_contribution(layer, removed, values)
            bias = delta if bias is None else bias + delta
        if bias is not None:
            out["bias"] = bias[out_mask]
        return out


# ---------------------------------------------------------------- followers


class DepthwiseHandler(Handler):
    """Each input channel c gives outputs c*m .. c*m+m-1 (they all go with c)."""

    role = "follower"

    def propagate(self, g, layer, inputs, node):
        _channels_last(layer)
        (x,) = inputs
        g.follow(layer, x)
        k = weight(layer, "kernel")  # [*k, in, m]
        m = k.shape[-1]
        ksum = k.reshape(-1, k.shape[-2], m).sum(0)  # [in, m]
        kzero = (k.reshape(-1, k.shape[-2], m) == 0).all(0)
        bias = weight(layer, "bias")
        bias = np.zeros(k.shape[-2] * m) if bias is None else bias
        bias = bias.reshape(-1, m)
        v = x.const[:, None]
        with np.errstate(invalid="ignore"):
            if layer.padding == "valid" or all(s == 1 for s in layer.kernel_size):
                const = v * ksum + bias
            else:
                const = np.where(v == 0, bias, np.nan)
        const = np.where(kzero, bias, const).reshape(-1)
        slots = np.repeat(x.slots, m)
        if not is_elementwise(layer.activation):
            g.block(slots, f"the activation of '{layer.name}' is not element-wise")
        return [(slots, apply_elementwise(layer.activation, const))]

    def shrink_weights(self, layer, masks):
        in_mask, out_mask = masks.inputs[0], masks.outputs[0]
        out = {"kernel": weight(layer, "kernel")[..., in_mask, :]}
        bias = weight(layer, "bias")
        if bias is not None:
            out["bias"] = bias[out_mask]
        return out


class BatchNormHandler(Handler):
    role = "follower"

    def propagate(self, g, layer, inputs, node):
        (x,) = inputs
        rank = len(x.shape)
        axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        if [a % rank for a in axes] != [rank - 1]:
            raise Stop(f"axis={layer.axis} (only the last axis is followed)")
        if getattr(layer, "renorm", False):
            raise Stop("batch renormalization")
        g.follow(layer, x)
        n = len(x.slots)
        gamma = weight(layer, "gamma")
        beta = weight(layer, "beta")
        gamma = np.ones(n) if gamma is None else gamma
        beta = np.zeros(n) if beta is None else beta
        mean = weight(layer, "moving_mean")
        var = weight(layer, "moving_variance")
        inv = gamma / np.sqrt(var + layer.epsilon)
        const = (x.const - mean) * inv + beta
        const = np.where(gamma == 0, beta, const)
        return [(x.slots, const)]

    def shrink_weights(self, layer, masks):
        mask = masks.inputs[0]
        return {v.name: keras.ops.convert_to_numpy(v)[mask] for v in layer.weights}


class Mixing(Handler):
    """A known layer whose output channels depend on several input channels: a stop."""

    def __init__(self, reason):
        self.reason = reason

    def propagate(self, g, layer, inputs, node):
        raise Stop(self.reason)


# ---------------------------------------------------------------- registry

L = keras.layers
_REGISTRY = [
    ((L.Dropout, L.GaussianNoise, L.GaussianDropout, L.AlphaDropout, L.ActivityRegularization,
      L.Identity, L.Cropping1D, L.Cropping2D, L.Cropping3D, L.UpSampling1D, L.UpSampling2D,
      L.UpSampling3D, L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D, L.AveragePooling1D,
      L.AveragePooling2D, L.AveragePooling3D, L.GlobalMaxPooling1D, L.GlobalMaxPooling2D,
      L.GlobalMaxPooling3D, L.GlobalAveragePooling1D, L.GlobalAveragePooling2D,
      L.GlobalAveragePooling3D), PassThrough()),
    ((L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D), ZeroPadding()),
    ((L.Activation, L.ReLU, L.LeakyReLU, L.ELU), ElementwiseActivation()),
    ((L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum), Merge()),
    ((L.Concatenate,), Concat()),
    ((L.Flatten,), Flatten()),
    ((L.Reshape,), Reshape()),
    ((L.Dense,), DenseHandler()),
    ((L.Conv1D, L.Conv2D, L.Conv3D), ConvHandler()),
    ((L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose), ConvTransposeHandler()),
    ((L.SeparableConv1D, L.SeparableConv2D), SeparableConvHandler()),
    ((L.DepthwiseConv1D, L.DepthwiseConv2D), DepthwiseHandler()),
    ((L.BatchNormalization,), BatchNormHandler()),
    ((L.LayerNormalization, L.GroupNormalization, L.UnitNormalization),
     Mixing("normalizes across channels: removing even a zero channel changes the statistics")),
    ((L.Softmax,), Mixing("softmax mixes channels")),
    ((L.PReLU,), Mixing("per-position slopes are not followed")),
    ((L.Permute,), Mixing("moves the channel axis")),
    ((L.Masking,), Mixing("masks time steps from all channels")),
    ((L.Lambda,), Mixing("a Lambda can do anything to channels")),
]
for _name in ("AdaptiveAveragePooling1D", "AdaptiveAveragePooling2D", "AdaptiveAveragePooling3D",
              "AdaptiveMaxPooling1D", "AdaptiveMaxPooling2D", "AdaptiveMaxPooling3D"):
    if hasattr(L, _name):
        _REGISTRY[0] = (_REGISTRY[0][0] + (getattr(L, _name),), _REGISTRY[0][1])
del L, _name


def register_handler(layer_class, handler):
    """Teach the dependency graph and `shrink` a layer type.

    Later registrations win over earlier ones (and over the built-in ones).

    Args:
        layer_class: a `keras.layers.Layer` subclass (or a tuple of them).
        handler: a `Handler` instance.

    Raises:
        TypeError: `handler` is not a `Handler`.

    Example:
        >>> from tfprune.surgery.handlers import PassThrough
        >>> class Clip(keras.layers.Layer):      # element-wise: channel i -> channel i
        ...     def call(self, x):
        ...         return keras.ops.clip(x, -1.0, 1.0)
        >>> register_handler(Clip, PassThrough())
    """
    if not isinstance(handler, Handler):
        raise TypeError(f"register_handler: handler must be a tfprune.surgery.Handler, "
                        f"received {handler!r}")
    classes = layer_class if isinstance(layer_class, tuple) else (layer_class,)
    _REGISTRY.append((classes, handler))


def get_handler(layer):
    """The handler for `layer` (None when its type is unknown)."""
    for classes, handler in reversed(_REGISTRY):
        if isinstance(layer, classes):
            return handler
    return None
