import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from two_cpus import run_on_two_cpus

import tfprune
from tfprune import methods, structures
from tfprune.methods.dpp import (
    DPP,
    DPPMetricsHistory,
    mask_metrics,
    plot_masks,
    relaxed_topk_mask,
    temperature_at,
)

LAYERS = {
    "Dense": (lambda: keras.layers.Dense(6), (2, 10)),
    "Conv1D": (lambda: keras.layers.Conv1D(4, 3), (2, 8, 3)),
    "Conv2D": (lambda: keras.layers.Conv2D(4, 3), (2, 6, 6, 3)),
    "Conv3D": (lambda: keras.layers.Conv3D(4, 2), (2, 4, 4, 4, 2)),
    "DepthwiseConv2D": (lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2),
                        (2, 6, 6, 3)),
    "SeparableConv2D": (lambda: keras.layers.SeparableConv2D(5, 3), (2, 6, 6, 3)),
    "Conv2DTranspose": (lambda: keras.layers.Conv2DTranspose(4, 3), (2, 5, 5, 3)),
}
# (structure, k, n): n=3 does not divide most fan-ins, so trailing short runs are exercised.
STRUCTURES = [("unstructured", 2, 3), ("unstructured", 3, None), ("kernel", 1, 2),
              ("kernel", 1, None), ("filter", 1, 3), ("filter", 2, None)]


def _wrapper(layer_name, method):
    make, shape = LAYERS[layer_name]
    wrapper = tfprune.PruneWrapper(make(), method)
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    wrapper(x)
    wrapper._callback_attached = True  # as tfprune.callbacks.Pruning does
    return wrapper, x


def _check_runs(entry, grid_mask):
    """Every run of n groups along axis 0 keeps exactly min(k, run length)."""
    mask = np.asarray(grid_mask)
    a, _ = mask.shape
    assert set(np.unique(mask)) <= {0.0, 1.0}
    for start in range(0, a, entry.n):
        run = mask[start:start + entry.n]
        np.testing.assert_array_equal(run.sum(axis=0), min(entry.k, run.shape[0]))


@pytest.mark.parametrize("structure,k,n", STRUCTURES)
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_exactly_k_of_n_in_training_and_inference(layer, structure, k, n):
    if layer == "DepthwiseConv2D" and structure == "kernel" and n is None:
        k = 1  # a depthwise filter has a single kernel
    wrapper, x = _wrapper(layer, DPP(k, n, structure=structure))
    method = wrapper.method
    for training in (True, False, True):
        masks = method.group_masks(wrapper, training)
        for entry in method.entries(wrapper):
            _check_runs(entry, masks[entry.name])
    # The effective kernels are zero exactly where the inference mask is.
    final = method.final_masks(wrapper)
    for name, value in method.effective_variables(wrapper, training=False).items():
        np.testing.assert_array_equal(np.asarray(value) == 0,
                                      (final[name] == 0) | (getattr(wrapper.layer, name) == 0))
    plain = tfprune.strip(wrapper)
    np.testing.assert_allclose(plain(x), wrapper(x), atol=1e-5)


@pytest.mark.parametrize("structure", ["unstructured", "kernel", "filter"])
def test_gradients_reach_the_logits(structure):
    wrapper, x = _wrapper("Conv2D", DPP(1, 2, structure=structure, entropy_weight=0.0))
    with tf.GradientTape() as tape:
        y = wrapper(x, training=True)
        loss = tf.reduce_sum(tf.square(y - 1.0))
    logits = [wrapper.state[e.logits_name] for e in wrapper.method.entries(wrapper)]
    for grad in tape.gradient(loss, logits):
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


@pytest.mark.parametrize("k", [1, 2, 5])
def test_relaxed_draw_equals_k_sequential_softmaxes(k):
    """Closed form == sum of k softmaxes, each over the entries not drawn before."""
    y = tf.Variable(np.random.default_rng(1).normal(size=(3, 4, 6)).astype("float32") * 3)
    weights = tf.constant(np.arange(6, dtype="float32") ** 2)
    with tf.GradientTape(persistent=True) as tape:
        mask = relaxed_topk_mask(y, k, 0.7)
        _, idx = tf.math.top_k(y, k)
        taken, soft = tf.zeros_like(y), tf.zeros_like(y)
        for j in range(k):
            soft += tf.nn.softmax(tf.where(taken > 0, -1e30, y) / 0.7, axis=-1)
            taken += tf.one_hot(idx[..., j], 6)
        loss_a, loss_b = tf.reduce_sum(mask * weights), tf.reduce_sum(soft * weights)
    np.testing.assert_array_equal(mask.numpy(), taken.numpy())  # forward: exact k-hot
    np.testing.assert_allclose(tape.gradient(loss_a, y), tape.gradient(loss_b, y), atol=1e-5)


