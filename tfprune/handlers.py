"""How each supported layer type exposes its kernels to the pruning machinery.

Every prunable kernel is viewed in a *canonical* 3-D layout ``[S, I, O]``:
``S`` spatial taps (1 for Dense), ``I`` input channels feeding one output and
``O`` output channels. Structures (`tfprune.structures`) work only on that
layout, so a new layer type needs one handler and nothing else.

Handlers are chosen with ``isinstance`` (most specific class first) and can be
added with `register_handler`.
"""

from __future__ import annotations

import dataclasses
import math

import keras
from keras import ops

STANDARD = "standard"  # [*spatial, in, out]
TRANSPOSED = "transposed"  # [*spatial, out, in] (ConvXDTranspose)
DEPTHWISE = "depthwise"  # [*spatial, channels, multiplier]


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One prunable kernel of a layer.

    Attributes:
        name: attribute name of the variable on the layer (``"kernel"``).
        layout: one of ``"standard"``, ``"transposed"``, ``"depthwise"``.
        produces_units: True for the kernel whose output axis is the layer's
            units (the one `Filter` pruning acts on, together with the bias).
    """

    name: str
    layout: str = STANDARD
    produces_units: bool = True


def canonical_shape(shape, layout):
    """Returns ``(S, I, O)`` for a kernel of ``shape`` in ``layout``."""
    shape = tuple(int(d) for d in shape)
    s = math.prod(shape[:-2]) if len(shape) > 2 else 1
    if layout == STANDARD:
        return s, shape[-2], shape[-1]
    if layout == TRANSPOSED:
        return s, shape[-1], shape[-2]
    if layout == DEPTHWISE:
        return s, 1, shape[-2] * shape[-1]
    raise ValueError(f"Unknown kernel layout {layout!r}.")


def to_canonical(kernel, layout):
    """Reshapes (and transposes) a kernel tensor to ``[S, I, O]``."""
    shape = tuple(kernel.shape)
    if layout == TRANSPOSED:
        perm = list(range(len(shape) - 2)) + [len(shape) - 1, len(shape) - 2]
        kernel = ops.transpose(kernel, perm)
    return ops.reshape(kernel, canonical_shape(shape, layout))


def from_canonical(canon, shape, layout):
    """Inverse of `to_canonical` for a kernel of ``shape``."""
    shape = tuple(int(d) for d in shape)
    if layout == TRANSPOSED:
        permuted = shape[:-2] + (shape[-1], shape[-2])
        out = ops.reshape(canon, permuted)
        perm = list(range(len(shape) - 2)) + [len(shape) - 1, len(shape) - 2]
        return ops.transpose(out, perm)
    return ops.reshape(canon, shape)


@dataclasses.dataclass(frozen=True)
class LayerHandler:
    """Describes a supported layer type.

    Attributes:
        kernels: the prunable kernels (`KernelSpec`).
        bias: attribute name of the bias, or None.
    """

    kernels: tuple
    bias: str | None = "bias"

    def unit_spec(self):
        """The `KernelSpec` whose output axis is the layer's units."""
        return next(k for k in self.kernels if k.produces_units)

    def num_units(self, layer):
        """Number of output units of ``layer``."""
        spec = self.unit_spec()
        return canonical_shape(getattr(layer, spec.name).shape, spec.layout)[2]


_DENSE = LayerHandler(kernels=(KernelSpec("kernel"),))
_CONV = LayerHandler(kernels=(KernelSpec("kernel"),))
_CONV_T = LayerHandler(kernels=(KernelSpec("kernel", TRANSPOSED),))
_DEPTHWISE = LayerHandler(kernels=(KernelSpec("kernel", DEPTHWISE),))
_SEPARABLE = LayerHandler(
    kernels=(
        KernelSpec("depthwise_kernel", DEPTHWISE, produces_units=False),
        KernelSpec("pointwise_kernel", STANDARD, produces_units=True),
    )
)

_HANDLERS: list[tuple[type, LayerHandler]] = []


def register_handler(layer_class, handler):
    """Registers (or replaces) the handler of ``layer_class``.

    Args:
        layer_class: a `keras.layers.Layer` subclass.
        handler: a `LayerHandler` describing its kernels.

    Example:
        >>> from tfprune.handlers import register_handler, LayerHandler, KernelSpec
        >>> class MyDense(keras.layers.Dense):
        ...     pass
        >>> register_handler(MyDense, LayerHandler(kernels=(KernelSpec("kernel"),)))
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise TypeError(
            f"register_handler: `layer_class` must be a Layer subclass, got {layer_class!r}.")
    if not isinstance(handler, LayerHandler):
        raise TypeError(f"register_handler: `handler` must be a LayerHandler, got {handler!r}.")
    _HANDLERS[:] = [(c, h) for c, h in _HANDLERS if c is not layer_class]
    _HANDLERS.insert(0, (layer_class, handler))
    # Most specific classes first so that subclasses win over their bases.
    _HANDLERS.sort(key=lambda ch: -len(ch[0].__mro__))


for _cls, _h in [
    (keras.layers.Dense, _DENSE),
    (keras.layers.Conv1D, _CONV),
    (keras.layers.Conv2D, _CONV),
    (keras.layers.Conv3D, _CONV),
    (keras.layers.Conv1DTranspose, _CONV_T),
    (keras.layers.Conv2DTranspose, _CONV_T),
    (keras.layers.Conv3DTranspose, _CONV_T),
    (keras.layers.DepthwiseConv1D, _DEPTHWISE),
    (keras.layers.DepthwiseConv2D, _DEPTHWISE),
    (keras.layers.SeparableConv1D, _SEPARABLE),
    (keras.layers.SeparableConv2D, _SEPARABLE),
]:
    register_handler(_cls, _h)


def get_handler(layer):
    """Returns the `LayerHandler` of ``layer`` or None if the type is not supported."""
    for cls, handler in _HANDLERS:
        if isinstance(layer, cls):
            return handler
    return None


def supported_layer_types():
    """Names of the supported layer classes (for error messages)."""
    return sorted({cls.__name__ for cls, _ in _HANDLERS})
