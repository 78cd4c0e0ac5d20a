"""Sum-product message passing on binary support priors (Turbo-VBI module B).

Two support priors over a 2-D grid of binary variables ``s[r, c]`` (1 = active),
both parameterized like a Markov chain by a start probability and the
transition probabilities ``p01 = P(next active | previous inactive)`` and
``p11 = P(next active | previous active)``:

* `chain_marginals`: an independent Markov chain down each column (for a
  kernel seen as its ``[fan_in, units]`` matrix: along each neuron's fan-in),
  start factor ``[1 - start, start]`` on row 0. Forward-backward is exact.
* `grid_marginals`: the 2-D Markov random field that adds the same pairwise
  factor between horizontal neighbours (the same input of adjacent neurons),
  so active weights cluster in blocks and whole columns (neurons) switch off
  together. Start factor on row 0 only, so a one-column grid *is* the chain.
  Loopy belief propagation, see `grid_marginals` for the schedule.

The pairwise factor of an edge (previous, next) - (upper, lower) or
(left, right) - is ``T[s_prev, s_next]`` with
``T = [[1 - p01, p01], [1 - p11, p11]]`` (index 0 = inactive).

Every variable also has a unary factor ``[1 - e, e]`` (``evidence``, e.g. the
normalized message from module A). Both functions return, per variable, either
the full marginal ``P(s = 1)`` or the *extrinsic* probability: the marginal
with the variable's own unary factor divided out (the product of the messages
its neighbours and the start factor send it). Turbo-VBI uses the extrinsic
one as the prior module A combines with its own local evidence - sending the
full marginal would count that evidence twice.

All arrays are numpy float64; the work is vectorized over columns (chain) or
over the whole grid (loopy BP), fast enough for a 784 x 300 kernel.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-300


def transition_matrix(p01, p11):
    """``T[s_prev, s_next]`` (index 0 = inactive, 1 = active)."""
    return np.array([[1.0 - p01, p01], [1.0 - p11, p11]], dtype=np.float64)


def _unary(evidence):
    e = np.asarray(evidence, dtype=np.float64)
    if e.ndim == 1:
        e = e[:, None]
    if e.ndim != 2:
        raise ValueError(f"message passing: `evidence` must be 1-D or 2-D, got shape {e.shape}.")
    if np.any((e < 0) | (e > 1)) or not np.all(np.isfinite(e)):
        raise ValueError("message passing: `evidence` must be probabilities in [0, 1].")
    return np.stack([1.0 - e, e], axis=-1)  # [R, C, 2]


def _normalize(m):
    return m / np.maximum(m.sum(axis=-1, keepdims=True), _EPS)


def chain_marginals(evidence, start, p01, p11, extrinsic=False):
    """Exact forward-backward on independent Markov chains down the columns.

    Args:
        evidence: ``[R]`` or ``[R, C]`` probabilities, the unary factor
            ``[1 - e, e]`` of each variable; each column is one chain.
        start: ``P(s[0] = 1)``.
        p01: ``P(next active | previous inactive)`` (see the module docstring).
        p11: ``P(next active | previous active)``.
        extrinsic: return the marginal without the variable's own unary factor.

    Returns:
        ``P(s = 1)`` with the shape of ``evidence`` (float64).
    """
    squeeze = np.ndim(evidence) == 1
    u = _unary(evidence)
    rows = u.shape[0]
    t = transition_matrix(p01, p11)
    pred = np.empty_like(u)  # forward message into row r (prior part, without u[r])
    pred[0] = np.array([1.0 - start, start])
    alpha = _normalize(pred[0] * u[0])
    for r in range(1, rows):
        pred[r] = _normalize(alpha @ t)
        alpha = _normalize(pred[r] * u[r])
    beta = np.empty_like(u)  # backward message into row r
    beta[-1] = 0.5
    for r in range(rows - 2, -1, -1):
        beta[r] = _normalize((u[r + 1] * beta[r + 1]) @ t.T)
    prior = pred * beta
    out = _normalize(prior if extrinsic else prior * u)[..., 1]
    return out[:, 0] if squeeze else out


def _send(l, a, b, c, d):
    """Log-odds ``log (c + d e^l) / (a + b e^l)`` of a binary sum-product message.

    Computed as ``log (c e^-k + d e^(l-k)) / (a e^-k + b e^(l-k))`` with
    ``k = max(l, 0)`` so that it never overflows.
    """
    k = np.maximum(l, 0.0)
    x = np.exp(-k)
    y = np.exp(l - k)
    return np.log((c * x + d * y) / (a * x + b * y))


def grid_marginals(evidence, start, p01, p11, extrinsic=False, *, damping=0.5,
                   tol=1e-4, max_iter=200, return_info=False):
    """Loopy belief propagation on the 2-D grid Markov random field.

    Messages are binary, so each is stored as one log-odds number
    ``log m(1) / m(0)`` (one ``[R, C]`` array per direction).

    Schedule: *flooding* - every iteration computes all four directional
    messages of every edge from the previous iteration's messages (messages
    start uniform, log-odds 0), then damps them in the log-odds domain,
    ``new = damping * old + (1 - damping) * new``. It stops when the largest
    change of any message log-odds is below ``tol`` or after ``max_iter``
    iterations. On a one-column grid (a tree) it converges to the exact chain
    marginals. Loopy BP is approximate: on a 3 x 3 grid against brute-force
    enumeration (see the tests) the error of ``P(s = 1)`` is below 0.005 for
    the reference code's prior (0.5, 0.288, 0.49) and below 0.02 for
    TurboVBI's default (0.1, 0.05, 0.6), but reaches 0.1 (marginal) / 0.23
    (extrinsic) for a dense, strongly coupled prior (0.3, 0.2, 0.7).

    Args:
        evidence: ``[R, C]`` probabilities (unary factors ``[1 - e, e]``).
        start: ``P(s = 1)`` start factor on row 0.
        p01: ``P(next active | previous inactive)``, on both vertical and
            horizontal edges.
        p11: ``P(next active | previous active)``, on both kinds of edges.
        extrinsic: return the marginal without the variable's own unary factor.
        damping: in [0, 1); 0 = undamped.
        tol: convergence tolerance on the message log-odds.
        max_iter: iteration limit.
        return_info: also return ``{"iterations": int, "converged": bool,
            "delta": float}``.

    Returns:
        ``P(s = 1)`` of shape ``[R, C]`` (and the info dict).
    """
    e = np.asarray(evidence, dtype=np.float64)
    _unary(e)  # validation
    if e.ndim == 1:
        e = e[:, None]
    with np.errstate(divide="ignore"):
        unary = np.log(e) - np.log1p(-e)
    unary = np.clip(unary, -700.0, 700.0)
    start_lo = np.log(start) - np.log1p(-start)
    phi = unary.copy()
    phi[0] += start_lo
    # T = [[1-p01, p01], [1-p11, p11]]
    t00, t01, t10, t11 = 1.0 - p01, p01, 1.0 - p11, p11
    # Incoming message log-odds: from above, below, the left, the right.
    # Border (missing neighbour) messages stay 0.
    down = np.zeros_like(unary)
    up = np.zeros_like(unary)
    right = np.zeros_like(unary)
    left = np.zeros_like(unary)
    delta, iterations, converged = 0.0, 0, False
    for iterations in range(1, max_iter + 1):  # noqa: B007 (reported in the info)
        total = phi + down + up + left + right
        # prev -> next (downwards / rightwards): m(s') = sum_s cav(s) T[s, s']
        new_down = _send(total[:-1] - up[:-1], t00, t10, t01, t11)
        new_right = _send(total[:, :-1] - left[:, :-1], t00, t10, t01, t11)
        # next -> prev (upwards / leftwards): m(s) = sum_s' T[s, s'] cav(s')
        new_up = _send(total[1:] - down[1:], t00, t01, t10, t11)
        new_left = _send(total[:, 1:] - right[:, 1:], t00, t01, t10, t11)
        delta = 0.0
        for old, new in ((down[1:], new_down), (up[:-1], new_up),
                         (right[:, 1:], new_right), (left[:, :-1], new_left)):
            new = damping * old + (1.0 - damping) * new
            if new.size:
                delta = max(delta, float(np.max(np.abs(new - old))))
            old[...] = new
        if delta < tol:
            converged = True
            break
    logit = down + up + left + right
    logit[0] += start_lo
    if not extrinsic:
        logit = logit + unary
    out = 1.0 / (1.0 + np.exp(-logit))
    if return_info:
        return out, {"iterations": iterations, "converged": converged, "delta": delta}
    return out


def brute_force_marginals(evidence, start, p01, p11, *, grid=True, extrinsic=False):
    """Marginals by enumerating all ``2**(R*C)`` states (tests only; R*C <= 16).

    ``grid=False`` drops the horizontal edges (independent chains).
    """
    u = _unary(evidence)
    rows, cols = u.shape[:2]
    n = rows * cols
    if n > 16:
        raise ValueError(f"brute_force_marginals: {n} variables is too many (at most 16).")
    t = transition_matrix(p01, p11)
    states = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1).reshape(-1, rows, cols)
    weight = np.ones(len(states))
    first = states[:, 0, :]
    weight *= np.prod(np.where(first == 1, start, 1.0 - start), axis=1)
    weight *= np.prod(t[states[:, :-1, :], states[:, 1:, :]], axis=(1, 2))
    if grid:
        weight *= np.prod(t[states[:, :, :-1], states[:, :, 1:]], axis=(1, 2))
    uw = np.prod(np.take_along_axis(u[None], states[..., None], axis=-1)[..., 0], axis=(1, 2))
    joint = weight * uw
    p1 = np.einsum("k,krc->rc", joint, states) / joint.sum()
    if not extrinsic:
        return p1
    # Extrinsic: divide the unary back out of the marginal.
    ratio = (p1 / np.maximum(1 - p1, _EPS)) * (u[..., 0] / np.maximum(u[..., 1], _EPS))
    return ratio / (1 + ratio)
