"""Handlers of the prunable layers: Dense, convolutions, depthwise and separable ones.

Each reads its kernels' layout from its `KernelSpec`s only: the canonical
``[S, I, O]`` view the pruning side uses, the ``[units, fan_in]`` rows the
graph scores (`out_slices`), the bias folding and the slicing of `shrink`
all go through `tfprune.handlers.layout`.
"""

from __future__ import annotations

import numpy as np

from tfprune.handlers.base import (
    LayerHandler,
    Stop,
    apply_elementwise,
    channels_last,
    is_elementwise,
    weight,
)
from tfprune.handlers.layout import (
    DEPTHWISE,
    STANDARD,
    TRANSPOSED,
    KernelSpec,
    canonical_numpy,
    slice_kernel,
)


def _activation(layer):
    return getattr(layer, "activation", None)


def _block_non_elementwise(g, layer, slots):
    if not is_elementwise(_activation(layer)):
        g.block(slots, f"the activation of '{layer.name}' is not element-wise")


class ProducerHandler(LayerHandler):
    """A layer whose unit kernel creates new units from all its input channels.

    The units are the output axis of `unit_spec()`; its input channels are
    the kernel's input axis. Subclasses say when a constant input channel
    cannot be folded into the bias (`fold_reason`) and which layers they
    refuse to follow (`check`).
    """

    role = "producer"
    kernels = (KernelSpec("kernel"),)

    def fold_reason(self, layer):
        """None if a constant input channel can be folded into the bias exactly."""
        return None

    def reads_input(self, layer):
        """False when every input channel goes with its own units (nothing to fold)."""
        return True

    def check(self, layer):
        """Raise `Stop` for a configuration the graph cannot follow."""

    def unit_kernel(self, layer):
        """The numpy value of the unit kernel (float64)."""
        return weight(layer, self.unit_spec().name)

    def canonical(self, layer):
        """The unit kernel as a numpy ``[S, I, O]`` array."""
        return canonical_numpy(self.unit_kernel(layer), self.unit_spec().layout)

    def out_slices(self, layer):
        """``[units, fan_in]`` view of the kernel (one row per output unit)."""
        c = self.canonical(layer)
        return np.transpose(c, (2, 0, 1)).reshape(c.shape[2], -1)

    def propagate(self, g, layer, inputs, node):
        self.check(layer)
        if len(inputs) != 1:
            raise Stop("more than one input")
        (x,) = inputs
        g.read(layer, x, self.fold_reason(layer))
        rows = self.out_slices(layer)
        bias = self.bias_value(layer)
        if bias is None:
            bias = np.zeros(rows.shape[0])
        const = np.where((rows == 0).all(1), bias, np.nan)
        slots = g.unit_slots(layer, rows.shape[0], const)
        _block_non_elementwise(g, layer, slots)
        return [(slots, apply_elementwise(_activation(layer), const))]

    def bias_value(self, layer):
        """The numpy value of the bias (None without one)."""
        return weight(layer, self.bias) if self.bias else None

    def shrink_config(self, layer, config, masks):
        key = "units" if "units" in config else "filters"
        config[key] = int(masks.outputs[0].sum())
        if masks.fold is not None and not config.get("use_bias", True):
            config["use_bias"] = True
        return config

    def fold_contribution(self, layer, removed, values):
        """Bias change from input channels `removed` held at constant `values`."""
        return values @ self.canonical(layer).sum(0)[removed]  # [in, out] summed over taps

    def slice_unit_kernel(self, layer, in_mask, out_mask):
        """The unit kernel with the kept input channels and units only."""
        return slice_kernel(self.unit_kernel(layer), self.unit_spec().layout, in_mask, out_mask)

    def shrink_weights(self, layer, masks):
        in_mask, out_mask = masks.inputs[0], masks.outputs[0]
        out = {self.unit_spec().name: self.slice_unit_kernel(layer, in_mask, out_mask)}
        bias = self.bias_value(layer)
        if masks.fold is not None:
            removed, values = masks.fold
            delta = self.fold_contribution(layer, removed, values)
            bias = delta if bias is None else bias + delta
        if bias is not None:
            out[self.bias] = bias[out_mask]
        return out


class DenseHandler(ProducerHandler):
    """Dense: kernel ``[in, units]``."""

    def check(self, layer):
        if getattr(layer, "lora_enabled", False):
            raise Stop("LoRA-enabled Dense")
        if getattr(layer, "quantization_mode", None):
            raise Stop("quantized Dense")


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


