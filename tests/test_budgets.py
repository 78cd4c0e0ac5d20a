"""Global budgets: the shrunk model meets a FLOPs or parameter target (`tfprune.budgets`)."""

import keras
import numpy as np
import pytest
import surgery_zoo as zoo

import tfprune
from tfprune import budgets, methods, schedules, structures
from tfprune.wrapper import find_wrappers

UNITS = methods.Magnitude(structure=structures.Filter())  # no sparsity: the budget decides


def _cost(model, kind):
    if kind == "flops":
        return tfprune.sparsity_report(model).total["flops"]
    return model.count_params()


def _fit(pruned, model, steps=2, epochs=1):
    x = np.random.default_rng(0).random((4 * steps, *model.inputs[0].shape[1:]), "float32")
    y = np.zeros((4 * steps, *model.outputs[0].shape[1:]), "float32")
    pruned.compile("sgd", "mse")
    callback = tfprune.callbacks.Pruning()
    pruned.fit(x, y, epochs=epochs, batch_size=4, verbose=0, callbacks=[callback])
    return x, callback


def _zoo(name):
    keras.utils.set_random_seed(0)
    model = zoo.ZOO[name]()
    zoo.randomize(model)
    return model


@pytest.mark.parametrize("name", ["lenet5", "vgg", "resnet", "mobilenet", "inception",
                                  "grouped", "nested", "misc", "ops"])
def test_cost_model_predicts_the_shrunk_model_exactly(name):
    model = _zoo(name)
    pruned = tfprune.prune(model, methods.Magnitude(0.5, structure=structures.Filter()))
    _fit(pruned, model)
    small = tfprune.shrink(tfprune.strip(pruned))
    wrappers = {w.name: w for w in find_wrappers(pruned)}
    for kind in ("flops", "params"):
        cm = budgets.CostModel(pruned, kind)
        assert cm.dense == pytest.approx(_cost(model, kind))
        for gi, g in enumerate(cm.graph.groups):
            alive = np.zeros(g.size, bool)
            for layer, idx in g.producers:
                w = wrappers.get(layer.name)
                unit = None if w is None else w.method.unit_mask(w)
                alive |= np.ones(g.size, bool) if unit is None else np.asarray(unit)[idx] > 0
            for c in np.flatnonzero(~alive):
                cm.remove(gi, int(c))
        assert cm.cost() == pytest.approx(_cost(small, kind)), kind


@pytest.mark.parametrize(("name", "budget"), [
    ("lenet5", budgets.FLOPs(0.5)), ("lenet5", budgets.Params(0.3)),
    ("resnet", budgets.FLOPs(0.5)), ("resnet", budgets.Params(0.3)),
    ("mobilenet", budgets.FLOPs(0.3, normalize="cost")), ("mobilenet", budgets.Params(0.5)),
    ("inception", budgets.FLOPs(0.4, normalize="none")),
], ids=lambda v: v if isinstance(v, str) else repr(v))
def test_the_shrunk_model_meets_the_budget(name, budget):
    model = _zoo(name)
    pruned = tfprune.prune(model, UNITS, budget=budget)
    x, callback = _fit(pruned, model)
    plain = tfprune.strip(pruned)
    small = tfprune.shrink(plain)
    ratio = _cost(small, budget.kind) / _cost(model, budget.kind)
    assert budget.keep - 0.1 < ratio <= budget.keep + 1e-9
    last = callback._groups.last_budget
    assert last["predicted"] == pytest.approx(_cost(small, budget.kind))
    assert last["predicted"] <= last["target"] + 1e-6
    np.testing.assert_allclose(small.predict(x, verbose=0), plain.predict(x, verbose=0),
                               rtol=1e-4, atol=1e-5)


def test_units_are_ranked_globally_not_per_layer():
    """A layer of strong units keeps more of them than a layer of weak ones."""
    inp = keras.Input((16,))
    a = keras.layers.Dense(16, name="a")(inp)
    b = keras.layers.Dense(16, name="b")(a)
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(b))
    rng = np.random.default_rng(0)
    k = rng.normal(size=(16, 16)).astype("float32")
    k[:, :12] *= 0.01  # 12 weak units in 'a'
    model.get_layer("a").kernel.assign(k)
    pruned = tfprune.prune(model, UNITS, budget=budgets.Params(0.5, normalize="none"))
    _fit(pruned, model)
    kept = {n: int(pruned.get_layer(n).method.unit_mask(pruned.get_layer(n)).sum())
            for n in ("a", "b")}
    assert kept["a"] < kept["b"]


def test_a_schedule_times_the_budget_and_meets_it_at_end_step():
    model = _zoo("vgg")
    schedule = schedules.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=6, frequency=2)
    pruned = tfprune.prune(model, methods.Magnitude(structure=structures.Filter(),
                                                    schedule=schedule),
                           budget=budgets.FLOPs(0.4))
    seen = []
    x, callback = _fit(pruned, model, steps=2, epochs=1)  # steps 0, 1
    seen.append(callback._groups.last_budget)
    assert seen[0]["step"] == 0 and seen[0]["target"] == pytest.approx(seen[0]["dense"])
    x, callback = _fit(pruned, model, steps=2, epochs=3)  # steps 2..7: 2, 4, 6 prune
    last = callback._groups.last_budget
    assert last["step"] == 6
    assert last["target"] == pytest.approx(0.4 * last["dense"])
    small = tfprune.shrink(tfprune.strip(pruned))
    assert _cost(small, "flops") <= 0.4 * _cost(model, "flops") + 1e-6
    assert schedule.progress(0) == 0.0 and schedule.progress(6) == 1.0
    assert 0 < schedule.progress(3) < 1


