"""Coupled unit groups: one decision per group of channels that can only go together.

`tfprune.shrink` can remove channel ``c`` of an ``Add`` only if every layer
feeding the ``Add`` loses its unit ``c``; a BatchNormalization or a depthwise
convolution reading channel ``c`` must lose it too. `UnitGroups` reads those
groups from the dependency graph (`tfprune.surgery.DependencyGraph`) of a
pruned model and keeps every member in step, through the method's
``coupling`` mode (see `tfprune.methods.Method.coupling`):

- ``"select"`` (Magnitude and score-based methods): whenever a member's
  method updates its masks, the group's units are ranked by the sum of the
  members' ``unit_scores`` and the same units are removed from every member
  (`Filter.round_to` respected), at the largest ``unit_sparsity`` of the
  members.
- ``"tie"`` (DPP): the members' per-unit parameters (``unit_parameters``) are
  averaged before every training step and the members draw the same noise
  (``share_noise``), so the sampled masks are identical in every member.
  This is training one shared parameter whose gradient is the members' mean.
- ``"union"`` (Turbo-VBI's dead units): each member decides; a channel is
  removed (and its followers masked) only when every member removed it.

Followers (`methods.Follow`) get the group's mask of their channels.

`tfprune.callbacks.Pruning` builds a `UnitGroups` at the start of each fit
and calls it after the methods' updates.
"""

from __future__ import annotations

import warnings

import numpy as np

from tfprune.methods.follow import Follow
from tfprune.structures import Filter


class _Group:
    """One coupled group: its size, unit-removing members ``[(wrapper, idx)]`` and followers."""

    def __init__(self, name, size, members, followers):
        self.name, self.size, self.members, self.followers = name, size, members, followers
        self.index = None
        self.budgeted = False  # its units are chosen by the model's budget

    @property
    def mode(self):
        modes = {w.method.coupling for w, _ in self.members}
        return modes.pop() if len(modes) == 1 else "mixed"


