"""The command line: demo (smoke size), report and export."""

import numpy as np
import pytest

from tfprune import cli
from tfprune.export import run_tflite


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    results = cli.demo(epochs=1, out=str(out), max_samples=1500, latency_runs=30)
    return out, results


def test_demo_prunes_shrinks_and_exports(demo_run):
    out, r = demo_run
    for name in ("dense.keras", "pruned.keras", "shrunk.keras", "dense_float32.tflite",
                 "shrunk_float32.tflite", "dense_int8.tflite", "shrunk_int8.tflite"):
        assert (out / name).exists(), name
    assert r["params"][1] < r["params"][0] / 4
    assert r["flops"][1] < r["flops"][0] / 4
    assert r["sizes"]["shrunk_float32"] < r["sizes"]["dense_float32"] / 4
    # Shrinking is exact: the shrunk model scores what the pruned model scores.
    assert r["acc_shrunk"] == pytest.approx(r["acc_pruned"], abs=1e-9)
    assert 0.0 <= r["acc_int8"] <= 1.0 and r["latency_us"]["shrunk"] > 0


def test_demo_rejects_an_unknown_method(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--method", "nope"])
    assert "invalid choice" in capsys.readouterr().err


def test_report_command_prints_a_table(demo_run, capsys):
    out, _ = demo_run
    cli.main(["report", str(out / "pruned.keras")])
    text = capsys.readouterr().out
    assert "conv1" in text and "fc1" in text and "total" in text


def test_export_command_writes_int8_tflite(demo_run, tmp_path):
    out, _ = demo_run
    target = tmp_path / "m.tflite"
    cli.main(["export", str(out / "pruned.keras"), str(target), "--quantize", "int8"])
    y = run_tflite(target, np.zeros((2, 28, 28, 1), "float32"))
    assert y.shape == (2, 10)


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        cli.main(["report", str(tmp_path / "missing.keras")])


def test_bad_epochs_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--epochs"):
        cli.demo(epochs=0, out=str(tmp_path))
