"""Structures: grouping of canonical kernels, selection helpers, arguments and configs."""

import itertools
import math

import keras
import numpy as np
import pytest

from tfprune import handlers
from tfprune import structures as S

# Canonical [S, I, O] shapes: Dense, conv, depthwise (I = 1), odd sizes that no block divides.
CANON_SHAPES = [(1, 8, 6), (9, 4, 6), (9, 1, 8), (1, 10, 3), (4, 3, 5)]

ALL_STRUCTURES = [
    S.Unstructured(), S.Kernel(), S.Filter(), S.Block((4, 1)), S.Block((3, 2)), S.Block((1, 4)),
    S.KOutOfN(2, 4), S.KOutOfN(1, 3, of=S.Kernel()), S.KOutOfN(1, 2, of=S.Filter()),
    S.KOutOfN(1, 2, of=S.Block((2, 2))),
]
STRUCT_IDS = [repr(s) for s in ALL_STRUCTURES]


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


@pytest.mark.parametrize("structure", ALL_STRUCTURES, ids=STRUCT_IDS)
@pytest.mark.parametrize("shape", CANON_SHAPES, ids=str)
def test_every_weight_belongs_to_exactly_one_group(structure, shape):
    a, b = structure.grid_shape(shape)
    sizes = _np(structure.group_sizes(shape))
    assert sizes.shape == (a, b)
    assert sizes.sum() == math.prod(shape)
    assert sizes.min() >= 1
    # Expanding a grid of distinct group ids labels every weight with its group;
    # reducing the one-hot of each id gives back that group's size.
    ids = np.arange(a * b, dtype="float32").reshape(a, b) + 1.0
    labels = _np(structure.expand(ids, shape))
    assert labels.shape == shape
    counts = np.bincount(labels.astype(int).ravel(), minlength=a * b + 1)[1:]
    np.testing.assert_array_equal(counts, sizes.ravel())


@pytest.mark.parametrize("structure", ALL_STRUCTURES, ids=STRUCT_IDS)
@pytest.mark.parametrize("shape", CANON_SHAPES, ids=str)
def test_reduce_of_expanded_group_mask_is_mask_times_group_size(structure, shape):
    rng = np.random.default_rng(0)
    grid = structure.grid_shape(shape)
    mask = (rng.random(grid) > 0.5).astype("float32")
    expanded = _np(structure.expand(mask, shape))
    assert set(np.unique(expanded)) <= {0.0, 1.0}
    np.testing.assert_array_equal(_np(structure.reduce(expanded)),
                                  mask * _np(structure.group_sizes(shape)))


@pytest.mark.parametrize("structure", ALL_STRUCTURES, ids=STRUCT_IDS)
def test_reduce_sums_scores_within_groups(structure):
    shape = (9, 4, 6)
    scores = np.random.default_rng(1).random(shape).astype("float32")
    reduced = _np(structure.reduce(scores))
    a, b = structure.grid_shape(shape)
    labels = _np(structure.expand(np.arange(a * b, dtype="float32").reshape(a, b), shape))
    expected = np.zeros(a * b)
    np.add.at(expected, labels.astype(int).ravel(), scores.ravel())
    np.testing.assert_allclose(reduced.ravel(), expected, rtol=1e-5)


@pytest.mark.parametrize(("structure", "shape", "grid", "size"), [
    (S.Unstructured(), (9, 4, 6), (36, 6), 1),
    (S.Kernel(), (9, 4, 6), (4, 6), 9),
    (S.Filter(), (9, 4, 6), (6, 1), 36),
    (S.Block((4, 1)), (1, 8, 6), (2, 6), 4),
    (S.Block((2, 3)), (1, 8, 6), (4, 2), 6),
])
def test_grid_shapes_and_group_sizes(structure, shape, grid, size):
    assert structure.grid_shape(shape) == grid
    np.testing.assert_array_equal(_np(structure.group_sizes(shape)), np.full(grid, size))


