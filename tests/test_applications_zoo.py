"""Real `keras.applications` architectures through prune -> fit -> strip -> shrink.

Random weights (`weights=None`), the smallest input each model accepts, a
10-class head. Each model is pruned with `Magnitude(0.5, structure=Filter())`,
fit with the `Pruning` callback (one-shot pruning at step 0), stripped and
shrunk; the shrunk model must be smaller and compute what the stripped model
computes (within 1e-5, relative), and every place where `shrink` keeps
channels must be named.

The zoo and its pipeline are shared with `python -m benchmarks.architectures`
(which writes the table of docs/architectures.md): the cheap models run by
default, the others are marked `slow` (``pytest -m slow``).
"""

import json
from pathlib import Path

import keras
import numpy as np
import pytest

import tfprune
from benchmarks import architectures as zoo
from tfprune import methods, structures
from tfprune.surgery import DependencyGraph

REPO = Path(__file__).resolve().parent.parent


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


# -- the whole zoo (shared with benchmarks/architectures.py) ------------------------------------

# `--durations` on the shared 2-core machine (load 3-5): by default the U-Net 5 s and
# MobileNetV2 25 s (MobileNetV3Small 25 s and ConvNeXtTiny 27 s run by default above);
# slow: NASNetMobile 53 s, DenseNet121 30 s, ConvNeXtTiny 18 s, ResNet50 17 s,
# EfficientNetB0 16 s, MobileNetV3Small 10 s.
DEFAULT = ("unet", "mobilenet_v2")
ZOO = [pytest.param(name, id=name, marks=() if name in DEFAULT else pytest.mark.slow)
       for name in zoo.BUILDERS]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_filter_pruning_shrinks_exactly_and_names_every_stop(name):
    dense = zoo.build(name)
    dense_flops = tfprune.sparsity_report(dense).total["flops"]
    pruned, plain = zoo.prune_fit_strip(dense)
    masked = tfprune.sparsity_report(pruned).total
    small, info = tfprune.shrink(plain, return_info=True)
    x, _ = zoo.random_batch(dense, 4, seed=1)
    _assert_exact(plain, small, x)
    assert small.count_params() < plain.count_params() == dense.count_params()
    # the masks remove FLOPs (the softmax heads, and units that cannot go, stay dense)
    assert masked["flops_kept"] < 0.8 * dense_flops
    shrunk = tfprune.sparsity_report(small).total
    if not info.kept:
        # nothing dead stays: the shrunk model computes at most what the masks promise
        assert shrunk["flops"] <= masked["flops_kept"]
    # the report of the pruned model predicts the shrunk model's FLOPs exactly
    assert masked["flops_shrunk"] == shrunk["flops"]
    # every stop names a layer of the model and a reason
    names = {layer.name for layer in plain._flatten_layers(include_self=False)}
    for layer, reason in info.stops:
        assert layer in names and reason, (layer, reason)
    assert info.stops == DependencyGraph(plain).stops
    # every unit left dead in the shrunk model is explained by a named kept group
    for layer, n in zoo.dead_units(small).items():
        assert info.kept_for(layer), f"{n} dead units of '{layer}' kept without a reason"


# -- the benchmark harness --------------------------------------------------------------------


def test_benchmark_records_a_failing_model_goes_on_and_renders_again(tmp_path, monkeypatch):
    def broken():
        raise ValueError("no such model")

    monkeypatch.setitem(zoo.BUILDERS, "broken", broken)
    args = ["--models", "broken,unet", "--no-latency", "--out", str(tmp_path)]
    assert zoo.main(args) == 0
    data = json.loads((tmp_path / "architectures.json").read_text())
    rows = {r["model"]: r for r in data["rows"]}
    assert rows["broken"]["error"]["stage"] == "build"
    assert rows["broken"]["error"]["message"] == "no such model"
    assert "in broken" in rows["broken"]["error"]["where"][-1]
    row = rows["unet"]
    assert "error" not in row and row["exact"]
    assert row["params_shrunk"] < row["params_stripped"] == row["params_dense"]
    assert row["flops_shrunk"] < row["flops_masked"] < row["flops_dense"]
    assert row["flops_predicted"] == row["flops_shrunk"]
    assert data["command"].endswith("python -m benchmarks.architectures " + " ".join(args))
    for key in ("tensorflow", "keras", "ai-edge-litert", "tfprune", "cpu", "platform"):
        assert data["machine"][key], key
    md = (tmp_path / "architectures.md").read_text()
    assert "| U-Net" in md and row["commit"] in md
    assert "## Errors" in md and "`ValueError: no such model`" in md
    (tmp_path / "architectures.md").unlink()
    assert zoo.main(["--render", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "architectures.md").read_text() == md


def test_committed_architecture_results_are_rendered_from_their_json():
    results = REPO / "benchmarks" / "results"
    data = json.loads((results / "architectures.json").read_text())
    assert {r["model"] for r in data["rows"]} == set(zoo.BUILDERS)
    assert (results / "architectures.md").read_text() == zoo.render_markdown(data)



def test_docs_page_includes_the_results_file_and_the_benchmarks_page_does_not(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    config = {"config_file_path": str(tmp_path / "mkdocs.yml")}
    page = "# Supported architectures\n\n<!-- results:architectures.md -->\n"
    assert "No results in this build" in hooks.on_page_markdown(page, None, config, None)
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "architectures.md").write_text("# Zoo\n\n| a |\n| -- |\n| 1 |\n\n## Stops\n")
    (results / "shrink_latency.md").write_text("# Latency\n")
    text = hooks.on_page_markdown(page, None, config, None)
    assert "## Zoo\n" in text and "### Stops" in text and "results:" not in text
    bench = hooks._benchmark_results(config)
    assert "# Latency" in bench and "Zoo" not in bench
