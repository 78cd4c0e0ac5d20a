"""DPP: dynamic probabilistic pruning with Gumbel top-k masks of exactly k out of n.

Every group of a kernel (a weight, a kernel or an output unit, see
`tfprune.structures`) gets a trainable *logit*. The groups are split into
*runs* of ``n`` consecutive groups along axis 0 of the structure's group grid
(the fan-in of each unit for `Unstructured`, the input channels of each
filter for `Kernel`, the units of the layer for `Filter`), and exactly ``k``
groups of every run are kept:

* training: the hard top-k of ``logits + noise_scale * Gumbel noise`` (one
  mask per step, shared by the batch) in the forward pass; the gradient flows
  to the logits through the relaxed sequential draw of k groups without
  replacement (k softmaxes at temperature ``tau``, each over the groups not
  drawn before), with the straight-through estimator
  ``hard + soft - stop_gradient(soft)``;
* inference (and `tfprune.strip`): the deterministic top-k of the logits.

The temperature is annealed from ``temperature[0]`` to ``temperature[1]``
(computed in the graph from the wrapper's step counter), an entropy penalty
on ``softmax(logits)`` of each run sharpens the keep distributions, and
``quantize=8|4`` trains the kernels with symmetric per-channel fake
quantization (`tfprune.quantization`) in the same run, since the masks do not
depend on the weights' magnitudes.

The module also provides the mask metrics (`mask_metrics`), a callback that
records them during training (`DPPMetricsHistory`) and a figure helper
(`plot_masks`).

References:
    Gonzalez-Carabarin, Huijben, Veeling, Schmid, van Sloun, "Dynamic
    Probabilistic Pruning: A general framework for hardware-constrained
    pruning at different granularities", IEEE TNNLS 2022 (arXiv 2105.12686).
    Kool, van Hoof, Welling, "Stochastic Beams and Where to Find Them: The
    Gumbel-Top-k Trick", ICML 2019 (arXiv 1903.06059).
    Huijben et al., "Deep probabilistic subsampling for task-adaptive
    compressed sensing", ICLR 2020 (the relaxed sequential k-draw).
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
from keras import ops

from tfprune import quantization
from tfprune import structures as structures_lib
from tfprune._utils import check_int
from tfprune.handlers import canonical_shape, from_canonical, to_canonical
from tfprune.methods.base import Method, read_value, step_seed

_PKG = "tfprune"
_NEG = -1e9  # logit of a padding slot in a trailing short run: never kept if avoidable
_PAIRWISE_MAX_N = 16  # runs up to this long rank by pairwise comparisons, not top_k
_ANNEALS = ("linear", "exponential")
_BASES = (structures_lib.Unstructured, structures_lib.Kernel, structures_lib.Filter)


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


def _entropy_runs(x, axis):
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


@dataclasses.dataclass
class _Entry:
    """The DPP state of one kernel of a layer."""

    name: str
    layout: str
    shape: tuple
    canon: tuple
    grid: tuple  # (A, B): runs along A
    k: int
    n: int
    produces_units: bool
    logits: object = None

    @property
    def runs(self):
        return math.ceil(self.grid[0] / self.n)

    def to_runs(self, x, pad_value):
        """``[A, B]`` -> ``[R, n, B]`` (a trailing short run padded with ``pad_value``).

        A reshape only (no copy): the runs are along axis 1.
        """
        a, b = self.grid
        pad = self.runs * self.n - a
        if pad:
            x = ops.pad(x, [(0, pad), (0, 0)], constant_values=pad_value)
        return ops.reshape(x, (self.runs, self.n, b))

    def from_runs(self, x):
        """``[R, n, B]`` -> ``[A, B]``."""
        a, b = self.grid
        return ops.reshape(x, (self.runs * self.n, b))[:a]


@keras.saving.register_keras_serializable(package=_PKG)
class DPP(Method):
    """Dynamic probabilistic pruning: exactly k of every n groups, learned with Gumbel top-k.

    Each group of the structure has a trainable logit. Runs of ``n``
    consecutive groups along the structure's grid (see the module docstring)
    keep exactly ``k`` groups each, at every training step (sampled by
    Gumbel top-k) and at inference (top-k of the logits):

    | structure | one run of ``n`` groups is | n=None means |
    |---|---|---|
    | `Unstructured()` | n consecutive weights of one unit's fan-in | the whole fan-in |
    | `Kernel()` | n consecutive input-channel kernels of one filter | all kernels of the filter |
    | `Filter()` | n consecutive output units of the layer | all units of the layer |

    ``KOutOfN(k, n, of=X)`` is accepted as shorthand for ``k, n, structure=X``.
    The fan-in order is the canonical one (spatial tap major, input channel
    fastest). For Dense layers `Kernel()` equals `Unstructured()`; for a
    depthwise kernel each filter has one kernel, so `Kernel()` needs ``k=1``.
    `Filter()` also masks the bias (and a BatchNormalization that follows,
    through `tfprune.methods.Follow`), so `tfprune.shrink` removes the units.

    **Padding policy** (the one of `tfprune.structures.KOutOfN`): when ``n``
    does not divide the run axis, the trailing run of ``m < n`` groups keeps
    ``min(k, m)`` of them; there is no error.

    **Cost**: per run, one top-k, one ``k x k`` matrix and O(n) work per
    step; for very large ``k`` (say a few hundred) use runs (``n``) rather
    than ``n=None`` on big layers.

    The Gumbel noise of each training step is a stateless draw from a
    per-layer seed saved with the model (``seed``, or one drawn at build:
    `keras.utils.set_random_seed` makes training repeatable) and the saved
    step counter, so training resumed from a `.keras` file saved mid-training
    draws exactly the masks an uninterrupted run draws. Masks, noise, the
    fake quantization and the entropy penalty are computed in float32, also
    under a ``mixed_float16`` policy.
    `tfprune.callbacks.Pruning` is required: it resolves ``anneal_steps`` from
    the fit (``epochs * steps``) when not given and keeps a BatchNormalization
    follower's mask in sync (at the start of the fit and at each epoch end).
    The entropy penalty is added with ``add_loss``, so the loss shown by
    ``fit`` includes it.

    Args:
        k: groups kept per run (int >= 1). Give ``k`` or ``keep_ratio``.
        n: run length (int >= k), or None for the whole run axis.
        structure: `Unstructured()` (default), `Kernel()`, `Filter()`, their
            names, or `KOutOfN(k, n, of=...)` of one of them. `Block` is not
            supported.
        temperature: ``(start, end)`` of the relaxed draw's temperature, or
            one positive float (constant). Reference value ``(5.0, 0.5)``.
        entropy_weight: weight (>= 0) of the penalty
            ``sum over runs of H(softmax(logits of the run))``.
        quantize: None, 8 or 4: fake-quantize the effective kernels
            (symmetric, per output channel, straight-through gradient) in
            training and inference; `tfprune.strip` stores the quantized
            values.
        keep_ratio: alternative to ``k``: ``k = round(keep_ratio * n)``
            resolved per layer (with n=None, per layer's run length); an error
            if it rounds to 0.
        anneal: ``"linear"`` (default) or ``"exponential"`` temperature decay.
        anneal_steps: length of the anneal in training steps; None: resolved by
            `tfprune.callbacks.Pruning` at the start of the first fit as the
            fit's ``epochs * steps_per_epoch`` (an error if the fit does not
            know its length).
        noise_scale: scale (>= 0) of the Gumbel noise added to the logits for
            the hard training mask (1 = exact sampling without replacement from
            ``softmax(logits)``; the reference code uses 0.01-0.1).
        init_scale: logits are initialized to ``init_scale`` times the
            z-score (over the kernel) of the log of each group's squared L2
            norm, so pruning starts from a magnitude mask; 0 starts from
            uniform logits. The default 3 keeps the early masks close to the
            magnitude mask (the noise and the learned logits then change it).
        seed: int seed of the noise (combined with each layer's name, so
            layers draw different noise), or None (drawn from Python's
            generator at build, seeded by `keras.utils.set_random_seed`).

    Raises:
        ValueError: bad arguments (messages name the argument, the value and
            what is allowed); at build, ``k`` larger than a layer's run axis
            with ``n=None``, or a ``keep_ratio`` that keeps no group.

    Example:
        >>> import tfprune
        >>> from tfprune import methods, structures
        >>> m = methods.DPP(2, 4)                                     # 2:4 weights
        >>> m = methods.DPP(1, 4, structure=structures.Kernel())      # 1 of 4 kernels
        >>> m = methods.DPP(keep_ratio=0.25, structure="filter", quantize=8)
        >>> pruned = tfprune.prune(model, m)                          # doctest: +SKIP
        >>> pruned.fit(x, y, callbacks=[tfprune.callbacks.Pruning()])  # doctest: +SKIP

    References:
        Gonzalez-Carabarin et al., "Dynamic Probabilistic Pruning", IEEE TNNLS
        2022, arXiv 2105.12686.
    """

    def __init__(self, k=None, n=None, structure=None, temperature=(5.0, 0.5),
                 entropy_weight=1e-5, quantize=None, keep_ratio=None, anneal="linear",
                 anneal_steps=None, noise_scale=0.1, init_scale=3.0, seed=None):
        try:
            super().__init__(structure)
        except (TypeError, ValueError):
            self.structure = structure
        kn = isinstance(self.structure, structures_lib.KOutOfN)
        base = self.structure.of if kn else self.structure
        if not isinstance(base, _BASES):
            raise ValueError(
                f"DPP: `structure` must be Unstructured(), Kernel(), Filter() or KOutOfN(k, n, "
                f"of=one of them), got {structure!r}.")
        if kn:
            for name, given, implied in (("k", k, self.structure.k), ("n", n, self.structure.n)):
                if given is not None and given != implied:
                    raise ValueError(
                        f"DPP: `{name}`={given} contradicts structure {self.structure!r}; "
                        f"pass {name}=None or {implied}.")
            if keep_ratio is not None:
                raise ValueError(
                    f"DPP: `keep_ratio`={keep_ratio!r} cannot be combined with structure "
                    f"{self.structure!r}, which fixes k={self.structure.k}.")
        else:
            if n is not None:
                check_int(n, "n", owner="DPP", minimum=1)
            if (k is None) == (keep_ratio is None):
                raise ValueError(
                    f"DPP: give exactly one of `k` (int >= 1) and `keep_ratio` (in (0, 1]), "
                    f"got k={k!r}, keep_ratio={keep_ratio!r}.")
            if k is not None:
                check_int(k, "k", owner="DPP", minimum=1)
                if n is not None and k > n:
                    raise ValueError(f"DPP: `k` must satisfy 1 <= k <= n (n={n}), got k={k}.")
            if keep_ratio is not None:
                ok = isinstance(keep_ratio, (int, float)) and not isinstance(keep_ratio, bool)
                if not ok or not 0.0 < keep_ratio <= 1.0:
                    raise ValueError(
                        f"DPP: `keep_ratio` must be a float in (0, 1], got {keep_ratio!r}.")
        _check_temperature(temperature, "DPP")
        for name, value in (("entropy_weight", entropy_weight), ("noise_scale", noise_scale),
                            ("init_scale", init_scale)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not value >= 0 or not math.isfinite(value):
                raise ValueError(f"DPP: `{name}` must be a float >= 0, got {value!r}.")
        if quantize is not None:
            quantization.check_bits(quantize, owner="DPP", name="quantize")
        if anneal not in _ANNEALS:
            raise ValueError(f"DPP: `anneal` must be one of {list(_ANNEALS)}, got {anneal!r}.")
        if anneal_steps is not None:
            check_int(anneal_steps, "anneal_steps", owner="DPP", minimum=1)
        if seed is not None:
            check_int(seed, "seed", owner="DPP")
        self.k, self.n, self.keep_ratio = k, n, keep_ratio
        self.temperature = tuple(float(t) for t in _check_temperature(temperature, "DPP"))
        self.entropy_weight = float(entropy_weight)
        self.quantize = quantize
        self.anneal, self.anneal_steps = anneal, anneal_steps
        self.noise_scale, self.init_scale = float(noise_scale), float(init_scale)
        self.seed = seed
        self._base = base
        self._ready = False
        self._synced = False

    def get_config(self):
        config = super().get_config()
        config.update(
            k=self.k, n=self.n, temperature=list(self.temperature),
            entropy_weight=self.entropy_weight, quantize=self.quantize,
            keep_ratio=self.keep_ratio, anneal=self.anneal, anneal_steps=self.anneal_steps,
            noise_scale=self.noise_scale, init_scale=self.init_scale, seed=self.seed)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("temperature"), list):
            config["temperature"] = tuple(config["temperature"])
        config["structure"] = structures_lib.get(config.get("structure"))
        return cls(**config)

    # -- per-layer resolution ----------------------------------------------------
    def _kn(self):
        if isinstance(self.structure, structures_lib.KOutOfN):
            return self.structure.k, self.structure.n
        return self.k, self.n

    def resolve(self, layer_name, kernel_name, run_axis):
        """``(k, n)`` for a kernel whose group grid has ``run_axis`` rows.

        Raises:
            ValueError: ``k`` exceeds the groups of a whole-axis run
                (``n=None``), or ``keep_ratio`` keeps no group.
        """
        k, n = self._kn()
        n_eff = run_axis if n is None else n
        if self.keep_ratio is not None:
            k = int(math.floor(self.keep_ratio * n_eff + 0.5))
            if k < 1:
                raise ValueError(
                    f"DPP: `keep_ratio`={self.keep_ratio} keeps round({self.keep_ratio} * "
                    f"{n_eff}) = 0 of the {n_eff} groups per run of layer '{layer_name}' "
                    f"(`{kernel_name}`, {self._base!r}); use keep_ratio >= {0.5 / n_eff:.3g} "
                    "or give k.")
        if n is None and k > run_axis:
            raise ValueError(
                f"DPP: `k`={k} exceeds the {run_axis} groups of layer '{layer_name}' "
                f"(`{kernel_name}`, {self._base!r}, n=None: k of all of them); allowed: "
                f"1 <= k <= {run_axis}, or set n.")
        return k, n_eff

    def kernel_specs(self, wrapper):
        """Kernels that get logits (`Filter`: only the unit-producing kernel)."""
        if self.structure.removes_units:
            return [wrapper.handler.unit_spec()]
        return list(wrapper.handler.kernels)

    # -- life cycle --------------------------------------------------------------
    def build(self, wrapper):
        self._entries = []
        for spec in self.kernel_specs(wrapper):
            var = getattr(wrapper.layer, spec.name)
            cshape = canonical_shape(var.shape, spec.layout)
            grid = tuple(int(d) for d in self.structure.grid_shape(cshape))
            k, n = self.resolve(wrapper.layer.name, spec.name, grid[0])
            entry = _Entry(spec.name, spec.layout, tuple(var.shape), cshape, grid, k, n,
                           spec.produces_units)
            entry.logits = self.add_state(wrapper, f"{spec.name}_logits", grid, trainable=True)
            self._entries.append(entry)
        self._anneal_var = self.add_state(
            wrapper, "anneal_steps", (), dtype="int64",
            initializer=keras.initializers.Constant(self.anneal_steps or 0))
        # The noise of training step t is drawn from (this seed, t): saved with the model,
        # so a model saved mid-training resumes with the same masks.
        self._seed_var = self.add_seed(wrapper, self.seed)
        self._quant = quantization.FakeQuant(self.quantize) if self.quantize else None
        self.initialize(wrapper)

    def initialize(self, wrapper):
        """Sets the logits from the kernel's group magnitudes (z-scored log energy)."""
        for e in self._entries:
            kernel = ops.cast(getattr(wrapper.layer, e.name), "float32")
            energy = self.structure.reduce(ops.square(to_canonical(kernel, e.layout)))
            energy = np.asarray(ops.convert_to_numpy(energy), "float64")
            log_e = np.log(energy + 1e-12 * max(float(energy.mean()), 1e-30))
            std = float(log_e.std())
            z = (log_e - log_e.mean()) / std if std > 1e-12 else np.zeros_like(log_e)
            e.logits.assign((self.init_scale * z).astype("float32"))

    def on_train_begin(self, wrapper, params):
        steps = int(ops.convert_to_numpy(self._anneal_var))
        if steps <= 0 and self.temperature[0] != self.temperature[1]:
            epochs, per_epoch = params.get("epochs"), params.get("steps")
            if not epochs or not per_epoch:
                raise ValueError(
                    f"DPP (layer '{wrapper.name}'): `anneal_steps`=None and the fit's length "
                    f"is unknown (params: epochs={epochs!r}, steps={per_epoch!r}); pass "
                    "DPP(anneal_steps=...) or give fit() `steps_per_epoch`.")
            start = int(ops.convert_to_numpy(wrapper.step))
            self._anneal_var.assign(start + int(epochs) * int(per_epoch))
        self._ready = True
        self._synced = False

    def update(self, wrapper, step):
        if self._synced:
            return False
        if not self._ready:
            self.on_train_begin(wrapper, {})
        self._synced = True
        return self.structure.removes_units  # sync a BatchNormalization follower once

    def on_epoch_end(self, wrapper, epoch):
        return self.structure.removes_units

    # -- masks -------------------------------------------------------------------
    def temperature_tensor(self, wrapper):
        """Temperature of the current training step, in the graph (from ``wrapper.step``)."""
        return temperature_at(ops.maximum(wrapper.step - 1, 0), self.temperature,
                              self._anneal_var, self.anneal)

    def current_temperature(self, wrapper):
        """Temperature used at the last training step (float)."""
        return float(ops.convert_to_numpy(self.temperature_tensor(wrapper)))

    def uniform_noise(self, wrapper, index, shape):
        """The uniform draws in ``[1e-12, 1)`` behind the Gumbel noise of kernel ``index``.

        Stateless: a function of the layer's saved seed, the training step
        (``wrapper.step``) and ``index``, so the same step gives the same
        noise after a model is saved and reloaded, and every replica of a
        distribution strategy draws the same mask.
        """
        import tensorflow as tf

        seed = step_seed(self._seed_var, wrapper.step, index)
        return tf.random.stateless_uniform(shape, seed, minval=1e-12, maxval=1.0,
                                           dtype="float32")

    def group_masks(self, wrapper, training):
        """``{kernel name: [A, B] group mask}``: sampled (training) or top-k (inference).

        Computed in float32 (also under mixed precision).
        """
        out = {}
        tau = self.temperature_tensor(wrapper) if training else None
        for i, e in enumerate(self._entries):
            logits = read_value(e.logits, "float32")
            if training:
                x = e.to_runs(logits, _NEG)  # [R, n, B]
                k = min(e.k, e.n)
                if self.noise_scale > 0:
                    # Drawn as [R, B, n] (run last), the layout of the first releases;
                    # moved to [R, n, B] without a gradient.
                    u = self.uniform_noise(wrapper, i, (e.runs, e.grid[1], e.n))
                    x = x + ops.transpose(-self.noise_scale * ops.log(-ops.log(u)), (0, 2, 1))
                if e.n <= _PAIRWISE_MAX_N:
                    mask = _relaxed_topk_short(x, k, tau, axis=1)
                else:
                    x = ops.transpose(x, (0, 2, 1))
                    mask = ops.transpose(relaxed_topk_mask(x, k, tau), (0, 2, 1))
                out[e.name] = e.from_runs(mask)
            else:
                out[e.name] = structures_lib.k_of_n_mask(logits, e.k, e.n)
        return out

    def entropy(self, wrapper=None):
        """``sum over runs of H(softmax(logits of the run))`` over all kernels (tensor)."""
        total = 0.0
        for e in self._entries:
            total = total + _entropy_runs(e.to_runs(read_value(e.logits, "float32"), _NEG), 1)
        return total

    def effective_variables(self, wrapper, training):
        masks = self.group_masks(wrapper, training)
        out = {}
        for spec in wrapper.handler.kernels:
            if spec.name not in masks and self._quant is None:
                continue
            kernel = getattr(wrapper.layer, spec.name)
            # In the variable dtype (float32 under mixed precision): the wrapped layer casts
            # the effective kernel to its compute dtype when it reads it.
            canon = to_canonical(read_value(kernel), spec.layout)
            cshape = tuple(canon.shape)
            if spec.name in masks:
                canon = canon * ops.cast(self.structure.expand(masks[spec.name], cshape),
                                         canon.dtype)
            if self._quant is not None:
                canon = self._quant(canon)
            out[spec.name] = from_canonical(canon, kernel.shape, spec.layout)
            bias = getattr(wrapper.layer, wrapper.handler.bias or "", None)
            if self.structure.removes_units and spec.produces_units and bias is not None:
                bias = read_value(bias)
                out[wrapper.handler.bias] = bias * ops.cast(
                    ops.reshape(masks[spec.name], (-1,)), bias.dtype)
        return out

    def call(self, wrapper, inputs, training, **kwargs):
        if self.entropy_weight > 0:
            wrapper.add_loss(self.entropy_weight * self.entropy())
        return super().call(wrapper, inputs, training, **kwargs)

    def final_masks(self, wrapper):
        out = {}
        for e in self._entries:
            grid = structures_lib.k_of_n_mask(ops.convert_to_tensor(e.logits), e.k, e.n)
            mask = from_canonical(self.structure.expand(grid, e.canon), e.shape, e.layout)
            out[e.name] = np.asarray(ops.convert_to_numpy(mask), "float32")
            bias = getattr(wrapper.layer, wrapper.handler.bias or "", None)
            if self.structure.removes_units and e.produces_units and bias is not None:
                out[wrapper.handler.bias] = np.asarray(
                    ops.convert_to_numpy(ops.reshape(grid, (-1,))), "float32")
        if self._quant is not None:  # unmasked kernels are still quantized (`final_weight`)
            for spec in wrapper.handler.kernels:
                if spec.name not in out:
                    shape = tuple(getattr(wrapper.layer, spec.name).shape)
                    out[spec.name] = np.ones(shape, "float32")
        return out

    def final_weight(self, wrapper, name, value):
        if self._quant is None:
            return value
        spec = next((s for s in wrapper.handler.kernels if s.name == name), None)
        if spec is None:
            return value
        canon = self._quant(to_canonical(ops.convert_to_tensor(value), spec.layout))
        return np.asarray(ops.convert_to_numpy(from_canonical(canon, value.shape, spec.layout)))

    def unit_mask(self, wrapper):
        if not self.structure.removes_units:
            return None
        e = next(e for e in self._entries if e.produces_units)
        grid = structures_lib.k_of_n_mask(ops.convert_to_tensor(e.logits), e.k, e.n)
        return np.asarray(ops.convert_to_numpy(ops.reshape(grid, (-1,))), "float32")

    # -- metrics -----------------------------------------------------------------
    def metrics(self, wrapper):
        """``{"confidence": float, "diversity": float}`` of this layer (see `mask_metrics`)."""
        conf_sum = conf_n = div_sum = div_n = 0.0
        for e in self._entries:
            logits = np.asarray(ops.convert_to_numpy(e.logits), "float64")
            c, nc = _confidence(logits, e.k, e.n)
            d, nd = _diversity(logits, e.k, e.n)
            conf_sum, conf_n = conf_sum + c * nc, conf_n + nc
            if nd:
                div_sum, div_n = div_sum + d * nd, div_n + nd
        return {"confidence": conf_sum / conf_n if conf_n else float("nan"),
                "diversity": div_sum / div_n if div_n else float("nan")}

    def logs(self, wrapper):
        out = {"temperature": self.current_temperature(wrapper)}
        out.update({key: v for key, v in self.metrics(wrapper).items() if math.isfinite(v)})
        return out


# ---------------------------------------------------------------------------
# Metrics.


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
            if isinstance(w.method, DPP)}


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
            if not isinstance(w.method, DPP):
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

    wrappers = [w for w in find_wrappers(model) if isinstance(w.method, DPP)][:max_layers]
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
