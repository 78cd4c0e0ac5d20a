"""Schedules: tfmot's semantics (when to prune, to what sparsity), configs and arguments."""

import keras
import numpy as np
import pytest

from tfprune import schedules, structures


def _poly(step, initial, final, begin, end, power):
    """tfmot's PolynomialDecay sparsity, written out."""
    p = min(1.0, max(0.0, (step - begin) / (end - begin)))
    return final + (initial - final) * (1.0 - p) ** power


@pytest.mark.parametrize(("step", "due"), [
    (0, False), (9, False), (10, True), (11, False), (29, False), (30, True), (50, True),
    (60, False), (70, True), (71, False), (90, False), (1000, False),
])
def test_constant_sparsity_prunes_every_frequency_steps_between_begin_and_end(step, due):
    s = schedules.ConstantSparsity(0.75, begin_step=10, end_step=70, frequency=20)
    assert s(step) == (due, 0.75)


def test_constant_sparsity_without_end_prunes_forever():
    s = schedules.ConstantSparsity(0.5, begin_step=0, frequency=3)
    assert s.end_step == -1
    assert [s(t)[0] for t in range(7)] == [True, False, False, True, False, False, True]
    assert s(3_000_000)[0]
    assert s.final_sparsity == 0.5


def test_constant_sparsity_defaults_match_tfmot():
    s = schedules.ConstantSparsity(0.5, begin_step=0)
    assert (s.end_step, s.frequency) == (-1, 100)


@pytest.mark.parametrize("step", [0, 5, 10, 17, 25, 40, 55, 60, 61, 100])
@pytest.mark.parametrize("power", [1, 2, 3])
def test_polynomial_decay_values_follow_tfmot(step, power):
    s = schedules.PolynomialDecay(0.2, 0.8, begin_step=10, end_step=60, power=power, frequency=5)
    due, sparsity = s(step)
    assert sparsity == pytest.approx(_poly(step, 0.2, 0.8, 10, 60, power))
    assert due == (10 <= step <= 60 and (step - 10) % 5 == 0)


def test_polynomial_decay_hits_initial_at_begin_and_final_from_end_on():
    s = schedules.PolynomialDecay(0.1, 0.9, begin_step=4, end_step=20, frequency=4)
    assert s(0)[1] == pytest.approx(0.1)
    assert s(4) == (True, pytest.approx(0.1))
    assert s(20) == (True, pytest.approx(0.9))
    assert s(24) == (False, pytest.approx(0.9))  # no pruning after end_step
    assert s(12)[1] == pytest.approx(0.9 - 0.8 * 0.5 ** 3)  # default power 3
    assert s.final_sparsity == 0.9


def test_polynomial_decay_is_monotonic():
    s = schedules.PolynomialDecay(0.0, 0.9, begin_step=0, end_step=100, frequency=1)
    values = [s(t)[1] for t in range(0, 120)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_polynomial_decay_defaults_match_tfmot():
    s = schedules.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=10)
    assert (s.power, s.frequency) == (3, 100)


@pytest.mark.parametrize("schedule", [
    schedules.ConstantSparsity(0.75, begin_step=10, end_step=70, frequency=20),
    schedules.ConstantSparsity(0.0, begin_step=0),
    schedules.PolynomialDecay(0.2, 0.8, begin_step=10, end_step=60, power=2, frequency=5),
    schedules.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=1, power=0.5, frequency=1),
], ids=repr)
def test_config_round_trips(schedule):
    cls = type(schedule)
    restored = cls.from_config(schedule.get_config())
    assert restored == schedule
    assert restored.get_config() == schedule.get_config()
    again = schedules.get(keras.saving.serialize_keras_object(schedule))
    assert type(again) is cls and again == schedule
    assert [again(t) for t in range(0, 80, 3)] == [schedule(t) for t in range(0, 80, 3)]


