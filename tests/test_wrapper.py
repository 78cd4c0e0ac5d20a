"""PruneWrapper: a Keras layer test for each supported layer, serialization, errors."""

import tempfile
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import LAYER_CASES, LAYER_IDS, compile_sgd, layer_model, random_data

import tfprune
from tfprune import methods, schedules
from tfprune import structures as S
from tfprune.wrapper import PruneWrapper, find_wrappers

METHOD = methods.Magnitude(schedule=schedules.PolynomialDecay(0.0, 0.5, 0, 4, frequency=2),
                           structure=S.Filter())


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_symbolic_call_gives_the_layer_output_shape(case):
    _, factory, shape = case
    plain = factory()
    expected = plain(keras.Input(shape, batch_size=2)).shape
    wrapper = PruneWrapper(factory(), METHOD)
    out = wrapper(keras.Input(shape, batch_size=2))
    assert tuple(out.shape) == tuple(expected)
    assert wrapper.name == "pl"
    assert tuple(wrapper.compute_output_shape((2, *shape))) == tuple(expected)


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_eager_call_equals_the_layer_until_pruned_then_uses_the_masked_kernel(case):
    _, factory, shape = case
    x, _ = random_data(shape, n=3)
    wrapper = PruneWrapper(factory(), methods.Magnitude(0.5))
    wrapper.build((None, *shape))
    y = _np(wrapper(x))
    np.testing.assert_allclose(y, _np(wrapper.layer(x)), rtol=1e-6, atol=1e-6)
    wrapper.method.update(wrapper, 0)
    plain = tfprune.strip(wrapper)
    assert type(plain) is type(wrapper.layer) and plain.name == "pl"
    y = _np(wrapper(x))
    np.testing.assert_allclose(y, _np(plain(x)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(y, _np(wrapper.layer(x)), atol=1e-4)
    # Masks and step are non-trainable variables of the wrapper; the trainable ones are the
    # layer's own.
    assert {id(v) for v in wrapper.trainable_variables} == {
        id(v) for v in wrapper.layer.trainable_variables}
    names = {v.path.split("/")[-1] for v in wrapper.non_trainable_variables}
    assert "pruning_step" in names and any(n.endswith("_mask") for n in names)


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_call_inside_tf_function_matches_eager(case):
    import tensorflow as tf

    _, factory, shape = case
    x, _ = random_data(shape, n=2)
    wrapper = PruneWrapper(factory(), methods.Magnitude(0.5, structure=S.Kernel()))
    wrapper.build((None, *shape))
    wrapper.method.update(wrapper, 0)
    np.testing.assert_allclose(_np(tf.function(wrapper)(x)), _np(wrapper(x)), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_get_config_from_config_round_trips(case):
    _, factory, shape = case
    wrapper = PruneWrapper(factory(), METHOD)
    config = wrapper.get_config()
    restored = PruneWrapper.from_config(config)
    assert restored.get_config() == config
    assert restored.name == wrapper.name
    assert type(restored.layer) is type(wrapper.layer)
    assert restored.method.get_config() == METHOD.get_config()
    # The wrapper keeps the (stateless) method it was given; from_config builds a new one.
    assert wrapper.method is METHOD and restored.method is not METHOD
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(wrapper))
    assert isinstance(again, PruneWrapper) and again.get_config() == config
    out = restored(keras.Input(shape, batch_size=2))
    assert tuple(out.shape) == tuple(wrapper(keras.Input(shape, batch_size=2)).shape)


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_keras_file_round_trip_restores_outputs_masks_and_step(case, tmp_path):
    name, factory, shape = case
    model = layer_model(factory, shape)
    # A depthwise layer reading the model input has no unit shrink could remove (its
    # channels are the input's): Filter raises there, a weight-level structure works.
    method = (methods.Magnitude(0.5, structure=S.Kernel())
              if name.startswith("depthwise") else METHOD)
    pruned = compile_sgd(tfprune.prune(model, method, layers=["pl"]))
    x, y = random_data(shape, n=12)
    pruned.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[tfprune.callbacks.Pruning()])
    path = tmp_path / "m.keras"
    pruned.save(path)
    loaded = keras.models.load_model(path)
    w0, w1 = pruned.get_layer("pl"), loaded.get_layer("pl")
    assert isinstance(w1, PruneWrapper) and type(w1.layer) is type(w0.layer)
    assert int(_np(w1.step)) == int(_np(w0.step)) == 3
    m0, m1 = w0.method.final_masks(w0), w1.method.final_masks(w1)
    assert m0.keys() == m1.keys()
    for name in m0:
        np.testing.assert_array_equal(m0[name], m1[name])
    assert 0 < (m1[w0.handler.unit_spec().name] == 0).mean() < 1
    assert w1.method.get_config() == w0.method.get_config()
    np.testing.assert_array_equal(_np(loaded(x)), _np(pruned(x)))


def test_training_without_the_callback_raises_a_clear_runtime_error():
    model = layer_model(*LAYER_CASES[0][1:])
    pruned = compile_sgd(tfprune.prune(model, methods.Magnitude(0.5)))
    x, y = random_data((8,), n=8)
    with pytest.raises(RuntimeError, match=r"tfprune\.callbacks\.Pruning\(\)") as err:
        pruned.fit(x, y, epochs=1, verbose=0)
    assert "'pl'" in str(err.value)
    wrapper = pruned.get_layer("pl")
    with pytest.raises(RuntimeError, match="without"):
        wrapper(x, training=True)
    # Inference needs no callback.
    assert _np(pruned.predict(x, verbose=0)).shape == (8, 3)
    assert _np(wrapper(x, training=False)).shape == (8, 6)


def test_training_calls_advance_the_step_and_inference_calls_do_not():
    wrapper = PruneWrapper(keras.layers.Dense(3), methods.Magnitude(0.5))
    x = np.ones((2, 4), "float32")
    wrapper(x)
    wrapper._callback_attached = True
    for _ in range(3):
        wrapper(x, training=True)
    wrapper(x, training=False)
    assert int(_np(wrapper.step)) == 3


@pytest.mark.parametrize("layer", [
    keras.layers.LSTM(3, name="rnn"), keras.layers.Embedding(10, 3, name="rnn"),
    keras.layers.BatchNormalization(name="rnn"),
], ids=lambda layer: type(layer).__name__)
def test_unsupported_layer_type_raises_naming_the_layer_and_the_allowed_types(layer):
    with pytest.raises(ValueError) as err:
        PruneWrapper(layer, methods.Magnitude(0.5))
    msg = str(err.value)
    assert "'rnn'" in msg and type(layer).__name__ in msg and "Conv2D" in msg and "Dense" in msg


def test_wrapping_a_wrapper_or_a_non_layer_raises():
    inner = PruneWrapper(keras.layers.Dense(2), methods.Magnitude(0.5))
    with pytest.raises(ValueError, match="already wrapped"):
        PruneWrapper(inner, methods.Magnitude(0.5))
    with pytest.raises(TypeError, match="`layer`"):
        PruneWrapper("dense", methods.Magnitude(0.5))
    with pytest.raises(TypeError, match="`method`"):
        PruneWrapper(keras.layers.Dense(2), 0.5)


SHARED_METHODS = {
    "magnitude": lambda: methods.Magnitude(0.5, structure=S.Filter()),
    "magnitude_schedule": lambda: methods.Magnitude(
        schedule=schedules.PolynomialDecay(0.0, 0.5, 0, 4, frequency=2)),
    "dpp": lambda: methods.DPP(1, 2, structure=S.Filter(), anneal_steps=4, quantize=8),
    "turbo_vbi": lambda: methods.TurboVBI(num_train_examples=16, structure=S.Filter(),
                                          unit_sparsity=0.5, update_every=1),
    "taylor": lambda: methods.Taylor(0.5, min_steps=1),
}


@pytest.mark.parametrize("name", sorted(SHARED_METHODS))
def test_one_method_instance_drives_many_layers_and_holds_no_layer_state(name):
    """A method is hyperparameters only: two wrappers share one instance, each keeps its own
    state in ``wrapper.state``, and building and training them leaves the method unchanged."""
    method = SHARED_METHODS[name]()
    before, config = dict(vars(method)), method.get_config()
    keras.utils.set_random_seed(0)
    a = PruneWrapper(keras.layers.Dense(6, activation="relu", name="a"), method)
    b = PruneWrapper(keras.layers.Dense(4, activation="relu", name="b"), method)
    assert a.method is method and b.method is method
    model = keras.Sequential([keras.Input((3,)), a, b, keras.layers.Dense(2)])
    compile_sgd(model)
    x, y = random_data((3,), n=16, classes=2)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[tfprune.callbacks.Pruning()])
    assert vars(method).keys() == before.keys()
    assert all(vars(method)[key] is value for key, value in before.items())
    assert method.get_config() == config
    # Each layer has its own state, by name, with its own shapes.
    assert a.state is not b.state
    assert a.state.names() == b.state.names() and a.state.names()
    for key, var in a.state.items():
        assert var is not b.state[key]
        assert any(var is w for w in a.weights)
    assert any(tuple(var.shape) != tuple(b.state[key].shape) for key, var in a.state.items())
    # The masks are the layers' own.
    assert method.final_masks(a)["kernel"].shape == (3, 6)
    assert method.final_masks(b)["kernel"].shape == (6, 4)


