import warnings

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from tfprune.export import (
    QuantizedArray,
    benchmark_tflite,
    export_tflite,
    run_tflite,
    tflite_size,
    tflite_weights,
)

L = keras.layers

# name -> (input shape without batch, layer factory); tiny so that the file stays fast.
LAYERS = {
    "Dense": ((12,), lambda: L.Dense(6)),
    "Conv1D": ((10, 4), lambda: L.Conv1D(6, 3)),
    "Conv2D": ((6, 6, 3), lambda: L.Conv2D(5, 3)),
    "Conv3D": ((4, 4, 4, 2), lambda: L.Conv3D(3, 3)),
    "DepthwiseConv2D": ((6, 6, 3), lambda: L.DepthwiseConv2D(3, depth_multiplier=2)),
    "SeparableConv2D": ((6, 6, 3), lambda: L.SeparableConv2D(5, 3)),
    "Conv2DTranspose": ((4, 4, 3), lambda: L.Conv2DTranspose(4, 3, strides=2)),
}


def _model(name, sparsity=0.0, seed=0):
    """A one-layer Functional model with random kernels (``sparsity`` of them zeroed) and biases."""
    rng = np.random.default_rng(seed)
    shape, factory = LAYERS[name]
    inputs = keras.Input(shape)
    layer = factory()
    model = keras.Model(inputs, layer(inputs), name=f"tiny_{name}")
    for w in layer.weights:
        value = rng.normal(0.0, 0.5, w.shape).astype("float32")
        if w.path.endswith("kernel") and sparsity:
            value *= rng.random(w.shape) >= sparsity
        w.assign(value)
    x = rng.random((8, *shape), dtype=np.float32)
    return model, x


