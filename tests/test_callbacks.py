"""The Pruning callback: fit, resume, determinism, distribution, TensorBoard, custom loops."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import compile_sgd, lenet, random_data

import tfprune
from tfprune import methods, schedules
from tfprune import structures as S
from tfprune.wrapper import find_wrappers

HERE = Path(__file__).resolve().parent


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _sparsities(model):
    return {w.name: float((w.method.final_masks(w)[w.handler.unit_spec().name] == 0).mean())
            for w in find_wrappers(model) if not isinstance(w.method, methods.Follow)}


def _removed(model):
    """{layer: (groups removed, groups)} on each layer's structure grid.

    For `KOutOfN` the second number is the count of groups k-of-n must remove.
    """
    from tfprune.handlers import to_canonical

    out = {}
    for w in find_wrappers(model):
        if isinstance(w.method, methods.Follow):
            continue
        spec = w.handler.unit_spec()
        mask = w.method.final_masks(w)[spec.name]
        kept = _np(w.method.structure.reduce(to_canonical(mask, spec.layout))) > 0
        if isinstance(w.method.structure, S.KOutOfN):
            k, n = w.method.structure.k, w.method.structure.n
            for start in range(0, kept.shape[0], n):  # a trailing short run keeps min(k, m)
                run = kept[start:start + n]
                assert np.all(run.sum(axis=0) == min(k, run.shape[0])), w.name
            expected = sum(len(kept[i:i + n]) - min(k, len(kept[i:i + n]))
                           for i in range(0, kept.shape[0], n)) * kept.shape[1]
            out[w.name] = (int((~kept).sum()), expected)
            continue
        out[w.name] = (int((~kept).sum()), kept.size)
    return out


def _lenet_pruned(method, optimizer="adam"):
    pruned = tfprune.prune(lenet(), method)
    pruned.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return pruned


@pytest.mark.parametrize("method", [
    methods.Magnitude(0.8),
    methods.Magnitude(schedule=schedules.PolynomialDecay(0.0, 0.6, 0, 6, frequency=2),
                      structure=S.Filter()),
    methods.Magnitude(structure=S.KOutOfN(2, 4)),
], ids=["one-shot", "poly-filter", "2:4"])
def test_fit_with_the_callback_prunes_every_layer_to_the_target(method):
    pruned = _lenet_pruned(method)
    x, y = random_data((12, 12, 1), n=32, classes=4)
    pruned.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[tfprune.callbacks.Pruning()])
    got = _removed(pruned)
    kn = isinstance(method.structure, S.KOutOfN)
    assert got and all(removed == (size if kn else round(method.target_sparsity * size))
                       for removed, size in got.values())
    report = tfprune.sparsity_report(pruned)
    assert report.total["nonzero"] < report.total["params"]
    for w in find_wrappers(pruned):
        assert int(_np(w.step)) == 8


@pytest.mark.parametrize("per_execution", [1, 4])
def test_steps_per_execution_advances_the_schedule_by_every_training_step(per_execution):
    # 10 steps per epoch: executions of 4, 4 and 2 steps; pruning due at steps 0, 2, ..., 14.
    sched = schedules.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=14, frequency=2)
    pruned = tfprune.prune(lenet(), methods.Magnitude(schedule=sched))
    pruned.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   steps_per_execution=per_execution)
    x, y = random_data((12, 12, 1), n=80, classes=4)
    cb = tfprune.callbacks.Pruning()
    pruned.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[cb])
    for w in find_wrappers(pruned):
        assert int(_np(w.step)) == 20 and cb._steps[id(w)] == 20
    assert all(removed == round(0.8 * size) for removed, size in _removed(pruned).values())


def _resume_setup():
    keras.utils.set_random_seed(7)
    sched = schedules.PolynomialDecay(0.0, 0.75, begin_step=0, end_step=14, frequency=3)
    pruned = _lenet_pruned(methods.Magnitude(schedule=sched, structure=S.Kernel()))
    x, y = random_data((12, 12, 1), n=64, classes=4, seed=3)
    return pruned, x, y


def _state(model):
    masks = {f"{i}/{k}": v for i, w in enumerate(find_wrappers(model))
             for k, v in w.method.final_masks(w).items()}
    return [_np(v) for v in model.weights], masks


def test_model_saved_mid_training_resumes_to_the_same_weights_and_masks(tmp_path):
    # Uninterrupted: 2 epochs of 8 steps; the schedule spans both epochs.
    ref, x, y = _resume_setup()
    ref.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
            callbacks=[tfprune.callbacks.Pruning()])
    # Interrupted: 1 epoch, save, load in a fresh session, 1 more epoch.
    first, x, y = _resume_setup()
    first.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False,
              callbacks=[tfprune.callbacks.Pruning()])
    mid = _sparsities(first)
    path = tmp_path / "mid.keras"
    first.save(path)
    keras.backend.clear_session()
    resumed = keras.models.load_model(path)
    assert _sparsities(resumed) == mid
    assert all(int(_np(w.step)) == 8 for w in find_wrappers(resumed))
    resumed.fit(x, y, batch_size=8, epochs=2, initial_epoch=1, verbose=0, shuffle=False,
                callbacks=[tfprune.callbacks.Pruning()])
    (ref_w, ref_m), (res_w, res_m) = _state(ref), _state(resumed)
    assert ref_m.keys() == res_m.keys()
    for key in ref_m:
        np.testing.assert_array_equal(res_m[key], ref_m[key], err_msg=key)
    assert len(ref_w) == len(res_w)
    for a, b in zip(ref_w, res_w):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert set(_sparsities(resumed).values()) == {0.75}
    assert 0 < min(mid.values()) < 0.75  # the save really happened mid-schedule


def _seeded_run():
    keras.utils.set_random_seed(123)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dropout(0.3), keras.layers.Dense(3)])
    pruned = compile_sgd(tfprune.prune(model, methods.Magnitude(0.5, structure=S.Filter()),
                                       layers=[model.layers[0].name]))
    x, y = random_data((8,), n=32)
    pruned.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=True,
               callbacks=[tfprune.callbacks.Pruning()])
    return _state(pruned)


def test_set_random_seed_makes_two_runs_identical():
    (w1, m1), (w2, m2) = _seeded_run(), _seeded_run()
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)
    for key in m1:
        np.testing.assert_array_equal(m1[key], m2[key])


@pytest.mark.parametrize("structure", ["unstructured", "filter"])
def test_mirrored_strategy_on_two_cpu_devices_trains_to_the_target(structure):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(HERE / "helpers_mirrored.py"), structure],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    assert all(np.isfinite(out["loss"]))
    assert set(out["sparsity"].values()) == {0.75}
    assert set(out["steps"].values()) == {8}  # 64 samples / 16 per global batch x 2 epochs
    assert out["replica_mismatch"] == 0.0
    assert out["strip_max_diff"] < 1e-5
    if structure == "filter":
        assert out["units_kept"] == {"conv": 2, "bn": 2, "fc": 4}


def _read_scalars(log_dir):
    scalars = {}
    files = list(Path(log_dir).rglob("events.out.tfevents.*"))
    assert files, f"no event file under {log_dir}"
    tags = set()
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tags.add(value.tag)
                if value.tag.startswith("mask/"):
                    continue
                scalars.setdefault(value.tag, []).append(
                    (event.step, float(tf.make_ndarray(value.tensor))))
    return scalars, tags


def test_log_dir_writes_sparsity_scalars_and_mask_images_for_tensorboard(tmp_path):
    sched = schedules.PolynomialDecay(0.0, 0.5, 0, 4, frequency=2)
    pruned = _lenet_pruned(methods.Magnitude(schedule=sched))
    x, y = random_data((12, 12, 1), n=16, classes=4)
    cb = tfprune.callbacks.Pruning(log_dir=tmp_path / "logs")
    pruned.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[cb])
    scalars, tags = _read_scalars(tmp_path / "logs")
    for name in ("c1", "c2", "fc", "out"):
        series = sorted(scalars[f"sparsity/{name}"])
        assert [step for step, _ in series] == [0, 1]
        w = pruned.get_layer(name)
        expected = tfprune.sparsity_report(pruned).rows[[r["layer"] for r in
                                                         tfprune.sparsity_report(pruned).rows]
                                                        .index(name)]["sparsity"]
        assert series[-1][1] == pytest.approx(expected, abs=1e-6)
        assert series[-1][1] > 0.4
        assert f"mask/{w.name}" in tags


def test_custom_training_loop_with_the_callback_hooks_prunes():
    sched = schedules.PolynomialDecay(0.0, 0.7, begin_step=0, end_step=6, frequency=2)
    pruned = tfprune.prune(lenet(), methods.Magnitude(schedule=sched))
    optimizer = keras.optimizers.Adam(1e-2)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x, y = random_data((12, 12, 1), n=64, classes=4)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, pruned(xb, training=True))
        grads = tape.gradient(loss, pruned.trainable_variables)
        optimizer.apply_gradients(zip(grads, pruned.trainable_variables))
        return loss

    cb = tfprune.callbacks.Pruning()
    cb.set_model(pruned)
    cb.on_train_begin()
    losses = []
    for epoch in range(2):
        for step, (xb, yb) in enumerate(dataset):
            cb.on_train_batch_begin(step)
            losses.append(float(train_step(xb, yb)))
        cb.on_epoch_end(epoch)
    cb.on_train_end()
    assert all(removed == round(0.7 * size) for removed, size in _removed(pruned).values())
    assert all(int(_np(w.step)) == 16 for w in find_wrappers(pruned))
    assert np.all(np.isfinite(losses))
    # Pruned weights get no gradient: the effective kernel stays exactly masked.
    for w in find_wrappers(pruned):
        mask = w.method.final_masks(w)["kernel"]
        assert np.all(_np(w.method.effective_variables(w, False)["kernel"])[mask == 0] == 0)


def test_custom_training_loop_without_the_hooks_raises():
    pruned = tfprune.prune(lenet(), methods.Magnitude(0.5))
    x, _ = random_data((12, 12, 1), n=4, classes=4)
    with pytest.raises(RuntimeError, match="Pruning"):
        with tf.GradientTape():
            pruned(x, training=True)


def test_fitting_again_without_the_callback_after_a_fit_with_it_raises():
    pruned = _lenet_pruned(methods.Magnitude(0.5))
    x, y = random_data((12, 12, 1), n=16, classes=4)
    pruned.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[tfprune.callbacks.Pruning()])
    # The traced step is kept across fits; its in-graph check finds the step unannounced.
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="not announced by tfprune.callbacks.Pruning"):
        pruned.fit(x, y, batch_size=8, epochs=1, verbose=0)
    # ... and with the callback again it trains (a failed fit leaves no stale trace behind).
    pruned.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[tfprune.callbacks.Pruning()])
    assert all(int(_np(w.step)) == 4 for w in find_wrappers(pruned))


def test_fitting_without_the_callback_first_then_with_it_works():
    pruned = _lenet_pruned(methods.Magnitude(0.5))
    x, y = random_data((12, 12, 1), n=16, classes=4)
    with pytest.raises(RuntimeError):
        pruned.fit(x, y, batch_size=8, epochs=1, verbose=0)
    pruned.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[tfprune.callbacks.Pruning()])
    assert set(_sparsities(pruned).values()) == {0.5}


def test_evaluate_and_predict_need_no_callback():
    pruned = _lenet_pruned(methods.Magnitude(0.5))
    x, y = random_data((12, 12, 1), n=16, classes=4)
    assert np.isfinite(pruned.evaluate(x, y, verbose=0))
    assert pruned.predict(x, verbose=0).shape == (16, 4)


def test_callback_on_a_model_without_wrappers_raises():
    model = compile_sgd(lenet())
    x, y = random_data((12, 12, 1), n=8, classes=4)
    with pytest.raises(ValueError, match="no PruneWrapper"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[tfprune.callbacks.Pruning()])
