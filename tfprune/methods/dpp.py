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

This module holds the method; the sampler (temperature schedule, relaxed
top-k, entropy of the runs: pure functions) is in `tfprune.methods.dpp_sampler`
and the mask metrics (`mask_metrics`), the callback that records them
(`DPPMetricsHistory`) and the figure helper (`plot_masks`) are in
`tfprune.methods.dpp_metrics`. Their public names are importable from here too.

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
from tfprune.methods.dpp_metrics import (  # noqa: F401 (re-exported)
    DPPMetricsHistory,
    layer_metrics,
    mask_metrics,
    plot_masks,
)
from tfprune.methods.dpp_sampler import (  # noqa: F401 (re-exported)
    _ANNEALS,
    _check_temperature,
    entropy_runs,
    relaxed_topk_mask,
    relaxed_topk_runs,
    temperature_at,
)

_PKG = "tfprune"  # the Keras registration package: `.keras` files name "tfprune>DPP"
_NEG = -1e9  # logit of a padding slot in a trailing short run: never kept if avoidable
_BASES = (structures_lib.Unstructured, structures_lib.Kernel, structures_lib.Filter)

__all__ = ["DPP", "DPPMetricsHistory", "mask_metrics", "plot_masks", "relaxed_topk_mask",
           "temperature_at"]


