"""methods.Taylor: first-order Taylor unit importance, accumulated in the graph during fit."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from two_cpus import run_on_two_cpus

import tfprune
from tfprune import methods, schedules, structures
from tfprune.wrapper import find_wrappers

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _cnn(bn=False):
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv")(inp)
    if bn:
        x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(8, activation="tanh", name="fc")(x)
    return keras.Model(inp, keras.layers.Dense(3, name="out")(x))


def _data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6, 6, 2)).astype("float32"), rng.integers(0, 3, n)


def _fit(pruned, x, y, lr=0.0, batch=16, epochs=1, jit=False, optimizer=None):
    pruned.compile(optimizer or keras.optimizers.SGD(lr), LOSS, jit_compile=jit)
    pruned.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, shuffle=False,
               callbacks=[tfprune.callbacks.Pruning()])
    return {w.name: w for w in find_wrappers(pruned)}


def _reference(pruned, x, y):
    """Per-unit gate and weight scores of one batch, by hand with a GradientTape."""
    conv, fc, out = (pruned.get_layer(n) for n in ("conv", "fc", "out"))
    kernels = [conv.layer.kernel, fc.layer.kernel]
    with tf.GradientTape(persistent=True) as tape:
        h1 = conv.layer(x)
        tape.watch(h1)
        h2 = fc.layer(keras.layers.Flatten()(h1))
        tape.watch(h2)
        loss = LOSS(y, out.layer(h2) if hasattr(out, "layer") else out(h2))
    gate = {}
    for name, h in (("conv", h1), ("fc", h2)):
        g = tape.gradient(loss, h).numpy()
        gate[name] = np.square((g * h.numpy()).reshape(-1, h.shape[-1]).sum(0))
    weight = {}
    for name, k in zip(("conv", "fc"), kernels, strict=True):
        wg = k.numpy() * tape.gradient(loss, k).numpy()
        weight[name] = np.square(wg).reshape(-1, k.shape[-1]).sum(0)
    return gate, weight


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("criterion", ["gate", "weight"])
def test_one_step_score_equals_a_gradient_tape_reference(criterion, jit):
    x, y = _data()
    pruned = tfprune.prune(_cnn(), methods.Taylor(0.5, criterion=criterion),
                           layers=["conv", "fc"])
    gate, weight = _reference(pruned, x, y)
    ref = gate if criterion == "gate" else weight
    w = _fit(pruned, x, y, lr=0.0, jit=jit)  # one step, weights unchanged
    for name in ("conv", "fc"):
        m, state = w[name].method, w[name].state
        assert state["taylor_sum"].dtype == "float32"
        assert float(state["taylor_count"].numpy()) == 1.0
        np.testing.assert_allclose(state["taylor_sum"].numpy(), ref[name], rtol=1e-4,
                                   atol=1e-12)
        assert ref[name].min() > 0  # a real, nonzero score
        # unit_scores: the mean since the last update (one batch), positive for kept units
        np.testing.assert_allclose(m.unit_scores(w[name]), ref[name], rtol=1e-4, atol=1e-12)


def test_auto_uses_weight_before_batchnorm_and_gate_warns_there():
    pruned = tfprune.prune(_cnn(bn=True), methods.Taylor(0.5), layers=["conv", "fc"])
    w = {w.name: w for w in find_wrappers(pruned)}
    assert w["conv"].method.resolved_criterion(w["conv"]) == "weight"
    assert w["fc"].method.resolved_criterion(w["fc"]) == "gate"
    pruned = tfprune.prune(_cnn(bn=True), methods.Taylor(0.5, criterion="gate"),
                           layers=["conv"])
    conv = pruned.get_layer("conv")
    with pytest.warns(UserWarning, match="conv.*BatchNormalization 'bn'"):
        conv.method.resolved_criterion(conv)


def test_pruned_units_are_the_lowest_scoring_and_the_mean_is_per_batch():
    x, y = _data(32)
    pruned = tfprune.prune(_cnn(), methods.Taylor(0.5, min_steps=3), layers=["conv", "fc"])
    method = pruned.get_layer("fc").method
    pruned.compile(keras.optimizers.SGD(0.0), LOSS)
    cb = tfprune.callbacks.Pruning()
    pruned.fit(x[:24], y[:24], batch_size=8, epochs=1, verbose=0, shuffle=False,
               callbacks=[cb])
    # three batches scored, nothing pruned yet (the one pruning step is at step 3)
    fc = pruned.get_layer("fc")
    assert float(fc.state["taylor_count"].numpy()) == 3.0
    assert method.unit_mask(fc).sum() == 8
    expected = sum(_reference(pruned, x[i:i + 8], y[i:i + 8])[0]["fc"]
                   for i in range(0, 24, 8)) / 3
    np.testing.assert_allclose(method.unit_scores(fc), expected, rtol=1e-4)
    pruned.fit(x[24:], y[24:], batch_size=8, epochs=1, verbose=0, callbacks=[cb])
    mask = method.unit_mask(fc)
    assert mask.sum() == 4
    np.testing.assert_array_equal(np.sort(np.argsort(expected)[4:]), np.flatnonzero(mask))
    # the score used stays readable for the groups; pruned units score 0
    scores = method.unit_scores(fc)
    assert (scores[mask == 0] == 0).all() and (scores[mask == 1] > 0).all()


def test_schedule_prunes_at_its_steps_to_the_exact_sparsity_irreversibly():
    x, y = _data(48)
    sched = schedules.PolynomialDecay(0.0, 0.75, begin_step=0, end_step=4, frequency=2,
                                      power=1)
    pruned = tfprune.prune(_cnn(), methods.Taylor(schedule=sched), layers=["conv", "fc"])
    pruned.compile(keras.optimizers.SGD(0.05), LOSS)

    kept, changed = [], []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):  # after Pruning's update
            fc = pruned.get_layer("fc")
            kept.append(fc.method.unit_mask(fc).copy())

    pruned.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False,
               callbacks=[tfprune.callbacks.Pruning(), Record()])
    counts = [int(k.sum()) for k in kept]
    # steps 0..5: due at 0 (sparsity 0), 2 (0.375 -> 3 of 8 pruned), 4 (0.75 -> 6 pruned)
    assert counts == [8, 8, 5, 5, 2, 2], counts
    for a, b in zip(kept, kept[1:]):
        assert (b <= a).all()  # pruned units stay pruned
        changed.append(not np.array_equal(a, b))
    # update() returns True exactly when masks change
    fc = pruned.get_layer("fc")
    assert fc.method.update(fc, 6) is False  # not a pruning step
    assert fc.method.update(fc, 4) is False  # due, same sparsity: the mask does not change


def test_update_returns_true_exactly_when_the_mask_changes():
    x, y = _data(16)
    pruned = tfprune.prune(_cnn(), methods.Taylor(0.5, min_steps=1), layers=["fc"])
    _fit(pruned, x, y, lr=0.0, batch=8)  # steps 0, 1: pruned at step 1
    fc = pruned.get_layer("fc")
    m = fc.method
    assert m.unit_mask(fc).sum() == 4
    m._effective_schedule = schedules.ConstantSparsity(0.5, begin_step=0, frequency=1)
    assert m.update(fc, 2) is False
    m._effective_schedule = schedules.ConstantSparsity(0.75, begin_step=0, frequency=1)
    assert m.update(fc, 3) is True
    assert m.unit_mask(fc).sum() == 2


def test_a_pruning_step_before_any_scored_batch_waits_for_one():
    x, y = _data(16)
    sched = schedules.ConstantSparsity(0.5, begin_step=0, end_step=0, frequency=1)
    pruned = tfprune.prune(_cnn(), methods.Taylor(schedule=sched), layers=["fc"])
    pruned.compile(keras.optimizers.SGD(0.0), LOSS)
    pruned.fit(x[:8], y[:8], batch_size=8, verbose=0,
               callbacks=[tfprune.callbacks.Pruning()])
    fc = pruned.get_layer("fc")
    assert fc.method.unit_mask(fc).sum() == 8  # step 0: no gradient seen, waits
    assert float(fc.state["taylor_pending"].numpy()) == 1.0
    pruned.fit(x[8:], y[8:], batch_size=8, verbose=0,
               callbacks=[tfprune.callbacks.Pruning()])
    assert fc.method.unit_mask(fc).sum() == 4  # step 1: one scored batch
    assert float(fc.state["taylor_pending"].numpy()) == 0.0


def _residual():
    inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", name="stem")(inp)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    y = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="b1")(x)
    y = keras.layers.Conv2D(16, 3, padding="same", name="b2")(y)
    x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(4, name="head")(x))


@pytest.mark.parametrize("round_to", [1, 4])
def test_add_coupled_units_get_identical_masks_and_shrink_exactly(round_to):
    keras.utils.set_random_seed(1)
    sched = schedules.PolynomialDecay(0.0, 0.6, 0, 4, frequency=2)
    pruned = tfprune.prune(_residual(), methods.Taylor(
        schedule=sched, structure=structures.Filter(round_to=round_to)))
    x = np.random.rand(48, 12, 12, 3).astype("float32")
    y = np.random.randint(0, 4, 48)
    w = _fit(pruned, x, y, lr=0.05, batch=8)
    assert w["stem"].method.resolved_criterion(w["stem"]) == "weight"  # BN follows
    assert w["b2"].method.resolved_criterion(w["b2"]) == "gate"
    stem, b2 = w["stem"].method.unit_mask(w["stem"]), w["b2"].method.unit_mask(w["b2"])
    np.testing.assert_array_equal(stem, b2)
    expected = structures.Filter(round_to).round_keep(16 - round(0.6 * 16), 16)
    assert stem.sum() == expected
    plain = tfprune.strip(pruned)
    small = tfprune.shrink(plain)
    units = {r["layer"]: r["units"] for r in tfprune.sparsity_report(small).rows}
    assert units["b2"] == units["stem"] == expected
    np.testing.assert_allclose(small.predict(x, verbose=0), plain.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plain.predict(x, verbose=0), pruned.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)


def test_config_round_trip_and_get():
    sched = schedules.PolynomialDecay(0.0, 0.5, 2, 10, frequency=2)
    m = methods.Taylor(schedule=sched, structure=structures.Filter(round_to=4),
                       criterion="weight", momentum=0.5, min_steps=3)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(m))
    assert isinstance(again, methods.Taylor)
    assert again.get_config() == m.get_config()
    assert again.structure.round_to == 4 and again.schedule == sched
    assert isinstance(methods.get("taylor"), methods.Taylor)
    assert isinstance(methods.Taylor().structure, structures.Filter)  # the contract default
    assert methods.Taylor(0.5).coupling == "select" and methods.Taylor(0.5).removes_units


@pytest.mark.parametrize("kwargs, error, match", [
    ({"sparsity": 0.5, "structure": structures.Kernel()}, ValueError, "structure.*Filter"),
    ({"sparsity": 0.5, "structure": "unstructured"}, ValueError, "structure.*Filter"),
    ({"sparsity": 1.5}, ValueError, "sparsity.*1.5"),
    ({"sparsity": "half"}, TypeError, "sparsity.*half"),
    ({"sparsity": 0.5, "criterion": "hessian"}, ValueError, "criterion.*gate.*hessian"),
    ({"sparsity": 0.5, "momentum": 1.0}, ValueError, "momentum.*1.0"),
    ({"sparsity": 0.5, "min_steps": 0}, ValueError, "min_steps.*>= 1.*0"),
    ({"sparsity": 0.5, "min_steps": 2.5}, TypeError, "min_steps.*2.5"),
    ({"sparsity": 0.3, "schedule": schedules.ConstantSparsity(0.5, 0)}, ValueError,
     "sparsity.*0.3.*0.5"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        methods.Taylor(**kwargs)


def test_resume_from_keras_file_mid_training_is_exact(tmp_path):
    x, y = _data(48)
    sched = schedules.PolynomialDecay(0.0, 0.5, 0, 8, frequency=4)

    def make():
        return tfprune.prune(_cnn(), methods.Taylor(schedule=sched, momentum=0.5),
                             layers=["conv", "fc"])

    def fit(model, epochs):
        model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False,
                  callbacks=[tfprune.callbacks.Pruning()])

    full = make()
    full.compile(keras.optimizers.Adam(0.01), LOSS)
    fit(full, 2)
    part = make()
    part.compile(keras.optimizers.Adam(0.01), LOSS)
    fit(part, 1)  # 6 steps: accumulators hold 2 batches since the step-4 update
    fc = part.get_layer("fc").state
    assert float(fc["taylor_count"].numpy()) == 2.0 and fc["taylor_sum"].numpy().sum() > 0
    path = tmp_path / "mid.keras"
    part.save(path)
    loaded = keras.models.load_model(path)
    fit(loaded, 1)
    for a, b in zip(full.weights + full.optimizer.variables,
                    loaded.weights + loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_mixed_float16_accumulates_in_float32_and_prunes(mixed_float16):
    x, y = _data(32)
    pruned = tfprune.prune(_cnn(), methods.Taylor(0.5, min_steps=3), layers=["conv", "fc"])
    w = _fit(pruned, x, y, lr=0.01, batch=8, optimizer=keras.optimizers.SGD(0.01))
    for name in ("conv", "fc"):
        m, state = w[name].method, w[name].state
        assert w[name].compute_dtype == "float16"
        assert state["taylor_sum"].dtype == state["taylor_score"].dtype == "float32"
        score = state["taylor_score"].numpy()
        assert np.isfinite(score).all() and (score > 0).any()
        assert m.unit_mask(w[name]).sum() == w[name].handler.num_units(w[name].layer) // 2


_MIRRORED = """
from tfprune import methods
from tfprune.wrapper import find_wrappers
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
rng = np.random.default_rng(0)
x = rng.normal(size=(32, 6, 6, 2)).astype("float32")
y = rng.integers(0, 3, 32)

