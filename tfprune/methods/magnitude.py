"""Magnitude pruning: remove the groups with the smallest L2 norm."""

from __future__ import annotations

import keras

from tfprune import schedules as schedules_lib
from tfprune import structures as structures_lib
from tfprune._utils import check_fraction
from tfprune.methods.base import MaskedMethod

_PKG = "tfprune"


@keras.saving.register_keras_serializable(package=_PKG)
class Magnitude(MaskedMethod):
    """Magnitude pruning at any structure: the baseline every method is compared with.

    At each pruning step of the schedule the groups of each layer (see
    `tfprune.structures`) are scored by their L2 norm and the weakest are
    removed so that exactly ``round(sparsity * num_groups)`` groups of the
    layer are zero (or exactly k of every n with `KOutOfN`). Between pruning
    steps the mask is fixed; removed weights get no gradient.

    Args:
        sparsity: fraction of groups to remove, in [0, 1). May be None when
            ``schedule`` is given (the schedule's sparsity is used), when the
            model is pruned with a ``budget`` (`tfprune.budgets`), or with a
            `KOutOfN` structure (``1 - k/n`` is implied; a schedule then only
            chooses the pruning steps and must not ask for another sparsity).
        structure: a `tfprune.structures.Structure` or its name
            (default `Unstructured()`).
        schedule: a `tfprune.schedules` schedule; None prunes to ``sparsity``
            once, at the first training step.

    Example:
        >>> import tfprune
        >>> from tfprune import methods, schedules, structures
        >>> m = methods.Magnitude(0.9)                                    # one shot
        >>> m = methods.Magnitude(0.75, structure=structures.Filter())    # whole units
        >>> m = methods.Magnitude(structure=structures.KOutOfN(2, 4))     # 2:4
        >>> m = methods.Magnitude(schedule=schedules.PolynomialDecay(0.0, 0.9, 0, 1000))

    References:
        Zhu & Gupta, "To prune, or not to prune", arXiv 1710.01878 (the schedule).
    """

    def __init__(self, sparsity=None, structure=None, schedule=None):
        super().__init__(structure)
        schedule = schedules_lib.get(schedule)
        is_kn = isinstance(self.structure, structures_lib.KOutOfN)
        if sparsity is not None:
            sparsity = check_fraction(sparsity, "sparsity", owner="Magnitude")
        if is_kn:
            implied = 1.0 - self.structure.k / self.structure.n
            if sparsity is not None and abs(sparsity - implied) > 1e-9:
                raise ValueError(
                    f"Magnitude: `sparsity`={sparsity} contradicts structure {self.structure!r}, "
                    f"which keeps exactly k/n; pass sparsity=None or {implied:g}.")
            if schedule is not None:
                asked = {schedule.final_sparsity,
                         getattr(schedule, "initial_sparsity", schedule.final_sparsity)}
                if any(abs(s - implied) > 1e-9 for s in asked):
                    raise ValueError(
                        f"Magnitude: `schedule`={schedule!r} asks for sparsities {sorted(asked)}, "
                        f"but structure {self.structure!r} keeps exactly k of n (sparsity "
                        f"{implied:g}) at every pruning step; to choose only when to prune, pass "
                        f"schedules.ConstantSparsity({implied:g}, begin_step, frequency=...).")
        elif schedule is not None:
            if sparsity is not None and abs(sparsity - schedule.final_sparsity) > 1e-9:
                raise ValueError(
                    f"Magnitude: `sparsity`={sparsity} differs from the schedule's final "
                    f"sparsity {schedule.final_sparsity}; pass only one of them.")
        self._needs_budget = sparsity is None and schedule is None and not is_kn
        self.sparsity = sparsity
        self.schedule = schedule
        if schedule is None:  # one shot, at the first step
            target = sparsity if sparsity is not None else 0.0
            schedule = schedules_lib.ConstantSparsity(target, begin_step=0, end_step=0,
                                                      frequency=1)
        self._effective_schedule = schedule

    def _schedule(self):
        return self._effective_schedule

    @property
    def target_sparsity(self):
        if isinstance(self.structure, structures_lib.KOutOfN):
            return 1.0 - self.structure.k / self.structure.n
        return self._schedule().final_sparsity

    def get_config(self):
        config = super().get_config()
        config.update(
            sparsity=self.sparsity,
            schedule=None if self.schedule is None
            else keras.saving.serialize_keras_object(self.schedule),
        )
        return config

    @property
    def coupling(self):
        return "select" if self.structure.removes_units else "union"

    def check_budget(self, budget):
        if budget is None and self._needs_budget:
            raise ValueError("Magnitude: give `sparsity` (in [0, 1)) or a `schedule`, or prune "
                             "with a `budget` (tfprune.budgets).")
        super().check_budget(budget)

    def budget_progress(self, step):
        """``(due, progress)`` under a budget: the schedule's timing and how far along its
        curve the model is (0: dense, 1: the budget's target)."""
        due = self._schedule()(step)[0]
        return due, 1.0 if self.schedule is None else self.schedule.progress(step)

    def unit_sparsity(self, step):
        """The schedule's sparsity at ``step`` (for coupled units, `tfprune.groups`)."""
        return self.pruning_due(step)[1]

    def pruning_due(self, step):
        """``(should_prune, sparsity)`` at ``step``."""
        return self._schedule()(step)

    def update(self, wrapper, step):
        if getattr(wrapper, "budget", None) is not None:
            return False  # the model's budget chooses the units (tfprune.groups)
        due, sparsity = self.pruning_due(step)
        if not due:
            return False
        self.prune_to(wrapper, sparsity)
        return True

    def prune_to(self, wrapper, sparsity):
        """Recomputes the masks of ``wrapper`` at ``sparsity``."""
        for spec in self.kernel_specs(wrapper):
            scores = self.group_scores(wrapper, spec)
            self.set_group_mask(
                wrapper, spec, structures_lib.select_groups(self.structure, scores, sparsity))
