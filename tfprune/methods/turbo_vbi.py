"""Turbo-VBI: a three-layer hierarchical sparse prior with a structured support.

Per weight ``w`` of a kernel seen as its ``[fan_in, units]`` grid (see
`kernel_grid`):

* support ``s`` in {0, 1} (1 = active), prior from a Markov chain down each
  neuron's fan-in or a 2-D Markov random field over the grid
  (`tfprune.methods.message_passing`);
* precision ``rho | s ~ Gamma(a, b)`` if active, ``Gamma(a_bar, b_bar)`` if not;
* weight ``w | rho ~ Normal(0, 1 / rho)``.

Module A (variational Bayes) keeps a Gaussian ``q(w) = N(mu, sigma^2)`` whose
mean is the layer's own kernel, trained by backprop with the local
reparameterization trick and a KL term, plus closed-form updates of ``q(rho)``
and ``q(s)``. Module B (sum-product message passing) turns module A's local
evidence about each support into a structured prior. The "turbo" iteration
(A's closed-form updates, then B) runs from `tfprune.callbacks.Pruning`.
"""

from __future__ import annotations

import functools
import math

import keras
import numpy as np
from keras import ops

from tfprune import schedules as schedules_lib
from tfprune import structures as structures_lib
from tfprune._utils import check_fraction
from tfprune.handlers import canonical_shape, from_canonical, to_canonical
from tfprune.methods import message_passing as mp
from tfprune.methods.base import Method, no_autocast, read_value, step_seed

_PKG = "tfprune"
SUPPORT_PRIORS = ("mrf", "chain", "iid")
FACTORIZATIONS = ("joint", "mean_field")


def _tfd():
    import tensorflow_probability as tfp

    return tfp.distributions


def kernel_grid(kernel, layout="standard"):
    """The 2-D ``[fan_in, units]`` grid of a kernel on which the support prior lives.

    Columns are neurons (output units / conv filters); rows are the fan-in,
    ordered as the canonical ``[S, I, O]`` layout flattened tap-major:
    row ``s * I + i`` is input channel ``i`` at kernel tap ``s`` (for a conv,
    ``fan_in = S * I`` rows). Dense: the kernel itself. This is the matrix
    `tfprune.structures.Block` and the report's ``zeros_in_blocks`` use.
    """
    canon = to_canonical(kernel, layout)
    s, i, o = canon.shape
    return ops.reshape(canon, (s * i, o))


def _from_grid(grid, shape, layout):
    cshape = canonical_shape(shape, layout)
    return from_canonical(ops.reshape(grid, cshape), shape, layout)


def _positive(value, name):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"TurboVBI: `{name}` must be a positive number, got {value!r}.") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"TurboVBI: `{name}` must be a positive finite number, got {value!r}.")
    return v


def _probability(value, name):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"TurboVBI: `{name}` must be a probability in (0, 1), "
                        f"got {value!r}.") from None
    if not 0.0 < v < 1.0:
        raise ValueError(f"TurboVBI: `{name}` must be a probability in (0, 1) (exclusive), "
                         f"got {value!r}.")
    return v


def _int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"TurboVBI: `{name}` must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _logit(p):
    p = np.clip(p, 1e-12, 1.0 - 1e-12)
    return np.log(p) - np.log1p(-p)


def rho_posterior(m2, support, a, b, a_bar, b_bar, factorization="joint"):
    """Closed-form Gamma posteriors of the precisions (module A).

    Real-valued Gaussian weights: a Gamma(shape, rate) prior on ``rho`` and a
    ``N(0, 1/rho)`` weight with ``E_q[w^2] = m2 = mu^2 + sigma^2`` give shape
    ``+ 1/2`` and rate ``+ m2 / 2``. (The authors' reference code uses ``+ 1``
    and ``+ m2``, the complex-Gaussian form of their channel-estimation work;
    for real weights the form here is the exact update.)

    * ``"mean_field"`` (``q(w) q(rho) q(s)``, the reference code's
      factorization): one Gamma per weight,
      ``shape = pi a + (1 - pi) a_bar + 1/2``,
      ``rate = pi b + (1 - pi) b_bar + m2 / 2`` with ``pi = support``.
    * ``"joint"`` (``q(w) q(s) q(rho | s)``): one Gamma per support state,
      ``Gamma(a + 1/2, b + m2/2)`` if active and
      ``Gamma(a_bar + 1/2, b_bar + m2/2)`` if inactive.

    Returns:
        ``(shape, rate)``, each ``[2, *m2.shape]`` (row 0: given inactive,
        row 1: given active; equal rows for mean-field).
    """
    m2 = np.asarray(m2, np.float64)
    if factorization == "mean_field":
        pi = np.asarray(support, np.float64)
        shape = pi * a + (1.0 - pi) * a_bar + 0.5
        rate = pi * b + (1.0 - pi) * b_bar + 0.5 * m2
        return np.stack([shape, shape]), np.stack([rate, rate])
    shape = np.stack([np.full_like(m2, a_bar + 0.5), np.full_like(m2, a + 0.5)])
    rate = np.stack([b_bar + 0.5 * m2, b + 0.5 * m2])
    return shape, rate