@pytest.mark.parametrize("shape,k", [((5, 7, 4), 2), ((3, 4), 1), ((6, 8), 3),
                                     ((2, 3, 16), 5), ((4, 4), 4)])
def test_short_run_path_equals_top_k_path(monkeypatch, shape, k):
    """Short runs (pairwise ranks, closed-form softmax Jacobian) == the top_k closed form."""
    from tfprune.methods import dpp_sampler

    rng = np.random.default_rng(0)
    y = rng.normal(size=shape).astype("float32")
    y[..., 1] = y[..., 0]  # ties: the lower index is kept first, as top_k does
    y[0, ..., -1] = -1e9  # a padding slot
    w = tf.constant(rng.normal(size=shape).astype("float32"))

    def run():
        yv = tf.Variable(y)
        with tf.GradientTape() as tape:
            mask = relaxed_topk_mask(yv, k, 0.7)
            loss = tf.reduce_sum(mask * w)
        return mask.numpy(), tape.gradient(loss, yv).numpy()

    short = run()
    monkeypatch.setattr(dpp_sampler, "_PAIRWISE_MAX_N", 0)
    long = run()
    np.testing.assert_array_equal(short[0], long[0])
    np.testing.assert_allclose(short[1], long[1], atol=1e-6)


@pytest.mark.parametrize("pairwise_max_n", [16, 0])
def test_relaxed_draw_is_stable_for_extreme_logits(monkeypatch, pairwise_max_n):
    from tfprune.methods import dpp_sampler

    monkeypatch.setattr(dpp_sampler, "_PAIRWISE_MAX_N", pairwise_max_n)
    y = tf.Variable([[300.0, -300.0, 0.0, 1e4, -1e4, 5.0]])
    with tf.GradientTape() as tape:
        mask = relaxed_topk_mask(y, 3, 0.05)
        loss = tf.reduce_sum(mask * tf.range(6.0))
    grad = tape.gradient(loss, y)
    assert np.all(np.isfinite(grad)) and mask.numpy().sum() == 3


def _reference_masks_and_entropy(method, wrapper, tau):
    """The first releases' layout: runs transposed to ``[R, B, n]`` (n last), the top_k
    closed form for every n, autodiff of ``log_softmax`` for the entropy."""
    masks, entropy = {}, 0.0
    for i, e in enumerate(method.entries(wrapper)):
        (a, b), runs = e.grid, e.runs
        logits = tf.convert_to_tensor(wrapper.state[e.logits_name])
        x = tf.pad(logits, [(0, runs * e.n - a), (0, 0)], constant_values=-1e9)
        x = tf.transpose(tf.reshape(x, (runs, e.n, b)), (0, 2, 1))
        logp = tf.nn.log_softmax(x, axis=-1)
        entropy -= tf.reduce_sum(tf.exp(logp) * logp)
        noise = None
        if method.noise_scale > 0:
            u = method.uniform_noise(wrapper, i, tuple(x.shape))
            noise = -method.noise_scale * tf.math.log(-tf.math.log(u))
        mask = relaxed_topk_mask(x, min(e.k, e.n), tau, noise)
        masks[e.name] = tf.reshape(tf.transpose(mask, (0, 2, 1)), (runs * e.n, b))[:a]
    return masks, entropy