def test_get_resolves_none_and_instances_and_rejects_the_rest():
    assert schedules.get(None) is None
    s = schedules.ConstantSparsity(0.5, 0)
    assert schedules.get(s) is s
    with pytest.raises(ValueError, match="'polynomial' is not a known name"):
        schedules.get("polynomial")


@pytest.mark.parametrize(("make", "exc", "arg"), [
    (lambda: schedules.ConstantSparsity(1.0, 0), ValueError, "target_sparsity"),
    (lambda: schedules.ConstantSparsity(-0.1, 0), ValueError, "target_sparsity"),
    (lambda: schedules.ConstantSparsity(float("nan"), 0), ValueError, "target_sparsity"),
    (lambda: schedules.ConstantSparsity("x", 0), TypeError, "target_sparsity"),
    (lambda: schedules.ConstantSparsity(0.5, -1), ValueError, "begin_step"),
    (lambda: schedules.ConstantSparsity(0.5, 1.5), TypeError, "begin_step"),
    (lambda: schedules.ConstantSparsity(0.5, 10, end_step=5), ValueError, "end_step"),
    (lambda: schedules.ConstantSparsity(0.5, 0, end_step=-2), ValueError, "end_step"),
    (lambda: schedules.ConstantSparsity(0.5, 0, frequency=0), ValueError, "frequency"),
    (lambda: schedules.PolynomialDecay(0.0, 1.0, 0, 10), ValueError, "final_sparsity"),
    (lambda: schedules.PolynomialDecay(1.2, 0.5, 0, 10), ValueError, "initial_sparsity"),
    (lambda: schedules.PolynomialDecay(0.0, 0.5, 0, -1), ValueError, "end_step"),
    (lambda: schedules.PolynomialDecay(0.0, 0.5, 5, 5), ValueError, "end_step"),
    (lambda: schedules.PolynomialDecay(0.0, 0.5, 10, 5), ValueError, "end_step"),
    (lambda: schedules.PolynomialDecay(0.0, 0.5, 0, 10, power=0), ValueError, "power"),
    (lambda: schedules.PolynomialDecay(0.0, 0.5, 0, 10, power="3"), TypeError, "power"),
    (lambda: schedules.PolynomialDecay(0.0, 0.5, 0, 10, frequency=0), ValueError, "frequency"),
])
def test_bad_arguments_raise_naming_the_argument(make, exc, arg):
    with pytest.raises(exc, match=f"`{arg}`"):
        make()


@pytest.mark.parametrize("power", [float("nan"), float("inf"), -1.0, 0, np.float32("nan")])
def test_polynomial_decay_rejects_non_finite_or_non_positive_power(power):
    with pytest.raises(ValueError, match="`power` must be a finite number > 0"):
        schedules.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=10, power=power)


@pytest.mark.parametrize("power", ["3", True, None])
def test_polynomial_decay_rejects_a_power_that_is_not_a_number(power):
    with pytest.raises(TypeError, match="`power` must be a positive number"):
        schedules.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=10, power=power)


def test_numpy_integers_and_floats_are_accepted_like_tfmot_and_serialize_as_json():
    import json

    poly = schedules.PolynomialDecay(np.float32(0.0), np.float64(0.5), begin_step=np.int64(0),
                                     end_step=np.int32(10), power=np.int64(2),
                                     frequency=np.int64(5))
    const = schedules.ConstantSparsity(np.float32(0.5), begin_step=np.int64(2),
                                       end_step=np.int64(20), frequency=np.int32(2))
    for s in (poly, const):
        config = s.get_config()
        assert all(type(v) in (int, float) for v in config.values())
        json.dumps(keras.saving.serialize_keras_object(s))
    assert poly(10) == (True, 0.5) and const(4) == (True, 0.5)


def test_structures_accept_numpy_integers():
    assert structures.KOutOfN(np.int64(2), np.int32(4)).get_config()["k"] == 2
    assert structures.Block((np.int64(4), np.int64(1))).shape == (4, 1)
