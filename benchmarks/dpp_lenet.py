"""DPP on LeNet-5 / MNIST (the agreed split of `tfprune.datasets.load_mnist`).

Trains a dense LeNet-5-Caffe (conv 20@5x5, pool, conv 50@5x5, pool, FC 500,
FC 10), then fine-tunes copies of it with the same number of epochs:

* filter level, keeping 1/4 of the units of each hidden layer: DPP vs
  Magnitude(Filter) (gradual schedule), both shrunk with `tfprune.shrink`
  (accuracy, FLOPs, LiteRT latency);
* weight level at 90% sparsity: DPP 1-of-10 vs Magnitude 1-of-10 and
  unstructured Magnitude 90% (gradual schedule);
* joint 8-bit: DPP 1-of-10 with ``quantize=8``, exported to int8 TFLite
  (size and accuracy of the int8 model);
* training-step time of DPP vs dense (median epoch time after the first).

Usage: ``python benchmarks/dpp_lenet.py [--epochs 8] [--finetune 6] [--seed 0]``
(about 5-10 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import gzip
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tfprune  # noqa: E402
from tfprune import methods, schedules, structures  # noqa: E402
from tfprune.export import benchmark_tflite, export_tflite, run_tflite  # noqa: E402

BATCH = 64


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._t)

    def step_ms(self, steps):
        times = self.times[1:] or self.times  # the first epoch includes tracing
        return 1000 * float(np.median(times)) / steps


def compile_fit(model, x, y, epochs, callbacks=()):
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    timer = EpochTimer()
    model.fit(x, y, epochs=epochs, batch_size=BATCH, verbose=0,
              callbacks=[*callbacks, timer])
    return timer


def accuracy(model, x, y):
    logits = model.predict(x, batch_size=512, verbose=0)
    return float((logits.argmax(-1) == y).mean())


def flops(model):
    return tfprune.sparsity_report(model).total["flops_kept"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="dense training epochs")
    parser.add_argument("--finetune", type=int, default=6, help="pruning epochs per method")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    (x_train, y_train), (x_test, y_test) = tfprune.datasets.load_mnist()
    x_train, x_test = x_train[..., None], x_test[..., None]
    steps = int(np.ceil(len(x_train) / BATCH))
    ft_steps = steps * args.finetune

    keras.utils.set_random_seed(args.seed)
    dense = tfprune.models.lenet5()
    dense_timer = compile_fit(dense, x_train, y_train, args.epochs)
    dense_acc = accuracy(dense, x_test, y_test)
    dense_blob = export_tflite(dense)
    dense_int8 = export_tflite(dense, quantize="int8", representative_data=x_train[:256])
    dense_lat = benchmark_tflite(dense_blob)["median_us"]
    rows = [("dense", dense_acc, 0.0, flops(dense), dense_lat, len(dense_blob),
             dense_timer.step_ms(steps))]
    int8_rows = [("dense int8", accuracy_tflite(dense_int8, x_test, y_test), len(dense_int8),
                  len(gzip.compress(dense_int8)))]

    def gradual(sparsity):
        return schedules.PolynomialDecay(0.0, sparsity, 0, ft_steps // 2, frequency=steps // 4)

    runs = [
        ("filter 1/4 DPP", methods.DPP(keep_ratio=0.25, structure=structures.Filter()), True),
        ("filter 1/4 Magnitude", methods.Magnitude(
            structure=structures.Filter(), schedule=gradual(0.75)), True),
        ("weight 1-of-10 DPP", methods.DPP(1, 10, entropy_weight=1e-4), False),
        ("weight 1-of-10 Magnitude", methods.Magnitude(structure=structures.KOutOfN(1, 10)),
         False),
        ("weight 90% Magnitude", methods.Magnitude(schedule=gradual(0.9)), False),
        ("weight 1-of-10 DPP int8", methods.DPP(1, 10, entropy_weight=1e-4, quantize=8), False),
    ]
    for name, method, shrink in runs:
        keras.utils.set_random_seed(args.seed)
        pruned = tfprune.prune(dense, method)
        timer = compile_fit(pruned, x_train, y_train, args.finetune,
                            [tfprune.callbacks.Pruning()])
        model = tfprune.strip(pruned)
        if shrink:
            model = tfprune.shrink(model)
        report = tfprune.sparsity_report(model).total
        blob = export_tflite(model)
        rows.append((name, accuracy(model, x_test, y_test), report["sparsity"],
                     report["flops_kept"], benchmark_tflite(blob)["median_us"], len(blob),
                     timer.step_ms(steps)))
        if "int8" in name:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "dpp_int8.tflite")
                int8 = export_tflite(model, path, quantize="int8",
                                     representative_data=x_train[:256])
            int8_rows.append((name, accuracy_tflite(int8, x_test, y_test), len(int8),
                              len(gzip.compress(int8))))
        print(f"done: {name}", flush=True)

    print(f"\nLeNet-5 on MNIST ({len(x_train)} train / {len(x_test)} test), dense "
          f"{args.epochs} epochs, pruning {args.finetune} epochs, batch {BATCH}\n")
    header = f"{'model':<26}{'acc':>8}{'sparsity':>10}{'FLOPs':>12}{'x fewer':>9}" \
             f"{'LiteRT us':>11}{'tflite B':>10}{'step ms':>9}{'x dense':>9}"
    print(header)
    print("-" * len(header))
    for name, acc, sp, fl, lat, size, ms in rows:
        print(f"{name:<26}{acc:>8.2%}{sp:>10.1%}{fl:>12,.0f}{rows[0][3] / fl:>9.2f}"
              f"{lat:>11.0f}{size:>10,}{ms:>9.2f}{ms / rows[0][6]:>9.2f}")
    print(f"\n{'int8 TFLite':<26}{'acc':>8}{'bytes':>10}{'gzip B':>10}")
    for name, acc, size, gz in int8_rows:
        print(f"{name:<26}{acc:>8.2%}{size:>10,}{gz:>10,}")


def accuracy_tflite(blob, x, y):
    return float((run_tflite(blob, x).argmax(-1) == y).mean())


if __name__ == "__main__":
    main()
