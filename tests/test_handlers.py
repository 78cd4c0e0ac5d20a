"""Layer handlers: the canonical [S, I, O] view of every supported kernel layout, and the one
registry that serves both pruning and surgery."""

import keras
import numpy as np
import pytest

import tfprune
from tfprune import handlers, methods, structures
from tfprune.surgery import DependencyGraph
from tfprune.surgery import handlers as surgery_handlers


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


# ------------------------------------------------------------------ one registry, both sides


@keras.saving.register_keras_serializable("tfprune_test_handlers")
class MyLinear(keras.layers.Layer):
    """``x @ w + b`` with variables named ``w`` and ``b`` (not Dense's names)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], self.units), name="w")
        self.b = self.add_weight(shape=(self.units,), initializer="zeros", name="b")

    def call(self, x):
        return x @ self.w + self.b

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable("tfprune_test_handlers")
class MyLinearPruneOnly(MyLinear):
    pass


def _unregister(*classes):
    handlers._HANDLERS[:] = [(c, h) for c, h in handlers._HANDLERS if c not in classes]


def _linear_model(layer_class):
    inp = keras.Input((6,))
    h = layer_class(8, name="lin")(inp)
    h = keras.layers.Activation("relu", name="act")(h)
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(h))
    rng = np.random.default_rng(0)
    for v in model.weights:
        v.assign(rng.normal(size=v.shape).astype("float32"))
    return model


def _prune_strip(model, structure):
    pruned = tfprune.prune(model, methods.Magnitude(0.5, structure=structure), layers=["lin"])
    cb = tfprune.callbacks.Pruning()
    cb.set_model(pruned)
    cb.on_train_begin()
    cb.on_train_batch_begin(0)  # Magnitude with schedule=None: prune at step 0
    cb.on_train_end()
    return tfprune.strip(pruned)


@pytest.mark.parametrize("layer", [keras.layers.Dense(4), keras.layers.Conv2D(4, 3),
                                   keras.layers.Conv2DTranspose(4, 3),
                                   keras.layers.DepthwiseConv2D(3),
                                   keras.layers.SeparableConv2D(4, 3)])
def test_one_handler_serves_pruning_and_surgery(layer):
    # The object the wrapper prunes with is the one the dependency graph and shrink use.
    h = handlers.get_handler(layer)
    assert h is handlers.handler_of(layer) is surgery_handlers.get_handler(layer)
    assert type(h).propagate is not handlers.LayerHandler.propagate
    assert h.prunable and h.unit_spec() in h.kernels


def test_channel_only_layers_are_in_the_registry_but_not_prunable():
    bn = keras.layers.BatchNormalization()
    assert handlers.get_handler(bn) is None
    assert isinstance(handlers.handler_of(bn), handlers.BatchNormHandler)
    assert isinstance(handlers.handler_of(keras.layers.Add()), handlers.Merge)
    assert handlers.handler_of(keras.layers.LSTM(2)) is None
    assert "BatchNormalization" not in handlers.supported_layer_types()


@pytest.mark.parametrize("layer, layout", [
    (keras.layers.Dense(5), handlers.STANDARD),
    (keras.layers.Conv2D(5, 3), handlers.STANDARD),
    (keras.layers.Conv2DTranspose(5, 3), handlers.TRANSPOSED),
    (keras.layers.SeparableConv2D(5, 3), handlers.STANDARD),
])
def test_graph_rows_are_the_canonical_kernel_columns(layer, layout):
    layer.build((None, 6, 6, 4) if not isinstance(layer, keras.layers.Dense) else (None, 4))
    h = handlers.get_handler(layer)
    spec = h.unit_spec()
    assert spec.layout == layout
    canon = np.asarray(handlers.to_canonical(getattr(layer, spec.name), spec.layout))
    rows = h.out_slices(layer)  # what DependencyGraph scores
    assert rows.shape == (5, canon.shape[0] * canon.shape[1])
    for j in range(5):
        np.testing.assert_allclose(rows[j], canon[..., j].ravel(), rtol=1e-6)


@pytest.mark.parametrize("layout, shape, in_axis, out_axis", [
    (handlers.STANDARD, (3, 3, 4, 6), 2, 3),
    (handlers.TRANSPOSED, (3, 3, 6, 4), 3, 2),
])
def test_slice_kernel_follows_the_layout(layout, shape, in_axis, out_axis):
    kernel = np.arange(np.prod(shape), dtype="float64").reshape(shape)
    keep_in = np.array([True, False, True, True])
    keep_out = np.array([False, True, True, False, True, False])
    small = handlers.slice_kernel(kernel, layout, keep_in, keep_out)
    expected = np.compress(keep_out, np.compress(keep_in, kernel, in_axis), out_axis)
    np.testing.assert_array_equal(small, expected)
    # the same units as the canonical view's output columns
    canon = np.asarray(handlers.to_canonical(kernel, layout))[:, keep_in][..., keep_out]
    np.testing.assert_array_equal(np.asarray(handlers.to_canonical(small, layout)), canon)


def test_slice_kernel_refuses_output_mask_on_depthwise():
    with pytest.raises(ValueError, match="depthwise"):
        handlers.slice_kernel(np.zeros((3, 3, 4, 2)), handlers.DEPTHWISE,
                              np.ones(4, bool), np.ones(8, bool))


def test_kernel_spec_and_handler_reject_bad_descriptions():
    with pytest.raises(ValueError, match="'sideways'"):
        handlers.KernelSpec("kernel", layout="sideways")
    with pytest.raises(TypeError, match="KernelSpec"):
        handlers.LayerHandler(kernels=("kernel",))
    h = handlers.LayerHandler(kernels=(handlers.KernelSpec("k", produces_units=False),))
    with pytest.raises(ValueError, match="no kernel produces units"):
        h.unit_spec()
    with pytest.raises(TypeError, match="layer_class"):
        handlers.register_handler((MyLinear, "Dense"), handlers.DenseHandler())


def test_custom_layer_registered_once_is_pruned_followed_and_shrunk():
    handlers.register_handler(
        MyLinear, handlers.DenseHandler(kernels=(handlers.KernelSpec("w"),), bias="b"))
    try:
        assert "MyLinear" in handlers.supported_layer_types()
        plain = _prune_strip(_linear_model(MyLinear), structures.Filter())
        w = keras.ops.convert_to_numpy(plain.get_layer("lin").w)
        assert (np.abs(w).sum(0) == 0).sum() == 4  # Filter pruning zeroed half the units
        graph = DependencyGraph(plain)
        assert not [s for s in graph.stops if s[0] == "lin"]
        (group,) = graph.groups_of("lin")
        assert group.blocked_reason is None and group.size == 8
        small, info = tfprune.shrink(plain, return_info=True)  # self-check: same outputs
        assert info.removed["lin"] == (8, 4)
        assert small.get_layer("lin").w.shape == (6, 4)
        assert small.get_layer("head").kernel.shape == (4, 3)
        x = np.random.default_rng(1).normal(size=(3, 6)).astype("float32")
        np.testing.assert_allclose(small(x), plain(x), rtol=1e-5, atol=1e-5)
    finally:
        _unregister(MyLinear)


def test_custom_layer_registered_for_pruning_only_stops_the_graph_with_a_reason():
    handlers.register_handler(
        MyLinearPruneOnly,
        handlers.LayerHandler(kernels=(handlers.KernelSpec("w"),), bias="b"))
    try:
        # weight-level pruning: its units cannot be removed, so Filter() would be refused
        plain = _prune_strip(_linear_model(MyLinearPruneOnly), structures.Unstructured())
        w = keras.ops.convert_to_numpy(plain.get_layer("lin").w)
        assert (w == 0).sum() == w.size // 2  # pruned like any supported layer
        graph = DependencyGraph(plain)
        (reason,) = [r for name, r in graph.stops if name == "lin"]
        assert "registered for pruning only" in reason and "LayerHandler" in reason
        small, info = tfprune.shrink(plain, return_info=True)
        assert "lin" not in info.removed and ("lin", reason) in info.stops
        assert small.get_layer("lin").w.shape == (6, 8)  # masked units stay
    finally:
        _unregister(MyLinearPruneOnly)
