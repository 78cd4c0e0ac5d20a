"""`Follow`: masks a BatchNormalization channel whenever its producer unit is pruned."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from tfprune.methods.base import Method, read_value

_PKG = "tfprune"


@keras.saving.register_keras_serializable(package=_PKG)
class Follow(Method):
    """Masks the scale and offset of a BatchNormalization after a `Filter`-pruned layer.

    `tfprune.prune` adds it by itself: a BatchNormalization whose only input
    is a layer pruned with a structure that removes units is wrapped in
    ``PruneWrapper(bn, Follow(source=<producer name>))``. Its per-channel mask
    is copied from the producer whenever the producer's mask changes, so a
    pruned unit's normalized output is exactly zero, in training and
    inference. You never need to create it by hand.

    Args:
        source: name of the producing (wrapped) layer.

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
        if not isinstance(wrapper.layer, keras.layers.BatchNormalization):
            raise ValueError(
                f"Follow: layer '{wrapper.layer.name}' is a {type(wrapper.layer).__name__}; "
                "only BatchNormalization can follow a pruned producer.")

    def build(self, wrapper):
        channels = int(wrapper.layer.gamma.shape[0]) if wrapper.layer.scale else int(
            wrapper.layer.moving_mean.shape[0])
        self._mask = self.add_state(wrapper, "channel_mask", (channels,), initializer="ones")

    def effective_variables(self, wrapper, training):
        out = {}
        bn = wrapper.layer
        mask = read_value(self._mask)  # in the variable dtype, also under mixed precision
        for name, on in (("gamma", bn.scale), ("beta", bn.center)):
            if on:
                value = read_value(getattr(bn, name))
                out[name] = value * ops.cast(mask, value.dtype)
        return out

    def set_mask(self, unit_mask):
        self._mask.assign(ops.cast(ops.reshape(unit_mask, (-1,)), self._mask.dtype))

    def final_masks(self, wrapper):
        mask = np.asarray(ops.convert_to_numpy(self._mask))
        bn = wrapper.layer
        return {name: mask for name, on in (("gamma", bn.scale), ("beta", bn.center)) if on}

    def unit_mask(self, wrapper):
        return np.asarray(ops.convert_to_numpy(self._mask))

    requires_callback = False