def test_block_groups_rows_of_the_fan_in_by_units_matrix():
    # Canonical [S, I, O] seen as a [S*I, O] matrix: block (2, 1) pairs consecutive rows.
    shape = (2, 2, 3)
    labels = _np(S.Block((2, 1)).expand(np.arange(6, dtype="float32").reshape(2, 3), shape))
    mat = labels.reshape(4, 3)
    np.testing.assert_array_equal(mat, [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]])


def test_block_pads_when_the_block_does_not_divide_the_kernel():
    # fan_in 10 with blocks of 4 rows -> 3 block rows, the last with 2 weights (documented).
    shape = (1, 10, 3)
    block = S.Block((4, 2))
    assert block.grid_shape(shape) == (3, 2)
    sizes = _np(block.group_sizes(shape))
    np.testing.assert_array_equal(sizes, [[8, 4], [8, 4], [4, 2]])
    assert "padded" in S.Block.__doc__


@pytest.mark.parametrize(("a", "k", "n"), [(8, 2, 4), (12, 1, 3), (10, 3, 4), (10, 2, 4),
                                           (5, 4, 4), (7, 1, 1), (3, 2, 4)])
def test_k_of_n_keeps_exactly_k_per_run_and_min_k_m_in_a_trailing_run(a, k, n):
    scores = np.random.default_rng(a * 100 + k).random((a, 5)).astype("float32")
    mask = _np(S.k_of_n_mask(scores, k, n))
    assert mask.shape == (a, 5)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    for start in range(0, a, n):
        run = mask[start:start + n]
        m = run.shape[0]
        np.testing.assert_array_equal(run.sum(axis=0), np.full(5, min(k, m)))
        # The kept ones are the largest of the run.
        sc = scores[start:start + n]
        for col in range(5):
            kept = sc[run[:, col] == 1, col]
            dropped = sc[run[:, col] == 0, col]
            if kept.size and dropped.size:
                assert kept.min() > dropped.max()


def test_k_of_n_with_negative_scores_still_keeps_exactly_k():
    scores = -np.random.default_rng(3).random((6, 2)).astype("float32") - 5.0
    mask = _np(S.k_of_n_mask(scores, 3, 4))
    np.testing.assert_array_equal(mask[:4].sum(axis=0), [3, 3])
    np.testing.assert_array_equal(mask[4:].sum(axis=0), [2, 2])


@pytest.mark.parametrize("keep", [0, 1, 7, 24])
def test_top_fraction_mask_keeps_exactly_the_largest(keep):
    scores = np.random.default_rng(4).random((4, 6)).astype("float32")
    mask = _np(S.top_fraction_mask(scores, keep))
    assert mask.sum() == keep
    if 0 < keep < scores.size:
        assert scores[mask == 1].min() > scores[mask == 0].max()


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.9])
def test_select_groups_removes_round_sparsity_times_groups(sparsity):
    scores = np.random.default_rng(5).random((7, 3)).astype("float32")
    mask = _np(S.select_groups(S.Kernel(), scores, sparsity))
    assert (mask == 0).sum() == round(sparsity * 21)


def test_select_groups_with_k_out_of_n_ignores_sparsity_and_keeps_k_of_n():
    scores = np.random.default_rng(6).random((8, 3)).astype("float32")
    mask = _np(S.select_groups(S.KOutOfN(2, 4), scores, 0.9))
    np.testing.assert_array_equal(mask.reshape(2, 4, 3).sum(axis=1), np.full((2, 3), 2))


def test_kernel_is_unstructured_on_a_dense_kernel():
    shape = (1, 8, 6)  # Dense: one spatial tap
    assert S.Kernel().grid_shape(shape) == S.Unstructured().grid_shape(shape)
    scores = np.random.default_rng(7).random(shape).astype("float32")
    np.testing.assert_array_equal(_np(S.Kernel().reduce(scores)),
                                  _np(S.Unstructured().reduce(scores)))
    mask = (scores[0] > 0.5).astype("float32")
    np.testing.assert_array_equal(_np(S.Kernel().expand(mask, shape)),
                                  _np(S.Unstructured().expand(mask, shape)))
    assert "Unstructured" in S.Kernel.__doc__


