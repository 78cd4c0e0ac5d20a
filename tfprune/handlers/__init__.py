"""One registry of layer handlers: what tfprune knows about each layer type.

A handler (`LayerHandler`) describes one layer type once, for both halves of
tfprune:

- **pruning** (`PruneWrapper`, structures, methods, `sparsity_report`): the
  prunable kernels (`KernelSpec`: name and layout), which of them produces
  the layer's units, and the bias. Every prunable kernel is viewed in a
  *canonical* 3-D layout ``[S, I, O]``: ``S`` spatial taps (1 for Dense),
  ``I`` input channels feeding one output and ``O`` output channels
  (`to_canonical`, `from_canonical`); structures work only on that view.
- **surgery** (`tfprune.surgery.DependencyGraph`, `tfprune.shrink`): how
  channels flow through the layer (`propagate`) and how to slice its config
  and weights once some channels are gone. The prunable layers read their
  kernel layout from the same `KernelSpec`s.

Built in: Dense, Conv1D/2D/3D (grouped ones too), Conv1D/2D/3DTranspose,
DepthwiseConv1D/2D, SeparableConv1D/2D (prunable), and the channel-only
layers the graph follows (pooling, activations, Add/Multiply/..., Concatenate,
Flatten, Reshape, padding and cropping, BatchNormalization, LayerScale,
Rescaling, Unit/RMS normalization, element-wise operation nodes) or stops at
with a reason (LayerNormalization, Softmax, Permute, Lambda...).

Handlers are chosen with ``isinstance`` (most specific class first) and can be
added with `register_handler`.
"""

from __future__ import annotations

import keras

from tfprune.handlers.base import (
    ELEMENTWISE_ACTIVATIONS,
    LayerHandler,
    Stop,
    apply_elementwise,
    is_elementwise,
    weight,
)
from tfprune.handlers.channels import (
    BatchNormHandler,
    ChannelHandler,
    Concat,
    ElementwiseActivation,
    Flatten,
    LayerNormHandler,
    LayerScaleHandler,
    Merge,
    Mixing,
    PassThrough,
    RescalingHandler,
    Reshape,
    RMSNormHandler,
    UnitNormHandler,
    ZeroPadding,
    statistics_reason,
)
from tfprune.handlers.kernels import (
    ConvHandler,
    ConvTransposeHandler,
    DenseHandler,
    DepthwiseHandler,
    ProducerHandler,
    SeparableConvHandler,
)
from tfprune.handlers.layout import (
    DEPTHWISE,
    STANDARD,
    TRANSPOSED,
    KernelSpec,
    canonical_numpy,
    canonical_shape,
    from_canonical,
    kernel_axes,
    slice_kernel,
    to_canonical,
)
from tfprune.handlers.operations import OP_NAMES, ElementwiseOp

__all__ = [
    "DEPTHWISE", "STANDARD", "TRANSPOSED", "ELEMENTWISE_ACTIVATIONS",
    "KernelSpec", "LayerHandler", "Stop",
    "ProducerHandler", "DenseHandler", "ConvHandler", "ConvTransposeHandler",
    "SeparableConvHandler", "DepthwiseHandler",
    "ChannelHandler", "PassThrough", "ZeroPadding", "ElementwiseActivation", "Merge", "Concat",
    "Flatten", "Reshape", "BatchNormHandler", "LayerScaleHandler", "RescalingHandler",
    "UnitNormHandler", "RMSNormHandler", "LayerNormHandler", "Mixing", "ElementwiseOp",
    "register_handler", "get_handler", "handler_of", "supported_layer_types",
    "canonical_shape", "to_canonical", "from_canonical", "canonical_numpy", "kernel_axes",
    "slice_kernel", "apply_elementwise", "is_elementwise", "weight", "statistics_reason",
]

# (class, handler), most specific classes first (see `register_handler`).
_HANDLERS: list[tuple[type, LayerHandler]] = []


