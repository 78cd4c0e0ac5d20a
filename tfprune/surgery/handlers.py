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
        """Return {weight name: new numpy value} for the smaller layer.

        A list of values, one per weight in the order of `layer.weights`, is also
        accepted (for weights created without a name).
        """
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

    def reads_input(self, layer):
        """False when every input channel goes with its own units (nothing to fold)."""
        return True

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


def _depthwise_const(layer, v, k, bias):
    """Constant outputs of a per-channel convolution whose unit `j` reads input value `v[j]`.

    `k`: the kernel as `[positions, units]`, `bias`: `[units]`.
    """
    ksum = k.sum(0)
    kzero = (k == 0).all(0)
    with np.errstate(invalid="ignore"):
        if layer.padding == "valid" or all(s == 1 for s in layer.kernel_size):
            const = v * ksum + bias
        else:  # 'same' or 'causal': borders see zeros, only a zero input stays constant
            const = np.where(v == 0, bias, np.nan)
    return np.where(kzero, bias, const)


class ConvHandler(_Producer):
    """Conv1D/2D/3D, grouped ones included (kernel `[*k, in // groups, filters]`).

    With `groups == in_channels` (depthwise-like, as in ConvNeXt) the `filters //
    groups` filters of group `c` read input channel `c` only: they are coupled
    with it and go with it (like `DepthwiseConv2D`), no channel is mixed. With
    `1 < groups < in_channels`, filter `j` of every group is one unit and input
    channel `i` of every group is one channel, so every group keeps the same
    number of filters and input channels.
    """

    def check(self, layer):
        _channels_last(layer)

    def fold_reason(self, layer):
        return _conv_fold_reason(layer)

    @staticmethod
    def _groups(layer):
        return int(getattr(layer, "groups", 1) or 1)

    def depthwise_like(self, layer):
        """True for a grouped convolution with one input channel per group."""
        k = weight(layer, "kernel")
        return self._groups(layer) > 1 and k.shape[-2] == 1

    def reads_input(self, layer):
        return not self.depthwise_like(layer)

    def propagate(self, g, layer, inputs, node):
        groups = self._groups(layer)
        if groups == 1:
            return super().propagate(g, layer, inputs, node)
        self.check(layer)
        if len(inputs) != 1:
            raise Stop("more than one input")
        (x,) = inputs
        k = weight(layer, "kernel")
        n_in, filters = len(x.slots), k.shape[-1]
        per_group_in, per_group_out = n_in // groups, filters // groups
        if per_group_in * groups != n_in or per_group_in != k.shape[-2]:
            raise Stop(f"grouped convolution (groups={groups}) with {n_in} input channels "
                       f"and a kernel of shape {k.shape}")
        if per_group_in > 1:
            for i in range(1, groups):
                g.union(x.slots[:per_group_in], x.slots[i * per_group_in:(i + 1) * per_group_in])
            [(slots, const)] = super().propagate(g, layer, inputs, node)
            for i in range(1, groups):
                g.union(slots[:per_group_out], slots[i * per_group_out:(i + 1) * per_group_out])
            return [(slots, const)]
        # depthwise-like: filter j reads input channel j // per_group_out only
        bias = weight(layer, "bias")
        bias = np.zeros(filters) if bias is None else bias
        v = np.repeat(x.const, per_group_out)
        const = _depthwise_const(layer, v, k.reshape(-1, filters), bias)
        slots = g.unit_slots(layer, filters, const)
        g.union(slots, np.repeat(x.slots, per_group_out))
        if not is_elementwise(layer.activation):
            g.block(slots, f"the activation of '{layer.name}' is not element-wise")
        return [(slots, apply_elementwise(layer.activation, const))]

    def shrink_config(self, layer, config, masks):
        config = super().shrink_config(layer, config, masks)
        if self.depthwise_like(layer):
            config["groups"] = int(masks.inputs[0].sum())
        return config

    def fold_contribution(self, layer, removed, values):
        groups = self._groups(layer)
        if groups == 1:
            return super().fold_contribution(layer, removed, values)
        k = weight(layer, "kernel")
        per_group_in, filters = k.shape[-2], k.shape[-1]
        per_group_out = filters // groups
        ksum = k.reshape(-1, per_group_in, filters).sum(0)  # [in per group, filters]
        delta = np.zeros(filters)
        for c, value in zip(np.asarray(removed).tolist(), np.asarray(values).tolist()):
            grp = slice((c // per_group_in) * per_group_out,
                        (c // per_group_in + 1) * per_group_out)
            delta[grp] += value * ksum[c % per_group_in, grp]
        return delta

    def slice_kernel(self, k, in_mask, out_mask):
        n = k.shape[-2]
        if n != len(in_mask):  # grouped: the same input channels in every group
            in_mask = in_mask[:n] if n > 1 else np.ones(1, bool)
        return k[..., in_mask, :][..., out_mask]


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
        units = k.shape[-2] * m
        bias = weight(layer, "bias")
        bias = np.zeros(units) if bias is None else bias
        const = _depthwise_const(layer, np.repeat(x.const, m), k.reshape(-1, units), bias)
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


class LayerScaleHandler(Handler):
    """A per-channel scale `x * gamma` (ConvNeXt's `LayerScale`): a follower."""

    role = "follower"

    def propagate(self, g, layer, inputs, node):
        (x,) = inputs
        gamma = None
        if len(layer.weights) == 1:
            gamma = keras.ops.convert_to_numpy(layer.weights[0]).astype(np.float64)
        if gamma is None or gamma.shape != (len(x.slots),):
            raise Stop(f"expected one scale per channel ({len(x.slots)}), found weights of "
                       f"shapes {[tuple(v.shape) for v in layer.weights]}")
        g.follow(layer, x)
        with np.errstate(invalid="ignore"):
            const = np.where(gamma == 0, 0.0, x.const * gamma)
        return [(x.slots, const)]

    def shrink_config(self, layer, config, masks):
        if "projection_dim" in config:
            config["projection_dim"] = int(masks.inputs[0].sum())
        return config

    def shrink_weights(self, layer, masks):
        # by position: LayerScale's weight has no name of its own ('variable_<n>')
        return [keras.ops.convert_to_numpy(v)[masks.inputs[0]] for v in layer.weights]


class RescalingHandler(Handler):
    """`x * scale + offset`, scale and offset scalars or one value per channel."""

    @staticmethod
    def _per_channel(value, n, name):
        v = np.asarray(value, dtype=np.float64)
        if v.ndim == 0 or v.size == 1:
            return np.full(n, float(v.reshape(-1)[0]))
        if v.shape[-1] == n and v.size == n:
            return v.reshape(-1)
        raise Stop(f"{name} of shape {v.shape} is neither a scalar nor one value per channel")

    def propagate(self, g, layer, inputs, node):
        (x,) = inputs
        n = len(x.slots)
        scale = self._per_channel(layer.scale, n, "scale")
        offset = self._per_channel(layer.offset, n, "offset")
        return [(x.slots, x.const * scale + offset)]

    def shrink_config(self, layer, config, masks):
        mask = masks.inputs[0]
        for key in ("scale", "offset"):
            v = np.asarray(config[key])
            if v.size > 1:
                config[key] = v[..., mask].tolist()
        return config


class UnitNormHandler(Handler):
    """`x / ||x||` over the last axis: an all-zero channel adds nothing to the norm."""

    def propagate(self, g, layer, inputs, node):
        (x,) = inputs
        rank = len(x.shape)
        axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        if rank - 1 not in [a % rank for a in axes]:
            raise Stop(f"axis={layer.axis} does not include the channel axis (not followed)")
        return [(x.slots, np.where(x.const == 0, 0.0, np.nan))]


class RMSNormHandler(Handler):
    """RMSNormalization over the channels: `x * scale / sqrt(mean(x**2) + epsilon)`.

    An all-zero channel adds nothing to the sum of squares, only to the count:
    with `n` of `C` channels kept, `epsilon * C / n` and `scale * sqrt(C / n)`
    give the same outputs, so zero channels are removed exactly. A channel
    that is a nonzero constant (or unknown) is kept.
    """

    role = "follower"

    def propagate(self, g, layer, inputs, node):
        (x,) = inputs
        rank = len(x.shape)
        axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        if [a % rank for a in axes] != [rank - 1]:
            raise Stop(f"axis={layer.axis} (only the last axis is followed)")
        g.read(layer, x, f"'{layer.name}' (RMSNormalization) would count a nonzero constant "
                         "channel in its root mean square")
        g.follow(layer, x)
        scale = weight(layer, "scale")
        zero = x.const == 0 if scale is None else (x.const == 0) | (scale == 0)
        return [(x.slots, np.where(zero, 0.0, np.nan))]

    def shrink_config(self, layer, config, masks):
        mask = masks.inputs[0]
        config["epsilon"] = float(layer.epsilon) * len(mask) / int(mask.sum())
        return config

    def shrink_weights(self, layer, masks):
        mask = masks.inputs[0]
        factor = np.sqrt(len(mask) / int(mask.sum()))
        return {v.name: keras.ops.convert_to_numpy(v).astype(np.float64)[mask] * factor
                for v in layer.weights}


def _statistics_reason(kind):
    return (f"{kind} normalizes over the channel axis: removing a channel, even an all-zero "
            "one, changes the mean and variance of the others, so it cannot be removed exactly")


class LayerNormHandler(Handler):
    """LayerNormalization: a stop, with the reason why its channels cannot go."""

    def propagate(self, g, layer, inputs, node):
        (x,) = inputs
        rank = len(x.shape)
        axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        if rank - 1 in [a % rank for a in axes]:
            raise Stop(_statistics_reason("LayerNormalization"))
        raise Stop(f"axis={layer.axis}: normalization over other axes is not followed")


# ---------------------------------------------------------------- operations

# Element-wise operations that appear as nodes of a Functional model when a model
# is built from plain tensor operations (`x + 3.0`, `keras.ops.relu6(x)`, ...).
UNARY_OPS = (
    "relu", "relu6", "sigmoid", "hard_sigmoid", "silu", "hard_silu", "gelu", "elu", "selu",
    "celu", "leaky_relu", "softplus", "softsign", "log_sigmoid", "sparse_plus", "squareplus",
    "tanh_shrink", "soft_shrink", "hard_shrink", "hard_tanh", "tanh", "sin", "cos", "abs",
    "absolute", "negative", "square", "sqrt", "exp", "expm1", "sign", "floor", "ceil",
    "round", "erf", "clip", "cast", "copy", "stop_gradient",
)
BINARY_OPS = ("add", "subtract", "multiply", "divide", "true_divide", "maximum", "minimum",
              "power")


def _op_classes():
    """{operation class: name} for the element-wise `keras.ops` functions, found by tracing."""
    x = keras.KerasTensor((None, 4))
    found = {}
    for names, make in ((UNARY_OPS, lambda fn: fn(x)), (BINARY_OPS, lambda fn: fn(x, x))):
        for name in names:
            fn = getattr(keras.ops, name, None)
            if fn is None:
                continue
            try:
                if name == "clip":
                    y = fn(x, 0.0, 1.0)
                elif name == "cast":
                    y = fn(x, "float32")
                else:
                    y = make(fn)
                op = y._keras_history[0]
            except Exception:  # noqa: BLE001 - an op this Keras version lacks or builds otherwise
                continue
            if not isinstance(op, keras.layers.Layer):
                found.setdefault(type(op), name)
    return found


class ElementwiseOp(Handler):
    """A Keras operation node applied element by element (`x + 3.0`, `relu6(x)`, `x * y`).

    Tensor inputs must have the output's channel count (their channels are
    coupled, like `Add`); other arguments must be constants that are scalars or
    have one value per channel (sliced by `shrink`). Constants are propagated by
    running the operation on them.
    """

    def _constants(self, node):
        consts = []
        for v in keras.tree.flatten((node.arguments.args, node.arguments.kwargs)):
            if isinstance(v, keras.KerasTensor) or v is None or isinstance(v, (str, bool)):
                continue
            consts.append(v)
        return consts

    def propagate(self, g, op, inputs, node):
        if len(node.output_tensors) != 1:
            raise Stop("more than one output")
        out = node.output_tensors[0].shape
        n = out[-1]
        for x in inputs:
            if len(x.slots) != n:
                raise Stop(f"broadcasts an input of {len(x.slots)} channels to {n}")
        for v in self._constants(node):
            shape = np.shape(v)
            if len(shape) > len(out) or (shape and shape[-1] not in (1, n)):
                raise Stop(f"a constant of shape {shape} does not broadcast per channel")
        for x in inputs[1:]:
            g.union(inputs[0].slots, x.slots)
        return [(inputs[0].slots, self._const(op, inputs, node, len(out)))]

    def _const(self, op, inputs, node, rank):
        n = len(inputs[0].slots)
        known = np.ones(n, bool)
        values = {}
        for t, x in zip(node.input_tensors, inputs, strict=True):
            known &= ~np.isnan(x.const)
            values[id(t)] = np.where(np.isnan(x.const), 0.0, x.const).astype("float32").reshape(
                (1,) * (rank - 1) + (n,))
        if not known.any():
            return np.full(n, np.nan)
        try:
            args, kwargs = node.arguments.fill_in(values)
            y = np.asarray(keras.ops.convert_to_numpy(op(*args, **kwargs)), np.float64)
        except Exception:  # noqa: BLE001 - an op that cannot run on constants: not constant
            return np.full(n, np.nan)
        if y.size != n:  # a constant that varies over positions
            return np.full(n, np.nan)
        y = y.reshape(-1)
        if _OP_NAMES.get(type(op)) == "multiply":  # a zero factor makes the product zero
            zero = np.zeros(n, bool)
            for x in inputs:
                zero |= x.const == 0
            known |= zero
            y = np.where(zero, 0.0, y)
        return np.where(known & np.isfinite(y), y, np.nan)

    def shrink_arguments(self, op, args, kwargs, masks):
        """Slice the per-channel constants of the call to the kept channels."""
        mask = masks.outputs[0]
        if mask is None or mask.all():
            return args, kwargs

        def cut(v):
            if isinstance(v, keras.KerasTensor) or v is None or isinstance(v, (str, bool)):
                return v
            if np.ndim(v) and np.shape(v)[-1] == len(mask) and len(mask) > 1:
                return np.asarray(v)[..., mask]
            return v

        return keras.tree.map_structure(cut, (args, kwargs))


_OP_NAMES = _op_classes()


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
    ((L.LayerNormalization,), LayerNormHandler()),
    ((L.GroupNormalization,), Mixing(_statistics_reason("GroupNormalization"))),
    *([((L.RMSNormalization,), RMSNormHandler())] if hasattr(L, "RMSNormalization") else []),
    ((L.UnitNormalization,), UnitNormHandler()),
    ((L.Rescaling,), RescalingHandler()),
    (tuple(_OP_NAMES), ElementwiseOp()),
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
try:  # ConvNeXt's per-channel scale (a Keras-internal class)
    from keras.src.applications.convnext import LayerScale as _LayerScale

    _REGISTRY.append(((_LayerScale,), LayerScaleHandler()))
except ImportError:  # pragma: no cover - another Keras layout
    pass
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
