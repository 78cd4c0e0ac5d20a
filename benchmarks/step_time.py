"""Training-step time of pruned models relative to the dense model.

For LeNet-300-100 and LeNet-5 (`tfprune.models`) on the bundled MNIST split
(`tfprune.datasets.load_mnist`), measures milliseconds per training step of
the dense model and of the same model wrapped by each method, trained with
`tfprune.callbacks.Pruning`:

* ``magnitude``: `Magnitude` unstructured, `PolynomialDecay` 0 -> 0.9 over the
  fit (a mask update every 100 steps);
* ``magnitude_filter``: `Magnitude` `Filter()` with the same schedule to 0.75;
* ``dpp_2of4``: `DPP(2, 4)` unstructured;
* ``dpp_filter``: `DPP(keep_ratio=0.25, structure="filter")`;
* ``turbo_vbi``: `TurboVBI(num_train_examples=len(x))` (turbo iteration at each
  epoch end; that iteration is not part of the step time, it is printed apart
  as ``turbo ms/epoch``).

Each run is one ``fit`` of ``1 + epochs`` epochs; the first epoch (tracing)
is dropped and the step time of a run is the median over the remaining epochs
of (time from the first batch's ``on_train_batch_begin`` to the last batch's
``on_train_batch_end``) / steps; the timing callback is first in the list, so
the `Pruning` callback's per-batch work is included. The machine is shared, so
the runs are interleaved (every configuration once per repeat, in a rotated
order) and the table shows the median over repeats of the ms/step and of the
ratio to the dense run of the same repeat.

Usage: ``python -m benchmarks.step_time [--models lenet_300_100 lenet5]
[--batch-sizes 64 128] [--repeats 3] [--epochs 3] [--methods ...] [--examples N]``
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tfprune  # noqa: E402
from tfprune import methods, schedules, structures  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
MODELS = {"lenet_300_100": tfprune.models.lenet_300_100, "lenet5": tfprune.models.lenet5}
METHODS = ("dense", "magnitude", "magnitude_filter", "dpp_2of4", "dpp_filter", "turbo_vbi")


def make_method(name, total_steps, num_examples):
    """The method of configuration ``name`` for a fit of ``total_steps`` steps."""
    end = max(total_steps - 1, 1)
    if name == "magnitude":
        return methods.Magnitude(schedule=schedules.PolynomialDecay(0.0, 0.9, 0, end))
    if name == "magnitude_filter":
        return methods.Magnitude(schedule=schedules.PolynomialDecay(0.0, 0.75, 0, end),
                                 structure=structures.Filter())
    if name == "dpp_2of4":
        return methods.DPP(2, 4)
    if name == "dpp_filter":
        return methods.DPP(keep_ratio=0.25, structure=structures.Filter())
    if name == "turbo_vbi":
        return methods.TurboVBI(num_train_examples=num_examples)
    raise ValueError(f"unknown method {name!r}; allowed: {METHODS}")


class StepTimer(keras.callbacks.Callback):
    """Per epoch: seconds from the first batch's begin to the last batch's end, and steps."""

    def __init__(self):
        super().__init__()
        self.epochs = []  # (seconds, steps)
        self.epoch_end = []  # seconds of the other callbacks' on_epoch_end (see EpochEndTimer)

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = None
        self._steps = 0

    def on_train_batch_begin(self, batch, logs=None):
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        self._t1 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append((self._t1 - self._t0, self._steps))
        self._t_end = time.perf_counter()


class EpochEndTimer(keras.callbacks.Callback):
    """Last in the list: the time the callbacks before it spent in on_epoch_end."""

    def __init__(self, timer):
        super().__init__()
        self.timer = timer

    def on_epoch_end(self, epoch, logs=None):
        self.timer.epoch_end.append(time.perf_counter() - self.timer._t_end)


def run_one(model_name, method_name, data, batch_size, epochs, seed=0):
    """``(ms per step, ms of epoch-end work per epoch)`` of one configuration."""
    x, y = data
    keras.utils.set_random_seed(seed)
    model = MODELS[model_name]()
    steps = int(np.ceil(len(x) / batch_size))
    callbacks = []
    timer = StepTimer()
    if method_name != "dense":
        model = tfprune.prune(model, make_method(method_name, steps * (epochs + 1), len(x)))
        callbacks = [tfprune.callbacks.Pruning()]
    model.compile(keras.optimizers.Adam(1e-3), LOSS)
    model.fit(x, y, batch_size=batch_size, epochs=epochs + 1, verbose=0,
              callbacks=[timer, *callbacks, EpochEndTimer(timer)])
    per_step = [t / n for t, n in timer.epochs[1:]]
    return 1e3 * float(np.median(per_step)), 1e3 * float(np.median(timer.epoch_end[1:]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (after a warm-up one)")
    parser.add_argument("--examples", type=int, default=None,
                        help="use the first N training examples (default: all)")
    args = parser.parse_args(argv)
    if "dense" not in args.methods:
        args.methods = ["dense", *args.methods]

    (x, y), _ = tfprune.datasets.load_mnist()
    if args.examples:
        x, y = x[: args.examples], y[: args.examples]
    inputs = {"lenet_300_100": x, "lenet5": x[..., None]}

    configs = [(m, b, meth) for m in args.models for b in args.batch_sizes
               for meth in args.methods]
    times = {c: [] for c in configs}
    ratios = {c: [] for c in configs}
    epoch_end = {c: [] for c in configs}
    for r in range(args.repeats):
        for model_name in args.models:
            for batch in args.batch_sizes:
                order = list(args.methods)
                k = r % len(order)
                order = order[k:] + order[:k]  # rotate: no method always runs first
                got = {}
                for meth in order:
                    ms, end_ms = run_one(model_name, meth, (inputs[model_name], y), batch,
                                         args.epochs, seed=r)
                    got[meth] = ms
                    times[(model_name, batch, meth)].append(ms)
                    epoch_end[(model_name, batch, meth)].append(end_ms)
                    print(f"  repeat {r} {model_name} b{batch} {meth}: {ms:.2f} ms/step",
                          flush=True)
                for meth in order:
                    ratios[(model_name, batch, meth)].append(got[meth] / got["dense"])

    print(f"\nms per training step (median of {args.repeats} repeats, {args.epochs} timed "
          f"epochs each, {len(x)} examples); ratio = median of per-repeat ratios to dense")
    header = (f"| {'model':<14} | {'batch':>5} | {'method':<16} | {'ms/step':>8} | "
              f"{'x dense':>7} | {'min..max ms':>13} | {'epoch-end ms':>12} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for c in configs:
        model_name, batch, meth = c
        t = np.asarray(times[c])
        print(f"| {model_name:<14} | {batch:>5} | {meth:<16} | {np.median(t):8.2f} | "
              f"{np.median(ratios[c]):7.2f} | {t.min():6.2f}..{t.max():6.2f} | "
              f"{np.median(epoch_end[c]):12.1f} |")
    return times, ratios


if __name__ == "__main__":
    main()
