"""prune() and strip(): model kinds, layer selection, weights, errors."""

import keras
import numpy as np
import pytest
from conftest import compile_sgd, lenet, mlp, random_data

import tfprune
from tfprune import methods
from tfprune import structures as S
from tfprune.wrapper import PruneWrapper, find_wrappers


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _functional():
    inp = keras.Input((10, 10, 3), name="img")
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv_a")(inp)
    y = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(8, activation="relu", name="fc")(x)
    return keras.Model(inp, keras.layers.Dense(3, name="out")(x), name="func")


def _nested():
    inner = keras.Sequential([keras.Input((8,)), keras.layers.Dense(12, activation="relu",
                                                                    name="in_d1"),
                              keras.layers.Dense(10, name="in_d2")], name="inner")
    block_in = keras.Input((10,))
    block = keras.Model(block_in, keras.layers.Dense(6, activation="relu", name="blk_d")(block_in),
                        name="block")
    inp = keras.Input((8,), name="x")
    x = inner(inp)
    x = block(x)
    return keras.Model(inp, keras.layers.Dense(3, name="out")(x), name="outer")


MODELS = {"sequential": lambda: mlp(), "lenet": lambda: lenet(), "functional": _functional,
          "nested": _nested}
INPUTS = {"sequential": (8,), "lenet": (12, 12, 1), "functional": (10, 10, 3), "nested": (8,)}
SUPPORTED = {
    "sequential": {"d1", "d2", "out"}, "lenet": {"c1", "c2", "fc", "out"},
    "functional": {"conv_a", "dw", "fc", "out"}, "nested": {"in_d1", "in_d2", "blk_d", "out"},
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_prune_wraps_every_supported_layer_and_keeps_outputs(kind):
    model = MODELS[kind]()
    x, _ = random_data(INPUTS[kind], n=4)
    before = _np(model(x))
    weights = [w.copy() for w in model.get_weights()]
    types = [type(layer) for layer in model.layers]
    pruned = tfprune.prune(model, methods.Magnitude(0.5))
    assert {w.name for w in find_wrappers(pruned)} == SUPPORTED[kind]
    assert type(pruned) is type(model) and pruned is not model
    # Carried over: same outputs before the first pruning step.
    np.testing.assert_allclose(_np(pruned(x)), before, rtol=1e-5, atol=1e-6)
    for name in SUPPORTED[kind]:
        w = pruned.get_layer(name) if kind != "nested" else _find(pruned, name)
        assert isinstance(w, PruneWrapper) and w.layer.name == name
    # The input model is untouched.
    assert not find_wrappers(model)
    assert [type(layer) for layer in model.layers] == types
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(_np(model(x)), before)


def _find(model, name):
    return next(w for w in find_wrappers(model) if w.name == name)


def test_nested_models_stay_nested_with_their_inner_layers_wrapped():
    pruned = tfprune.prune(_nested(), methods.Magnitude(0.5))
    inner = pruned.get_layer("inner")
    assert isinstance(inner, keras.Sequential)
    assert [type(layer) for layer in inner.layers] == [PruneWrapper, PruneWrapper]
    assert isinstance(pruned.get_layer("block").get_layer("blk_d"), PruneWrapper)


def test_pruned_weights_do_not_alias_the_input_model():
    model = mlp()
    pruned = tfprune.prune(model, methods.Magnitude(0.5))
    w = pruned.get_layer("d1")
    w.layer.kernel.assign(np.zeros(w.layer.kernel.shape, "float32"))
    assert np.abs(_np(model.get_layer("d1").kernel)).sum() > 0


def test_layers_as_a_list_of_names_wraps_only_those():
    pruned = tfprune.prune(lenet(), methods.Magnitude(0.5), layers=["c2", "fc"])
    assert [w.name for w in find_wrappers(pruned)] == ["c2", "fc"]
    assert type(pruned.get_layer("c1")) is keras.layers.Conv2D
    single = tfprune.prune(lenet(), methods.Magnitude(0.5), layers="fc")
    assert [w.name for w in find_wrappers(single)] == ["fc"]


def test_layers_as_a_callable_gives_per_layer_methods():
    def choose(layer):
        if isinstance(layer, keras.layers.Conv2D):
            return methods.Magnitude(0.5, structure=S.Filter())
        if layer.name == "fc":
            return methods.Magnitude(0.9)
        return None

    pruned = tfprune.prune(lenet(), layers=choose)
    got = {w.name: w.method for w in find_wrappers(pruned)}
    assert set(got) == {"c1", "c2", "fc"}
    assert got["c1"].structure == S.Filter() and got["fc"].sparsity == 0.9
    assert got["c1"] is not got["c2"]


def test_unknown_layer_name_raises_listing_the_layers():
    with pytest.raises(ValueError, match="'nope'") as err:
        tfprune.prune(lenet(), methods.Magnitude(0.5), layers=["fc", "nope"])
    assert "c1" in str(err.value)


def test_unsupported_layer_named_in_layers_raises_naming_it():
    with pytest.raises(ValueError) as err:
        tfprune.prune(lenet(), methods.Magnitude(0.5), layers=["p1"])
    msg = str(err.value)
    assert "'p1'" in msg and "MaxPooling2D" in msg
    assert "supported types" in msg and "Dense" in msg


def test_a_callable_layers_is_consulted_only_for_supported_layers():
    seen = []

    def choose(layer):
        seen.append(type(layer).__name__)
        return methods.Magnitude(0.5)

    pruned = tfprune.prune(lenet(), layers=choose)
    assert set(seen) == {"Conv2D", "Dense"}
    assert {w.name for w in find_wrappers(pruned)} == {"c1", "c2", "fc", "out"}


def test_method_and_callable_layers_together_raise():
    with pytest.raises(ValueError, match="either `method` or a callable `layers`"):
        tfprune.prune(lenet(), methods.Magnitude(0.5), layers=lambda layer: None)


def test_unbuilt_model_raises():
    model = keras.Sequential([keras.layers.Dense(4), keras.layers.Dense(2)], name="lazy")
    with pytest.raises(ValueError, match="'lazy' is not built"):
        tfprune.prune(model, methods.Magnitude(0.5))


class Subclassed(keras.Model):
    def __init__(self, method=None, **kwargs):
        super().__init__(**kwargs)
        d1, d2 = keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)
        if method is not None:  # the documented way: wrap the layers directly
            d1, d2 = tfprune.PruneWrapper(d1, method), tfprune.PruneWrapper(d2, method)
        self.d1, self.d2 = d1, d2

    def call(self, x, training=None):
        return self.d2(self.d1(x, training=training), training=training)


