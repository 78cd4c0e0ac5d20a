"""TurboVBI: closed-form updates, KL, state round trip, training, strip, errors."""


import keras
import numpy as np
import pytest
from scipy import special
from two_cpus import run_on_two_cpus

import tfprune
from tfprune import methods, schedules, structures
from tfprune.methods import turbo_vbi as tv
from tfprune.wrapper import find_wrappers

HYPER = dict(a=1.0, b=1.0, a_bar=1.0, b_bar=0.01)


def _mlp():
    return keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="relu"),
                             keras.layers.Dense(3)])


def _cnn():
    return keras.Sequential([keras.Input((8, 8, 2)), keras.layers.Conv2D(6, 3, activation="relu"),
                             keras.layers.Flatten(), keras.layers.Dense(3)])


def _data(shape, n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n,) + shape).astype("float32"), rng.integers(0, 3, n)


def _fit(model, method, x, y, epochs=2):
    keras.utils.set_random_seed(0)
    pruned = tfprune.prune(model, method)
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruned.fit(x, y, epochs=epochs, batch_size=16, verbose=0,
               callbacks=[tfprune.callbacks.Pruning()])
    return pruned


# -- closed forms ---------------------------------------------------------------
def test_mean_field_gamma_update_matches_closed_form():
    m2 = np.array([0.0, 0.01, 0.5, 2.0])
    pi = np.array([0.1, 0.5, 0.9, 0.99])
    shape, rate = tv.rho_posterior(m2, pi, **HYPER, factorization="mean_field")
    np.testing.assert_allclose(shape[1], pi * 1 + (1 - pi) * 1 + 0.5)
    np.testing.assert_allclose(rate[1], pi * 1 + (1 - pi) * 0.01 + m2 / 2)
    np.testing.assert_array_equal(shape[0], shape[1])


def test_joint_gamma_update_matches_closed_form():
    m2 = np.array([0.0, 0.3])
    shape, rate = tv.rho_posterior(m2, None, a=2.0, b=3.0, a_bar=0.5, b_bar=0.1)
    np.testing.assert_allclose(shape, [[1.0, 1.0], [2.5, 2.5]])
    np.testing.assert_allclose(rate, [[0.1, 0.25], [3.0, 3.15]])


def test_mean_field_support_evidence_matches_closed_form():
    m2 = np.array([0.001, 0.05, 1.0])
    pi = np.array([0.2, 0.5, 0.8])
    a, b, a_bar, b_bar = 1.5, 2.0, 0.7, 0.01
    shape, rate = tv.rho_posterior(m2, pi, a, b, a_bar, b_bar, "mean_field")
    got = tv.support_log_evidence(m2, shape, rate, a, b, a_bar, b_bar, "mean_field")
    e_log = special.digamma(shape[1]) - np.log(rate[1])
    e_rho = shape[1] / rate[1]

    def e_log_gamma(k, r):
        return k * np.log(r) - special.gammaln(k) + (k - 1) * e_log - r * e_rho

    np.testing.assert_allclose(got, e_log_gamma(a, b) - e_log_gamma(a_bar, b_bar), rtol=1e-10)


def test_joint_support_evidence_matches_closed_form():
    m2 = np.array([0.0, 0.01, 0.3, 4.0])
    a, b, a_bar, b_bar = 1.0, 1.0, 2.0, 0.01
    shape, rate = tv.rho_posterior(m2, None, a, b, a_bar, b_bar)
    got = tv.support_log_evidence(m2, shape, rate, a, b, a_bar, b_bar)

    def log_z(k, r):  # int exp(E[log N(w|0,1/rho)]) Gamma(rho|k,r) drho
        return (k * np.log(r) - special.gammaln(k) + special.gammaln(k + 0.5)
                - (k + 0.5) * np.log(r + m2 / 2) - 0.5 * np.log(2 * np.pi))

    np.testing.assert_allclose(got, log_z(a, b) - log_z(a_bar, b_bar), rtol=1e-10)