def test_layer_state_is_tracked_by_checkpoints():
    """``tf.train.Checkpoint`` finds the state variables through ``wrapper.state``."""
    import tensorflow as tf

    def build():
        w = PruneWrapper(keras.layers.Dense(4, name="d"),
                         methods.Magnitude(0.5, structure=S.Filter()))
        w(np.ones((1, 3), "float32"))
        return w

    src, dst = build(), build()
    src.state["kernel_mask"].assign(np.tile([[1.0, 0.0, 1.0, 0.0]], (3, 1)).astype("float32"))
    src.state["bias_mask"].assign(np.array([1.0, 0.0, 1.0, 0.0], "float32"))
    path = tf.train.Checkpoint(layer=src).write(str(Path(tempfile.mkdtemp()) / "ckpt"))
    tf.train.Checkpoint(layer=dst).read(path).assert_existing_objects_matched()
    for key in ("kernel_mask", "bias_mask"):
        np.testing.assert_array_equal(_np(dst.state[key]), _np(src.state[key]))


def test_layer_state_names_are_unique_and_lookups_name_the_known_ones():
    w = PruneWrapper(keras.layers.Dense(2, name="d"), methods.Magnitude(0.5))
    w(np.ones((1, 3), "float32"))
    with pytest.raises(KeyError, match="no state variable 'kernel_logits'.*kernel_mask"):
        w.state["kernel_logits"]
    with pytest.raises(ValueError, match="layer 'd' already has a state variable 'kernel_mask'"):
        w.method.add_state(w, "kernel_mask", (3, 2))


def test_find_wrappers_descends_into_nested_models():
    inner = keras.Sequential([keras.Input((4,)), PruneWrapper(keras.layers.Dense(3, name="i"),
                                                              methods.Magnitude(0.5))],
                             name="inner")
    outer = keras.Sequential([keras.Input((4,)), inner,
                              PruneWrapper(keras.layers.Dense(2, name="o"),
                                           methods.Magnitude(0.5))])
    assert [w.name for w in find_wrappers(outer)] == ["i", "o"]
