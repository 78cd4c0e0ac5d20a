"""sparsity_report: numbers checked by hand on tiny models; pruned and stripped models."""

import keras
import numpy as np
import pytest
from conftest import LAYER_CASES, LAYER_IDS, compile_sgd, layer_model, lenet, random_data

import tfprune
from tfprune import methods
from tfprune import structures as S

KEYS = {"layer", "params", "nonzero", "sparsity", "units", "units_kept", "flops", "flops_kept"}


def _tiny():
    """Dense(4 -> 3) and Conv2D(2 -> 3 channels, 3x3, on 5x5 -> 3x3), with hand-set weights."""
    inp = keras.Input((5, 5, 2))
    x = keras.layers.Conv2D(3, 3, name="conv")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(4, name="hidden")(x)
    model = keras.Model(inp, keras.layers.Dense(2, name="dense")(x))
    conv = np.arange(1, 55, dtype="float32").reshape(3, 3, 2, 3)
    conv[..., 2] *= 0.01  # unit 2 is the weakest filter
    conv[0, 0, 0, 0] = 0.0  # one zero weight in unit 0
    model.get_layer("conv").set_weights([conv, np.array([1.0, 0.0, 2.0], "float32")])
    hidden = np.arange(1, 13, dtype="float32").reshape(3, 4)
    model.get_layer("hidden").set_weights([hidden, np.ones(4, "float32")])
    dense = np.array([[1, 0], [2, 3], [0, 0], [4, 5]], "float32")
    model.get_layer("dense").set_weights([dense, np.array([0.5, 0.0], "float32")])
    return model


def _rows(report):
    return {r["layer"]: r for r in report.rows}


def test_numbers_of_a_dense_model_checked_by_hand():
    report = tfprune.sparsity_report(_tiny())
    rows = _rows(report)
    assert list(rows) == ["conv", "hidden", "dense"]
    conv = rows["conv"]
    assert KEYS <= set(conv)
    # conv: 3*3*2*3 = 54 kernel weights (one zero) + 3 biases (one zero).
    assert (conv["params"], conv["nonzero"]) == (57, 55)
    assert conv["sparsity"] == pytest.approx(2 / 57)
    assert (conv["units"], conv["units_kept"]) == (3, 3)
    # 2 FLOPs per multiply-add, 3x3 output positions, 54 weights; zeros skipped in "kept".
    assert (conv["flops"], conv["flops_kept"]) == (2 * 9 * 54, 2 * 9 * 53)
    assert conv["type"] == "Conv2D"
    dense = rows["dense"]
    assert (dense["params"], dense["nonzero"]) == (10, 6)
    assert (dense["units"], dense["units_kept"]) == (2, 2)
    assert (dense["flops"], dense["flops_kept"]) == (2 * 8, 2 * 5)
    hidden = rows["hidden"]
    assert (hidden["params"], hidden["nonzero"], hidden["flops"]) == (16, 16, 24)


def test_a_unit_whose_kernel_is_all_zero_is_not_kept():
    model = _tiny()
    dense = model.get_layer("dense")
    kernel = keras.ops.convert_to_numpy(dense.kernel).copy()
    kernel[:, 1] = 0.0
    dense.kernel.assign(kernel)
    assert _rows(tfprune.sparsity_report(model))["dense"]["units_kept"] == 1


def test_total_is_the_sum_of_the_rows_and_sparsity_is_one_minus_nonzero_over_params():
    report = tfprune.sparsity_report(_tiny())
    for key in ("params", "nonzero", "units", "units_kept", "flops", "flops_kept"):
        assert report.total[key] == sum(r[key] for r in report.rows)
    assert report.total["params"] == 57 + 16 + 10
    assert report.total["sparsity"] == pytest.approx(1 - report.total["nonzero"] / 83)
    assert report.total["layer"] == "total"


def test_filter_pruned_model_counts_removed_units_and_their_flops():
    model = _tiny()
    pruned = tfprune.prune(model, methods.Magnitude(1 / 3, structure=S.Filter()),
                           layers=["conv"])
    w = pruned.get_layer("conv")
    w.method.update(w, 0)
    for m in (pruned, tfprune.strip(pruned)):
        conv = _rows(tfprune.sparsity_report(m))["conv"]
        assert (conv["units"], conv["units_kept"]) == (3, 2)  # the weak unit 2 is removed
        # Kept: units 0 (17 nonzero weights, bias 1) and 1 (18 weights, bias 0).
        assert (conv["params"], conv["nonzero"]) == (57, 17 + 18 + 1)
        assert conv["flops_kept"] == 2 * 9 * 35
        # 19 zero kernel weights, 18 of them in the removed unit (biases are not counted).
        assert conv["zeros_in_units"] == pytest.approx(18 / 19)
    rows = _rows(tfprune.sparsity_report(pruned))
    assert rows["hidden"]["nonzero"] == 16  # unpruned layers are reported as they are