@pytest.mark.parametrize("factorization", ["joint", "mean_field"])
def test_iid_posterior_update_is_prior_times_evidence(factorization):
    method = methods.TurboVBI(support_prior="iid", start=0.3, factorization=factorization)
    m2 = np.random.default_rng(0).uniform(0, 0.5, (6, 4))
    support = np.full_like(m2, 0.5)
    new = method.posterior_update(m2, support)
    shape, rate = tv.rho_posterior(m2, support, **HYPER, factorization=factorization)
    ev = tv.support_log_evidence(m2, shape, rate, **HYPER, factorization=factorization)
    want = special.expit(special.logit(0.3) + ev)
    np.testing.assert_allclose(new["support"], want, rtol=1e-9)
    shape, rate = tv.rho_posterior(m2, want, **HYPER, factorization=factorization)
    np.testing.assert_allclose(new["precision"],
                               want * shape[1] / rate[1] + (1 - want) * shape[0] / rate[0])


def test_chain_posterior_is_the_exact_marginal_given_the_evidence():
    method = methods.TurboVBI(support_prior="chain", start=0.2, p01=0.1, p11=0.7)
    m2 = np.random.default_rng(1).uniform(0, 0.2, (5, 2))
    new = method.posterior_update(m2, np.full_like(m2, 0.5))
    shape, rate = tv.rho_posterior(m2, None, **HYPER)
    evidence = special.expit(tv.support_log_evidence(m2, shape, rate, **HYPER))
    from tfprune.methods.message_passing import brute_force_marginals

    want = brute_force_marginals(evidence, 0.2, 0.1, 0.7, grid=False)
    np.testing.assert_allclose(new["support"], want, atol=1e-9)


# -- KL ---------------------------------------------------------------------------
def test_kl_matches_numpy():
    model = _mlp()
    pruned = tfprune.prune(model, methods.TurboVBI(num_train_examples=10))
    w = find_wrappers(pruned)[0]
    rng = np.random.default_rng(0)
    sigma_raw, precision = w.state["kernel_sigma"], w.state["kernel_prior_precision"]
    sigma_raw.assign(rng.normal(-3, 0.5, sigma_raw.shape).astype("float32"))
    precision.assign(rng.uniform(0.5, 50, precision.shape).astype("float32"))
    mask = (rng.uniform(size=w.state["kernel_mask"].shape) > 0.3).astype("float32")
    w.state["kernel_mask"].assign(mask)
    mu = keras.ops.convert_to_numpy(w.layer.kernel).astype(np.float64)
    sigma = np.log1p(np.exp(keras.ops.convert_to_numpy(sigma_raw).astype(np.float64)))
    prec = keras.ops.convert_to_numpy(precision).astype(np.float64)
    kl = 0.5 * (prec * (mu ** 2 + sigma ** 2) - 1 - np.log(prec * sigma ** 2))
    want = float((kl * mask).sum())
    got = float(keras.ops.convert_to_numpy(w.method.kl_divergence(w)))
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_closed_form_kl_equals_tfp_kl():
    """The per-step closed-form KL is TFP's Normal-Normal KL (summed over the kept weights)."""
    import tensorflow_probability as tfp

    tfd = tfp.distributions
    pruned = tfprune.prune(_mlp(), methods.TurboVBI(num_train_examples=10))
    rng = np.random.default_rng(3)
    for w in find_wrappers(pruned):
        m = w.method
        sigma_raw, precision = w.state["kernel_sigma"], w.state["kernel_prior_precision"]
        mask = w.state["kernel_mask"]
        sigma_raw.assign(rng.normal(-4, 2, sigma_raw.shape).astype("float32"))
        precision.assign(np.exp(rng.uniform(-3, 8, precision.shape)).astype("float32"))
        mask.assign((rng.uniform(size=mask.shape) > 0.4).astype("float32"))
        mu = keras.ops.convert_to_tensor(w.layer.kernel)
        sigma = keras.ops.softplus(sigma_raw)
        kl = tfd.kl_divergence(tfd.Normal(mu, sigma),
                               tfd.Normal(keras.ops.zeros_like(mu), keras.ops.rsqrt(precision)))
        want = float(keras.ops.convert_to_numpy(keras.ops.sum(kl * mask)))
        for got in (m.kl_divergence(w), m.kl_divergence(w, sigma)):
            np.testing.assert_allclose(float(keras.ops.convert_to_numpy(got)), want, rtol=1e-5)


