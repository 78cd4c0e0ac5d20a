"""Coupled Filter pruning: channels joined by Add are removed together, so shrink works."""

import keras
import numpy as np
import pytest

import tfprune
from tfprune import methods, schedules, structures
from tfprune.wrapper import find_wrappers


def _residual(projection=False):
    inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", name="stem")(inp)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    y = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="b1")(x)
    y = keras.layers.Conv2D(16, 3, padding="same", name="b2")(y)
    if projection:
        x = keras.layers.Conv2D(16, 1, name="proj")(x)
    x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(4, name="head")(x))


def _fit(model, method, steps=4):
    keras.utils.set_random_seed(1)
    pruned = tfprune.prune(model, method)
    pruned.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.rand(8 * steps, 12, 12, 3).astype("float32")
    y = np.random.randint(0, 4, 8 * steps)
    pruned.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[tfprune.callbacks.Pruning()])
    return pruned, x


@pytest.mark.parametrize("projection", [False, True])
def test_add_coupled_producers_get_identical_unit_masks(projection):
    model = _residual(projection)
    pruned, _ = _fit(model, methods.Magnitude(0.5, structure=structures.Filter()))
    masks = {w.name: w.method.unit_mask(w) for w in find_wrappers(pruned)
             if not isinstance(w.method, methods.Follow)}
    partner = "proj" if projection else "stem"
    np.testing.assert_array_equal(masks[partner], masks["b2"])
    assert masks["b2"].sum() == 8  # exact sparsity of the coupled group
    assert masks["b1"].sum() == 8  # uncoupled layer: its own selection


def test_coupled_group_is_scored_by_the_sum_of_member_norms():
    model = _residual(projection=True)
    rng = np.random.default_rng(0)
    proj, b2 = model.get_layer("proj"), model.get_layer("b2")
    k1 = rng.normal(size=proj.kernel.shape).astype("float32")
    k2 = rng.normal(size=b2.kernel.shape).astype("float32")
    # Channel c is strong in proj iff c < 8 and weak in b2: the sums decide.
    k1[..., :8] *= 10.0
    k2[..., 8:] *= 0.1
    proj.kernel.assign(k1)
    b2.kernel.assign(k2)
    pruned, _ = _fit(model, methods.Magnitude(0.5, structure=structures.Filter()), steps=1)
    w = {w.name: w for w in find_wrappers(pruned)}
    mask = w["b2"].method.unit_mask(w["b2"])
    np.testing.assert_array_equal(mask, [1] * 8 + [0] * 8)


def test_coupled_filter_pruning_shrinks_exactly():
    model = _residual(projection=False)
    method = methods.Magnitude(structure=structures.Filter(),
                               schedule=schedules.PolynomialDecay(0.0, 0.5, 0, 2, frequency=1))
    pruned, x = _fit(model, method)
    plain = tfprune.strip(pruned)
    small = tfprune.shrink(plain)
    report = tfprune.sparsity_report(small)
    assert {r["layer"]: r["units"] for r in report.rows}["b2"] == 8
    np.testing.assert_allclose(small.predict(x, verbose=0), plain.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)



def test_coupled_group_keeps_a_multiple_of_round_to():
    pruned, _ = _fit(_residual(), methods.Magnitude(0.7, structure=structures.Filter(round_to=4)))
    masks = {w.name: w.method.unit_mask(w) for w in find_wrappers(pruned)
             if not isinstance(w.method, methods.Follow)}
    np.testing.assert_array_equal(masks["stem"], masks["b2"])
    assert masks["b2"].sum() == 4  # 16 - round(0.7 * 16) = 5 kept -> 4
    assert masks["b1"].sum() == 4


def test_a_general_grouped_conv_loses_the_same_filter_position_in_every_group():
    """Filter j of every group of a `groups=4` conv is one coupled unit: all go or none."""
    from surgery_zoo import grouped_general

    model = grouped_general()
    pruned = tfprune.prune(model, methods.Magnitude(0.5, structure=structures.Filter()))
    pruned.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.rand(16, 8, 8, 3).astype("float32")
    pruned.fit(x, np.random.randint(0, 10, 16), epochs=1, batch_size=8, verbose=0,
               callbacks=[tfprune.callbacks.Pruning()])
    g4 = pruned.get_layer("g4")
    per_group = g4.method.unit_mask(g4).reshape(4, 3)  # [group, filter in group]
    assert (per_group == per_group[0]).all() and per_group[0].sum() == 1
    plain = tfprune.strip(pruned)
    small = tfprune.shrink(plain)
    assert small.get_layer("g4").filters == 4
    np.testing.assert_allclose(small.predict(x, verbose=0), plain.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)


