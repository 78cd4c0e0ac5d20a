"""Shared fixtures: quiet TensorFlow, a fixed seed per test, tiny models of every layer type."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Precaution: one test run crashed (heap corruption) while training a shrunk ResNet with a
# 1x1 stride-2 shortcut under TF 2.21's oneDNN kernels; not reproduced in isolation since.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same Python, NumPy and TensorFlow seeds."""
    keras.utils.set_random_seed(0)


# ---------------------------------------------------------------------------
# One tiny layer per supported layer type: (name, layer factory, input shape).
# Every prunable kernel of each layer has a fan-in and unit count > 1 so that
# every structure has more than one group to choose from.

LAYER_CASES = [
    ("dense", lambda: keras.layers.Dense(6, name="pl"), (8,)),
    ("conv1d", lambda: keras.layers.Conv1D(6, 3, name="pl"), (7, 4)),
    ("conv2d", lambda: keras.layers.Conv2D(6, 3, name="pl"), (6, 6, 4)),
    ("conv3d", lambda: keras.layers.Conv3D(6, 2, name="pl"), (4, 4, 4, 3)),
    ("depthwise2d", lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="pl"),
     (6, 6, 4)),
    ("separable2d", lambda: keras.layers.SeparableConv2D(6, 3, depth_multiplier=2, name="pl"),
     (6, 6, 4)),
    ("conv2d_transpose", lambda: keras.layers.Conv2DTranspose(6, 3, name="pl"), (5, 5, 4)),
    # Also handled (registered in tfprune.handlers):
    ("conv1d_transpose", lambda: keras.layers.Conv1DTranspose(6, 3, strides=2, name="pl"),
     (5, 4)),
    ("conv3d_transpose", lambda: keras.layers.Conv3DTranspose(6, 2, name="pl"), (3, 3, 3, 3)),
    ("depthwise1d", lambda: keras.layers.DepthwiseConv1D(3, depth_multiplier=2, name="pl"),
     (7, 4)),
    ("separable1d", lambda: keras.layers.SeparableConv1D(6, 3, depth_multiplier=2, name="pl"),
     (7, 4)),
]
LAYER_IDS = [c[0] for c in LAYER_CASES]


def layer_model(factory, input_shape, name="m"):
    """A Functional model: input -> the layer -> flatten -> Dense(3) head."""
    inp = keras.Input(input_shape, name="x")
    out = factory()(inp)
    if len(out.shape) > 2:
        out = keras.layers.Flatten(name="flat")(out)
    out = keras.layers.Dense(3, name="head")(out)
    return keras.Model(inp, out, name=name)


def random_data(input_shape, n=16, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *input_shape)).astype("float32")
    y = rng.integers(0, classes, n)
    return x, y


def mlp(input_dim=8, hidden=16, classes=3, name="mlp"):
    return keras.Sequential([
        keras.Input((input_dim,)),
        keras.layers.Dense(hidden, activation="relu", name="d1"),
        keras.layers.Dense(hidden, activation="relu", name="d2"),
        keras.layers.Dense(classes, name="out"),
    ], name=name)


def lenet(input_shape=(12, 12, 1), classes=4, name="lenet"):
    """A LeNet-5-like CNN, scaled down: conv, pool, conv, pool, dense, dense."""
    return keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Conv2D(4, 3, activation="relu", name="c1"),
        keras.layers.MaxPooling2D(name="p1"),
        keras.layers.Conv2D(6, 3, activation="relu", name="c2"),
        keras.layers.MaxPooling2D(name="p2"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(16, activation="relu", name="fc"),
        keras.layers.Dense(classes, name="out"),
    ], name=name)


def compile_sgd(model, lr=0.05):
    model.compile(keras.optimizers.SGD(lr),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.fixture
def mlp_model():
    return mlp()


@pytest.fixture
def lenet_model():
    return lenet()


@pytest.fixture
def mlp_data():
    return random_data((8,), n=32)


@pytest.fixture
def lenet_data():
    return random_data((12, 12, 1), n=32, classes=4)


def wrap_pl(model, method):
    """``model`` with its layer 'pl' wrapped in ``PruneWrapper(pl, method)`` directly.

    For tests of a method's own mechanics on every layer type: `tfprune.prune` would
    refuse (or turn into `methods.Follow`) a unit-removing structure on layers whose units
    `tfprune.shrink` cannot remove, such as a depthwise layer reading the model input.
    """
    import tfprune

    def clone(layer):
        new = layer.__class__.from_config(layer.get_config())
        return tfprune.PruneWrapper(new, method) if layer.name == "pl" else new

    pruned = keras.models.clone_model(model, clone_function=clone)
    for a, b in zip(model.layers, pruned.layers, strict=True):
        if isinstance(b, tfprune.PruneWrapper):
            b.layer.set_weights(a.get_weights())
            b.method.initialize(b)
        else:
            b.set_weights(a.get_weights())
    return pruned
