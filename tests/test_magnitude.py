"""Magnitude pruning: exact sparsity per layer and structure, which groups go, BN, errors."""

import keras
import numpy as np
import pytest
from conftest import LAYER_CASES, LAYER_IDS, compile_sgd, layer_model, lenet, random_data, wrap_pl

import tfprune
from tfprune import methods, schedules
from tfprune import structures as S
from tfprune.wrapper import find_wrappers

STRUCTURES = [S.Unstructured(), S.Kernel(), S.Filter(), S.Block((4, 1)), S.Block((2, 3))]
STRUCT_IDS = [repr(s) for s in STRUCTURES]

# Layout of every prunable kernel of the layer cases: {layer id: {kernel name: layout}}.
LAYOUTS = {
    "dense": {"kernel": "standard"}, "conv1d": {"kernel": "standard"},
    "conv2d": {"kernel": "standard"}, "conv3d": {"kernel": "standard"},
    "depthwise2d": {"kernel": "depthwise"},
    "separable2d": {"depthwise_kernel": "depthwise", "pointwise_kernel": "standard"},
    "conv2d_transpose": {"kernel": "transposed"}, "conv1d_transpose": {"kernel": "transposed"},
    "conv3d_transpose": {"kernel": "transposed"}, "depthwise1d": {"kernel": "depthwise"},
    "separable1d": {"depthwise_kernel": "depthwise", "pointwise_kernel": "standard"},
}
UNIT_KERNEL = {"separable2d": "pointwise_kernel", "separable1d": "pointwise_kernel"}


def _canon(w, layout):
    """Independent numpy version of the canonical [S, I, O] view."""
    if layout == "transposed":
        w = np.swapaxes(w, -1, -2)
    if layout == "depthwise":
        return w.reshape(-1, 1, w.shape[-2] * w.shape[-1])
    return w.reshape(-1, w.shape[-2], w.shape[-1])