def test_subclassed_model_raises_pointing_to_prune_wrapper():
    model = Subclassed(name="sub")
    model(np.zeros((1, 8), "float32"))
    with pytest.raises(ValueError, match="PruneWrapper") as err:
        tfprune.prune(model, methods.Magnitude(0.5))
    assert "'sub'" in str(err.value) and "subclassed" in str(err.value)


def test_subclassed_model_with_wrapped_layers_trains_with_the_callback():
    model = Subclassed(methods.Magnitude(0.75), name="sub")
    model(np.zeros((1, 8), "float32"))
    compile_sgd(model)
    x, y = random_data((8,), n=32)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[tfprune.callbacks.Pruning()])
    for w in (model.d1, model.d2):
        assert (w.method.final_masks(w)["kernel"] == 0).mean() == 0.75
        assert int(_np(w.step)) == 8
    report = tfprune.sparsity_report(model)
    assert report.total["params"] == 8 * 16 + 16 + 16 * 3 + 3
    assert report.total["nonzero"] == sum(
        np.count_nonzero(v) for w in (model.d1, model.d2) for v in w.masked_weights())
    assert [r["nonzero"] - np.count_nonzero(_np(w.layer.bias)) for r, w in
            zip(report.rows, (model.d1, model.d2))] == [32, 12]  # kernels kept at 25%
    plain = tfprune.strip(model.d1)
    assert type(plain) is keras.layers.Dense
    assert (_np(plain.kernel) == 0).mean() == 0.75
    # The whole model cannot be rebuilt; the error says how to strip its layers instead.
    with pytest.raises(ValueError, match=r"tfprune\.strip\(wrapper\)"):
        tfprune.strip(model)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_raise_naming_the_layer(bad):
    model = mlp()
    kernel = _np(model.get_layer("d2").kernel).copy()
    kernel[0, 0] = bad
    model.get_layer("d2").kernel.assign(kernel)
    with pytest.raises(ValueError, match="'d2'.*non-finite"):
        tfprune.prune(model, methods.Magnitude(0.5))