def test_training_loss_includes_scaled_kl():
    x, y = _data((12,))
    pruned = tfprune.prune(_mlp(), methods.TurboVBI(num_train_examples=100, kl_weight=2.0))
    for w in find_wrappers(pruned):
        w._callback_attached = True  # what tfprune.callbacks.Pruning.on_train_begin does
    pruned(x[:4], training=True)
    losses = [float(keras.ops.convert_to_numpy(v)) for v in pruned.losses]
    kls = [2.0 / 100 * float(keras.ops.convert_to_numpy(w.method.kl_divergence(w)))
           for w in find_wrappers(pruned)]
    np.testing.assert_allclose(sorted(losses), sorted(kls), rtol=1e-4)


# -- training, strip, state -----------------------------------------------------------
@pytest.mark.parametrize("build", [_mlp, _cnn])
def test_fit_then_strip_zeroes_weights_below_threshold(build):
    shape = (12,) if build is _mlp else (8, 8, 2)
    x, y = _data(shape)
    method = methods.TurboVBI(num_train_examples=64, kl_weight=1.0, update_every=2,
                              support_prior="chain", start=0.02, p01=0.02)
    pruned = _fit(build(), method, x, y)
    plain = tfprune.strip(pruned)
    for w in find_wrappers(pruned):
        support = keras.ops.convert_to_numpy(w.state["kernel_support_posterior"])
        kernel = keras.ops.convert_to_numpy(plain.get_layer(w.name).kernel)
        assert np.all(kernel[support < 0.5] == 0)
        assert int(keras.ops.convert_to_numpy(w.state["kernel_turbo_iterations"])) >= 3
        dead = w.method.unit_mask(w) == 0
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(
            plain.get_layer(w.name).bias)[dead], 0)
    np.testing.assert_allclose(plain.predict(x, verbose=0), pruned.predict(x, verbose=0),
                               atol=1e-5)
    report = tfprune.sparsity_report(plain)
    assert report.total["sparsity"] > 0.02


def test_mask_is_frozen_after_freeze_step_and_logs_are_reported():
    x, y = _data((12,))
    method = methods.TurboVBI(num_train_examples=64, kl_weight=1.0, update_every=1,
                              freeze_step=3)
    pruned = _fit(_mlp(), method, x, y, epochs=1)
    for w in find_wrappers(pruned):
        # Turbo iterations at steps 1 and 2.
        assert int(keras.ops.convert_to_numpy(w.state["kernel_turbo_iterations"])) == 2
        logs = w.method.logs(w)
        assert set(logs) >= {"expected_sparsity", "kl", "mean_support_prob"}
        assert 0 <= logs["mean_support_prob"] <= 1


def test_keras_round_trip_restores_posterior_state(tmp_path):
    x, y = _data((8, 8, 2))
    pruned = _fit(_cnn(), methods.TurboVBI(num_train_examples=64, update_every=2), x, y)
    path = tmp_path / "tvbi.keras"
    pruned.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(find_wrappers(pruned), find_wrappers(loaded)):
        assert isinstance(b.method, methods.TurboVBI)
        assert b.method.get_config() == a.method.get_config()
        for va, vb in zip(a.weights, b.weights):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(va),
                                          keras.ops.convert_to_numpy(vb))
        assert b.state.names() == a.state.names()
        for name in ("support_posterior", "support_prior", "rho_shape", "rho_rate",
                     "prior_precision", "mask", "sigma", "weight_scale"):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(a.state[f"kernel_{name}"]),
                                          keras.ops.convert_to_numpy(b.state[f"kernel_{name}"]))
    np.testing.assert_allclose(loaded.predict(x, verbose=0), pruned.predict(x, verbose=0),
                               atol=1e-6)


