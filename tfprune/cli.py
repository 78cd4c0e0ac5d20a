"""Command line: ``tfprune demo``, ``tfprune report``, ``tfprune export``.

Errors never show a Python traceback: a bad command line (an invalid option value, a
path that does not exist or is a directory, a missing option) prints the usage and one
``tfprune CMD: error: ...`` line and exits with status 2, like any argparse error; a
failure (a file that is not a Keras model or a ``.npy`` array, data that does not fit the
model, an export that fails) prints one such line and exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tfprune.models import lenet5  # noqa: F401  (kept importable from here)

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


class UsageError(Exception):
    """A command line that cannot work as given: exit status 2, with the usage."""


class CommandError(Exception):
    """A command that failed on its inputs: exit status 1, one line, no traceback."""


def _one_line(exc):
    """``"Type: message"`` of an exception, on a single line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
    for name, value in (("epochs", epochs), ("batch_size", batch_size),
                        ("latency_runs", latency_runs)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"tfprune demo: `{name}` must be an integer >= 1, got {value!r}.")
    if max_samples is not None and (isinstance(max_samples, bool)
                                    or not isinstance(max_samples, int | np.integer)
                                    or max_samples < 1):
        raise ValueError(f"tfprune demo: `max_samples` must be None or an integer >= 1, "
                         f"got {max_samples!r}.")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"tfprune demo: `out` must be a folder, but {str(out)!r} is a file.")
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
    """Loads a ``.keras`` (or legacy ``.h5``) model; `CommandError` if that fails."""
    _quiet_tf()
    import zipfile

    import keras

    import tfprune  # noqa: F401  (registers the serializable classes)

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"model file not found: {path}" if not path.exists() else
                         f"{path} is not a file; expected a Keras model file "
                         f"({', '.join(MODEL_SUFFIXES)})")
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise CommandError(f"{path} is not a Keras model file: expected a name ending in "
                           f"{', '.join(MODEL_SUFFIXES)}, got {path.suffix or 'no extension'!r}")
    if path.suffix.lower() == ".keras" and not zipfile.is_zipfile(path):
        raise CommandError(f"{path} is not a Keras model file: a .keras file is a zip archive, "
                           f"this one is not")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # any failure to read the file is the file's fault, not ours
        raise CommandError(f"cannot load {path} as a Keras model: {_one_line(exc)}") from exc


def _load_array(path):
    """Loads the ``--representative`` array (``.npy``, or ``.npz`` holding one array)."""
    import numpy as np

    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise CommandError(f"cannot read --representative {path} as a .npy array: "
                           f"{_one_line(exc)}") from exc
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            names = list(data.files)
            if len(names) != 1:
                raise CommandError(f"--representative {path} holds {len(names)} arrays "
                                   f"({names}); expected one (save it with numpy.save)")
            data = data[names[0]]
    if data.dtype.kind not in "biuf":
        raise CommandError(f"--representative {path} holds {data.dtype} values; expected numbers")
    return data


def report(path):
    """Prints the sparsity report of the model saved at ``path``."""
    import tfprune

    print(tfprune.sparsity_report(_load(path)))