def _groups(canon, structure):
    """Independent numpy grouping: (sum of squares per group [A, B], zero-count per group)."""
    s, i, o = canon.shape
    sq, zero = canon.astype("float64") ** 2, (canon == 0).astype(int)
    if isinstance(structure, S.Unstructured):
        f = lambda t: t.reshape(s * i, o)  # noqa: E731
    elif isinstance(structure, S.Kernel):
        f = lambda t: t.sum(axis=0)  # noqa: E731
    elif isinstance(structure, S.Filter):
        f = lambda t: t.sum(axis=(0, 1))[:, None]  # noqa: E731
    else:
        bi, bo = structure.shape
        a, b = -(-s * i // bi), -(-o // bo)

        def f(t):
            m = np.zeros((a * bi, b * bo), t.dtype)
            m[: s * i, :o] = t.reshape(s * i, o)
            return m.reshape(a, bi, b, bo).sum(axis=(1, 3))
    return f(sq), f(zero), f(np.ones_like(zero))


def _pruned_layer(case, method):
    _, factory, shape = case
    model = layer_model(factory, shape)
    pruned = wrap_pl(model, method)
    return model, pruned, pruned.get_layer("pl")


def _kernels(case_id, wrapper, structure):
    names = LAYOUTS[case_id]
    if structure.removes_units:
        names = {UNIT_KERNEL.get(case_id, "kernel"): names[UNIT_KERNEL.get(case_id, "kernel")]}
    return names


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("structure", STRUCTURES, ids=STRUCT_IDS)
@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_removes_exactly_round_sparsity_times_groups_the_smallest_ones(case, structure, sparsity):
    model, _, w = _pruned_layer(case, methods.Magnitude(sparsity, structure=structure))
    original = model.get_layer("pl")
    assert w.method.update(w, 0) is True
    masks = w.method.final_masks(w)
    for name, layout in _kernels(case[0], w, structure).items():
        weights = keras.ops.convert_to_numpy(getattr(original, name))
        norms, _, sizes = _groups(_canon(weights, layout), structure)
        _, zeros, _ = _groups(_canon(masks[name], layout), structure)
        removed = zeros == sizes
        assert np.all((zeros == 0) | removed), "groups are removed whole"
        assert removed.sum() == round(sparsity * removed.size)
        if removed.any() and (~removed).any():
            assert norms[removed].max() < norms[~removed].min(), "the smallest groups go"
    # Kernels the structure does not act on are left dense.
    for name in set(LAYOUTS[case[0]]) - set(_kernels(case[0], w, structure)):
        assert np.all(masks[name] == 1)


@pytest.mark.parametrize(("k", "n", "of"), [(2, 4, S.Unstructured()), (1, 4, S.Unstructured()),
                                            (1, 2, S.Kernel()), (1, 3, S.Filter())])
@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_k_out_of_n_keeps_exactly_k_of_every_n_groups(case, k, n, of):
    structure = S.KOutOfN(k, n, of=of)
    model, _, w = _pruned_layer(case, methods.Magnitude(structure=structure))
    w.method.update(w, 0)
    masks = w.method.final_masks(w)
    original = model.get_layer("pl")
    for name, layout in _kernels(case[0], w, structure).items():
        norms, _, _ = _groups(_canon(keras.ops.convert_to_numpy(getattr(original, name)), layout),
                              of)
        _, zeros, sizes = _groups(_canon(masks[name], layout), of)
        kept = (zeros == 0).astype(int)
        assert np.all((zeros == 0) | (zeros == sizes))
        for start in range(0, kept.shape[0], n):
            run, run_norms = kept[start:start + n], norms[start:start + n]
            np.testing.assert_array_equal(run.sum(axis=0), min(k, run.shape[0]))
            for col in range(run.shape[1]):
                if 0 < run[:, col].sum() < run.shape[0]:
                    assert (run_norms[run[:, col] == 1, col].min()
                            > run_norms[run[:, col] == 0, col].max())


def test_kernel_structure_on_dense_gives_the_unstructured_mask():
    case = LAYER_CASES[0]
    masks = []
    for structure in (S.Kernel(), S.Unstructured()):
        keras.utils.set_random_seed(3)
        _, _, w = _pruned_layer(case, methods.Magnitude(0.6, structure=structure))
        w.method.update(w, 0)
        masks.append(w.method.final_masks(w)["kernel"])
    np.testing.assert_array_equal(masks[0], masks[1])


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_filter_masks_the_bias_and_pruned_units_output_exactly_zero(case):
    _, factory, shape = case
    inp = keras.Input(shape)
    out = factory()(inp)
    model = keras.Model(inp, keras.layers.Dense(2, name="head")(keras.layers.Flatten()(out)))
    # A large bias: pruned units must be zero in spite of it.
    pl = model.get_layer("pl")
    pl.bias.assign(np.full(pl.bias.shape, 3.0, "float32"))
    pruned = wrap_pl(model, methods.Magnitude(0.5, structure=S.Filter()))
    w = pruned.get_layer("pl")
    w.method.update(w, 0)
    unit = w.method.unit_mask(w)
    assert unit.sum() == round(0.5 * unit.size)
    np.testing.assert_array_equal(w.method.final_masks(w)["bias"], unit)
    x, _ = random_data(shape, n=4)
    w._callback_attached = True  # allow a training-mode call outside fit
    for training in (False, True):
        y = keras.ops.convert_to_numpy(w(x, training=training))
        assert np.all(y[..., unit == 0] == 0)
        assert np.all(np.abs(y[..., unit == 1]).max(axis=tuple(range(y.ndim - 1))) > 0)


def _conv_bn_model():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.Dense(6, name="dense")(keras.layers.Flatten()(x))
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inp, x)


