"""Handler of element-wise operation nodes (`x + 3.0`, `keras.ops.relu6(x)`, `x * y`).

A Functional model built from plain tensor operations (like MobileNetV3's
hard sigmoid) has `keras.Operation` nodes without weights; the graph follows
the element-wise ones and `shrink` slices their per-channel constants.
"""

from __future__ import annotations

import keras
import numpy as np

from tfprune.handlers.base import Stop
from tfprune.handlers.channels import ChannelHandler

# Element-wise operations that appear as nodes of a Functional model when a model
# is built from plain tensor operations (`x + 3.0`, `keras.ops.relu6(x)`, ...).
UNARY_OPS = (
    "relu", "relu6", "sigmoid", "hard_sigmoid", "silu", "hard_silu", "gelu", "elu", "selu",
    "celu", "leaky_relu", "softplus", "softsign", "log_sigmoid", "sparse_plus", "squareplus",
    "tanh_shrink", "soft_shrink", "hard_shrink", "hard_tanh", "tanh", "sin", "cos", "abs",
    "absolute", "negative", "square", "sqrt", "exp", "expm1", "sign", "floor", "ceil",
    "round", "erf", "clip", "cast", "copy", "stop_gradient",
)
BINARY_OPS = ("add", "subtract", "multiply", "divide", "true_divide", "maximum", "minimum",
              "power")


def _op_classes():
    """{operation class: name} for the element-wise `keras.ops` functions, found by tracing."""
    x = keras.KerasTensor((None, 4))
    found = {}
    for names, make in ((UNARY_OPS, lambda fn: fn(x)), (BINARY_OPS, lambda fn: fn(x, x))):
        for name in names:
            fn = getattr(keras.ops, name, None)
            if fn is None:
                continue
            try:
                if name == "clip":
                    y = fn(x, 0.0, 1.0)
                elif name == "cast":
                    y = fn(x, "float32")
                else:
                    y = make(fn)
                op = y._keras_history[0]
            except Exception:  # noqa: BLE001 - an op this Keras version lacks or builds otherwise
                continue
            if not isinstance(op, keras.layers.Layer):
                found.setdefault(type(op), name)
    return found


class ElementwiseOp(ChannelHandler):
    """A Keras operation node applied element by element (`x + 3.0`, `relu6(x)`, `x * y`).

    Tensor inputs must have the output's channel count (their channels are
    coupled, like `Add`); other arguments must be constants that are scalars or
    have one value per channel (sliced by `shrink`). Constants are propagated by
    running the operation on them.
    """

    def _constants(self, node):
        consts = []
        for v in keras.tree.flatten((node.arguments.args, node.arguments.kwargs)):
            if isinstance(v, keras.KerasTensor) or v is None or isinstance(v, (str, bool)):
                continue
            consts.append(v)
        return consts

    def propagate(self, g, op, inputs, node):
        if len(node.output_tensors) != 1:
            raise Stop("more than one output")
        out = node.output_tensors[0].shape
        n = out[-1]
        for x in inputs:
            if len(x.slots) != n:
                raise Stop(f"broadcasts an input of {len(x.slots)} channels to {n}")
        for v in self._constants(node):
            shape = np.shape(v)
            if len(shape) > len(out) or (shape and shape[-1] not in (1, n)):
                raise Stop(f"a constant of shape {shape} does not broadcast per channel")
        for x in inputs[1:]:
            g.union(inputs[0].slots, x.slots)
        return [(inputs[0].slots, self._const(op, inputs, node, len(out)))]

    def _const(self, op, inputs, node, rank):
        n = len(inputs[0].slots)
        known = np.ones(n, bool)
        values = {}
        for t, x in zip(node.input_tensors, inputs, strict=True):
            known &= ~np.isnan(x.const)
            values[id(t)] = np.where(np.isnan(x.const), 0.0, x.const).astype("float32").reshape(
                (1,) * (rank - 1) + (n,))
        if not known.any():
            return np.full(n, np.nan)
        try:
            args, kwargs = node.arguments.fill_in(values)
            y = np.asarray(keras.ops.convert_to_numpy(op(*args, **kwargs)), np.float64)
        except Exception:  # noqa: BLE001 - an op that cannot run on constants: not constant
            return np.full(n, np.nan)
        if y.size != n:  # a constant that varies over positions
            return np.full(n, np.nan)
        y = y.reshape(-1)
        if OP_NAMES.get(type(op)) == "multiply":  # a zero factor makes the product zero
            zero = np.zeros(n, bool)
            for x in inputs:
                zero |= x.const == 0
            known |= zero
            y = np.where(zero, 0.0, y)
        return np.where(known & np.isfinite(y), y, np.nan)

    def shrink_arguments(self, op, args, kwargs, masks):
        """Slice the per-channel constants of the call to the kept channels."""
        mask = masks.outputs[0]
        if mask is None or mask.all():
            return args, kwargs

        def cut(v):
            if isinstance(v, keras.KerasTensor) or v is None or isinstance(v, (str, bool)):
                return v
            if np.ndim(v) and np.shape(v)[-1] == len(mask) and len(mask) > 1:
                return np.asarray(v)[..., mask]
            return v

        return keras.tree.map_structure(cut, (args, kwargs))


OP_NAMES = _op_classes()