def test_prune_rejects_a_missing_method_a_pruned_model_and_non_models():
    with pytest.raises(ValueError, match="`method`"):
        tfprune.prune(mlp())
    pruned = tfprune.prune(mlp(), methods.Magnitude(0.5))
    with pytest.raises(ValueError, match="already pruned"):
        tfprune.prune(pruned, methods.Magnitude(0.5))
    with pytest.raises(TypeError, match="keras.Model"):
        tfprune.prune(keras.layers.Dense(3), methods.Magnitude(0.5))
    with pytest.raises(TypeError, match="`method`"):
        tfprune.prune(mlp(), 0.5)


def test_filter_with_default_layers_leaves_the_output_layer_dense():
    for model, out in ((lenet(), "out"), (_functional(), "out"), (_nested(), "out")):
        pruned = tfprune.prune(model, methods.Magnitude(0.5, structure=S.Filter()))
        names = {w.name for w in find_wrappers(pruned)}
        assert out not in names and names
    # ... but unstructured pruning does prune it; naming it with Filter raises (it would drop
    # classes).
    assert "out" in {w.name for w in find_wrappers(
        tfprune.prune(lenet(), methods.Magnitude(0.5)))}
    with pytest.raises(ValueError, match="'out', whose units reach a model output"):
        tfprune.prune(lenet(), methods.Magnitude(0.5, structure=S.Filter()), layers=["out"])


def test_filter_leaves_dense_the_output_layer_of_a_nested_output_model():
    inner = keras.Sequential([keras.Input((8,)), keras.layers.Dense(6, name="h"),
                              keras.layers.Dense(3, name="last")], name="inner")
    inp = keras.Input((8,))
    model = keras.Model(inp, inner(inp))
    pruned = tfprune.prune(model, methods.Magnitude(0.5, structure=S.Filter()))
    assert {w.name for w in find_wrappers(pruned)} == {"h"}


# -- strip -------------------------------------------------------------------------


def _trained_pruned(kind, method, steps=2):
    model = MODELS[kind]()
    pruned = compile_sgd(tfprune.prune(model, method))
    x, y = random_data(INPUTS[kind], n=8 * steps)
    pruned.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[tfprune.callbacks.Pruning()])
    return model, pruned, x


@pytest.mark.parametrize("structure", [S.Unstructured(), S.Filter(), S.Block((4, 1))],
                         ids=repr)
@pytest.mark.parametrize("kind", list(MODELS))
def test_strip_gives_plain_layers_same_names_exact_zeros_equal_outputs(kind, structure):
    model, pruned, x = _trained_pruned(kind, methods.Magnitude(0.5, structure=structure))
    plain = tfprune.strip(pruned)
    assert not find_wrappers(plain)
    assert type(plain) is type(model)
    plain_layers = {layer.name: layer for layer in _all_layers(plain)}
    orig_layers = {layer.name: layer for layer in _all_layers(model)}
    assert {n: type(layer) for n, layer in plain_layers.items()} == {
        n: type(layer) for n, layer in orig_layers.items()}
    for w in find_wrappers(pruned):
        stripped = plain_layers[w.name]
        for name, mask in w.method.final_masks(w).items():
            value = _np(getattr(stripped, name))
            assert np.all(value[mask == 0] == 0)
            np.testing.assert_array_equal(value, _np(getattr(w.layer, name)) * mask)
    np.testing.assert_allclose(_np(plain(x)), _np(pruned(x, training=False)), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(_np(plain.predict(x, verbose=0)),
                               _np(pruned.predict(x, verbose=0)), rtol=1e-5, atol=1e-5)
    # The pruned model is left as it was.
    assert find_wrappers(pruned)


def _all_layers(model):
    """Every layer but the inputs (Keras renames the inputs of cloned nested models)."""
    for layer in model.layers:
        if not isinstance(layer, keras.layers.InputLayer):
            yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def test_stripped_model_saves_and_loads_without_tfprune_objects(tmp_path):
    _, pruned, x = _trained_pruned("lenet", methods.Magnitude(0.5, structure=S.Filter()))
    plain = tfprune.strip(pruned)
    plain.save(tmp_path / "plain.keras")
    config = (tmp_path / "plain.keras").read_bytes()
    assert b"tfprune" not in config
    loaded = keras.models.load_model(tmp_path / "plain.keras")
    np.testing.assert_allclose(_np(loaded(x)), _np(plain(x)), rtol=1e-6)


def test_strip_of_an_unpruned_model_is_an_equal_copy():
    model = lenet()
    plain = tfprune.strip(model)
    x, _ = random_data((12, 12, 1), n=2)
    assert plain is not model
    np.testing.assert_allclose(_np(plain(x)), _np(model(x)), rtol=1e-6)
