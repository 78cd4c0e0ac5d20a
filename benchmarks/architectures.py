"""Real architectures through prune -> fit -> strip -> shrink (issue 11, item 4).

Usage (from the repository root)::

    python -m benchmarks.architectures [--models resnet50,unet,...] [--out benchmarks/results]
                                       [--runs N] [--render]

The zoo: seven `keras.applications` models (``weights=None``, ``classes=10``,
the smallest input they accept: 32x32x3) and a small U-Net (Conv2DTranspose
upsampling and skip Concatenates, a 10-class per-pixel head). Each model is
pruned with ``tfprune.prune(model, Magnitude(0.5, structure=Filter()))``,
fit for two steps (random data, batch 4) with `tfprune.callbacks.Pruning`,
stripped with `tfprune.strip` and shrunk with `tfprune.shrink`. Recorded per
model:

- exactness: the largest difference between the shrunk and the stripped
  model's outputs on a random batch, relative to the largest output (must be
  <= 1e-5);
- parameters of the dense, stripped (and its nonzero count) and shrunk model;
- FLOPs (`tfprune.sparsity_report`, Dense and convolution layers, one sample):
  dense, "masked" (what the report of the pruned model promises:
  ``flops_kept``) and shrunk (what the shrunk model computes);
- dead channels left: units of the shrunk model whose kernel slice is all
  zero, and the dead channels `shrink` reports it kept (``ShrinkInfo.kept``);
- every place the dependency graph stops (``ShrinkInfo.stops``), with its reason;
- LiteRT float32 single-thread latency (batch 1) of the dense and the shrunk
  model, measured in the same run in interleaved rounds, and the speed-up.

A model that fails records its error (stage and traceback summary) and the
run goes on. ``--models`` runs a subset and replaces only those rows of an
existing ``architectures.json`` (each row keeps its own commit and date);
``--render`` only redraws ``architectures.md`` from the JSON.

Outputs in ``--out``: ``architectures.json`` and ``architectures.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

from benchmarks import common

RTOL = 1e-5
TARGET_SPARSITY = 0.5
FIT_SAMPLES, BATCH = 8, 4  # two training steps

# -- the zoo ------------------------------------------------------------------------------------


def _app(name, size=32):
    def build():
        import keras

        fn = getattr(keras.applications, name)
        return fn(input_shape=(size, size, 3), weights=None, classes=10)

    build.__name__ = name
    build.__doc__ = f"`keras.applications.{name}` at {size}x{size}x3, random weights, 10 classes."
    return build


def unet(size=32, classes=10, width=16):
    """A small U-Net: two down stages, a bottleneck, two Conv2DTranspose up stages.

    Conv-BN-ReLU blocks; each up stage concatenates the upsampled tensor with
    the encoder tensor of the same resolution (skip connection); a 1x1
    convolution gives ``classes`` logits per pixel.
    """
    import keras

    L = keras.layers

    def block(x, filters, name):
        for i in (1, 2):
            x = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
            x = L.BatchNormalization(name=f"{name}_bn{i}")(x)
            x = L.ReLU(name=f"{name}_relu{i}")(x)
        return x

    inp = keras.Input((size, size, 3), name="image")
    e1 = block(inp, width, "enc1")
    e2 = block(L.MaxPooling2D(name="pool1")(e1), 2 * width, "enc2")
    b = block(L.MaxPooling2D(name="pool2")(e2), 4 * width, "bottleneck")
    u2 = L.Conv2DTranspose(2 * width, 2, strides=2, name="up2")(b)
    d2 = block(L.Concatenate(name="skip2")([u2, e2]), 2 * width, "dec2")
    u1 = L.Conv2DTranspose(width, 2, strides=2, name="up1")(d2)
    d1 = block(L.Concatenate(name="skip1")([u1, e1]), width, "dec1")
    out = L.Conv2D(classes, 1, activation="softmax", name="predictions")(d1)
    return keras.Model(inp, out, name="unet")


# name -> builder; the order of the table
BUILDERS = {
    "mobilenet_v3_small": _app("MobileNetV3Small"),
    "mobilenet_v2": _app("MobileNetV2"),
    "unet": unet,
    "resnet50": _app("ResNet50"),
    "efficientnet_b0": _app("EfficientNetB0"),
    "densenet121": _app("DenseNet121"),
    "nasnet_mobile": _app("NASNetMobile"),
    "convnext_tiny": _app("ConvNeXtTiny"),
}
TITLES = {
    "mobilenet_v3_small": "MobileNetV3Small", "mobilenet_v2": "MobileNetV2",
    "unet": "U-Net (Conv2DTranspose, skip Concatenate)", "resnet50": "ResNet50",
    "efficientnet_b0": "EfficientNetB0", "densenet121": "DenseNet121",
    "nasnet_mobile": "NASNetMobile", "convnext_tiny": "ConvNeXtTiny",
}


def build(name):
    """A built, freshly seeded zoo model (`keras.Model`) by its key in `BUILDERS`."""
    import keras

    if name not in BUILDERS:
        raise ValueError(f"architectures.build: unknown model {name!r}; allowed: "
                         f"{list(BUILDERS)}")
    keras.utils.set_random_seed(0)
    return BUILDERS[name]()


# -- the pipeline -------------------------------------------------------------------------------


def random_batch(model, n, seed=0):
    """Inputs in [0, 255) (the applications rescale or normalize them) and integer labels."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, size=(n, *model.inputs[0].shape[1:])).astype("float32")
    out = model.outputs[0].shape
    y = rng.integers(0, out[-1], size=(n, *out[1:-1]))
    return x, y


