"""Dense vs tfprune methods and structures vs tfmot, on the same data, seeds and training.

Usage (from the repository root)::

    python -m benchmarks.run --quick            # < 5 min: LeNet-300-100 and LeNet-5, short
    python -m benchmarks.run --full             # < 60 min on 2 cores: + the small CNN
    python -m benchmarks.run --quick --out DIR  # default DIR: benchmarks/results
    python -m benchmarks.run --render benchmarks/results/benchmark_full.json  # redraw only

``TFPRUNE_BENCH_TINY=1`` shrinks the quick run further (LeNet-300-100 on 2,000
samples, one epoch each: the test suite's smoke run).

Protocol, per model (`benchmarks.models`), on the agreed MNIST split
(`tfprune.datasets.load_mnist`: 10,000 train, 5,000 test):

1. a dense model is trained for ``pretrain`` epochs (Adam 1e-3, batch 64);
2. every row starts from those weights, with the same seed, and trains
   ``finetune`` more epochs (Adam 5e-4, batch 64): the dense row just keeps
   training, the tfprune rows prune with their method (schedules end at 2/3
   of the fine-tuning), the tfmot rows run in their own process on tf_keras
   (`benchmarks.tfmot_baseline`) with the same weights, data and settings;
3. every final model is exported to float32 and int8 TFLite (tfprune rows
   with `tfprune.export_tflite`, tfmot rows with TF's converter in their
   process, same settings), and all latencies are measured here, in
   interleaved rounds, with `tfprune.benchmark_tflite` (LiteRT, 1 thread).

The rows come from `CONFIGS`, a table: add a method by adding a `Config`. Rows
whose method is missing from `tfprune.methods` (``requires``) are skipped,
and a row that fails is reported as failed without stopping the run.

Outputs in ``--out``: ``benchmark_<mode>.md`` (tables, date, machine),
``benchmark_<mode>.json`` (all numbers), ``accuracy_vs_sparsity_<mode>.png``
and ``speedup_vs_flops_<mode>.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from benchmarks import common, models

# -- settings -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    models: tuple
    pretrain: int
    finetune: int
    max_train: int | None = None
    max_test: int | None = None
    latency_runs: int = 200
    latency_rounds: int = 3
    batch_size: int = 64
    lr_pretrain: float = 1e-3
    lr_finetune: float = 5e-4
    seed: int = 0


MODES = {
    "full": Settings(models=("lenet300", "lenet5", "cnn"), pretrain=4, finetune=4,
                     latency_runs=300, latency_rounds=5),
    "quick": Settings(models=("lenet300", "lenet5"), pretrain=1, finetune=1, max_train=5000,
                      latency_runs=100, latency_rounds=2),
    "tiny": Settings(models=("lenet300",), pretrain=1, finetune=1, max_train=2000,
                     max_test=1000, latency_runs=30, latency_rounds=1),
}

# -- the table of configurations ----------------------------------------------------------------


@dataclasses.dataclass
class Config:
    """One row of the benchmark.

    Attributes:
        name: row label (also used in file names).
        family: "dense", "tfprune" or "tfmot".
        method: method name for grouping in the plots.
        structure: structure label.
        make: for tfprune rows, ``make(context) -> Method`` where ``context``
            is a dict with ``end_step`` and ``frequency`` (the pruning
            schedule, in training steps), ``steps`` (fine-tuning steps) and
            ``num_train_examples``.
        tfmot: for tfmot rows, the spec `benchmarks.tfmot_baseline` understands.
        prune_output: prune the output layer too (False for unit structures:
            removing output units would remove classes).
        shrink: run `tfprune.shrink` after `tfprune.strip`.
        requires: name of the `tfprune.methods` attribute the row needs.
    """

    name: str
    family: str
    method: str
    structure: str
    make: Callable | None = None
    tfmot: dict | None = None
    prune_output: bool = True
    shrink: bool = False
    requires: str | None = None


def _poly(final):
    def make_schedule(s):
        from tfprune import schedules

        return schedules.PolynomialDecay(0.0, final, begin_step=0, end_step=s["end_step"],
                                         frequency=s["frequency"])

    return make_schedule


def _magnitude(structure, final=None):
    def make(s):
        from tfprune import methods, structures

        st = structure(structures)
        if final is None:
            return methods.Magnitude(structure=st)
        return methods.Magnitude(structure=st, schedule=_poly(final)(s))

    return make


def _dpp(**kwargs):
    def make(s):
        from tfprune import methods, structures

        kw = dict(kwargs)
        if "structure" in kw:
            kw["structure"] = kw["structure"](structures)
        return methods.DPP(**kw)

    return make


def _turbo_vbi(s):
    from tfprune import methods

    # Turbo iterations every 1/6 of the pruning phase, then the mask is frozen and the
    # last third of the fine-tuning is plain training, like the other rows' schedules.
    return methods.TurboVBI(num_train_examples=s["num_train_examples"],
                            update_every=max(1, s["end_step"] // 6), freeze_step=s["end_step"])


CONFIGS = [
    Config("dense", "dense", "dense", "-"),
    Config("magnitude_unstructured_90", "tfprune", "Magnitude", "unstructured 90%",
           make=_magnitude(lambda st: st.Unstructured(), 0.9)),
    Config("magnitude_block4x1_90", "tfprune", "Magnitude", "Block((4,1)) 90%",
           make=_magnitude(lambda st: st.Block((4, 1)), 0.9)),
    Config("magnitude_2of4", "tfprune", "Magnitude", "KOutOfN(2,4)",
           make=_magnitude(lambda st: st.KOutOfN(2, 4))),
    Config("magnitude_filter_75_shrunk", "tfprune", "Magnitude", "Filter 75% + shrink",
           make=_magnitude(lambda st: st.Filter(), 0.75), prune_output=False, shrink=True),
    Config("dpp_2of4", "tfprune", "DPP", "KOutOfN(2,4)", make=_dpp(k=2, n=4), requires="DPP"),
    Config("dpp_filter_75_shrunk", "tfprune", "DPP", "Filter 75% + shrink",
           make=_dpp(keep_ratio=0.25, structure=lambda st: st.Filter()), prune_output=False,
           shrink=True, requires="DPP"),
    Config("turbo_vbi_shrunk", "tfprune", "TurboVBI", "MRF prior + shrink", make=_turbo_vbi,
           prune_output=False, shrink=True, requires="TurboVBI"),
    Config("tfmot_dense", "tfmot", "tfmot", "dense (tf_keras)", tfmot={"kind": "dense"}),
    Config("tfmot_unstructured_90", "tfmot", "tfmot", "unstructured 90%",
           tfmot={"kind": "unstructured", "sparsity": 0.9}),
    Config("tfmot_2of4", "tfmot", "tfmot", "m_by_n (2,4)",
           tfmot={"kind": "m_by_n", "m_by_n": [2, 4]}),
    Config("tfmot_block1x4_90", "tfmot", "tfmot", "block_size (1,4) 90%",
           tfmot={"kind": "block", "block": [1, 4], "sparsity": 0.9}),
    Config("tfmot_block4x1_90", "tfmot", "tfmot", "block_size (4,1) 90%",
           tfmot={"kind": "block", "block": [4, 1], "sparsity": 0.9}),
]
"""The rows. tfmot block sizes are [height, width] of the Keras kernel [fan_in, units]:
(4, 1) is tfprune's Block((4, 1)), the block LiteRT's sparse FULLY_CONNECTED runs;
(1, 4) is the one the task names. tfmot blocks apply to Dense layers only
(convolutions are pruned element-wise there)."""


def available_configs():
    """The rows whose method exists in this tfprune (``requires``)."""
    from tfprune import methods

    return [c for c in CONFIGS if c.requires is None or hasattr(methods, c.requires)]


# -- one model ----------------------------------------------------------------------------------


def _data(model_name, settings):
    import numpy as np

    import tfprune

    (x_train, y_train), (x_test, y_test) = tfprune.datasets.load_mnist()
    # The training part is sorted by label: shuffle once (fixed seed) so that subsets and
    # the int8 calibration samples (the first 256) hold every class.
    order = np.random.default_rng(settings.seed).permutation(len(x_train))
    x_train, y_train = x_train[order], y_train[order]
    if settings.max_train:
        x_train, y_train = x_train[: settings.max_train], y_train[: settings.max_train]
    if settings.max_test:
        x_test, y_test = x_test[: settings.max_test], y_test[: settings.max_test]
    if model_name in models.FLAT_INPUT:
        x_train, x_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
    else:
        x_train, x_test = x_train[..., None], x_test[..., None]
    f32, i64 = np.float32, np.int64
    return x_train.astype(f32), y_train.astype(i64), x_test.astype(f32), y_test.astype(i64)


def _compile(model, lr):
    import keras

    model.compile(keras.optimizers.Adam(lr),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])


def _accuracy(model, x, y):
    import numpy as np

    return float(np.mean(np.argmax(model.predict(x, batch_size=512, verbose=0), -1) == y))


def _tflite_accuracy(blob, x, y):
    import numpy as np

    from tfprune import run_tflite

    return float(np.mean(np.argmax(run_tflite(blob, x), -1) == y))


def _train_tfprune(model_name, config, init, data, settings, schedule):
    import keras

    import tfprune

    x_train, y_train = data[0], data[1]
    keras.utils.set_random_seed(settings.seed)
    model = models.build(model_name, keras)
    model.set_weights(init)
    timer = common.EpochTimer(keras)
    callbacks = [timer]
    if config.family == "dense":
        trained = model
    else:
        method = config.make(schedule)
        if config.prune_output:
            trained = tfprune.prune(model, method)
        else:
            output_name = model.layers[-1].name
            trained = tfprune.prune(
                model, layers=lambda layer: None if layer.name == output_name else method)
        callbacks.append(tfprune.callbacks.Pruning())
    _compile(trained, settings.lr_finetune)
    trained.fit(x_train, y_train, epochs=settings.finetune, batch_size=settings.batch_size,
                verbose=0, callbacks=callbacks)
    final = trained
    if config.family != "dense":
        final = tfprune.strip(trained)
        if config.shrink:
            final = tfprune.shrink(final)
    return final, timer.times


def _run_tfmot(model_name, configs, init, data, settings, schedule, work):
    """Runs the tfmot rows in a subprocess; returns name -> (weights, tflite blobs, acc, times)."""
    import numpy as np

    x_train, y_train, x_test, y_test = data
    np.savez(work / "data.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
             rep=x_train[:256])
    np.savez(work / "weights.npz", **{f"w{i}": w for i, w in enumerate(init)})
    spec = {
        "model": model_name, "data": str(work / "data.npz"), "weights": str(work / "weights.npz"),
        "out_dir": str(work), "epochs": settings.finetune, "batch_size": settings.batch_size,
        "lr": settings.lr_finetune, "seed": settings.seed, "schedule": schedule,
        "configs": [dict(c.tfmot, name=c.name) for c in configs],
    }
    (work / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(common.REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.tfmot_baseline",
                           str(work / "spec.json")], cwd=common.REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"tfmot baseline failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    results = json.loads((work / "results.json").read_text())
    out = {}
    for c in configs:
        row = results["rows"][c.name]
        w = np.load(work / f"{c.name}.weights.npz")
        weights = [w[f"w{i}"] for i in range(len(w.files))]
        blobs = {q: (work / f"{c.name}_{q}.tflite").read_bytes() for q in ("float32", "int8")}
        out[c.name] = (weights, blobs, row["accuracy"], row["epoch_seconds"])
    return out, results


def _median(xs):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def run_model(model_name, settings, configs, log=print):
    """Runs every config on one model; returns a list of row dicts."""
    import keras

    import tfprune
    from tfprune.export import tflite_size

    data = _data(model_name, settings)
    x_train, y_train, x_test, y_test = data
    rep = x_train[:256]
    keras.utils.set_random_seed(settings.seed)
    dense = models.build(model_name, keras)
    _compile(dense, settings.lr_pretrain)
    t0 = time.perf_counter()
    dense.fit(x_train, y_train, epochs=settings.pretrain, batch_size=settings.batch_size,
              verbose=0)
    init = dense.get_weights()
    base = tfprune.sparsity_report(dense).total
    log(f"[{model_name}] pretrained {settings.pretrain} epoch(s) in "
        f"{time.perf_counter() - t0:.0f} s; test accuracy {_accuracy(dense, x_test, y_test):.4f}")
    steps = settings.finetune * math.ceil(len(x_train) / settings.batch_size)
    end_step = max(1, (2 * steps) // 3)
    schedule = {"end_step": end_step, "frequency": max(1, end_step // 10), "steps": steps,
                "num_train_examples": len(x_train)}

    rows, blobs = [], {}

    def add_row(config, final, accuracy, epoch_seconds, tflite=None):
        rep_total = tfprune.sparsity_report(final).total
        if tflite is None:
            tflite = {q: tfprune.export_tflite(final, quantize=None if q == "float32" else q,
                                               representative_data=rep)
                      for q in ("float32", "int8")}
        row = {
            "model": model_name, "config": config.name, "family": config.family,
            "method": config.method, "structure": config.structure, "accuracy": accuracy,
            "int8_accuracy": _tflite_accuracy(tflite["int8"], x_test, y_test),
            "sparsity": 1.0 - rep_total["nonzero"] / base["params"],
            "params": rep_total["params"], "nonzero": rep_total["nonzero"],
            "flops_kept": rep_total["flops_kept"] / base["flops"],
            "epoch_seconds": _median(epoch_seconds), "epoch_seconds_all": epoch_seconds,
        }
        for q, blob in tflite.items():
            size = tflite_size(blob)
            row[f"{q}_bytes"], row[f"{q}_gzip_bytes"] = size["bytes"], size["gzip_bytes"]
            blobs[(config.name, q)] = blob
        rows.append(row)
        log(f"[{model_name}] {config.name}: accuracy {accuracy:.4f}, sparsity "
            f"{row['sparsity']:.1%}, FLOPs kept {row['flops_kept']:.1%}")

    def failed(config, error):
        rows.append({"model": model_name, "config": config.name, "family": config.family,
                     "method": config.method, "structure": config.structure,
                     "error": error})
        log(f"[{model_name}] {config.name}: FAILED: {error}")

    for config in [c for c in configs if c.family != "tfmot"]:
        try:
            t1 = time.perf_counter()
            final, times = _train_tfprune(model_name, config, init, data, settings, schedule)
            t2 = time.perf_counter()
            add_row(config, final, _accuracy(final, x_test, y_test), times)
            log(f"[{model_name}] {config.name}: trained in {t2 - t1:.0f} s, measured in "
                f"{time.perf_counter() - t2:.0f} s")
        except Exception as e:  # a failing row is reported, the run goes on
            traceback.print_exc()
            failed(config, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")

    tfmot_configs = [c for c in configs if c.family == "tfmot"]
    if tfmot_configs:
        with tempfile.TemporaryDirectory(prefix="tfprune_bench_") as work:
            try:
                t1 = time.perf_counter()
                out, _ = _run_tfmot(model_name, tfmot_configs, init, data, settings, schedule,
                                    Path(work))
            except Exception as e:
                for c in tfmot_configs:
                    failed(c, f"{type(e).__name__}: {str(e)[-300:]}")
                out = {}
            log(f"[{model_name}] tfmot process: {time.perf_counter() - t1:.0f} s")
            for c in tfmot_configs:
                if c.name not in out:
                    continue
                weights, tflite, accuracy, times = out[c.name]
                mirror = models.build(model_name, keras)
                mirror.set_weights(weights)
                add_row(c, mirror, accuracy, times, tflite=tflite)

    log(f"[{model_name}] measuring LiteRT latency of {len(blobs)} models "
        f"({settings.latency_rounds} rounds x {settings.latency_runs} runs)")
    latency = common.measure_latencies(blobs, runs=settings.latency_runs,
                                       rounds=settings.latency_rounds)
    for row in rows:
        for q in ("float32", "int8"):
            if (row["config"], q) in latency:
                lat = latency[(row["config"], q)]
                row[f"{q}_latency_us"] = lat["median_us"]
                row[f"{q}_latency_min_us"] = lat["min_us"]
                row[f"{q}_latency_max_us"] = lat["max_us"]
    _add_ratios(rows)
    return rows


def _add_ratios(rows):
    dense = next((r for r in rows if r["config"] == "dense" and "error" not in r), None)
    if dense is None:
        return
    for r in rows:
        if "error" in r:
            continue
        r["accuracy_delta"] = r["accuracy"] - dense["accuracy"]
        r["flops_reduction"] = 1.0 / r["flops_kept"] if r["flops_kept"] else float("inf")
        for q in ("float32", "int8"):
            r[f"{q}_size_ratio"] = r[f"{q}_bytes"] / dense[f"{q}_bytes"]
            r[f"{q}_gzip_ratio"] = r[f"{q}_gzip_bytes"] / dense[f"{q}_gzip_bytes"]
            r[f"{q}_speedup"] = dense[f"{q}_latency_us"] / r[f"{q}_latency_us"]
        r["train_time_ratio"] = r["epoch_seconds"] / dense["epoch_seconds"]


# -- output -------------------------------------------------------------------------------------

MODEL_TITLES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5", "cnn": "small CNN (32-32-64-64)"}


def _label(r):
    return f"{r['method']} {r['structure']}" if r["method"] not in ("dense",) else "dense"


def write_markdown(path, rows, settings, info, mode, elapsed, cpu):
    lines = [f"# tfprune benchmark ({mode})\n", common.machine_markdown(info)]
    lines.append(
        f"- protocol: MNIST agreed split (`tfprune.datasets.load_mnist`"
        f"{f', first {settings.max_train} train' if settings.max_train else ''}"
        f"{f', first {settings.max_test} test' if settings.max_test else ''}); dense "
        f"pretraining {settings.pretrain} epoch(s) (Adam {settings.lr_pretrain:g}), then every "
        f"row fine-tunes {settings.finetune} epoch(s) from the same weights (Adam "
        f"{settings.lr_finetune:g}, batch {settings.batch_size}, seed {settings.seed}); "
        f"pruning schedules end at 2/3 of the fine-tuning\n"
        f"- latency: LiteRT interpreter, 1 thread, batch 1; median of "
        f"{settings.latency_rounds} interleaved round(s) x {settings.latency_runs} runs, "
        f"[min-max] over all runs\n"
        f"- tfmot rows: tf_keras in a separate process (same weights, data, epochs, optimizer, "
        f"batch); converted with TF's converter there, measured here\n"
        f"- sparsity: zero weights / dense parameters (shrunk models count removed weights "
        f"as zeros); FLOPs kept: multiply-adds with nonzero weights / dense\n"
        f"- ratios are to the `dense` row (Keras 3) of the same run; speed-up = dense latency / "
        f"latency; train s/epoch: median over the fine-tuning epochs (with one epoch it "
        f"includes tracing)\n"
        f"- total run time: {elapsed / 60:.1f} min wall clock, {cpu / 60:.1f} min CPU (this "
        f"process and its children; the machine is shared, so wall clock depends on the "
        f"other jobs)\n")
    for model_name in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model_name]
        lines.append(f"\n## {MODEL_TITLES.get(model_name, model_name)}\n")
        header = ["row", "test acc", "int8 acc", "sparsity", "FLOPs kept", "float KiB (gzip)",
                  "int8 KiB (gzip)", "float latency us [min-max]", "int8 latency us",
                  "train s/epoch"]
        table = []
        for r in mrows:
            if "error" in r:
                table.append([_label(r), f"failed: {r['error']}"] + [""] * (len(header) - 2))
                continue
            table.append([
                _label(r), f"{r['accuracy']:.4f}", f"{r['int8_accuracy']:.4f}",
                f"{r['sparsity']:.1%}", f"{r['flops_kept']:.1%}",
                f"{common.fmt_kib(r['float32_bytes'])} ({common.fmt_kib(r['float32_gzip_bytes'])})",
                f"{common.fmt_kib(r['int8_bytes'])} ({common.fmt_kib(r['int8_gzip_bytes'])})",
                f"{r['float32_latency_us']:.1f} [{r['float32_latency_min_us']:.0f}-"
                f"{r['float32_latency_max_us']:.0f}]",
                f"{r['int8_latency_us']:.1f}", f"{r['epoch_seconds']:.2f}",
            ])
        lines.append(common.markdown_table(header, table))
        lines.append("\nRatios to dense:\n\n")
        header = ["row", "acc delta", "FLOPs reduction", "float size", "float gzip",
                  "int8 size", "int8 gzip", "float speed-up", "int8 speed-up", "train time"]
        table = []
        for r in mrows:
            if "error" in r or "accuracy_delta" not in r:
                continue
            table.append([
                _label(r), f"{r['accuracy_delta']:+.4f}", f"{r['flops_reduction']:.2f}x",
                f"{r['float32_size_ratio']:.3f}", f"{r['float32_gzip_ratio']:.3f}",
                f"{r['int8_size_ratio']:.3f}", f"{r['int8_gzip_ratio']:.3f}",
                f"{r['float32_speedup']:.2f}x", f"{r['int8_speedup']:.2f}x",
                f"{r['train_time_ratio']:.2f}",
            ])
        lines.append(common.markdown_table(header, table))
    Path(path).write_text("".join(lines))


def _annotate_merged(ax, points, log=False):
    """Annotates (x, y, label) points; labels of points that coincide are stacked in one note."""
    import math as _m

    def key(v):
        return round(_m.log10(v), 2) if log else round(v, 1)

    groups = {}
    for x, y, label in points:
        groups.setdefault((key(x), key(y)), (x, y, []))[2].append(label)
    for x, y, labels in groups.values():
        ax.annotate("\n".join(dict.fromkeys(labels)), (x, y), fontsize=5.5, xytext=(4, 2),
                    textcoords="offset points", va="bottom")


METHOD_STYLE = {"dense": ("k", "*"), "Magnitude": ("C0", "o"), "DPP": ("C1", "s"),
                "TurboVBI": ("C2", "^"), "tfmot": ("C3", "x")}


def write_plots(out, rows, mode, info):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r and "float32_speedup" in r]
    names = list(dict.fromkeys(r["model"] for r in ok))
    paths = []
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.5), squeeze=False)
    for ax, model_name in zip(axes[0], names):
        points = []
        for r in (r for r in ok if r["model"] == model_name):
            color, marker = METHOD_STYLE.get(r["method"], ("C7", "d"))
            ax.scatter(r["sparsity"] * 100, r["accuracy"] * 100, color=color, marker=marker,
                       label=r["method"])
            points.append((r["sparsity"] * 100, r["accuracy"] * 100, _label(r)))
        _annotate_merged(ax, points)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=8)
        ax.set_title(MODEL_TITLES.get(model_name, model_name))
        ax.set_xlabel("weight sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Accuracy vs sparsity ({mode}, {info['date']}, {info['cpu']}, "
                 f"{info['cores']} cores)", fontsize=9)
    fig.tight_layout()
    paths.append(out / f"accuracy_vs_sparsity_{mode}.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.5), squeeze=False)
    for ax, model_name in zip(axes[0], names):
        mrows = [r for r in ok if r["model"] == model_name]
        top = max([r["flops_reduction"] for r in mrows] + [r["float32_speedup"] for r in mrows])
        ax.plot([1, top * 1.2], [1, top * 1.2], "k--", lw=1, label="ideal (speed-up = FLOPs)")
        points = []
        for r in mrows:
            color, marker = METHOD_STYLE.get(r["method"], ("C7", "d"))
            ax.scatter(r["flops_reduction"], r["float32_speedup"], color=color, marker=marker,
                       label=r["method"])
            points.append((r["flops_reduction"], r["float32_speedup"], _label(r)))
        _annotate_merged(ax, points, log=True)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(MODEL_TITLES.get(model_name, model_name))
        ax.set_xlabel("FLOPs reduction (dense / kept)")
        ax.set_ylabel("LiteRT float32 speed-up (1 thread)")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"Latency speed-up vs FLOPs reduction ({mode}, {info['date']}, {info['cpu']})",
                 fontsize=9)
    fig.tight_layout()
    paths.append(out / f"speedup_vs_flops_{mode}.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def render(json_path, out):
    """Rewrites ``benchmark_<mode>.md`` and the plots from a results JSON (no measurement)."""
    data = json.loads(json_path.read_text())
    mode = json_path.stem.removeprefix("benchmark_")
    settings = Settings(**{k: tuple(v) if k == "models" else v
                           for k, v in data["settings"].items()})
    out.mkdir(parents=True, exist_ok=True)
    write_markdown(out / f"benchmark_{mode}.md", data["rows"], settings, data["machine"], mode,
                   data["elapsed_s"], data.get("cpu_s", float("nan")))
    plots = write_plots(out, data["rows"], mode, data["machine"])
    print(f"wrote {out / f'benchmark_{mode}.md'}, {', '.join(str(p) for p in plots)}")
    return 0


def cpu_seconds():
    """User + system CPU seconds of this process and its finished children."""
    import resource

    own, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                     resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# -- entry point --------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="short run (< 5 min)")
    group.add_argument("--full", action="store_true", help="full run (< 60 min on 2 cores)")
    group.add_argument("--render", metavar="JSON",
                       help="only rewrite the table and plots from a benchmark_<mode>.json")
    parser.add_argument("--out", default=str(common.DEFAULT_OUT), help="output folder")
    parser.add_argument("--models", default=None,
                        help="comma-separated subset of " + ",".join(models.BUILDERS))
    parser.add_argument("--configs", default=None,
                        help="comma-separated subset of row names (dense is always run)")
    args = parser.parse_args(argv)
    if args.render:
        return render(Path(args.render), Path(args.out))
    if not (args.quick or args.full):
        parser.error("one of --quick, --full or --render is required")
    mode = "full" if args.full else "quick"
    if mode == "quick" and os.environ.get("TFPRUNE_BENCH_TINY"):
        mode = "tiny"
    settings = dataclasses.replace(MODES[mode])
    if args.models:
        settings.models = tuple(args.models.split(","))
        unknown = set(settings.models) - set(models.BUILDERS)
        if unknown:
            parser.error(f"--models: unknown {sorted(unknown)}; allowed: {list(models.BUILDERS)}")
    common.quiet_tf()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = available_configs()
    skipped = [c.name for c in CONFIGS if c not in configs]
    if args.configs:
        wanted = set(args.configs.split(",")) | {"dense"}
        configs = [c for c in configs if c.name in wanted]
    info = common.machine_info()
    print(f"benchmarks.run --{mode}: models {settings.models}, {len(configs)} rows"
          f"{f' (skipped, method not in tfprune: {skipped})' if skipped else ''}", flush=True)
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    rows = []
    for model_name in settings.models:
        rows += run_model(model_name, settings, configs,
                          log=lambda m: print(m, flush=True))
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    info["skipped_rows"] = skipped
    md = out / f"benchmark_{mode}.md"
    write_markdown(md, rows, settings, info, mode, elapsed, cpu)
    (out / f"benchmark_{mode}.json").write_text(json.dumps(
        {"machine": info, "settings": dataclasses.asdict(settings), "elapsed_s": elapsed,
         "cpu_s": cpu, "rows": rows}, indent=1, default=float))
    plots = write_plots(out, rows, mode, info)
    print(md.read_text())
    print(f"wrote {md}, {', '.join(str(p) for p in plots)} ({elapsed / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
