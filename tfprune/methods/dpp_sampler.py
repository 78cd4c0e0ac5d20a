"""The sampler of `tfprune.methods.DPP`: pure functions on tensors, no layer state.

* `temperature_at`: the annealed temperature of the relaxed draw at a step;
* `relaxed_topk_mask`: the exact k-hot top-k mask of ``logits + noise`` with
  the gradient of the relaxed sequential draw of k groups without
  replacement (straight-through), in closed form from the sorted top-k for
  long rows and by pairwise comparisons with a hand-written gradient for
  short ones (``n <= _PAIRWISE_MAX_N``);
* `relaxed_topk_runs`: the same on runs laid out along axis 1 (``[R, n, B]``,
  the layout DPP uses), picking the short or the long path;
* `entropy_runs`: the summed entropy of the softmax of each run, with a
  hand-written gradient.

See `tfprune.methods.dpp` for the method and its references.
"""

from __future__ import annotations

import math

import numpy as np
from keras import ops

_PAIRWISE_MAX_N = 16  # runs up to this long rank by pairwise comparisons, not top_k
_ANNEALS = ("linear", "exponential")


def temperature_at(step, temperature=(5.0, 0.5), anneal_steps=1, anneal="linear"):
    """Temperature of the relaxed draw at training step ``step`` (0-based).

    ``frac = clip(step / max(anneal_steps - 1, 1), 0, 1)``; linear:
    ``t0 + (t1 - t0) * frac``; exponential: ``t0 * (t1 / t0) ** frac``. So the
    first step uses ``t0``, step ``anneal_steps - 1`` and later ``t1``.

    Args:
        step: an int, numpy array or tensor.
        temperature: ``(t0, t1)`` (or one positive float for a constant).
        anneal_steps: length of the anneal in steps (int or tensor).
        anneal: ``"linear"`` or ``"exponential"``.

    Returns:
        A float32 tensor of ``step``'s shape.

    Example:
        >>> float(temperature_at(50, (5.0, 0.5), 101))
        2.75
    """
    t0, t1 = _check_temperature(temperature, "temperature_at")
    step = ops.cast(step, "float32")
    denom = ops.maximum(ops.cast(anneal_steps, "float32") - 1.0, 1.0)
    frac = ops.clip(step / denom, 0.0, 1.0)
    if anneal == "exponential":
        return t0 * ops.power(t1 / t0, frac)
    if anneal == "linear":
        return t0 + (t1 - t0) * frac
    raise ValueError(f"temperature_at: `anneal` must be one of {list(_ANNEALS)}, got {anneal!r}.")


def _check_temperature(temperature, owner):
    pair = temperature if isinstance(temperature, (tuple, list)) else (temperature, temperature)
    ok = len(pair) == 2 and all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 and math.isfinite(t)
        for t in pair)
    if not ok:
        raise ValueError(
            f"{owner}: `temperature` must be a positive float or a pair (start, end) of "
            f"positive floats, got {temperature!r}.")
    return float(pair[0]), float(pair[1])


def relaxed_topk_mask(logits, k, tau, noise=None):
    """Exact k-hot mask of the top-k of ``logits + noise``, with relaxed gradients.

    Forward value: 1 for the ``k`` largest entries of ``y = logits + noise``
    along the last axis, 0 elsewhere (exactly k ones per row). Gradient: that
    of ``soft = sum_{j=1..k} softmax_j``, where ``softmax_j`` is the softmax of
    ``y / tau`` over the entries not among the j-1 largest (the relaxed
    sequential draw of k entries without replacement), through the
    straight-through estimator ``hard + (soft - stop_gradient(soft))``.

    The k softmaxes are computed in closed form from the sorted top-k values
    (``O(n + k^2)`` per row instead of ``O(n k)``), with every exponent <= 0,
    so it is stable for any logit range.

    Args:
        logits: ``[..., n]`` float tensor.
        k: int, ``1 <= k <= n``.
        tau: positive temperature (float or scalar tensor).
        noise: None or a tensor of ``logits``' shape (e.g. scaled Gumbel noise).

    Returns:
        ``[..., n]`` float tensor.

    Example:
        >>> m = relaxed_topk_mask(keras.ops.convert_to_tensor([[3.0, 1.0, 2.0, 0.0]]), 2, 1.0)
        >>> keras.ops.convert_to_numpy(m)
        array([[1., 0., 1., 0.]], dtype=float32)
    """
    y = logits if noise is None else logits + noise
    shape = tuple(y.shape)
    n = int(shape[-1])
    if n <= _PAIRWISE_MAX_N:
        return _relaxed_topk_short(y, k, tau)
    rows = math.prod(shape[:-1])
    vals, idx = ops.top_k(y, k, sorted=True)  # [..., k], descending
    # Rank (1..k) of every kept entry, 0 elsewhere, by one integer scatter.
    flat_idx = ops.reshape(ops.cast(idx, "int32"), (rows, k))
    flat_idx = flat_idx + ops.arange(rows, dtype="int32")[:, None] * n
    ranks = ops.scatter(ops.reshape(flat_idx, (-1, 1)),
                        ops.tile(ops.arange(1, k + 1, dtype="int32"), (rows,)), (rows * n,))
    ranks = ops.reshape(ranks, shape)
    hard = ops.cast(ranks > 0, y.dtype)
    rank0 = ops.where(ranks > 0, ranks - 1, k)  # k = "not kept"

    c = vals[..., k - 1:k]  # the k-th largest value
    # e[r, j] = exp((y_(r) - y_(j)) / tau) for j <= r (each <= 1), 0 above the diagonal.
    lower = ops.convert_to_tensor(np.tril(np.ones((k, k), "float32")), y.dtype)
    diff = (vals[..., :, None] - vals[..., None, :]) / tau
    e = ops.exp(ops.minimum(diff, 0.0)) * lower
    rest = ops.exp(ops.minimum(y - c, 0.0) / tau) * (1.0 - hard)  # not-kept entries, <= 1
    s_rest = ops.sum(rest, axis=-1, keepdims=True)
    a = ops.exp((c - vals) / tau)  # <= 1
    # Normalizer of draw j (scaled by exp(-y_(j)/tau)): the entries not drawn before j.
    z = ops.sum(e, axis=-2) + a * s_rest
    soft_kept = ops.sum(e / z[..., None, :], axis=-1)  # [..., k]: soft value of rank r
    soft_rest = rest * ops.sum(a / z, axis=-1, keepdims=True)
    soft_kept = ops.concatenate([soft_kept, ops.zeros_like(soft_kept[..., :1])], axis=-1)
    soft = soft_rest + ops.take_along_axis(soft_kept, rank0, axis=-1)
    return hard + (soft - ops.stop_gradient(soft))