def test_filter_and_k_out_of_n_of_filter_remove_units():
    assert S.Filter().removes_units
    assert S.KOutOfN(1, 2, of=S.Filter()).removes_units
    assert not any(s.removes_units for s in (S.Unstructured(), S.Kernel(), S.Block((4, 1)),
                                             S.KOutOfN(2, 4)))


# -- canonical views of each layout --------------------------------------------------


@pytest.mark.parametrize(("shape", "layout", "canon"), [
    ((8, 6), handlers.STANDARD, (1, 8, 6)),
    ((3, 3, 4, 6), handlers.STANDARD, (9, 4, 6)),
    ((2, 2, 2, 3, 6), handlers.STANDARD, (8, 3, 6)),
    ((3, 3, 6, 4), handlers.TRANSPOSED, (9, 4, 6)),
    ((3, 3, 4, 2), handlers.DEPTHWISE, (9, 1, 8)),
])
def test_canonical_view_round_trips(shape, layout, canon):
    kernel = np.random.default_rng(8).random(shape).astype("float32")
    assert handlers.canonical_shape(shape, layout) == canon
    c = _np(handlers.to_canonical(kernel, layout))
    assert c.shape == canon
    np.testing.assert_array_equal(_np(handlers.from_canonical(c, shape, layout)), kernel)


def test_transposed_canonical_view_puts_output_channels_last():
    kernel = np.random.default_rng(9).random((3, 3, 6, 4)).astype("float32")  # [kh, kw, out, in]
    c = _np(handlers.to_canonical(kernel, handlers.TRANSPOSED))
    np.testing.assert_array_equal(c[:, 1, 5], kernel[:, :, 5, 1].ravel())


def test_depthwise_canonical_units_are_channel_major():
    kernel = np.random.default_rng(10).random((3, 3, 4, 2)).astype("float32")  # [.., C, M]
    c = _np(handlers.to_canonical(kernel, handlers.DEPTHWISE))
    np.testing.assert_array_equal(c[:, 0, 2 * 2 + 1], kernel[:, :, 2, 1].ravel())


# -- arguments ---------------------------------------------------------------------


@pytest.mark.parametrize(("make", "arg"), [
    (lambda: S.KOutOfN(5, 4), "`k`"),
    (lambda: S.KOutOfN(0, 4), "`k`"),
    (lambda: S.KOutOfN(-1, 4), "`k`"),
    (lambda: S.KOutOfN(1, 0), "`n`"),
    (lambda: S.KOutOfN(1, 2, of=S.KOutOfN(1, 2)), "`of`"),
    (lambda: S.Block((0, 1)), "`shape`"),
    (lambda: S.Block((4,)), "`shape`"),
    (lambda: S.Block((4, 1, 1)), "`shape`"),
    (lambda: S.Block("4x1"), "`shape`"),
    (lambda: S.Block((2.5, 1)), "`shape`"),
    (lambda: S.Block((True, 1)), "`shape`"),
])
def test_bad_arguments_raise_value_error_naming_the_argument(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_k_out_of_n_with_a_non_int_raises_type_error():
    with pytest.raises(TypeError, match="`k`"):
        S.KOutOfN(2.0, 4)


def test_k_out_of_n_message_quotes_the_value_and_the_allowed_range():
    with pytest.raises(ValueError) as err:
        S.KOutOfN(5, 4)
    assert "5" in str(err.value) and "1 <= k <= n" in str(err.value)


# -- get / serialize ---------------------------------------------------------------


@pytest.mark.parametrize("structure", ALL_STRUCTURES, ids=STRUCT_IDS)
def test_serialize_then_get_round_trips(structure):
    config = S.serialize(structure)
    restored = S.get(config)
    assert restored == structure
    assert type(restored) is type(structure)
    assert restored.get_config() == structure.get_config()
    assert type(structure).from_config(structure.get_config()) == structure
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(structure))
    assert again == structure