@pytest.mark.parametrize("units,fan_in,kwargs", [
    (6, 10, dict(k=2, n=4)),  # a trailing run of 2 padded to 4
    (5, 12, dict(k=3, n=None, noise_scale=1.0)),
    (7, 9, dict(k=1, n=3, noise_scale=0.0, init_scale=0.0)),  # all ties: lower index first
    (20, 6, dict(keep_ratio=0.25, structure="filter")),  # n = 20 > _PAIRWISE_MAX_N
])
def test_training_masks_and_gradients_equal_the_reference_layout(monkeypatch, units, fan_in,
                                                                  kwargs):
    """Runs along axis 1 (no transposes), the short-run path and the hand-written entropy
    gradient give the masks of the reference path bit for bit (same seed and step, same
    noise draws) and its gradients up to rounding."""
    from tfprune.methods import dpp_sampler

    keras.utils.set_random_seed(3)
    wrapper = tfprune.PruneWrapper(keras.layers.Dense(units),
                                   DPP(**kwargs, anneal_steps=10, entropy_weight=0.3))
    wrapper(np.zeros((1, fan_in), "float32"))
    wrapper._callback_attached = True
    method = wrapper.method
    rng = np.random.default_rng(0)
    entries = method.entries(wrapper)
    for e in entries:
        if method.init_scale:
            wrapper.state[e.logits_name].assign(rng.normal(size=e.grid).astype("float32"))
    logits = [wrapper.state[e.logits_name] for e in entries]
    weights = {e.name: tf.constant(rng.normal(size=e.grid).astype("float32"))
               for e in entries}
    tau = method.temperature_tensor(wrapper)

    def loss_and_grads(fn):
        with tf.GradientTape() as tape:
            masks, entropy = fn()
            loss = entropy + sum(tf.reduce_sum(masks[n] * w) for n, w in weights.items())
        grads = tape.gradient(loss, logits)
        return ({n: m.numpy() for n, m in masks.items()}, float(entropy),
                [g.numpy() for g in grads])

    new = loss_and_grads(lambda: (method.group_masks(wrapper, True), method.entropy(wrapper)))
    monkeypatch.setattr(dpp_sampler, "_PAIRWISE_MAX_N", 0)
    ref = loss_and_grads(lambda: _reference_masks_and_entropy(method, wrapper, tau))
    for name in new[0]:
        np.testing.assert_array_equal(new[0][name], ref[0][name])
        _check_runs(next(e for e in entries if e.name == name), new[0][name])
    np.testing.assert_allclose(new[1], ref[1], rtol=1e-5)
    for a, b in zip(new[2], ref[2]):
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_temperature_schedules():
    lin = [float(temperature_at(s, (5.0, 0.5), 10)) for s in (0, 3, 9, 20)]
    np.testing.assert_allclose(lin, [5.0, 3.5, 0.5, 0.5], rtol=1e-6)
    exp = [float(temperature_at(s, (4.0, 0.25), 5, "exponential")) for s in (0, 2, 4, 9)]
    np.testing.assert_allclose(exp, [4.0, 1.0, 0.25, 0.25], rtol=1e-6)
    assert float(temperature_at(7, 2.0, 10)) == 2.0


def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((12,)),
                             keras.layers.Dense(16, activation="relu", name="dense"),
                             keras.layers.Dense(8, activation="relu", name="dense_1"),
                             keras.layers.Dense(3, name="dense_2")])


def _data(n=64):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 12)).astype("float32"), rng.integers(0, 3, n)


def _fit(model, method, epochs=2, seed=0, extra=(), **fit_kw):
    keras.utils.set_random_seed(seed)
    pruned = tfprune.prune(model, method)
    pruned.compile(keras.optimizers.Adam(0.01),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    pruned.fit(x, y, epochs=epochs, batch_size=16, verbose=0,
               callbacks=[tfprune.callbacks.Pruning(), *extra], **fit_kw)
    return pruned, x


def test_anneal_steps_resolved_from_fit_and_temperature_logged():
    pruned, _ = _fit(_mlp(), DPP(2, 4, temperature=(3.0, 1.0)), epochs=2)  # 2 epochs x 4 steps
    w = pruned.get_layer("dense")
    assert int(w.state["anneal_steps"].numpy()) == 8 and int(w.step.numpy()) == 8
    np.testing.assert_allclose(w.method.logs(w)["temperature"], 1.0, rtol=1e-6)
    pruned2, _ = _fit(_mlp(), DPP(2, 4, temperature=(3.0, 1.0), anneal_steps=15), epochs=1)
    w2 = pruned2.get_layer("dense")  # 4 steps taken: the last one used step index 3
    np.testing.assert_allclose(w2.method.logs(w2)["temperature"], 3.0 - 2.0 * 3 / 14, rtol=1e-6)
    assert {"confidence", "diversity"} <= set(w.method.logs(w))


def test_unknown_fit_length_without_anneal_steps_is_an_error():
    pruned = tfprune.prune(_mlp(), DPP(2, 4))
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match=r"`anneal_steps`=None .* layer 'dense'|layer 'dense'"):
        cb = tfprune.callbacks.Pruning()
        cb.set_model(pruned)
        cb.set_params({"epochs": 1, "steps": None})
        cb.on_train_begin()


