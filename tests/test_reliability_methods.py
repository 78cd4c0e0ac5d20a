"""Reliability of every method: exact resume, mixed precision, SavedModel export, seeds.

* Exact resume: ``fit N epochs`` equals ``fit k epochs, save .keras, load, fit N - k
  epochs`` bit for bit (weights, pruning state and optimizer state), for Magnitude, DPP
  (2:4, kernel, filter with fake quantization, anneal resolved by the fit) and TurboVBI.
* Mixed precision: every method trains under ``mixed_float16`` with finite losses and the
  masks its structure asks for, its state and losses in float32.
* ``tf.saved_model.save`` of a pruned model, reloaded, serves the pruned outputs.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfprune
from tfprune import methods, schedules, structures
from tfprune.wrapper import find_wrappers

N_EPOCHS, STOP_AFTER, BATCH = 3, 1, 8  # 32 examples: 4 steps per epoch, 12 steps in all


def _data(n=32):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 6, 6, 2)).astype("float32"), rng.integers(0, 3, n)


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(8, 3, name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(),
        keras.layers.Conv2D(8, 3, name="conv2"),  # 8 input channels: kernel runs of 4
        keras.layers.Flatten(),
        keras.layers.Dense(3, name="out"),
    ])


METHODS = {
    "magnitude_filter": lambda: methods.Magnitude(
        schedule=schedules.PolynomialDecay(0.0, 0.75, begin_step=0, end_step=10, frequency=2),
        structure=structures.Filter()),
    "dpp_2of4": lambda: methods.DPP(2, 4, noise_scale=1.0, anneal_steps=12),
    "dpp_kernel": lambda: methods.DPP(1, 4, structure=structures.Kernel(), noise_scale=1.0,
                                      anneal_steps=12),
    "dpp_filter_int8": lambda: methods.DPP(keep_ratio=0.5, structure=structures.Filter(),
                                           quantize=8, noise_scale=1.0, anneal_steps=12),
    "turbo_vbi_steps": lambda: methods.TurboVBI(num_train_examples=32, update_every=2,
                                                sigma_init=0.05, kl_weight=1.0),
    "turbo_vbi_epoch": lambda: methods.TurboVBI(num_train_examples=32, sigma_init=0.05,
                                                kl_weight=1.0, support_prior="chain"),
    "turbo_vbi_filter": lambda: methods.TurboVBI(
        num_train_examples=32, update_every=2, sigma_init=0.05, kl_weight=1.0,
        structure=structures.Filter(), unit_schedule=schedules.PolynomialDecay(
            0.0, 0.5, begin_step=0, end_step=10, frequency=2)),
}


def _pruned(method):
    pruned = tfprune.prune(_model(), method)
    pruned.compile(keras.optimizers.Adam(0.01),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return pruned


def _fit(model, epochs, **kw):
    x, y = _data()
    return model.fit(x, y, epochs=epochs, batch_size=BATCH, shuffle=False, verbose=0,
                     callbacks=[tfprune.callbacks.Pruning(), *kw.pop("callbacks", [])], **kw)


def _state(model):
    """``[(name, value)]`` of every weight (layers and pruning state) and optimizer variable.

    In order: names differ between a model and its reloaded copy, the order does not.
    """
    variables = list(model.weights) + list(model.optimizer.variables)
    return [(v.path, np.array(v.numpy())) for v in variables]


def _assert_same_state(got, want):
    assert [v.shape for _, v in got] == [v.shape for _, v in want]
    differ = [name for (name, a), (_, b) in zip(want, got) if not np.array_equal(a, b)]
    assert not differ, f"{len(differ)} variables differ after resuming: {differ[:8]}"


class _StopAfter(keras.callbacks.Callback):
    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 >= self.epochs:
            self.model.stop_training = True


@pytest.mark.parametrize("name", list(METHODS))
def test_resume_from_keras_file_is_bit_exact(tmp_path, name):
    """fit(3) == fit(1) + save + load + fit(2): weights, masks, seeds, steps, optimizer."""
    straight = _pruned(METHODS[name]())
    _fit(straight, N_EPOCHS)
    want = _state(straight)

    first = _pruned(METHODS[name]())
    _fit(first, STOP_AFTER)
    path = tmp_path / "mid.keras"
    first.save(path)
    del first
    resumed = keras.models.load_model(path)
    _fit(resumed, N_EPOCHS - STOP_AFTER)
    _assert_same_state(_state(resumed), want)
    for a, b in zip(find_wrappers(resumed), find_wrappers(straight)):
        assert int(a.step.numpy()) == int(b.step.numpy()) == N_EPOCHS * 4
        for key, mask in b.method.final_masks(b).items():
            np.testing.assert_array_equal(a.method.final_masks(a)[key], mask)
    # The run was not trivial: something was pruned.
    masks = [m for w in find_wrappers(straight) for m in w.method.final_masks(w).values()]
    assert any((m == 0).any() for m in masks)


def test_resume_with_the_anneal_resolved_by_the_interrupted_fit(tmp_path):
    """DPP(anneal_steps=None): the fit of N epochs stopped after k and resumed with
    ``initial_epoch=k`` equals the uninterrupted fit."""
    def method():
        return methods.DPP(2, 4, noise_scale=1.0)

    straight = _pruned(method())
    _fit(straight, N_EPOCHS)
    first = _pruned(method())
    _fit(first, N_EPOCHS, callbacks=[_StopAfter(STOP_AFTER)])
    assert int(first.get_layer("conv").step.numpy()) == STOP_AFTER * 4
    path = tmp_path / "mid.keras"
    first.save(path)
    resumed = keras.models.load_model(path)
    _fit(resumed, N_EPOCHS, initial_epoch=STOP_AFTER)
    assert int(resumed.get_layer("conv").state["anneal_steps"].numpy()) == N_EPOCHS * 4
    _assert_same_state(_state(resumed), _state(straight))


def test_noise_depends_on_the_saved_step_not_on_a_generator_state():
    """The same step gives the same training mask (also after other draws); the next
    step another one."""
    keras.utils.set_random_seed(0)
    w = tfprune.PruneWrapper(keras.layers.Dense(16), methods.DPP(2, 4, noise_scale=5.0))
    w(np.zeros((1, 16), "float32"))
    w.step.assign(5)
    a = w.method.group_masks(w, training=True)["kernel"].numpy()
    w.method.group_masks(w, training=True)
    np.testing.assert_array_equal(w.method.group_masks(w, training=True)["kernel"].numpy(), a)
    w.step.assign(6)
    assert not np.array_equal(w.method.group_masks(w, training=True)["kernel"].numpy(), a)


@pytest.mark.parametrize("make", [
    lambda seed: methods.DPP(2, 4, seed=seed),
    lambda seed: methods.TurboVBI(num_train_examples=8),
], ids=["dpp", "turbo_vbi"])
def test_seeds_are_repeatable_under_set_random_seed_and_distinct_per_layer(make):
    def seeds(global_seed, seed=None):
        keras.utils.set_random_seed(global_seed)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, name="a"),
                                  keras.layers.Dense(8, name="b"),
                                  keras.layers.Dense(3, name="c")])
        pruned = tfprune.prune(model, make(seed))
        return [tuple(w.state["noise_seed"].numpy()) for w in find_wrappers(pruned)]

    first = seeds(1)
    assert len(first) >= 2 and len(set(first)) == len(first)  # distinct per layer
    assert seeds(1) == first  # repeatable
    assert seeds(2) != first  # follows the global seed
    if isinstance(make(None), methods.DPP):
        fixed = seeds(1, seed=7)
        assert seeds(2, seed=7) == fixed and len(set(fixed)) == len(fixed)


# ---------------------------------------------------------------------------
# Mixed precision.

MIXED = {
    "magnitude_filter": lambda: methods.Magnitude(0.5, structure=structures.Filter()),
    "dpp_2of4_int8": lambda: methods.DPP(2, 4, quantize=8, anneal_steps=8),
    "dpp_filter": lambda: methods.DPP(keep_ratio=0.5, structure="filter", anneal_steps=8),
    "turbo_vbi": lambda: methods.TurboVBI(num_train_examples=32, update_every=2,
                                          kl_weight=1.0),
    "turbo_vbi_filter": lambda: methods.TurboVBI(num_train_examples=32, update_every=2,
                                                 kl_weight=1.0, structure="filter",
                                                 unit_sparsity=0.5),
}


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("name", list(MIXED))
def test_every_method_trains_under_mixed_float16(mixed_float16, name):
    x, y = _data()
    pruned = tfprune.prune(_model(), MIXED[name]())
    pruned.compile(keras.optimizers.Adam(0.01),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    sigma_before = {w.name: w.state["kernel_sigma"].numpy().copy() for w in find_wrappers(pruned)
                    if isinstance(w.method, methods.TurboVBI)}
    hist = pruned.fit(x, y, epochs=2, batch_size=BATCH, verbose=0,
                      callbacks=[tfprune.callbacks.Pruning()])
    assert np.isfinite(hist.history["loss"]).all(), hist.history["loss"]
    wrappers = {w.name: w for w in find_wrappers(pruned)}
    conv = wrappers["conv"]
    assert conv.compute_dtype == "float16"
    # State stays in the variable dtype; training outputs and losses are well typed.
    for w in wrappers.values():
        for _, var in w.state.items():
            assert var.dtype in ("float32", "int64"), (w.name, var.path, var.dtype)
    out = _training_call(pruned, x[:4])
    assert out.dtype == "float16"
    assert pruned.losses == [] or all(loss.dtype == "float32" for loss in pruned.losses)
    assert np.isfinite(keras.ops.convert_to_numpy(out)).all()

    kernel = conv.method.final_masks(conv)["kernel"]
    canon = kernel.reshape(-1, kernel.shape[-1])  # [fan_in, units]
    if name in ("magnitude_filter", "dpp_filter"):
        units = conv.method.unit_mask(conv)
        assert units.sum() == 4, units  # 4 of 8 units kept
        np.testing.assert_array_equal(wrappers["bn"].method.unit_mask(wrappers["bn"]), units)
        bn_out = keras.ops.convert_to_numpy(pruned.layers[1](pruned.layers[0](x[:4])))
        assert (bn_out[..., units == 0] == 0).all()  # Follow masks the BatchNormalization
    elif name == "dpp_2of4_int8":
        kept = (tfprune.strip(pruned).get_layer("conv").kernel.numpy() != 0)
        per_run = kept.reshape(-1, 8)[:16].reshape(4, 4, 8).sum(axis=1)  # 18 rows: 4 runs
        assert (per_run == 2).all(), per_run
    else:
        assert set(np.unique(canon)) <= {0.0, 1.0}
        assert int(conv.state["kernel_turbo_iterations"].numpy()) >= 1
        assert not np.array_equal(conv.state["kernel_sigma"].numpy(), sigma_before["conv"])
        assert np.isfinite(float(conv.method.kl_divergence(conv)))


def _training_call(model, x):
    """One training-mode call, announced by the callback's hooks as in a custom loop."""
    cb = tfprune.callbacks.Pruning()
    cb.set_model(model)
    cb.on_train_begin()
    cb.on_train_batch_begin(0)
    try:
        return model(x, training=True)
    finally:
        cb.on_train_end()