def prune_fit_strip(model, sparsity=TARGET_SPARSITY, steps=FIT_SAMPLES // BATCH):
    """Filter-level Magnitude pruning, a short fit with the Pruning callback, strip.

    Returns:
        ``(pruned, stripped)``: the pruned model (with its wrappers, after the
        fit) and `tfprune.strip` of it.
    """
    import tfprune
    from tfprune import methods, structures

    pruned = tfprune.prune(model, methods.Magnitude(sparsity, structure=structures.Filter()))
    pruned.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x, y = random_batch(model, steps * BATCH)
    pruned.fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
               callbacks=[tfprune.callbacks.Pruning()])
    return pruned, tfprune.strip(pruned)


def relative_error(reference, model, x):
    """max |model(x) - reference(x)| / max |reference(x)| (inference mode)."""
    import keras
    import numpy as np

    ref = keras.ops.convert_to_numpy(reference(x, training=False))
    got = keras.ops.convert_to_numpy(model(x, training=False))
    return float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))


def dead_units(model):
    """{layer: units whose kernel slice is all zero} of a plain model (report rows)."""
    import tfprune

    rows = tfprune.sparsity_report(model).rows
    return {r["layer"]: r["units"] - r["units_kept"] for r in rows if r["units"] > r["units_kept"]}


def _error(stage, exc):
    tb = traceback.extract_tb(exc.__traceback__)
    frames = [f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in tb[-4:]]
    return {"stage": stage, "type": type(exc).__name__, "message": str(exc)[:2000],
            "where": frames}


