"""Training reliability: one pruning step per training step (shared layers), custom loops
that forget a callback hook, and non-finite values (issue 10, items 4, 6 and 7)."""

import json
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import lenet, random_data
from two_cpus import run_on_two_cpus

import tfprune
from tfprune import methods, schedules
from tfprune import structures as S
from tfprune.wrapper import find_wrappers


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _siamese():
    """Two inputs through one shared Dense (called twice per step), then a head."""
    a, b = keras.Input((8,), name="a"), keras.Input((8,), name="b")
    shared = keras.layers.Dense(16, activation="relu", name="shared")
    x = keras.layers.Concatenate(name="cat")([shared(a), shared(b)])
    return keras.Model([a, b], keras.layers.Dense(3, name="head")(x), name="siamese")


def _siamese_pruned(per_execution=1, end_step=8):
    sched = schedules.PolynomialDecay(0.0, 0.75, begin_step=0, end_step=end_step, frequency=2)
    pruned = tfprune.prune(_siamese(), methods.Magnitude(schedule=sched), layers=["shared"])
    pruned.compile(keras.optimizers.SGD(0.05),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   steps_per_execution=per_execution)
    return pruned


def _siamese_data(n=40):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8)).astype("float32")
    return [x, x[::-1].copy()], np.arange(n) % 3


def _kernel_sparsity(wrapper):
    return float((wrapper.method.final_masks(wrapper)["kernel"] == 0).mean())


# -- item 6: a shared layer counts one step per training step --------------------------
@pytest.mark.parametrize("per_execution", [1, 3])
def test_a_shared_layer_counts_one_pruning_step_per_training_step(per_execution):
    pruned = _siamese_pruned(per_execution)
    x, y = _siamese_data()
    cb = tfprune.callbacks.Pruning()
    pruned.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[cb])  # 2 x 5 steps
    w = pruned.get_layer("shared")
    assert int(_np(w.step)) == 10 and cb._steps[id(w)] == 10
    assert _kernel_sparsity(w) == 0.75


@pytest.mark.parametrize("per_execution", [1, 2])
def test_a_shared_layer_resumes_from_a_keras_file_exactly(tmp_path, per_execution):
    # The schedule spans both epochs: a step counted twice per training step would
    # resume the second epoch at step 10 instead of 5, past the schedule's end.
    x, y = _siamese_data()
    keras.utils.set_random_seed(1)
    ref = _siamese_pruned(per_execution, end_step=9)
    ref.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
            callbacks=[tfprune.callbacks.Pruning()])
    keras.utils.set_random_seed(1)
    first = _siamese_pruned(per_execution, end_step=9)
    first.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False,
              callbacks=[tfprune.callbacks.Pruning()])
    assert int(_np(first.get_layer("shared").step)) == 5
    first.save(tmp_path / "mid.keras")
    resumed = keras.models.load_model(tmp_path / "mid.keras")
    resumed.fit(x, y, batch_size=8, epochs=2, initial_epoch=1, verbose=0, shuffle=False,
                callbacks=[tfprune.callbacks.Pruning()])
    w_ref, w_res = ref.get_layer("shared"), resumed.get_layer("shared")
    assert int(_np(w_res.step)) == int(_np(w_ref.step)) == 10
    np.testing.assert_array_equal(w_res.method.final_masks(w_res)["kernel"],
                                  w_ref.method.final_masks(w_ref)["kernel"])
    assert _kernel_sparsity(w_res) == 0.75
    for a, b in zip(ref.weights, resumed.weights, strict=True):
        np.testing.assert_allclose(_np(a), _np(b), rtol=1e-5, atol=1e-6)


