"""The graph-side view of the one layer-handler registry (`tfprune.handlers`).

The handlers themselves (Dense, convolutions, BatchNormalization, Add,
Concatenate, operation nodes, ...) and `register_handler` live in
`tfprune.handlers`: one handler per layer type serves both pruning and
surgery. This module keeps the names the dependency graph, `shrink` and
existing extensions use: `Handler` (= `tfprune.handlers.LayerHandler`),
`Stop`, `register_handler`, and `get_handler`, which here returns the handler
of *any* known layer type (`tfprune.handlers.handler_of`), prunable or
channel-only.
"""

from __future__ import annotations

from tfprune.handlers import (  # noqa: F401 - re-exported for the graph and extensions
    ELEMENTWISE_ACTIVATIONS,
    BatchNormHandler,
    ChannelHandler,
    Concat,
    ConvHandler,
    ConvTransposeHandler,
    DenseHandler,
    DepthwiseHandler,
    ElementwiseActivation,
    ElementwiseOp,
    Flatten,
    LayerHandler,
    LayerNormHandler,
    LayerScaleHandler,
    Merge,
    Mixing,
    PassThrough,
    ProducerHandler,
    RescalingHandler,
    Reshape,
    RMSNormHandler,
    Stop,
    UnitNormHandler,
    ZeroPadding,
    apply_elementwise,
    is_elementwise,
    register_handler,
    weight,
)
from tfprune.handlers import handler_of as get_handler

__all__ = ["Handler", "Stop", "register_handler", "get_handler", "ELEMENTWISE_ACTIVATIONS"]

Handler = LayerHandler
_Producer = ProducerHandler  # the name before the registries were merged