def test_inference_masks_are_deterministic_and_strip_matches():
    pruned, x = _fit(_mlp(), DPP(2, 4))
    a, b = pruned(x, training=False), pruned(x, training=False)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(tfprune.strip(pruned)(x), a, atol=1e-5)


def test_set_random_seed_makes_training_repeatable():
    runs = [_fit(_mlp(), DPP(1, 4, noise_scale=1.0), epochs=1, seed=3)[0] for _ in range(2)]
    for wa, wb in zip(runs[0].weights, runs[1].weights):
        np.testing.assert_array_equal(wa.numpy(), wb.numpy())
    other = _fit(_mlp(), DPP(1, 4, noise_scale=1.0), epochs=1, seed=4)[0]
    la, lc = runs[0].get_layer("dense").weights, other.get_layer("dense").weights
    assert any(not np.array_equal(a.numpy(), c.numpy()) for a, c in zip(la, lc))


def test_keras_round_trip_restores_logits_temperature_and_outputs(tmp_path):
    pruned, x = _fit(_mlp(), DPP(2, 4, temperature=(4.0, 1.0), anneal="exponential",
                                 quantize=8, anneal_steps=20))
    path = tmp_path / "dpp.keras"
    pruned.save(path)
    loaded = keras.models.load_model(path)
    for name in ("dense", "dense_1", "dense_2"):
        a, b = pruned.get_layer(name), loaded.get_layer(name)
        assert b.method.get_config() == a.method.get_config()
        assert b.state.names() == a.state.names()
        for ea, eb in zip(a.method.entries(a), b.method.entries(b)):
            assert ea == eb
            np.testing.assert_array_equal(a.state[ea.logits_name].numpy(),
                                          b.state[eb.logits_name].numpy())
        assert b.method.current_temperature(b) == a.method.current_temperature(a)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), pruned.predict(x, verbose=0))
    # Training resumes from the saved step.
    loaded.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loaded.fit(x, _data()[1], epochs=1, batch_size=16, verbose=0,
               callbacks=[tfprune.callbacks.Pruning()])
    assert int(loaded.get_layer("dense").step.numpy()) == 12


def test_split_modules_keep_the_import_paths_and_the_registered_name():
    """The sampler and the metrics live in their own modules; every public name stays
    importable from `tfprune.methods.dpp` (the same objects), and `.keras` files keep
    naming the method "tfprune>DPP" in module `tfprune.methods.dpp`."""
    from tfprune.methods import dpp, dpp_metrics, dpp_sampler

    for module, names in ((dpp_sampler, ["temperature_at", "relaxed_topk_mask"]),
                          (dpp_metrics, ["mask_metrics", "DPPMetricsHistory", "plot_masks"])):
        for name in names:
            assert getattr(dpp, name) is getattr(module, name), name
            assert name in dpp.__all__
    assert methods.DPP is dpp.DPP is DPP
    config = keras.saving.serialize_keras_object(DPP(2, 4))
    assert config["registered_name"] == "tfprune>DPP"
    assert config["module"] == "tfprune.methods.dpp" and config["class_name"] == "DPP"
    # A config written before the split (same names) still loads.
    assert isinstance(keras.saving.deserialize_keras_object(config), DPP)


def test_config_round_trip():
    m = DPP(keep_ratio=0.3, n=8, structure=structures.Kernel(), temperature=(2.0, 0.1),
            entropy_weight=0.0, quantize=4, anneal="exponential", anneal_steps=100,
            noise_scale=0.5, init_scale=2.0, seed=7)
    config = keras.saving.serialize_keras_object(m)
    back = keras.saving.deserialize_keras_object(config)
    assert back.get_config() == m.get_config()
    assert isinstance(methods.BY_NAME["dpp"](k=1), DPP)
    kn = DPP(structure=structures.KOutOfN(2, 4, of=structures.Kernel()))
    assert DPP.from_config(kn.get_config()).get_config() == kn.get_config()


def test_fit_then_strip_keeps_exact_k_of_n_weights():
    pruned, x = _fit(_mlp(), DPP(2, 4))
    plain = tfprune.strip(pruned)
    for name in ("dense", "dense_1", "dense_2"):
        kernel = plain.get_layer(name).kernel.numpy()  # [fan_in, units], runs along fan_in
        runs = (kernel != 0).reshape(-1, 4, kernel.shape[1]).sum(axis=1)
        np.testing.assert_array_equal(runs, 2)


