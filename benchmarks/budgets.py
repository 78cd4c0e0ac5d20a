"""Pruning to a whole-model budget (issue 12): FLOPs targets, ``round_to``, Taylor, latency.

Usage (from the repository root)::

    python -m benchmarks.budgets [--quick] [--parts mobilenet,round_to,taylor,latency]
                                 [--out benchmarks/results] [--render]

Parts (all ratios of a part are measured in the same run: the dense model is
timed in the same interleaved LiteRT rounds as its pruned versions):

- ``mobilenet``: ``keras.applications.MobileNetV2(alpha=0.35, 96x96x3,
  weights=None, classes=10)`` (random weights: latency and FLOPs only),
  ``prune(model, Magnitude(structure=Filter()), budget=budgets.FLOPs(0.5))``
  (``schedule=None``), two fit steps on random data with
  `tfprune.callbacks.Pruning`, `tfprune.strip`, `tfprune.shrink`: shrunk /
  dense FLOPs (`tfprune.sparsity_report`) and LiteRT float32 single-thread
  latency, dense vs shrunk; the same with ``Filter(round_to=8)``. Goal
  (issue 12): FLOPs <= 0.52x and speed-up >= 0.7x the FLOPs reduction.
- ``round_to``: the same pipeline at FLOPs budgets 0.5 and 0.3 with
  ``round_to`` 1, 4 and 8, on that MobileNetV2 and on a VGG-style CNN with
  BatchNormalization (32x32x3, two conv-BN-ReLU per stage, 32-64-128): shrunk
  FLOPs, latency vs dense, and whether every shrunk width is a multiple of
  ``round_to`` (or the full width).
- ``taylor``: `methods.Taylor` vs `methods.Magnitude` (both ``Filter()``) at
  FLOPs budgets 0.5, 0.3 and 0.15 on LeNet-5 (`tfprune.models.lenet5`,
  `tfprune.datasets.load_mnist`) and on a small CIFAR-10 CNN (conv-BN-ReLU
  32-64-128, one per stage; `tfprune.datasets.load_cifar10`: the shared 10k
  train subset and the full test set, from ``TFPRUNE_DATA_DIR`` or
  ``../shared/data``). One dense training, then every row starts from its
  weights and fine-tunes the same way: a `schedules.PolynomialDecay` that
  only times the budget (it is reached after one epoch), then more epochs of
  fine-tuning; seeds 0 and 1. Also ``normalize="none"`` and ``"cost"`` vs the
  default ``"mean"`` for Magnitude at FLOPs 0.3. Test accuracy of the shrunk
  model, its FLOPs and its LiteRT latency.
- ``latency``: ``budgets.Latency(0.4)`` on the VGG-style CNN (random weights):
  the latency predicted by `tfprune.latency.LatencyTable` for the shrunk
  widths vs the median measured in the same run. Goal: <= 0.45x the dense
  median. Recorded as "not available" when ``tfprune.budgets.Latency`` does
  not exist.

``--quick`` is a tiny version for the tests (a few hundred samples, short
epochs, fewer variants, few latency runs) written to ``budgets_quick.*``;
the default is the real run, written to ``budgets.json``, ``budgets.md``,
``budgets_accuracy.png`` and ``budgets_round_to.png``. ``--parts`` runs a
subset and replaces only those parts of an existing JSON (each part keeps its
own commit, date and command). ``--render`` only redraws the markdown and the
plots from the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

from benchmarks import common
from benchmarks.architectures import git_commit

PARTS = ("mobilenet", "round_to", "taylor", "latency")
FIT_STEPS, FIT_BATCH = 2, 4  # the random-data fit of the latency parts


@dataclasses.dataclass
class Settings:
    """What one mode runs (recorded in the JSON)."""

    latency_runs: int = 100
    latency_rounds: int = 3
    mobilenet_round_to: tuple = (1, 8)
    round_to_models: tuple = ("mobilenet_v2", "vgg")
    round_to_keeps: tuple = (0.5, 0.3)
    round_to_values: tuple = (1, 4, 8)
    taylor_models: tuple = ("lenet5", "cifar_cnn")
    taylor_keeps: tuple = (0.5, 0.3, 0.15)
    seeds: tuple = (0, 1)
    norm_keep: float = 0.3
    norms: tuple = ("none", "cost")
    max_train: int | None = None
    max_test: int | None = None
    pretrain: dict = dataclasses.field(default_factory=lambda: {"lenet5": 3, "cifar_cnn": 8})
    prune_epochs: int = 1
    finetune: int = 3
    batch_size: int = 64
    lr_pretrain: float = 1e-3
    lr_finetune: float = 5e-4
    latency_keep: float = 0.4
    latency_table_runs: int = 50
    latency_fractions: tuple = (1.0, 0.75, 0.5, 0.25, 0.125)


MODES = {
    "full": Settings(),
    "quick": Settings(latency_runs=20, latency_rounds=1, round_to_models=("vgg",),
                      round_to_keeps=(0.5,), round_to_values=(1, 8), taylor_keeps=(0.3,),
                      seeds=(0,), max_train=256, max_test=500,
                      pretrain={"lenet5": 1, "cifar_cnn": 1}, finetune=2,
                      latency_table_runs=5, latency_fractions=(1.0, 0.5)),
}

# -- models -------------------------------------------------------------------------------------


def mobilenet_v2():
    """`keras.applications.MobileNetV2`, alpha 0.35, 96x96x3, random weights, 10 classes."""
    import keras

    return keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights=None,
                                          classes=10)


def _conv_bn(x, filters, name):
    import keras

    L = keras.layers
    x = L.Conv2D(filters, 3, padding="same", use_bias=False, name=name)(x)
    x = L.BatchNormalization(name=name + "_bn")(x)
    return L.ReLU(name=name + "_relu")(x)


def vgg():
    """VGG-style CNN, 32x32x3: two conv-BN-ReLU per stage (32, 64, 128), max pooling, GAP."""
    import keras

    L = keras.layers
    x = inp = keras.Input((32, 32, 3))
    for i, filters in enumerate((32, 64, 128)):
        x = _conv_bn(x, filters, f"conv{i + 1}a")
        x = _conv_bn(x, filters, f"conv{i + 1}b")
        x = L.MaxPooling2D(name=f"pool{i + 1}")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, L.Dense(10, name="out")(x), name="vgg")


def cifar_cnn():
    """Small CIFAR-10 CNN (logits): conv-BN-ReLU 32, 64, 128, each with max pooling, Flatten."""
    import keras

    L = keras.layers
    x = inp = keras.Input((32, 32, 3))
    for i, filters in enumerate((32, 64, 128)):
        x = _conv_bn(x, filters, f"conv{i + 1}")
        x = L.MaxPooling2D(name=f"pool{i + 1}")(x)
    x = L.Flatten(name="flatten")(x)
    return keras.Model(inp, L.Dense(10, name="out")(x), name="cifar_cnn")


def lenet5():
    """`tfprune.models.lenet5` (logits)."""
    import tfprune

    return tfprune.models.lenet5()


BUILDERS = {"mobilenet_v2": mobilenet_v2, "vgg": vgg, "cifar_cnn": cifar_cnn, "lenet5": lenet5}
TITLES = {
    "mobilenet_v2": "MobileNetV2 (alpha 0.35, 96x96x3)",
    "vgg": "VGG-style CNN with BN (32x32x3, 2x conv per stage, 32-64-128)",
    "cifar_cnn": "CIFAR-10 CNN (conv-BN-ReLU 32-64-128)",
    "lenet5": "LeNet-5 (MNIST)",
}


def build(name, seed=0):
    """A freshly seeded model of `BUILDERS`."""
    import keras

    keras.utils.set_random_seed(seed)
    return BUILDERS[name]()


# -- the random-data pipeline (latency parts) ---------------------------------------------------


def _random_fit(pruned, model):
    """Two fit steps on random data with the Pruning callback (latency parts: weights random)."""
    import keras
    import numpy as np

    import tfprune

    rng = np.random.default_rng(0)
    n = FIT_STEPS * FIT_BATCH
    x = rng.uniform(0, 1, size=(n, *model.inputs[0].shape[1:])).astype("float32")
    y = rng.integers(0, model.outputs[0].shape[-1], size=n)
    softmax = getattr(model.layers[-1], "activation", None) is keras.activations.softmax
    pruned.compile(optimizer="sgd",
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not softmax))
    pruned.fit(x, y, batch_size=FIT_BATCH, epochs=1, verbose=0,
               callbacks=[tfprune.callbacks.Pruning()])


def widths(model):
    """``{layer: units}`` of every layer tfprune can prune (a flat model)."""
    from tfprune import handlers

    out = {}
    for layer in model.layers:
        handler = handlers.get_handler(layer)
        if handler is not None:
            out[layer.name] = int(handler.num_units(layer))
    return out


def not_multiples(dense_widths, shrunk_widths, round_to):
    """Layers whose shrunk width is neither the full width nor a multiple of ``round_to``."""
    return {name: [units, dense_widths[name]] for name, units in shrunk_widths.items()
            if name in dense_widths and units != dense_widths[name] and units % round_to}


def budget_variant(name, budget, round_to=1):
    """Builds model ``name``, prunes it to ``budget`` (Magnitude, Filter), shrinks it.

    Returns:
        ``(dense, small, info)``: the dense and the shrunk model and a dict of
        their FLOPs, parameters and widths (``info["pruned"]``: the pruned model,
        not saved in the JSON).
    """
    import tfprune
    from tfprune import methods, structures

    dense = build(name)
    pruned = tfprune.prune(dense, methods.Magnitude(structure=structures.Filter(round_to=round_to)),
                           budget=budget)
    _random_fit(pruned, dense)
    small = tfprune.shrink(tfprune.strip(pruned))
    flops_dense = tfprune.sparsity_report(dense).total["flops"]
    flops_shrunk = tfprune.sparsity_report(small).total["flops"]
    dw, sw = widths(dense), widths(small)
    info = {"model": name, "round_to": round_to, "flops_dense": flops_dense,
            "flops_shrunk": flops_shrunk, "flops_ratio": flops_shrunk / flops_dense,
            "params_dense": int(dense.count_params()), "params_shrunk": int(small.count_params()),
            "widths": {k: [sw[k], dw[k]] for k in sw if k in dw and sw[k] != dw[k]},
            "not_multiples": not_multiples(dw, sw, round_to)}
    return dense, small, dict(info, pruned=pruned)


def _measure(blobs, settings):
    return common.measure_latencies(blobs, runs=settings.latency_runs,
                                    rounds=settings.latency_rounds, threads=1)


def _latency_rows(rows, blobs, settings):
    """Measures the blobs (``"dense"`` among them) and adds latency and ratios to ``rows``."""
    lat = _measure(blobs, settings)
    dense = lat["dense"]["median_us"]
    for row in rows:
        m = lat[row["key"]]
        row["latency_us"] = m["median_us"]
        row["latency_range_us"] = [m["min_us"], m["max_us"]]
        row["latency_ratio"] = m["median_us"] / dense
        row["speedup"] = dense / m["median_us"]
        row["flops_reduction"] = 1.0 / row["flops_ratio"]
        row["efficiency"] = row["speedup"] / row["flops_reduction"]
    return dense


# -- parts --------------------------------------------------------------------------------------


def part_mobilenet(settings, log):
    """MobileNetV2 to FLOPs(0.5), round_to 1 and 8: FLOPs and LiteRT speed-up."""
    import keras

    import tfprune
    from tfprune import budgets

    rows, blobs = [], {}
    for r in settings.mobilenet_round_to:
        keras.backend.clear_session()
        dense, small, info = budget_variant("mobilenet_v2", budgets.FLOPs(0.5), r)
        if "dense" not in blobs:
            blobs["dense"] = tfprune.export_tflite(dense)
        key = f"round_to={r}"
        blobs[key] = tfprune.export_tflite(small)
        info.pop("pruned")
        rows.append(dict(info, key=key, keep=0.5))
        log(f"[mobilenet] Filter(round_to={r}): FLOPs {info['flops_ratio']:.3f}x")
    dense_us = _latency_rows(rows, blobs, settings)
    for row in rows:
        row["goal_flops"] = row["flops_ratio"] <= 0.52
        row["goal_speedup"] = row["efficiency"] >= 0.7
        log(f"[mobilenet] {row['key']}: speed-up {row['speedup']:.2f}x for "
            f"{row['flops_reduction']:.2f}x fewer FLOPs (efficiency {row['efficiency']:.2f})")
    return {"dense_latency_us": dense_us, "rows": rows}


def part_round_to(settings, log):
    """round_to 1/4/8 at equal FLOPs budgets on MobileNetV2 and the VGG-style CNN."""
    import keras

    import tfprune
    from tfprune import budgets

    out = {}
    for name in settings.round_to_models:
        rows, blobs = [], {}
        for keep in settings.round_to_keeps:
            for r in settings.round_to_values:
                keras.backend.clear_session()
                dense, small, info = budget_variant(name, budgets.FLOPs(keep), r)
                if "dense" not in blobs:
                    blobs["dense"] = tfprune.export_tflite(dense)
                key = f"keep={keep},round_to={r}"
                blobs[key] = tfprune.export_tflite(small)
                info.pop("pruned")
                rows.append(dict(info, key=key, keep=keep))
                log(f"[round_to] {name} FLOPs({keep}) round_to={r}: "
                    f"FLOPs {info['flops_ratio']:.3f}x, not multiples: "
                    f"{len(info['not_multiples'])}")
        dense_us = _latency_rows(rows, blobs, settings)
        out[name] = {"dense_latency_us": dense_us, "rows": rows}
    return out


def _load(name, settings):
    import numpy as np

    import tfprune

    if name == "lenet5":
        (x, y), (xt, yt) = tfprune.datasets.load_mnist()
        x, xt = x[..., None], xt[..., None]
    else:
        (x, y), (xt, yt) = tfprune.datasets.load_cifar10(common.data_dir())
        # the train subset is grouped by class: shuffle once (fixed seed) for the subsets
        order = np.random.default_rng(0).permutation(len(x))
        x, y = x[order], y[order]
    if settings.max_train:
        x, y = x[: settings.max_train], y[: settings.max_train]
    if settings.max_test:  # the CIFAR-10 test set is grouped by class too
        pick = np.random.default_rng(0).permutation(len(xt))[: settings.max_test]
        xt, yt = xt[pick], yt[pick]
    return x, y, xt, yt


def _compile(model, lr):
    import keras

    model.compile(keras.optimizers.Adam(lr),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def _accuracy(model, x, y):
    import numpy as np

    return float(np.mean(np.argmax(model.predict(x, batch_size=500, verbose=0), -1) == y))


def _method(kind, schedule):
    from tfprune import methods, structures

    if kind == "Taylor":
        return methods.Taylor(schedule=schedule)
    return methods.Magnitude(structure=structures.Filter(), schedule=schedule)


def _taylor_run(name, init, data, settings, *, method, keep, normalize, seed):
    """One fine-tuning run from the dense weights; returns (row, TFLite blob)."""
    import keras

    import tfprune
    from tfprune import budgets, schedules

    x, y, xt, yt = data
    keras.backend.clear_session()
    model = build(name, seed)
    model.set_weights(init)
    keras.utils.set_random_seed(seed)
    steps = -(-len(x) // settings.batch_size)
    row = {"method": method, "keep": keep, "normalize": normalize, "seed": seed}
    t = time.perf_counter()
    if method == "dense":
        trained = small = model
        callbacks = []
    else:
        end = steps * settings.prune_epochs
        schedule = schedules.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=end,
                                             frequency=max(1, end // 10))
        trained = tfprune.prune(model, _method(method, schedule),
                                budget=budgets.FLOPs(keep, normalize=normalize))
        callbacks = [tfprune.callbacks.Pruning()]
    _compile(trained, settings.lr_finetune)
    trained.fit(x, y, epochs=settings.finetune, batch_size=settings.batch_size, verbose=0,
                callbacks=callbacks)
    if method != "dense":
        small = tfprune.shrink(tfprune.strip(trained))
    row["seconds"] = time.perf_counter() - t
    row["accuracy"] = _accuracy(small, xt, yt)
    report = tfprune.sparsity_report(small).total
    row["flops"] = report["flops"]
    row["params"] = int(small.count_params())
    row["widths"] = widths(small)
    return row, tfprune.export_tflite(small)


def part_taylor(settings, log):
    """Taylor vs Magnitude at equal FLOPs budgets, and the normalizations, on two models."""
    import keras

    import tfprune

    out = {}
    for name in settings.taylor_models:
        t0 = time.perf_counter()
        if name == "cifar_cnn" and not (common.data_dir() or Path("/nonexistent")).joinpath(
                "cifar10").is_dir():
            reason = ("CIFAR-10 not found: set TFPRUNE_DATA_DIR to the shared data folder "
                      "(holding cifar10/) or put it at ../shared/data")
            log(f"[taylor] {name}: skipped ({reason})")
            out[name] = {"skipped": reason}
            continue
        data = _load(name, settings)
        x, y, xt, yt = data
        keras.backend.clear_session()
        dense = build(name, 0)
        _compile(dense, settings.lr_pretrain)
        dense.fit(x, y, epochs=settings.pretrain[name], batch_size=settings.batch_size,
                  verbose=0)
        init = dense.get_weights()
        pre_acc = _accuracy(dense, xt, yt)
        flops_dense = tfprune.sparsity_report(dense).total["flops"]
        log(f"[taylor] {name}: dense after {settings.pretrain[name]} epoch(s): {pre_acc:.4f}")
        runs = [("dense", 1.0, "mean", s) for s in settings.seeds]
        runs += [(m, k, "mean", s) for s in settings.seeds for k in settings.taylor_keeps
                 for m in ("Magnitude", "Taylor")]
        norms = settings.norms
        if settings.norm_keep not in settings.taylor_keeps:
            norms = ("mean", *norms)
        runs += [("Magnitude", settings.norm_keep, n, s) for s in settings.seeds for n in norms]
        rows, blobs = [], {}
        for method, keep, norm, seed in runs:
            key = f"{method},keep={keep},normalize={norm},seed={seed}"
            try:
                row, blob = _taylor_run(name, init, data, settings, method=method, keep=keep,
                                        normalize=norm, seed=seed)
            except Exception as exc:  # noqa: BLE001 - one failing row must not end the run
                rows.append({"key": key, "method": method, "keep": keep, "normalize": norm,
                             "seed": seed, "error": _error("run", exc)})
                log(f"[taylor] {name} {key}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                continue
            row["key"] = key
            row["flops_ratio"] = row["flops"] / flops_dense
            rows.append(row)
            blobs[key] = blob
            log(f"[taylor] {name} {key}: acc {row['accuracy']:.4f}, FLOPs "
                f"{row['flops_ratio']:.3f}x ({row['seconds']:.0f} s)")
        dense_key = next((r["key"] for r in rows if r["method"] == "dense" and "error" not in r),
                         None)
        lat = _measure(blobs, settings) if blobs else {}
        for row in rows:
            if row["key"] in lat:
                row["latency_us"] = lat[row["key"]]["median_us"]
                if dense_key:
                    row["latency_ratio"] = row["latency_us"] / lat[dense_key]["median_us"]
        out[name] = {"pretrain_epochs": settings.pretrain[name], "pretrain_accuracy": pre_acc,
                     "flops_dense": flops_dense, "train": len(x), "test": len(xt),
                     "seconds": time.perf_counter() - t0, "rows": rows}
    return out


def part_latency(settings, log):
    """budgets.Latency(keep) on the VGG-style CNN: predicted vs measured latency."""
    import keras

    import tfprune
    from tfprune import budgets

    if not hasattr(budgets, "Latency"):
        log("[latency] tfprune.budgets.Latency does not exist: recorded as not available")
        return {"available": False,
                "reason": "tfprune.budgets.Latency does not exist in this checkout"}
    keras.backend.clear_session()
    t = time.perf_counter()
    budget = budgets.Latency(settings.latency_keep, threads=1,
                             fractions=settings.latency_fractions,
                             runs=settings.latency_table_runs)
    dense, small, info = budget_variant("vgg", budget)
    pruned = info.pop("pruned")
    prune_s = time.perf_counter() - t
    # the budget's own check (its cached table; the shrunk model timed once) ...
    check = budget.verify(pruned, small)
    table = budget.table(pruned)
    # ... and dense vs shrunk in the same interleaved rounds
    lat = _measure({"dense": tfprune.export_tflite(dense),
                    "shrunk": tfprune.export_tflite(small)}, settings)
    dense_us, shrunk_us = lat["dense"]["median_us"], lat["shrunk"]["median_us"]
    predicted = check["predicted_us"]
    row = dict(info, available=True, keep=settings.latency_keep, budget=repr(budget),
               prune_seconds=prune_s, table_dense_us=table.dense_us,
               table_from_cache=table.from_cache, table_seconds=table.seconds,
               predicted_us=predicted, predicted_ratio=predicted / table.dense_us,
               verify={k: v for k, v in check.items() if k != "kept"},
               dense_us=dense_us, shrunk_us=shrunk_us, measured_ratio=shrunk_us / dense_us,
               latency_range_us={k: [v["min_us"], v["max_us"]] for k, v in lat.items()},
               goal=shrunk_us / dense_us <= 0.45)
    log(f"[latency] Latency({settings.latency_keep}): predicted {predicted:.0f} us "
        f"({row['predicted_ratio']:.3f}x of the table's dense), measured {shrunk_us:.0f} / "
        f"{dense_us:.0f} us ({row['measured_ratio']:.3f}x); budget.verify: "
        f"{check['measured_us']:.0f} us ({check['measured_over_dense']:.3f}x)")
    return row


RUNNERS = {"mobilenet": part_mobilenet, "round_to": part_round_to, "taylor": part_taylor,
           "latency": part_latency}


def _error(stage, exc):
    tb = traceback.extract_tb(exc.__traceback__)
    frames = [f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in tb[-4:]]
    return {"stage": stage, "type": type(exc).__name__, "message": str(exc)[:2000],
            "where": frames}


# -- output -------------------------------------------------------------------------------------


def _mean(values):
    return sum(values) / len(values) if values else float("nan")


def _human(n):
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def _md_header(part):
    return (f"\n*Measured {part['date']}, commit `{part['commit']}`, {part['seconds'] / 60:.1f} "
            f"min; command `{part['command']}`.*\n\n")


def _md_mobilenet(part):
    r = part["result"]
    lines = ["\n## MobileNetV2 to `budgets.FLOPs(0.5)`\n", _md_header(part),
             f"`keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), "
             f"weights=None, classes=10)`: **random weights** (valid for FLOPs and latency "
             f"only), `Magnitude(structure=Filter(...))`, `schedule=None`, {FIT_STEPS} fit "
             f"steps on random data, strip, shrink. LiteRT float32, 1 thread, batch 1; dense "
             f"{r['dense_latency_us'] / 1e3:.2f} ms in the same rounds. Goal: FLOPs <= 0.52x "
             f"and speed-up >= 0.7x the FLOPs reduction (efficiency >= 0.7).\n\n"]
    header = ["structure", "FLOPs dense", "FLOPs shrunk", "FLOPs ratio", "params shrunk",
              "latency ms [min-max]", "speed-up", "FLOPs reduction", "efficiency",
              "widths not multiple", "goal met"]
    table = []
    for row in r["rows"]:
        lo, hi = row["latency_range_us"]
        table.append([
            f"Filter(round_to={row['round_to']})", _human(row["flops_dense"]),
            _human(row["flops_shrunk"]), f"{row['flops_ratio']:.3f}",
            f"{row['params_shrunk']:,} / {row['params_dense']:,}",
            f"{row['latency_us'] / 1e3:.2f} [{lo / 1e3:.2f}-{hi / 1e3:.2f}]",
            f"{row['speedup']:.2f}x", f"{row['flops_reduction']:.2f}x",
            f"{row['efficiency']:.2f}", len(row["not_multiples"]),
            "yes" if row["goal_flops"] and row["goal_speedup"] else "**no**"])
    lines.append(common.markdown_table(header, table))
    return lines


def _md_round_to(part):
    lines = ["\n## `round_to` at equal FLOPs budgets\n", _md_header(part),
             "`Magnitude(structure=Filter(round_to=N))` with `budgets.FLOPs(keep)`, random "
             "weights, the same pipeline as above; latency ratio = shrunk / dense median "
             "(LiteRT float32, 1 thread, interleaved rounds, same run); efficiency = speed-up / "
             "FLOPs reduction. \"not multiple\" counts shrunk layers whose width is neither a "
             "multiple of `round_to` nor the full width.\n\n"]
    header = ["model", "budget", "round_to", "FLOPs ratio", "latency ratio", "latency ms",
              "efficiency", "not multiple"]
    table = []
    for name, res in part["result"].items():
        for row in res["rows"]:
            table.append([TITLES.get(name, name), f"FLOPs({row['keep']})", row["round_to"],
                          f"{row['flops_ratio']:.3f}", f"{row['latency_ratio']:.3f}",
                          f"{row['latency_us'] / 1e3:.3f}", f"{row['efficiency']:.2f}",
                          len(row["not_multiples"])])
    lines.append(common.markdown_table(header, table, align="llrrrrrr"))
    dense = ", ".join(f"{TITLES.get(n, n)} {res['dense_latency_us'] / 1e3:.3f} ms"
                      for n, res in part["result"].items())
    lines.append(f"\nDense medians: {dense}.\n")
    return lines


def _seed_mean(rows, **match):
    sel = [r for r in rows if "error" not in r and all(r[k] == v for k, v in match.items())]
    return sel


def _fmt_acc(sel):
    accs = [r["accuracy"] * 100 for r in sel]
    if not accs:
        return "failed"
    if len(accs) == 1:
        return f"{accs[0]:.2f}"
    return f"{_mean(accs):.2f} ({', '.join(f'{a:.2f}' for a in accs)})"


def _md_taylor(part):
    s = part["settings"]
    lines = ["\n## Taylor vs Magnitude at equal FLOPs budgets\n", _md_header(part),
             f"One dense training per model (Adam {s['lr_pretrain']:g}, batch "
             f"{s['batch_size']}), then every row starts from the same weights and fine-tunes "
             f"{s['finetune']} epoch(s) (Adam {s['lr_finetune']:g}, batch {s['batch_size']}) "
             f"with `Filter()` units and `budgets.FLOPs(keep)`: a `PolynomialDecay` schedule "
             f"(power 3) times the budget, reached after {s['prune_epochs']} epoch(s); the "
             f"rest is fine-tuning. The dense row fine-tunes the same epochs without pruning. "
             f"Accuracy: test accuracy (%) of the shrunk model, mean over seeds "
             f"{', '.join(str(x) for x in s['seeds'])} (per seed in parentheses). FLOPs ratio "
             f"and latency ratio (LiteRT float32, 1 thread, same run) of the shrunk model vs "
             f"the dense one, mean over seeds.\n\n"]
    for name, res in part["result"].items():
        if "skipped" in res:
            lines.append(f"\n### {TITLES.get(name, name)}\n\nSkipped: {res['skipped']}.\n")
            continue
        rows = res["rows"]
        lines.append(f"\n### {TITLES.get(name, name)}\n\n"
                     f"{res['train']:,} train / {res['test']:,} test samples; dense "
                     f"pretraining {res['pretrain_epochs']} epoch(s): "
                     f"{res['pretrain_accuracy'] * 100:.2f}%; dense FLOPs "
                     f"{_human(res['flops_dense'])}; {res['seconds'] / 60:.1f} min.\n\n")
        header = ["budget", "method", "test acc %", "FLOPs ratio", "latency ratio",
                  "Taylor - Magnitude (pt)"]
        table = []
        dense = _seed_mean(rows, method="dense")
        table.append(["-", "dense (fine-tuned)", _fmt_acc(dense), "1.000",
                      "1.000", ""])
        for keep in s["taylor_keeps"]:
            accs = {}
            for method in ("Magnitude", "Taylor"):
                sel = _seed_mean(rows, method=method, keep=keep, normalize="mean")
                accs[method] = _mean([r["accuracy"] * 100 for r in sel])
                diff = ""
                if method == "Taylor" and sel:
                    diff = f"{accs['Taylor'] - accs['Magnitude']:+.2f}"
                table.append([f"FLOPs({keep})", method, _fmt_acc(sel),
                              f"{_mean([r['flops_ratio'] for r in sel]):.3f}",
                              f"{_mean([r.get('latency_ratio', float('nan')) for r in sel]):.3f}",
                              diff])
        lines.append(common.markdown_table(header, table, align="llrrrr"))
        keep = s["norm_keep"]
        lines.append(f"\nImportance normalization, Magnitude at `FLOPs({keep})`:\n\n")
        header = ["normalize", "test acc %", "FLOPs ratio", "latency ratio"]
        table = []
        for norm in ("mean", *s["norms"]):
            sel = _seed_mean(rows, method="Magnitude", keep=keep, normalize=norm)
            table.append([f'"{norm}"' + (" (default)" if norm == "mean" else ""), _fmt_acc(sel),
                          f"{_mean([r['flops_ratio'] for r in sel]):.3f}",
                          f"{_mean([r.get('latency_ratio', float('nan')) for r in sel]):.3f}"])
        lines.append(common.markdown_table(header, table, align="lrrr"))
        failed = [r for r in rows if "error" in r]
        for r in failed:
            lines.append(f"\n- failed: {r['key']}: `{r['error']['type']}: "
                         f"{' '.join(r['error']['message'].split())[:200]}`\n")
    lines.append("\nPlot: `budgets_accuracy.png` (accuracy vs FLOPs ratio per method).\n")
    return lines


def _md_latency(part):
    r = part["result"]
    lines = ["\n## `budgets.Latency(0.4)` on the VGG-style CNN\n", _md_header(part)]
    if not r.get("available"):
        lines.append(f"Not available: {r.get('reason', '?')}.\n")
        return lines
    v = r["verify"]
    lines.append(
        f"{TITLES['vgg']}, random weights, `Magnitude(structure=Filter())`, `{r['budget']}`, "
        f"{FIT_STEPS} fit steps on random data, strip, shrink. Predicted: the budget's "
        f"`LatencyTable` for the shrunk widths (dense {r['table_dense_us']:.0f} us when the "
        f"table was measured, {r['table_seconds']:.0f} s to measure"
        f"{', loaded from the cache' if r['table_from_cache'] else ''}); `budget.verify`: the "
        f"shrunk model timed once against the table's dense latency; same run: dense and "
        f"shrunk timed in the same interleaved rounds (LiteRT float32, 1 thread). Goal: "
        f"measured <= 0.45x dense.\n\n")
    header = ["predicted us (/ table dense)", "budget.verify us (/ table dense)",
              "same run: dense us", "same run: shrunk us (ratio) [min-max]",
              "measured / predicted", "FLOPs ratio", "goal met"]
    lo, hi = r["latency_range_us"]["shrunk"]
    lines.append(common.markdown_table(header, [[
        f"{r['predicted_us']:.0f} ({r['predicted_ratio']:.3f})",
        f"{v['measured_us']:.0f} ({v['measured_over_dense']:.3f})",
        f"{r['dense_us']:.0f}",
        f"{r['shrunk_us']:.0f} ({r['measured_ratio']:.3f}) [{lo:.0f}-{hi:.0f}]",
        f"{r['shrunk_us'] / r['predicted_us']:.2f}",
        f"{r['flops_ratio']:.3f}", "yes" if r["goal"] else "**no**"]], align="rrrrrrl"))
    widths = ", ".join(f"{k} {a}/{b}" for k, (a, b) in r["widths"].items())
    lines.append(f"\nShrunk widths: {widths}.\n")
    return lines


RENDER = {"mobilenet": _md_mobilenet, "round_to": _md_round_to, "taylor": _md_taylor,
          "latency": _md_latency}


def render_markdown(data):
    """The markdown of a results dict (``{"machine", "parts"}``)."""
    lines = ["# Pruning to a budget\n\n", common.machine_markdown(data["machine"]),
             f"- platform: {data['machine'].get('platform', '?')}\n",
             "- every ratio is measured within one part of one run (dense and pruned models "
             "timed in the same interleaved LiteRT rounds)\n"]
    done = [(n, data["parts"][n]["seconds"] / 60) for n in PARTS if n in data["parts"]]
    lines.append("- run time (wall clock, shared machine): "
                 + ", ".join(f"{n} {m:.1f} min" for n, m in done)
                 + f" (total {sum(m for _, m in done):.1f} min)\n")
    for name in PARTS:
        part = data["parts"].get(name)
        if part is None:
            continue
        if "error" in part:
            e = part["error"]
            lines.append(f"\n## {name}\n{_md_header(part)}**Failed** at {e['stage']}: "
                         f"`{e['type']}: {' '.join(e['message'].split())[:300]}` "
                         f"({' > '.join(e['where'])})\n")
            continue
        lines += RENDER[name](part)
    return "".join(lines)


def write_plots(data, out, suffix=""):
    """``budgets_accuracy<suffix>.png`` and ``budgets_round_to<suffix>.png`` (when measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - matplotlib.ticker below

    paths = []
    info = data["machine"]
    taylor = {name: res for name, res in
              (data["parts"].get("taylor", {}).get("result") or {}).items() if "rows" in res}
    if taylor:
        fig, axes = plt.subplots(1, len(taylor), figsize=(5.5 * len(taylor), 4.3),
                                 squeeze=False)
        for ax, (name, res) in zip(axes[0], taylor.items()):
            rows = [r for r in res["rows"] if "error" not in r]
            dense = [r["accuracy"] * 100 for r in rows if r["method"] == "dense"]
            if dense:
                ax.axhline(_mean(dense), color="k", ls="--", lw=1, label="dense (fine-tuned)")
            for method, color, marker in (("Magnitude", "C0", "o"), ("Taylor", "C1", "s")):
                keeps = sorted({r["keep"] for r in rows if r["method"] == method
                                and r["normalize"] == "mean"})
                xs, ys, lo, hi = [], [], [], []
                for keep in keeps:
                    sel = [r for r in rows if r["method"] == method and r["keep"] == keep
                           and r["normalize"] == "mean"]
                    accs = [r["accuracy"] * 100 for r in sel]
                    xs.append(_mean([r["flops_ratio"] for r in sel]))
                    ys.append(_mean(accs))
                    lo.append(ys[-1] - min(accs))
                    hi.append(max(accs) - ys[-1])
                ax.errorbar(xs, ys, yerr=[lo, hi], color=color, marker=marker, capsize=3,
                            label=f"{method} (normalize='mean')")
            for norm, marker in (("none", "v"), ("cost", "^")):
                sel = [r for r in rows if r["method"] == "Magnitude" and r["normalize"] == norm]
                if sel:
                    ax.scatter([_mean([r["flops_ratio"] for r in sel])],
                               [_mean([r["accuracy"] * 100 for r in sel])], color="C2",
                               marker=marker, label=f"Magnitude (normalize='{norm}')", zorder=3)
            ax.set_xscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(plain)
            ax.set_title(TITLES.get(name, name), fontsize=9)
            ax.set_xlabel("FLOPs of the shrunk model / dense (log)")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
        fig.suptitle(f"Accuracy vs FLOPs at equal budgets (mean over seeds, bars: min-max; "
                     f"{info['date']}, {info['cpu']})", fontsize=8)
        fig.tight_layout()
        paths.append(out / f"budgets_accuracy{suffix}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    round_to = data["parts"].get("round_to", {}).get("result")
    if round_to:
        fig, axes = plt.subplots(1, len(round_to), figsize=(5.5 * len(round_to), 4.3),
                                 squeeze=False)
        for ax, (name, res) in zip(axes[0], round_to.items()):
            ax.plot([0.05, 1], [0.05, 1], "k--", lw=1, label="latency ratio = FLOPs ratio")
            for i, r in enumerate(sorted({row["round_to"] for row in res["rows"]})):
                sel = [row for row in res["rows"] if row["round_to"] == r]
                ax.scatter([row["flops_ratio"] for row in sel],
                           [row["latency_ratio"] for row in sel], color=f"C{i}",
                           marker="osd^"[i % 4], label=f"round_to={r}")
            ratios = [row[k] for row in res["rows"] for k in ("flops_ratio", "latency_ratio")]
            ax.set_xlim(min(ratios) * 0.8, 1.05)
            ax.set_ylim(min(ratios) * 0.8, 1.05)
            ax.set_title(TITLES.get(name, name), fontsize=9)
            ax.set_xlabel("FLOPs ratio (shrunk / dense)")
            ax.set_ylabel("LiteRT latency ratio (shrunk / dense)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"round_to at equal FLOPs budgets (LiteRT float32, 1 thread; "
                     f"{info['date']}, {info['cpu']})", fontsize=8)
        fig.tight_layout()
        paths.append(out / f"budgets_round_to{suffix}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


# -- entry point --------------------------------------------------------------------------------


def command(argv):
    """The command line that reproduces this run (with TF_ENABLE_ONEDNN_OPTS when it is set)."""
    env = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    prefix = f"TF_ENABLE_ONEDNN_OPTS={shlex.quote(env)} " if env is not None else ""
    return prefix + "python -m benchmarks.budgets" + "".join(f" {shlex.quote(a)}" for a in argv)


def _paths(out, quick):
    stem = "budgets_quick" if quick else "budgets"
    return out / f"{stem}.json", out / f"{stem}.md", "_quick" if quick else ""


def _render(json_path, md_path, out, suffix):
    data = json.loads(json_path.read_text())
    md_path.write_text(render_markdown(data))
    return [md_path, *write_plots(data, out, suffix)]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.budgets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny run for the tests, written to budgets_quick.*")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="comma-separated subset of " + ",".join(PARTS))
    parser.add_argument("--out", default=str(common.DEFAULT_OUT), help="output folder")
    parser.add_argument("--render", action="store_true",
                        help="only redraw the markdown and the plots from the JSON")
    args = parser.parse_args(argv)
    out = Path(args.out)
    json_path, md_path, suffix = _paths(out, args.quick)
    if args.render:
        if not json_path.exists():
            parser.error(f"--render: {json_path} does not exist; run the benchmark first")
        print("wrote " + ", ".join(str(p) for p in _render(json_path, md_path, out, suffix)))
        return 0
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown {unknown}; allowed: {list(PARTS)}")
    common.quiet_tf()
    out.mkdir(parents=True, exist_ok=True)
    mode = "quick" if args.quick else "full"
    settings = MODES[mode]
    info = common.machine_info()
    info["platform"] = platform.platform()
    data = {"machine": info, "parts": {}}
    if json_path.exists():
        try:
            data["parts"] = json.loads(json_path.read_text())["parts"]
        except (ValueError, KeyError):
            pass
    log = lambda m: print(m, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    for name in parts:
        start = time.perf_counter()
        part = {"mode": mode, "commit": git_commit(), "command": command(argv),
                "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                "settings": dataclasses.asdict(settings), "machine": info}
        log(f"== {name} ==")
        try:
            part["result"] = RUNNERS[name](settings, log)
        except Exception as exc:  # noqa: BLE001 - one failing part must not end the run
            part["error"] = _error(name, exc)
            log(f"[{name}] FAILED: {type(exc).__name__}: {str(exc)[:500]}")
        part["seconds"] = time.perf_counter() - start
        data["parts"][name] = part
        # written after every part: an interrupted run keeps what it measured
        json_path.write_text(json.dumps(data, indent=1, default=float))
        _render(json_path, md_path, out, suffix)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
