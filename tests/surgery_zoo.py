"""Small models for the surgery tests, and helpers to kill coupled channels."""

import keras
import numpy as np

from tfprune.surgery import DependencyGraph

L = keras.layers


def mlp():
    return keras.Sequential([
        keras.Input((20,)),
        L.Dense(32, activation="relu", name="fc1"),
        L.Dropout(0.2),
        L.Dense(16, activation="relu", name="fc2"),
        L.Dense(5, name="out"),
    ], name="mlp")


def lenet5():
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Conv2D(20, 5, activation="relu", name="conv1"),
        L.MaxPooling2D(),
        L.Conv2D(50, 5, activation="relu", name="conv2"),
        L.MaxPooling2D(),
        L.Flatten(),
        L.Dense(500, activation="relu", name="fc1"),
        L.Dense(10, activation="softmax", name="fc2"),
    ], name="lenet5")


def _conv_bn(x, filters, name, kernel=3, strides=1, relu=True):
    x = L.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=name)(x)
    x = L.BatchNormalization(name=name + "_bn")(x)
    return L.ReLU(name=name + "_relu")(x) if relu else x


def vgg():
    x = inp = keras.Input((16, 16, 3))
    x = _conv_bn(x, 8, "c1")
    x = _conv_bn(x, 8, "c2")
    x = L.MaxPooling2D()(x)
    x = _conv_bn(x, 16, "c3")
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(10, name="head")(x)
    return keras.Model(inp, x, name="vgg")


def resnet():
    inp = keras.Input((16, 16, 3))
    stem = _conv_bn(inp, 8, "stem")
    y = _conv_bn(stem, 8, "b1a")
    y = _conv_bn(y, 8, "b1b", relu=False)
    x = L.ReLU(name="b1_out")(L.Add(name="b1_add")([stem, y]))
    y = _conv_bn(x, 16, "b2a", strides=2)
    y = _conv_bn(y, 16, "b2b", relu=False)
    s = _conv_bn(x, 16, "b2proj", kernel=1, strides=2, relu=False)
    x = L.ReLU(name="b2_out")(L.Add(name="b2_add")([s, y]))
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(10, name="head")(x), name="resnet")


def inception():
    inp = keras.Input((16, 16, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inp)
    a = L.Conv2D(4, 1, activation="relu", name="br1")(x)
    b = L.Conv2D(6, 3, padding="same", activation="relu", name="br3")(x)
    c = L.MaxPooling2D(3, strides=1, padding="same")(x)
    c = L.Conv2D(4, 1, activation="relu", name="brpool")(c)
    cat = L.Concatenate(name="cat")([a, b, c])
    d = L.Conv2D(14, 1, name="side")(x)
    x = L.Add(name="mix")([cat, d])
    x = L.BatchNormalization(name="mix_bn")(x)
    x = L.Conv2D(8, 3, activation="relu", name="post")(x)
    x = L.GlobalMaxPooling2D()(x)
    return keras.Model(inp, L.Dense(10, name="head")(x), name="inception")


def mobilenet():
    inp = keras.Input((16, 16, 3))
    x = L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(inp)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(6.0)(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw1")(x)
    x = L.BatchNormalization(name="dw1_bn")(x)
    x = L.ReLU(6.0)(x)
    x = L.Conv2D(16, 1, use_bias=False, name="pw1")(x)
    x = L.BatchNormalization(name="pw1_bn")(x)
    x = L.ReLU(6.0)(x)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw2")(x)
    x = L.SeparableConv2D(16, 3, padding="same", activation="relu", name="sep")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(10, name="head")(x), name="mobilenet")


def nested():
    block = keras.Sequential([
        keras.Input((8, 8, 8)),
        L.Conv2D(8, 3, padding="same", activation="relu", name="inner1"),
        L.Conv2D(12, 3, padding="same", activation="relu", name="inner2"),
    ], name="block")
    fi = keras.Input((8, 8, 12))
    fy = L.Conv2D(6, 1, activation="relu", name="finner")(fi)
    ffunc = keras.Model(fi, L.MaxPooling2D()(fy), name="ffunc")
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="outer1")(inp)
    x = ffunc(block(x))
    x = L.Flatten()(x)
    return keras.Model(inp, L.Dense(10, name="head")(x), name="nested")


def two_outputs():
    inp = keras.Input((20,))
    h1 = L.Dense(32, activation="relu", name="h1")(inp)
    h2 = L.Dense(16, activation="tanh", name="h2")(h1)
    a = L.Dense(3, name="head_a")(h2)
    b = L.Dense(2, name="head_b")(L.Dense(8, activation="relu", name="h3")(h1))
    return keras.Model(inp, [a, b, h2], name="two_outputs")


def misc():
    """Conv2DTranspose, ZeroPadding, UpSampling, Cropping, Reshape-to-flat, Conv1D."""
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    x = L.Conv2DTranspose(6, 3, strides=2, padding="same", name="ct")(x)
    x = L.ZeroPadding2D(1)(x)
    x = L.Conv2D(8, 3, name="c2")(x)
    x = L.UpSampling2D()(x)
    x = L.Cropping2D(2)(x)
    x = L.AveragePooling2D(4)(x)
    x = L.Reshape((-1, 8))(x)
    x = L.Conv1D(6, 3, activation="elu", name="c1d")(x)
    x = L.Reshape((-1,))(x)
    return keras.Model(inp, L.Dense(4, name="head")(x), name="misc")