def _block_sparse_dense(fan_in=128, units=64, sparsity=0.9, seed=1):
    """Dense -> Dense; the first kernel has Block((4, 1)) zero blocks (4 inputs of one unit)."""
    rng = np.random.default_rng(seed)
    inputs = keras.Input((fan_in,))
    hidden = L.Dense(units, activation="relu", name="sparse")(inputs)
    model = keras.Model(inputs, L.Dense(10, name="head")(hidden))
    kernel = model.get_layer("sparse").kernel
    mask = np.repeat(rng.random((fan_in // 4, units)) >= sparsity, 4, axis=0)
    kernel.assign(kernel.numpy() * mask)
    x = rng.random((16, fan_in), dtype=np.float32)
    return model, x, mask


def _output_scale(blob):
    return Interpreter(model_content=blob).get_output_details()[0]["quantization"][0]


def _kernel(weights, shape):
    (value,) = [v for v in weights.values() if v.shape == shape]
    return value


# -- parity with Keras ---------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.8])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_float32_matches_keras(name, sparsity):
    model, x = _model(name, sparsity)
    y = run_tflite(export_tflite(model), x)
    np.testing.assert_allclose(y, model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_dynamic_and_float16_close_to_keras(name):
    model, x = _model(name, 0.5)
    ref = np.asarray(model(x))
    scale = np.abs(ref).max()
    y16 = run_tflite(export_tflite(model, quantize="float16"), x)
    np.testing.assert_allclose(y16, ref, atol=2e-3 * scale, rtol=0)
    ydyn = run_tflite(export_tflite(model, quantize="dynamic"), x)
    np.testing.assert_allclose(ydyn, ref, atol=3e-2 * scale, rtol=0)


@pytest.mark.parametrize("int8_io", [False, True])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_int8_within_a_few_output_steps(name, int8_io):
    model, x = _model(name, 0.5)
    blob = export_tflite(model, quantize="int8", representative_data=x, int8_io=int8_io)
    y = run_tflite(blob, x)
    assert y.dtype == np.float32
    ref = np.asarray(model(x))
    # Output step: the output tensor's scale with int8 I/O; else the calibrated range / 255.
    step = _output_scale(blob) if int8_io else (ref.max() - min(ref.min(), 0.0)) / 255
    assert np.abs(y - ref).max() <= 3 * step + 1e-6


# -- sparsity ------------------------------------------------------------------------------------


def test_block_sparse_dense_exports_smaller_and_matches_keras():
    model, x, mask = _block_sparse_dense()
    dense_blob = export_tflite(model, sparse=False)
    sparse_blob = export_tflite(model)  # "auto" picks the sparse encoding for float32
    assert len(sparse_blob) < 0.4 * len(dense_blob)
    assert tflite_size(sparse_blob)["bytes"] == len(sparse_blob)
    ref = np.asarray(model(x))
    np.testing.assert_allclose(run_tflite(sparse_blob, x), ref, atol=1e-5, rtol=0)
    # The flatbuffer holds the exact kernel, zeros where they were ([units, fan_in] layout).
    kernel = _kernel(tflite_weights(sparse_blob), (64, 128))
    np.testing.assert_array_equal(kernel, model.get_layer("sparse").kernel.numpy().T)
    np.testing.assert_array_equal(kernel != 0, mask.T)


@pytest.mark.parametrize("quantize", ["dynamic", "float16", "int8"])
def test_auto_sparse_keeps_quantized_models_runnable_with_default_delegate(quantize):
    # Measured: with the sparse encoding, XNNPACK refuses dynamic/int8 FULLY_CONNECTED
    # and float16 Block((4, 1)) gives NaN. "auto" must not encode sparsity there.
    model, x, mask = _block_sparse_dense()
    blob = export_tflite(model, quantize=quantize, representative_data=x)
    interpreter = Interpreter(model_content=blob)
    interpreter.allocate_tensors()  # raises if the delegate refuses a node
    y = run_tflite(blob, x)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, model(x), atol=0.05, rtol=0)
    kernel = _kernel(tflite_weights(blob), (64, 128))
    assert not np.any((kernel != 0) & ~mask.T)  # pruned weights stay exactly zero


def test_int8_forced_sparse_warns_smaller_and_still_matches():
    model, x, mask = _block_sparse_dense()
    plain = export_tflite(model, quantize="int8", representative_data=x)
    with pytest.warns(UserWarning, match="XNNPACK"):
        sparse = export_tflite(model, quantize="int8", representative_data=x, sparse=True)
    assert len(sparse) < len(plain)
    ref = np.asarray(model(x))
    step = (ref.max() - min(ref.min(), 0.0)) / 255
    y_sparse, y_plain = run_tflite(sparse, x), run_tflite(plain, x)
    assert np.abs(y_sparse - ref).max() <= 3 * step
    # Builtin kernels (sparse) and XNNPACK (plain) may round one output step apart.
    assert np.abs(y_sparse - y_plain).max() <= 1.01 * step
    kernel = _kernel(tflite_weights(sparse), (64, 128))
    assert isinstance(kernel, QuantizedArray) and kernel.dtype == np.int8
    assert not np.any((kernel != 0) & ~mask.T)
    original = model.get_layer("sparse").kernel.numpy().T
    step = kernel.scale.max()
    assert np.abs(kernel.dequantize() - original).max() <= step / 2 + 1e-7
    deq = _kernel(tflite_weights(sparse, dequantize=True), (64, 128))
    assert deq.dtype == np.float32


def test_auto_skips_sparse_encoding_for_whole_dead_units_and_says_to_shrink():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((32,)), keras.layers.Dense(64, name="hidden"), keras.layers.Dense(4)]
    )
    kernel = model.get_layer("hidden").kernel.numpy()
    kernel[:, 16:] = 0.0  # 75% of the units dead: a job for shrink, not the sparse encoding
    model.get_layer("hidden").kernel.assign(kernel)
    with pytest.warns(UserWarning, match="shrink"):
        blob = export_tflite(model)
    assert blob == export_tflite(model, sparse=False)


def test_dense_model_auto_does_not_change_encoding():
    model, _ = _model("Dense")
    assert export_tflite(model) == export_tflite(model, sparse=False)


# -- run_tflite / benchmark / files ----------------------------------------------------------------


def test_multi_input_multi_output_order_and_int8_calibration():
    a, b = keras.Input((5,), name="zeta"), keras.Input((3,), name="alpha")
    h = L.Concatenate()([a, b])
    outputs = [L.Dense(i + 1, name=f"out{i}")(h) for i in range(11)]  # output_10 sorts early
    model = keras.Model([a, b], outputs)
    rng = np.random.default_rng(0)
    xs = [rng.random((4, 5), dtype=np.float32), rng.random((4, 3), dtype=np.float32)]
    ys = run_tflite(export_tflite(model), xs)
    assert isinstance(ys, list) and [y.shape[1] for y in ys] == list(range(1, 12))
    for y, ref in zip(ys, model(xs), strict=True):
        np.testing.assert_allclose(y, ref, atol=1e-5)
    blob = export_tflite(model, quantize="int8", representative_data=xs)
    for y, ref in zip(run_tflite(blob, xs), model(xs), strict=True):
        np.testing.assert_allclose(y, ref, atol=0.05)


def test_fixed_batch_model_runs_per_sample():
    inputs = keras.Input((4, 3), batch_size=1)
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(inputs)))
    x = np.random.default_rng(0).random((5, 4, 3), dtype=np.float32)
    np.testing.assert_allclose(run_tflite(export_tflite(model), x), model(x), atol=1e-5)


