"""Tests of the benchmark suite (`benchmarks/`): the smoke runs produce sane tables and plots."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(args, out, env=None):
    env = dict(os.environ, **(env or {}), TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "")
                                                      .split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, "-m", *args, "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _rows(path):
    """{model: {config: row}} of a benchmark JSON."""
    out = {}
    for r in json.loads(Path(path).read_text())["rows"]:
        out.setdefault(r["model"], {})[r["config"]] = r
    return out


def _check_run(out, mode):
    md = out / f"benchmark_{mode}.md"
    text = md.read_text()
    for needle in ("| row | test acc", "Ratios to dense", "machine:", "tensorflow 2.", "keras 3."):
        assert needle in text, needle
    for plot in (f"accuracy_vs_sparsity_{mode}.png", f"speedup_vs_flops_{mode}.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_model = _rows(out / f"benchmark_{mode}.json")
    for rows in by_model.values():
        _check_model(rows)
    return by_model


def _check_model(rows):
    must_work = ["dense", "magnitude_unstructured_90", "magnitude_block4x1_90", "magnitude_2of4",
                 "magnitude_filter_75_shrunk", "tfmot_dense", "tfmot_unstructured_90",
                 "tfmot_2of4", "tfmot_block1x4_90", "tfmot_block4x1_90"]
    for name in must_work:
        assert name in rows and "error" not in rows[name], rows.get(name)
    dense = rows["dense"]
    # A few weights of a trained dense model can be exactly 0 (the zero-initialized bias of a
    # unit whose ReLU never fires gets no gradient).
    assert dense["accuracy"] > 0.8 and dense["sparsity"] < 1e-3 and dense["flops_kept"] > 0.999
    assert dense["float32_speedup"] == 1.0 and dense["float32_latency_us"] > 0
    # The same weights trained by the same recipe in tf_keras land close to Keras 3.
    assert abs(rows["tfmot_dense"]["accuracy"] - dense["accuracy"]) < 0.05
    for name in ("magnitude_unstructured_90", "magnitude_block4x1_90", "tfmot_unstructured_90",
                 "tfmot_block4x1_90"):
        assert rows[name]["sparsity"] == pytest.approx(0.9, abs=0.02), name
        assert rows[name]["float32_size_ratio"] < 0.3, name  # sparse encoding
    for name in ("magnitude_2of4", "tfmot_2of4"):
        assert rows[name]["sparsity"] == pytest.approx(0.5, abs=0.02), name
    shrunk = rows["magnitude_filter_75_shrunk"]
    assert shrunk["flops_kept"] < 0.35 and shrunk["params"] < 0.35 * dense["params"]
    assert shrunk["float32_size_ratio"] < 0.35 and shrunk["int8_size_ratio"] < 0.4
    for r in rows.values():
        if "error" in r:
            continue
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["int8_accuracy"] <= 1.0
        assert abs(r["int8_accuracy"] - r["accuracy"]) < 0.05, r["config"]
        assert r["float32_latency_min_us"] <= r["float32_latency_us"] <= r[
            "float32_latency_max_us"]
        assert r["epoch_seconds"] > 0 and r["float32_gzip_bytes"] <= r["float32_bytes"] * 1.01


def test_quick_benchmark_tiny_writes_sane_table_and_plots(tmp_path):
    _run(["benchmarks.run", "--quick"], tmp_path, env={"TFPRUNE_BENCH_TINY": "1"})
    _check_run(tmp_path, "tiny")


@pytest.mark.slow
def test_quick_benchmark_runs_in_five_minutes(tmp_path):
    _run(["benchmarks.run", "--quick"], tmp_path)
    assert set(_check_run(tmp_path, "quick")) == {"lenet300", "lenet5"}
    # CPU time, not wall clock: on the shared 2-core machine other jobs stretch the latter.
    assert json.loads((tmp_path / "benchmark_quick.json").read_text())["cpu_s"] < 300


def test_shrink_latency_quick_mlp_is_faster_when_shrunk(tmp_path):
    _run(["benchmarks.shrink_latency", "--quick", "--models", "mlp"], tmp_path)
    text = (tmp_path / "shrink_latency_quick.md").read_text()
    assert "FLOPs ratio" in text and "machine:" in text
    assert (tmp_path / "shrink_latency_quick.png").read_bytes()[:4] == b"\x89PNG"
    rows = {r["variant"]: r for r in
            json.loads((tmp_path / "shrink_latency_quick.json").read_text())["rows"]}
    assert set(rows) == {"dense", "shrunk_50", "shrunk_75", "block4x1_90", "unstructured_90"}
    assert rows["shrunk_50"]["flops_ratio"] > 2.0 and rows["shrunk_75"]["flops_ratio"] > 5.0
    assert rows["shrunk_75"]["params"] < 0.2 * rows["dense"]["params"]
    # Noisy shared machine: only demand a clear speed-up, not the 0.8x target.
    assert rows["shrunk_75"]["float32_speedup"] > 1.5
    assert rows["block4x1_90"]["float32_bytes"] < 0.2 * rows["dense"]["float32_bytes"]


def test_config_table_is_consistent():
    from benchmarks import run

    names = [c.name for c in run.CONFIGS]
    assert len(names) == len(set(names)) and names[0] == "dense"
    for c in run.CONFIGS:
        assert c.family in ("dense", "tfprune", "tfmot")
        assert (c.make is not None) == (c.family == "tfprune"), c.name
        assert (c.tfmot is not None) == (c.family == "tfmot"), c.name
        if c.shrink:
            assert not c.prune_output, c.name  # removing output units would remove classes
    assert all(c.requires is None or isinstance(c.requires, str) for c in run.CONFIGS)


def test_tfprune_configs_build_their_methods():
    from benchmarks import run
    from tfprune import methods

    context = {"end_step": 10, "frequency": 2, "steps": 15, "num_train_examples": 100}
    for c in run.available_configs():
        if c.family == "tfprune":
            assert isinstance(c.make(context), methods.Method), c.name


def test_every_tfprune_config_trains_strips_and_shrinks_a_conv_model():
    """Each tfprune row runs on LeNet-5 (pooling, Flatten: layers the row must skip)."""
    import keras
    import numpy as np

    import tfprune
    from benchmarks import run

    settings = run.Settings(models=("lenet5",), pretrain=0, finetune=1, batch_size=32)
    rng = np.random.default_rng(0)
    x = rng.random((64, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    keras.utils.set_random_seed(0)
    init = run.models.build("lenet5", keras).get_weights()
    context = {"end_step": 1, "frequency": 1, "steps": 2, "num_train_examples": 64}
    for c in [c for c in run.available_configs() if c.family == "tfprune"]:
        final, times = run._train_tfprune("lenet5", c, init, (x, y), settings, context)
        assert not tfprune.wrapper.find_wrappers(final), c.name
        assert final.layers[-1].units == 10, c.name
        assert len(times) == 1, c.name


def test_budgets_quick_meets_budgets_and_records_sane_values(tmp_path):
    """`benchmarks.budgets --quick`: round_to, Taylor vs Magnitude and the latency budget."""
    _run(["benchmarks.budgets", "--quick", "--parts", "round_to,taylor,latency"], tmp_path,
         env={"TFPRUNE_CACHE_DIR": str(tmp_path / "cache")})
    data = json.loads((tmp_path / "budgets_quick.json").read_text())
    parts = data["parts"]
    assert set(parts) == {"round_to", "taylor", "latency"}
    for name, part in parts.items():
        assert "error" not in part, (name, part.get("error"))
        assert part["commit"] and part["date"] and "benchmarks.budgets --quick" in part["command"]
    assert data["machine"]["tensorflow"].startswith("2.")

    rows = parts["round_to"]["result"]["vgg"]["rows"]
    assert {(r["keep"], r["round_to"]) for r in rows} == {(0.5, 1), (0.5, 8)}
    for r in rows:
        # The budget is met by the shrunk model, every width is a multiple of round_to (or
        # full) and the shrunk model is faster than the dense one timed in the same rounds.
        assert 0.2 < r["flops_ratio"] <= r["keep"] + 1e-6, r
        assert r["not_multiples"] == {} and r["widths"], r
        assert all(kept % r["round_to"] == 0 for kept, total in r["widths"].values()), r
        assert 0.0 < r["latency_ratio"] < 1.0 and r["speedup"] == pytest.approx(
            1.0 / r["latency_ratio"])

    taylor = parts["taylor"]["result"]
    assert set(taylor) == {"lenet5", "cifar_cnn"}
    from benchmarks import common

    if common.data_dir() is None or not (common.data_dir() / "cifar10").is_dir():
        assert "CIFAR-10 not found" in taylor.pop("cifar_cnn")["skipped"]
    for model, res in taylor.items():
        by = {(r["method"], r["normalize"]): r for r in res["rows"]}
        assert set(by) == {("dense", "mean"), ("Magnitude", "mean"), ("Taylor", "mean"),
                           ("Magnitude", "none"), ("Magnitude", "cost")}, model
        assert res["train"] == 256 and res["test"] == 500
        for r in by.values():
            assert "error" not in r, (model, r)
            assert 0.0 <= r["accuracy"] <= 1.0 and r["latency_us"] > 0, (model, r)
            if r["method"] == "dense":
                assert r["flops_ratio"] == 1.0 and r["latency_ratio"] == 1.0
            else:
                assert 0.1 < r["flops_ratio"] <= r["keep"] + 1e-6, (model, r)
    # LeNet-5 trains within the quick budget: above chance (10 classes) when dense.
    dense = next(r for r in taylor["lenet5"]["rows"] if r["method"] == "dense")
    assert dense["accuracy"] > 0.2

    lat = parts["latency"]["result"]
    if lat["available"]:
        assert 0.0 < lat["predicted_ratio"] < 1.0 and lat["predicted_us"] > 0
        assert 0.0 < lat["measured_ratio"] < 1.0 and lat["dense_us"] > lat["shrunk_us"]
        assert lat["verify"]["predicted_us"] == pytest.approx(lat["predicted_us"])
        assert lat["widths"] and lat["not_multiples"] == {}
    else:
        assert "Latency" in lat["reason"]

    text = (tmp_path / "budgets_quick.md").read_text()
    for needle in ("# Pruning to a budget", "machine:", "round_to", "Taylor - Magnitude",
                   "Importance normalization", "budgets.Latency"):
        assert needle in text, needle
    for plot in ("budgets_accuracy_quick.png", "budgets_round_to_quick.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
    # --render redraws the same markdown from the JSON alone.
    (tmp_path / "budgets_quick.md").unlink()
    _run(["benchmarks.budgets", "--quick", "--render"], tmp_path)
    assert (tmp_path / "budgets_quick.md").read_text() == text