class ConvHandler(ProducerHandler):
    """Conv1D/2D/3D, grouped ones included (kernel `[*k, in // groups, filters]`).

    With `groups == in_channels` (depthwise-like, as in ConvNeXt) the `filters //
    groups` filters of group `c` read input channel `c` only: they are coupled
    with it and go with it (like `DepthwiseConv2D`), no channel is mixed. With
    `1 < groups < in_channels`, filter `j` of every group is one unit and input
    channel `i` of every group is one channel, so every group keeps the same
    number of filters and input channels.
    """

    def check(self, layer):
        channels_last(layer)

    def fold_reason(self, layer):
        return _conv_fold_reason(layer)

    @staticmethod
    def _groups(layer):
        return int(getattr(layer, "groups", 1) or 1)

    def depthwise_like(self, layer):
        """True for a grouped convolution with one input channel per group."""
        return self._groups(layer) > 1 and self.canonical(layer).shape[1] == 1

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
        k = self.canonical(layer)  # [S, in per group, filters]
        n_in, filters = len(x.slots), k.shape[2]
        per_group_in, per_group_out = n_in // groups, filters // groups
        if per_group_in * groups != n_in or per_group_in != k.shape[1]:
            raise Stop(f"grouped convolution (groups={groups}) with {n_in} input channels "
                       f"and a kernel of shape {self.unit_kernel(layer).shape}")
        if per_group_in > 1:
            for i in range(1, groups):
                g.union(x.slots[:per_group_in], x.slots[i * per_group_in:(i + 1) * per_group_in])
            [(slots, const)] = super().propagate(g, layer, inputs, node)
            for i in range(1, groups):
                g.union(slots[:per_group_out], slots[i * per_group_out:(i + 1) * per_group_out])
            return [(slots, const)]
        # depthwise-like: filter j reads input channel j // per_group_out only
        bias = self.bias_value(layer)
        bias = np.zeros(filters) if bias is None else bias
        v = np.repeat(x.const, per_group_out)
        const = _depthwise_const(layer, v, k.reshape(-1, filters), bias)
        slots = g.unit_slots(layer, filters, const)
        g.union(slots, np.repeat(x.slots, per_group_out))
        _block_non_elementwise(g, layer, slots)
        return [(slots, apply_elementwise(_activation(layer), const))]

    def shrink_config(self, layer, config, masks):
        config = super().shrink_config(layer, config, masks)
        if self.depthwise_like(layer):
            config["groups"] = int(masks.inputs[0].sum())
        return config

    def fold_contribution(self, layer, removed, values):
        groups = self._groups(layer)
        if groups == 1:
            return super().fold_contribution(layer, removed, values)
        ksum = self.canonical(layer).sum(0)  # [in per group, filters]
        per_group_in, filters = ksum.shape
        per_group_out = filters // groups
        delta = np.zeros(filters)
        for c, value in zip(np.asarray(removed).tolist(), np.asarray(values).tolist()):
            grp = slice((c // per_group_in) * per_group_out,
                        (c // per_group_in + 1) * per_group_out)
            delta[grp] += value * ksum[c % per_group_in, grp]
        return delta

    def slice_unit_kernel(self, layer, in_mask, out_mask):
        n = self.canonical(layer).shape[1]
        if n != len(in_mask):  # grouped: the same input channels in every group
            in_mask = in_mask[:n] if n > 1 else np.ones(1, bool)
        return super().slice_unit_kernel(layer, in_mask, out_mask)


class ConvTransposeHandler(ProducerHandler):
    """Conv1D/2D/3DTranspose: kernel ``[*k, filters, in_channels]``."""

    kernels = (KernelSpec("kernel", TRANSPOSED),)

    def check(self, layer):
        channels_last(layer)

    def fold_reason(self, layer):
        return f"'{layer.name}' is a transposed convolution"


class SeparableConvHandler(ProducerHandler):
    """SeparableConv1D/2D: depthwise ``[*k, in, m]`` then pointwise ``[1.., in*m, filters]``."""

    kernels = (
        KernelSpec("depthwise_kernel", DEPTHWISE, produces_units=False),
        KernelSpec("pointwise_kernel", STANDARD, produces_units=True),
    )

    def check(self, layer):
        channels_last(layer)

    def fold_reason(self, layer):
        return _conv_fold_reason(layer)

    def _depthwise_spec(self):
        return next(s for s in self.kernels if s.layout == DEPTHWISE)

    def _per_channel(self, layer):
        """``[in, m, out]``: the pointwise rows of each input channel, with the depthwise sum."""
        spec = self._depthwise_spec()
        dk = weight(layer, spec.name)
        n_in, m = dk.shape[-2], dk.shape[-1]
        dsum = canonical_numpy(dk, DEPTHWISE).sum(0)[0]  # [in * m]
        pk = self.canonical(layer).sum(0)  # [in * m, out]
        return (dsum[:, None] * pk).reshape(n_in, m, -1)

    def fold_contribution(self, layer, removed, values):
        return values @ self._per_channel(layer).sum(1)[removed]

    def shrink_weights(self, layer, masks):
        in_mask = masks.inputs[0]
        spec = self._depthwise_spec()
        out = super().shrink_weights(layer, masks)  # pointwise kernel (and bias)
        out[spec.name] = slice_kernel(weight(layer, spec.name), DEPTHWISE, in_mask)
        return out

    def slice_unit_kernel(self, layer, in_mask, out_mask):
        m = weight(layer, self._depthwise_spec().name).shape[-1]
        return super().slice_unit_kernel(layer, np.repeat(in_mask, m), out_mask)


class DepthwiseHandler(LayerHandler):
    """DepthwiseConv1D/2D: each input channel c gives outputs c*m .. c*m+m-1 (they go with c).

    Prunable (kernel ``[*k, channels, multiplier]``); for the graph a follower of
    its input channels.
    """

    role = "follower"
    kernels = (KernelSpec("kernel", DEPTHWISE),)

    def propagate(self, g, layer, inputs, node):
        channels_last(layer)
        (x,) = inputs
        g.follow(layer, x)
        spec = self.unit_spec()
        k = weight(layer, spec.name)  # [*k, in, m]
        m = k.shape[-1]
        k = canonical_numpy(k, spec.layout)[:, 0]  # [positions, in * m]
        units = k.shape[1]
        bias = weight(layer, self.bias) if self.bias else None
        bias = np.zeros(units) if bias is None else bias
        const = _depthwise_const(layer, np.repeat(x.const, m), k, bias)
        slots = np.repeat(x.slots, m)
        _block_non_elementwise(g, layer, slots)
        return [(slots, apply_elementwise(_activation(layer), const))]

    def shrink_weights(self, layer, masks):
        in_mask, out_mask = masks.inputs[0], masks.outputs[0]
        spec = self.unit_spec()
        out = {spec.name: slice_kernel(weight(layer, spec.name), spec.layout, in_mask)}
        bias = weight(layer, self.bias) if self.bias else None
        if bias is not None:
            out[self.bias] = bias[out_mask]
        return out
