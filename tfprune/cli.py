"""Command line: ``tfprune demo``, ``tfprune report``, ``tfprune export``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tfprune.models import lenet5  # noqa: F401  (kept importable from here)


def _quiet_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


# -- demo -------------------------------------------------------------------------


def _demo_method(name, steps, num_train_examples):
    """The pruning method of ``tfprune demo --method NAME`` (filter level: shrinkable)."""
    from tfprune import methods, schedules, structures

    if name == "magnitude":
        return methods.Magnitude(
            structure=structures.Filter(),
            schedule=schedules.PolynomialDecay(0.0, 0.75, begin_step=0,
                                               end_step=max(1, steps // 2),
                                               frequency=max(1, steps // 20)))
    if name == "dpp":
        return methods.DPP(keep_ratio=0.25, structure=structures.Filter())
    if name == "turbo-vbi":
        return methods.TurboVBI(num_train_examples=num_train_examples)
    raise ValueError(f"tfprune demo: unknown --method {name!r}; allowed: {DEMO_METHODS}.")


DEMO_METHODS = ("magnitude", "dpp", "turbo-vbi")


class _Progress:
    """A tqdm bar over all training batches of the demo, as a Keras callback."""

    def __init__(self, total, desc):
        import keras
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="batch", leave=False, file=sys.stderr)

        class _CB(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                bar.update(1)

            def on_epoch_end(self, epoch, logs=None):
                if logs and "accuracy" in logs:
                    bar.set_postfix(acc=f"{float(logs['accuracy']):.3f}")

        self.bar, self.callback = bar, _CB()

    def close(self):
        self.bar.close()


def _fit(model, x, y, epochs, batch_size, desc, callbacks=()):
    import math

    steps = epochs * math.ceil(len(x) / batch_size)
    progress = _Progress(steps, desc)
    try:
        model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0,
                  callbacks=[progress.callback, *callbacks])
    finally:
        progress.close()


def _accuracy(model, x, y):
    import numpy as np

    logits = model.predict(x, batch_size=512, verbose=0)
    return float(np.mean(np.argmax(logits, -1) == y))


def _tflite_accuracy(tflite, x, y):
    import numpy as np

    from tfprune.export import run_tflite

    return float(np.mean(np.argmax(run_tflite(tflite, x), -1) == y))


def demo(epochs=3, method="magnitude", out="tfprune_demo", batch_size=64, seed=0,
         max_samples=None, latency_runs=300):
    """Trains, prunes, shrinks and exports LeNet-5 on the bundled MNIST; returns the results.

    Args:
        epochs: epochs of dense training; pruning fine-tunes for as many.
        method: one of ``DEMO_METHODS``.
        out: output folder for the `.keras` and `.tflite` files.
        batch_size: training batch size.
        seed: `keras.utils.set_random_seed` seed.
        max_samples: use only this many training/test samples (smoke tests).
        latency_runs: LiteRT runs per latency measurement.

    Returns:
        A dict with the measured numbers (also printed as a report).
    """
    _quiet_tf()
    import keras
    import numpy as np

    import tfprune
    from tfprune.export import benchmark_tflite, export_tflite

    if method not in DEMO_METHODS:
        raise ValueError(f"tfprune demo: unknown --method {method!r}; allowed: {DEMO_METHODS}.")
    if epochs < 1:
        raise ValueError(f"tfprune demo: --epochs must be >= 1, got {epochs}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
    t0 = time.perf_counter()
    (x_train, y_train), (x_test, y_test) = tfprune.datasets.load_mnist()
    if max_samples:
        x_train, y_train = x_train[:max_samples], y_train[:max_samples]
        x_test, y_test = x_test[:max_samples], y_test[:max_samples]
    x_train, x_test = x_train[..., None], x_test[..., None]
    print(f"tfprune demo: LeNet-5 on the bundled MNIST split ({len(x_train)} train, "
          f"{len(x_test)} test), method={method}, epochs={epochs}")

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    dense = lenet5()
    dense.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
    _fit(dense, x_train, y_train, epochs, batch_size, "train dense")
    acc_dense = _accuracy(dense, x_test, y_test)
    dense.save(out / "dense.keras")

    steps = epochs * int(np.ceil(len(x_train) / batch_size))
    pruned = tfprune.prune(dense, _demo_method(method, steps, len(x_train)))
    pruned.compile(keras.optimizers.Adam(5e-4), loss, metrics=["accuracy"])
    _fit(pruned, x_train, y_train, epochs, batch_size, f"prune ({method})",
         callbacks=[tfprune.callbacks.Pruning()])
    acc_pruned = _accuracy(pruned, x_test, y_test)
    pruned.save(out / "pruned.keras")

    plain = tfprune.strip(pruned)
    small = tfprune.shrink(plain)
    acc_small = _accuracy(small, x_test, y_test)
    small.save(out / "shrunk.keras")

    rep = x_train[:256]
    files = {}
    for name, model in (("dense", dense), ("shrunk", small)):
        for q in (None, "int8"):
            path = out / f"{name}_{q or 'float32'}.tflite"
            files[(name, q)] = export_tflite(model, path, quantize=q, representative_data=rep)
    lat = {key: benchmark_tflite(blob, runs=latency_runs) for key, blob in files.items()
           if key[1] is None}
    acc_int8 = _tflite_accuracy(files[("shrunk", "int8")], x_test, y_test)

    rep_dense = tfprune.sparsity_report(dense)
    rep_small = tfprune.sparsity_report(small)
    print()
    print("Pruned model (masks, before shrink):")
    print(tfprune.sparsity_report(plain))
    print()
    print("Shrunk model (units physically removed):")
    print(rep_small)
    print()
    rows = [
        ("test accuracy", f"{acc_dense:.4f}", f"{acc_small:.4f}",
         f"{acc_small - acc_dense:+.4f}"),
        ("parameters", f"{rep_dense.total['params']:,}", f"{rep_small.total['params']:,}",
         f"{rep_dense.total['params'] / rep_small.total['params']:.2f}x fewer"),
        ("FLOPs / sample", f"{rep_dense.total['flops']:,}", f"{rep_small.total['flops']:,}",
         f"{rep_dense.total['flops'] / rep_small.total['flops']:.2f}x fewer"),
    ]
    for q in (None, "int8"):
        a, b = len(files[("dense", q)]), len(files[("shrunk", q)])
        rows.append((f"TFLite {q or 'float32'} size", f"{a / 1024:.1f} KiB", f"{b / 1024:.1f} KiB",
                     f"{a / b:.2f}x smaller"))
    ld, ls = lat[("dense", None)]["median_us"], lat[("shrunk", None)]["median_us"]
    rows.append(("LiteRT latency (median, 1 thread)", f"{ld:.1f} us", f"{ls:.1f} us",
                 f"{ld / ls:.2f}x faster"))
    rows.append(("int8 TFLite test accuracy", "", f"{acc_int8:.4f}", ""))
    widths = [max(len(r[i]) for r in rows + [("", "dense", "pruned+shrunk", "ratio")])
              for i in range(4)]
    print("  ".join(h.ljust(w) for h, w in zip(("", "dense", "pruned+shrunk", "ratio"), widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"\n(pruned model before shrink: accuracy {acc_pruned:.4f}; files in {out}/; "
          f"{time.perf_counter() - t0:.0f} s)")
    return {
        "acc_dense": acc_dense, "acc_pruned": acc_pruned, "acc_shrunk": acc_small,
        "acc_int8": acc_int8, "params": (rep_dense.total["params"], rep_small.total["params"]),
        "flops": (rep_dense.total["flops"], rep_small.total["flops"]),
        "sizes": {f"{k[0]}_{k[1] or 'float32'}": len(v) for k, v in files.items()},
        "latency_us": {k[0]: v["median_us"] for k, v in lat.items()},
    }


# -- report / export ----------------------------------------------------------------


def _load(path):
    _quiet_tf()
    import keras

    import tfprune  # noqa: F401  (registers the serializable classes)

    if not Path(path).exists():
        raise SystemExit(f"tfprune: model file not found: {path}")
    return keras.models.load_model(path, compile=False)


def report(path):
    import tfprune

    print(tfprune.sparsity_report(_load(path)))


def export(path, out, quantize=None, representative=None):
    import numpy as np

    import tfprune
    from tfprune.export import export_tflite
    from tfprune.wrapper import find_wrappers

    model = _load(path)
    if find_wrappers(model):
        model = tfprune.strip(model)
    rep = None
    if quantize == "int8":
        if representative:
            rep = np.load(representative)
        else:
            (x, _), _ = tfprune.datasets.load_mnist()
            shape = tuple(model.inputs[0].shape[1:])
            if x.shape[1:] != shape and x[..., None].shape[1:] == shape:
                x = x[..., None]
            if x.shape[1:] != shape:
                raise SystemExit(
                    f"tfprune export: --quantize int8 needs representative data for input shape "
                    f"{shape}; pass --representative FILE.npy.")
            rep = x[:256]
    blob = export_tflite(model, out, quantize=quantize, representative_data=rep)
    print(f"wrote {out} ({len(blob):,} bytes, quantize={quantize or 'float32'})")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tfprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train, prune, shrink and export LeNet-5 on bundled MNIST")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--method", choices=DEMO_METHODS, default="magnitude")
    p.add_argument("--out", default="tfprune_demo", help="output folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-samples", type=int, default=None, help=argparse.SUPPRESS)
    p = sub.add_parser("report", help="print the sparsity report of a .keras model")
    p.add_argument("model")
    p = sub.add_parser("export", help="export a .keras model to .tflite")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--quantize", choices=("dynamic", "float16", "int8"), default=None)
    p.add_argument("--representative", default=None,
                   help=".npy file of representative inputs for int8")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(epochs=args.epochs, method=args.method, out=args.out, batch_size=args.batch_size,
             seed=args.seed, max_samples=args.max_samples)
    elif args.command == "report":
        report(args.model)
    else:
        export(args.model, args.out, quantize=args.quantize, representative=args.representative)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
