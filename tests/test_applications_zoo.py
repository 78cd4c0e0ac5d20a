"""Real `keras.applications` architectures through prune -> fit -> strip -> shrink.

Random weights (`weights=None`), the smallest input each model accepts, a
10-class head. Each model is pruned with `Magnitude(0.5, structure=Filter())`,
fit for one step with the `Pruning` callback (one-shot pruning at step 0),
stripped and shrunk; the shrunk model must be smaller and compute what the
stripped model computes (within 1e-5, relative), and every place where
`shrink` keeps channels must be named.
"""

import keras
import numpy as np

import tfprune
from tfprune import methods, structures
from tfprune.surgery import DependencyGraph


def _prune_fit_strip(model):
    pruned = tfprune.prune(model, methods.Magnitude(0.5, structure=structures.Filter()))
    pruned.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(2, *model.inputs[0].shape[1:])).astype("float32")
    y = np.array([1, 3])
    pruned.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[tfprune.callbacks.Pruning()])
    return tfprune.strip(pruned), x


def _assert_exact(plain, small, x):
    ref = keras.ops.convert_to_numpy(plain(x, training=False))
    got = keras.ops.convert_to_numpy(small(x, training=False))
    scale = max(float(np.abs(ref).max()), 1e-12)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * scale)


def test_mobilenet_v3_small_shrinks_through_its_hard_sigmoid_operations():
    model = keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), weights=None, classes=10)
    # hard sigmoid is `relu6(x + 3) * (1/6)`: operation nodes without weights
    ops = [
        n.operation
        for d in model._nodes_by_depth.values()
        for n in d
        if not isinstance(n.operation, keras.layers.Layer)
    ]
    assert ops and not any(hasattr(op, "weights") for op in ops)
    assert [name for name, _ in DependencyGraph(model).stops] == ["predictions"]  # softmax
    plain, x = _prune_fit_strip(model)
    small, info = tfprune.shrink(plain, return_info=True)
    assert small.count_params() < 0.5 * plain.count_params()
    assert info.kept == []  # no dead channel left behind (2,301 before)
    assert [name for name, _ in info.stops] == ["predictions"]
    _assert_exact(plain, small, x)


# ~13 s on a 2-core machine (28M parameters at 32x32): in the default run.
def test_convnext_tiny_shrinks_its_hidden_units_and_names_the_layernorm_stops():
    model = keras.applications.ConvNeXtTiny(input_shape=(32, 32, 3), weights=None, classes=10)
    plain, x = _prune_fit_strip(model)
    small, info = tfprune.shrink(plain, return_info=True)
    assert small.count_params() < 0.6 * plain.count_params()
    # every block's 4C hidden units (Dense after the grouped conv and LayerNormalization)
    hidden = [name for name in info.removed if name.endswith("pointwise_conv_1")]
    assert len(hidden) == 18
    reasons = {reason for _, reason in info.stops}
    assert any("LayerNormalization normalizes over the channel axis" in r for r in reasons)
    assert not any("grouped" in r or "LayerScale" in r or "Add" in r for r in reasons)
    _assert_exact(plain, small, x)