def export(path, out, quantize=None, representative=None):
    """Exports the model saved at ``path`` (stripped if pruned) to the ``.tflite`` file ``out``.

    Args:
        path: ``.keras`` (or legacy ``.h5``) model file.
        out: the ``.tflite`` file to write.
        quantize: None, ``"dynamic"``, ``"float16"`` or ``"int8"``.
        representative: ``.npy`` file of calibration inputs for int8 (default: the bundled
            MNIST, if it fits the model's input).

    Raises:
        UsageError: the options cannot work for this model.
        CommandError: a file cannot be read or does not fit the model.
    """
    import tfprune
    from tfprune.export import export_tflite
    from tfprune.wrapper import find_wrappers

    if representative is not None and quantize != "int8":
        raise UsageError(f"--representative is only used with --quantize int8, "
                         f"got --quantize {quantize or 'none (float32)'}")
    model = _load(path)
    if find_wrappers(model):
        model = tfprune.strip(model)
    rep = None
    if quantize == "int8":
        inputs = getattr(model, "inputs", None) or []
        if len(inputs) != 1:
            raise UsageError(f"--quantize int8 from the command line needs a model with one "
                             f"input, {path} has {len(inputs)}; call tfprune.export_tflite "
                             f"with representative_data from Python")
        shape = tuple(inputs[0].shape[1:])
        if representative:
            rep = _load_array(representative)
            if rep.ndim != len(shape) + 1 or any(
                    d is not None and d != got for d, got in zip(shape, rep.shape[1:])):
                want = ", ".join("any" if d is None else str(d) for d in shape)
                raise CommandError(f"--representative {representative} has shape {rep.shape}; "
                                   f"the model input needs (samples, {want})")
        else:
            (x, _), _ = tfprune.datasets.load_mnist()
            if x.shape[1:] != shape and x[..., None].shape[1:] == shape:
                x = x[..., None]
            if x.shape[1:] != shape:
                raise UsageError(
                    f"--quantize int8 needs representative data for input shape {shape} "
                    f"(the bundled MNIST does not fit); pass --representative FILE.npy")
            rep = x[:256]
    blob = export_tflite(model, out, quantize=quantize, representative_data=rep)
    print(f"wrote {out} ({len(blob):,} bytes, quantize={quantize or 'float32'})")


def _int_at_least(minimum):
    """An argparse ``type``: an integer ``>= minimum``."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def _check_paths(sub, args):
    """Usage errors for paths that cannot work: missing inputs, missing output folders."""

    def input_file(text, what):
        path = Path(text)
        if not path.exists():
            sub.error(f"{what}: file not found: {text}")
        if not path.is_file():
            sub.error(f"{what}: {text} is not a file")

    if args.command in ("report", "export"):
        input_file(args.model, "argument model")
    if args.command == "export":
        out = Path(args.out)
        if out.is_dir():
            sub.error(f"argument out: {args.out} is a directory; give a file name such as "
                      f"{out / 'model.tflite'}")
        if not out.parent.is_dir():
            sub.error(f"argument out: output folder {str(out.parent)!r} does not exist")
        if args.representative is not None:
            input_file(args.representative, "argument --representative")
    if args.command == "demo":
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            sub.error(f"argument --out: {args.out} is a file, not a folder")


def main(argv=None):
    """Runs the ``tfprune`` command line.

    Args:
        argv: the arguments (``sys.argv[1:]`` by default).

    Returns:
        0 on success, 1 if the command failed (one ``tfprune CMD: error: ...`` line
        printed on stderr).

    Raises:
        SystemExit: with status 2 on a usage error (argparse's convention).
    """
    parser = argparse.ArgumentParser(prog="tfprune", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    subs = {}
    p = subs["demo"] = sub.add_parser(
        "demo", help="train, prune, shrink and export LeNet-5 on bundled MNIST")
    p.add_argument("--epochs", type=_int_at_least(1), default=3)
    p.add_argument("--method", choices=DEMO_METHODS, default="magnitude")
    p.add_argument("--out", default="tfprune_demo", help="output folder")
    p.add_argument("--batch-size", type=_int_at_least(1), default=64)
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--max-samples", type=_int_at_least(1), default=None, help=argparse.SUPPRESS)
    p = subs["report"] = sub.add_parser("report",
                                        help="print the sparsity report of a .keras model")
    p.add_argument("model")
    p = subs["export"] = sub.add_parser("export", help="export a .keras model to .tflite")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--quantize", choices=("dynamic", "float16", "int8"), default=None)
    p.add_argument("--representative", default=None,
                   help=".npy file of representative inputs for int8")
    args = parser.parse_args(argv)
    cmd = subs[args.command]
    _check_paths(cmd, args)
    try:
        if args.command == "demo":
            demo(epochs=args.epochs, method=args.method, out=args.out,
                 batch_size=args.batch_size, seed=args.seed, max_samples=args.max_samples)
        elif args.command == "report":
            report(args.model)
        else:
            export(args.model, args.out, quantize=args.quantize,
                   representative=args.representative)
    except UsageError as exc:
        cmd.error(str(exc))
    except CommandError as exc:
        print(f"{cmd.prog}: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError) as exc:  # tfprune's and the OS's reported errors
        print(f"{cmd.prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