def test_keep_ratio_resolved_per_layer_and_filter_shrinks():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(8, 3, name="conv2d")(inp)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(6, 3, activation="relu", name="conv2d_1")(h)
    h = keras.layers.Flatten()(h)
    out = keras.layers.Dense(3)(h)
    model = keras.Model(inp, out)
    pruned = tfprune.prune(model, DPP(keep_ratio=0.25, structure="filter"))
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).normal(size=(32, 8, 8, 2)).astype("float32")
    pruned.fit(x, np.arange(32) % 3, epochs=1, batch_size=8, verbose=0,
               callbacks=[tfprune.callbacks.Pruning()])
    rows = {r["layer"]: r for r in tfprune.sparsity_report(pruned).rows}
    assert rows["conv2d"]["units_kept"] == 2 and rows["conv2d_1"]["units_kept"] == 2  # 1.5 -> 2
    plain = tfprune.strip(pruned)
    np.testing.assert_allclose(plain(x), pruned(x), atol=1e-4)
    if hasattr(tfprune, "shrink"):
        small = tfprune.shrink(plain)
        assert small.get_layer("conv2d").filters == 2
        np.testing.assert_allclose(small(x), plain(x), atol=1e-4)


def test_joint_int8_tflite_keeps_the_k_of_n_pattern():
    export = pytest.importorskip("tfprune.export")
    pruned, x = _fit(_mlp(), DPP(2, 4, quantize=8))
    plain = tfprune.strip(pruned)
    blob = export.export_tflite(plain, quantize="int8", representative_data=x)
    weights = export.tflite_weights(blob)
    for name in ("dense", "dense_1", "dense_2"):
        kernel = plain.get_layer(name).kernel.numpy()
        found = [w for w in weights.values()
                 if getattr(w, "dtype", None) == np.int8 and w.shape == kernel.T.shape
                 and np.array_equal(np.asarray(w) != 0, kernel.T != 0)]
        assert len(found) == 1, name
        q = found[0]
        runs = (np.asarray(q).T != 0).reshape(-1, 4, kernel.shape[1]).sum(axis=1)
        np.testing.assert_array_equal(runs, 2)
        # Trained on TFLite's grid: the int8 weights are the stripped ones, exactly.
        np.testing.assert_allclose(q.dequantize(), kernel.T, atol=1e-6)
    np.testing.assert_allclose(export.run_tflite(blob, x), plain(x), atol=0.1)


def test_mask_metrics_on_constructed_logits():
    w = tfprune.PruneWrapper(keras.layers.Dense(2, name="dense"),
                             DPP(1, 2, init_scale=0.0))
    w(np.zeros((1, 4), "float32"))
    logits = w.state["kernel_logits"]
    # Uniform logits: confidence 0; all runs keep position 0 (ties -> first): diversity 0.
    assert mask_metrics(w) == {"dense": {"confidence": 0.0, "diversity": 0.0}}
    # Runs [log 3, 0] -> p = (3/4, 1/4): confidence 1 - H(p)/log 2; two runs keep each
    # position -> q uniform -> diversity 1.
    logits.assign(np.log([[3.0, 1.0], [1.0, 3.0], [1.0, 3.0], [3.0, 1.0]], dtype="float32"))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    got = w.method.metrics(w)
    assert got["confidence"] == pytest.approx(1 - h / math.log(2), abs=1e-6)
    assert got["diversity"] == pytest.approx(1.0, abs=1e-9)
    # k = 2 of 4 with the mass on two groups: confidence 1.
    w2 = tfprune.PruneWrapper(keras.layers.Dense(3), DPP(2, 4, init_scale=0.0))
    w2(np.zeros((1, 4), "float32"))
    w2.state["kernel_logits"].assign(np.array([[50, 50, 50], [50, 0, 0], [0, 50, 50],
                                               [0, 0, 0]], "float32"))
    got = w2.method.metrics(w2)
    assert got["confidence"] == pytest.approx(1.0)
    # Kept positions: {0,1}, {0,2}, {0,2} -> q = (1/2, 1/6, 1/3, 0).
    q = np.array([1 / 2, 1 / 6, 1 / 3])
    expected = (-(q * np.log(q)).sum() - math.log(2)) / (math.log(4) - math.log(2))
    assert got["diversity"] == pytest.approx(expected)


