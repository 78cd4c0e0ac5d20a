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


def run_cli(argv, capsys):
    """``(exit status, stderr)`` of ``tfprune ARGV`` run in this process."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    return code, err


def assert_one_error_line(err, prog, *needles):
    """stderr has exactly one ``PROG: error: ...`` line, with every needle, and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def bad_files(tmp_path):
    """Files that are not what the CLI expects."""
    rng = np.random.default_rng(0)
    (tmp_path / "random.keras").write_bytes(rng.bytes(3000))
    (tmp_path / "random.npy").write_bytes(rng.bytes(3000))
    (tmp_path / "notes.txt").write_text("not a model\n")
    import zipfile

    with zipfile.ZipFile(tmp_path / "other.keras", "w") as z:
        z.writestr("readme.txt", "a zip, but not a Keras model")
    (tmp_path / "folder").mkdir()
    return tmp_path


@pytest.mark.parametrize("args, needle", [
    (["--epochs", "0"], "argument --epochs: must be an integer >= 1, got 0"),
    (["--epochs", "-1"], "argument --epochs: must be an integer >= 1, got -1"),
    (["--epochs", "two"], "argument --epochs: must be an integer >= 1, got 'two'"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (["--seed", "-3"], "argument --seed: must be an integer >= 0, got -3"),
    (["--max-samples", "0"], "argument --max-samples: must be an integer >= 1, got 0"),
])
def test_demo_bad_numbers_are_usage_errors(args, needle, capsys):
    code, err = run_cli(["demo", *args], capsys)
    assert code == 2
    assert_one_error_line(err, "tfprune demo", needle)


def test_demo_out_that_is_a_file_is_a_usage_error(bad_files, capsys):
    code, err = run_cli(["demo", "--out", bad_files / "notes.txt"], capsys)
    assert code == 2
    assert_one_error_line(err, "tfprune demo", "--out", "notes.txt", "not a folder")


@pytest.mark.parametrize("command", ["report", "export"])
def test_missing_or_directory_model_is_a_usage_error(command, bad_files, capsys):
    extra = [bad_files / "m.tflite"] if command == "export" else []
    code, err = run_cli([command, bad_files / "missing.keras", *extra], capsys)
    assert code == 2
    assert_one_error_line(err, f"tfprune {command}", "file not found", "missing.keras")
    code, err = run_cli([command, bad_files / "folder", *extra], capsys)
    assert code == 2
    assert_one_error_line(err, f"tfprune {command}", "folder", "is not a file")


@pytest.mark.parametrize("command", ["report", "export"])
@pytest.mark.parametrize("name, needle", [
    ("random.keras", "a .keras file is a zip archive"),
    ("notes.txt", "expected a name ending in .keras"),
    ("other.keras", "cannot load"),
])
def test_a_file_that_is_not_a_keras_model_fails_in_one_line(command, name, needle, bad_files,
                                                           capsys):
    extra = [bad_files / "m.tflite"] if command == "export" else []
    code, err = run_cli([command, bad_files / name, *extra], capsys)
    assert code == 1
    assert_one_error_line(err, f"tfprune {command}", name, needle)
    assert not (bad_files / "m.tflite").exists()


def test_export_output_paths_are_checked_before_any_work(demo_run, bad_files, capsys):
    model = demo_run[0] / "pruned.keras"
    code, err = run_cli(["export", model, bad_files / "no" / "such" / "m.tflite"], capsys)
    assert code == 2
    assert_one_error_line(err, "tfprune export", "output folder", "does not exist")
    code, err = run_cli(["export", model, bad_files / "folder"], capsys)
    assert code == 2
    assert_one_error_line(err, "tfprune export", "is a directory")


def test_export_representative_errors(demo_run, bad_files, capsys):
    model, target = demo_run[0] / "pruned.keras", bad_files / "m.tflite"
    int8 = ["--quantize", "int8"]
    code, err = run_cli(["export", model, target, *int8, "--representative",
                         bad_files / "missing.npy"], capsys)
    assert code == 2
    assert_one_error_line(err, "tfprune export", "--representative", "file not found")
    code, err = run_cli(["export", model, target, "--representative",
                         bad_files / "random.npy"], capsys)
    assert code == 2
    assert_one_error_line(err, "tfprune export", "only used with --quantize int8")
    code, err = run_cli(["export", model, target, *int8, "--representative",
                         bad_files / "random.npy"], capsys)
    assert code == 1
    assert_one_error_line(err, "tfprune export", "random.npy", "cannot read")
    wrong = bad_files / "wrong.npy"
    np.save(wrong, np.zeros((4, 28, 28), "float32"))
    code, err = run_cli(["export", model, target, *int8, "--representative", wrong], capsys)
    assert code == 1
    assert_one_error_line(err, "tfprune export", "(4, 28, 28)", "(samples, 28, 28, 1)")
    assert not target.exists()
    good = bad_files / "good.npy"
    np.save(good, np.zeros((8, 28, 28, 1), "float32"))
    code, err = run_cli(["export", model, target, *int8, "--representative", good], capsys)
    assert code == 0 and target.stat().st_size > 0


def test_console_script_prints_no_traceback(bad_files):
    """The installed ``tfprune`` entry point, as a user runs it."""
    import os
    import shutil
    import subprocess
    import sys

    exe = shutil.which("tfprune") or [sys.executable, "-m", "tfprune.cli"]
    cmd = [exe] if isinstance(exe, str) else exe
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([*cmd, "report", str(bad_files / "random.keras")], capture_output=True,
                          text=True, env=env, cwd=bad_files, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert_one_error_line(proc.stderr, "tfprune report", "random.keras", "zip archive")


def test_demo_function_rejects_bad_numbers(tmp_path):
    with pytest.raises(ValueError, match="`epochs` must be an integer >= 1, got 0"):
        cli.demo(epochs=0, out=str(tmp_path))
    with pytest.raises(ValueError, match="`batch_size` must be an integer >= 1, got 0"):
        cli.demo(batch_size=0, out=str(tmp_path))
    with pytest.raises(ValueError, match="`max_samples` must be None or an integer >= 1"):
        cli.demo(max_samples=0, out=str(tmp_path))
