"""`sparsity_report`: per-layer parameters, sparsity, kept units and FLOPs."""

from __future__ import annotations

import dataclasses
import math
import warnings

import keras
import numpy as np

from tfprune import handlers
from tfprune._utils import iter_layers
from tfprune.handlers import TRANSPOSED, to_canonical
from tfprune.wrapper import PruneWrapper


@dataclasses.dataclass
class Report:
    """The result of `sparsity_report`.

    Attributes:
        rows: one dict per prunable layer with the keys ``layer``, ``type``,
            ``params`` (kernel and bias weights), ``nonzero``, ``sparsity``,
            ``units``, ``units_kept``, ``flops`` (2 x multiply-adds of one
            sample, dense), ``flops_kept`` (counting only nonzero weights),
            ``flops_shrunk`` (after `tfprune.shrink`, see below),
            and the regularity of the zeros: ``zeros_in_units`` (fraction of
            the layer's zero kernel weights that lie in wholly removed units) and
            ``zeros_in_blocks`` (fraction lying in all-zero ``4x1`` blocks of
            the ``[fan_in, units]`` kernel matrix, a trailing partial block
            padded as `tfprune.structures.Block` does). Biases are not counted
            in these two fractions. ``nonfinite`` counts the NaN/Inf weights
            (kernels and bias).
        total: the same keys summed over the layers; ``sparsity`` is
            ``1 - nonzero/params``, the regularity fractions are weighted by
            each layer's zero kernel weights.

    ``flops_kept`` counts the nonzero weights of each layer; on a masked
    (not yet shrunk) model it does not subtract the inputs coming from a
    previous layer's removed units, so it understates what `tfprune.shrink`
    saves. ``flops_shrunk`` is what the layer costs once `tfprune.shrink`
    removed every unit whose kernel slice and bias are zero (in every layer
    writing the channel, where the dependency graph can remove it) and the
    inputs that read them: the FLOPs of the shrunk model, from the masks
    (None for a single layer, a subclassed model, or unknown spatial sizes).

    ``str(report)`` shows, besides the counts, the regularity columns
    "0s in units" and "0s in 4x1" (``zeros_in_units``, ``zeros_in_blocks``).

    Non-finite weights (NaN/Inf, e.g. after a diverged training) are never
    counted as zeros: they count as nonzero weights, a unit holding one is
    kept, `sparsity_report` warns (`RuntimeWarning`) and ``str(report)``
    ends with a line naming the layers that hold them.

    Example:
        >>> report = tfprune.sparsity_report(pruned)
        >>> print(report)                                  # a readable table
        >>> [(r["layer"], r["units_kept"], r["units"]) for r in report.rows]
        >>> report.total["sparsity"], report.total["zeros_in_units"]
    """

    rows: list
    total: dict

    def __str__(self):
        header = ["layer", "type", "params", "nonzero", "sparsity", "units", "FLOPs",
                  "FLOPs kept", "if shrunk", "0s in units", "0s in 4x1"]
        lines = []
        for r in self.rows + [self.total]:
            zeros = r["params"] != r["nonzero"]
            lines.append([
                str(r["layer"]), str(r["type"]), f"{r['params']:,}", f"{r['nonzero']:,}",
                f"{r['sparsity']:.1%}", f"{r['units_kept']}/{r['units']}",
                _human(r["flops"]), f"{_human(r['flops_kept'])} ({_ratio(r)})",
                _human(r.get("flops_shrunk")),
                f"{r['zeros_in_units']:.0%}" if zeros else "-",
                f"{r['zeros_in_blocks']:.0%}" if zeros else "-",
            ])
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
        sep = "-" * (sum(widths) + 2 * (len(widths) - 1))
        out = [fmt.format(*header), sep] + [fmt.format(*line) for line in lines[:-1]]
        out += [sep, fmt.format(*lines[-1])]
        bad = [f"{r['layer']} ({r['nonfinite']:,})" for r in self.rows if r.get("nonfinite")]
        if bad:
            out.append(f"non-finite (NaN/Inf) weights, counted as nonzero: {', '.join(bad)}")
        return "\n".join(out)

    def __repr__(self):
        return str(self)


