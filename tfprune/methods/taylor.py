"""First-order Taylor importance of units (Molchanov et al., 2019), accumulated in the graph.

The score of an output unit ``c`` on one mini-batch is the square of the
first-order Taylor estimate of the loss change when the unit is removed:

* ``criterion="gate"``: ``(sum over batch and positions of dL/dy_c * y_c)^2``,
  ``y`` the wrapped layer's output (after its activation): the loss change
  of a multiplicative gate ``z_c = 1`` after the layer (Molchanov et al.'s
  "gate" variant).
* ``criterion="weight"``: ``sum over the unit's kernel weights of
  (w * dL/dw)^2``.

The per-batch scores are summed into a non-trainable float32 accumulator of
the layer (with a batch count) by an identity with a custom gradient on the
layer's output (or effective kernel): its backward pass adds to the
accumulator. Nothing is read on the host between pruning steps. This needs
the TensorFlow backend (``tf.custom_gradient``).
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
from keras import ops

from tfprune import schedules as schedules_lib
from tfprune import structures as structures_lib
from tfprune._utils import check_fraction, check_int
from tfprune.handlers import to_canonical
from tfprune.methods.base import MaskedMethod, no_autocast

_PKG = "tfprune"
_CRITERIA = ("auto", "gate", "weight")


def _output_feeds_batchnorm(wrapper):
    """The name of a BatchNormalization reading ``wrapper``'s output directly, or None."""
    for node in getattr(wrapper, "_outbound_nodes", None) or []:
        layer = getattr(node, "operation", None)
        inner = getattr(layer, "layer", layer)
        if isinstance(inner, keras.layers.BatchNormalization):
            return inner.name
    return None