def test_history_and_plot(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    hist = DPPMetricsHistory()
    pruned, _ = _fit(_mlp(), DPP(1, 4, entropy_weight=1e-2), epochs=2, extra=[hist])
    assert hist.epochs == [0, 1, 2]
    assert len(hist.history["dense"]["confidence"]) == 3
    fig = plot_masks(pruned, hist)
    fig.savefig(tmp_path / "masks.png")
    assert (tmp_path / "masks.png").stat().st_size > 0


def test_entropy_penalty_is_a_layer_loss():
    w = tfprune.PruneWrapper(keras.layers.Dense(4), DPP(1, 2, entropy_weight=0.5, init_scale=0))
    w(np.zeros((1, 6), "float32"))
    assert len(w.losses) == 1
    np.testing.assert_allclose(float(w.losses[0]), 0.5 * 12 * math.log(2), rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    ({"k": 5, "n": 4}, r"`k` must satisfy 1 <= k <= n \(n=4\), got k=5"),
    ({"k": 0, "n": 4}, r"`k` must be >= 1, got 0"),
    ({"k": 2, "n": 4, "quantize": 16}, r"`quantize` must be one of \[4, 8\], got 16"),
    ({"k": 2, "quantize": "int8"}, r"`quantize` must be one of \[4, 8\], got 'int8'"),
    ({"k": 2, "structure": structures.Block((4, 1))}, "Unstructured.*Kernel.*Filter.*Block"),
    ({"k": 2, "structure": "block"}, "`structure` must be"),
    ({}, "exactly one of `k`"),
    ({"k": 2, "keep_ratio": 0.5}, "exactly one of `k`"),
    ({"keep_ratio": 1.5}, r"`keep_ratio` must be a float in \(0, 1\], got 1.5"),
    ({"k": 2, "temperature": (1.0, -1.0)}, "`temperature`"),
    ({"k": 2, "anneal": "cosine"}, r"`anneal` must be one of \['linear', 'exponential'\]"),
    ({"k": 2, "entropy_weight": -1.0}, "`entropy_weight` must be a float >= 0"),
    ({"k": 3, "structure": structures.KOutOfN(2, 4)}, "`k`=3 contradicts"),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DPP(**kwargs)


def test_per_layer_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"`k`=20 exceeds the 10 groups of layer 'big'"):
        _wrapper_named("big", DPP(20))
    with pytest.raises(ValueError, match=r"`keep_ratio`=0.01 keeps .* of layer 'tiny'"):
        _wrapper_named("tiny", DPP(keep_ratio=0.01))


def _wrapper_named(name, method):
    w = tfprune.PruneWrapper(keras.layers.Dense(3, name=name), method)
    w(np.zeros((1, 10), "float32"))
    return w


_MIRRORED = """
    from tfprune.methods import DPP
    x = np.random.default_rng(0).normal(size=(64, 12)).astype("float32")
    y = np.arange(64) % 3
    with strategy.scope():
        model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dense(3)])
        pruned = tfprune.prune(model, DPP(2, 4, quantize=8))
        pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = pruned.get_layer("dense").state["kernel_logits"].numpy().copy()
    pruned.fit(x, y, epochs=1, batch_size=16, verbose=0,
               callbacks=[tfprune.callbacks.Pruning()])
    w = pruned.get_layer("dense")
    after = w.state["kernel_logits"].numpy()
    assert int(w.step.numpy()) == 4, w.step.numpy()
    assert not np.array_equal(before, after)
    kernel = tfprune.strip(pruned).get_layer("dense").kernel.numpy()
    assert ((kernel != 0).reshape(3, 4, 16).sum(1) == 2).all()
    # Both replicas draw the same training mask (stateless noise from the saved seed and step).
    masks = strategy.experimental_local_results(
        strategy.run(lambda: w.method.group_masks(w, True)["kernel"]))
    assert len(masks) == 2 and np.array_equal(masks[0].numpy(), masks[1].numpy())
    # Resume: one more epoch after save/load equals one more epoch of the original.
    import os, tempfile
    path = os.path.join(tempfile.mkdtemp(), "mid.keras")
    pruned.save(path)
    with strategy.scope():
        loaded = keras.models.load_model(path)
    for model in (pruned, loaded):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0, shuffle=False,
                  callbacks=[tfprune.callbacks.Pruning()])
    for a, b in zip(pruned.weights + pruned.optimizer.variables,
                    loaded.weights + loaded.optimizer.variables):
        assert np.array_equal(a.numpy(), b.numpy()), a.path
    print("MIRRORED_OK", strategy.num_replicas_in_sync)
"""


def test_mirrored_strategy_trains_one_epoch():
    """Trains, draws one mask for all replicas and resumes exactly from a .keras file."""
    proc = run_on_two_cpus(_MIRRORED)
    assert "MIRRORED_OK 2" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