def test_filter_masks_a_following_batchnorm_so_pruned_channels_are_zero_everywhere():
    model = _conv_bn_model()
    bn = model.get_layer("bn")
    bn.beta.assign(np.full(8, 0.7, "float32"))  # an offset that would leak through
    pruned = compile_sgd(tfprune.prune(model, methods.Magnitude(0.5, structure=S.Filter())))
    assert isinstance(pruned.get_layer("bn"), tfprune.PruneWrapper)
    assert isinstance(pruned.get_layer("bn2"), tfprune.PruneWrapper)
    assert isinstance(pruned.get_layer("bn").method, methods.Follow)
    assert not isinstance(pruned.get_layer("head"), tfprune.PruneWrapper)
    x, y = random_data((8, 8, 3), n=16)
    pruned.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[tfprune.callbacks.Pruning()])
    for producer, follower in (("conv", "bn"), ("dense", "bn2")):
        unit = pruned.get_layer(producer).method.unit_mask(pruned.get_layer(producer))
        assert unit.sum() == unit.size // 2
        bn_w = pruned.get_layer(follower)
        np.testing.assert_array_equal(bn_w.method.unit_mask(bn_w), unit)
        probe = keras.Model(pruned.inputs[0], pruned.get_layer(follower).output)
        bn_w._callback_attached = True
        pruned.get_layer(producer)._callback_attached = True
        for training in (False, True):
            out = keras.ops.convert_to_numpy(probe(x, training=training))
            assert np.all(out[..., unit == 0] == 0), (follower, training)
            assert np.all(np.abs(out[..., unit == 1]).sum(axis=0) > 0)
    # The stripped model keeps the zeros: gamma and beta of pruned channels are exactly 0.
    plain = tfprune.strip(pruned)
    unit = pruned.get_layer("conv").method.unit_mask(pruned.get_layer("conv"))
    assert np.all(keras.ops.convert_to_numpy(plain.get_layer("bn").beta)[unit == 0] == 0)
    assert np.all(keras.ops.convert_to_numpy(plain.get_layer("bn").gamma)[unit == 0] == 0)
    feats = keras.Model(plain.inputs[0], plain.get_layer("bn").output)(x)
    assert np.all(keras.ops.convert_to_numpy(feats)[..., unit == 0] == 0)


def test_without_schedule_prunes_at_the_first_step_only():
    case = LAYER_CASES[2]
    _, _, w = _pruned_layer(case, methods.Magnitude(0.5))
    assert w.method.update(w, 0) is True
    first = w.method.final_masks(w)["kernel"].copy()
    # Retrain the weights completely: later steps must not re-prune.
    w.layer.kernel.assign(np.random.default_rng(0).normal(size=w.layer.kernel.shape))
    assert not any(w.method.update(w, step) for step in range(1, 50))
    np.testing.assert_array_equal(w.method.final_masks(w)["kernel"], first)


def test_without_schedule_fit_prunes_once_and_keeps_the_mask():
    model = lenet()
    pruned = compile_sgd(tfprune.prune(model, methods.Magnitude(0.7)), lr=0.5)
    x, y = random_data((12, 12, 1), n=32, classes=4)
    cb = tfprune.callbacks.Pruning()
    pruned.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb])
    expected = {}
    for w in find_wrappers(pruned):
        # The mask is the one chosen from the *original* weights at step 0.
        kernel = keras.ops.convert_to_numpy(model.get_layer(w.name).kernel)
        keep = kernel.size - round(0.7 * kernel.size)
        thresh = np.sort(np.abs(kernel).ravel())[::-1][keep - 1]
        expected[w.name] = (np.abs(kernel) >= thresh).astype("float32")
        np.testing.assert_array_equal(w.method.final_masks(w)["kernel"], expected[w.name])
    pruned.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb])
    for w in find_wrappers(pruned):
        np.testing.assert_array_equal(w.method.final_masks(w)["kernel"], expected[w.name])
        assert int(keras.ops.convert_to_numpy(w.step)) == 8


def test_polynomial_schedule_reaches_the_final_sparsity_in_fit():
    model = lenet()
    sched = schedules.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=6, frequency=2)
    pruned = compile_sgd(tfprune.prune(model, methods.Magnitude(schedule=sched)))
    x, y = random_data((12, 12, 1), n=32, classes=4)
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            w = pruned.get_layer("fc")
            seen.append(1.0 - float(w.method.final_masks(w)["kernel"].mean()))

    pruned.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False,
               callbacks=[tfprune.callbacks.Pruning(), Probe()])
    size = int(np.prod(pruned.get_layer("fc").layer.kernel.shape))
    expected = [round(sched(t - t % 2)[1] * size) / size for t in range(8)]
    np.testing.assert_allclose(seen, expected, atol=1e-9)
    for w in find_wrappers(pruned):
        kernel = w.method.final_masks(w)["kernel"]
        assert (kernel == 0).sum() == round(0.8 * kernel.size)


