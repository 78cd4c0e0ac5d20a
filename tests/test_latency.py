"""Per-layer LiteRT latency tables (tfprune.latency): grid, interpolation, prediction, cache."""

import keras
import numpy as np
import pytest

import tfprune
from tfprune import latency
from tfprune.latency import LatencyTable

L = keras.layers
FAST = {"fractions": (1.0, 0.5), "runs": 3, "warmup": 1, "progress": False}


def small_cnn(filters=4, units=3, name="small"):
    """8x8x3 -> Conv2D(filters) -> Flatten -> Dense(units)."""
    inp = keras.Input((8, 8, 3), name="x")
    x = L.Conv2D(filters, 3, activation="relu", name="c1")(inp)
    x = L.Flatten(name="flat")(x)
    return keras.Model(inp, L.Dense(units, name="d1")(x), name=name)


def mixed_model():
    """Depthwise, depthwise-like grouped, grouped, separable and Dense on a 3-D input."""
    inp = keras.Input((6, 6, 4), name="x")
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(inp)  # 8 ch
    x = L.Conv2D(8, 1, groups=8, name="gdw")(x)  # one input channel per group: depthwise-like
    x = L.Conv2D(4, 1, groups=2, name="grp")(x)  # 2 groups of 4 inputs -> 2 outputs
    x = L.SeparableConv2D(6, 3, name="sep")(x)  # 4x4x6
    x = L.Reshape((16, 6), name="seq")(x)
    x = L.Dense(5, name="tok")(x)  # Dense on a 3-D input: in = last axis
    x = L.Flatten(name="flat")(x)
    return keras.Model(inp, L.Dense(2, name="out")(x), name="mixed")


