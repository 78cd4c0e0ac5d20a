"""The tfmot baseline of `benchmarks.run`, run in its own process on tf_keras.

tfmot (tensorflow-model-optimization 0.8) only works with Keras 2, so this
script sets ``TF_USE_LEGACY_KERAS=1`` before TensorFlow is imported and builds
the benchmark architecture (`benchmarks.models`) with ``tf_keras``. The main
process hands over, through files, the same data, the same pretrained dense
weights and the same training settings (epochs, batch size, Adam learning rate,
seed, pruning schedule) that the tfprune rows use. For each configuration this
script fine-tunes with `tfmot.sparsity.keras.prune_low_magnitude`, strips with
`strip_pruning`, and writes:

- ``<name>.weights.npz``: the stripped weights (``get_weights()`` order), so
  the main process measures sparsity and FLOPs with `tfprune.sparsity_report`;
- ``<name>_float32.tflite`` and ``<name>_int8.tflite``: converted here with
  TF's converter, with the settings `tfprune.export_tflite` uses (float32: the
  sparse encoding when a kernel has >= 30% zeros; int8: full integer with
  float I/O); the main process measures size and LiteRT latency of every row
  the same way;
- ``results.json``: test accuracy and seconds per epoch of each configuration.

Usage: ``python -m benchmarks.tfmot_baseline SPEC.json`` (written by `benchmarks.run`).
"""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

SPARSE_THRESHOLD = 0.3  # tfprune.export.AUTO_SPARSITY_THRESHOLD (not imported: it imports Keras 3)


def _prune(model, config, schedule, tf_keras, tfmot):
    """Wraps ``model`` with prune_low_magnitude as ``config`` says."""
    sparsity = tfmot.sparsity.keras
    if config["kind"] == "unstructured":
        sched = sparsity.PolynomialDecay(0.0, config["sparsity"], 0, schedule["end_step"],
                                         frequency=schedule["frequency"])
        return sparsity.prune_low_magnitude(model, pruning_schedule=sched)
    if config["kind"] == "m_by_n":
        sched = sparsity.ConstantSparsity(0.5, 0, frequency=schedule["frequency"])
        return sparsity.prune_low_magnitude(model, pruning_schedule=sched,
                                            sparsity_m_by_n=tuple(config["m_by_n"]))
    if config["kind"] == "block":
        # tfmot's blocks need 2-D weights: Dense layers get blocks, convolutions
        # are pruned element-wise (the closest tfmot offers), at the same sparsity.
        def clone(layer):
            sched = sparsity.PolynomialDecay(0.0, config["sparsity"], 0, schedule["end_step"],
                                             frequency=schedule["frequency"])
            if isinstance(layer, tf_keras.layers.Dense):
                return sparsity.prune_low_magnitude(layer, pruning_schedule=sched,
                                                    block_size=tuple(config["block"]))
            if layer.weights:
                return sparsity.prune_low_magnitude(layer, pruning_schedule=sched)
            return layer.__class__.from_config(layer.get_config())

        return tf_keras.models.clone_model(model, clone_function=clone)
    raise ValueError(f"tfmot_baseline: unknown config kind {config['kind']!r}.")


def _convert(model, quantize, rep, tf):
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    kernels = [w for w in model.get_weights() if w.ndim >= 2]
    sparse = quantize is None and max(float(np.mean(w == 0)) for w in kernels) >= SPARSE_THRESHOLD
    opts = set()
    if quantize == "int8":
        opts.add(tf.lite.Optimize.DEFAULT)
        converter.representative_dataset = lambda: ([rep[i : i + 1]] for i in range(len(rep)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                               tf.lite.OpsSet.TFLITE_BUILTINS]
    if sparse:
        opts.add(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    converter.optimizations = opts
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return converter.convert()


def main(spec_path):
    spec = json.loads(Path(spec_path).read_text())
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras

    from benchmarks import models
    from benchmarks.common import EpochTimer

    out = Path(spec["out_dir"])
    data = np.load(spec["data"])
    x_train, y_train, x_test, y_test = (data[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    rep = data["rep"].astype(np.float32)
    init = np.load(spec["weights"])
    init = [init[f"w{i}"] for i in range(len(init.files))]
    results = {"tfmot_version": tfmot.__version__, "tf_keras_version": tf_keras.__version__,
               "rows": {}}
    for config in spec["configs"]:
        name = config["name"]
        tf_keras.utils.set_random_seed(spec["seed"])
        model = models.build(spec["model"], tf_keras)
        model.set_weights(init)
        callbacks = []
        if config["kind"] != "dense":
            model = _prune(model, config, spec["schedule"], tf_keras, tfmot)
            callbacks.append(tfmot.sparsity.keras.UpdatePruningStep())
        timer = EpochTimer(tf_keras)
        model.compile(tf_keras.optimizers.Adam(spec["lr"]),
                      tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        model.fit(x_train, y_train, epochs=spec["epochs"], batch_size=spec["batch_size"],
                  verbose=0, callbacks=callbacks + [timer])
        if config["kind"] != "dense":
            model = tfmot.sparsity.keras.strip_pruning(model)
        logits = model.predict(x_test, batch_size=512, verbose=0)
        accuracy = float(np.mean(np.argmax(logits, -1) == y_test))
        weights = model.get_weights()
        np.savez(out / f"{name}.weights.npz", **{f"w{i}": w for i, w in enumerate(weights)})
        for q in (None, "int8"):
            (out / f"{name}_{q or 'float32'}.tflite").write_bytes(_convert(model, q, rep, tf))
        results["rows"][name] = {"accuracy": accuracy, "epoch_seconds": timer.times}
        print(f"tfmot_baseline: {spec['model']} {name}: accuracy {accuracy:.4f}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m benchmarks.tfmot_baseline SPEC.json")
    main(sys.argv[1])