def test_block_pruned_zeros_are_reported_as_lying_in_blocks():
    model = lenet()
    pruned = tfprune.prune(model, methods.Magnitude(0.5, structure=S.Block((4, 1))),
                           layers=["fc"])
    w = pruned.get_layer("fc")
    w.method.update(w, 0)
    row = _rows(tfprune.sparsity_report(pruned))["fc"]
    # fan_in 6 = a full block and a padded one of 2 rows; the zero (fresh) biases are not
    # counted: all zeros lie in blocks.
    assert row["zeros_in_blocks"] == pytest.approx(1.0)
    unstructured = tfprune.prune(model, methods.Magnitude(0.5), layers=["fc"])
    w = unstructured.get_layer("fc")
    w.method.update(w, 0)
    assert _rows(tfprune.sparsity_report(unstructured))["fc"]["zeros_in_blocks"] < 0.5


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_every_supported_layer_type_has_a_row_with_consistent_numbers(case):
    _, factory, shape = case
    model = layer_model(factory, shape)
    pruned = tfprune.prune(model, methods.Magnitude(0.5), layers=["pl"])
    w = pruned.get_layer("pl")
    w.method.update(w, 0)
    row = _rows(tfprune.sparsity_report(pruned))["pl"]
    inner = w.layer
    params = sum(int(np.prod(v.shape)) for v in inner.weights)
    assert row["params"] == params
    kernels = sum(int(np.prod(v.shape)) for v in inner.weights if "kernel" in v.path)
    assert row["nonzero"] == kernels - round(0.5 * kernels) if len(w.handler.kernels) == 1 else (
        row["nonzero"] < params)
    assert row["flops"] > row["flops_kept"] > 0
    assert row["units"] == w.handler.num_units(inner)
    plain_row = _rows(tfprune.sparsity_report(tfprune.strip(pruned)))["pl"]
    assert plain_row == row


def test_conv2d_transpose_flops_count_input_positions():
    inp = keras.Input((4, 4, 2))
    model = keras.Model(inp, keras.layers.Conv2DTranspose(3, 3, strides=2, name="up")(inp))
    row = tfprune.sparsity_report(model).rows[0]
    assert row["flops"] == 2 * 16 * (3 * 3 * 2 * 3)


def test_str_is_a_table_with_the_layer_names_and_the_total():
    pruned = tfprune.prune(lenet(), methods.Magnitude(0.5))
    text = str(tfprune.sparsity_report(pruned))
    lines = text.splitlines()
    assert "layer" in lines[0] and "sparsity" in lines[0]
    for name in ("c1", "c2", "fc", "out", "total"):
        assert any(line.startswith(name) for line in lines)
    assert repr(tfprune.sparsity_report(pruned)) == text


def test_report_works_on_a_trained_pruned_model_and_its_stripped_copy():
    pruned = compile_sgd(tfprune.prune(lenet(), methods.Magnitude(0.6)))
    x, y = random_data((12, 12, 1), n=16, classes=4)
    pruned.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[tfprune.callbacks.Pruning()])
    a, b = tfprune.sparsity_report(pruned), tfprune.sparsity_report(tfprune.strip(pruned))
    assert a.rows == b.rows and a.total == b.total
    assert a.total["sparsity"] > 0.5


def test_a_model_without_prunable_layers_raises():
    model = keras.Sequential([keras.Input((4,)), keras.layers.ReLU()], name="relu_only")
    with pytest.raises(ValueError, match="'relu_only'"):
        tfprune.sparsity_report(model)


@pytest.mark.parametrize("name", ["lenet5", "resnet", "mobilenet", "inception", "nested"])
def test_the_report_of_the_pruned_model_gives_the_flops_of_the_shrunk_model(name):
    import surgery_zoo as zoo

    keras.utils.set_random_seed(0)
    model = zoo.ZOO[name]()
    zoo.randomize(model)
    pruned = tfprune.prune(model, methods.Magnitude(0.5, structure=S.Filter()))
    x = np.random.default_rng(0).random((4, *model.inputs[0].shape[1:]), "float32")
    pruned.compile("sgd", "mse")
    pruned.fit(x, np.zeros((4, *model.outputs[0].shape[1:])), verbose=0,
               callbacks=[tfprune.callbacks.Pruning()])
    small = tfprune.shrink(tfprune.strip(pruned))
    masked = tfprune.sparsity_report(pruned)
    shrunk = tfprune.sparsity_report(small)
    assert masked.total["flops_shrunk"] == shrunk.total["flops"]
    assert masked.total["flops_shrunk"] < masked.total["flops_kept"]
    assert shrunk.total["flops_shrunk"] == shrunk.total["flops"]
    assert "if shrunk" in str(masked)