def support_log_evidence(m2, shape, rate, a, b, a_bar, b_bar, factorization="joint"):
    """Module A's local evidence about each support: ``log ev(s=1) - log ev(s=0)``.

    * ``"mean_field"``: ``E_q(rho)[log Gamma(rho | a, b)] - E_q(rho)[log
      Gamma(rho | a_bar, b_bar)]`` (the standard VB update of ``q(s)``),
      computed as a difference of TFP cross entropies.
    * ``"joint"``: ``log Z_1 - log Z_0`` with
      ``Z_s = int exp(E_q(w)[log N(w | 0, 1/rho)]) Gamma(rho | a_s, b_s) drho``,
      which equals a Student-t density with ``2 a_s`` degrees of freedom and
      scale ``sqrt(b_s / a_s)`` at ``sqrt(m2)``.

    The posterior support is then ``sigmoid(logit(prior) + evidence)``.
    """
    tfd = _tfd()
    if factorization == "mean_field":
        q = tfd.Gamma(concentration=shape[1], rate=rate[1])
        ce1 = q.cross_entropy(tfd.Gamma(np.float64(a), np.float64(b)))
        ce0 = q.cross_entropy(tfd.Gamma(np.float64(a_bar), np.float64(b_bar)))
        return np.asarray(ce0 - ce1, np.float64)
    w = np.sqrt(np.asarray(m2, np.float64))
    lp1 = tfd.StudentT(np.float64(2 * a), np.float64(0), np.float64(math.sqrt(b / a))).log_prob(w)
    lp0 = tfd.StudentT(np.float64(2 * a_bar), np.float64(0),
                       np.float64(math.sqrt(b_bar / a_bar))).log_prob(w)
    return np.asarray(lp1 - lp0, np.float64)