@pytest.fixture
def fake_litert(monkeypatch):
    """Replaces conversion and timing by a deterministic cost: 1 us + params / 100.

    Returns the list of the models "exported", to count measurements.
    """
    exported = []

    def export(model, **kwargs):
        exported.append(model.name)
        return str(model.count_params()).encode()

    def bench(blob, **kwargs):
        return {"median_us": 1.0 + float(blob.decode()) / 100}

    monkeypatch.setattr(latency, "export_tflite", export)
    monkeypatch.setattr(latency, "benchmark_tflite", bench)
    return exported


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A real (LiteRT) table of the small CNN, and its cache directory."""
    keras.utils.set_random_seed(0)
    model = small_cnn()
    cache = tmp_path_factory.mktemp("latency_cache")
    return model, LatencyTable.measure(model, cache_dir=cache, **FAST), cache


# --------------------------------------------------------------------------- the table


def test_table_has_one_entry_per_prunable_layer_with_its_grid(measured):
    model, table, _ = measured
    assert list(table.layers) == ["c1", "d1"]
    c1, d1 = table.layers["c1"], table.layers["d1"]
    assert (c1.kind, c1.in_total, c1.out_total) == ("standard", 3, 4)
    assert (c1.in_grid, c1.out_grid) == ([2, 3], [2, 4])  # round(0.5 * 3) = 2
    assert d1.in_total == 6 * 6 * 4  # Dense after Flatten: the fan-in rows
    assert (d1.in_grid, d1.out_grid) == ([72, 144], [2, 3])
    for entry in (c1, d1):
        us = np.asarray(entry.us)
        assert us.shape == (len(entry.in_grid), len(entry.out_grid))
        assert np.all(us > 0) and np.all(np.isfinite(us))
    assert c1.calls == [{"input_shape": [8, 8, 3], "count": 1}]
    assert table.dense_us > 0 and table.dense_check_us > 0
    assert (table.threads, table.runs, table.warmup) == (1, 3, 1)
    text = table.summary()
    for word in ("c1", "d1", "rest", "predicted dense", "measured dense"):
        assert word in text


def test_predict_at_dense_widths_is_the_measured_dense_latency(measured):
    model, table, _ = measured
    assert table.predict() == pytest.approx(table.dense_us, rel=1e-12)
    dense = table.kept_of(model)
    assert dense == {"c1": (3, 4), "d1": (144, 3)}
    assert table.predict(dense) == pytest.approx(table.dense_us, rel=1e-12)
    layer_sum = sum(e.dense_us for e in table.layers.values())
    assert table.rest_us == pytest.approx(table.dense_us - layer_sum)


def test_interpolation_is_exact_at_grid_points(measured):
    _, table, _ = measured
    for name, entry in table.layers.items():
        for i, n_in in enumerate(entry.in_grid):
            for j, n_out in enumerate(entry.out_grid):
                assert table.layer_latency(name, n_in, n_out) == entry.us[i][j]


def _synthetic(us=((10.0, 20.0), (30.0, 60.0)), dense_us=100.0):
    """A table without measurement: one Dense layer 'd' (in 8, out 4) and a depthwise 'dw'."""
    return LatencyTable.from_dict({
        "schema": 1, "model_name": "syn", "threads": 1, "fractions": [1.0, 0.5], "runs": 1,
        "warmup": 0, "dense_us": dense_us, "dense_check_us": dense_us,
        "layers": [
            {"name": "d", "type": "Dense", "kind": "standard", "in_total": 8, "out_total": 4,
             "in_grid": [4, 8], "out_grid": [2, 4], "us": [list(r) for r in us]},
            {"name": "dw", "type": "DepthwiseConv2D", "kind": "depthwise", "in_total": 6,
             "out_total": 12, "in_grid": [3, 6], "out_grid": [6, 12], "us": [4.0, 10.0],
             "multiplier": 2},
        ]})


def test_interpolation_is_bilinear_between_grid_points_and_clamped_below():
    table = _synthetic()
    # in 6 is halfway between 4 and 8, out 3 halfway between 2 and 4
    assert table.layer_latency("d", 6, 3) == pytest.approx((10 + 20 + 30 + 60) / 4)
    assert table.layer_latency("d", 8, 3) == pytest.approx(45.0)
    assert table.layer_latency("d", 5, 4) == pytest.approx(0.75 * 20 + 0.25 * 60)
    assert table.layer_latency("d", 1, 1) == 10.0  # below the grid: no extrapolated saving
    widths = [(i, o) for i in range(1, 9) for o in range(1, 5)]
    values = {w: table.layer_latency("d", *w) for w in widths}
    for (i, o), v in values.items():  # monotone table -> monotone interpolation
        if i < 8:
            assert values[(i + 1, o)] >= v
        if o < 4:
            assert values[(i, o + 1)] >= v
    # depthwise: 1-D, out_kept None or in_kept x multiplier
    assert table.layer_latency("dw", 3) == 4.0
    assert table.layer_latency("dw", 5, 10) == pytest.approx(4.0 + 2 * 6.0 / 3)


def test_predict_sums_the_layers_with_the_rest_and_never_goes_below_one_layer():
    table = _synthetic()
    rest = 100.0 - 60.0 - 10.0
    assert table.rest_us == rest
    assert table.predict({"d": (4, 2)}) == pytest.approx(rest + 10.0 + 10.0)
    negative = _synthetic(dense_us=30.0)  # layers sum to 70: rest -40
    assert negative.rest_us == -40.0
    assert negative.predict() == pytest.approx(30.0)
    # rest + layers = -40 + 10 + 4 < 0: floored at the slowest layer alone
    assert negative.predict({"d": (4, 2), "dw": (3, None)}) == 10.0


def test_bad_widths_and_names_raise_clear_errors():
    table = _synthetic()
    with pytest.raises(ValueError, match=r"'nope' is not in the latency table.*\['d', 'dw'\]"):
        table.predict({"nope": (1, 1)})
    with pytest.raises(ValueError, match=r"'nope' is not in the latency table"):
        table.layer_latency("nope", 1, 1)
    with pytest.raises(ValueError, match=r"in_kept of layer 'd' must be in \[1, 8\], got 9"):
        table.predict({"d": (9, 4)})
    with pytest.raises(ValueError, match=r"out_kept of layer 'd' must be in \[1, 4\], got 0"):
        table.layer_latency("d", 8, 0)
    with pytest.raises(TypeError, match=r"in_kept of layer 'd' must be an int, got 2.5"):
        table.layer_latency("d", 2.5, 4)
    with pytest.raises(ValueError, match=r"'dw' is depthwise.*in_kept x 2 = 6, got 5"):
        table.layer_latency("dw", 3, 5)
    with pytest.raises(ValueError, match=r"'d' \(Dense\) needs out_kept"):
        table.layer_latency("d", 8)
    with pytest.raises(ValueError, match=r"kept\['d'\] must be a pair"):
        table.predict({"d": 8})


def test_the_rest_is_interpolated_between_calibration_points():
    table = _synthetic()  # rest 30 us at the dense widths
    table.calibration = [{"fraction": 0.5, "activations": 0.5, "measured_us": 40.0,
                          "layers_us": 30.0, "rest_us": 10.0}]
    d, dw = table.layers["d"], table.layers["dw"]
    total = d.positions * 4 + dw.positions * 12
    assert table.activations() == 1.0
    assert table.activations({"d": (8, 2)}) == pytest.approx((total - 2) / total)
    assert table.predict() == pytest.approx(100.0)  # still exact at the dense widths
    half = {"d": (4, 2), "dw": (3, 6)}  # half of every output
    assert table.activations(half) == pytest.approx(0.5)
    assert table.rest_at(half) == pytest.approx(10.0)
    assert table.predict(half) == pytest.approx(10.0 + 10.0 + 4.0)
    three_quarters = {"d": (8, 3), "dw": (5, 10)}
    x = table.activations(three_quarters)
    assert table.rest_at(three_quarters) == pytest.approx(10.0 + (x - 0.5) / 0.5 * 20.0)
    assert table.rest_at({"d": (1, 1), "dw": (1, None)}) == 10.0  # held below the narrowest
    restored = LatencyTable.from_dict(table.to_dict())
    assert restored.calibration == table.calibration
    assert restored.predict(half) == table.predict(half)


def test_measure_calibrates_the_rest_on_narrower_copies_of_the_model(measured):
    model, table, _ = measured
    assert [c["fraction"] for c in table.calibration] == [0.5, 0.25]
    for c in table.calibration:
        assert 0 < c["activations"] < 1 and c["measured_us"] > 0
        assert c["rest_us"] == pytest.approx(c["measured_us"] - c["layers_us"])
    half = latency._scaled_copy(model, 0.5)
    assert table.kept_of(half) == {"c1": (3, 2), "d1": (72, 3)}  # the output layer keeps 3
    assert "rest calibration" in table.summary()


# --------------------------------------------------------------------------- layer types


def test_depthwise_grouped_separable_and_3d_dense_layers(fake_litert, tmp_path):
    model = mixed_model()
    table = LatencyTable.measure(model, cache_dir=tmp_path, **FAST)
    assert list(table.layers) == ["dw", "gdw", "grp", "sep", "tok", "out"]
    dw, gdw, grp = table.layers["dw"], table.layers["gdw"], table.layers["grp"]
    assert (dw.kind, dw.in_grid, dw.out_grid, dw.multiplier) == ("depthwise", [2, 4], [4, 8], 2)
    assert np.asarray(dw.us).shape == (2,)
    assert (gdw.kind, gdw.in_grid, gdw.out_grid, gdw.multiplier) == (
        "depthwise", [4, 8], [4, 8], 1)
    assert (grp.kind, grp.groups, grp.in_grid, grp.out_grid) == ("grouped", 2, [4, 8], [2, 4])
    assert table.layers["tok"].in_total == 6  # last axis of the (16, 6) input
    assert table.layers["out"].in_total == 16 * 5
    # probes are built at the grid widths: a smaller depthwise probe has fewer parameters
    assert dw.us[0] < dw.us[1] and gdw.us[0] < gdw.us[1]
    with pytest.raises(ValueError, match=r"'grp' must be in \[1, 8\] and a multiple of groups=2"):
        table.layer_latency("grp", 3, 4)
    assert table.predict(table.kept_of(model)) == pytest.approx(table.dense_us)
    # grouped convolutions: no uniformly narrower copy, the rest stays constant and says why
    assert table.calibration == []
    assert "grouped convolution 'gdw'" in table.calibration_note
    assert "rest constant: no uniformly narrower copy" in table.summary()


def test_every_probe_layer_type_converts_and_runs_on_litert(tmp_path):
    """The real path for depthwise, grouped and separable probes at reduced widths."""
    table = LatencyTable.measure(mixed_model(), cache_dir=tmp_path, **FAST)
    for entry in table.layers.values():
        assert np.all(np.asarray(entry.us) > 0)


def test_a_shared_layer_is_counted_once_per_call(fake_litert, tmp_path):
    a, b = keras.Input((5,), name="a"), keras.Input((5,), name="b")
    seq = keras.Input((3, 5), name="s")
    shared = L.Dense(4, name="shared")
    outs = [shared(a), shared(b), L.Flatten()(shared(seq))]
    model = keras.Model([a, b, seq], L.Concatenate()(outs), name="shared_model")
    table = LatencyTable.measure(model, cache_dir=tmp_path, **FAST)
    entry = table.layers["shared"]
    assert sorted(map(str, entry.calls)) == sorted(map(str, [
        {"input_shape": [5], "count": 2}, {"input_shape": [3, 5], "count": 1}]))
    one = 1.0 + (5 * 4 + 4) / 100  # the fake cost of Dense(5 -> 4) alone, both input shapes
    assert entry.dense_us == pytest.approx(3 * one)


# --------------------------------------------------------------------------- cache


def test_second_measure_loads_from_the_cache_without_measuring(measured, monkeypatch):
    model, table, cache = measured

    def fail(*args, **kwargs):
        raise AssertionError("measured although the table is cached")

    monkeypatch.setattr(latency, "benchmark_tflite", fail)
    monkeypatch.setattr(latency, "export_tflite", fail)
    again = LatencyTable.measure(model, cache_dir=cache, **FAST)
    assert again.from_cache and not table.from_cache
    assert again.to_dict() == table.to_dict()
    # weights are not part of the key: the same architecture, other weights, same table
    other = small_cnn()
    other.set_weights([w + 1.0 for w in model.get_weights()])
    assert LatencyTable.measure(other, cache_dir=cache, **FAST).from_cache


def test_cache_dir_defaults_to_the_environment_variable(fake_litert, tmp_path, monkeypatch):
    monkeypatch.setenv(latency.CACHE_ENV, str(tmp_path / "env"))
    LatencyTable.measure(small_cnn(), **FAST)
    assert len(list((tmp_path / "env").glob("small-*.json"))) == 1
    monkeypatch.delenv(latency.CACHE_ENV)
    assert latency.default_cache_dir() == latency.Path.home() / ".cache" / "tfprune" / "latency"


@pytest.mark.parametrize("change", ["threads", "architecture", "fractions", "runs"])
def test_cache_misses_when_threads_architecture_or_measurement_change(
        change, fake_litert, tmp_path):
    LatencyTable.measure(small_cnn(), cache_dir=tmp_path, **FAST)
    n = len(fake_litert)
    assert LatencyTable.measure(small_cnn(), cache_dir=tmp_path, **FAST).from_cache
    assert len(fake_litert) == n
    kwargs, model = dict(FAST), small_cnn()
    if change == "threads":
        kwargs["threads"] = 2
    elif change == "architecture":
        model = small_cnn(filters=5)
    elif change == "fractions":
        kwargs["fractions"] = (1.0, 0.25)
    else:
        kwargs["runs"] = 4
    table = LatencyTable.measure(model, cache_dir=tmp_path, **kwargs)
    assert not table.from_cache and len(fake_litert) > n
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_a_corrupt_cache_file_is_measured_again(fake_litert, tmp_path):
    LatencyTable.measure(small_cnn(), cache_dir=tmp_path, **FAST)
    (path,) = tmp_path.glob("*.json")
    path.write_text("{not json")
    table = LatencyTable.measure(small_cnn(), cache_dir=tmp_path, **FAST)
    assert not table.from_cache
    assert LatencyTable.measure(small_cnn(), cache_dir=tmp_path, **FAST).from_cache


# --------------------------------------------------------------------------- verify


def test_verify_measures_a_smaller_model_and_reads_its_widths(measured):
    _, table, _ = measured
    small = small_cnn(filters=2, units=2)  # same names, what shrink would give
    result = table.verify(small, runs=3, warmup=1)
    assert result["kept"] == {"c1": (3, 2), "d1": (72, 2)}
    assert result["predicted_us"] == pytest.approx(table.predict(result["kept"]))
    assert result["measured_us"] > 0
    assert result["ratio"] == pytest.approx(result["measured_us"] / result["predicted_us"])


def test_verify_rejects_a_model_that_does_not_match_the_table(measured):
    _, table, _ = measured
    inp = keras.Input((8, 8, 3))
    other = keras.Model(inp, L.Dense(2, name="d1")(L.Flatten()(L.Conv2D(2, 3, name="c9")(inp))))
    with pytest.raises(ValueError, match=r"missing from it \['c1'\].*not in the table \['c9'\]"):
        table.verify(other)
    inp = keras.Input((10, 10, 3))  # other spatial size
    bigger = keras.Model(inp, L.Dense(2, name="d1")(L.Flatten()(L.Conv2D(2, 3, name="c1")(inp))))
    with pytest.raises(ValueError, match=r"layer 'c1'.*\[\[10, 10, 3\]\].*\[\[8, 8, 3\]\]"):
        table.verify(bigger)


# --------------------------------------------------------------------------- bad models


def test_bad_models_and_arguments_raise_clear_errors(tmp_path):
    class Sub(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.d = L.Dense(2)

        def call(self, x):
            return self.d(x)

    sub = Sub()
    sub(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match=r"'sub' is a subclassed keras.Model"):
        LatencyTable.measure(sub, cache_dir=tmp_path, **FAST)
    with pytest.raises(TypeError, match=r"must be a built keras.Model, got Dense"):
        LatencyTable.measure(L.Dense(2), cache_dir=tmp_path, **FAST)
    pruned = tfprune.prune(small_cnn(), tfprune.methods.Magnitude(0.5))
    with pytest.raises(ValueError, match=r"holds PruneWrapper layers.*tfprune.strip"):
        LatencyTable.measure(pruned, cache_dir=tmp_path, **FAST)
    inp = keras.Input((None, None, 3))
    dynamic = keras.Model(inp, L.Conv2D(2, 3, name="conv")(inp))
    with pytest.raises(ValueError, match=r"'conv' has an input of shape \(None, None, None, 3\)"):
        LatencyTable.measure(dynamic, cache_dir=tmp_path, **FAST)
    inp = keras.Input((4,))
    with pytest.raises(ValueError, match=r"has no prunable layer"):
        LatencyTable.measure(keras.Model(inp, L.ReLU()(inp), name="plain"), cache_dir=tmp_path)
    for kwargs, error, pattern in [
        ({"threads": 0}, ValueError, r"`threads` must be an int >= 1, got 0"),
        ({"runs": 1.5}, TypeError, r"`runs` must be an int >= 1, got 1.5"),
        ({"fractions": ()}, ValueError, r"`fractions` must hold at least one"),
        ({"fractions": (1.0, 0.0)}, ValueError, r"numbers in \(0, 1\], got 0.0"),
        ({"fractions": (1.0, "half")}, TypeError, r"got 'half'"),
        ({"calibration": (1.0,)}, ValueError, r"`calibration` fractions must be < 1"),
    ]:
        with pytest.raises(error, match=pattern):
            LatencyTable.measure(small_cnn(), cache_dir=tmp_path, progress=False, **kwargs)
