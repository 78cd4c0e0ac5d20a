"""Layer handlers: the canonical [S, I, O] view of every supported kernel layout."""

import keras
import numpy as np
import pytest

from tfprune import handlers


@pytest.mark.parametrize(
    "shape, layout, canon",
    [
        ((7, 5), handlers.STANDARD, (1, 7, 5)),
        ((3, 3, 4, 8), handlers.STANDARD, (9, 4, 8)),
        ((3, 3, 8, 4), handlers.TRANSPOSED, (9, 4, 8)),
        ((3, 3, 4, 2), handlers.DEPTHWISE, (9, 1, 8)),
        ((2, 3, 3, 4, 8), handlers.STANDARD, (18, 4, 8)),
    ],
)
def test_canonical_round_trip(shape, layout, canon):
    kernel = np.random.default_rng(0).normal(size=shape).astype("float32")
    c = np.asarray(handlers.to_canonical(kernel, layout))
    assert c.shape == canon == handlers.canonical_shape(shape, layout)
    np.testing.assert_array_equal(np.asarray(handlers.from_canonical(c, shape, layout)), kernel)


def test_transposed_canonical_puts_output_channels_last():
    kernel = np.zeros((3, 3, 8, 4), "float32")  # Conv2DTranspose: [h, w, out, in]
    kernel[..., 5, :] = 1.0
    c = np.asarray(handlers.to_canonical(kernel, handlers.TRANSPOSED))
    assert c[..., 5].all() and c.sum() == c[..., 5].size


def test_depthwise_output_channel_order_matches_keras():
    layer = keras.layers.DepthwiseConv2D(1, depth_multiplier=2, use_bias=False)
    x = np.ones((1, 1, 1, 3), "float32")
    layer(x)
    kernel = np.zeros((1, 1, 3, 2), "float32")
    kernel[0, 0, 1, 0] = 1.0  # input channel 1, multiplier 0
    layer.kernel.assign(kernel)
    out = np.asarray(layer(x))[0, 0, 0]
    canon = np.asarray(handlers.to_canonical(kernel, handlers.DEPTHWISE))[0, 0]
    np.testing.assert_array_equal(out, canon)


def test_register_handler_makes_a_subclass_prunable():
    class MyDense(keras.layers.Dense):
        pass

    assert handlers.get_handler(MyDense(2)) is not None  # inherits Dense's handler
    custom = handlers.LayerHandler(kernels=(handlers.KernelSpec("kernel"),), bias=None)
    handlers.register_handler(MyDense, custom)
    try:
        assert handlers.get_handler(MyDense(2)) is custom
        assert handlers.get_handler(keras.layers.Dense(2)) is not custom
    finally:
        handlers._HANDLERS[:] = [(c, h) for c, h in handlers._HANDLERS if c is not MyDense]


def test_register_handler_rejects_bad_arguments():
    with pytest.raises(TypeError, match="layer_class"):
        handlers.register_handler(int, handlers.LayerHandler(kernels=()))
    with pytest.raises(TypeError, match="handler"):
        handlers.register_handler(keras.layers.Dense, object())


def test_unsupported_layers_have_no_handler():
    assert handlers.get_handler(keras.layers.BatchNormalization()) is None
    assert "Dense" in handlers.supported_layer_types()
