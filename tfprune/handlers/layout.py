"""Kernel layouts: where the input channels and the output units of a kernel are.

Every prunable kernel is viewed in a *canonical* 3-D layout ``[S, I, O]``:
``S`` spatial taps (1 for Dense), ``I`` input channels feeding one output and
``O`` output channels. The pruning side (structures, masks, the report) works
on that view; the surgery side (`shrink`) slices the stored kernel along the
axes `kernel_axes` names. Both read the layout from the same `KernelSpec`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from keras import ops

STANDARD = "standard"  # [*spatial, in, out]
TRANSPOSED = "transposed"  # [*spatial, out, in] (ConvXDTranspose)
DEPTHWISE = "depthwise"  # [*spatial, channels, multiplier]
LAYOUTS = (STANDARD, TRANSPOSED, DEPTHWISE)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One prunable kernel of a layer.

    Attributes:
        name: attribute name of the variable on the layer (``"kernel"``); the
            surgery side finds the variable by this name too, so it must also
            be the variable's own name (what ``add_weight(name=...)`` gives).
        layout: one of ``"standard"``, ``"transposed"``, ``"depthwise"``.
        produces_units: True for the kernel whose output axis is the layer's
            units (the one `Filter` pruning acts on, together with the bias).
    """

    name: str
    layout: str = STANDARD
    produces_units: bool = True

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"KernelSpec '{self.name}': unknown layout {self.layout!r}; "
                             f"allowed: {', '.join(map(repr, LAYOUTS))}.")


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown kernel layout {layout!r}.")


def kernel_axes(layout):
    """``(input-channel axis, output axis)`` of a kernel in ``layout``, from the end.

    For ``"depthwise"`` the output axis is the depth multiplier: output unit
    ``c * multiplier + j`` is input channel ``c``, multiplier ``j``.
    """
    _check_layout(layout)
    return (-1, -2) if layout == TRANSPOSED else (-2, -1)


def canonical_shape(shape, layout):
    """Returns ``(S, I, O)`` for a kernel of ``shape`` in ``layout``."""
    _check_layout(layout)
    shape = tuple(int(d) for d in shape)
    s = math.prod(shape[:-2]) if len(shape) > 2 else 1
    if layout == DEPTHWISE:
        return s, 1, shape[-2] * shape[-1]
    in_axis, out_axis = kernel_axes(layout)
    return s, shape[in_axis], shape[out_axis]


def _swap_last_two(rank):
    return list(range(rank - 2)) + [rank - 1, rank - 2]


def to_canonical(kernel, layout):
    """Reshapes (and transposes) a kernel tensor to ``[S, I, O]``."""
    shape = tuple(kernel.shape)
    if layout == TRANSPOSED:
        kernel = ops.transpose(kernel, _swap_last_two(len(shape)))
    return ops.reshape(kernel, canonical_shape(shape, layout))


def from_canonical(canon, shape, layout):
    """Inverse of `to_canonical` for a kernel of ``shape``."""
    shape = tuple(int(d) for d in shape)
    if layout == TRANSPOSED:
        permuted = shape[:-2] + (shape[-1], shape[-2])
        return ops.transpose(ops.reshape(canon, permuted), _swap_last_two(len(shape)))
    return ops.reshape(canon, shape)


def canonical_numpy(kernel, layout):
    """`to_canonical` on a numpy array (keeps its dtype, e.g. float64)."""
    kernel = np.asarray(kernel)
    shape = kernel.shape
    if layout == TRANSPOSED:
        kernel = np.transpose(kernel, _swap_last_two(len(shape)))
    return kernel.reshape(canonical_shape(shape, layout))


def slice_kernel(kernel, layout, in_mask=None, out_mask=None):
    """Keep the input channels ``in_mask`` and output units ``out_mask`` of a numpy kernel.

    Args:
        kernel: the stored kernel (numpy), in ``layout``.
        layout: its layout.
        in_mask: bool array over the input channels (None: keep all).
        out_mask: bool array over the output units (None: keep all); not
            allowed for ``"depthwise"`` (its units go with their input channel).

    Returns:
        The smaller kernel, in the same layout.
    """
    in_axis, out_axis = kernel_axes(layout)
    if out_mask is not None and layout == DEPTHWISE:
        raise ValueError("slice_kernel: a depthwise kernel is sliced by its input channels "
                         "only (out_mask must be None).")
    out = np.asarray(kernel)
    if in_mask is not None:
        out = np.compress(in_mask, out, axis=in_axis)
    if out_mask is not None:
        out = np.compress(out_mask, out, axis=out_axis)
    return out
