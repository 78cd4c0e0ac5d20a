"""Handlers of the channel-only layers the dependency graph follows.

None of these layers is pruned itself: pooling, activations, merges
(Add, Multiply...), Concatenate, Flatten, Reshape, padding and cropping,
normalizations with per-channel weights (BatchNormalization, LayerScale,
RMSNormalization: *followers*, sliced with their input channels), Rescaling,
and the layers that mix channels (`Mixing`: the graph stops there, with the
reason).
"""

from __future__ import annotations

import math

import keras
import numpy as np

from tfprune.handlers.base import (
    LayerHandler,
    Stop,
    apply_elementwise,
    channels_last,
    is_elementwise,
    last_axis_only,
    same_last,
    weight,
)


class ChannelHandler(LayerHandler):
    """A layer with no prunable kernel (no `kernels`, no bias)."""

    bias = None

    def __init__(self):
        super().__init__(bias=None)



class PassThrough(ChannelHandler):
    """Identity on channels and on constants (Dropout at inference, Cropping...)."""

    def propagate(self, g, layer, inputs, node):
        channels_last(layer)
        (x,) = inputs
        return [(x.slots, x.const)]


class ZeroPadding(PassThrough):
    """Zero borders: a zero channel stays zero, another constant does not stay constant."""

    def propagate(self, g, layer, inputs, node):
        channels_last(layer)
        (x,) = inputs
        const = np.where(x.const == 0, 0.0, np.nan)
        return [(x.slots, const)]


class ElementwiseActivation(ChannelHandler):
    def propagate(self, g, layer, inputs, node):
        (x,) = inputs
        if isinstance(layer, keras.layers.Activation) and not is_elementwise(layer.activation):
            raise Stop(f"activation {getattr(layer.activation, '__name__', layer.activation)!r}"
                       " is not element-wise")
        return [(x.slots, apply_elementwise(layer, x.const))]


class Merge(ChannelHandler):
    """Add, Subtract, Multiply, Average, Maximum, Minimum: channel c of every input is one."""

    def propagate(self, g, layer, inputs, node):
        same_last(inputs)
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


class Concat(ChannelHandler):
    def propagate(self, g, layer, inputs, node):
        rank = len(node.output_tensors[0].shape)
        if layer.axis % rank == rank - 1:
            return [(np.concatenate([x.slots for x in inputs]),
                     np.concatenate([x.const for x in inputs]))]
        # concatenation along another axis: channel c of every input is one channel
        same_last(inputs)
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


class Flatten(ChannelHandler):
    def propagate(self, g, layer, inputs, node):
        channels_last(layer)
        (x,) = inputs
        s = _spatial_size(x.shape, "flatten")
        return [(np.tile(x.slots, s), np.tile(x.const, s))]


class Reshape(ChannelHandler):
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


class BatchNormHandler(ChannelHandler):
    """BatchNormalization over the last axis: a follower (its weights go with the channels)."""

    role = "follower"

    def propagate(self, g, layer, inputs, node):
        (x,) = inputs
        last_axis_only(layer, len(x.shape))
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


class LayerScaleHandler(ChannelHandler):
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


class RescalingHandler(ChannelHandler):
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


class UnitNormHandler(ChannelHandler):
    """`x / ||x||` over the last axis: an all-zero channel adds nothing to the norm."""

    def propagate(self, g, layer, inputs, node):
        (x,) = inputs
        rank = len(x.shape)
        axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        if rank - 1 not in [a % rank for a in axes]:
            raise Stop(f"axis={layer.axis} does not include the channel axis (not followed)")
        return [(x.slots, np.where(x.const == 0, 0.0, np.nan))]


class RMSNormHandler(ChannelHandler):
    """RMSNormalization over the channels: `x * scale / sqrt(mean(x**2) + epsilon)`.

    An all-zero channel adds nothing to the sum of squares, only to the count:
    with `n` of `C` channels kept, `epsilon * C / n` and `scale * sqrt(C / n)`
    give the same outputs, so zero channels are removed exactly. A channel
    that is a nonzero constant (or unknown) is kept.
    """

    role = "follower"

    def propagate(self, g, layer, inputs, node):
        (x,) = inputs
        last_axis_only(layer, len(x.shape))
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


def statistics_reason(kind):
    """Why a normalization over the channel axis stops the graph."""
    return (f"{kind} normalizes over the channel axis: removing a channel, even an all-zero "
            "one, changes the mean and variance of the others, so it cannot be removed exactly")


class LayerNormHandler(ChannelHandler):
    """LayerNormalization: a stop, with the reason why its channels cannot go."""

    def propagate(self, g, layer, inputs, node):
        (x,) = inputs
        rank = len(x.shape)
        axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        if rank - 1 in [a % rank for a in axes]:
            raise Stop(statistics_reason("LayerNormalization"))
        raise Stop(f"axis={layer.axis}: normalization over other axes is not followed")


class Mixing(ChannelHandler):
    """A known layer whose output channels depend on several input channels: a stop."""

    def __init__(self, reason):
        super().__init__()
        self.reason = reason

    def propagate(self, g, layer, inputs, node):
        raise Stop(self.reason)