def test_a_shared_layer_under_mirrored_strategy_counts_one_step_per_step():
    proc = run_on_two_cpus("""
        import json
        from tfprune import methods, schedules
        x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
        y = np.arange(32) % 3
        with strategy.scope():
            a, b = keras.Input((8,)), keras.Input((8,))
            shared = keras.layers.Dense(16, activation="relu", name="shared")
            h = keras.layers.Concatenate()([shared(a), shared(b)])
            model = keras.Model([a, b], keras.layers.Dense(3)(h))
            sched = schedules.PolynomialDecay(0.0, 0.75, begin_step=0, end_step=6, frequency=2)
            pruned = tfprune.prune(model, methods.Magnitude(schedule=sched), layers=["shared"])
            pruned.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        pruned.fit([x, x[::-1]], y, batch_size=8, epochs=2, verbose=0,
                   callbacks=[tfprune.callbacks.Pruning()])
        w = pruned.get_layer("shared")
        steps = [int(v) for v in strategy.experimental_local_results(w.step.value)]
        mask = w.method.final_masks(w)["kernel"]
        print(json.dumps({"steps": steps, "sparsity": float((mask == 0).mean())}))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"steps": [8, 8], "sparsity": 0.75}  # 32 / 8 per global batch x 2 epochs


def test_a_shared_layer_under_xla_counts_one_step_per_training_step():
    pruned = _siamese_pruned()
    pruned.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   jit_compile=True)
    x, y = _siamese_data(16)
    pruned.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[tfprune.callbacks.Pruning()])
    assert int(_np(pruned.get_layer("shared").step)) == 4


def test_a_shared_layer_in_eager_fit_raises_instead_of_counting_two_steps():
    pruned = _siamese_pruned()
    pruned.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   run_eagerly=True)
    x, y = _siamese_data(16)
    with pytest.raises(RuntimeError, match=r"'shared'.*not announced.*shared layer"):
        pruned.fit(x, y, batch_size=8, epochs=1, verbose=0,
                   callbacks=[tfprune.callbacks.Pruning()])


# -- item 7: custom training loops ------------------------------------------------------
def _custom_loop_setup(model=None, jit_compile=False):
    sched = schedules.PolynomialDecay(0.0, 0.7, begin_step=0, end_step=6, frequency=2)
    pruned = tfprune.prune(model or lenet(), methods.Magnitude(schedule=sched))
    optimizer = keras.optimizers.SGD(0.01)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(jit_compile=jit_compile)
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, pruned(xb, training=True)) + sum(pruned.losses)
        grads = tape.gradient(loss, pruned.trainable_variables)
        optimizer.apply_gradients(zip(grads, pruned.trainable_variables))
        return loss

    x, y = random_data((12, 12, 1), n=32, classes=4)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # 4 steps per epoch
    cb = tfprune.callbacks.Pruning()
    cb.set_model(pruned)
    return pruned, train_step, dataset, cb


def _steps(model):
    return {w.name: int(_np(w.step)) for w in find_wrappers(model)}


def test_the_documented_custom_loop_prunes_and_counts_every_step():
    pruned, train_step, dataset, cb = _custom_loop_setup()
    cb.on_train_begin()
    for epoch in range(2):
        for step, (xb, yb) in enumerate(dataset):
            cb.on_train_batch_begin(step)
            train_step(xb, yb)
        cb.on_epoch_end(epoch)
    cb.on_train_end()
    assert set(_steps(pruned).values()) == {8}
    assert all(_kernel_sparsity(w) == pytest.approx(0.7, abs=0.01)
               for w in find_wrappers(pruned))
    # A second run with the same traced step (the hooks called again) continues.
    cb.on_train_begin()
    for step, (xb, yb) in enumerate(dataset):
        cb.on_train_batch_begin(step)
        train_step(xb, yb)
    cb.on_train_end()
    assert set(_steps(pruned).values()) == {12}


def test_a_custom_loop_that_never_calls_on_train_batch_begin_raises():
    pruned, train_step, dataset, cb = _custom_loop_setup()
    cb.on_train_begin()
    xb, yb = next(iter(dataset))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"not announced by tfprune\.callbacks\.Pruning\(\).*"
                             r"on_train_batch_begin"):
        train_step(xb, yb)
    assert set(_steps(pruned).values()) == {0}


def test_a_custom_loop_that_skips_the_hook_after_some_steps_raises():
    pruned, train_step, dataset, cb = _custom_loop_setup()
    cb.on_train_begin()
    batches = list(dataset)
    for step, (xb, yb) in enumerate(batches[:2]):
        cb.on_train_batch_begin(step)
        train_step(xb, yb)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not announced"):
        train_step(*batches[2])
    assert set(_steps(pruned).values()) == {2}


def test_reusing_the_traced_step_after_on_train_end_raises():
    pruned, train_step, dataset, cb = _custom_loop_setup()
    cb.on_train_begin()
    for step, (xb, yb) in enumerate(dataset):
        cb.on_train_batch_begin(step)
        train_step(xb, yb)
    cb.on_train_end()
    xb, yb = next(iter(dataset))
    with pytest.raises(tf.errors.InvalidArgumentError, match="after on_train_end"):
        train_step(xb, yb)
    assert set(_steps(pruned).values()) == {4}


def test_an_eager_custom_loop_that_forgets_the_hook_raises():
    pruned, _, dataset, cb = _custom_loop_setup()
    cb.on_train_begin()
    xb, _ = next(iter(dataset))
    cb.on_train_batch_begin(0)
    pruned(xb, training=True)
    with pytest.raises(RuntimeError, match=r"PruneWrapper '\w+'.*step 1, announced up to 1"):
        pruned(xb, training=True)


def test_under_xla_a_forgotten_hook_stops_the_step_instead_of_raising():
    # XLA compiles the assertion away; the step then stays at the last announced one.
    pruned, train_step, dataset, cb = _custom_loop_setup(jit_compile=True)
    cb.on_train_begin()
    for step, (xb, yb) in enumerate(dataset):
        if step < 2:
            cb.on_train_batch_begin(step)
        train_step(xb, yb)
    assert set(_steps(pruned).values()) == {2}


def test_a_custom_loop_with_a_shared_layer_counts_one_step_per_step():
    pruned, train_step, _, cb = _custom_loop_setup(_siamese())
    x, y = _siamese_data(16)
    cb.on_train_begin()
    for step in range(6):
        cb.on_train_batch_begin(step)
        train_step([x[0][:8], x[1][:8]], y[:8])
    cb.on_train_end()
    steps = _steps(pruned)
    assert "shared" in steps and set(steps.values()) == {6}


# -- item 4: non-finite values ------------------------------------------------------------
def test_a_nan_batch_stops_fit_at_the_next_mask_update_naming_layer_and_step():
    sched = schedules.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=6, frequency=2)
    pruned = tfprune.prune(lenet(), methods.Magnitude(schedule=sched))
    pruned.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = random_data((12, 12, 1), n=32, classes=4)
    x[8] = np.nan  # the second batch
    with pytest.raises(ValueError, match=r"layer '\w+'.*non-finite.*pruning step 2.*"
                                         r"TerminateOnNaN"):
        pruned.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False,
                   callbacks=[tfprune.callbacks.Pruning()])


def test_terminate_on_nan_stops_before_the_masks_are_chosen_from_nan():
    sched = schedules.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=6, frequency=2)
    pruned = tfprune.prune(lenet(), methods.Magnitude(schedule=sched))
    pruned.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = random_data((12, 12, 1), n=32, classes=4)
    x[8] = np.nan
    pruned.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False,
               callbacks=[keras.callbacks.TerminateOnNaN(), tfprune.callbacks.Pruning()])
    assert set(_steps(pruned).values()) == {2}


def test_an_epoch_end_mask_update_on_nan_weights_raises():
    pruned = tfprune.prune(lenet(), methods.DPP(1, 2, structure=S.Filter(), anneal_steps=4))
    cb = tfprune.callbacks.Pruning()
    cb.set_model(pruned)
    cb.on_train_begin()
    kernel = pruned.get_layer("fc").layer.kernel
    kernel.assign(np.where(np.eye(*kernel.shape, dtype=bool), np.nan, _np(kernel)))
    with pytest.raises(ValueError, match=r"layer 'fc' has \d+ non-finite.*end of epoch 0"):
        cb.on_epoch_end(0)


def _nan_in_kept_weights(pruned, name):
    w = pruned.get_layer(name)
    kernel = _np(w.layer.kernel)
    kernel[0, :] = np.nan  # every unit: kept and pruned ones
    w.layer.kernel.assign(kernel)


def test_strip_refuses_nan_weights_naming_the_layer():
    pruned = tfprune.prune(lenet(), methods.Magnitude(0.5, structure=S.Filter()))
    w = pruned.get_layer("fc")
    w.method.update(w, 0)
    _nan_in_kept_weights(pruned, "fc")
    with pytest.raises(ValueError, match=r"strip: layer 'fc' has 16 non-finite.*kernel"):
        tfprune.strip(pruned)
    with pytest.raises(ValueError, match="strip: layer 'fc'"):
        tfprune.strip(w)


def test_shrink_blames_nan_weights_not_itself():
    pruned = tfprune.prune(lenet(), methods.Magnitude(0.5, structure=S.Filter()))
    for w in find_wrappers(pruned):
        w.method.update(w, 0)
    plain = tfprune.strip(pruned)
    kernel = _np(plain.get_layer("fc").kernel)
    kernel[0, 0] = np.nan
    plain.get_layer("fc").kernel.assign(kernel)
    with pytest.raises(ValueError, match=r"shrink: .*1 non-finite.*fc/kernel"):
        tfprune.shrink(plain)
    _nan_in_kept_weights(pruned, "c2")
    with pytest.raises(ValueError, match="layer 'c2'"):
        tfprune.shrink(pruned)


def test_report_counts_nan_weights_as_nonzero_and_warns():
    pruned = tfprune.prune(lenet(), methods.Magnitude(0.5, structure=S.Filter()))
    w = pruned.get_layer("fc")
    w.method.update(w, 0)
    before = tfprune.sparsity_report(pruned)
    _nan_in_kept_weights(pruned, "fc")
    with pytest.warns(RuntimeWarning, match=r"'fc' \(16\).*never as pruned zeros"):
        report = tfprune.sparsity_report(pruned)
    row = next(r for r in report.rows if r["layer"] == "fc")
    old = next(r for r in before.rows if r["layer"] == "fc")
    # The 8 NaN of pruned units (NaN x 0 = NaN) count as nonzero and keep their units.
    assert row["nonfinite"] == 16 and report.total["nonfinite"] == 16
    assert row["nonzero"] == old["nonzero"] + 8
    assert row["units_kept"] == row["units"] == 16 != old["units_kept"]
    assert "non-finite (NaN/Inf) weights, counted as nonzero: fc (16)" in str(report)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "non-finite" not in str(before)