def model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(6, 3, activation="relu", name="conv")(inp)
    h = keras.layers.Dense(8, activation="tanh", name="fc")(keras.layers.Flatten()(h))
    return keras.Model(inp, keras.layers.Dense(3, name="out")(h))

def scores(strategy_or_none, crit):
    import contextlib
    scope = strategy_or_none.scope() if strategy_or_none else contextlib.nullcontext()
    with scope:
        pruned = tfprune.prune(model(), methods.Taylor(0.5, criterion=crit, min_steps=2),
                               layers=["conv", "fc"])
        pruned.compile(keras.optimizers.SGD(0.0), loss)
    # one step of a global batch of 32: one score per layer
    pruned.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False,
               callbacks=[tfprune.callbacks.Pruning()])
    out = {w.name: np.asarray(w.state["taylor_sum"].numpy()) for w in find_wrappers(pruned)}
    count = {w.name: float(w.state["taylor_count"].numpy()) for w in find_wrappers(pruned)}
    return pruned, out, count

for crit in ("gate", "weight"):
    _, single, _ = scores(None, crit)
    pruned, multi, count = scores(strategy, crit)
    assert all(c == 1.0 for c in count.values()), count
    for name in single:
        np.testing.assert_allclose(multi[name], single[name], rtol=1e-4, atol=1e-12)
    # prune (step 2) on both replicas identically
    pruned.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False,
               callbacks=[tfprune.callbacks.Pruning()])
    for w in find_wrappers(pruned):
        assert w.method.unit_mask(w).sum() == w.handler.num_units(w.layer) // 2, w.name
        for v in [w.state[n] for n in ("kernel_mask", "bias_mask", "taylor_sum",
                                       "taylor_score")]:
            vals = [np.asarray(t) for t in strategy.experimental_local_results(v.value)]
            assert len(vals) == 2 and np.array_equal(vals[0], vals[1]), v.path
print("MIRRORED_OK", strategy.num_replicas_in_sync)
"""


def test_mirrored_strategy_scores_the_global_batch():
    """Two replicas: the all-reduced score equals the one-device score of the same batch."""
    proc = run_on_two_cpus(_MIRRORED)
    assert "MIRRORED_OK 2" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