@pytest.mark.parametrize("round_to", [4, 8])
def test_round_to_gives_every_shrunk_width_a_multiple_of_round_to(round_to):
    inp = keras.Input((8, 8, 3))
    x = inp
    for i, width in enumerate((32, 32, 64)):
        x = keras.layers.Conv2D(width, 3, padding="same", name=f"c{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(10, name="head")(x))
    pruned = tfprune.prune(model, methods.Magnitude(
        structure=structures.Filter(round_to=round_to)), budget=budgets.FLOPs(0.5))
    _fit(pruned, model)
    small = tfprune.shrink(tfprune.strip(pruned))
    for w in find_wrappers(pruned):
        if w.budget is not None:
            units = small.get_layer(w.name).get_config().get("filters") or \
                small.get_layer(w.name).get_config().get("units")
            full = w.handler.num_units(w.layer)
            assert units == full or units % round_to == 0, (w.name, units)
    assert _cost(small, "flops") <= 0.5 * _cost(model, "flops") + 1e-6


def test_budget_survives_a_keras_file_round_trip(tmp_path):
    model = _zoo("lenet5")
    pruned = tfprune.prune(model, UNITS, budget=budgets.FLOPs(0.5))
    _fit(pruned, model)
    path = tmp_path / "m.keras"
    pruned.save(path)
    loaded = keras.models.load_model(path)
    assert {w.name: w.budget for w in find_wrappers(loaded) if w.budget} == {
        w.name: w.budget for w in find_wrappers(pruned) if w.budget}
    assert budgets.FLOPs(0.5) in [w.budget for w in find_wrappers(loaded)]


@pytest.mark.parametrize("keep", [0, -0.1, 1.5, float("nan")])
def test_keep_must_be_in_0_1(keep):
    with pytest.raises(ValueError, match="FLOPs: `keep` must be in"):
        budgets.FLOPs(keep)


def test_bad_normalize_and_budget_types_raise():
    with pytest.raises(ValueError, match="`normalize` must be one of"):
        budgets.Params(0.5, normalize="lamp")
    with pytest.raises(TypeError, match="`budget` must be None or a tfprune.budgets object"):
        tfprune.prune(_zoo("lenet5"), UNITS, budget=0.5)


@pytest.mark.parametrize("method", [
    methods.Magnitude(0.5),  # weights, not units
    methods.DPP(keep_ratio=0.5, structure=structures.Filter()),  # learned masks: "tie"
], ids=["unstructured", "dpp"])
def test_a_method_that_cannot_rank_units_globally_raises(method):
    with pytest.raises(ValueError, match="budget"):
        tfprune.prune(_zoo("lenet5"), method, budget=budgets.FLOPs(0.5))


def test_magnitude_without_sparsity_needs_a_budget():
    with pytest.raises(ValueError, match="or prune with a `budget`"):
        tfprune.prune(_zoo("lenet5"), UNITS)


def test_taylor_with_a_budget_waits_for_scores_then_meets_the_target():
    model = _zoo("resnet")
    pruned = tfprune.prune(model, methods.Taylor(min_steps=3), budget=budgets.FLOPs(0.5))
    x, callback = _fit(pruned, model, steps=2, epochs=1)  # steps 0-1: not yet due
    assert callback._groups.last_budget is None
    x, callback = _fit(pruned, model, steps=2, epochs=2)  # step 3 is due and scored
    last = callback._groups.last_budget
    assert last["step"] == 3
    small = tfprune.shrink(tfprune.strip(pruned))
    assert _cost(small, "flops") <= 0.5 * _cost(model, "flops") + 1e-6
    assert last["predicted"] == pytest.approx(_cost(small, "flops"))


def test_taylor_without_sparsity_schedule_or_budget_raises():
    with pytest.raises(ValueError, match="Taylor: give `sparsity`.*or prune with a `budget`"):
        tfprune.prune(_zoo("lenet5"), methods.Taylor())


def test_a_budget_that_cannot_be_met_warns_with_the_smallest_cost():
    inp = keras.Input((8,))
    x = keras.layers.Dense(4, name="h")(inp)
    model = keras.Model(inp, keras.layers.Dense(64, name="head")(x))  # the head dominates
    pruned = tfprune.prune(model, UNITS, budget=budgets.Params(0.2))
    with pytest.warns(RuntimeWarning, match="cannot be met at step 0"):
        _fit(pruned, model)
    assert pruned.get_layer("h").method.unit_mask(pruned.get_layer("h")).sum() == 1


def test_latency_budget_predicts_from_measured_tables_and_verifies(tmp_path):
    inp = keras.Input((16, 16, 8))
    x = inp
    for i, width in enumerate((32, 64, 64)):
        x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name=f"c{i}")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(10, name="head")(x))
    budget = budgets.Latency(0.5, runs=20, fractions=(1.0, 0.5, 0.25), cache_dir=tmp_path)
    pruned = tfprune.prune(model, UNITS, budget=budget)
    _, callback = _fit(pruned, model)
    last = callback._groups.last_budget
    assert last["predicted"] <= last["target"] + 1e-6
    small = tfprune.shrink(tfprune.strip(pruned))
    result = budget.verify(model, small)  # the table comes from the cache: same key
    assert len(list(tmp_path.glob("*.json"))) == 1
    assert result["predicted_us"] == pytest.approx(last["predicted"], rel=1e-6)
    assert result["measured_us"] > 0 and 0.3 < result["ratio"] < 3.0
    assert set(result) >= {"dense_us", "measured_over_dense", "target_us", "met"}
    assert keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(budget)) == budget
