"""LiteRT speed-up of `tfprune.shrink` against the FLOPs reduction (issue 4, item 5).

Usage (from the repository root)::

    python -m benchmarks.shrink_latency [--quick] [--models mlp,vgg,resnet,mobilenet]
                                        [--out benchmarks/results]

Four architectures with random weights (latency does not depend on the
values): an MLP 784-1024-1024-10, a VGG-style CNN (64x64x3 input, 64-128-256
channels, BatchNormalization), a ResNet-style net with Add (identity and
projection shortcuts) and a MobileNet-style net with depthwise convolutions.
For each, 50% and 75% of the units of every Dense/Conv2D layer except the
output are removed: ``tfprune.prune(model, Magnitude(s, structure=Filter()))``,
one training step with ``tfprune.callbacks.Pruning`` (learning rate 0, so the
weights stay), `tfprune.strip`, `tfprune.shrink`. Depthwise convolutions are
not pruned themselves: their channels go with the filters that feed them.

The dense and shrunk models are exported to float32 (and int8) TFLite and
timed in the same run, in interleaved rounds, with `tfprune.benchmark_tflite`
(LiteRT interpreter, 1 thread, batch 1). The table gives the FLOPs ratio
(dense / shrunk, from `tfprune.sparsity_report`), the measured speed-up (dense
median / shrunk median) and their quotient (1.0 = the speed-up is as large as
the FLOPs reduction; issue 4 asks >= 0.8 on the MLP and the CNN).

Also: the MLP with 90% of its Dense weights pruned as Block((4, 1)) (the block
LiteRT's sparse FULLY_CONNECTED kernel runs) and, for contrast, unstructured,
both exported with the converter's sparse encoding (`tfprune.export_tflite`
does it by itself for float32), against the same dense MLP.

Outputs in ``--out``: ``shrink_latency.md`` (table, date, machine),
``shrink_latency.json`` and ``shrink_latency.png`` (speed-up vs FLOPs
reduction with the ideal line).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks import common

# -- models -------------------------------------------------------------------------------------


def mlp():
    import keras

    L = keras.layers
    return keras.Sequential([
        keras.Input((784,)),
        L.Dense(1024, activation="relu", name="fc1"),
        L.Dense(1024, activation="relu", name="fc2"),
        L.Dense(10, name="out"),
    ], name="mlp")


def _conv_bn(x, filters, name, kernel=3, strides=1, relu=True):
    import keras

    L = keras.layers
    x = L.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=name)(x)
    x = L.BatchNormalization(name=name + "_bn")(x)
    return L.ReLU(name=name + "_relu")(x) if relu else x


def vgg():
    """VGG-style: 64x64x3, conv-BN-ReLU stages of 64, 128, 256 channels with max pooling."""
    import keras

    L = keras.layers
    x = inp = keras.Input((64, 64, 3))
    for i, filters in enumerate((64, 128, 256)):
        x = _conv_bn(x, filters, f"conv{i + 1}")
        x = L.MaxPooling2D(name=f"pool{i + 1}")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, L.Dense(10, name="out")(x), name="vgg")


def resnet():
    """ResNet-style: 64x64x3, stride-2 stem, three basic blocks (32, 64, 128) joined by Add."""
    import keras

    L = keras.layers
    inp = keras.Input((64, 64, 3))
    x = _conv_bn(inp, 32, "stem", strides=2)
    for i, (filters, strides) in enumerate(((32, 1), (64, 2), (128, 2))):
        name = f"b{i + 1}"
        y = _conv_bn(x, filters, name + "a", strides=strides)
        y = _conv_bn(y, filters, name + "b", relu=False)
        shortcut = x
        if strides != 1 or x.shape[-1] != filters:
            shortcut = _conv_bn(x, filters, name + "proj", kernel=1, strides=strides, relu=False)
        x = L.ReLU(name=name + "_out")(L.Add(name=name + "_add")([shortcut, y]))
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, L.Dense(10, name="out")(x), name="resnet")


def mobilenet():
    """MobileNet-style: 64x64x3, stride-2 stem, depthwise-separable blocks 64-128-128-256-256."""
    import keras

    L = keras.layers
    inp = keras.Input((64, 64, 3))
    x = _conv_bn(inp, 32, "stem", strides=2)
    for i, (filters, strides) in enumerate(((64, 1), (128, 2), (128, 1), (256, 2), (256, 1))):
        x = L.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False,
                              name=f"dw{i + 1}")(x)
        x = L.BatchNormalization(name=f"dw{i + 1}_bn")(x)
        x = L.ReLU(6.0, name=f"dw{i + 1}_relu")(x)
        x = _conv_bn(x, filters, f"pw{i + 1}", kernel=1)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, L.Dense(10, name="out")(x), name="mobilenet")


MODELS = {"mlp": mlp, "vgg": vgg, "resnet": resnet, "mobilenet": mobilenet}
TITLES = {"mlp": "MLP 784-1024-1024-10", "vgg": "VGG-style CNN (BN)",
          "resnet": "ResNet-style (Add)", "mobilenet": "MobileNet-style (depthwise)"}
FRACTIONS = (0.5, 0.75)

# -- pruning ------------------------------------------------------------------------------------


def _random_batch(model, n, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.random((n,) + tuple(model.inputs[0].shape[1:]), dtype=np.float32)


def _randomize_bn(model, seed=0):
    """Non-trivial BatchNormalization statistics, so that BN is not an identity."""
    import keras
    import numpy as np

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                               rng.normal(0, 0.1, beta.shape).astype("float32"),
                               rng.normal(0, 0.1, mean.shape).astype("float32"),
                               rng.uniform(0.5, 1.5, var.shape).astype("float32")])


def prune_units(model, fraction, structure=None, output=False):
    """Prunes ``fraction`` of the groups of every Dense/Conv2D (not depthwise, not the output).

    One training step with learning rate 0 and the `tfprune.callbacks.Pruning`
    callback: one-shot `Magnitude` sets the masks at the first step.

    Returns:
        the stripped model (plain layers, pruned weights exactly zero).
    """
    import keras
    import numpy as np

    import tfprune
    from tfprune import methods, structures

    method = methods.Magnitude(fraction, structure=structure or structures.Filter())
    output_name = model.layers[-1].name

    def select(layer):
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            return None
        if not isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
            return None
        if layer.name == output_name and not output:
            return None
        return method

    pruned = tfprune.prune(model, layers=select)
    pruned.compile(keras.optimizers.SGD(0.0),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = _random_batch(model, 8)
    pruned.fit(x, np.zeros(len(x), "int64"), epochs=1, batch_size=8, verbose=0,
               callbacks=[tfprune.callbacks.Pruning()])
    return tfprune.strip(pruned)


# -- measurement --------------------------------------------------------------------------------


def _runs_for(blob, budget_s, low, high):
    """Runs per round so that one round of this model takes about ``budget_s`` seconds."""
    from tfprune import benchmark_tflite

    probe = benchmark_tflite(blob, runs=5, warmup=3)["median_us"]
    return int(min(high, max(low, budget_s * 1e6 / max(probe, 1.0))))


def measure(blobs, rounds, budget_s, low=20, high=2000):
    """Interleaved latency rounds, each model with a runs count fitted to its speed."""
    import numpy as np

    from tfprune import benchmark_tflite

    runs = {key: _runs_for(blob, budget_s, low, high) for key, blob in blobs.items()}
    medians = {key: [] for key in blobs}
    lo = {key: float("inf") for key in blobs}
    hi = {key: 0.0 for key in blobs}
    for _ in range(rounds):
        for key, blob in blobs.items():
            r = benchmark_tflite(blob, runs=runs[key])
            medians[key].append(r["median_us"])
            lo[key], hi[key] = min(lo[key], r["min_us"]), max(hi[key], r["max_us"])
    return {key: {"median_us": float(np.median(medians[key])), "min_us": lo[key],
                  "max_us": hi[key], "runs": runs[key] * rounds} for key in blobs}


def run(model_names, quick=False, log=print):
    import keras

    import tfprune
    from tfprune import structures
    from tfprune.export import tflite_size

    rows, blobs = [], {}
    for name in model_names:
        keras.utils.set_random_seed(0)
        dense = MODELS[name]()
        _randomize_bn(dense)
        rep = _random_batch(dense, 64, seed=1)
        base = tfprune.sparsity_report(dense).total
        variants = [("dense", dense, "-")]
        for fraction in FRACTIONS:
            t0 = time.perf_counter()
            small = tfprune.shrink(prune_units(dense, fraction))
            log(f"[{name}] {fraction:.0%} of units pruned + shrunk in "
                f"{time.perf_counter() - t0:.0f} s")
            variants.append((f"shrunk_{int(fraction * 100)}", small,
                             f"{fraction:.0%} units removed, shrunk"))
        if name == "mlp":
            for label, st, what in (("block4x1_90", structures.Block((4, 1)), "Block((4,1))"),
                                    ("unstructured_90", structures.Unstructured(),
                                     "unstructured")):
                sparse = prune_units(dense, 0.9, structure=st, output=True)
                variants.append((label, sparse, f"90% {what} weights, sparse encoding"))
        for variant, model, what in variants:
            total = tfprune.sparsity_report(model).total
            floats = tfprune.export_tflite(model)
            ints = tfprune.export_tflite(model, quantize="int8", representative_data=rep)
            blobs[(name, variant, "float32")] = floats
            blobs[(name, variant, "int8")] = ints
            rows.append({
                "model": name, "variant": variant, "what": what,
                "params": total["params"], "nonzero": total["nonzero"],
                "flops_ratio": base["flops"] / max(total["flops_kept"], 1),
                "float32_bytes": tflite_size(floats)["bytes"],
                "int8_bytes": tflite_size(ints)["bytes"],
            })
    log(f"measuring LiteRT latency of {len(blobs)} models")
    latency = measure(blobs, rounds=2 if quick else 5, budget_s=0.1 if quick else 0.6,
                      low=10 if quick else 30)
    for row in rows:
        for q in ("float32", "int8"):
            lat = latency[(row["model"], row["variant"], q)]
            dense_lat = latency[(row["model"], "dense", q)]
            row[f"{q}_latency_us"] = lat["median_us"]
            row[f"{q}_latency_min_us"] = lat["min_us"]
            row[f"{q}_latency_max_us"] = lat["max_us"]
            row[f"{q}_runs"] = lat["runs"]
            row[f"{q}_speedup"] = dense_lat["median_us"] / lat["median_us"]
            row[f"{q}_efficiency"] = row[f"{q}_speedup"] / row["flops_ratio"]
    return rows


# -- output -------------------------------------------------------------------------------------


def write_markdown(path, rows, info, quick, elapsed):
    lines = [f"# Shrink latency benchmark{' (quick)' if quick else ''}\n\n",
             common.machine_markdown(info),
             "- models: random weights; `Magnitude(s, structure=Filter())` on every Dense/Conv2D "
             "except the output (depthwise channels follow their producers), then "
             "`tfprune.strip` + `tfprune.shrink`\n"
             "- latency: LiteRT interpreter (default XNNPACK delegate), 1 thread, batch 1; "
             "median of interleaved rounds, [min-max] over all runs\n"
             "- FLOPs ratio = dense FLOPs / kept FLOPs (`tfprune.sparsity_report`, "
             "Dense and conv layers); efficiency = speed-up / FLOPs ratio (1.0 = ideal; "
             "issue 4 target >= 0.8 on the MLP and the CNN)\n"
             f"- total run time: {elapsed / 60:.1f} min\n\n"]
    header = ["model", "variant", "params", "FLOPs ratio", "float32 us [min-max]",
              "float32 speed-up", "float32 speed-up / FLOPs ratio", "int8 us", "int8 speed-up",
              "int8 speed-up / FLOPs ratio", "float32 KiB", "int8 KiB"]
    table = []
    for r in rows:
        table.append([
            TITLES.get(r["model"], r["model"]), r["what"], f"{r['params']:,}",
            f"{r['flops_ratio']:.2f}x",
            f"{r['float32_latency_us']:.0f} [{r['float32_latency_min_us']:.0f}-"
            f"{r['float32_latency_max_us']:.0f}]",
            f"{r['float32_speedup']:.2f}x", f"{r['float32_efficiency']:.2f}",
            f"{r['int8_latency_us']:.0f}", f"{r['int8_speedup']:.2f}x",
            f"{r['int8_efficiency']:.2f}",
            common.fmt_kib(r["float32_bytes"]), common.fmt_kib(r["int8_bytes"]),
        ])
    lines.append(common.markdown_table(header, table, align="ll" + "r" * (len(header) - 2)))
    Path(path).write_text("".join(lines))


def write_plot(path, rows, info):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    pts = [r for r in rows if r["variant"] != "dense"]
    top = max([r["flops_ratio"] for r in pts] + [r["float32_speedup"] for r in pts]) * 1.3
    ax.plot([1, top], [1, top], "k--", lw=1, label="ideal (speed-up = FLOPs ratio)")
    ax.plot([1, top], [0.8, 0.8 * top], "k:", lw=1, label="0.8 x FLOPs ratio (issue 4 target)")
    markers = {"mlp": "o", "vgg": "s", "resnet": "^", "mobilenet": "D"}
    for q, fill in (("float32", True), ("int8", False)):
        for i, model in enumerate(MODELS):
            mine = [r for r in pts if r["model"] == model and r["variant"].startswith("shrunk")]
            if not mine:
                continue
            ax.scatter([r["flops_ratio"] for r in mine], [r[f"{q}_speedup"] for r in mine],
                       marker=markers[model], s=50, color=f"C{i}",
                       facecolors=None if fill else "none",
                       label=f"{TITLES[model]} ({q})")
    for r in pts:
        if not r["variant"].startswith("shrunk"):
            ax.scatter(r["flops_ratio"], r["float32_speedup"], marker="x", color="C7")
            ax.annotate(r["variant"] + " (sparse, float32)",
                        (r["flops_ratio"], r["float32_speedup"]), fontsize=7,
                        xytext=(4, -10), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOPs reduction (dense / shrunk)")
    ax.set_ylabel("measured LiteRT speed-up (1 thread)")
    ax.set_title(f"tfprune.shrink: speed-up vs FLOPs\n{info['date']}, {info['cpu']}, "
                 f"{info['cores']} cores, TF {info['tensorflow']}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shrink_latency",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer latency runs")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--out", default=str(common.DEFAULT_OUT), help="output folder")
    args = parser.parse_args(argv)
    names = args.models.split(",")
    unknown = set(names) - set(MODELS)
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)}; allowed: {list(MODELS)}")
    common.quiet_tf()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = common.machine_info()
    t0 = time.perf_counter()
    rows = run(names, quick=args.quick, log=lambda m: print(m, flush=True))
    elapsed = time.perf_counter() - t0
    stem = "shrink_latency_quick" if args.quick else "shrink_latency"
    write_markdown(out / f"{stem}.md", rows, info, args.quick, elapsed)
    write_plot(out / f"{stem}.png", rows, info)
    (out / f"{stem}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    print((out / f"{stem}.md").read_text())
    print(f"wrote {out / stem}.md/.json/.png ({elapsed / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