def _relaxed_topk_short(y, k, tau, axis=-1):
    """`relaxed_topk_mask` for short rows (``n <= _PAIRWISE_MAX_N``) along ``axis``.

    On many short rows TF's top_k, scatter and gather, and the autodiff of the
    closed form (broadcasts over ``[..., k, k]``), cost far more than the layer
    itself. Here the ranks come from pairwise comparisons (the order of top_k:
    ties go to the lower index), the forward value is the hard mask itself
    (``hard + (soft - soft)`` is exactly ``hard``) and the gradient is the
    Jacobian of the relaxed draw in closed form: draw ``r`` is a softmax
    ``p_r`` of ``y / tau`` over the entries of rank >= r (shifted by its
    maximum, the r-th largest value), and
    ``d soft / d y_j = sum_r p_rj (g_j - sum_i g_i p_ri) / tau``. The draws are
    only computed in the backward pass.

    ``axis`` may be a middle axis: DPP works on ``[runs, n, B]`` (a reshape of
    the group grid) so that no transpose is needed and each comparison is an
    elementwise op on contiguous ``[runs, B]`` slices.
    """
    n = int(y.shape[axis])
    # 0-based rank of entry i: i + #{j > i: y_j > y_i} - #{j < i: y_i > y_j}, i.e. the
    # entries before it (larger, or equal with a lower index), one comparison per pair.
    cols = ops.unstack(y, n, axis=axis)
    counts = [i for i in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            c = ops.cast(ops.greater(cols[j], cols[i]), "int32")  # j before i
            counts[i] = counts[i] + c
            counts[j] = counts[j] - c
    rank0 = ops.stack([ops.broadcast_to(c, ops.shape(cols[0])) for c in counts], axis=axis)
    hard = ops.cast(rank0 < k, y.dtype)
    tau = ops.cast(tau, y.dtype)

    @ops.custom_gradient
    def relaxed(y):
        def grad(*args, upstream=None):
            g = args[0] if upstream is None else upstream
            ys = ops.stop_gradient(y) / tau
            out = 0.0
            for r in range(k):
                if r == 0:
                    e = ops.exp(ys - ops.max(ys, axis=axis, keepdims=True))
                else:
                    left = rank0 >= r  # not drawn before draw r
                    top = ops.max(ops.where(left, ys, -np.inf), axis=axis, keepdims=True)
                    e = ops.where(left, ops.exp(ys - top), 0.0)  # exponents <= 0 where left
                p = e / ops.sum(e, axis=axis, keepdims=True)
                out = out + p * (g - ops.sum(g * p, axis=axis, keepdims=True))
            return out / tau

        return hard, grad

    return relaxed(y)


def entropy_runs(x, axis):
    """``sum over runs of H(softmax(x along axis))`` with a hand-written gradient.

    ``dH/dx_j = -p_j (log p_j + H_run)``; entries with ``p = 0`` (padding) add 0.
    """

    @ops.custom_gradient
    def entropy(x):
        x = ops.stop_gradient(x)
        z = x - ops.max(x, axis=axis, keepdims=True)
        ez = ops.exp(z)
        s = ops.sum(ez, axis=axis, keepdims=True)
        logp = z - ops.log(s)
        p = ez / s
        plogp = p * logp
        h_run = -ops.sum(plogp, axis=axis, keepdims=True)

        def grad(*args, upstream=None):
            g = args[0] if upstream is None else upstream
            return (-g) * (plogp + p * h_run)

        return ops.sum(h_run), grad

    return entropy(x)



def relaxed_topk_runs(x, k, tau):
    """`relaxed_topk_mask` of runs laid out along axis 1: ``[R, n, B]`` -> ``[R, n, B]``.

    Each ``x[r, :, b]`` is one run of ``n`` logits (noise included) of which
    exactly ``k`` are kept. Short runs (``n <= _PAIRWISE_MAX_N``) are ranked
    in place by pairwise comparisons; longer ones are moved to the last axis
    for the closed form of `relaxed_topk_mask` and moved back.

    Args:
        x: ``[R, n, B]`` float tensor.
        k: int, ``1 <= k <= n``.
        tau: positive temperature (float or scalar tensor).

    Returns:
        ``[R, n, B]`` float tensor: the k-hot masks, with relaxed gradients.
    """
    if int(x.shape[1]) <= _PAIRWISE_MAX_N:
        return _relaxed_topk_short(x, k, tau, axis=1)
    x = ops.transpose(x, (0, 2, 1))
    return ops.transpose(relaxed_topk_mask(x, k, tau), (0, 2, 1))
