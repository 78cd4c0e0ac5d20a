"""Turbo-VBI on LeNet-300-100 and LeNet-5 (agreed MNIST split) vs dense and Magnitude.

For each model: train dense, then (from the same dense weights) prune with
`methods.TurboVBI` (turbo iteration each epoch, mask frozen for the last
``--finetune`` epochs) and with `methods.Magnitude` unstructured at the
sparsity Turbo-VBI reached, same number of epochs. Prints weight sparsity,
neurons removed, test accuracy, the regularity of the zeros
(``zeros_in_units`` / ``zeros_in_blocks`` of `tfprune.sparsity_report`) and the
training-step time relative to dense.

Usage: ``python benchmarks/turbo_vbi_lenet.py [--epochs 8] [--finetune 2] [--smoke]``
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tfprune  # noqa: E402
from tfprune import methods  # noqa: E402
from tfprune.export import benchmark_tflite, export_tflite  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times = getattr(self, "times", []) + [time.perf_counter() - self._t]


def _compile(model, lr=1e-3):
    model.compile(keras.optimizers.Adam(lr), LOSS, metrics=["accuracy"])
    return model


def _step_time(model, x, y, callbacks, batch_size):
    """Seconds per training step: the second of two epochs (the first one traces)."""
    timer = EpochTimer()
    model.fit(x, y, epochs=2, batch_size=batch_size, verbose=0, callbacks=callbacks + [timer])
    return timer.times[-1] / int(np.ceil(len(x) / batch_size))


def _turbo_time(model):
    """Seconds of one turbo iteration over all the model's layers."""
    t = time.perf_counter()
    for w in tfprune.wrapper.find_wrappers(model):
        w.method.turbo_step(w)
    return time.perf_counter() - t


def run(build, data, epochs, finetune, dense_epochs, batch_size=64, turbo_kwargs=None):
    (x, y), (xt, yt) = data
    keras.utils.set_random_seed(0)
    dense = _compile(build())
    dense.fit(x, y, epochs=dense_epochs, batch_size=batch_size, verbose=0)
    dense_acc = dense.evaluate(xt, yt, verbose=0)[1]
    dense_weights = dense.get_weights()
    dense_step = _step_time(_compile(build()), x, y, [], batch_size)

    steps_per_epoch = int(np.ceil(len(x) / batch_size))
    kw = dict(num_train_examples=len(x), kl_weight=0.05,
              freeze_step=(epochs - finetune) * steps_per_epoch + 1)
    kw.update(turbo_kwargs or {})
    keras.utils.set_random_seed(0)
    dense.set_weights(dense_weights)
    tvbi = _compile(tfprune.prune(dense, methods.TurboVBI(**kw)))
    history = []

    class Curves(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            row = {"epoch": epoch, "acc": logs.get("accuracy"),
                   "sparsity": tfprune.sparsity_report(self.model).total["sparsity"]}
            for w in tfprune.wrapper.find_wrappers(self.model):
                row.update({f"{w.name}/{k}": v for k, v in w.method.logs(w).items()})
            history.append(row)

    tvbi.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0,
             callbacks=[tfprune.callbacks.Pruning(), Curves()])
    tvbi_plain = _compile(tfprune.strip(tvbi))
    tvbi_acc = tvbi_plain.evaluate(xt, yt, verbose=0)[1]
    rep = tfprune.sparsity_report(tvbi_plain).total
    # LiteRT speed-up after shrink: dense vs the shrunk Turbo-VBI model, same run, float32.
    small = tfprune.shrink(tvbi_plain)
    lat_dense = benchmark_tflite(export_tflite(dense), runs=300)["median_us"]
    lat_small = benchmark_tflite(export_tflite(small), runs=300)["median_us"]
    flops_ratio = rep["flops"] / tfprune.sparsity_report(small).total["flops"]
    # Training-step time without the turbo iterations (timed apart): a fresh Turbo-VBI
    # model that never runs one (the fitted one is frozen: no noise, no KL).
    probe = _compile(tfprune.prune(dense, methods.TurboVBI(num_train_examples=len(x),
                                                           update_every=10 ** 9)))
    vbi_step = _step_time(probe, x, y, [tfprune.callbacks.Pruning()], batch_size)
    turbo_time = _turbo_time(probe)

    sparsity = rep["sparsity"]
    keras.utils.set_random_seed(0)
    dense.set_weights(dense_weights)
    mag = _compile(tfprune.prune(dense, methods.Magnitude(min(sparsity, 0.999))))
    mag.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0,
            callbacks=[tfprune.callbacks.Pruning()])
    mag_plain = _compile(tfprune.strip(mag))
    mag_acc = mag_plain.evaluate(xt, yt, verbose=0)[1]
    mrep = tfprune.sparsity_report(mag_plain).total
    return {
        "model": build().name, "dense_acc": dense_acc,
        "tvbi": {"acc": tvbi_acc, **rep}, "mag": {"acc": mag_acc, **mrep},
        "step_ratio": vbi_step / dense_step, "turbo_seconds_per_epoch": turbo_time,
        "dense_step_ms": 1e3 * dense_step, "tvbi_step_ms": 1e3 * vbi_step,
        "history": history, "latency_us": (lat_dense, lat_small),
        "shrink_flops_ratio": flops_ratio,
    }