def register_handler(layer_class, handler):
    """Registers (or replaces) the handler of ``layer_class``, for pruning and surgery at once.

    A handler that subclasses one of the built-in ones gets both sides from
    one description of the kernels: `DenseHandler` for any layer computing
    ``x @ kernel + bias`` (kernel ``[in, units]``), `ConvHandler`,
    `ConvTransposeHandler`, `SeparableConvHandler`, `DepthwiseHandler` for
    convolution-like layers; pass ``kernels=`` and ``bias=`` when the
    variables have other names. A channel-only layer (nothing to prune)
    subclasses `ChannelHandler` (or reuses e.g. `PassThrough()` for an
    element-wise layer) and defines `LayerHandler.propagate`. A plain
    ``LayerHandler(kernels=...)`` makes the layer prunable only: the
    dependency graph stops at it (`DependencyGraph.stops` says why) and
    `shrink` keeps its units.

    For `shrink` the layer's config must hold its number of units under
    ``"units"`` or ``"filters"``, and each `KernelSpec` name must be the
    variable's own name too (what ``add_weight(name=...)`` gives).

    Args:
        layer_class: a `keras.layers.Layer` subclass (a `keras.Operation`
            subclass for operation nodes), or a tuple of them.
        handler: a `LayerHandler`.

    Raises:
        TypeError: ``layer_class`` is not a Layer/Operation subclass, or
            ``handler`` is not a `LayerHandler`.

    Example:
        >>> import keras
        >>> from tfprune.handlers import DenseHandler, KernelSpec, register_handler
        >>> @keras.saving.register_keras_serializable("example")
        ... class MyLinear(keras.layers.Layer):
        ...     def __init__(self, units, **kwargs):
        ...         super().__init__(**kwargs)
        ...         self.units = units
        ...     def build(self, input_shape):
        ...         self.w = self.add_weight(shape=(input_shape[-1], self.units), name="w")
        ...         self.b = self.add_weight(shape=(self.units,), initializer="zeros", name="b")
        ...     def call(self, x):
        ...         return x @ self.w + self.b
        ...     def get_config(self):
        ...         return {**super().get_config(), "units": self.units}
        >>> register_handler(MyLinear, DenseHandler(kernels=(KernelSpec("w"),), bias="b"))

        ``MyLinear`` layers are now pruned by `tfprune.prune`, followed by the
        dependency graph and made smaller by `tfprune.shrink`. An element-wise
        custom layer only needs the graph side:

        >>> from tfprune.handlers import PassThrough
        >>> class Clip(keras.layers.Layer):      # channel i -> channel i
        ...     def call(self, x):
        ...         return keras.ops.clip(x, -1.0, 1.0)
        >>> register_handler(Clip, PassThrough())
    """
    classes = layer_class if isinstance(layer_class, tuple) else (layer_class,)
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, keras.Operation)):
            raise TypeError(f"register_handler: `layer_class` must be a keras Layer subclass "
                            f"(or a tuple of them), got {layer_class!r}.")
    if not isinstance(handler, LayerHandler):
        raise TypeError(f"register_handler: `handler` must be a tfprune.handlers.LayerHandler, "
                        f"got {handler!r}.")
    for cls in classes:
        _HANDLERS[:] = [(c, h) for c, h in _HANDLERS if c is not cls]
        _HANDLERS.insert(0, (cls, handler))
    # Most specific classes first so that subclasses win over their bases (stable sort:
    # among equally specific classes the last registered comes first).
    _HANDLERS.sort(key=lambda ch: -len(ch[0].__mro__))


def handler_of(layer):
    """The handler of any known layer type or operation (None if unknown).

    What the dependency graph and `shrink` use: prunable layers and
    channel-only ones (BatchNormalization, Add, pooling...).
    """
    for cls, handler in _HANDLERS:
        if isinstance(layer, cls):
            return handler
    return None


def get_handler(layer):
    """Returns the `LayerHandler` of ``layer`` or None if the type is not supported.

    Only prunable layer types (with `LayerHandler.kernels`) count;
    `handler_of` also returns the channel-only ones.
    """
    handler = handler_of(layer)
    return handler if handler is not None and handler.prunable else None


def supported_layer_types():
    """Names of the supported (prunable) layer classes (for error messages)."""
    return sorted({cls.__name__ for cls, h in _HANDLERS if h.prunable})


def _register_builtins():
    L = keras.layers
    adaptive = tuple(getattr(L, name) for name in (
        "AdaptiveAveragePooling1D", "AdaptiveAveragePooling2D", "AdaptiveAveragePooling3D",
        "AdaptiveMaxPooling1D", "AdaptiveMaxPooling2D", "AdaptiveMaxPooling3D")
        if hasattr(L, name))
    table = [
        ((L.Dropout, L.GaussianNoise, L.GaussianDropout, L.AlphaDropout,
          L.ActivityRegularization, L.Identity, L.Cropping1D, L.Cropping2D, L.Cropping3D,
          L.UpSampling1D, L.UpSampling2D, L.UpSampling3D, L.MaxPooling1D, L.MaxPooling2D,
          L.MaxPooling3D, L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D,
          L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D,
          L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D)
         + adaptive, PassThrough()),
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
        ((L.GroupNormalization,), Mixing(statistics_reason("GroupNormalization"))),
        ((L.UnitNormalization,), UnitNormHandler()),
        ((L.Rescaling,), RescalingHandler()),
        (tuple(OP_NAMES), ElementwiseOp()),
        ((L.Softmax,), Mixing("softmax mixes channels")),
        ((L.PReLU,), Mixing("per-position slopes are not followed")),
        ((L.Permute,), Mixing("moves the channel axis")),
        ((L.Masking,), Mixing("masks time steps from all channels")),
        ((L.Lambda,), Mixing("a Lambda can do anything to channels")),
    ]
    if hasattr(L, "RMSNormalization"):
        table.append(((L.RMSNormalization,), RMSNormHandler()))
    try:  # ConvNeXt's per-channel scale (a Keras-internal class)
        from keras.src.applications.convnext import LayerScale

        table.append(((LayerScale,), LayerScaleHandler()))
    except ImportError:  # pragma: no cover - another Keras layout
        pass
    for classes, handler in table:
        register_handler(classes, handler)


_register_builtins()
