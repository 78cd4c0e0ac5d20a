"""Benchmark architectures, written once for Keras 3 and tf_keras.

Each builder takes the Keras module to build with (``keras`` or ``tf_keras``)
so that the tfmot baseline (`benchmarks.tfmot_baseline`, on tf_keras) trains
exactly the architecture tfprune trains (same layers, same weight order). This
module imports no framework itself.
"""

from __future__ import annotations


def lenet300(k, num_classes=10):
    """LeNet-300-100: 784-300-100-10 MLP on flattened 28x28 images."""
    return k.Sequential(
        [
            k.Input((784,)),
            k.layers.Dense(300, activation="relu", name="fc1"),
            k.layers.Dense(100, activation="relu", name="fc2"),
            k.layers.Dense(num_classes, name="fc3"),
        ],
        name="lenet300",
    )


def lenet5(k, num_classes=10):
    """LeNet-5 (Caffe/tfmot variant): conv 20 5x5, pool, conv 50 5x5, pool, dense 500, dense 10.

    Must stay identical to `tfprune.cli.lenet5` (the Keras 3 side uses that one).
    """
    return k.Sequential(
        [
            k.Input((28, 28, 1)),
            k.layers.Conv2D(20, 5, activation="relu", name="conv1"),
            k.layers.MaxPooling2D(name="pool1"),
            k.layers.Conv2D(50, 5, activation="relu", name="conv2"),
            k.layers.MaxPooling2D(name="pool2"),
            k.layers.Flatten(name="flatten"),
            k.layers.Dense(500, activation="relu", name="fc1"),
            k.layers.Dense(num_classes, name="fc2"),
        ],
        name="lenet5",
    )


def small_cnn(k, num_classes=10):
    """A small VGG-style CNN on 28x28x1 (32-32-64-64 3x3 convs, dense 128): the latency model."""
    return k.Sequential(
        [
            k.Input((28, 28, 1)),
            k.layers.Conv2D(32, 3, activation="relu", name="conv1"),
            k.layers.Conv2D(32, 3, activation="relu", name="conv2"),
            k.layers.MaxPooling2D(name="pool1"),
            k.layers.Conv2D(64, 3, activation="relu", name="conv3"),
            k.layers.Conv2D(64, 3, activation="relu", name="conv4"),
            k.layers.MaxPooling2D(name="pool2"),
            k.layers.Flatten(name="flatten"),
            k.layers.Dense(128, activation="relu", name="fc1"),
            k.layers.Dense(num_classes, name="fc2"),
        ],
        name="small_cnn",
    )


BUILDERS = {"lenet300": lenet300, "lenet5": lenet5, "cnn": small_cnn}
"""Model name -> builder(keras_module)."""

FLAT_INPUT = {"lenet300"}
"""Models that take flattened 784-vectors instead of 28x28x1 images."""


def build(name, k):
    """Builds model ``name`` with Keras module ``k`` (Keras 3 LeNet-5: ``tfprune.cli.lenet5``)."""
    if name == "lenet5" and getattr(k, "__name__", "") == "keras":
        from tfprune.cli import lenet5 as tfprune_lenet5

        return tfprune_lenet5()
    return BUILDERS[name](k)
