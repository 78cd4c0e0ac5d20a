"""`Follow`: masks the channels of a per-channel layer whenever their producer unit is pruned."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from tfprune.methods.base import Method, read_value

_PKG = "tfprune"
_FOLLOWERS = (keras.layers.BatchNormalization, keras.layers.DepthwiseConv1D,
              keras.layers.DepthwiseConv2D)


@keras.saving.register_keras_serializable(package=_PKG)
class Follow(Method):
    """Masks the channels of a per-channel layer that follows unit-pruned producers.

    `tfprune.prune` adds it by itself (see `tfprune.plan`): a
    BatchNormalization or a DepthwiseConv1D/2D whose input channels belong to
    a coupled group of the dependency graph whose producers remove units
    (a `Filter` structure) is wrapped in
    ``PruneWrapper(layer, Follow(source=<first producer name>))``. The
    `tfprune.callbacks.Pruning` callback copies the producers' unit masks into
    its per-channel mask whenever they change (also through a `Concatenate`
    of several producers, and for a depthwise layer that would otherwise
    choose its channels on its own), so a pruned channel stays exactly zero
    after it, in training and inference, and `tfprune.shrink` removes it. You
    never need to create it by hand.

    Masked weights: BatchNormalization's ``gamma`` and ``beta``; a depthwise
    layer's kernel slices of the channel (all ``depth_multiplier`` outputs)
    and their bias.

    Args:
        source: name of the (first) producing wrapped layer, for display.

    Example:
        >>> pruned = tfprune.prune(model, methods.Magnitude(0.5, structure=structures.Filter()))
        >>> bn = pruned.get_layer("batch_normalization")   # follows a pruned conv
        >>> bn.method
        Follow(source='conv2d', structure=Unstructured())
    """

    def __init__(self, source, structure=None):
        super().__init__(None)
        if not isinstance(source, str) or not source:
            raise ValueError(f"Follow: `source` must be a layer name, got {source!r}.")
        self.source = source

    def get_config(self):
        return {"source": self.source}

    def validate(self, wrapper):
        if not isinstance(wrapper.layer, _FOLLOWERS):
            raise ValueError(
                f"Follow: layer '{wrapper.layer.name}' is a {type(wrapper.layer).__name__}; "
                "only BatchNormalization, DepthwiseConv1D and DepthwiseConv2D can follow a "
                "pruned producer.")

    def build(self, wrapper):
        layer = wrapper.layer
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = int(layer.gamma.shape[0]) if layer.scale else int(
                layer.moving_mean.shape[0])
        else:  # depthwise: kernel [*taps, channels, depth_multiplier]
            channels = int(layer.kernel.shape[-2])
        self.add_state(wrapper, "channel_mask", (channels,), initializer="ones")

    def _per_variable(self, wrapper, mask, xp):
        """``{variable name: mask broadcastable to it}`` for the followed layer."""
        layer = wrapper.layer
        if isinstance(layer, keras.layers.BatchNormalization):
            return {name: mask for name, on in (("gamma", layer.scale), ("beta", layer.center))
                    if on}
        out = {"kernel": xp.reshape(mask, (-1, 1))}  # broadcasts over taps and multiplier
        if layer.use_bias:  # output channel c * multiplier + j reads input channel c
            out["bias"] = xp.repeat(mask, int(layer.kernel.shape[-1]))
        return out

    def effective_variables(self, wrapper, training):
        out = {}
        # In the variable dtype, also under mixed precision.
        mask = read_value(wrapper.state["channel_mask"])
        for name, m in self._per_variable(wrapper, mask, ops).items():
            value = read_value(getattr(wrapper.layer, name))
            out[name] = value * ops.cast(m, value.dtype)
        return out

    def set_mask(self, wrapper, unit_mask):
        """Sets the per-channel mask of ``wrapper`` (from its producers' unit masks)."""
        mask = wrapper.state["channel_mask"]
        mask.assign(ops.cast(ops.reshape(unit_mask, (-1,)), mask.dtype))

    def final_masks(self, wrapper):
        mask = np.asarray(ops.convert_to_numpy(wrapper.state["channel_mask"]))
        out = {}
        for name, m in self._per_variable(wrapper, mask, np).items():
            shape = tuple(getattr(wrapper.layer, name).shape)
            out[name] = np.broadcast_to(m, shape).astype(mask.dtype)
        return out

    def unit_mask(self, wrapper):
        """The per-channel mask of the followed layer's input channels (numpy)."""
        return np.asarray(ops.convert_to_numpy(wrapper.state["channel_mask"]))

    requires_callback = False
