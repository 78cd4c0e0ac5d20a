"""export_tflite / run_tflite: input pairing, shape checks, mixed precision, subclassed models,
calibration data checks (issue 10, items 2, 3, 8, 9 and 10)."""

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from tfprune.export import export_tflite, run_tflite

L = keras.layers


def _two_inputs(shape_b=(4,)):
    """Two inputs "a" and "b" used asymmetrically, so that swapping them changes the output."""
    keras.utils.set_random_seed(0)
    a, b = keras.Input((4,), name="a"), keras.Input(shape_b, name="b")
    h = L.Concatenate()([L.Dense(5, name="da")(a), L.Dense(3, name="db")(b * 3.0)])
    model = keras.Model([a, b], L.Dense(2, name="head")(h))
    rng = np.random.default_rng(0)
    xs = [rng.random((6, 4), dtype=np.float32), rng.random((6, *shape_b), dtype=np.float32)]
    return model, xs


def _tflite_input_names(blob):
    return [d["name"] for d in Interpreter(model_content=blob).get_input_details()]


# -- item 2: multi-input models --------------------------------------------------------------


def test_same_shaped_inputs_are_paired_by_name_not_tflite_order():
    model, xs = _two_inputs()
    blob = export_tflite(model)
    # The precondition of the bug: LiteRT lists the inputs in another order than Keras.
    assert _tflite_input_names(blob) == ["serving_default_b:0", "serving_default_a:0"]
    ref = np.asarray(model(xs))
    swapped = np.asarray(model(xs[::-1]))
    assert np.abs(ref - swapped).max() > 0.1  # swapping the inputs would be visible
    np.testing.assert_allclose(run_tflite(blob, xs), ref, atol=1e-5)  # list: Keras order
    np.testing.assert_allclose(run_tflite(blob, tuple(xs)), ref, atol=1e-5)
    np.testing.assert_allclose(run_tflite(blob, {"b": xs[1], "a": xs[0]}), ref, atol=1e-5)


def test_different_shaped_inputs_run():
    model, xs = _two_inputs(shape_b=(7,))
    blob = export_tflite(model)
    np.testing.assert_allclose(run_tflite(blob, xs), model(xs), atol=1e-5)


def test_int8_calibration_with_a_list_of_arrays_pairs_inputs_by_name():
    model, xs = _two_inputs(shape_b=(7,))
    # "b" ranges over [0, 30], "a" over [0, 1]: swapped calibration ranges would clip "b".
    xs[1] = xs[1] * 10.0
    blob = export_tflite(model, quantize="int8", representative_data=xs)
    ref = np.asarray(model(xs))
    step = (ref.max() - min(ref.min(), 0.0)) / 255
    assert np.abs(run_tflite(blob, xs) - ref).max() <= 4 * step
    # Same with an iterable of (dict, y) batches.
    batches = [({"b": xs[1][i : i + 2], "a": xs[0][i : i + 2]}, None) for i in range(0, 6, 2)]
    blob = export_tflite(model, quantize="int8", representative_data=batches)
    assert np.abs(run_tflite(blob, xs) - ref).max() <= 4 * step


def test_int8_same_shaped_inputs_match_keras():
    model, xs = _two_inputs()
    xs[1] = xs[1] * 10.0
    blob = export_tflite(model, quantize="int8", representative_data=xs, int8_io=True)
    ref = np.asarray(model(xs))
    scale = Interpreter(model_content=blob).get_output_details()[0]["quantization"][0]
    assert np.abs(run_tflite(blob, xs) - ref).max() <= 4 * scale


def test_foreign_multi_input_model_needs_names():
    import tensorflow as tf

    model, xs = _two_inputs()
    blob = tf.lite.TFLiteConverter.from_keras_model(model).convert()  # no recorded order
    with pytest.raises(ValueError, match=r"order is unknown.*\['a', 'b'\]"):
        run_tflite(blob, xs)
    np.testing.assert_allclose(run_tflite(blob, {"a": xs[0], "b": xs[1]}), model(xs), atol=1e-5)


def test_bad_input_names_are_errors():
    model, xs = _two_inputs()
    blob = export_tflite(model)
    with pytest.raises(ValueError, match=r"missing \['b'\], unknown \['c'\]"):
        run_tflite(blob, {"a": xs[0], "c": xs[1]})
    with pytest.raises(ValueError, match=r"missing \['b'\], unknown \['c'\]"):
        export_tflite(model, quantize="int8", representative_data={"a": xs[0], "c": xs[1]})


# -- item 3: shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 7), (3, 24), (3, 12, 1), (12,)])
def test_wrong_per_sample_shape_is_an_error(shape):
    model = keras.Sequential([keras.Input((12,)), L.Dense(3)])
    blob = export_tflite(model)
    with pytest.raises(ValueError, match=r"samples of shape \(12,\).*got an array of shape") as e:
        run_tflite(blob, np.zeros(shape, "float32"))
    assert str(shape) in str(e.value)


def test_wrong_shape_of_one_input_names_it():
    model, xs = _two_inputs(shape_b=(7,))
    blob = export_tflite(model)
    with pytest.raises(ValueError, match=r"input 'b' takes samples of shape \(7,\).*\(6, 4\)"):
        run_tflite(blob, [xs[0], xs[0]])


def test_fixed_batch_size_runs_in_chunks_or_raises():
    inputs = keras.Input((3,), batch_size=2)
    model = keras.Model(inputs, L.Dense(2)(inputs))
    x = np.random.default_rng(0).random((6, 3), dtype=np.float32)
    blob = export_tflite(model)
    np.testing.assert_allclose(run_tflite(blob, x), model(x), atol=1e-5)
    with pytest.raises(ValueError, match="fixed batch size of 2; got a batch of 5"):
        run_tflite(blob, x[:5])