@dataclasses.dataclass(frozen=True)
class _Entry:
    """How DPP prunes one kernel of a layer (derived at build; kept in ``wrapper.state.host``).

    The kernel's logits are the state variable ``wrapper.state[entry.logits_name]``.
    """

    name: str
    layout: str
    shape: tuple
    canon: tuple
    grid: tuple  # (A, B): runs along A
    k: int
    n: int
    produces_units: bool

    @property
    def logits_name(self):
        """The name of the kernel's logits in the layer's state (``"kernel_logits"``)."""
        return f"{self.name}_logits"

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
        self._base = base  # derived from the hyperparameters, like `_quant`
        self._quant = quantization.FakeQuant(quantize) if quantize else None

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
        entries = []
        for spec in self.kernel_specs(wrapper):
            var = getattr(wrapper.layer, spec.name)
            cshape = canonical_shape(var.shape, spec.layout)
            grid = tuple(int(d) for d in self.structure.grid_shape(cshape))
            k, n = self.resolve(wrapper.layer.name, spec.name, grid[0])
            entry = _Entry(spec.name, spec.layout, tuple(var.shape), cshape, grid, k, n,
                           spec.produces_units)
            self.add_state(wrapper, entry.logits_name, grid, trainable=True)
            entries.append(entry)
        self.add_state(wrapper, "anneal_steps", (), dtype="int64",
                       initializer=keras.initializers.Constant(self.anneal_steps or 0))
        # The noise of training step t is drawn from (this seed, t): saved with the model,
        # so a model saved mid-training resumes with the same masks.
        self.add_seed(wrapper, self.seed)
        # Host values: the runs of each kernel, and whether this fit resolved the anneal
        # (`ready`) and synced a BatchNormalization follower (`synced`).
        wrapper.state.host.update(entries=tuple(entries), ready=False, synced=False)
        self.initialize(wrapper)

    def entries(self, wrapper):
        """The kernels DPP prunes in ``wrapper``: name, layout, group grid, ``k`` and ``n``
        of their runs (read-only metadata; the logits are
        ``wrapper.state[entry.logits_name]``)."""
        return wrapper.state.host["entries"]

    def initialize(self, wrapper):
        """Sets the logits from the kernel's group magnitudes (z-scored log energy)."""
        for e in self.entries(wrapper):
            kernel = ops.cast(getattr(wrapper.layer, e.name), "float32")
            energy = self.structure.reduce(ops.square(to_canonical(kernel, e.layout)))
            energy = np.asarray(ops.convert_to_numpy(energy), "float64")
            log_e = np.log(energy + 1e-12 * max(float(energy.mean()), 1e-30))
            std = float(log_e.std())
            z = (log_e - log_e.mean()) / std if std > 1e-12 else np.zeros_like(log_e)
            wrapper.state[e.logits_name].assign((self.init_scale * z).astype("float32"))

    def on_train_begin(self, wrapper, params):
        anneal = wrapper.state["anneal_steps"]
        steps = int(ops.convert_to_numpy(anneal))
        if steps <= 0 and self.temperature[0] != self.temperature[1]:
            epochs, per_epoch = params.get("epochs"), params.get("steps")
            if not epochs or not per_epoch:
                raise ValueError(
                    f"DPP (layer '{wrapper.name}'): `anneal_steps`=None and the fit's length "
                    f"is unknown (params: epochs={epochs!r}, steps={per_epoch!r}); pass "
                    "DPP(anneal_steps=...) or give fit() `steps_per_epoch`.")
            start = int(ops.convert_to_numpy(wrapper.step))
            anneal.assign(start + int(epochs) * int(per_epoch))
        wrapper.state.host.update(ready=True, synced=False)

    def update(self, wrapper, step):
        host = wrapper.state.host
        if host["synced"]:
            return False
        if not host["ready"]:
            self.on_train_begin(wrapper, {})
        host["synced"] = True
        return self.structure.removes_units  # sync a BatchNormalization follower once

    def on_epoch_end(self, wrapper, epoch):
        return self.structure.removes_units

    # -- masks -------------------------------------------------------------------
    def temperature_tensor(self, wrapper):
        """Temperature of the current training step, in the graph (from ``wrapper.step``)."""
        return temperature_at(ops.maximum(wrapper.step - 1, 0), self.temperature,
                              wrapper.state["anneal_steps"], self.anneal)

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

        seed = step_seed(wrapper.state["noise_seed"], wrapper.step, index)
        return tf.random.stateless_uniform(shape, seed, minval=1e-12, maxval=1.0,
                                           dtype="float32")

    def group_masks(self, wrapper, training):
        """``{kernel name: [A, B] group mask}``: sampled (training) or top-k (inference).

        Computed in float32 (also under mixed precision).
        """
        out = {}
        tau = self.temperature_tensor(wrapper) if training else None
        for i, e in enumerate(self.entries(wrapper)):
            logits = read_value(wrapper.state[e.logits_name], "float32")
            if training:
                x = e.to_runs(logits, _NEG)  # [R, n, B]
                k = min(e.k, e.n)
                if self.noise_scale > 0:
                    # Drawn as [R, B, n] (run last), the layout of the first releases;
                    # moved to [R, n, B] without a gradient.
                    u = self.uniform_noise(wrapper, i, (e.runs, e.grid[1], e.n))
                    x = x + ops.transpose(-self.noise_scale * ops.log(-ops.log(u)), (0, 2, 1))
                out[e.name] = e.from_runs(relaxed_topk_runs(x, k, tau))
            else:
                out[e.name] = structures_lib.k_of_n_mask(logits, e.k, e.n)
        return out

    def entropy(self, wrapper):
        """``sum over runs of H(softmax(logits of the run))`` over all kernels (tensor)."""
        total = 0.0
        for e in self.entries(wrapper):
            logits = read_value(wrapper.state[e.logits_name], "float32")
            total = total + entropy_runs(e.to_runs(logits, _NEG), 1)
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
            wrapper.add_loss(self.entropy_weight * self.entropy(wrapper))
        return super().call(wrapper, inputs, training, **kwargs)

    def final_masks(self, wrapper):
        out = {}
        for e in self.entries(wrapper):
            logits = ops.convert_to_tensor(wrapper.state[e.logits_name])
            grid = structures_lib.k_of_n_mask(logits, e.k, e.n)
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
        e = self._unit_entry(wrapper)
        grid = structures_lib.k_of_n_mask(ops.convert_to_tensor(wrapper.state[e.logits_name]),
                                          e.k, e.n)
        return np.asarray(ops.convert_to_numpy(ops.reshape(grid, (-1,))), "float32")

    # -- coupled units (`tfprune.groups`) ----------------------------------------
    #: Coupled units share one learned mask: tied logits and the same Gumbel noise.
    coupling = "tie"

    def _unit_entry(self, wrapper):
        return next(e for e in self.entries(wrapper) if e.produces_units)

    def unit_parameters(self, wrapper):
        """The unit logits variable (``[units, 1]``; `Filter` structures only)."""
        if not self.structure.removes_units:
            return super().unit_parameters(wrapper)
        return wrapper.state[self._unit_entry(wrapper).logits_name]

    def tie_key(self, wrapper):
        """``(k, n)`` of the unit runs: layers share a mask only if they keep alike."""
        e = self._unit_entry(wrapper)
        return (e.k, e.n)

    def share_noise(self, wrapper, other):
        """Copies ``other``'s saved noise seed: both layers then draw the same noise."""
        wrapper.state["noise_seed"].assign(other.state["noise_seed"])

    # -- metrics -----------------------------------------------------------------
    def metrics(self, wrapper):
        """``{"confidence": float, "diversity": float}`` of this layer (see `mask_metrics`)."""
        return layer_metrics([(ops.convert_to_numpy(wrapper.state[e.logits_name]), e.k, e.n)
                              for e in self.entries(wrapper)])

    def logs(self, wrapper):
        out = {"temperature": self.current_temperature(wrapper)}
        out.update({key: v for key, v in self.metrics(wrapper).items() if math.isfinite(v)})
        return out

