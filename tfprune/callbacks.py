"""`Pruning`: the one callback `model.fit` needs for every tfprune method."""

from __future__ import annotations

import contextlib

import keras
import numpy as np

from tfprune.methods.follow import Follow
from tfprune.wrapper import find_wrappers


class Pruning(keras.callbacks.Callback):
    """Advances every pruning method of a model during training.

    Before each training step it lets each wrapped layer's method update its
    state (schedules, temperatures, message passing...), keeps
    BatchNormalization followers in sync with their producers, and at the end
    of each epoch runs the methods' per-epoch work. With ``log_dir`` it writes
    TensorBoard scalars (sparsity per layer and each method's own values) and
    images of the masks.

    The pruning step is stored in each wrapper (saved with the model), so a
    model saved mid-training and reloaded resumes exactly where it stopped.
    With ``compile(steps_per_execution=N)`` each batch hook covers N steps: the
    methods are updated for all of them before the execution runs.

    Each batch hook also *announces* its steps to the wrappers (one shared
    counter variable, one assignment per hook). A wrapper counts one step per
    traced training step, however many times it is called in it (a shared
    layer), and only if the step was announced: a custom loop that forgets
    ``on_train_batch_begin``, or reuses a traced step after `on_train_end`,
    raises ``tf.errors.InvalidArgumentError`` (``RuntimeError`` in eager
    execution) instead of training without pruning. Under XLA
    (``jit_compile=True``) the assertion is compiled away; the step then
    stops at the last announced step instead of raising.

    When masks change (a method's `update` or `on_epoch_end` returned True),
    the callback checks that the changed layers' weights and pruning state
    are finite and raises a `ValueError` naming the layer and the step
    otherwise (masks chosen from NaN scores would be arbitrary).

    Args:
        log_dir: TensorBoard log directory, or None.
        mask_images: also write mask images (with ``log_dir``).

    Example:
        >>> pruned.fit(x, y, epochs=2, callbacks=[tfprune.callbacks.Pruning()])

        Custom training loop (the same hooks, called by hand):

        >>> cb = tfprune.callbacks.Pruning()
        >>> cb.set_model(pruned)
        >>> cb.on_train_begin()
        >>> for step, (x, y) in enumerate(dataset):
        ...     cb.on_train_batch_begin(step)
        ...     train_step(x, y)           # calls pruned(x, training=True)
        >>> cb.on_train_end()
    """

    def __init__(self, log_dir=None, mask_images=True):
        super().__init__()
        self.log_dir = log_dir
        self.mask_images = mask_images
        self._writer = None
        self._wrappers = []
        self._steps = {}
        self._per_call = 1
        self._clock = None
        self._announced = 0
        self._groups = None
        self._groups_model = None

    # -- hooks -----------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._wrappers = find_wrappers(self.model)
        if not self._wrappers:
            raise ValueError(
                f"Pruning: model '{self.model.name}' has no PruneWrapper layers; "
                "prune it first with tfprune.prune(model, method).")
        for w in self._wrappers:
            if not w.built:
                raise ValueError(f"Pruning: layer '{w.name}' is not built; build the model first.")
        self._clock = self._attach_clock()
        for w in self._wrappers:
            w._callback_attached = True
            self._steps[id(w)] = int(keras.ops.convert_to_numpy(w.step))
            w.method.on_train_begin(w, dict(self.params or {}))
        # In fit(), each on_train_batch_begin covers `steps_per_execution` training steps.
        self._per_call = int(getattr(self.model, "steps_per_execution", 1) or 1) if (
            self.params) else 1
        # The traced training step is kept across fits: the step gates and the clock are
        # the same variables every time, so nothing the trace captured has changed. A train
        # function made before the gates were active (a fit without this callback, which
        # failed mid-trace) is made anew once.
        if (getattr(self.model, "train_function", None) is not None
                and not getattr(self.model, "_tfprune_gated_trace", False)):
            self.model.make_train_function(force=True)
        self.model._tfprune_gated_trace = True
        from tfprune.groups import UnitGroups

        if self._groups is None or self._groups_model is not self.model:
            self._groups = UnitGroups(self.model, self._wrappers)
            self._groups_model = self.model
        self._groups.tie()
        self._groups.sync_followers()
        if self.log_dir is not None and self._writer is None:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(str(self.log_dir))

    def on_train_batch_begin(self, batch, logs=None):
        steps = 1
        if self._per_call > 1:  # the steps of this execution, all updated before it runs
            total = (self.params or {}).get("steps")
            steps = min(self._per_call, total - batch) if total else self._per_call
        steps = max(1, steps)
        for _ in range(steps):
            self._advance()
        # Announce the steps to the wrappers (checked in their training step).
        self._announced += steps
        self._clock.assign(self._announced)

    def _advance(self):
        changed = []
        step = None
        self._groups.tie()
        for w in self._wrappers:
            step = self._steps[id(w)] if step is None else step
            if w.method.update(w, self._steps[id(w)]):
                changed.append(w)
            self._steps[id(w)] += 1
        if self._groups.budget is not None:
            due, progress = self._groups.budget_due(step)
            if due:
                budgeted = [w for w in self._wrappers if getattr(w, "budget", None) is not None]
                check_finite(budgeted, step)
                self._groups.budget_select(step, progress)
                changed.extend(w for w in budgeted if w not in changed)
        if changed:
            check_finite(changed, step)
            self._groups.select(changed, step)
            self.sync_followers()

    def on_epoch_end(self, epoch, logs=None):
        if self._per_call > 1:  # re-read the counted steps (a last execution may be short)
            self._rebase()
        self._groups.tie()
        changed = [w for w in self._wrappers if w.method.on_epoch_end(w, epoch)]
        if changed:
            check_finite(changed, self._steps[id(changed[0])], f"the end of epoch {epoch}")
            self._groups.select(changed, self._steps[id(changed[0])])
            self.sync_followers()
        if self._writer is not None:
            self._write_summaries(epoch)

    def on_train_end(self, logs=None):
        if self._clock is not None:
            self._rebase()
        if self._groups is not None:
            self._groups.tie()
            self.sync_followers()
        for w in self._wrappers:
            w._callback_attached = False
            w._gate.active = False
        # The traced step is kept: reused without this callback, its in-graph gate finds
        # the step unannounced and raises; a new trace or an eager call raises at once.
        if self._writer is not None:
            self._writer.flush()

    # -- helpers ---------------------------------------------------------------
    def _attach_clock(self):
        """Activates each wrapper's step gate with one clock shared by all of them.

        The clock counts the steps this fit announced; each wrapper's base is
        its step now. A clock the wrappers already share (an earlier fit) is
        reused, so a traced training step stays valid.
        """
        gates = [w._gate for w in self._wrappers]
        clock = gates[0].clock
        strategy = getattr(self.model, "distribute_strategy", None)
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            if clock is None or any(g.clock is not clock for g in gates):
                clock = keras.Variable(0, dtype="int64", trainable=False, name="pruning_clock")
            for w, gate in zip(self._wrappers, gates, strict=True):
                gate.clock = clock
                if gate.base is None:
                    gate.base = keras.Variable(0, dtype="int64", trainable=False,
                                               name="pruning_base")
                gate.base.assign(w.step)
                gate.active = True
        clock.assign(0)
        self._announced = 0
        return clock

    def _rebase(self):
        """Re-reads the wrappers' steps and makes them the base of the announced steps."""
        for w in self._wrappers:
            self._steps[id(w)] = int(keras.ops.convert_to_numpy(w.step))
            w._gate.base.assign(self._steps[id(w)])
        self._announced = 0
        self._clock.assign(0)

    def sync_followers(self):
        """Copies the producers' unit masks into the layers that follow them (`methods.Follow`)."""
        self._groups.sync_followers()

    def _write_summaries(self, epoch):
        import tensorflow as tf

        from tfprune.report import layer_sparsity

        with self._writer.as_default(step=epoch):
            for w in self._wrappers:
                if isinstance(w.method, Follow):
                    continue
                tf.summary.scalar(f"sparsity/{w.name}", layer_sparsity(w))
                for key, value in w.method.logs(w).items():
                    tf.summary.scalar(f"{key}/{w.name}", float(value))
                if self.mask_images:
                    image = mask_image(w)
                    if image is not None:
                        tf.summary.image(f"mask/{w.name}", image[None, :, :, None], step=epoch)


