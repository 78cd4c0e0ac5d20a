"""Structures: how the weights of a kernel are grouped.

A group is kept or removed as a whole. Every structure works on the canonical
``[S, I, O]`` view of a kernel (see `tfprune.handlers`): ``S`` spatial taps,
``I`` input channels, ``O`` output units. It reduces a per-weight score tensor
to a 2-D *group grid* ``[A, B]`` and expands a group mask on that grid back to
the canonical shape. `KOutOfN` selects within runs of ``n`` consecutive groups
along axis 0 of the grid (the input dimension; for `Filter`, the units).

| structure | group grid | one group is |
|---|---|---|
| `Unstructured()` | ``[S*I, O]`` | one weight |
| `Kernel()` | ``[I, O]`` | one spatial kernel (for Dense: one weight) |
| `Filter()` | ``[O, 1]`` | one output unit (plus its bias / following BN) |
| `Block((bi, bo))` | ``[ceil(S*I/bi), ceil(O/bo)]`` | a ``bi x bo`` block of ``[fan_in, units]`` |
| `KOutOfN(k, n, of=X)` | the grid of ``X`` | a group of ``X``; at most k of every n kept |

`Block` pads a kernel whose ``fan_in`` or ``units`` is not a multiple of the
block: the last row/column of blocks is smaller (no error). `KOutOfN` pads the
run axis: a trailing run of ``m < n`` groups keeps ``min(k, m)`` of them.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from tfprune._utils import check_int, is_int

_PKG = "tfprune"


class Structure:
    """Base class: maps a canonical ``[S, I, O]`` kernel to groups and back.

    A subclass implements `grid_shape`, `reduce` and `expand` (and
    `get_config` when it has arguments) and is registered with Keras; every
    method can then use it.

    Example:
        >>> @keras.saving.register_keras_serializable(package="my_structures")
        ... class Row(Structure):
        ...     \"\"\"One fan-in row across all units (an input feature of a Dense layer).\"\"\"
        ...     def grid_shape(self, canon_shape):
        ...         s, i, o = canon_shape
        ...         return s * i, 1
        ...     def reduce(self, scores):
        ...         s, i, o = scores.shape
        ...         return ops.sum(ops.reshape(scores, (s * i, o)), axis=1, keepdims=True)
        ...     def expand(self, group_mask, canon_shape):
        ...         return ops.broadcast_to(ops.reshape(group_mask, canon_shape[:2] + (1,)),
        ...                                 canon_shape)
        >>> m = methods.Magnitude(0.5, structure=Row())
    """

    #: True when a removed group empties whole output units (bias is masked too).
    removes_units = False

    def grid_shape(self, canon_shape):
        """Shape ``(A, B)`` of the group grid for a canonical kernel shape."""
        raise NotImplementedError

    def reduce(self, scores):
        """Sums per-weight ``scores`` ``[S, I, O]`` over each group -> ``[A, B]``."""
        raise NotImplementedError

    def expand(self, group_mask, canon_shape):
        """Expands a ``[A, B]`` group mask to the canonical kernel shape."""
        raise NotImplementedError

    def group_sizes(self, canon_shape):
        """Number of weights in each group, ``[A, B]`` (float)."""
        return self.reduce(ops.ones(canon_shape, "float32"))

    def validate(self, canon_shape, *, layer_name="?", kernel_name="kernel"):
        """Raises a ValueError if the structure cannot be applied to this kernel."""

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self).__name__, repr(sorted(self.get_config().items()))))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package=_PKG)
class Unstructured(Structure):
    """Each weight is its own group.

    Example:
        >>> from tfprune import methods, structures
        >>> m = methods.Magnitude(0.9, structure=structures.Unstructured())
    """

    def grid_shape(self, canon_shape):
        s, i, o = canon_shape
        return s * i, o

    def reduce(self, scores):
        s, i, o = scores.shape
        return ops.reshape(scores, (s * i, o))

    def expand(self, group_mask, canon_shape):
        return ops.reshape(group_mask, canon_shape)


@keras.saving.register_keras_serializable(package=_PKG)
class Kernel(Structure):
    """One spatial kernel (all taps from one input channel to one output channel).

    For Dense layers a "kernel" is a single weight, so `Kernel()` behaves
    exactly like `Unstructured()` there. For depthwise kernels, each output
    channel has one kernel, so it removes whole depthwise channels (without
    their bias: use `Filter()` for that).

    Example:
        >>> m = methods.Magnitude(0.5, structure=structures.Kernel())
    """

    def grid_shape(self, canon_shape):
        _, i, o = canon_shape
        return i, o

    def reduce(self, scores):
        return ops.sum(scores, axis=0)

    def expand(self, group_mask, canon_shape):
        return ops.broadcast_to(group_mask[None], canon_shape)


@keras.saving.register_keras_serializable(package=_PKG)
class Filter(Structure):
    """One output unit: a Dense neuron or a convolution filter.

    The unit's bias is masked too, and a BatchNormalization that directly
    follows gets its scale and offset masked, so a pruned unit outputs exactly
    zero and `tfprune.shrink` can remove it.

    Args:
        round_to: the number of units each layer keeps is a multiple of
            ``round_to`` (or all of them), so that a shrunk layer keeps a
            SIMD-friendly width (e.g. 4 or 8 for LiteRT's XNNPACK kernels).
            The kept count is rounded to the nearest multiple (at least one
            multiple).

    Example:
        >>> m = methods.Magnitude(0.5, structure=structures.Filter())
        >>> m = methods.Magnitude(0.5, structure=structures.Filter(round_to=8))
    """

    removes_units = True

    def __init__(self, round_to=1):
        self.round_to = check_int(round_to, "round_to", owner="Filter", minimum=1)

    def get_config(self):
        return {"round_to": self.round_to} if self.round_to != 1 else {}

    def round_keep(self, keep, total):
        """The number of units to keep: ``keep`` rounded to a multiple of `round_to`, or all.

        Example:
            >>> structures.Filter(round_to=8).round_keep(13, 64)
            16
            >>> structures.Filter(round_to=8).round_keep(13, 14)
            14
        """
        keep, total = int(keep), int(total)
        if self.round_to == 1 or keep >= total:
            return min(keep, total)
        keep = self.round_to * max(1, int(math.floor(keep / self.round_to + 0.5)))
        return min(keep, total)

    def grid_shape(self, canon_shape):
        return canon_shape[2], 1

    def reduce(self, scores):
        return ops.sum(scores, axis=(0, 1))[:, None]

    def expand(self, group_mask, canon_shape):
        return ops.broadcast_to(ops.reshape(group_mask, (1, 1, -1)), canon_shape)


@keras.saving.register_keras_serializable(package=_PKG)
class Block(Structure):
    """A ``(bi, bo)`` block of the kernel seen as a ``[fan_in, units]`` matrix.

    ``fan_in`` is ``S*I`` (all taps of all input channels, input channel
    fastest). ``Block((4, 1))`` is the block LiteRT's sparse fully-connected
    kernel can skip. A kernel whose ``fan_in`` (or ``units``) is not a multiple
    of the block is padded: the last blocks are smaller.

    Args:
        shape: ``(bi, bo)``, positive ints.

    Example:
        >>> m = methods.Magnitude(0.9, structure=structures.Block((4, 1)))
    """

    def __init__(self, shape=(4, 1)):
        ok = isinstance(shape, (tuple, list)) and len(shape) == 2 and all(
            is_int(d) and d >= 1 for d in shape)
        if not ok:
            raise ValueError(
                f"Block: `shape` must be a pair (bi, bo) of positive ints, got {shape!r}.")
        self.shape = tuple(int(d) for d in shape)

    def get_config(self):
        return {"shape": list(self.shape)}

    def grid_shape(self, canon_shape):
        s, i, o = canon_shape
        return math.ceil(s * i / self.shape[0]), math.ceil(o / self.shape[1])

    def reduce(self, scores):
        s, i, o = scores.shape
        bi, bo = self.shape
        a, b = self.grid_shape((s, i, o))
        m = ops.reshape(scores, (s * i, o))
        m = ops.pad(m, [(0, a * bi - s * i), (0, b * bo - o)])
        m = ops.reshape(m, (a, bi, b, bo))
        return ops.sum(m, axis=(1, 3))

    def expand(self, group_mask, canon_shape):
        s, i, o = canon_shape
        bi, bo = self.shape
        m = ops.repeat(ops.repeat(group_mask, bi, axis=0), bo, axis=1)
        return ops.reshape(m[: s * i, :o], canon_shape)


@keras.saving.register_keras_serializable(package=_PKG)
class KOutOfN(Structure):
    """At most ``k`` groups kept in every run of ``n`` consecutive groups.

    Runs go along the input dimension (axis 0 of the group grid of ``of``):
    for ``of=Unstructured()`` along each unit's fan-in (2:4 sparsity), for
    ``of=Kernel()`` along the input channels of each filter, for
    ``of=Filter()`` along the layer's units. A trailing run shorter than
    ``n`` keeps ``min(k, len)`` groups.

    Args:
        k: groups kept per run, ``1 <= k <= n``.
        n: run length.
        of: the base structure (not another `KOutOfN`).

    Example:
        >>> s = structures.KOutOfN(2, 4)                       # 2:4 weights
        >>> s = structures.KOutOfN(1, 4, of=structures.Kernel())
    """

    def __init__(self, k, n, of=None):
        n = check_int(n, "n", owner="KOutOfN", minimum=1)
        k = check_int(k, "k", owner="KOutOfN", minimum=1)
        if k > n:
            raise ValueError(f"KOutOfN: `k` must satisfy 1 <= k <= n (n={n}), got k={k}.")
        of = get(of) if of is not None else Unstructured()
        if isinstance(of, KOutOfN):
            raise ValueError("KOutOfN: `of` must be a base structure, not another KOutOfN.")
        self.k, self.n, self.of = k, n, of
        self.removes_units = of.removes_units

    def get_config(self):
        return {"k": self.k, "n": self.n, "of": serialize(self.of)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["of"] = get(config["of"])
        return cls(**config)

    def grid_shape(self, canon_shape):
        return self.of.grid_shape(canon_shape)

    def reduce(self, scores):
        return self.of.reduce(scores)

    def expand(self, group_mask, canon_shape):
        return self.of.expand(group_mask, canon_shape)

    def __repr__(self):
        return f"KOutOfN(k={self.k}, n={self.n}, of={self.of!r})"

    @property
    def keep_fraction(self):
        return self.k / self.n


ALL = {
    "unstructured": Unstructured,
    "kernel": Kernel,
    "filter": Filter,
    "block": Block,
    "k_out_of_n": KOutOfN,
}
# Names whose class must be given as an instance: its arguments have no meaningful default.
_NEEDS_ARGUMENTS = ("block", "k_out_of_n")


def serialize(structure):
    """The config dict of ``structure`` (``keras.saving.serialize_keras_object``), for `get`."""
    return keras.saving.serialize_keras_object(structure)


def get(identifier):
    """Resolves None, a structure instance, name or config dict (the shared ``get()`` rules).

    The rules are those of `tfprune.methods.get` and `tfprune.schedules.get`.

    Args:
        identifier: None (`Unstructured()`, the default structure of every
            method); a `Structure` (returned as is); a name of `ALL` (case,
            ``-`` and ``_`` do not matter): ``"unstructured"``, ``"kernel"``
            and ``"filter"`` build the class with its default arguments,
            ``"block"`` and ``"k_out_of_n"`` are errors (give
            ``Block(shape)`` / ``KOutOfN(k, n)``); or a config dict from
            ``keras.saving.serialize_keras_object(structure)``.

    Returns:
        A `Structure`.

    Raises:
        ValueError: an unknown name (the message lists the allowed ones), the
            name of a structure that needs arguments, or a config dict that
            cannot be deserialized.
        TypeError: any other type, a class instead of an instance, or a config
            dict of something that is not a `Structure`.

    Example:
        >>> structures.get("filter")
        Filter()
        >>> structures.get("K-Out-Of-N")  # doctest: +SKIP
        ValueError: `structure`='K-Out-Of-N' names KOutOfN, which needs arguments: ...
    """
    from tfprune._utils import resolve_identifier

    return resolve_identifier(
        identifier, argument="structure", base=Structure, names=ALL,
        kind="a tfprune.structures.Structure", example="structures.Filter()",
        prefix="structures.",
        needs_arguments=_NEEDS_ARGUMENTS, none=Unstructured, none_means="= Unstructured()")


# ---------------------------------------------------------------------------
# Selection helpers shared by the methods.


def top_fraction_mask(scores, keep):
    """Mask of exactly ``keep`` largest entries of ``scores`` (any shape)."""
    flat = ops.reshape(scores, (-1,))
    size = int(flat.shape[0])
    keep = int(max(0, min(size, keep)))
    if keep == size:
        return ops.ones_like(scores)
    if keep == 0:
        return ops.zeros_like(scores)
    _, idx = ops.top_k(flat, keep, sorted=False)
    mask = ops.scatter(ops.expand_dims(idx, -1), ops.ones((keep,), scores.dtype), (size,))
    return ops.reshape(mask, scores.shape)


def k_of_n_mask(scores, k, n):
    """Keeps the ``k`` largest of every run of ``n`` along axis 0 of ``[A, B]``."""
    a, b = scores.shape
    runs = math.ceil(a / n)
    pad = runs * n - a
    neg = ops.min(scores) - 1.0
    x = ops.pad(scores, [(0, pad), (0, 0)], constant_values=neg) if pad else scores
    x = ops.transpose(ops.reshape(x, (runs, n, b)), (0, 2, 1))  # [runs, B, n]
    _, idx = ops.top_k(x, k)
    mask = ops.sum(ops.one_hot(idx, n, dtype=scores.dtype), axis=-2)  # [runs, B, n]
    mask = ops.reshape(ops.transpose(mask, (0, 2, 1)), (runs * n, b))
    return mask[:a]


def select_groups(structure, group_scores, sparsity):
    """Group mask on the grid: exact k-of-n for `KOutOfN`, else the exact sparsity.

    The number of removed groups is ``round(sparsity * num_groups)`` (for
    `Filter` with ``round_to > 1``, the kept count is then rounded with
    `Filter.round_keep`).
    """
    if isinstance(structure, KOutOfN):
        return k_of_n_mask(group_scores, structure.k, structure.n)
    total = math.prod(group_scores.shape)
    keep = total - int(round(sparsity * total))
    if isinstance(structure, Filter):
        keep = structure.round_keep(keep, total)
    return top_fraction_mask(group_scores, keep)
