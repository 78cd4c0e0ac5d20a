"""Coupled unit pruning: channels joined by ``Add`` & co. are scored and removed together.

When two layers feed an ``Add``, channel ``c`` of one can only be removed
(physically, by `tfprune.shrink`) if channel ``c`` of the other goes too. For
methods whose masks are chosen from weights (`methods.Magnitude` with a
structure that removes units), the `tfprune.callbacks.Pruning` callback
re-selects the units of every coupled group jointly after each pruning step:
the group score of a channel is the sum over the coupled producers of the L2
norms of their (masked) kernel slices, and the same channels are removed from
every producer, at the largest sparsity any of them is scheduled to reach.
"""

from __future__ import annotations

import numpy as np

from tfprune.methods.base import MaskedMethod
from tfprune.structures import Filter


def _effective_unit_norms(wrapper, idx):
    """L2 norms of the masked kernel slices of units ``idx`` (the method's own unit scores)."""
    spec = wrapper.handler.unit_spec()
    squared = np.asarray(wrapper.method.group_scores(wrapper, spec)).reshape(-1)  # [O, 1] grid
    return np.sqrt(squared)[np.asarray(idx)]


class Coupling:
    """The coupled unit groups of a model's `Filter`-pruned wrappers.

    Args:
        model: the pruned model.
        wrappers: its `PruneWrapper` layers.
    """

    def __init__(self, model, wrappers):
        self.groups = []
        candidates = {
            w.name: w for w in wrappers
            if isinstance(w.method, MaskedMethod) and w.method.structure.removes_units
            and hasattr(w.method, "pruning_due")
        }
        if not candidates:
            return
        from tfprune.surgery.graph import DependencyGraph

        try:
            graph = DependencyGraph(model)
        except (TypeError, ValueError):  # subclassed model: no graph, no coupling
            return
        for group in graph.groups:
            members = [(candidates[layer.name], np.asarray(idx))
                       for layer, idx in group.producers if layer.name in candidates]
            if len(members) > 1:  # several layers, or one layer several times (groups=)
                self.groups.append((group.name, group.size, members))

    def apply(self, step):
        """Re-selects the units of every coupled group jointly (after the methods' updates).

        Returns:
            True if any mask was changed.
        """
        changed = False
        for _, size, members in self.groups:
            due = [w.method.pruning_due(step) for w, _ in members]
            sparsities = [s for d, s in due if d]
            if not sparsities:
                continue
            sparsity = max(sparsities)
            scores = np.zeros(size)
            for w, idx in members:
                scores += _effective_unit_norms(w, idx)
            keep = size - int(round(sparsity * size))
            round_to = max(getattr(w.method.structure, "round_to", 1) for w, _ in members)
            keep = Filter(round_to).round_keep(keep, size)
            order = np.argsort(-scores, kind="stable")
            group_mask = np.zeros(size, "float32")
            group_mask[order[:keep]] = 1.0
            for w, idx in members:
                unit = w.method.unit_mask(w).astype("float32")
                unit[idx] = group_mask
                w.method.set_unit_mask(w, unit)
            changed = True
        return changed