def convnext_block():
    """A ConvNeXt block: grouped 7x7 conv (groups=C), LayerNormalization, Dense 4C, GELU,
    Dense C, LayerScale and a residual `inputs + x` (an operation node, not a layer)."""
    from keras.src.applications.convnext import LayerScale

    c = 8
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(c, 2, strides=2, name="stem")(inp)
    x = L.LayerNormalization(epsilon=1e-6, name="stem_ln")(x)
    y = L.Conv2D(c, 7, padding="same", groups=c, name="dwconv")(x)
    y = L.LayerNormalization(epsilon=1e-6, name="block_ln")(y)
    y = L.Dense(4 * c, name="pw1")(y)
    y = L.Activation("gelu", name="gelu")(y)
    y = L.Dense(c, name="pw2")(y)
    y = LayerScale(0.5, c, name="layer_scale")(y)
    x = x + y
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(10, name="head")(x), name="convnext_block")


def grouped():
    """A depthwise-like convolution (groups = channels, 2 filters each) between two convs."""
    inp = keras.Input((8, 8, 3))
    x = _conv_bn(inp, 8, "c1")
    x = L.Conv2D(16, 3, padding="same", groups=8, activation="relu", name="dwlike")(x)
    x = L.Conv2D(8, 1, activation="relu", name="c2")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(10, name="head")(x), name="grouped")


def grouped_general():
    """A convolution with 4 groups of 2 input channels and 3 filters each."""
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, activation="relu", name="c1")(inp)
    x = L.Conv2D(12, 3, groups=4, activation="relu", name="g4")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(10, name="head")(x), name="grouped_general")


def ops():
    """Plain tensor operations as Functional nodes: MobileNetV3's hard sigmoid
    `relu6(x + 3) * (1/6)` in a squeeze-and-excite block, a per-channel constant scale."""
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="c1")(inp)
    x = x * keras.ops.relu6(x + 3.0) / 6.0  # hard swish from plain operations
    s = L.GlobalAveragePooling2D(keepdims=True)(x)
    s = L.Conv2D(4, 1, activation="relu", name="squeeze")(s)
    s = L.Conv2D(8, 1, name="excite")(s)
    s = L.ReLU(6.0)(s + 3.0) * (1.0 / 6.0)
    x = L.Multiply(name="se")([x, s])
    x = x * np.linspace(0.5, 1.5, 8).astype("float32")
    x = L.Conv2D(8, 3, name="c2")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(10, name="head")(x), name="ops")


ZOO = {f.__name__: f for f in (mlp, lenet5, vgg, resnet, inception, mobilenet, nested,
                               two_outputs, misc, grouped, ops)}
# Not in ZOO, whose tests expect at least 2/5 of the parameters to go after Filter pruning:
# channels that LayerNormalization reads cannot be removed, and `prune` does not yet choose
# the same filters in every group of a grouped convolution.
PARTIAL = {f.__name__: f for f in (convnext_block, grouped_general)}


def randomize(model, seed=0):
    """Random weights everywhere (biases and BN statistics too)."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        shape = tuple(v.shape)
        if v.name == "moving_variance":
            value = rng.uniform(0.5, 1.5, shape)
        elif v.name == "gamma":
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0, 0.3, shape)
        v.assign(value.astype("float32"))
    return model


def _set(layer, name, fn):
    for v in layer.weights:
        if v.name == name:
            value = keras.ops.convert_to_numpy(v).copy()
            fn(value)
            v.assign(value)


def kill_units(layer, idx):
    """Zero the kernel slices and biases of output units `idx` of a producer layer."""
    idx = np.asarray(idx)
    if isinstance(layer, (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)):
        _set(layer, "kernel", lambda k: k.__setitem__((..., idx, slice(None)), 0))
    elif isinstance(layer, (L.SeparableConv1D, L.SeparableConv2D)):
        _set(layer, "pointwise_kernel", lambda k: k.__setitem__((..., idx), 0))
    else:
        _set(layer, "kernel", lambda k: k.__setitem__((..., idx), 0))
    _set(layer, "bias", lambda b: b.__setitem__(idx, 0))


def kill_followers(layer, idx, bn_beta=0.0):
    """Zero BN scale/offset (offset = `bn_beta`) or a depthwise layer's channels `idx`."""
    idx = np.asarray(idx)
    if isinstance(layer, L.BatchNormalization):
        _set(layer, "gamma", lambda g: g.__setitem__(idx, 0))
        _set(layer, "beta", lambda b: b.__setitem__(idx, bn_beta))
    elif isinstance(layer, (L.DepthwiseConv1D, L.DepthwiseConv2D)):
        m = layer.depth_multiplier
        _set(layer, "kernel", lambda k: k.__setitem__((..., idx, slice(None)), 0))
        cols = (idx[:, None] * m + np.arange(m)).ravel()
        _set(layer, "bias", lambda b: b.__setitem__(cols, 0))


def kill_half(model, seed=0):
    """Kill about half the channels of every unblocked coupled group.

    Returns {producer layer name: number of units killed}.
    """
    rng = np.random.default_rng(seed)
    killed = {}
    for group in DependencyGraph(model).groups:
        if group.blocked_reason or group.size < 2:
            continue
        chosen = rng.choice(group.size, group.size // 2, replace=False)
        for layer, idx in group.producers:
            kill_units(layer, idx[chosen])
            killed[layer.name] = killed.get(layer.name, 0) + len(chosen)
        for layer, idx in group.followers:
            kill_followers(layer, idx[chosen])
    return killed


def count_units(model):
    """{layer name: units} for every Dense/Conv layer, nested models included."""
    out = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        n = getattr(layer, "units", None) or getattr(layer, "filters", None)
        if n:
            out[layer.name] = n
    return out