def _human(n):
    if n is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _ratio(r):
    if not r["flops"]:
        return "-"
    return f"{r['flops_kept'] / r['flops']:.1%}"


def _effective(layer):
    """(plain layer, {variable name: effective numpy value}) for a wrapped or plain layer."""
    if isinstance(layer, PruneWrapper):
        inner = layer.layer
        values = dict(zip([id(v) for v in inner.weights], layer.masked_weights()))
    else:
        inner = layer
        values = {id(v): keras.ops.convert_to_numpy(v) for v in inner.weights}
    return inner, values


def _spatial(shape):
    dims = [d for d in shape[1:-1]]
    if any(d is None for d in dims):
        return None
    return math.prod(dims) if dims else 1


def _layer_row(layer):
    inner, values = _effective(layer)
    handler = handlers.get_handler(inner)
    params = nonzero = flops = flops_kept = nonfinite = 0
    zeros_units = zeros_blocks = kernel_zeros = 0
    try:
        out_spatial = _spatial(layer.output.shape)
        in_spatial = _spatial(layer.input.shape)
    except (AttributeError, ValueError):
        out_spatial = in_spatial = None
    unit_spec = handler.unit_spec()
    unit_alive = None
    for spec in handler.kernels:
        var = getattr(inner, spec.name)
        w = values[id(var)]
        canon = np.asarray(to_canonical(w, spec.layout))
        s, i, o = canon.shape
        params += canon.size
        nz = int(np.count_nonzero(canon))  # NaN != 0: a NaN weight is never a zero
        nonfinite += int(canon.size - np.count_nonzero(np.isfinite(canon)))
        nonzero += nz
        spatial = in_spatial if spec.layout == TRANSPOSED else out_spatial
        if spatial is not None:
            flops += 2 * spatial * canon.size
            flops_kept += 2 * spatial * nz
        zero = canon == 0
        mat = zero.reshape(s * i, o)
        if spec is unit_spec:
            unit_alive = ~zero.all(axis=(0, 1))
        zeros_units += int(mat[:, zero.all(axis=(0, 1))].sum())
        kernel_zeros += int(mat.sum())
        # 4x1 blocks of [fan_in, units]; a trailing partial block is padded (as `Block`).
        rows = -(-(s * i) // 4) * 4
        padded = np.ones((rows, o), bool)
        padded[: s * i] = mat
        zeros_blocks += int((mat & np.repeat(padded.reshape(-1, 4, o).all(axis=1), 4,
                                             axis=0)[: s * i]).sum())
    bias = getattr(inner, handler.bias or "", None) if handler.bias else None
    if bias is not None:
        b = values[id(bias)]
        params += b.size
        nonzero += int(np.count_nonzero(b))
        nonfinite += int(b.size - np.count_nonzero(np.isfinite(b)))
    units = int(unit_alive.size)
    zeros = kernel_zeros
    return {
        "layer": layer.name, "type": type(inner).__name__, "params": params, "nonzero": nonzero,
        "sparsity": 1.0 - nonzero / params if params else 0.0, "units": units,
        "units_kept": int(unit_alive.sum()), "flops": flops if out_spatial is not None else None,
        "flops_kept": flops_kept if out_spatial is not None else None,
        "zeros_in_units": zeros_units / zeros if zeros else 0.0,
        "zeros_in_blocks": zeros_blocks / zeros if zeros else 0.0,
        "nonfinite": nonfinite, "_zeros": zeros,
        # A unit shrink removes: all its kernel weights and its bias are zero.
        "_dead": ~unit_alive & ((b.reshape(-1) == 0) if bias is not None and b.size == units
                                else True),
    }


def sparsity_report(model):
    """Per-layer report of a pruned, stripped or shrunk model.

    Args:
        model: a `keras.Model` (with or without `PruneWrapper` layers) or a
            single layer.

    Returns:
        A `Report`; ``str(report)`` is a readable table.

    Example:
        >>> report = tfprune.sparsity_report(pruned)
        >>> print(report)
        >>> report.total["sparsity"]
    """
    layers = [model] if not isinstance(model, keras.Model) else list(iter_layers(model))
    rows = []
    for layer in layers:
        inner = layer.layer if isinstance(layer, PruneWrapper) else layer
        if handlers.get_handler(inner) is None or not inner.built:
            continue
        rows.append(_layer_row(layer))
    if not rows:
        raise ValueError(f"sparsity_report: '{model.name}' has no prunable layer "
                         f"({', '.join(handlers.supported_layer_types())}).")
    total = {"layer": "total", "type": ""}
    for key in ("params", "nonzero", "units", "units_kept", "nonfinite"):
        total[key] = sum(r[key] for r in rows)
    for key in ("flops", "flops_kept"):
        vals = [r[key] for r in rows]
        total[key] = None if any(v is None for v in vals) else sum(vals)
    total["sparsity"] = 1.0 - total["nonzero"] / total["params"] if total["params"] else 0.0
    zeros = sum(r["_zeros"] for r in rows)
    for key in ("zeros_in_units", "zeros_in_blocks"):
        total[key] = sum(r[key] * r["_zeros"] for r in rows) / zeros if zeros else 0.0
    _add_shrunk_flops(model, rows)
    vals = [r["flops_shrunk"] for r in rows]
    total["flops_shrunk"] = None if any(v is None for v in vals) else sum(vals)
    for r in rows:
        del r["_zeros"], r["_dead"]
    if total["nonfinite"]:
        bad = ", ".join(f"'{r['layer']}' ({r['nonfinite']})" for r in rows if r["nonfinite"])
        warnings.warn(f"sparsity_report: non-finite (NaN/Inf) weights in {bad}; they are "
                      "counted as nonzero (never as pruned zeros). Training diverged or "
                      "the data held NaN/Inf.", RuntimeWarning, stacklevel=2)
    return Report(rows=rows, total=total)


def _add_shrunk_flops(model, rows):
    """Sets each row's ``flops_shrunk``: its FLOPs once `tfprune.shrink` removed the dead units.

    A channel goes when every layer writing it has a dead unit there (zero
    kernel slice and bias) and the dependency graph can remove it
    (`tfprune.budgets.CostModel`); the layers reading it lose the matching
    inputs. None where the graph or the spatial sizes are unknown.
    """
    for r in rows:
        r["flops_shrunk"] = None
    if not isinstance(model, keras.Model):
        return
    from tfprune.budgets import CostModel

    try:
        cm = CostModel(model, "flops")
    except (TypeError, ValueError):  # subclassed model, unknown spatial size
        return
    dead = {r["layer"]: r["_dead"] for r in rows}
    for gi, g in enumerate(cm.graph.groups):
        if g.blocked_reason is not None:
            continue
        gone = np.ones(g.size, bool)
        for layer, idx in g.producers:
            unit_dead = dead.get(layer.name)
            if unit_dead is None:
                gone[:] = False
                break
            gone &= np.asarray(unit_dead)[np.asarray(idx)]
        for c in np.flatnonzero(gone):
            cm.remove(gi, int(c))
    for r in rows:
        rec = cm.layers.get(r["layer"])
        if rec is not None and r["flops"] is not None:
            r["flops_shrunk"] = int(round(rec.cost()))


def layer_sparsity(layer):
    """Fraction of zero weights (kernels and bias) of one wrapped or plain layer."""
    row = _layer_row(layer)
    return row["sparsity"]


__all__ = ["Report", "sparsity_report", "layer_sparsity"]
