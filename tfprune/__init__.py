"""tfprune: structured pruning for Keras 3 that makes LiteRT models smaller and faster."""

__version__ = "0.1.0"