def check_finite(wrappers, step, when=None):
    """Raises if a wrapper's weights or pruning state hold NaN or Inf.

    Called by `Pruning` when masks were just recomputed: masks chosen from
    NaN scores are arbitrary (``top_k`` keeps units by index). One device
    reduction and one read per call.

    Args:
        wrappers: the `tfprune.PruneWrapper` layers to check.
        step: the pruning step (for the message).
        when: where in training (for the message); default: the pruning step.

    Raises:
        ValueError: naming the layer, the variable, the count of non-finite
            values and the step.
    """
    ops = keras.ops
    per_wrapper = [[v for v in w.weights if "float" in str(v.dtype)] for w in wrappers]
    flags = [ops.all(ops.isfinite(v)) for vs in per_wrapper for v in vs]
    if not flags or bool(ops.convert_to_numpy(ops.all(ops.stack(flags)))):
        return
    for w, variables in zip(wrappers, per_wrapper, strict=True):
        for v in variables:
            value = np.asarray(ops.convert_to_numpy(v))
            bad = int(np.size(value) - np.isfinite(value).sum())
            if bad:
                where = when or f"pruning step {step}"
                raise ValueError(
                    f"Pruning: layer '{w.name}' has {bad} non-finite (NaN/Inf) values of "
                    f"{np.size(value)} in `{v.path}` at {where}, when its masks were "
                    "recomputed: masks chosen from NaN scores would be arbitrary. Training "
                    "diverged or the data hold NaN/Inf: fix the data (or lower the learning "
                    "rate), and add keras.callbacks.TerminateOnNaN() to stop at the first "
                    "NaN loss.")


def mask_image(wrapper):
    """The unit kernel's mask as a ``[fan_in, units]`` float image in [0, 1], or None.

    This is the image `Pruning` writes to TensorBoard as ``mask/<layer>``.

    Args:
        wrapper: a `tfprune.PruneWrapper`.

    Returns:
        A float numpy array ``[fan_in, units]`` (1 = kept), or None for layers
        without a unit kernel (e.g. a BatchNormalization follower).

    Example:
        >>> import matplotlib.pyplot as plt
        >>> image = mask_image(pruned.get_layer("fc1"))
        >>> plt.imshow(image, cmap="gray", aspect="auto")
    """
    from tfprune.handlers import to_canonical

    masks = wrapper.method.final_masks(wrapper)
    if wrapper.handler is None:
        return None
    spec = wrapper.handler.unit_spec()
    if spec.name not in masks:
        return None
    canon = np.asarray(to_canonical(np.asarray(masks[spec.name], "float32"), spec.layout))
    s, i, o = canon.shape
    return canon.reshape(s * i, o)
