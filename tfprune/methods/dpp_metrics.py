"""Metrics and figures of `tfprune.methods.DPP` masks.

* `mask_metrics`: per-layer *confidence* and *diversity* of a model's DPP masks;
* `DPPMetricsHistory`: a callback that records them (and the temperature)
  after each epoch;
* `plot_masks`: a figure of the inference masks and the recorded curves.

The pure numpy functions behind them (`layer_metrics`) work on the logits
grids of one layer. All names are also importable from `tfprune.methods.dpp`.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from tfprune import structures as structures_lib


def _is_dpp(method):
    from tfprune.methods.dpp import DPP

    return isinstance(method, DPP)


def _runs_np(logits, n, fill):
    a, b = logits.shape
    runs = math.ceil(a / n)
    x = np.full((runs * n, b), fill, dtype="float64")
    x[:a] = logits
    return x.reshape(runs, n, b).transpose(0, 2, 1)  # [R, B, n]


def _confidence(logits, k, n):
    """(mean confidence over runs, number of runs) of one ``[A, B]`` logits grid."""
    a, _ = logits.shape
    x = _runs_np(logits, n, -np.inf)
    m = np.isfinite(x).sum(-1)  # valid groups per run
    shifted = x - x.max(-1, keepdims=True)
    p = np.exp(shifted)
    p /= p.sum(-1, keepdims=True)
    h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
    kk = np.minimum(k, m)
    lo, hi = np.log(kk), np.log(m)
    with np.errstate(divide="ignore", invalid="ignore"):
        conf = 1.0 - np.clip((h - lo) / (hi - lo), 0.0, 1.0)
    conf = np.where(m > kk, conf, 1.0)
    return float(conf.mean()), conf.size


def _diversity(logits, k, n):
    """(diversity over the full runs, number of full runs) of one ``[A, B]`` logits grid."""
    a, _ = logits.shape
    n_eff = min(n, a)
    full = a // n_eff
    if k >= n_eff or full * logits.shape[1] < 2:
        return float("nan"), 0
    mask = np.asarray(ops.convert_to_numpy(
        structures_lib.k_of_n_mask(ops.convert_to_tensor(logits[: full * n_eff], "float32"),
                                   k, n_eff)), "float64")
    runs = _runs_np(mask, n_eff, 0.0).reshape(-1, n_eff)  # [R*B, n]
    q = runs.mean(0) / k
    h = -np.sum(q[q > 0] * np.log(q[q > 0]))
    return float(np.clip((h - np.log(k)) / (np.log(n_eff) - np.log(k)), 0.0, 1.0)), runs.shape[0]


def layer_metrics(grids):
    """``{"confidence": float, "diversity": float}`` of one layer (see `mask_metrics`).

    Args:
        grids: ``(logits, k, n)`` per kernel of the layer: an ``[A, B]``
            array of logits with runs of ``n`` along axis 0, ``k`` kept per run.

    Returns:
        The confidence and the diversity, averaged over the kernels weighted by
        their number of (full) runs; NaN where undefined.
    """
    conf_sum = conf_n = div_sum = div_n = 0.0
    for logits, k, n in grids:
        logits = np.asarray(logits, "float64")
        c, nc = _confidence(logits, k, n)
        d, nd = _diversity(logits, k, n)
        conf_sum, conf_n = conf_sum + c * nc, conf_n + nc
        if nd:
            div_sum, div_n = div_sum + d * nd, div_n + nd
    return {"confidence": conf_sum / conf_n if conf_n else float("nan"),
            "diversity": div_sum / div_n if div_n else float("nan")}


def mask_metrics(model):
    """Per-layer *confidence* and *diversity* of the DPP masks of ``model``.

    Definitions, for one kernel with runs of ``n`` groups of which ``k`` are
    kept (a trailing short run of ``m`` groups: ``k' = min(k, m)``):

    * **confidence** = mean over runs of
      ``1 - clip((H(p) - log k') / (log m - log k'), 0, 1)``, where
      ``p = softmax(logits of the run)`` is the run's keep distribution and
      ``H`` the entropy in nats. ``log k'`` is the entropy of an ideal keep
      distribution (uniform over exactly k' groups) and ``log m`` that of the
      uniform one, so the confidence is 0 for uniform logits (every mask
      equally likely) and 1 when the probability mass sits on k' groups (the
      sampled mask no longer changes). Runs with ``m <= k'`` count as 1.
    * **diversity** = ``(H(q) - log k) / (log n - log k)`` (clipped to [0, 1]),
      where ``q`` is the mean over the full runs of the inference masks
      divided by k (the distribution of the kept positions within a run). It
      is 0 when every run keeps the same positions and 1 when all positions
      are kept equally often. NaN when it is undefined (fewer than two full
      runs, e.g. `Filter()` with ``n=None``, or ``k = n``).

    A layer with several kernels (SeparableConv) averages them, weighted by
    their number of runs.

    Args:
        model: a pruned model (or a single `PruneWrapper`).

    Returns:
        ``{layer name: {"confidence": float, "diversity": float}}`` for every
        layer pruned with `DPP`.

    Example:
        >>> mask_metrics(pruned)  # doctest: +SKIP
        {'conv2d': {'confidence': 0.41, 'diversity': 0.93}, ...}
    """
    from tfprune.wrapper import find_wrappers

    return {w.name: w.method.metrics(w) for w in find_wrappers(model)
            if _is_dpp(w.method)}


class DPPMetricsHistory(keras.callbacks.Callback):
    """Records `mask_metrics` and the temperature of every DPP layer after each epoch.

    Use it next to `tfprune.callbacks.Pruning` and pass it to `plot_masks`.

    Attributes:
        epochs: the recorded epochs (0 = before training, e = after epoch e).
        history: ``{layer: {"confidence": [...], "diversity": [...],
            "temperature": [...]}}``, aligned with ``epochs``.

    Example:
        >>> hist = DPPMetricsHistory()
        >>> pruned.fit(x, y, epochs=5, callbacks=[tfprune.callbacks.Pruning(), hist])
        ... # doctest: +SKIP
        >>> fig = plot_masks(pruned, hist)  # doctest: +SKIP
    """

    def __init__(self):
        super().__init__()
        self.epochs = []
        self.history = {}

    def record(self, epoch):
        from tfprune.wrapper import find_wrappers

        self.epochs.append(epoch)
        for w in find_wrappers(self.model):
            if not _is_dpp(w.method):
                continue
            row = dict(w.method.metrics(w), temperature=w.method.current_temperature(w))
            hist = self.history.setdefault(w.name, {key: [] for key in row})
            for key, value in row.items():
                hist[key].append(value)

    def on_train_begin(self, logs=None):
        if not self.epochs:
            self.record(0)

    def on_epoch_end(self, epoch, logs=None):
        self.record(epoch + 1)


def plot_masks(model, history=None, *, max_layers=6):
    """A figure of the DPP inference masks and, with ``history``, the metric curves.

    Top row: each DPP layer's mask of its unit kernel as a ``[fan_in, units]``
    image (white = kept), titled with its confidence and diversity. With a
    `DPPMetricsHistory`, a second row shows confidence, diversity and
    temperature per layer over the epochs. Needs matplotlib (imported here).

    Args:
        model: a pruned model.
        history: a `DPPMetricsHistory` (or None).
        max_layers: the first this many DPP layers are drawn.

    Returns:
        A `matplotlib.figure.Figure`.

    Example:
        >>> history = DPPMetricsHistory()
        >>> pruned.fit(x, y, epochs=5, callbacks=[tfprune.callbacks.Pruning(), history])
        ... # doctest: +SKIP
        >>> plot_masks(pruned, history).savefig("dpp_masks.png")  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    from tfprune.callbacks import mask_image
    from tfprune.wrapper import find_wrappers

    wrappers = [w for w in find_wrappers(model) if _is_dpp(w.method)][:max_layers]
    if not wrappers:
        raise ValueError(f"plot_masks: model '{model.name}' has no layer pruned with DPP.")
    cols = max(len(wrappers), 3 if history is not None else 1)
    rows = 2 if history is not None else 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes[0]:
        ax.axis("off")
    for ax, w in zip(axes[0], wrappers):
        image = mask_image(w)
        met = w.method.metrics(w)
        ax.imshow(image, cmap="gray", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_title(f"{w.name}\nconf {met['confidence']:.2f}  div {met['diversity']:.2f}",
                     fontsize=9)
        ax.axis("on")
        ax.set_xlabel("units")
        ax.set_ylabel("fan-in")
    if history is not None:
        for ax in axes[1]:
            ax.axis("off")
        for ax, key in zip(axes[1], ("confidence", "diversity", "temperature")):
            ax.axis("on")
            for name, hist in history.history.items():
                ax.plot(history.epochs, hist[key], marker="o", label=name)
            ax.set_xlabel("epoch")
            ax.set_title(key, fontsize=9)
        axes[1][0].legend(fontsize=7)
    fig.tight_layout()
    return fig
