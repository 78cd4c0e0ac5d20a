"""The pruning plan: per-channel followers, units that cannot be removed, layers a method
cannot handle (`tfprune.plan`, used by `tfprune.prune`)."""

import keras
import numpy as np
import pytest

import tfprune
from tfprune import methods, structures
from tfprune.wrapper import find_wrappers

L = keras.layers
FILTER = methods.Magnitude(0.5, structure=structures.Filter())


def _fit(pruned, x, classes=4, steps=2):
    pruned.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    y = np.random.default_rng(1).integers(0, classes, len(x))
    pruned.fit(x, y, epochs=1, batch_size=len(x) // steps, verbose=0,
               callbacks=[tfprune.callbacks.Pruning()])
    return pruned


def _methods(pruned):
    return {w.name: w.method for w in find_wrappers(pruned)}


def _inverted_residual(multiplier=1):
    """MobileNetV2's block: expand 1x1 -> BN -> depthwise -> BN -> project 1x1."""
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 1, name="expand")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(6.0)(x)
    x = L.DepthwiseConv2D(3, padding="same", depth_multiplier=multiplier, name="dw")(x)
    x = L.BatchNormalization(name="bn2")(x)
    x = L.ReLU(6.0)(x)
    x = L.Conv2D(6, 1, name="project")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(4, name="head")(x))


@pytest.mark.parametrize("multiplier", [1, 2])
def test_a_depthwise_layer_follows_its_producer_instead_of_choosing_its_own_channels(multiplier):
    pruned = tfprune.prune(_inverted_residual(multiplier), FILTER)
    m = _methods(pruned)
    assert isinstance(m["dw"], methods.Follow) and isinstance(m["bn2"], methods.Follow)
    assert isinstance(m["bn1"], methods.Follow) and isinstance(m["expand"], methods.Magnitude)
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype("float32")
    _fit(pruned, x)
    expand = pruned.get_layer("expand").method.unit_mask(pruned.get_layer("expand"))
    assert expand.sum() == 4
    np.testing.assert_array_equal(m["dw"].unit_mask(pruned.get_layer("dw")), expand)
    np.testing.assert_array_equal(m["bn2"].unit_mask(pruned.get_layer("bn2")),
                                  np.repeat(expand, multiplier))
    plain = tfprune.strip(pruned)
    small = tfprune.shrink(plain)
    # The report of the pruned model tells what shrink removes: half the channels, once.
    assert small.get_layer("dw").kernel.shape[-2] == 4
    assert small.get_layer("expand").filters == 4
    np.testing.assert_allclose(small.predict(x, verbose=0), plain.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)


def test_a_batch_normalization_after_a_concatenate_follows_every_producer():
    inp = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same", name="a")(inp)
    b = L.Conv2D(6, 3, padding="same", name="b")(inp)
    x = L.Concatenate(name="cat")([a, b])
    x = L.BatchNormalization(name="bn")(x)
    x = L.Conv2D(5, 3, padding="same", name="c")(x)
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, L.Dense(4, name="head")(x))
    pruned = tfprune.prune(model, FILTER)
    assert isinstance(_methods(pruned)["bn"], methods.Follow)
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype("float32")
    _fit(pruned, x)
    w = {w.name: w for w in find_wrappers(pruned)}
    expected = np.concatenate([w["a"].method.unit_mask(w["a"]), w["b"].method.unit_mask(w["b"])])
    np.testing.assert_array_equal(w["bn"].method.unit_mask(w["bn"]), expected)
    plain = tfprune.strip(pruned)
    small = tfprune.shrink(plain)
    assert small.get_layer("bn").gamma.shape[0] == 2 + 3  # no dead channel left behind the BN
    np.testing.assert_allclose(small.predict(x, verbose=0), plain.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)


def test_units_read_by_a_layer_the_graph_cannot_follow_are_kept_with_a_warning():
    inp = keras.Input((6, 5))
    x = L.Dense(8, name="proj")(inp)
    x = L.LSTM(4, name="lstm")(x)
    x = L.Dense(6, name="hidden")(x)
    model = keras.Model(inp, L.Dense(3, name="head")(x))
    with pytest.warns(UserWarning, match="'proj' keeps all its units .*LSTM"):
        pruned = tfprune.prune(model, FILTER)
    assert set(_methods(pruned)) == {"hidden"}


def test_naming_a_layer_whose_units_cannot_be_removed_raises():
    inp = keras.Input((6, 5))
    x = L.Dense(8, name="proj")(inp)
    x = L.LSTM(4, name="lstm")(x)
    model = keras.Model(inp, L.Dense(3, name="head")(x))
    with pytest.raises(ValueError, match="'proj', whose units cannot be removed by "
                                         "tfprune.shrink .*LSTM"):
        tfprune.prune(model, FILTER, layers=["proj"])


def _separable_model():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, name="conv")(inp)
    x = L.SeparableConv2D(6, 3, name="sep")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(3, name="head")(x))


def test_a_layer_the_method_cannot_handle_is_skipped_with_a_warning():
    with pytest.warns(UserWarning, match="'sep' is left unpruned: TurboVBI"):
        pruned = tfprune.prune(_separable_model(), methods.TurboVBI(num_train_examples=10))
    assert "sep" not in _methods(pruned) and "conv" in _methods(pruned)


def test_a_named_layer_the_method_cannot_handle_raises():
    with pytest.raises(ValueError, match="`layers` names 'sep', which TurboVBI.* cannot prune"):
        tfprune.prune(_separable_model(), methods.TurboVBI(num_train_examples=10),
                      layers=["sep", "conv"])


def test_a_layer_coupled_with_a_layer_left_dense_keeps_its_units():
    """Add(conv_a, conv_b) where the user prunes only conv_a at Filter level: masking its
    units would remove nothing (conv_b still writes the channels)."""
    inp = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same", name="a")(inp)
    b = L.Conv2D(4, 3, padding="same", name="b")(inp)
    x = L.Add()([a, b])
    x = L.Conv2D(6, 3, name="c")(x)
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, L.Dense(3, name="head")(x))
    with pytest.warns(UserWarning, match="'a' keeps all its units .*coupled with those of 'b'"):
        pruned = tfprune.prune(model, layers=lambda layer: FILTER if layer.name in ("a", "c")
                               else None)
    assert set(_methods(pruned)) == {"c"}


def test_the_traced_training_step_is_kept_across_fits():
    pruned = tfprune.prune(_inverted_residual(), FILTER)
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype("float32")
    y = np.zeros(8, "int32")
    pruned.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruned.fit(x, y, batch_size=4, verbose=0, callbacks=[tfprune.callbacks.Pruning()])
    first = pruned.train_function
    traces = first.experimental_get_tracing_count() if hasattr(
        first, "experimental_get_tracing_count") else None
    pruned.fit(x, y, batch_size=4, verbose=0, callbacks=[tfprune.callbacks.Pruning()])
    assert pruned.train_function is first  # the same tf.function, not traced again
    if traces is not None:
        assert first.experimental_get_tracing_count() == traces
    assert all(int(w.step.numpy()) == 4 for w in find_wrappers(pruned))