def test_export_writes_path_and_run_reads_it(tmp_path):
    model, x = _model("Conv2D")
    path = tmp_path / "m.tflite"
    blob = export_tflite(model, path)
    assert path.read_bytes() == blob
    np.testing.assert_allclose(run_tflite(path, x), run_tflite(str(path), x))
    assert tflite_size(path)["gzip_bytes"] < len(blob)


def test_benchmark_reports_latency_and_size():
    model, _ = _model("Dense")
    blob = export_tflite(model, quantize="int8", representative_data=_model("Dense")[1])
    stats = benchmark_tflite(blob, runs=20, warmup=2)
    assert stats["size_bytes"] == len(blob) and stats["runs"] == 20 and stats["threads"] == 1
    assert 0 < stats["min_us"] <= stats["median_us"] <= stats["p90_us"] <= stats["max_us"]
    assert stats["min_us"] <= stats["mean_us"] <= stats["max_us"]


def test_pruned_model_is_stripped_before_export():
    import tfprune
    from tfprune import methods

    model, x = _model("Dense")
    pruned = tfprune.prune(model, methods.Magnitude(0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blob = export_tflite(pruned)
    np.testing.assert_allclose(run_tflite(blob, x), pruned(x, training=False), atol=1e-5)


# -- errors --------------------------------------------------------------------------------------


def test_bad_quantize_names_argument_value_and_choices():
    model, _ = _model("Dense")
    with pytest.raises(ValueError, match=r"`quantize`.*'int4'") as info:
        export_tflite(model, quantize="int4")
    assert "'dynamic'" in str(info.value) and "'float16'" in str(info.value)


def test_int8_without_representative_data_is_an_error():
    model, _ = _model("Dense")
    with pytest.raises(ValueError, match="representative_data"):
        export_tflite(model, quantize="int8")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparse": "yes"}, "`sparse`"),
        ({"quantize": "float16", "sparse": True}, "NaN"),
        ({"quantize": "dynamic", "int8_io": True}, "int8_io"),
    ],
)
def test_bad_option_combinations_are_errors(kwargs, match):
    model, _ = _model("Dense")
    with pytest.raises(ValueError, match=match):
        export_tflite(model, **kwargs)


def test_non_model_and_bad_inputs_are_errors():
    with pytest.raises(TypeError, match="keras.Model"):
        export_tflite(L.Dense(3))
    model, x = _model("Dense")
    blob = export_tflite(model)
    with pytest.raises(ValueError, match="1 input"):
        run_tflite(blob, [x, x])
    with pytest.raises(TypeError, match="bytes or a path"):
        run_tflite(123, x)
    with pytest.raises(ValueError, match="`runs`"):
        benchmark_tflite(blob, runs=0)


def test_empty_representative_data_is_an_error():
    model, _ = _model("Dense")
    with pytest.raises(ValueError, match="no samples"):
        export_tflite(model, quantize="int8", representative_data=np.zeros((0, 12), "float32"))


# -- converter options ---------------------------------------------------------------------------

SELECT_TF_OPS = {
    "target_spec.supported_ops": ["TFLITE_BUILTINS", "SELECT_TF_OPS"],
    "_experimental_lower_tensor_list_ops": False,
}
SINGLE_BATCH = {"_experimental_default_to_single_batch_in_tensor_list_ops": True}


def _recurrent(kind="LSTM"):
    """Input (5 steps x 3) -> LSTM/GRU(4) -> Dense(2): needs TensorList ops (variable batch)."""
    model = keras.Sequential(
        [keras.Input((5, 3)), getattr(L, kind)(4, name="rnn"), L.Dense(2)], name=f"tiny_{kind}"
    )
    x = np.random.default_rng(0).random((6, 5, 3), dtype=np.float32)
    return model, x


def test_recurrent_model_without_options_names_the_op_and_the_options():
    model, _ = _recurrent()
    with pytest.raises(ValueError) as info:
        export_tflite(model)
    message = str(info.value)
    assert "tiny_LSTM" in message and "tf.TensorListReserve" in message
    assert "'target_spec.supported_ops': ['TFLITE_BUILTINS', 'SELECT_TF_OPS']" in message
    assert "_experimental_default_to_single_batch_in_tensor_list_ops" in message