def run_model(name, latency=True, runs=None, log=print):
    """The full pipeline on one zoo model; never raises (errors are recorded in the row).

    Args:
        name: a key of `BUILDERS`.
        latency: export the dense and shrunk models to LiteRT and time them.
        runs: timed inferences per round (default: fitted to ~0.3 s per round).
        log: progress printer.

    Returns:
        A dict (one JSON row).
    """
    import keras

    import tfprune
    from tfprune.surgery import DependencyGraph

    row = {"model": name, "title": TITLES.get(name, name), "sparsity": TARGET_SPARSITY,
           "commit": git_commit(), "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}
    times = row["seconds"] = {}
    stage = "build"
    t = time.perf_counter()

    def lap(key):
        nonlocal t
        now = time.perf_counter()
        times[key] = round(now - t, 1)
        t = now

    try:
        keras.backend.clear_session()
        dense = build(name)
        row["input_shape"] = list(dense.inputs[0].shape[1:])
        dense_report = tfprune.sparsity_report(dense).total
        row["params_dense"] = int(dense.count_params())
        row["flops_dense"] = dense_report["flops"]
        lap("build")
        stage = "prune + fit"
        pruned, plain = prune_fit_strip(dense)
        masked = tfprune.sparsity_report(pruned).total
        row["flops_masked"] = masked["flops_kept"]
        row["flops_predicted"] = masked.get("flops_shrunk")
        row["units_masked"] = masked["units"] - masked["units_kept"]
        row["params_stripped"] = int(plain.count_params())
        row["nonzero_stripped"] = int(tfprune.sparsity_report(plain).total["nonzero"])
        lap("prune_fit_strip")
        stage = "graph"
        row["stops"] = [list(s) for s in DependencyGraph(plain).stops]
        stage = "shrink"
        small, info = tfprune.shrink(plain, return_info=True)
        lap("shrink")
        row["stops"] = [list(s) for s in info.stops]
        row["kept"] = [list(k) for k in info.kept]
        row["removed_layers"] = len(info.removed)
        row["folded"] = dict(info.folded)
        row["params_shrunk"] = int(small.count_params())
        shrunk = tfprune.sparsity_report(small).total
        row["flops_shrunk"] = shrunk["flops"]
        dead = dead_units(small)
        row["dead_units"] = sum(dead.values())
        row["dead_units_by_layer"] = dead
        stage = "exactness"
        x, _ = random_batch(dense, 4, seed=1)
        row["rel_error"] = relative_error(plain, small, x)
        row["exact"] = row["rel_error"] <= RTOL
        if latency:
            stage = "export + latency"
            blobs = {"dense": tfprune.export_tflite(dense), "shrunk": tfprune.export_tflite(small)}
            lat = _measure(blobs, runs)
            row["latency_us"] = {k: v["median_us"] for k, v in lat.items()}
            row["latency_range_us"] = {k: [v["min_us"], v["max_us"]] for k, v in lat.items()}
            row["latency_runs"] = lat["dense"]["runs"]
            row["speedup"] = lat["dense"]["median_us"] / lat["shrunk"]["median_us"]
            lap("latency")
    except Exception as exc:  # noqa: BLE001 - one failing model must not end the run
        row["error"] = _error(stage, exc)
        log(f"[{name}] FAILED at {stage}: {type(exc).__name__}: {str(exc)[:300]}")
    times["total"] = round(sum(v for k, v in times.items() if k != "total"), 1)
    log(f"[{name}] {summary(row)}")
    return row


def _measure(blobs, runs=None, rounds=3, budget_s=0.3):
    """Interleaved LiteRT rounds (1 thread, batch 1): `benchmarks.shrink_latency.measure`."""
    from benchmarks.shrink_latency import measure

    if runs is not None:
        return measure(blobs, rounds=rounds, budget_s=0.0, low=runs, high=runs)
    return measure(blobs, rounds=rounds, budget_s=budget_s, low=20, high=500)


def summary(row):
    """One line about a row."""
    if "error" in row and "params_shrunk" not in row:
        e = row["error"]
        return f"error at {e['stage']}: {e['type']}"
    parts = [f"params {row['params_dense']:,} -> {row['params_shrunk']:,}",
             f"FLOPs masked {_pct(row['flops_masked'], row['flops_dense'])}, "
             f"shrunk {_pct(row['flops_shrunk'], row['flops_dense'])}",
             f"dead {row['dead_units']}", f"stops {len(row['stops'])}"]
    if "rel_error" in row:
        parts.append(f"rel. error {row['rel_error']:.1e}")
    if "speedup" in row:
        parts.append(f"LiteRT speed-up {row['speedup']:.2f}x")
    if "error" in row:
        parts.append(f"error at {row['error']['stage']}: {row['error']['type']}")
    return "; ".join(parts)


# -- provenance ---------------------------------------------------------------------------------


def git_commit():
    """The checkout's commit (with ``-dirty`` when tracked files changed), or "unknown"."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=common.REPO,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=common.REPO, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command(argv):
    """The command line that reproduces this run (with TF_ENABLE_ONEDNN_OPTS when it is set)."""
    env = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    prefix = f"TF_ENABLE_ONEDNN_OPTS={shlex.quote(env)} " if env is not None else ""
    return (prefix + "python -m benchmarks.architectures"
            + "".join(f" {shlex.quote(a)}" for a in argv))


# -- output -------------------------------------------------------------------------------------


def _pct(part, whole):
    if part is None or not whole:
        return "-"
    return f"{part / whole:.0%}"


def _human(n):
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _stop_kind(reason):
    """A short label for a stop reason (the text up to the first colon or parenthesis)."""
    for sep in (":", " ("):
        reason = reason.split(sep, 1)[0]
    return reason.strip()


def render_markdown(data):
    """The markdown of a results dict (``{"machine", "command", "rows"}``)."""
    info, rows = data["machine"], data["rows"]
    commits = sorted({r.get("commit", "?") for r in rows})
    lines = [
        "# Architecture zoo: Filter pruning, strip, shrink\n\n",
        common.machine_markdown(info),
        f"- commit: {', '.join(commits)}\n",
        f"- platform: {info.get('platform', '?')}\n",
        f"- command: `{data['command']}`\n",
        f"- pipeline: `tfprune.prune(model, Magnitude({TARGET_SPARSITY}, "
        "structure=Filter()))`, two training steps (random data, batch 4) with "
        "`tfprune.callbacks.Pruning`, `tfprune.strip`, `tfprune.shrink`; random weights "
        "(`weights=None`), 32x32x3 inputs, 10 classes\n",
        "- FLOPs: `tfprune.sparsity_report` (Dense and convolution layers, one sample); "
        "masked = `flops_kept` of the pruned model (its nonzero weights), predicted = "
        "`flops_shrunk` of the pruned model's report (what shrink will give, from the masks), "
        "shrunk = FLOPs of the shrunk model (what it computes)\n",
        "- dead = units of the shrunk model whose kernel slice is all zero; stops = places "
        "where the dependency graph stops (below)\n",
        "- error = max |shrunk - stripped| / max |stripped| on a random batch (exact: <= 1e-5)\n",
        "- LiteRT: float32, 1 thread, batch 1, median of interleaved rounds of the dense and "
        "the shrunk model in the same run; efficiency = speed-up / FLOPs ratio (1.0 = the "
        "speed-up is as large as the FLOPs reduction)\n\n",
    ]
    header = ["model", "params dense", "params shrunk", "FLOPs dense", "masked FLOPs",
              "predicted FLOPs", "shrunk FLOPs", "dead", "stops", "error", "LiteRT dense ms",
              "LiteRT shrunk ms", "speed-up", "efficiency"]
    table = []
    for r in rows:
        title = TITLES.get(r["model"], r["model"])
        if "params_shrunk" not in r:
            e = r.get("error", {})
            table.append([title, f"{r['params_dense']:,}" if "params_dense" in r else "-"]
                         + ["-"] * 5 + ["-", "-", f"**{e.get('type', '?')}** at "
                                        f"{e.get('stage', '?')}"] + ["-"] * 4)
            continue
        ratio = r["flops_dense"] / max(r["flops_shrunk"], 1) if r["flops_dense"] else None
        lat = r.get("latency_us")
        err = f"{r['rel_error']:.0e}" if "rel_error" in r else "-"
        if "rel_error" in r and not r["exact"]:
            err = f"**{err} (inexact)**"
        table.append([
            title, f"{r['params_dense']:,}", f"{r['params_shrunk']:,}",
            _human(r["flops_dense"]),
            f"{_human(r['flops_masked'])} ({_pct(r['flops_masked'], r['flops_dense'])})",
            (f"{_human(r['flops_predicted'])} ({_pct(r['flops_predicted'], r['flops_dense'])})"
             if r.get("flops_predicted") is not None else "-"),
            f"{_human(r['flops_shrunk'])} ({_pct(r['flops_shrunk'], r['flops_dense'])})",
            f"{r['dead_units']:,}", len(r["stops"]), err,
            f"{lat['dense'] / 1e3:.2f}" if lat else "-",
            f"{lat['shrunk'] / 1e3:.2f}" if lat else "-",
            f"{r['speedup']:.2f}x" if lat else "-",
            f"{r['speedup'] / ratio:.2f}" if lat and ratio else "-",
        ])
    lines.append(common.markdown_table(header, table))
    lines.append("\n## Where shrink stops\n\n")
    for r in rows:
        title = TITLES.get(r["model"], r["model"])
        stops, kept = r.get("stops", []), r.get("kept", [])
        if not stops and not kept:
            lines.append(f"- **{title}**: no stop\n")
            continue
        kinds = {}
        for layer, reason in stops:
            kinds.setdefault(_stop_kind(reason), []).append(layer)
        text = "; ".join(f"{kind} ({len(names)}x: {_names(names)})"
                         for kind, names in kinds.items())
        lines.append(f"- **{title}**: {text or 'no stop'}\n")
        if kept:
            n = sum(k[1] for k in kept)
            reasons = sorted({_stop_kind(k[2]) for k in kept})
            lines.append(f"    - {n:,} dead channels kept in {len(kept)} groups: "
                         f"{'; '.join(reasons)}\n")
    failed = [r for r in rows if "error" in r]
    if failed:
        lines.append("\n## Errors\n\n")
        for r in failed:
            e = r["error"]
            lines.append(f"- **{TITLES.get(r['model'], r['model'])}** at {e['stage']}: "
                         f"`{e['type']}: {_one_line(e['message'])}` "
                         f"({' > '.join(e['where'])})\n")
    lines.append("\nThe full stop reasons, the kept channels and the per-layer dead units are "
                 "in `architectures.json`.\n")
    return "".join(lines)


def _names(names, limit=3):
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _one_line(text, limit=200):
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


def _merge(path, rows):
    """Rows of an existing results file with ``rows`` replacing those of the same models."""
    new = {r["model"]: r for r in rows}
    old = []
    if path.exists():
        try:
            old = json.loads(path.read_text())["rows"]
        except (ValueError, KeyError):
            old = []
    merged = {r["model"]: r for r in old}
    merged.update(new)
    order = list(BUILDERS) + [m for m in merged if m not in BUILDERS]
    return [merged[m] for m in order if m in merged]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.architectures",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(BUILDERS),
                        help="comma-separated subset of " + ",".join(BUILDERS))
    parser.add_argument("--out", default=str(common.DEFAULT_OUT), help="output folder")
    parser.add_argument("--runs", type=int, default=None,
                        help="timed LiteRT inferences per round (default: about 0.3 s a round)")
    parser.add_argument("--no-latency", action="store_true", help="skip the LiteRT timing")
    parser.add_argument("--render", action="store_true",
                        help="only redraw architectures.md from architectures.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    json_path, md_path = out / "architectures.json", out / "architectures.md"
    if args.render:
        if not json_path.exists():
            parser.error(f"--render: {json_path} does not exist; run the benchmark first")
        md_path.write_text(render_markdown(json.loads(json_path.read_text())))
        print(f"wrote {md_path}")
        return 0
    names = args.models.split(",")
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; allowed: {list(BUILDERS)}")
    if args.runs is not None and args.runs < 1:
        parser.error(f"--runs: must be >= 1, got {args.runs}")
    common.quiet_tf()
    out.mkdir(parents=True, exist_ok=True)
    info = common.machine_info()
    info["platform"] = platform.platform()
    data = {"machine": info, "command": command(argv), "commit": git_commit(), "rows": []}
    t0 = time.perf_counter()
    rows = []
    for name in names:
        rows.append(run_model(name, latency=not args.no_latency, runs=args.runs,
                              log=lambda m: print(m, flush=True)))
        # written after every model: an interrupted run keeps what it measured
        data["rows"] = _merge(json_path, rows)
        data["elapsed_s"] = time.perf_counter() - t0
        json_path.write_text(json.dumps(data, indent=1, default=float))
        md_path.write_text(render_markdown(data))
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path} ({data['elapsed_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