@keras.saving.register_keras_serializable(package=_PKG)
class Taylor(MaskedMethod):
    """First-order Taylor importance of units: remove the units whose loss change is smallest.

    Every training step adds each unit's Taylor score of the mini-batch to
    the layer's accumulator, in the graph (see the module docstring for the
    two criteria). At each pruning step of the schedule, the layer's units
    are ranked by the mean score of the batches since the last pruning step
    (with ``momentum > 0``: an exponential moving average of those means
    over pruning steps) and the lowest are removed so that exactly
    ``round(sparsity * units)`` units are pruned (rounded with
    ``Filter.round_to``). Pruned units keep score 0 and stay pruned. Units
    coupled across layers (a residual ``Add``) are selected jointly from the
    sum of their layers' scores (`tfprune.groups`, ``coupling = "select"``).

    **Which output.** The gate criterion uses the wrapped layer's own output.
    When that output goes straight into a BatchNormalization, the gate score
    is useless: batch normalization in training mode makes the loss invariant
    to scaling a channel, so ``sum(dL/dy * y)`` is ~0 for every channel (up
    to the BN epsilon). ``criterion="auto"`` (default) therefore uses the
    gate for layers not followed by a BatchNormalization and the weight
    criterion (a sum of squares, not invariant) for those that are;
    ``criterion="gate"`` there warns.

    **Backend and distribution.** The accumulation is a ``tf.custom_gradient``
    identity, so Taylor needs the TensorFlow backend. It runs inside
    ``model.fit`` (a ``tf.function``), under ``jit_compile=True``, and under
    `tf.distribute.MirroredStrategy`: each replica's per-channel sums are
    all-reduced (summed) before they are squared, so the score is that of the
    global batch, exactly as on one device. Under ``mixed_float16`` the
    scores are computed and accumulated in float32; Keras' loss scaling
    multiplies every score of a step by the same factor (the squared loss
    scale) and batches with non-finite gradients (loss-scale overflow, which
    the optimizer skips too) are not counted.

    **When.** ``schedule=None`` prunes to ``sparsity`` once, at step
    ``min_steps`` (after ``min_steps`` batches of scores). With a schedule,
    the pruning steps are the schedule's; a pruning step reached before any
    batch was scored (step 0, or a step covered by the same
    ``steps_per_execution`` call as the previous pruning step) uses the
    previous scores, or waits for the first scored batch if there are none.

    Args:
        sparsity: fraction of each layer's units to remove, in [0, 1). May be
            None with a ``schedule`` (its sparsity is used) or under a
            whole-model budget (`tfprune.budgets`).
        structure: `Filter()` (default) or `Filter(round_to=N)`; structures
            that do not remove whole units are refused.
        schedule: a `tfprune.schedules` schedule, or None (prune once at
            ``min_steps``).
        criterion: ``"auto"`` (default), ``"gate"`` or ``"weight"``.
        momentum: in [0, 1): weight of the previous score when a pruning step
            combines it with the new mean (0: the new mean only).
        min_steps: with ``schedule=None``, the number of scored batches
            before the one pruning step (int >= 1).

    Example:
        >>> from tfprune import methods, schedules, structures
        >>> m = methods.Taylor(0.5)                                   # once, after 10 batches
        >>> m = methods.Taylor(schedule=schedules.PolynomialDecay(0.0, 0.75, 0, 300, frequency=30))
        >>> m = methods.Taylor(0.5, structure=structures.Filter(round_to=8))

    References:
        Molchanov, Mallya, Tyree, Frosio & Kautz, "Importance Estimation for
        Neural Network Pruning", CVPR 2019 (arXiv 1906.10771).
    """

    requires_callback = True
    #: Coupled units (a residual ``Add``) are chosen jointly from the summed scores.
    coupling = "select"

    def __init__(self, sparsity=None, structure=None, schedule=None, criterion="auto",
                 momentum=0.0, min_steps=10):
        super().__init__(structures_lib.Filter() if structure is None else structure)
        if not self.structure.removes_units:
            raise ValueError(
                f"Taylor: `structure`={self.structure!r} does not remove whole units; Taylor "
                "scores output units, so only structures.Filter() (or Filter(round_to=N)) "
                "is allowed.")
        schedule = schedules_lib.get(schedule)
        if sparsity is not None:
            sparsity = check_fraction(sparsity, "sparsity", owner="Taylor")
        if (schedule is not None and sparsity is not None
                and abs(sparsity - schedule.final_sparsity) > 1e-9):
            raise ValueError(
                f"Taylor: `sparsity`={sparsity} differs from the schedule's final sparsity "
                f"{schedule.final_sparsity}; pass only one of them.")
        if criterion not in _CRITERIA:
            raise ValueError(f"Taylor: `criterion` must be one of {_CRITERIA}, "
                             f"got {criterion!r}.")
        self.momentum = check_fraction(momentum, "momentum", owner="Taylor")
        self.min_steps = check_int(min_steps, "min_steps", owner="Taylor", minimum=1)
        self.sparsity = sparsity
        self.schedule = schedule
        self.criterion = criterion
        if schedule is None:
            target = sparsity if sparsity is not None else 0.0
            schedule = schedules_lib.ConstantSparsity(
                target, begin_step=self.min_steps, end_step=self.min_steps, frequency=1)
        self._effective_schedule = schedule

    def get_config(self):
        config = super().get_config()
        config.update(
            sparsity=self.sparsity,
            schedule=None if self.schedule is None
            else keras.saving.serialize_keras_object(self.schedule),
            criterion=self.criterion, momentum=self.momentum, min_steps=self.min_steps)
        return config

    # -- state -------------------------------------------------------------------
    def build(self, wrapper):
        super().build(wrapper)
        units = wrapper.handler.num_units(wrapper.layer)
        # `taylor_sum` / `taylor_count`: the scores of the batches since the last pruning step;
        # `taylor_score`: the score the last pruning step used.
        self.add_state(wrapper, "taylor_sum", (units,))
        self.add_state(wrapper, "taylor_count", ())
        self.add_state(wrapper, "taylor_score", (units,))
        # `taylor_events`: pruning steps that produced a score; `taylor_pending`: 1.0 while a
        # due pruning step waits for its first scored batch.
        self.add_state(wrapper, "taylor_events", ())
        self.add_state(wrapper, "taylor_pending", ())
        # Host values: the resolved criterion (None until the first training call or fit) and
        # a host copy of `taylor_pending` (None until read).
        wrapper.state.host.update(criterion=None, pending=None)

    def resolved_criterion(self, wrapper):
        """The criterion used for ``wrapper``: ``"gate"`` or ``"weight"`` (``"auto"`` resolved)."""
        bn = _output_feeds_batchnorm(wrapper)
        if self.criterion == "auto":
            return "weight" if bn else "gate"
        if self.criterion == "gate" and bn and wrapper.state.host.get("criterion") is None:
            warnings.warn(
                f"Taylor: layer '{wrapper.name}' feeds BatchNormalization '{bn}', which makes "
                "the loss invariant to scaling its channels: criterion='gate' scores every "
                "unit ~0 there; use criterion='weight' (or 'auto').", stacklevel=3)
        return self.criterion

    def on_train_begin(self, wrapper, params):
        host = wrapper.state.host
        host["criterion"] = self.resolved_criterion(wrapper)
        host["pending"] = bool(float(ops.convert_to_numpy(wrapper.state["taylor_pending"])) > 0)

    # -- the in-graph accumulation ---------------------------------------------
    def call(self, wrapper, inputs, training, **kwargs):
        values = self.effective_variables(wrapper, training)
        host = wrapper.state.host
        if training and host["criterion"] is None:
            host["criterion"] = self.resolved_criterion(wrapper)
        spec = wrapper.handler.unit_spec()
        if training and host["criterion"] == "weight":
            values[spec.name] = self._tap(wrapper, values[spec.name], self._weight_scores(spec))
        outputs = wrapper.run_layer(inputs, values, training=training, **kwargs)
        if training and host["criterion"] == "gate":
            outputs = self._tap(wrapper, outputs, self._gate_scores(wrapper))
        return outputs

    def _gate_scores(self, wrapper):
        import tensorflow as tf

        units = int(wrapper.state["taylor_sum"].shape[0])
        channels_first = getattr(wrapper.layer, "data_format", None) == "channels_first"

        def partial_sum(y, dy):  # [units]: sum over batch and positions of dL/dy * y
            prod = tf.cast(dy, "float32") * tf.cast(y, "float32")
            axis = 1 if channels_first else -1
            prod = tf.reshape(tf.experimental.numpy.moveaxis(prod, axis, -1), (-1, units))
            return tf.reduce_sum(prod, axis=0)

        return partial_sum, tf.square

    def _weight_scores(self, spec):
        import tensorflow as tf

        def partial_sum(w, dw):  # w * dL/dw, summed over replicas before squaring
            return tf.cast(w, "float32") * tf.cast(dw, "float32")

        def finish(wg):  # [units]: sum over the unit's weights of (w * dL/dw)^2
            canon = to_canonical(tf.square(wg), spec.layout)  # [S, I, O]
            return tf.reduce_sum(canon, axis=(0, 1))

        return partial_sum, finish

    def _tap(self, wrapper, x, scorer):
        """Identity on ``x``; its gradient adds ``finish(all_reduce(partial(x, dx)))`` to the
        layer's accumulator."""
        import tensorflow as tf

        partial_sum, finish = scorer
        with no_autocast():
            acc = wrapper.state["taylor_sum"].value
            count = wrapper.state["taylor_count"].value

        @tf.custom_gradient
        def tap(t):
            def grad(dy):
                s = partial_sum(t, dy)
                ctx = tf.distribute.get_replica_context()
                if ctx is not None and ctx.num_replicas_in_sync > 1:
                    s = ctx.all_reduce(tf.distribute.ReduceOp.SUM, s)
                score = finish(s)
                finite = tf.reduce_all(tf.math.is_finite(score))
                updates = [acc.assign_add(tf.where(finite, score, tf.zeros_like(score))),
                           count.assign_add(tf.cast(finite, "float32"))]
                with tf.control_dependencies(updates):
                    return tf.identity(dy)

            return tf.identity(t), grad

        return tap(x)

    # -- scores and masks ----------------------------------------------------------
    def _current_scores(self, wrapper):
        """The score a pruning step would use now (numpy float64 ``[units]``), or None."""
        state = wrapper.state
        count = float(ops.convert_to_numpy(state["taylor_count"]))
        events = float(ops.convert_to_numpy(state["taylor_events"]))
        previous = np.asarray(ops.convert_to_numpy(state["taylor_score"]), np.float64)
        if count <= 0:
            return previous if events > 0 else None
        mean = np.asarray(ops.convert_to_numpy(state["taylor_sum"]), np.float64) / count
        if events > 0 and self.momentum > 0:
            return self.momentum * previous + (1.0 - self.momentum) * mean
        return mean

    def unit_scores(self, wrapper):
        """Taylor importance of each output unit, numpy float64 ``[units]``.

        The mean score of the batches since the last pruning step (combined
        with the previous score when ``momentum > 0``); right after a pruning
        step, the score it used. Pruned units score exactly 0; kept units
        score at least the smallest positive float64, so a joint selection
        (`tfprune.groups`) never prefers a pruned unit over a kept one. Before
        any batch was scored, every kept unit scores that minimum.
        """
        scores = self._current_scores(wrapper)
        kept = np.asarray(self.unit_mask(wrapper), np.float64)
        if scores is None:
            scores = np.zeros_like(kept)
        return np.where(kept > 0, np.maximum(scores, np.finfo(np.float64).tiny), 0.0)

    def unit_sparsity(self, step):
        """The schedule's sparsity at ``step`` (for coupled units, `tfprune.groups`)."""
        return self._effective_schedule(step)[1]

    # -- budgets (`tfprune.budgets`) -------------------------------------------------
    def check_budget(self, budget):
        if budget is None and self.sparsity is None and self.schedule is None:
            raise ValueError("Taylor: give `sparsity` (in [0, 1)) or a `schedule`, or prune "
                             "with a `budget` (tfprune.budgets).")
        super().check_budget(budget)

    def budget_progress(self, step):
        """The schedule's timing (``schedule=None``: once, at ``min_steps``) and progress."""
        due = self._effective_schedule(step)[0]
        return due, 1.0 if self.schedule is None else self.schedule.progress(step)

    def scored(self, wrapper):
        """True once a batch has been scored (a budget waits for it before choosing units)."""
        return self._current_scores(wrapper) is not None

    def on_units_selected(self, wrapper):
        """A budget chose the units from the current scores: they start a new period."""
        scores = self._current_scores(wrapper)
        if scores is not None:
            self._start_period(wrapper, scores)
        else:
            self._reset_sums(wrapper)

    @staticmethod
    def _reset_sums(wrapper):
        """Empties the accumulator of the batches' scores."""
        acc = wrapper.state["taylor_sum"]
        acc.assign(ops.zeros_like(acc))
        wrapper.state["taylor_count"].assign(0.0)

    def _start_period(self, wrapper, scores):
        """Stores ``scores`` as the last pruning step's and empties the accumulator."""
        wrapper.state["taylor_score"].assign(scores.astype("float32"))
        wrapper.state["taylor_events"].assign_add(1.0)
        self._reset_sums(wrapper)

    def update(self, wrapper, step):
        if getattr(wrapper, "budget", None) is not None:
            return False  # the model's budget chooses the units (tfprune.groups)
        due, sparsity = self._effective_schedule(step)
        host, pending = wrapper.state.host, wrapper.state["taylor_pending"]
        if host["pending"] is None:
            host["pending"] = bool(float(ops.convert_to_numpy(pending)) > 0)
        if not due and not host["pending"]:
            return False
        scores = self._current_scores(wrapper)
        if scores is None:  # nothing scored yet: wait for the first scored batch
            if not host["pending"] and sparsity > 0:
                pending.assign(1.0)
                host["pending"] = True
            return False
        pending.assign(0.0)
        host["pending"] = False
        self._start_period(wrapper, scores)
        return self._prune_to(wrapper, scores, sparsity)

    def _prune_to(self, wrapper, scores, sparsity):
        """Keeps the best ``keep`` of the kept units; returns True if the mask changed."""
        old = np.asarray(self.unit_mask(wrapper), np.float64)
        ranked = np.where(old > 0, scores, -1.0)  # pruned units rank last: they stay pruned
        total = ranked.shape[0]
        keep = total - int(round(sparsity * total))
        keep = self.structure.round_keep(keep, total)
        keep = min(keep, int(old.sum()))
        order = np.argsort(-ranked, kind="stable")
        new = np.zeros(total, "float32")
        new[order[:keep]] = 1.0
        if np.array_equal(new, old):
            return False
        self.set_unit_mask(wrapper, new)
        return True

    def logs(self, wrapper):
        return {"taylor_batches": float(ops.convert_to_numpy(wrapper.state["taylor_count"]))}