@keras.saving.register_keras_serializable(package=_PKG)
class TurboVBI(Method):
    """Structured Bayesian pruning with a three-layer hierarchical prior (Turbo-VBI).

    Prior per weight (all `tfp.distributions`): support ``s ~ Bernoulli``
    with a structured prior, precision ``rho | s ~ Gamma(a, b)`` (active) or
    ``Gamma(a_bar, b_bar)`` (inactive, large precision pushes ``w`` to 0),
    weight ``w | rho ~ Normal(0, 1/rho)``.

    **Grid layout.** The support prior lives on the kernel seen as the
    ``[fan_in, units]`` matrix (`kernel_grid`): columns are neurons (conv
    filters), rows the fan-in (``S * I`` rows for a conv, tap-major). The
    Markov chain runs down each column (a neuron's fan-in); the MRF also links
    horizontal neighbours (the same input of adjacent neurons). ``p01`` /
    ``p11`` are ``P(active | previous inactive / active)``, ``start`` the
    probability of the first row being active.

    **Module A.** ``q(w) = N(mu, sigma^2)``: ``mu`` is the layer's kernel (so
    `tfprune.strip` and `tfprune.shrink` work unchanged), ``sigma =
    softplus(kernel_sigma)`` a trainable variable. Training uses the local
    reparameterization trick: pre-activation mean ``layer(x)`` with the masked
    kernel, variance ``layer_linear(x**2)`` with ``sigma**2`` and no bias,
    a Normal sample, then the activation. The loss gets
    ``kl_weight * warmup(step) * KL(q(w) || N(0, 1/E[rho])) / num_train_examples``
    (Keras losses are means over the batch, so dividing by the data-set size
    gives the ELBO per example; ``warmup`` ramps linearly from 0 to 1 over
    ``warmup_steps``). The KL uses ``1/E[rho]`` as prior variance; it differs
    from the exact ``E_q(rho)[KL]`` by a constant in ``mu, sigma``, so the
    gradients are the same. Turbo iterations update ``q(rho)`` and ``q(s)`` in
    closed form (`rho_posterior`, `support_log_evidence`).

    **Factorization.** ``"joint"`` (default) uses ``q(s) q(rho | s)``; the
    support evidence is then the ratio of two Student-t densities at
    ``sqrt(mu^2 + sigma^2)``, i.e. it depends on the weight's size.
    ``"mean_field"`` is the reference code's ``q(s) q(rho)``; it is bistable
    (its fixed point depends mostly on the initial support probability, not on
    the weights), which is why it is not the default.

    **Module B.** Sum-product message passing on the support prior
    (``support_prior="mrf"``: loopy BP, flooding schedule with damping
    ``bp_damping`` and tolerance ``bp_tol`` on message log-odds, at most
    ``bp_max_iter`` iterations; ``"chain"``: exact forward-backward;
    ``"iid"``: a constant prior ``start``). Module A sends the normalized local
    evidence ``sigmoid(evidence)``; module B returns the *extrinsic*
    probability (the BP marginal with the weight's own evidence divided out),
    which module A uses as the prior of ``q(s)``. Returning the full marginal,
    as the reference code does, would count module A's evidence twice; with
    the extrinsic message the posterior ``q(s)`` equals the BP marginal.

    **Schedule.** A turbo iteration (``inner_iterations`` rounds of
    ``q(rho)`` -> evidence -> module B -> ``q(s)``, then ``q(rho)`` and
    ``E[rho]``) runs every ``update_every`` training steps (an int) or at each
    epoch end (``"epoch"``), from ``begin_step`` on, until ``freeze_step``.

    **Randomness and precision.** The noise of the sampled pre-activations
    is a stateless draw from a per-layer seed saved with the model (drawn at
    build, repeatable under `keras.utils.set_random_seed`), the saved step
    counter and the replica id, so training resumed from a `.keras` file
    saved mid-training continues exactly. The variance pass, the noise and
    the KL are computed in float32, also under a ``mixed_float16`` policy
    (the output is cast back to the compute dtype; the KL loss is float32).

    **Mask.** After each turbo iteration a weight is kept iff its posterior
    support probability is ``>= threshold`` and ``|mu| >= min_magnitude``;
    masked weights get neither noise nor gradient, so pruning is
    irreversible. With ``prune_units`` a unit with no kept weight is removed
    with its bias (`unit_mask`), so `tfprune.shrink` drops it. From
    ``freeze_step`` on the mask is frozen and training is plain (no noise,
    no KL): fine-tuning in place.

    **Unit (Filter) pruning.** With ``structure=Filter()`` and ``unit_sparsity``
    (or ``unit_schedule``) the weights are pruned by the posterior as above
    and, at every turbo iteration from ``begin_step`` on, the units are ranked
    by their *posterior energy* per weight,
    ``score_j = mean_i q(s_ij = 1) m_ij E_q[w_ij^2] / scale`` over column ``j``
    of the grid (``E_q[w^2] = mu^2 + sigma^2``, ``m`` the weight mask,
    ``scale`` the ``weight_scale`` with ``normalize``, else 1): the expected
    squared norm of the unit's active weights under the posterior, Magnitude's
    criterion with every weight weighted by the probability that it is active.
    Dividing by the layer's scale and the fan-in makes the scores of layers
    with different weight scales and fan-ins comparable, so a coupled group
    can add them. (On a small MNIST MLP at 50-75% of the units it kept slightly
    more accuracy than the expected fraction of active weights,
    ``mean_i q(s_ij = 1) m_ij``.) The lowest ``unit_sparsity`` fraction of the
    units is removed (``Filter.round_to`` respected), with their columns and
    bias, so `tfprune.shrink` drops them; a unit with no kept weight is removed
    too. Removal is irreversible: a removed unit's weights stay masked (they
    score 0). Layers whose units are coupled (through an ``Add``, a grouped
    convolution...) choose them together (``coupling = "select"``, see
    `tfprune.groups`): after each turbo iteration the group ranks its units by
    the sum of the members' `unit_scores` and imposes the same units on every
    member with `set_unit_mask`. Layers whose units must all stay (a model
    output) get `keep_units`: ``Unstructured()`` with ``prune_units=False``.

    Args:
        num_train_examples: training-set size for the KL scaling (required
            to train; None allowed for inference-only use).
        kl_weight: multiplier of the KL term. 1 is the exact ELBO; on small data
            sets (10k MNIST images for 266k weights) it prunes everything, so the
            default 0.01 tempers the posterior.
        warmup_steps: KL warm-up length in training steps (0: none).
        a: Gamma shape of the precision of active weights, > 0.
        b: Gamma rate of the precision of active weights, > 0. With
            ``normalize`` the rates are in units of the layer's mean squared
            weight at the first turbo iteration (stored in the
            ``weight_scale`` variable), so one setting fits every layer.
        a_bar: Gamma shape of the precision of inactive weights, > 0.
        b_bar: Gamma rate of the precision of inactive weights, > 0 (small:
            large precision, the weight is pushed to zero).
        start: probability that the first row of the support grid is
            active, in (0, 1).
        p01: ``P(active | previous inactive)``, in (0, 1).
        p11: ``P(active | previous active)``, in (0, 1). The chain's
            stationary active fraction ``p01 / (1 - p11 + p01)`` (0.11 by
            default) sets the sparsity the prior favours; ``p11 - p01`` how
            strongly active weights cluster.
        support_prior: ``"mrf"``, ``"chain"`` or ``"iid"``.
        factorization: ``"joint"`` or ``"mean_field"``.
        normalize: measure weights in units of the layer's RMS (see above).
        threshold: posterior support probability below which a weight is pruned.
        min_magnitude: also prune weights with ``|mu|`` below this.
        prune_units: remove units (and their bias) with no active weight
            (must be True with ``Filter``).
        update_every: ``"epoch"`` or a positive int (training steps).
        begin_step: first training step at which turbo iterations change the
            mask (before it they only update the posterior, so the KL shrinks
            weights gradually before anything is cut).
        freeze_step: step from which the mask is frozen and training is
            deterministic without KL (None: never).
        inner_iterations: A/B rounds per turbo iteration.
        sigma_init: initial posterior standard deviation.
        bp_damping: damping of the loopy BP messages (``"mrf"``), in [0, 1).
        bp_tol: loopy BP convergence tolerance on the message log-odds.
        bp_max_iter: loopy BP iteration limit.
        structure: `structures.Unstructured` (default: the prior gives the
            structure) or `structures.Filter` (also remove ``unit_sparsity`` of
            the units, see above).
        unit_sparsity: with ``Filter``, the fraction of units removed, in
            [0, 1); reached at the first turbo iteration from ``begin_step``
            on. Must be None with ``Unstructured``.
        unit_schedule: with ``Filter``, instead of (or equal in its final
            sparsity to) ``unit_sparsity``: a `tfprune.schedules` schedule
            whose sparsity at the step of each turbo iteration is the target
            (0 before its ``begin_step``; its ``frequency`` and ``end_step``
            are not used: units are re-selected at every turbo iteration).

    Example:
        >>> pruned = tfprune.prune(model, methods.TurboVBI(num_train_examples=len(x)))
        >>> pruned.fit(x, y, epochs=10, callbacks=[tfprune.callbacks.Pruning()])
        >>> small = tfprune.shrink(tfprune.strip(pruned))
        >>> filters = methods.TurboVBI(num_train_examples=len(x), structure=structures.Filter(),
        ...                            unit_sparsity=0.5)  # half of the units of every layer

    References:
        Xia, Tsang & Lau, "Structured Bayesian Compression for Deep Neural
        Networks Based on the Turbo-VBI Approach", IEEE TSP 71 (2023),
        arXiv 2302.10483. Kingma, Salimans & Welling, "Variational dropout and
        the local reparameterization trick", NeurIPS 2015.
    """

    def __init__(self, num_train_examples=None, kl_weight=0.01, warmup_steps=0, a=1.0, b=1.0,
                 a_bar=1.0, b_bar=0.01, start=0.1, p01=0.05, p11=0.6, support_prior="mrf",
                 factorization="joint", normalize=True, threshold=0.5, min_magnitude=0.0,
                 prune_units=True,
                 update_every="epoch", begin_step=0, freeze_step=None, inner_iterations=1,
                 sigma_init=1e-3, bp_damping=0.5, bp_tol=1e-3, bp_max_iter=100,
                 structure=None, unit_sparsity=None, unit_schedule=None):
        super().__init__(structure)
        if not isinstance(self.structure, (structures_lib.Unstructured, structures_lib.Filter)):
            raise ValueError(
                f"TurboVBI: `structure` must be Unstructured() (the structured support prior "
                f"groups the weights) or Filter() (weights pruned by the posterior, plus the "
                f"lowest-scoring `unit_sparsity` of the units), got {self.structure!r}.")
        self._init_units(unit_sparsity, unit_schedule, prune_units)
        if num_train_examples is not None:
            num_train_examples = _int(num_train_examples, "num_train_examples", 1)
        self.num_train_examples = num_train_examples
        self.kl_weight = float(kl_weight)
        if not (self.kl_weight >= 0 and math.isfinite(self.kl_weight)):
            raise ValueError(f"TurboVBI: `kl_weight` must be >= 0, got {kl_weight!r}.")
        self.warmup_steps = _int(warmup_steps, "warmup_steps", 0)
        self.a = _positive(a, "a")
        self.b = _positive(b, "b")
        self.a_bar = _positive(a_bar, "a_bar")
        self.b_bar = _positive(b_bar, "b_bar")
        self.start = _probability(start, "start")
        self.p01 = _probability(p01, "p01")
        self.p11 = _probability(p11, "p11")
        if support_prior not in SUPPORT_PRIORS:
            raise ValueError(f"TurboVBI: `support_prior` must be one of {SUPPORT_PRIORS}, "
                             f"got {support_prior!r}.")
        self.support_prior = support_prior
        if factorization not in FACTORIZATIONS:
            raise ValueError(f"TurboVBI: `factorization` must be one of {FACTORIZATIONS}, "
                             f"got {factorization!r}.")
        self.factorization = factorization
        self.normalize = bool(normalize)
        self.threshold = _probability(threshold, "threshold")
        self.min_magnitude = float(min_magnitude)
        if not self.min_magnitude >= 0:
            raise ValueError(f"TurboVBI: `min_magnitude` must be >= 0, got {min_magnitude!r}.")
        self.prune_units = bool(prune_units)
        if update_every != "epoch":
            update_every = _int(update_every, "update_every", 1)
        self.update_every = update_every
        self.begin_step = _int(begin_step, "begin_step", 0)
        self.freeze_step = None if freeze_step is None else _int(freeze_step, "freeze_step", 0)
        self.inner_iterations = _int(inner_iterations, "inner_iterations", 1)
        self.sigma_init = _positive(sigma_init, "sigma_init")
        self.bp_damping = float(bp_damping)
        if not 0.0 <= self.bp_damping < 1.0:
            raise ValueError(f"TurboVBI: `bp_damping` must be in [0, 1), got {bp_damping!r}.")
        self.bp_tol = _positive(bp_tol, "bp_tol")
        self.bp_max_iter = _int(bp_max_iter, "bp_max_iter", 1)

    def get_config(self):
        config = super().get_config()
        for key in ("num_train_examples", "kl_weight", "warmup_steps", "a", "b", "a_bar",
                    "b_bar", "start", "p01", "p11", "support_prior", "factorization", "normalize",
                    "threshold", "min_magnitude", "prune_units", "update_every", "begin_step",
                    "freeze_step", "inner_iterations", "sigma_init", "bp_damping", "bp_tol",
                    "bp_max_iter"):
            config[key] = getattr(self, key)
        config["unit_sparsity"] = self.target_unit_sparsity
        config["unit_schedule"] = (None if self.unit_schedule is None
                                   else keras.saving.serialize_keras_object(self.unit_schedule))
        return config

    def _init_units(self, unit_sparsity, unit_schedule, prune_units):
        """Validates and sets the unit (Filter) arguments."""
        self.filter_units = isinstance(self.structure, structures_lib.Filter)
        schedule = schedules_lib.get(unit_schedule)
        if unit_sparsity is not None:
            unit_sparsity = check_fraction(unit_sparsity, "unit_sparsity", owner="TurboVBI")
        if not self.filter_units:
            if unit_sparsity is not None or schedule is not None:
                given = "unit_sparsity" if unit_sparsity is not None else "unit_schedule"
                value = unit_sparsity if unit_sparsity is not None else schedule
                raise ValueError(
                    f"TurboVBI: `{given}`={value!r} needs structure=Filter() (it sets the "
                    f"fraction of whole units removed), got structure={self.structure!r}; "
                    "with Unstructured() the posterior alone decides (prune_units=True removes "
                    "units with no kept weight).")
        else:
            if not prune_units:
                raise ValueError(
                    "TurboVBI: `prune_units`=False contradicts structure=Filter(), which removes "
                    "units; to keep every unit and prune weights only, use "
                    "structure=Unstructured() with prune_units=False.")
            if unit_sparsity is None and schedule is None:
                raise ValueError(
                    "TurboVBI: structure=Filter() needs `unit_sparsity` (the fraction of units "
                    "to remove, in [0, 1)) or `unit_schedule` (a tfprune.schedules schedule of "
                    "it), got neither.")
            if (unit_sparsity is not None and schedule is not None
                    and abs(unit_sparsity - schedule.final_sparsity) > 1e-9):
                raise ValueError(
                    f"TurboVBI: `unit_sparsity`={unit_sparsity} differs from the final sparsity "
                    f"{schedule.final_sparsity} of `unit_schedule`={schedule!r}; pass only one "
                    "of them.")
        self.target_unit_sparsity = unit_sparsity
        self.unit_schedule = schedule

    # -- distributions ---------------------------------------------------------
    @property
    def removes_units(self):
        return self.prune_units

    def keep_units(self):
        """The same method keeping every unit: ``Unstructured()`` with ``prune_units=False``.

        The weights are still pruned by the posterior.
        """
        if not self.prune_units:
            return self
        return type(self).from_config({
            **self.get_config(), "prune_units": False, "unit_sparsity": None,
            "unit_schedule": None,
            "structure": structures_lib.serialize(structures_lib.Unstructured())})

    @property
    def coupling(self):
        """``"select"`` with a `Filter` structure (coupled units chosen jointly from
        `unit_scores`), else ``"union"`` (a unit goes when every coupled layer lost all its
        weights)."""
        return "select" if self.filter_units else "union"

    def check_budget(self, budget):
        """A budget (`tfprune.budgets`) is not supported yet: a ValueError.

        Each turbo iteration selects this layer's units at its own
        ``unit_sparsity``, which a model-wide budget would contradict.
        """
        if budget is not None:
            raise ValueError(
                f"TurboVBI: a budget ({budget!r}) is not supported; TurboVBI removes "
                f"`unit_sparsity` of the units of every layer at each turbo iteration (got "
                f"{self!r}); use structure=Filter() with unit_sparsity, or a budget with "
                "methods.Magnitude or methods.Taylor.")

    def unit_sparsity(self, step):
        """The fraction of units removed by a turbo iteration at ``step`` (`Filter` only).

        0 before ``begin_step`` (turbo iterations do not change the mask then);
        then ``unit_sparsity``, or the sparsity of ``unit_schedule`` at ``step``
        (0 before the schedule's ``begin_step``).
        """
        if not self.filter_units:
            return super().unit_sparsity(step)
        step = int(step)
        if step < self.begin_step:
            return 0.0
        if self.unit_schedule is None:
            return self.target_unit_sparsity
        if step < getattr(self.unit_schedule, "begin_step", 0):
            return 0.0
        return float(self.unit_schedule(step)[1])

    def prior(self, support_prob):
        """The hierarchical prior as TFP distributions for prior support ``support_prob``.

        Returns ``{"support": Bernoulli, "precision_active": Gamma(a, b),
        "precision_inactive": Gamma(a_bar, b_bar)}``; ``w | rho ~ Normal(0, rho**-0.5)``.
        """
        tfd = _tfd()
        return {
            "support": tfd.Bernoulli(probs=support_prob, dtype="float32"),
            "precision_active": tfd.Gamma(self.a, self.b),
            "precision_inactive": tfd.Gamma(self.a_bar, self.b_bar),
        }

    # -- life cycle --------------------------------------------------------------
    def validate(self, wrapper):
        if wrapper.handler is not None and len(wrapper.handler.kernels) != 1:
            raise ValueError(
                f"TurboVBI: layer '{wrapper.layer.name}' ({type(wrapper.layer).__name__}) has "
                f"{len(wrapper.handler.kernels)} kernels; the local reparameterization trick "
                "needs a layer that is linear in one kernel (Dense, Conv, ConvTranspose, "
                "DepthwiseConv).")

    def build(self, wrapper):
        spec = wrapper.handler.kernels[0]
        kernel = getattr(wrapper.layer, spec.name)
        shape = tuple(kernel.shape)
        inv_softplus = math.log(math.expm1(self.sigma_init))

        # Every variable is named "<kernel>_<key>" (read back with `_state(wrapper, key)`).
        def state(key, init, shape=shape, dtype=kernel.dtype, trainable=False):
            self.add_state(wrapper, f"{spec.name}_{key}", shape, dtype=dtype,
                           initializer=keras.initializers.Constant(init), trainable=trainable)

        state("sigma", inv_softplus, trainable=True)
        state("mask", 1.0)
        state("support_posterior", 0.5)
        state("support_prior", self.start)
        state("rho_shape", self.a + 0.5, (2,) + shape)
        state("rho_rate", self.b, (2,) + shape)
        state("prior_precision", 1.0)
        bias = getattr(wrapper.layer, wrapper.handler.bias or "", None)
        if self.prune_units and bias is not None:
            state("bias_mask", 1.0, tuple(bias.shape), bias.dtype)
        if self.filter_units:
            # `mask` is the effective mask: `weight_mask` (the posterior's, irreversible)
            # times the columns of the kept units `unit_mask`. A turbo iteration first sets
            # them from this layer's own ranking; a coupled group may then impose another
            # unit mask (`set_unit_mask`), recomputed from `weight_mask`.
            state("weight_mask", 1.0)
            units = int(canonical_shape(shape, spec.layout)[2])
            state("unit_mask", 1.0, (units,))
        state("turbo_iterations", 0, (), "int64")
        state("weight_scale", 0.0, ())
        # The noise of training step t is drawn from (this seed, t, replica): saved with the
        # model, so a model saved mid-training resumes with the same draws.
        self.add_seed(wrapper)

    @staticmethod
    def _spec(wrapper):
        """The kernel spec of the (one-kernel) wrapped layer."""
        return wrapper.handler.kernels[0]

    def _state(self, wrapper, key):
        """The state variable ``"<kernel>_<key>"`` of ``wrapper`` (e.g. ``"kernel_mask"``), or
        None for the optional ones (``bias_mask``, ``weight_mask``, ``unit_mask``)."""
        name = f"{self._spec(wrapper).name}_{key}"
        if key in ("bias_mask", "weight_mask", "unit_mask"):
            return wrapper.state.get(name)
        return wrapper.state[name]

    def _values(self, wrapper):
        name = self._spec(wrapper).name
        values = {name: read_value(getattr(wrapper.layer, name))
                  * read_value(self._state(wrapper, "mask"))}
        bias_mask = self._state(wrapper, "bias_mask")
        if bias_mask is not None:
            bias = wrapper.handler.bias
            values[bias] = read_value(getattr(wrapper.layer, bias)) * read_value(bias_mask)
        return values

    def normal_noise(self, wrapper, shape):
        """Standard normal float32 draws for the sampled pre-activations of this step.

        Stateless: a function of the layer's saved seed, the training step
        (``wrapper.step``) and the replica (each replica of a distribution
        strategy samples its own examples' noise).
        """
        import tensorflow as tf

        ctx = tf.distribute.get_replica_context()
        replica = 0 if ctx is None else ctx.replica_id_in_sync_group
        seed = step_seed(wrapper.state["noise_seed"], wrapper.step, replica)
        return tf.random.stateless_normal(shape, seed, dtype="float32")

    def effective_variables(self, wrapper, training):
        return self._values(wrapper)

    def kl_divergence(self, wrapper, sigma=None):
        """``sum KL(q(w) || N(0, 1/E[rho]))`` over the kept weights (a tensor).

        The closed form of the Gaussian KL (what ``tfd.kl_divergence`` of the two
        ``tfd.Normal`` computes), ``(P (mu^2 + sigma^2) - 1 - log P) / 2 - log sigma``
        with ``P = E[rho]``, in a few elementwise ops (it runs every training step).

        Args:
            wrapper: the `PruneWrapper`.
            sigma: ``softplus(kernel_sigma)`` if already computed (None: computed here).
        """
        mu = read_value(getattr(wrapper.layer, self._spec(wrapper).name), "float32")
        if sigma is None:
            sigma = ops.softplus(read_value(self._state(wrapper, "sigma"), "float32"))
        precision = read_value(self._state(wrapper, "prior_precision"), "float32")
        kl = (0.5 * (precision * (ops.square(mu) + ops.square(sigma)) - ops.log(precision) - 1.0)
              - ops.log(sigma))
        return ops.sum(kl * read_value(self._state(wrapper, "mask"), "float32"))

    def call(self, wrapper, inputs, training, **kwargs):
        values = self._values(wrapper)
        mean = wrapper.run_layer(inputs, values, training=training, use_activation=False,
                                 **kwargs)
        activation = getattr(wrapper.layer, "activation", None) or keras.activations.linear
        if not training:
            return activation(mean)
        if self.num_train_examples is None:
            raise ValueError(
                f"TurboVBI: layer '{wrapper.layer.name}' is being trained but "
                "`num_train_examples` is None; pass TurboVBI(num_train_examples=len(x_train)) "
                "(it scales the KL term to one example).")
        name = self._spec(wrapper).name
        # Sampling and KL in float32 (also under mixed precision, where sigma**2 ~ 1e-6 would
        # be a float16 subnormal); the output is cast back to the compute dtype.
        sigma = ops.softplus(read_value(self._state(wrapper, "sigma"), "float32"))
        var_values = {name: ops.square(sigma) * read_value(self._state(wrapper, "mask"),
                                                            "float32")}
        bias = wrapper.handler.bias
        if bias is not None and getattr(wrapper.layer, bias, None) is not None:
            var_values[bias] = ops.zeros(tuple(getattr(wrapper.layer, bias).shape), "float32")
        with no_autocast():
            variance = wrapper.run_layer(ops.square(ops.cast(inputs, "float32")), var_values,
                                         training=training, use_activation=False, **kwargs)
        mean = ops.cast(mean, "float32")
        noise = self.normal_noise(wrapper, ops.shape(mean))
        step = ops.cast(wrapper.step, "float32")
        on = 1.0
        if self.freeze_step is not None:
            on = ops.cast(ops.less(step, float(self.freeze_step)), "float32")
        out = mean + on * ops.sqrt(ops.cast(variance, "float32") + 1e-12) * noise
        warm = 1.0 if self.warmup_steps == 0 else ops.minimum(1.0, step / self.warmup_steps)
        scale = self.kl_weight / self.num_train_examples
        wrapper.add_loss(ops.cast(on * warm * scale * self.kl_divergence(wrapper, sigma),
                                  "float32"))
        return ops.cast(activation(out), wrapper.compute_dtype)

    # -- turbo iteration ---------------------------------------------------------
    def _grid(self, wrapper, value):
        """``value`` (a kernel-shaped variable or array) as its float64 numpy `kernel_grid`."""
        value = np.asarray(ops.convert_to_numpy(value))
        return np.asarray(kernel_grid(value, self._spec(wrapper).layout), np.float64)

    def _to_kernel(self, wrapper, grid):
        """A ``[fan_in, units]`` grid back in the kernel's shape (numpy)."""
        spec = self._spec(wrapper)
        shape = tuple(getattr(wrapper.layer, spec.name).shape)
        return np.asarray(_from_grid(grid, shape, spec.layout))

    def module_b(self, evidence):
        """Structured prior ``P(s = 1)`` (extrinsic) from module A's evidence probabilities."""
        if self.support_prior == "iid":
            return np.full_like(evidence, self.start)
        if self.support_prior == "chain":
            return mp.chain_marginals(evidence, self.start, self.p01, self.p11, extrinsic=True)
        return mp.grid_marginals(evidence, self.start, self.p01, self.p11, extrinsic=True,
                                 damping=self.bp_damping, tol=self.bp_tol,
                                 max_iter=self.bp_max_iter)

    def posterior_update(self, m2, support):
        """One turbo iteration on grids (numpy): returns the new posterior state.

        Args:
            m2: ``E_q[w^2] = mu^2 + sigma^2`` on the ``[fan_in, units]`` grid.
            support: current posterior support probabilities (same shape).

        Returns:
            dict with ``support`` (posterior ``q(s = 1)``), ``prior`` (module
            B's extrinsic prior), ``shape``/``rate`` (``[2, ...]``,
            `rho_posterior` at the new support) and ``precision`` (``E[rho]``).
        """
        hyper = (self.a, self.b, self.a_bar, self.b_bar)
        prior = None
        for _ in range(self.inner_iterations):
            shape, rate = rho_posterior(m2, support, *hyper, self.factorization)
            evidence = support_log_evidence(m2, shape, rate, *hyper, self.factorization)
            prior = self.module_b(_sigmoid(evidence))
            support = _sigmoid(_logit(prior) + evidence)
        shape, rate = rho_posterior(m2, support, *hyper, self.factorization)
        precision = support * shape[1] / rate[1] + (1.0 - support) * shape[0] / rate[0]
        return {"support": support, "prior": prior, "shape": shape, "rate": rate,
                "precision": precision}

    def turbo_step(self, wrapper):
        """Runs one turbo iteration (module A closed forms + module B) and sets the mask."""
        var = functools.partial(self._state, wrapper)
        mu = self._grid(wrapper, getattr(wrapper.layer, self._spec(wrapper).name))
        sigma = self._grid(wrapper, ops.softplus(var("sigma")))
        support = self._grid(wrapper, var("support_posterior"))
        scale = 1.0
        if self.normalize:
            scale = float(ops.convert_to_numpy(var("weight_scale")))
            if scale <= 0:
                scale = float(np.mean(mu ** 2)) or 1.0
                var("weight_scale").assign(scale)
        m2 = (mu ** 2 + sigma ** 2) / scale
        new = self.posterior_update(m2, support)
        new["precision"] = new["precision"] / scale
        step = int(ops.convert_to_numpy(wrapper.step))
        old_keep = self._grid(wrapper, var("mask")) > 0
        keep = old_keep
        if step >= self.begin_step:
            keep = (new["support"] >= self.threshold) & (np.abs(mu) >= self.min_magnitude)
            # Pruning is irreversible: pruned weights get no gradient, their evidence is stale.
            keep &= old_keep
        dtype = var("mask").dtype
        to_kernel = functools.partial(self._to_kernel, wrapper)
        var("support_posterior").assign(to_kernel(new["support"]).astype(dtype))
        var("support_prior").assign(to_kernel(new["prior"]).astype(dtype))
        var("prior_precision").assign(to_kernel(new["precision"]).astype(dtype))
        for key, value in (("rho_shape", new["shape"]), ("rho_rate", new["rate"])):
            var(key).assign(np.stack([to_kernel(v) for v in value]).astype(dtype))
        var("turbo_iterations").assign_add(1)
        if self.filter_units:
            # Units removed by earlier iterations are folded into `old_keep` (their columns are
            # zero in the effective mask), so they score 0 and stay removed.
            var("weight_mask").assign(to_kernel(keep.astype(np.float64)).astype(dtype))
            scores = self._unit_scores(new["support"], keep, m2)
            self._apply_units(wrapper, self._select_units(scores, self.unit_sparsity(step)))
            return True
        var("mask").assign(to_kernel(keep.astype(np.float64)).astype(dtype))
        bias_mask = var("bias_mask")
        if bias_mask is not None:
            bias_mask.assign(keep.any(axis=0).astype(bias_mask.dtype))
        return True

    # -- units (Filter) ----------------------------------------------------------------
    @staticmethod
    def _unit_scores(support, keep, m2):
        """Posterior energy per unit: ``mean_i q(s_ij = 1) keep_ij E_q[w_ij^2]`` (grids)."""
        return (np.asarray(support, np.float64) * keep * m2).mean(axis=0)

    def _select_units(self, scores, sparsity):
        """The 0/1 mask of the ``keep`` best units (ties: lower index first, as the groups)."""
        total = int(scores.shape[0])
        keep = self.structure.round_keep(total - int(round(sparsity * total)), total)
        mask = np.zeros(total, bool)
        mask[np.argsort(-scores, kind="stable")[:keep]] = True
        return mask

    def _apply_units(self, wrapper, unit):
        """Sets the unit, effective and bias masks from ``unit`` and the weight mask.

        A unit with no kept weight is removed too (as ``prune_units`` does).
        """
        var = functools.partial(self._state, wrapper)
        weights = self._grid(wrapper, var("weight_mask")) > 0
        unit = np.asarray(unit, bool).reshape(-1) & weights.any(axis=0)
        dtype = var("mask").dtype
        var("unit_mask").assign(unit.astype(dtype))
        var("mask").assign(self._to_kernel(wrapper, (weights & unit[None, :]).astype(np.float64))
                           .astype(dtype))
        bias_mask = var("bias_mask")
        if bias_mask is not None:
            bias_mask.assign(unit.astype(bias_mask.dtype))

    def unit_scores(self, wrapper):
        """Posterior importance of each unit, numpy ``[units]`` (`Filter` only).

        The posterior energy of the unit's kept weights per weight,
        ``mean_i q(s_ij = 1) weight_mask_ij (mu_ij^2 + sigma_ij^2) / scale`` over
        its column ``j`` of the `kernel_grid` (``scale``: the ``weight_scale``
        with ``normalize``, else 1), with the support of the last turbo
        iteration. See "Unit (Filter) pruning" in the class docstring.
        """
        if not self.filter_units:
            return super().unit_scores(wrapper)
        return self._unit_scores(*self._unit_evidence(wrapper))

    def _unit_evidence(self, wrapper):
        """``(support, weight keep, normalized E_q[w^2])`` grids from the saved state."""
        var = functools.partial(self._state, wrapper)
        mu = self._grid(wrapper, getattr(wrapper.layer, self._spec(wrapper).name))
        sigma = self._grid(wrapper, ops.softplus(var("sigma")))
        scale = float(ops.convert_to_numpy(var("weight_scale"))) if self.normalize else 1.0
        m2 = (mu ** 2 + sigma ** 2) / (scale if scale > 0 else 1.0)
        support = self._grid(wrapper, var("support_posterior"))
        keep = self._grid(wrapper, var("weight_mask")) > 0
        return support, keep, m2

    def set_unit_mask(self, wrapper, unit_mask):
        """Imposes a 0/1 unit mask (`Filter` only): the kept units' columns of the posterior's
        weight mask stay, the others and their bias are masked. A unit without kept weights
        stays removed."""
        if not self.filter_units:
            return super().set_unit_mask(wrapper, unit_mask)
        unit = np.asarray(ops.convert_to_numpy(unit_mask)).reshape(-1)
        units = int(self._state(wrapper, "unit_mask").shape[0])
        if unit.shape[0] != units:
            raise ValueError(
                f"TurboVBI: layer '{wrapper.layer.name}' has {units} units, "
                f"got a unit mask of {unit.shape[0]}.")
        self._apply_units(wrapper, unit > 0)

    def _due(self, wrapper, step):
        return self.freeze_step is None or step < self.freeze_step

    def update(self, wrapper, step):
        if self.update_every == "epoch" or step == 0 or step % self.update_every:
            return False
        if not self._due(wrapper, step):
            return False
        return self.turbo_step(wrapper)

    def on_epoch_end(self, wrapper, epoch):
        if self.update_every != "epoch":
            return False
        step = int(ops.convert_to_numpy(wrapper.step))
        if not self._due(wrapper, step):
            return False
        return self.turbo_step(wrapper)

    # -- results -------------------------------------------------------------------
    def final_masks(self, wrapper):
        out = {self._spec(wrapper).name: np.asarray(ops.convert_to_numpy(
            self._state(wrapper, "mask")))}
        bias_mask = self._state(wrapper, "bias_mask")
        if bias_mask is not None:
            out[wrapper.handler.bias] = np.asarray(ops.convert_to_numpy(bias_mask))
        return out

    def unit_mask(self, wrapper):
        if not self.prune_units:
            return None
        if self.filter_units:
            return np.asarray(ops.convert_to_numpy(self._state(wrapper, "unit_mask")), "float32")
        grid = self._grid(wrapper, self._state(wrapper, "mask"))
        return (grid.sum(axis=0) > 0).astype("float32")

    def logs(self, wrapper):
        var = functools.partial(self._state, wrapper)
        support = np.asarray(ops.convert_to_numpy(var("support_posterior")), np.float64)
        prior = np.asarray(ops.convert_to_numpy(var("support_prior")), np.float64)
        return {
            "expected_sparsity": float(1.0 - support.mean()),
            "mean_support_prob": float(support.mean()),
            "mean_prior_prob": float(prior.mean()),
            "kl": float(ops.convert_to_numpy(self.kl_divergence(wrapper))),
            "turbo_iterations": int(ops.convert_to_numpy(var("turbo_iterations"))),
        }