def test_turbo_vbi_kl_and_noise_are_float32_under_mixed_float16(mixed_float16):
    """The KL term added to the losses is float32 and equals the float32 policy's one;
    the sampled outputs agree up to float16 rounding."""
    def model():
        keras.utils.set_random_seed(0)
        return tfprune.prune(keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="d"),
                                               keras.layers.Dense(2, name="e")]),
                             methods.TurboVBI(num_train_examples=8, sigma_init=0.1))

    m16 = model()
    keras.mixed_precision.set_global_policy("float32")
    m32 = model()
    for a, b in zip(m16.weights, m32.weights):
        b.assign(a.numpy())
    x = np.random.default_rng(0).normal(size=(5, 6)).astype("float32")
    y16, y32 = _training_call(m16, x), _training_call(m32, x)
    assert y16.dtype == "float16" and y32.dtype == "float32"
    assert len(m16.losses) == 2 and all(loss.dtype == "float32" for loss in m16.losses)
    for a, b in zip(m16.losses, m32.losses):
        np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(y16).astype("float32"),
                               keras.ops.convert_to_numpy(y32), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------
# SavedModel.

SAVED = {
    "magnitude_filter": lambda: methods.Magnitude(0.5, structure=structures.Filter()),
    "magnitude_2of4": lambda: methods.Magnitude(structure=structures.KOutOfN(2, 4)),
    "dpp_2of4": lambda: methods.DPP(2, 4, anneal_steps=8),
    "turbo_vbi": lambda: methods.TurboVBI(num_train_examples=32, update_every=2,
                                          kl_weight=1.0),
    "turbo_vbi_filter": lambda: methods.TurboVBI(num_train_examples=32, update_every=2,
                                                 kl_weight=1.0, structure="filter",
                                                 unit_sparsity=0.5),
}