class UnitGroups:
    """The coupled unit groups of a pruned model, kept in step during training.

    Args:
        model: the pruned model (Sequential or Functional).
        wrappers: its `PruneWrapper` layers.

    Attributes:
        groups: list of groups with unit-removing members or followers.
        followers: ``{follower wrapper name: [(group, follower positions)]}``.
    """

    def __init__(self, model, wrappers):
        self.groups = []
        self._followers = {}
        self._follow_wrappers = []
        self._tied = []
        self.budget = None
        self.last_budget = None
        self._budget_waiting = False
        by_name = {w.name: w for w in wrappers}
        budgets = {repr(w.budget): w.budget for w in wrappers
                   if getattr(w, "budget", None) is not None}
        if len(budgets) > 1:
            raise ValueError(f"Pruning: the layers of model '{model.name}' carry different "
                             f"budgets ({sorted(budgets)}); a model has one budget.")
        unit_members = {w.name for w in wrappers
                        if not isinstance(w.method, Follow) and w.method.removes_units}
        follows = {w.name for w in wrappers if isinstance(w.method, Follow)}
        if not unit_members and not follows:
            return
        from tfprune.surgery.graph import DependencyGraph

        if budgets:
            self.budget = next(iter(budgets.values()))
            self.cost_model = self.budget.cost_model(model)
            graph = self.cost_model.graph
        else:
            try:
                graph = DependencyGraph(model)
            except (TypeError, ValueError):  # a subclassed model: no graph, layers stand alone
                return
        for index, g in enumerate(graph.groups):
            members = [(by_name[layer.name], np.asarray(idx)) for layer, idx in g.producers
                       if layer.name in unit_members]
            followers = [(by_name[layer.name], np.asarray(idx)) for layer, idx in g.followers
                         if layer.name in follows]
            if not members:
                continue
            group = _Group(g.name, g.size, members, followers)
            group.index = index
            group.budgeted = g.blocked_reason is None and all(
                layer.name in by_name and getattr(by_name[layer.name], "budget", None) is not None
                for layer, _ in g.producers)
            self.groups.append(group)
            for w, idx in followers:
                self._followers.setdefault(w.name, []).append((group, idx))
        self._follow_wrappers = [by_name[n] for n in self._followers]
        for group in self.groups:
            if group.mode == "mixed" and len(group.members) > 1:
                warnings.warn(
                    f"Pruning: the units of group '{group.name}' are pruned by different kinds "
                    f"of methods ({sorted({type(w.method).__name__ for w, _ in group.members})}); "
                    "each decides on its own and a channel is removed only where all remove it.",
                    stacklevel=3)
        self._tied = [g for g in self.groups if g.mode == "tie" and len(g.members) > 1
                      and self._can_tie(g)]
        for g in self._tied:
            self._share_noise(g)

    # -- "tie" -----------------------------------------------------------------
    @staticmethod
    def _can_tie(group):
        idx0 = group.members[0][1]
        sizes = {int(w.method.unit_parameters(w).shape[0]) for w, _ in group.members}
        keys = {w.method.tie_key(w) for w, _ in group.members}
        if any(not np.array_equal(idx, idx0) for _, idx in group.members) or len(sizes) > 1 \
                or len(keys) > 1:
            warnings.warn(
                f"Pruning: the units of group '{group.name}' cannot share one learned mask "
                "(their layers order or count their units differently, or keep different "
                "numbers of them); each layer learns its own mask and a channel is removed "
                "only where all remove it.", stacklevel=4)
            return False
        return True

    @staticmethod
    def _share_noise(group):
        first = group.members[0][0]
        for w, _ in group.members[1:]:
            w.method.share_noise(w, first)

    def tie(self):
        """Averages the per-unit parameters of every tied group over its members."""
        for group in self._tied:
            params = [w.method.unit_parameters(w) for w, _ in group.members]
            mean = sum(p.value if hasattr(p, "value") else p for p in params) / len(params)
            for p in params:
                p.assign(mean)

    # -- "select" --------------------------------------------------------------
    def select(self, updated, step):
        """Re-selects the units of the "select" groups with a member in ``updated`` jointly.

        Called after the methods' updates. The group removes the fraction of
        its units that the most aggressive member asks for
        (`Method.unit_sparsity`).

        Args:
            updated: the wrappers whose masks the methods just changed.
            step: the pruning step.

        Returns:
            True if any mask was changed.
        """
        updated = {id(w) for w in updated}
        changed = False
        for group in self.groups:
            if group.mode != "select" or len(group.members) < 2 or group.budgeted:
                continue
            if not any(id(w) in updated for w, _ in group.members):
                continue
            sparsity = max(w.method.unit_sparsity(step) for w, _ in group.members)
            scores = np.zeros(group.size)
            for w, idx in group.members:
                scores += np.asarray(w.method.unit_scores(w), np.float64)[idx]
            keep = group.size - int(round(sparsity * group.size))
            round_to = max(getattr(w.method.structure, "round_to", 1) for w, _ in group.members)
            keep = Filter(round_to).round_keep(keep, group.size)
            order = np.argsort(-scores, kind="stable")
            group_mask = np.zeros(group.size, "float32")
            group_mask[order[:keep]] = 1.0
            for w, idx in group.members:
                unit = np.asarray(w.method.unit_mask(w), "float32").copy()
                unit[idx] = group_mask
                w.method.set_unit_mask(w, unit)
            changed = True
        return changed

    # -- budget -----------------------------------------------------------------
    def budget_due(self, step):
        """``(due, progress)`` of the budget at ``step`` (from the members' methods).

        A due selection waits (and is due at every later step) until every
        member has unit scores (`Method.scored`, e.g. Taylor before its
        first scored batch).
        """
        due, progress, ready = self._budget_waiting, 0.0, True
        for group in self.groups:
            if group.budgeted:
                for w, _ in group.members:
                    d, p = w.method.budget_progress(step)
                    due, progress = due or d, max(progress, p)
                    ready = ready and w.method.scored(w)
        if due and not ready:
            self._budget_waiting = True
            return False, progress
        self._budget_waiting = False
        return due, progress

    def _importance(self, group, normalize):
        total = np.zeros(group.size)
        for w, idx in group.members:
            scores = np.asarray(w.method.unit_scores(w), np.float64)
            if normalize != "none":
                mean = float(scores.mean())
                scores = scores / mean if mean > 0 else scores
            total += scores[idx]
        return total

    def budget_select(self, step, progress):
        """Chooses the units of every budgeted group over the whole model (see
        `tfprune.budgets`) and imposes them.

        Returns:
            ``{"target": cost, "predicted": cost, "dense": cost}``.
        """
        from tfprune.budgets import select

        budget, cm = self.budget, self.cost_model
        target = cm.dense - progress * (cm.dense - budget.keep * cm.dense)
        groups = [g for g in self.groups if g.budgeted]
        importance, removed, min_keep, round_to = {}, {}, {}, {}
        for g in groups:
            imp = self._importance(g, budget.normalize)
            if budget.normalize == "cost":
                cm.reset()
                saving = np.array([cm.saving(g.index, c) for c in range(g.size)])
                imp = imp / np.maximum(saving, 1e-12)
            importance[g.index] = imp
            kept = np.zeros(g.size, bool)
            for w, idx in g.members:
                kept |= np.asarray(w.method.unit_mask(w))[idx] > 0
            removed[g.index] = ~kept
            round_to[g.index] = max(getattr(w.method.structure, "round_to", 1)
                                    for w, _ in g.members)
            min_keep[g.index] = min(g.size, round_to[g.index])
        keep, _ = select(list(importance), importance, cm, target, min_keep=min_keep,
                         removed=removed)
        for g in groups:  # kept counts a multiple of round_to: drop the least important extra
            mask, r = keep[g.index], round_to[g.index]
            extra = int(mask.sum()) % r if mask.sum() < g.size else 0
            if extra and mask.sum() - extra >= r:
                kept_idx = np.flatnonzero(mask)
                drop = kept_idx[np.argsort(importance[g.index][kept_idx], kind="stable")[:extra]]
                mask[drop] = False
            for w, idx in g.members:
                unit = np.asarray(w.method.unit_mask(w), "float32").copy()
                unit[idx] = mask.astype("float32")
                w.method.set_unit_mask(w, unit)
                w.method.on_units_selected(w)
        cm.reset()
        for g in groups:
            for c in np.flatnonzero(~keep[g.index]):
                cm.remove(g.index, int(c))
        self.last_budget = {"target": float(target), "predicted": cm.cost(),
                            "dense": float(cm.dense), "step": int(step)}
        cm.reset()
        if self.last_budget["predicted"] > target * (1 + 1e-9):
            warnings.warn(
                f"Pruning: {budget!r} cannot be met at step {step}: with every budgeted group "
                f"down to its last channels (its round_to) the shrunk model costs "
                f"{self.last_budget['predicted']:.6g} "
                f"({self.last_budget['predicted'] / cm.dense:.1%} of dense), above the target "
                f"{target:.6g}; the rest of the cost is in layers whose units must stay (model "
                "outputs, stops, fixed overhead).", RuntimeWarning, stacklevel=2)
        return self.last_budget

    # -- followers -------------------------------------------------------------
    def sync_followers(self):
        """Sets every follower's channel mask from its groups' members.

        A channel is kept when any member keeps its unit (all members agree
        in "select" and "tie" groups); channels of groups without pruned
        members stay.
        """
        for f in self._follow_wrappers:
            mask = np.ones(int(f.method.unit_mask(f).shape[0]), "float32")
            for group, positions in self._followers[f.name]:
                kept = np.zeros(group.size, "float32")
                for w, idx in group.members:
                    unit = w.method.unit_mask(w)
                    if unit is None:
                        kept[:] = 1.0
                        break
                    kept = np.maximum(kept, np.asarray(unit, "float32")[idx])
                mask[positions] = kept
            f.method.set_mask(f, mask)