def test_config_round_trip_and_lookup_by_name():
    m = methods.TurboVBI(num_train_examples=5, p01=0.1, update_every=7, support_prior="chain")
    again = methods.TurboVBI.from_config(m.get_config())
    assert again.get_config() == m.get_config()
    assert isinstance(methods.get("turbo-vbi"), methods.TurboVBI)


def test_training_without_num_train_examples_raises():
    x, y = _data((12,))
    with pytest.raises(ValueError, match="num_train_examples"):
        _fit(_mlp(), methods.TurboVBI(), x, y, epochs=1)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(a=0), "`a`.*0"), (dict(b=-1.0), "`b`.*-1"), (dict(a_bar=0.0), "`a_bar`"),
    (dict(b_bar=-0.01), "`b_bar`.*-0.01"), (dict(start=0.0), "`start`.*0.0"),
    (dict(p01=1.0), "`p01`.*1.0"), (dict(p11=1.5), "`p11`.*1.5"), (dict(threshold=1), "threshold"),
    (dict(update_every=0), "update_every"), (dict(update_every="batch"), "update_every"),
    (dict(support_prior="tree"), "support_prior"), (dict(factorization="x"), "factorization"),
    (dict(structure=structures.Block()), r"Unstructured\(\).*or Filter\(\).*Block"),
    (dict(kl_weight=-1), "kl_weight"),
])
def test_invalid_hyperparameters_raise_clear_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        methods.TurboVBI(**kwargs)


def test_layer_with_two_kernels_is_rejected():
    layer = keras.layers.SeparableConv2D(4, 3)
    with pytest.raises(ValueError, match="2 kernels"):
        tfprune.PruneWrapper(layer, methods.TurboVBI())


def test_kernel_grid_layout_is_fan_in_by_units():
    kernel = np.arange(3 * 3 * 2 * 4, dtype="float32").reshape(3, 3, 2, 4)
    grid = np.asarray(tv.kernel_grid(kernel))
    assert grid.shape == (18, 4)
    np.testing.assert_array_equal(grid[:, 1], kernel[..., 1].reshape(-1))


_MIRRORED = """
    from tfprune import methods
    x = np.random.rand(64, 12).astype("float32")
    y = np.random.randint(0, 3, 64)
    with strategy.scope():
        model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dense(3)])
        pruned = tfprune.prune(model, methods.TurboVBI(num_train_examples=64, update_every=2))
        pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    hist = pruned.fit(x, y, epochs=1, batch_size=16, verbose=0,
                      callbacks=[tfprune.callbacks.Pruning()])
    w = tfprune.wrapper.find_wrappers(pruned)[0]
    assert int(w.state["kernel_turbo_iterations"].numpy()) >= 1
    assert np.isfinite(hist.history["loss"][-1])
    # Each replica samples its own examples' noise, from the saved seed and step.
    noise = [t.numpy() for t in strategy.experimental_local_results(
        strategy.run(lambda: w.method.normal_noise(w, (4, 3))))]
    assert len(noise) == 2 and not np.array_equal(noise[0], noise[1])
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
    print("OK", strategy.num_replicas_in_sync)
"""


