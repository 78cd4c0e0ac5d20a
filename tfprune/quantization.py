"""Fake quantization with straight-through gradients (quantization-aware training).

`fake_quantize` rounds a tensor to a symmetric signed integer grid with one
scale per output channel and returns the de-quantized float values, so a
model trains with the weights it will have after integer conversion. The
gradient is the identity (straight-through estimator, STE), so the latent
float weights keep learning below the grid's resolution.

The grid is the one TFLite uses for int8 weights: symmetric (zero point 0),
per output channel, ``scale = max|w| / (2**(bits-1) - 1)``. Zero stays
exactly zero, so a sparsity pattern survives quantization. 8-bit weights are
therefore reproduced exactly by ``export_tflite(..., quantize="int8")``;
4-bit weights are stored in int8 tensors with at most half a 4-bit step of
extra rounding.

Example:
    >>> from tfprune.quantization import FakeQuant
    >>> q = FakeQuant(bits=4)
    >>> w = keras.ops.convert_to_tensor([[0.1, -0.7], [0.0, 0.33]])
    >>> wq = q(w)  # per column (axis=-1): scales 0.1/7 and 0.7/7; 0.33 -> 0.3, 0 -> 0

References:
    Jacob et al., "Quantization and Training of Neural Networks for Efficient
    Integer-Arithmetic-Only Inference", CVPR 2018 (arXiv 1712.05877).
    Bengio et al., "Estimating or Propagating Gradients Through Stochastic
    Neurons", arXiv 1308.3432 (the straight-through estimator).
"""

from __future__ import annotations

import keras
from keras import ops

_PKG = "tfprune"

#: Bit widths `fake_quantize` supports.
SUPPORTED_BITS = (4, 8)


def check_bits(bits, *, owner="fake_quantize", name="bits"):
    """Returns ``bits`` if it is a supported bit width, else raises a ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(
            f"{owner}: `{name}` must be one of {list(SUPPORTED_BITS)}, got {bits!r}.")
    return int(bits)


def channel_scale(x, bits=8, axis=-1):
    """Per-channel scale ``max|x| / (2**(bits-1) - 1)`` along ``axis`` (1 for all-zero channels).

    Args:
        x: a float tensor.
        bits: 4 or 8.
        axis: the channel axis (one scale per index along it).

    Returns:
        A tensor broadcastable to ``x`` (size 1 on every axis but ``axis``).
    """
    bits = check_bits(bits)
    qmax = float(2 ** (bits - 1) - 1)
    axis = axis % len(x.shape)
    reduce_axes = tuple(a for a in range(len(x.shape)) if a != axis)
    amax = ops.max(ops.abs(x), axis=reduce_axes, keepdims=True)
    return ops.where(amax > 0, amax / qmax, ops.ones_like(amax))


def fake_quantize(x, bits=8, axis=-1):
    """Symmetric per-channel fake quantization with a straight-through gradient.

    Forward: ``clip(round(x / s), -q, q) * s`` with ``q = 2**(bits-1) - 1``
    and ``s`` = `channel_scale` (the scale is treated as a constant for the
    gradient). Backward: identity.

    Args:
        x: a float tensor (a kernel, in any layout).
        bits: 4 or 8.
        axis: the output-channel axis (one scale per channel).

    A float16 or bfloat16 ``x`` (mixed precision) is quantized in float32
    (scale, division and rounding) and the result cast back to its dtype, so
    it lands on the grid of the float32 weights.

    Returns:
        A tensor of ``x``'s shape and dtype holding at most ``2q + 1``
        distinct values per channel; zeros stay exactly zero.

    Raises:
        ValueError: ``bits`` not in {4, 8}.

    Example:
        >>> w = keras.ops.convert_to_tensor([[0.1, -0.7], [0.0, 0.33]])
        >>> keras.ops.convert_to_numpy(fake_quantize(w, bits=4)).round(3)
        array([[ 0.1, -0.7],
               [ 0. ,  0.3]], dtype=float32)
    """
    bits = check_bits(bits)
    qmax = float(2 ** (bits - 1) - 1)
    x = ops.convert_to_tensor(x)
    dtype = keras.backend.standardize_dtype(x.dtype)
    low = dtype in ("float16", "bfloat16")  # mixed precision: the grid is computed in float32
    x32 = ops.cast(x, "float32") if low else x
    scale = ops.stop_gradient(channel_scale(x32, bits, axis))
    q = ops.clip(ops.round(x32 / scale), -qmax, qmax) * scale
    out = x32 + ops.stop_gradient(q - x32)
    return ops.cast(out, dtype) if low else out


@keras.saving.register_keras_serializable(package=_PKG)
class FakeQuant:
    """A serializable fake quantizer: ``FakeQuant(bits, axis)(x)`` = `fake_quantize`.

    Args:
        bits: 4 or 8.
        axis: the output-channel axis (default -1, Keras' kernel layout).

    Raises:
        ValueError: ``bits`` not in {4, 8}.

    Example:
        >>> q = FakeQuant(bits=8)
        >>> wq = q(layer.kernel)                     # per output channel (last axis)
        >>> FakeQuant.from_config(q.get_config()) == q
        True
    """

    def __init__(self, bits=8, axis=-1):
        self.bits = check_bits(bits, owner="FakeQuant")
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"FakeQuant: `axis` must be an int, got {axis!r}.")
        self.axis = axis

    def __call__(self, x):
        return fake_quantize(x, self.bits, self.axis)

    def get_config(self):
        return {"bits": self.bits, "axis": self.axis}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((self.bits, self.axis))

    def __repr__(self):
        return f"FakeQuant(bits={self.bits}, axis={self.axis})"


def get(identifier):
    """Resolves None, a bit width (``8``), a config dict or a `FakeQuant` instance.

    Returns:
        A `FakeQuant` or None.

    Raises:
        ValueError: an unsupported bit width; TypeError: anything else.
    """
    if identifier is None or isinstance(identifier, FakeQuant):
        return identifier
    if isinstance(identifier, int) and not isinstance(identifier, bool):
        return FakeQuant(identifier)
    if isinstance(identifier, dict):
        obj = keras.saving.deserialize_keras_object(identifier)
        if isinstance(obj, FakeQuant):
            return obj
    raise TypeError(
        f"Could not interpret quantizer {identifier!r}; give None, 4, 8 or a FakeQuant.")