@pytest.mark.parametrize("name", list(SAVED))
def test_saved_model_export_serves_the_pruned_outputs(tmp_path, name):
    x, y = _data()
    pruned = _pruned(SAVED[name]())
    _fit(pruned, 1)
    masks = [m for w in find_wrappers(pruned) for m in w.method.final_masks(w).values()]
    assert any((m == 0).any() for m in masks)
    tf.saved_model.save(pruned, str(tmp_path / "sm"))
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    served = list(loaded.signatures["serving_default"](tf.constant(x)).values())[0].numpy()
    np.testing.assert_allclose(served, pruned.predict(x, verbose=0), rtol=1e-6, atol=1e-6)
    plain = tfprune.strip(pruned)
    np.testing.assert_allclose(served, plain.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Fake quantization of float16 tensors.


@pytest.mark.parametrize("bits", [8, 4])
def test_fake_quantize_float16_lands_on_the_float32_grid(bits):
    from tfprune.quantization import fake_quantize

    w16 = (np.random.default_rng(0).normal(size=(64, 6)) * 3).astype("float16")
    got = keras.ops.convert_to_numpy(fake_quantize(w16, bits))
    want = keras.ops.convert_to_numpy(fake_quantize(w16.astype("float32"), bits))
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, want.astype("float16"))
    x = tf.constant(w16)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(fake_quantize(x, bits) * 2.0)
    np.testing.assert_array_equal(tape.gradient(y, x).numpy(), np.full(w16.shape, 2.0, "float16"))
