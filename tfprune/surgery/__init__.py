"""Model surgery: the channel dependency graph and `shrink`.

- `DependencyGraph(model).groups`: coupled channel groups (`ChannelGroup`),
  to score and prune channels that can only go together.
- `shrink(model)`: a new, smaller model without the dead units and channels.
- `register_handler(layer_class, handler)`: teach both a new layer type.
"""

from tfprune.surgery.graph import ChannelGroup, DependencyGraph, kernel_norm, unit_slices, unwrap
from tfprune.surgery.handlers import Handler, Stop, register_handler
from tfprune.surgery.shrink import ShrinkError, ShrinkInfo, shrink

__all__ = [
    "ChannelGroup",
    "DependencyGraph",
    "Handler",
    "ShrinkError",
    "ShrinkInfo",
    "Stop",
    "kernel_norm",
    "register_handler",
    "shrink",
    "unit_slices",
    "unwrap",
]