def test_recurrent_model_converts_with_select_tf_ops():
    # ai-edge-litert's Python interpreter has no Flex delegate: the Select TF ops model
    # converts (and holds the Flex ops), but run_tflite cannot run it and says why.
    from tfprune.export.flatbuffer import _flex_ops

    model, x = _recurrent()
    blob = export_tflite(model, converter_options=SELECT_TF_OPS)
    assert any(op.startswith("FlexTensorList") for op in _flex_ops(blob))
    dense = model.layers[-1].kernel.numpy()
    assert any(
        v.shape == dense.T.shape and np.allclose(v, dense.T) for v in tflite_weights(blob).values()
    )
    with pytest.raises(ValueError, match=r"Flex.*FlexTensorList.*no Flex delegate"):
        run_tflite(blob, x)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_recurrent_model_with_single_batch_option_matches_keras(kind):
    model, x = _recurrent(kind)
    blob = export_tflite(model, converter_options=SINGLE_BATCH)
    np.testing.assert_allclose(run_tflite(blob, x), model(x), atol=1e-5, rtol=0)


def test_unsupported_op_error_names_op_and_layer():
    import tensorflow as tf

    inputs = keras.Input((4,))
    outputs = L.Lambda(lambda t: tf.math.digamma(t), name="odd_layer")(inputs)
    model = keras.Model(inputs, outputs, name="odd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no kernel at all: no "dead units" warning either
        with pytest.raises(ValueError, match=r"'odd'.*'tf\.Digamma'.*odd_layer.*SELECT_TF_OPS"):
            export_tflite(model)
    # Digamma is no Select TF op either: the error says so, names the options given, and
    # points to custom ops instead of repeating the advice already followed.
    with pytest.raises(ValueError) as info:
        export_tflite(model, converter_options=SELECT_TF_OPS)
    message = str(info.value)
    assert "converter_options ['_experimental_lower_tensor_list_ops', 'target_spec" in message
    assert "not in the Select TF ops set" in message and "'allow_custom_ops': True" in message


def test_unknown_converter_option_lists_allowed_names():
    model, _ = _model("Dense")
    with pytest.raises(ValueError) as info:
        export_tflite(model, converter_options={"target_spec.supported_op": ["SELECT_TF_OPS"]})
    message = str(info.value)
    assert "unknown converter option 'target_spec.supported_op'" in message
    assert "did you mean ['target_spec.supported_ops'" in message
    for allowed in (
        "'allow_custom_ops'",
        "'_experimental_lower_tensor_list_ops'",
        "'target_spec.supported_types'",
    ):
        assert allowed in message
    assert "'optimizations'" not in message.split("allowed:")[1]


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"optimizations": set()}, ValueError, r"'optimizations'.*quantize= and sparse="),
        ({"representative_dataset": None}, ValueError, "representative_data="),
        ({"inference_input_type": "int8"}, ValueError, "int8_io="),
        ([("allow_custom_ops", True)], TypeError, "must be a dict"),
        ({3: True}, TypeError, "attribute names"),
        ({"target_spec.supported_ops": "SELECT_TF_OPS"}, TypeError, "must be a list"),
        (
            {"target_spec.supported_ops": ["SELECT_OPS"]},
            ValueError,
            r"'SELECT_OPS'.*allowed.*"
            r"'SELECT_TF_OPS'",
        ),
    ],
)
def test_bad_converter_options_are_errors(options, error, match):
    model, _ = _model("Dense")
    with pytest.raises(error, match=match):
        export_tflite(model, converter_options=options)


def test_converter_options_conflicting_with_quantize_are_errors():
    model, x = _model("Dense")
    with pytest.raises(ValueError, match=r"quantize='int8'.*must contain.*TFLITE_BUILTINS_INT8"):
        export_tflite(
            model,
            quantize="int8",
            representative_data=x,
            converter_options={"target_spec.supported_ops": ["TFLITE_BUILTINS"]},
        )
    with pytest.raises(ValueError, match=r"quantize='float16'.*must contain.*float16"):
        export_tflite(
            model,
            quantize="float16",
            converter_options={"target_spec.supported_types": ["float32"]},
        )
    # Adding to tfprune's setting keeps it: still a real int8 model.
    ops = ["TFLITE_BUILTINS_INT8", "TFLITE_BUILTINS", "SELECT_TF_OPS"]
    blob = export_tflite(
        model,
        quantize="int8",
        representative_data=x,
        converter_options={"target_spec.supported_ops": ops},
    )
    assert _kernel(tflite_weights(blob), (6, 12)).dtype == np.int8
    ref = np.asarray(model(x))
    assert np.abs(run_tflite(blob, x) - ref).max() <= 3 * (ref.max() - min(ref.min(), 0)) / 255