def test_mirrored_strategy_trains_one_epoch():
    """Trains, samples per-replica noise and resumes exactly from a .keras file."""
    out = run_on_two_cpus(_MIRRORED, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK 2" in out.stdout


# -- unit (Filter) pruning ---------------------------------------------------------------
def _filter(**kw):
    kw = {"num_train_examples": 64, "structure": structures.Filter(), **kw}
    if "unit_schedule" not in kw:
        kw.setdefault("unit_sparsity", 0.5)
    return methods.TurboVBI(**kw)


def _unit_scores_by_hand(w):
    """The documented score, from the saved state: mean_i pi * mask * (mu^2 + sigma^2) / scale."""
    def grid(value):
        return np.asarray(tv.kernel_grid(keras.ops.convert_to_numpy(value)), np.float64)

    mu = grid(w.layer.kernel)
    sigma = np.log1p(np.exp(grid(w.state["kernel_sigma"])))
    pi = grid(w.state["kernel_support_posterior"])
    keep = grid(w.state["kernel_weight_mask"]) > 0
    scale = float(keras.ops.convert_to_numpy(w.state["kernel_weight_scale"]))
    return (pi * keep * (mu ** 2 + sigma ** 2) / scale).mean(axis=0)


@pytest.mark.parametrize("build", [_mlp, _cnn])
def test_filter_removes_the_lowest_scoring_units_at_the_target(build):
    shape = (12,) if build is _mlp else (8, 8, 2)
    x, y = _data(shape)
    pruned = _fit(build(), _filter(update_every=2), x, y, epochs=1)
    w = find_wrappers(pruned)[0]  # its units feed the next layer only: Filter applies
    assert w.method.coupling == "select" and w.method.removes_units
    unit = w.method.unit_mask(w)
    n = unit.shape[0]
    assert unit.sum() == n - round(0.5 * n)
    scores = w.method.unit_scores(w)
    np.testing.assert_allclose(scores, _unit_scores_by_hand(w), rtol=1e-5)
    assert scores[unit == 1].min() >= scores[unit == 0].max()
    # Removed units lose their column and bias, in the mask and after strip.
    plain = tfprune.strip(pruned)
    kernel = keras.ops.convert_to_numpy(plain.get_layer(w.name).kernel)
    assert np.all(kernel[..., unit == 0] == 0) and np.any(kernel[..., unit == 1] != 0)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(plain.get_layer(w.name).bias)
                                  [unit == 0], 0)
    # The output layer keeps its units: the keep_units variant (weights still pruned).
    head = find_wrappers(pruned)[-1]
    assert isinstance(head.method.structure, structures.Unstructured)
    assert head.method.unit_mask(head) is None and not head.method.prune_units
    small = tfprune.shrink(plain)
    first = small.get_layer(w.name)
    assert (first.units if build is _mlp else first.filters) == n // 2
    np.testing.assert_allclose(small.predict(x, verbose=0), plain.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)


def test_filter_round_to_is_respected():
    x, y = _data((12,))
    pruned = _fit(_mlp(), _filter(unit_sparsity=0.7, structure=structures.Filter(round_to=4)),
                  x, y, epochs=1)
    w = find_wrappers(pruned)[0]
    assert w.method.unit_mask(w).sum() == 4  # 16 - round(0.7 * 16) = 5 kept -> 4


class _UnitMasks(keras.callbacks.Callback):
    def __init__(self, wrapper):
        super().__init__()
        self.wrapper, self.masks = wrapper, []

    def on_train_batch_end(self, batch, logs=None):
        self.masks.append(self.wrapper.method.unit_mask(self.wrapper).copy())


def test_filter_schedule_removes_units_irreversibly_from_begin_step():
    x, y = _data((12,))
    schedule = schedules.PolynomialDecay(0.0, 0.5, begin_step=2, end_step=6, frequency=1)
    method = _filter(unit_schedule=schedule, update_every=1, begin_step=2)
    assert [method.unit_sparsity(s) for s in (0, 1, 2, 6, 9)] == [0.0, 0.0, 0.0, 0.5, 0.5]
    assert method.unit_sparsity(4) == pytest.approx(schedule.sparsity(4))
    keras.utils.set_random_seed(0)
    pruned = tfprune.prune(_mlp(), method)
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    w = find_wrappers(pruned)[0]
    record = _UnitMasks(w)
    pruned.fit(x, y, epochs=2, batch_size=8, verbose=0,
               callbacks=[tfprune.callbacks.Pruning(), record])
    kept = [int(m.sum()) for m in record.masks]
    assert kept[:3] == [16, 16, 16]  # nothing before begin_step (updates at steps 1, 2)
    assert kept[-1] == 8
    for before, after in zip(record.masks, record.masks[1:]):
        assert np.all(after <= before)  # a removed unit never comes back
    # Removed units stay masked in the effective kernel.
    mask = keras.ops.convert_to_numpy(w.state["kernel_mask"])
    assert np.all(mask[:, record.masks[-1] == 0] == 0)