def test_gradually_pruned_groups_stay_pruned():
    case = LAYER_CASES[0]
    sched = schedules.PolynomialDecay(0.2, 0.8, begin_step=0, end_step=30, frequency=10)
    _, _, w = _pruned_layer(case, methods.Magnitude(schedule=sched))
    previous = np.ones(w.layer.kernel.shape)
    for step in range(0, 31, 10):
        w.method.update(w, step)
        mask = w.method.final_masks(w)["kernel"]
        assert np.all(mask <= previous)
        previous = mask


# -- arguments -----------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({"sparsity": 1.0}, ValueError, r"`sparsity` must be in \[0, 1\), got 1.0"),
    ({"sparsity": -0.1}, ValueError, "`sparsity`"),
    ({"sparsity": 1.5}, ValueError, "`sparsity`"),
    ({"sparsity": float("nan")}, ValueError, "`sparsity`"),
    ({"sparsity": "high"}, TypeError, "`sparsity`"),
    ({"sparsity": 0.5, "schedule": schedules.PolynomialDecay(0.0, 0.9, 0, 10)}, ValueError,
     "final sparsity"),
    ({"sparsity": 0.5, "structure": "block"}, ValueError, "structure"),
    ({"sparsity": 0.5, "schedule": "polynomial"}, ValueError, "`schedule`='polynomial'"),
])
def test_bad_arguments_raise(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        methods.Magnitude(**kwargs)


def test_magnitude_without_sparsity_or_schedule_raises_when_used_without_a_budget():
    method = methods.Magnitude()  # allowed: a budget may choose the units
    with pytest.raises(ValueError, match="give `sparsity`.*or prune with a `budget`"):
        tfprune.PruneWrapper(keras.layers.Dense(4), method)


def test_k_out_of_n_with_a_contradicting_sparsity_raises():
    with pytest.raises(ValueError, match=r"`sparsity`=0.75 contradicts"):
        methods.Magnitude(0.75, structure=S.KOutOfN(2, 4))
    m = methods.Magnitude(0.5, structure=S.KOutOfN(2, 4))  # the implied sparsity is fine
    assert m.target_sparsity == 0.5
    assert methods.Magnitude(structure=S.KOutOfN(1, 4)).target_sparsity == 0.75


@pytest.mark.parametrize("schedule", [
    schedules.PolynomialDecay(0.0, 0.9, 0, 10),
    schedules.PolynomialDecay(0.0, 0.5, 0, 10),
    schedules.ConstantSparsity(0.8, 0),
], ids=repr)
def test_k_out_of_n_with_a_schedule_asking_for_other_sparsities_raises(schedule):
    with pytest.raises(ValueError, match="schedule"):
        methods.Magnitude(structure=S.KOutOfN(2, 4), schedule=schedule)


def test_k_out_of_n_with_a_constant_schedule_of_the_implied_sparsity_prunes_when_due():
    sched = schedules.ConstantSparsity(0.5, begin_step=3, frequency=5)
    _, _, w = _pruned_layer(LAYER_CASES[0], methods.Magnitude(structure=S.KOutOfN(2, 4),
                                                              schedule=sched))
    assert [w.method.update(w, t) for t in range(9)] == [t in (3, 8) for t in range(9)]
    mask = w.method.final_masks(w)["kernel"]
    np.testing.assert_array_equal(mask.reshape(2, 4, 6).sum(axis=1), 2)


@pytest.mark.parametrize("method", [
    methods.Magnitude(0.5),
    methods.Magnitude(0.25, structure=S.Block((4, 1))),
    methods.Magnitude(structure=S.KOutOfN(1, 2, of=S.Filter())),
    methods.Magnitude(schedule=schedules.PolynomialDecay(0.1, 0.6, 2, 20, power=2, frequency=3),
                      structure="filter"),
], ids=repr)
def test_config_round_trips(method):
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(method))
    assert type(restored) is methods.Magnitude
    assert restored.get_config() == method.get_config()
    assert restored.structure == method.structure
    assert restored.schedule == method.schedule
    assert [restored.pruning_due(t) for t in range(25)] == [method.pruning_due(t)
                                                             for t in range(25)]
