"""Trains a pruned model under MirroredStrategy on two logical CPU devices.

Run as a script (by tests/test_callbacks.py, in a subprocess: logical devices
must be configured before TensorFlow initializes). Prints one JSON line with
the per-layer sparsity of the final masks, the pruning steps and the loss.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tfprune  # noqa: E402
from tfprune import methods, schedules  # noqa: E402
from tfprune import structures as S  # noqa: E402


def main(structure_name):
    keras.utils.set_random_seed(0)
    structure = {"unstructured": S.Unstructured(), "filter": S.Filter()}[structure_name]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x = np.random.default_rng(0).normal(size=(64, 8, 8, 1)).astype("float32")
    y = np.random.default_rng(1).integers(0, 3, 64)
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu", name="fc"),
            keras.layers.Dense(3, name="out"),
        ])
        sched = schedules.PolynomialDecay(0.0, 0.75, begin_step=0, end_step=4, frequency=2)
        pruned = tfprune.prune(model, methods.Magnitude(schedule=sched, structure=structure))
        pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    hist = pruned.fit(x, y, batch_size=16, epochs=2, verbose=0,
                      callbacks=[tfprune.callbacks.Pruning()])
    out = {"replicas": strategy.num_replicas_in_sync, "loss": hist.history["loss"],
           "sparsity": {}, "steps": {}, "units_kept": {}}
    for w in tfprune.wrapper.find_wrappers(pruned):
        out["steps"][w.name] = int(keras.ops.convert_to_numpy(w.step))
        if isinstance(w.method, methods.Follow):
            out["units_kept"][w.name] = int(w.method.unit_mask(w).sum())
            continue
        mask = w.method.final_masks(w)[w.handler.unit_spec().name]
        out["sparsity"][w.name] = float((mask == 0).mean())
        if structure.removes_units:
            out["units_kept"][w.name] = int(w.method.unit_mask(w).sum())
    # The pruning state (masks, steps) and the kernels are identical on both replicas.
    # (BatchNormalization's moving statistics are not: Keras leaves them per replica.)
    mismatch = 0.0
    for w in tfprune.wrapper.find_wrappers(pruned):
        state = [var for name, var in w.state.items() if name.endswith("mask")]
        for v in w.trainable_variables + [w.step] + state:
            vals = [np.asarray(t) for t in strategy.experimental_local_results(v.value)]
            assert len(vals) == 2, vals
            mismatch = max(mismatch, float(np.abs(vals[0] - vals[1]).max()))
    out["replica_mismatch"] = mismatch
    x_test = x[:8]
    plain = tfprune.strip(pruned)
    out["strip_max_diff"] = float(np.abs(keras.ops.convert_to_numpy(plain(x_test))
                                         - keras.ops.convert_to_numpy(pruned(x_test))).max())
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "unstructured")
