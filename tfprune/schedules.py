"""Pruning schedules, with the arguments and meaning of tfmot's.

A schedule is called with the pruning step (a Python int, counted by the
wrapper and advanced by `tfprune.callbacks.Pruning`) and returns
``(should_prune, sparsity)``: whether the masks are recomputed before this
step and the sparsity to prune to. Pruning happens at ``begin_step`` and every
``frequency`` steps after it, up to ``end_step`` (``-1``: no end).
"""

from __future__ import annotations

import keras

from tfprune._utils import Configurable, check_fraction, check_int, check_positive

_PKG = "tfprune"


class PruningSchedule(Configurable):
    """Base class of the schedules."""

    def __call__(self, step):
        raise NotImplementedError

    @property
    def final_sparsity(self):
        raise NotImplementedError

    def progress(self, step):
        """How far along its curve the schedule is at ``step``: 0 before it starts, 1 at its end.

        Used by budgets (`tfprune.budgets`), which keep only a schedule's timing.
        """
        raise NotImplementedError

    def get_config(self):
        raise NotImplementedError

    @staticmethod
    def _in_range(step, begin, end, frequency):
        in_range = step >= begin and (end == -1 or step <= end)
        return in_range and (step - begin) % frequency == 0


def _check_steps(owner, begin_step, end_step, frequency, *, need_end=False):
    """Validates the step arguments (Python or NumPy ints); returns them as Python ints."""
    begin_step = check_int(begin_step, "begin_step", owner=owner, minimum=0)
    end_step = check_int(end_step, "end_step", owner=owner, minimum=-1)
    frequency = check_int(frequency, "frequency", owner=owner, minimum=1)
    if need_end and end_step < 0:
        raise ValueError(f"{owner}: `end_step` must be >= 0, got {end_step}.")
    if end_step != -1 and end_step < begin_step:
        raise ValueError(
            f"{owner}: `end_step` ({end_step}) must be >= `begin_step` ({begin_step}) or -1."
        )
    return begin_step, end_step, frequency


@keras.saving.register_keras_serializable(package=_PKG)
class ConstantSparsity(PruningSchedule):
    """Prunes to a constant ``target_sparsity`` every ``frequency`` steps.

    Args:
        target_sparsity: fraction of groups removed, in [0, 1).
        begin_step: first step at which to prune.
        end_step: last step at which to prune (-1: until training ends).
        frequency: prune every ``frequency`` steps.

    Example:
        >>> s = schedules.ConstantSparsity(0.8, begin_step=0, frequency=100)
        >>> s(0), s(50), s(100)
        ((True, 0.8), (False, 0.8), (True, 0.8))
    """

    def __init__(self, target_sparsity, begin_step, end_step=-1, frequency=100):
        self.target_sparsity = check_fraction(target_sparsity, "target_sparsity",
                                              owner="ConstantSparsity")
        self.begin_step, self.end_step, self.frequency = _check_steps(
            "ConstantSparsity", begin_step, end_step, frequency)

    @property
    def final_sparsity(self):
        return self.target_sparsity

    def __call__(self, step):
        return (self._in_range(step, self.begin_step, self.end_step, self.frequency),
                self.target_sparsity)

    def progress(self, step):
        """0 before ``begin_step``, 1 from it on."""
        return 1.0 if step >= self.begin_step else 0.0

    def get_config(self):
        return {"target_sparsity": self.target_sparsity, "begin_step": self.begin_step,
                "end_step": self.end_step, "frequency": self.frequency}


@keras.saving.register_keras_serializable(package=_PKG)
class PolynomialDecay(PruningSchedule):
    """Sparsity rises from ``initial_sparsity`` to ``final_sparsity`` (Zhu & Gupta, 2017).

    ``s(t) = final + (initial - final) * (1 - p)**power`` with
    ``p = (t - begin_step) / (end_step - begin_step)`` clipped to [0, 1].

    Args:
        initial_sparsity: sparsity at ``begin_step``, in [0, 1).
        final_sparsity: sparsity from ``end_step`` on, in [0, 1).
        begin_step: first pruning step.
        end_step: step at which ``final_sparsity`` is reached (last pruning step).
        power: exponent of the polynomial.
        frequency: prune every ``frequency`` steps.

    Example:
        >>> s = schedules.PolynomialDecay(0.0, 0.9, begin_step=0, end_step=1000)
        >>> s(1000)
        (True, 0.9)
    """

    def __init__(self, initial_sparsity, final_sparsity, begin_step, end_step, power=3,
                 frequency=100):
        owner = "PolynomialDecay"
        self.initial_sparsity = check_fraction(initial_sparsity, "initial_sparsity", owner=owner)
        self.final_sparsity_ = check_fraction(final_sparsity, "final_sparsity", owner=owner)
        begin_step, end_step, frequency = _check_steps(owner, begin_step, end_step, frequency,
                                                       need_end=True)
        if end_step == begin_step:
            raise ValueError(f"{owner}: `end_step` must be > `begin_step`, got {end_step}.")
        power = check_positive(power, "power", owner=owner)
        self.begin_step, self.end_step = begin_step, end_step
        self.power = int(power) if power.is_integer() else power
        self.frequency = frequency

    @property
    def final_sparsity(self):
        return self.final_sparsity_

    def progress(self, step):
        """``1 - (1 - p)**power`` with ``p`` the clipped fraction of [begin_step, end_step]."""
        p = (step - self.begin_step) / (self.end_step - self.begin_step)
        return 1.0 - (1.0 - min(1.0, max(0.0, p))) ** self.power

    def sparsity(self, step):
        p = (step - self.begin_step) / (self.end_step - self.begin_step)
        p = min(1.0, max(0.0, p))
        return self.final_sparsity_ + (self.initial_sparsity - self.final_sparsity_) * (
            1.0 - p) ** self.power

    def __call__(self, step):
        return (self._in_range(step, self.begin_step, self.end_step, self.frequency),
                self.sparsity(step))

    def get_config(self):
        return {"initial_sparsity": self.initial_sparsity,
                "final_sparsity": self.final_sparsity_, "begin_step": self.begin_step,
                "end_step": self.end_step, "power": self.power, "frequency": self.frequency}


def get(identifier):
    """Resolves None, a schedule instance or config dict (the shared ``get()`` rules).

    The rules are those of `tfprune.methods.get` and `tfprune.structures.get`.
    Every schedule needs arguments, so its registered names
    (``"constant_sparsity"``, ``"polynomial_decay"``) are errors that say so.

    Args:
        identifier: None (no schedule: the method's own default timing), a
            `PruningSchedule` (returned as is), or a config dict from
            ``keras.saving.serialize_keras_object(schedule)``.

    Returns:
        A `PruningSchedule`, or None for None.

    Raises:
        ValueError: a name (unknown, or of a schedule: those need arguments),
            or a config dict that cannot be deserialized.
        TypeError: any other type, a class instead of an instance, or a config
            dict of something that is not a `PruningSchedule`.

    Example:
        >>> schedules.get(None) is None
        True
    """
    from tfprune._utils import resolve_identifier

    names = {"constant_sparsity": ConstantSparsity, "polynomial_decay": PolynomialDecay}
    return resolve_identifier(
        identifier, argument="schedule", base=PruningSchedule, names=names,
        kind="a tfprune.schedules.PruningSchedule",
        example="schedules.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=1000)",
        prefix="schedules.",
        needs_arguments=tuple(names), none=lambda: None, none_means="no schedule")