# -- every unit-removing method goes through the same groups (tfprune.groups) ---------------

@pytest.mark.parametrize("projection", [False, True])
def test_dpp_filter_learns_one_mask_per_add_coupled_group_and_shrinks(projection):
    model = _residual(projection)
    pruned, x = _fit(model, methods.DPP(keep_ratio=0.5, structure=structures.Filter(),
                                        anneal_steps=4), steps=4)
    w = {w.name: w for w in find_wrappers(pruned)}
    partner = "proj" if projection else "stem"
    logits = [keras.ops.convert_to_numpy(w[n].method.unit_parameters(w[n])) for n in
              (partner, "b2")]
    np.testing.assert_array_equal(logits[0], logits[1])  # tied
    masks = {n: w[n].method.unit_mask(w[n]) for n in (partner, "b2", "b1")}
    np.testing.assert_array_equal(masks[partner], masks["b2"])
    assert masks["b2"].sum() == 8 and masks["b1"].sum() == 8
    assert isinstance(w["stem_bn"].method, methods.Follow)
    plain = tfprune.strip(pruned)
    small = tfprune.shrink(plain)
    # Half of the residual channels go, in every branch: like Magnitude.
    assert small.get_layer("b2").filters == 8 and small.get_layer(partner).filters == 8
    assert small.get_layer("b1").filters == 8
    np.testing.assert_allclose(small.predict(x, verbose=0), plain.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)


def test_dpp_coupled_layers_sample_the_same_training_mask():
    model = _residual()
    pruned, x = _fit(model, methods.DPP(keep_ratio=0.5, structure=structures.Filter(),
                                        anneal_steps=4), steps=2)
    w = {w.name: w for w in find_wrappers(pruned)}
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(w["stem"].state["noise_seed"]),
                                  keras.ops.convert_to_numpy(w["b2"].state["noise_seed"]))
    sampled = [keras.ops.convert_to_numpy(w[n].method.group_masks(w[n], True)["kernel"])
               for n in ("stem", "b2")]
    np.testing.assert_array_equal(sampled[0], sampled[1])


@pytest.mark.parametrize("projection", [False, True])
def test_turbo_vbi_filter_selects_one_unit_set_per_add_coupled_group_and_shrinks(projection):
    model = _residual(projection)
    method = methods.TurboVBI(num_train_examples=32, structure=structures.Filter(),
                              unit_sparsity=0.5)
    pruned, x = _fit(model, method, steps=4)
    w = {w.name: w for w in find_wrappers(pruned)}
    partner = "proj" if projection else "stem"
    assert w[partner].method.coupling == "select"
    masks = {n: w[n].method.unit_mask(w[n]) for n in ("stem", partner, "b2", "b1")}
    np.testing.assert_array_equal(masks[partner], masks["b2"])
    assert masks["b2"].sum() == 8 and masks["b1"].sum() == 8 and masks["stem"].sum() == 8
    # The group ranks its units by the sum of the members' posterior scores.
    total = w[partner].method.unit_scores(w[partner]) + w["b2"].method.unit_scores(w["b2"])
    np.testing.assert_array_equal(np.flatnonzero(masks["b2"]), np.sort(np.argsort(-total)[:8]))
    # The uncoupled b1 chose its own units: its own best 8.
    own = w["b1"].method.unit_scores(w["b1"])
    np.testing.assert_array_equal(np.flatnonzero(masks["b1"]), np.sort(np.argsort(-own)[:8]))
    # The BatchNormalization after stem follows stem's units.
    assert isinstance(w["stem_bn"].method, methods.Follow)
    np.testing.assert_array_equal(w["stem_bn"].method.unit_mask(w["stem_bn"]), masks["stem"])
    plain = tfprune.strip(pruned)
    small = tfprune.shrink(plain)
    assert small.get_layer("b2").filters == 8 and small.get_layer(partner).filters == 8
    assert small.get_layer("b1").filters == 8
    assert small.get_layer("stem").filters == 8
    np.testing.assert_allclose(small.predict(x, verbose=0), plain.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)