def table(results):
    head = (f"{'model':<14} {'method':<10} {'acc':>7} {'d_acc':>7} {'sparsity':>8} "
            f"{'units':>9} {'in_units':>8} {'in_blocks':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['model']:<14} {'dense':<10} {r['dense_acc']:>7.4f}")
        for key, name in (("tvbi", "TurboVBI"), ("mag", "Magnitude")):
            m = r[key]
            lines.append(
                f"{'':<14} {name:<10} {m['acc']:>7.4f} {m['acc'] - r['dense_acc']:>+7.4f} "
                f"{m['sparsity']:>8.2%} {m['units_kept']:>4}/{m['units']:<4} "
                f"{m['zeros_in_units']:>8.3f} {m['zeros_in_blocks']:>9.3f}")
        lines.append(f"{'':<14} train step TurboVBI/dense: {r['tvbi_step_ms']:.1f} / "
                     f"{r['dense_step_ms']:.1f} ms = {r['step_ratio']:.2f}x; "
                     f"one turbo iteration: {r['turbo_seconds_per_epoch']:.1f} s")
        ld, ls = r["latency_us"]
        lines.append(f"{'':<14} after shrink: {r['shrink_flops_ratio']:.2f}x fewer FLOPs; LiteRT "
                     f"float32 {ld:.1f} -> {ls:.1f} us = {ld / ls:.2f}x faster")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--finetune", type=int, default=2)
    parser.add_argument("--dense-epochs", type=int, default=6)
    parser.add_argument("--smoke", action="store_true", help="tiny run (CI)")
    parser.add_argument("--kl-weight", type=float, default=0.05,
                        help="TurboVBI kl_weight (higher: sparser)")
    parser.add_argument("--models", default="lenet_300_100,lenet5",
                        help="comma-separated subset of lenet_300_100,lenet5")
    args = parser.parse_args(argv)
    (x, y), (xt, yt) = tfprune.datasets.load_mnist()
    x, xt = x[..., None], xt[..., None]
    if args.smoke:
        x, y, xt, yt = x[:512], y[:512], xt[:256], yt[:256]
        args.epochs, args.finetune, args.dense_epochs = 2, 1, 1
    def lenet_300_100():
        return tfprune.models.lenet_300_100(input_shape=(28, 28, 1))

    builds = {"lenet_300_100": lenet_300_100, "lenet5": tfprune.models.lenet5}
    results = [run(builds[name], ((x, y), (xt, yt)), args.epochs, args.finetune,
                   args.dense_epochs, turbo_kwargs={"kl_weight": args.kl_weight})
               for name in args.models.split(",")]
    print(table(results))
    return results


if __name__ == "__main__":
    main()