def test_empty_batch_is_an_error():
    blob = export_tflite(keras.Sequential([keras.Input((4,)), L.Dense(2)]))
    with pytest.raises(ValueError, match="no samples"):
        run_tflite(blob, np.zeros((0, 4), "float32"))


# -- item 8: mixed precision ---------------------------------------------------------------------


def _mixed_model():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6, 6, 2))
        h = L.Conv2D(4, 3, activation="relu")(inputs)
        h = L.BatchNormalization()(h)
        h = L.Dense(3)(L.Flatten()(h))
        model = keras.Model(inputs, L.Activation("linear", dtype="float32")(h))
    finally:
        keras.config.set_dtype_policy(previous)
    return model


def test_mixed_precision_model_exports_in_float32():
    model = _mixed_model()
    assert model.layers[1].compute_dtype == "float16"
    x = np.random.default_rng(0).random((4, 6, 6, 2), dtype=np.float32)
    blob = export_tflite(model)
    assert keras.config.dtype_policy().name == "float32"  # global policy left as it was
    ref = np.asarray(model(x))
    # The float16 Keras model is the approximation here; the export computes in float32.
    np.testing.assert_allclose(run_tflite(blob, x), ref, atol=1e-2 * np.abs(ref).max())
    y8 = run_tflite(export_tflite(model, quantize="int8", representative_data=x), x)
    np.testing.assert_allclose(y8, ref, atol=5e-2 * np.abs(ref).max())


def test_mixed_precision_export_under_the_mixed_global_policy():
    model = _mixed_model()
    x = np.random.default_rng(1).random((2, 6, 6, 2), dtype=np.float32)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        blob = export_tflite(model)
        assert keras.config.dtype_policy().name == "mixed_float16"
    finally:
        keras.config.set_dtype_policy("float32")
    ref = np.asarray(model(x))
    np.testing.assert_allclose(run_tflite(blob, x), ref, atol=1e-2 * np.abs(ref).max())


# -- item 9: subclassed models -------------------------------------------------------------------


class TwoBranch(keras.Model):
    def __init__(self):
        super().__init__()
        self.da = L.Dense(4)
        self.db = L.Dense(4)
        self.drop = L.Dropout(0.5)

    def call(self, inputs, training=None):
        a, b = inputs
        return self.drop(self.da(a), training=training) - 2.0 * self.db(b)


class OneInput(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = L.Dense(3)

    def call(self, x):
        return self.dense(x)


def test_subclassed_model_exports_and_matches_keras():
    keras.utils.set_random_seed(0)
    model = OneInput()
    x = np.random.default_rng(0).random((5, 6), dtype=np.float32)
    model(x[:1])
    blob = export_tflite(model)
    np.testing.assert_allclose(run_tflite(blob, x), model(x), atol=1e-5)
    blob = export_tflite(model, quantize="int8", representative_data=x)
    np.testing.assert_allclose(run_tflite(blob, x), model(x), atol=0.05)


def test_subclassed_two_input_model_in_call_order():
    keras.utils.set_random_seed(0)
    model = TwoBranch()
    rng = np.random.default_rng(0)
    xs = [rng.random((5, 3), dtype=np.float32), rng.random((5, 3), dtype=np.float32)]
    model([x[:1] for x in xs])
    blob = export_tflite(model)
    ref = np.asarray(model(xs, training=False))
    np.testing.assert_allclose(run_tflite(blob, xs), ref, atol=1e-5)  # inference: no dropout
    np.testing.assert_allclose(
        run_tflite(blob, {"input_0": xs[0], "input_1": xs[1]}), ref, atol=1e-5
    )


def test_unbuilt_subclassed_model_is_a_clear_error():
    with pytest.raises(ValueError, match="build it first"):
        export_tflite(OneInput())


# -- item 10: calibration data -------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_calibration_data_is_an_error(bad):
    model = keras.Sequential([keras.Input((6,)), L.Dense(4, activation="relu"), L.Dense(2)])
    x = np.random.default_rng(0).random((8, 6), dtype=np.float32)
    x[5, 2] = bad
    with pytest.raises(ValueError, match=r"NaN or infinite.*sample 5"):
        export_tflite(model, quantize="int8", representative_data=x)
    with pytest.raises(ValueError, match=r"NaN or infinite"):
        export_tflite(model, quantize="int8", representative_data=lambda: iter([x[:4], x[4:]]))


def test_int8_export_that_falls_back_to_float_is_an_error(monkeypatch):
    import tfprune.export.calibration as calibration
    import tfprune.export.converter as converter

    model = keras.Sequential([keras.Input((6,)), L.Dense(4, activation="relu"), L.Dense(2)])
    x = np.random.default_rng(0).random((8, 6), dtype=np.float32)
    float_blob = export_tflite(model)
    with pytest.raises(ValueError, match="no int8 activations"):
        calibration._check_int8(float_blob, model.name)
    calibration._check_int8(
        export_tflite(model, quantize="int8", representative_data=x), model.name
    )

    # All-NaN calibration data makes the converter fall back to float without a word: even
    # when the finiteness check is bypassed, export_tflite must not return that model.
    def no_check(data, names):
        for i in range(len(data)):
            yield [np.asarray(data[i : i + 1], np.float32)]

    monkeypatch.setattr(converter, "_representative_samples", no_check)
    with pytest.raises(ValueError, match="no int8 activations"):
        export_tflite(model, quantize="int8", representative_data=np.full((4, 6), np.nan))
