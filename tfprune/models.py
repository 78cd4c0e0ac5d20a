"""Reference models used by the demo, the tutorials and the benchmarks."""

from __future__ import annotations

import keras


def lenet5(num_classes=10, input_shape=(28, 28, 1)):
    """LeNet-5 (Caffe variant): conv 20 5x5, pool, conv 50 5x5, pool, dense 500, dense.

    Outputs logits (no softmax): compile with
    ``SparseCategoricalCrossentropy(from_logits=True)``.

    Args:
        num_classes: units of the last layer.
        input_shape: image shape, channels last.

    Example:
        >>> model = tfprune.models.lenet5()
        >>> model.count_params()
        431080
    """
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(20, 5, activation="relu", name="conv1"),
            keras.layers.MaxPooling2D(name="pool1"),
            keras.layers.Conv2D(50, 5, activation="relu", name="conv2"),
            keras.layers.MaxPooling2D(name="pool2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(500, activation="relu", name="fc1"),
            keras.layers.Dense(num_classes, name="fc2"),
        ],
        name="lenet5",
    )


def lenet_300_100(num_classes=10, input_shape=(28, 28)):
    """LeNet-300-100: a 784-300-100-10 MLP (logits out).

    Example:
        >>> model = tfprune.models.lenet_300_100()
        >>> model.count_params()
        266610
    """
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(300, activation="relu", name="fc1"),
            keras.layers.Dense(100, activation="relu", name="fc2"),
            keras.layers.Dense(num_classes, name="fc3"),
        ],
        name="lenet_300_100",
    )