def test_block_shape_round_trips_as_a_tuple():
    block = S.Block.from_config(S.Block((4, 1)).get_config())
    assert block.shape == (4, 1)


@pytest.mark.parametrize(("identifier", "expected"), [
    (None, S.Unstructured()), ("unstructured", S.Unstructured()), ("kernel", S.Kernel()),
    ("Filter", S.Filter()),
])
def test_get_resolves_none_names_and_instances(identifier, expected):
    assert S.get(identifier) == expected
    inst = S.Block((2, 2))
    assert S.get(inst) is inst


def test_get_rejects_unknown_names_and_types():
    with pytest.raises(ValueError, match="'nope'"):
        S.get("nope")
    with pytest.raises(ValueError, match="Block"):
        S.get("block")
    with pytest.raises(TypeError):
        S.get(3)


def test_structures_compare_by_config():
    assert S.Block((4, 1)) == S.Block([4, 1])
    assert S.Block((4, 1)) != S.Block((1, 4))
    assert S.KOutOfN(2, 4) != S.KOutOfN(2, 4, of=S.Kernel())
    assert len({S.Filter(), S.Filter(), S.Kernel()}) == 2
    for a, b in itertools.combinations([S.Unstructured(), S.Kernel(), S.Filter()], 2):
        assert a != b


def test_repr_is_readable_in_error_messages():
    assert repr(S.KOutOfN(2, 4, of=S.Block((4, 1)))) == "KOutOfN(k=2, n=4, of=Block(shape=[4, 1]))"
    assert repr(S.Filter()) == "Filter()"


# -- Filter(round_to) ----------------------------------------------------------------------

@pytest.mark.parametrize("round_to,keep,total,expected", [
    (1, 13, 64, 13), (8, 13, 64, 16), (8, 11, 64, 8), (8, 3, 64, 8), (8, 13, 14, 14),
    (4, 64, 64, 64), (4, 62, 64, 64), (4, 61, 64, 60)])
def test_filter_round_keep_gives_a_multiple_of_round_to_or_all(round_to, keep, total, expected):
    assert S.Filter(round_to=round_to).round_keep(keep, total) == expected


@pytest.mark.parametrize("round_to", [0, -4, 2.5, "8", True])
def test_filter_round_to_must_be_a_positive_int(round_to):
    with pytest.raises((ValueError, TypeError), match="Filter: `round_to`"):
        S.Filter(round_to=round_to)


def test_filter_round_to_serializes_and_equality_sees_it():
    s = S.Filter(round_to=8)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(s))
    assert again == s and again.round_to == 8
    assert S.Filter() != s and S.Filter() == S.Filter(round_to=1)
    assert repr(s) == "Filter(round_to=8)"


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7, 0.9])
def test_magnitude_filter_round_to_keeps_a_multiple_of_round_to_units(sparsity):
    import tfprune
    from tfprune import methods

    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(40, name="h"),
                              keras.layers.Dense(3, name="out")])
    pruned = tfprune.prune(model, methods.Magnitude(
        sparsity, structure=S.Filter(round_to=8)))
    x = np.random.default_rng(0).normal(size=(8, 16)).astype("float32")
    pruned.compile("sgd", "mse")
    pruned.fit(x, np.zeros((8, 3)), epochs=1, verbose=0, callbacks=[tfprune.callbacks.Pruning()])
    kept = int(pruned.get_layer("h").method.unit_mask(pruned.get_layer("h")).sum())
    assert kept % 8 == 0 and kept == S.Filter(round_to=8).round_keep(
        40 - round(sparsity * 40), 40)
    assert tfprune.shrink(tfprune.strip(pruned)).get_layer("h").units == kept
