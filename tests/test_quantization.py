import keras
import numpy as np
import pytest
import tensorflow as tf

from tfprune import quantization
from tfprune.quantization import FakeQuant, channel_scale, fake_quantize


@pytest.mark.parametrize("bits", [4, 8])
def test_values_lie_on_a_symmetric_per_channel_grid(bits):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 6)).astype("float32") * np.arange(1, 7, dtype="float32")
    q = np.asarray(fake_quantize(x, bits, axis=-1))
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(x).max(axis=(0, 1)) / qmax
    steps = q / scale
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)
    assert np.abs(steps).max() <= qmax + 1e-4
    assert np.abs(q - x).max(axis=(0, 1)).max() <= (scale / 2 + 1e-6).max()
    # The largest magnitude of each channel is exactly representable.
    np.testing.assert_allclose(np.abs(q).max(axis=(0, 1)), np.abs(x).max(axis=(0, 1)), rtol=1e-6)


def test_zeros_stay_zero_and_zero_channels_are_safe():
    x = np.array([[0.0, 0.0, 0.5], [0.3, 0.0, -0.001]], "float32")
    q = np.asarray(fake_quantize(x, 4, axis=-1))
    assert np.all(q[x == 0] == 0)
    assert np.all(np.isfinite(q))
    assert q[1, 2] == 0.0  # below half a step: rounds to zero
    np.testing.assert_array_equal(np.asarray(channel_scale(x, 8))[0, 1], 1.0)


def test_gradient_is_straight_through():
    x = tf.Variable(np.linspace(-1, 1, 12, dtype="float32").reshape(3, 4))
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(fake_quantize(x, 4) * tf.range(4, dtype="float32"))
    grad = tape.gradient(y, x).numpy()
    np.testing.assert_array_equal(grad, np.tile(np.arange(4, dtype="float32"), (3, 1)))


def test_axis_selects_the_channel():
    x = np.array([[1.0, 0.02], [0.5, 0.01]], "float32")
    q0 = np.asarray(fake_quantize(x, 4, axis=0))  # per row: 0.02 -> 0 in row 0
    q1 = np.asarray(fake_quantize(x, 4, axis=1))  # per column: 0.01 kept in column 1
    assert q0[0, 1] == 0.0 and q1[1, 1] != 0.0


@pytest.mark.parametrize("bad", [2, 16, 0, None, "8", True, 8.0])
def test_bad_bits_are_errors_naming_the_choices(bad):
    with pytest.raises(ValueError, match=r"`bits` must be one of \[4, 8\]"):
        fake_quantize(np.ones((2, 2), "float32"), bad)


def test_fake_quant_config_round_trip_and_get():
    q = FakeQuant(4, axis=0)
    config = keras.saving.serialize_keras_object(q)
    assert keras.saving.deserialize_keras_object(config) == q
    assert quantization.get(None) is None
    assert quantization.get(8) == FakeQuant(8)
    assert quantization.get(config) == q
    with pytest.raises(ValueError, match="got 3"):
        quantization.get(3)
    with pytest.raises(TypeError, match="quantizer"):
        quantization.get("int8")