def test_set_unit_mask_imposes_units_and_keeps_removed_weights_out():
    x, y = _data((12,))
    pruned = _fit(_mlp(), _filter(update_every=2), x, y, epochs=1)
    w = find_wrappers(pruned)[0]
    weights = keras.ops.convert_to_numpy(w.state["kernel_weight_mask"])
    wanted = np.zeros(16, "float32")
    wanted[[0, 3, 5, 15]] = 1
    w.method.set_unit_mask(w, wanted)
    alive = (weights != 0).any(axis=0)
    np.testing.assert_array_equal(w.method.unit_mask(w), wanted * alive)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(w.state["kernel_mask"]),
                                  weights * (wanted * alive)[None, :])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(w.state["kernel_bias_mask"]),
                                  wanted * alive)
    masks = w.method.final_masks(w)
    np.testing.assert_array_equal(masks["bias"], wanted * alive)
    with pytest.raises(ValueError, match="16 units.*mask of 3"):
        w.method.set_unit_mask(w, np.ones(3))


def test_filter_config_round_trip_and_keep_units():
    m = _filter(unit_schedule=schedules.ConstantSparsity(0.25, begin_step=3),
                structure=structures.Filter(round_to=2), update_every=4)
    again = methods.TurboVBI.from_config(m.get_config())
    assert again.get_config() == m.get_config()
    assert again.unit_schedule == m.unit_schedule and again.structure == m.structure
    assert again.coupling == "select" and again.unit_sparsity(3) == 0.25
    assert again.unit_sparsity(2) == 0.0
    keep = m.keep_units()
    assert isinstance(keep.structure, structures.Unstructured) and not keep.prune_units
    assert keep.coupling == "union" and keep.target_unit_sparsity is None
    assert keep.unit_schedule is None and keep.update_every == 4
    assert methods.get(keras.saving.serialize_keras_object(m)).get_config() == m.get_config()


def test_filter_keras_round_trip_restores_unit_state(tmp_path):
    x, y = _data((8, 8, 2))
    pruned = _fit(_cnn(), _filter(update_every=2), x, y, epochs=1)
    path = tmp_path / "filter.keras"
    pruned.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(find_wrappers(pruned), find_wrappers(loaded)):
        assert b.method.get_config() == a.method.get_config()
        if a.method.filter_units:
            np.testing.assert_array_equal(a.method.unit_mask(a), b.method.unit_mask(b))
            np.testing.assert_array_equal(a.method.unit_scores(a), b.method.unit_scores(b))
    np.testing.assert_allclose(loaded.predict(x, verbose=0), pruned.predict(x, verbose=0),
                               atol=1e-6)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(unit_sparsity=0.5), r"`unit_sparsity`=0.5 needs structure=Filter\(\).*Unstructured"),
    (dict(unit_schedule=schedules.ConstantSparsity(0.5, 0)), "`unit_schedule`.*needs structure"),
    (dict(structure="filter"), "needs `unit_sparsity`.*or `unit_schedule`"),
    (dict(structure="filter", unit_sparsity=0.5, prune_units=False), "`prune_units`=False"),
    (dict(structure="filter", unit_sparsity=1.0), "`unit_sparsity` must be in"),
    (dict(structure="filter", unit_sparsity=0.5,
          unit_schedule=schedules.ConstantSparsity(0.25, 0)), "0.5 differs .* 0.25"),
])
def test_filter_arguments_are_validated(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        methods.TurboVBI(**kwargs)


def test_unit_sparsity_of_an_unstructured_turbo_vbi_is_an_error():
    with pytest.raises(NotImplementedError, match="TurboVBI has no unit sparsity"):
        methods.TurboVBI().unit_sparsity(0)


def test_a_budget_is_refused_clearly():
    from tfprune import budgets

    with pytest.raises(ValueError, match=r"TurboVBI: a budget \(FLOPs.*not supported"):
        tfprune.prune(_mlp(), _filter(), budget=budgets.FLOPs(0.5))
