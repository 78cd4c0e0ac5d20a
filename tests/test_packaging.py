"""A plain ``pip install -e .`` runs every method: the runtime requirements are complete.

The test environment has the dev extras installed, which can hide a missing runtime
requirement (TensorFlow Probability needs ``tf-keras``; only the dev extras brought it).
These tests run code in a subprocess whose imports are restricted to the distributions a
plain install of tfprune brings: the closure of ``install_requires`` in ``setup.cfg`` (with
extras, recursively, from the installed packages' metadata). Any other top-level module
behaves as if it were not installed: ``import`` raises ``ModuleNotFoundError``,
``importlib.util.find_spec`` returns ``None`` and ``importlib.metadata`` does not find its
distribution.
"""

import configparser
import json
import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tfprune.cli import DEMO_METHODS

ROOT = Path(__file__).resolve().parents[1]

# What a fresh Python 3.11 virtual environment has before anything is installed.
_FRESH_VENV = ("pip", "setuptools") if sys.version_info < (3, 12) else ("pip",)

# Runs in the subprocess before anything else; only the standard library is imported.
_HOOK = textwrap.dedent('''\
    import importlib.abc, importlib.metadata, importlib.util, json, os, re, sys

    _cfg = json.loads(os.environ.pop("TFPRUNE_TEST_RUNTIME_ONLY"))
    _modules, _dists = frozenset(_cfg["modules"]), frozenset(_cfg["dists"])

    def _blocked(name):
        return name.partition(".")[0] in _modules and name not in sys.modules

    class _NotInstalled(importlib.abc.MetaPathFinder):
        """Makes modules outside the runtime closure look uninstalled."""

        def find_spec(self, fullname, path=None, target=None):
            if _blocked(fullname):
                raise ModuleNotFoundError(
                    f"No module named {fullname!r} (not a runtime requirement of tfprune)",
                    name=fullname)
            return None

    sys.meta_path.insert(0, _NotInstalled())

    _find_spec = importlib.util.find_spec

    def _find_spec_runtime_only(name, package=None):
        absolute = importlib.util.resolve_name(name, package) if name.startswith(".") else name
        return None if _blocked(absolute) else _find_spec(name, package)

    importlib.util.find_spec = _find_spec_runtime_only

    _distribution = importlib.metadata.distribution

    def _distribution_runtime_only(name):
        if re.sub(r"[-_.]+", "-", name).lower() in _dists:
            raise importlib.metadata.PackageNotFoundError(name)
        return _distribution(name)

    importlib.metadata.distribution = _distribution_runtime_only
    del _cfg
''')


def setup_cfg_requirements():
    """The ``install_requires`` of ``setup.cfg``, as `Requirement` objects."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    return [Requirement(line.strip()) for line in lines
            if line.strip() and not line.strip().startswith("#")]


def runtime_closure(requirements):
    """Canonical names of the installed distributions that ``requirements`` bring, recursively.

    Args:
        requirements: `Requirement` objects (extras honoured, environment markers evaluated).

    Returns:
        A set of canonical distribution names, including those of ``requirements``.
    """
    extras_done = {}  # canonical name -> extras ("" is the base) whose requirements are queued
    todo = list(requirements)
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here: nothing of it can be imported anyway
        new = ({""} | {canonicalize_name(e) for e in req.extras}) - extras_done.get(name, set())
        if not new:
            continue
        extras_done.setdefault(name, set()).update(new)
        for line in dist.requires or ():
            sub = Requirement(line)
            if sub.marker is None:
                applies = "" in new
            else:
                applies = any(sub.marker.evaluate({"extra": e}) for e in new)
            if applies:
                sub.marker = None
                todo.append(sub)
    return set(extras_done)


def blocked(requirements):
    """The top-level modules and distributions that a plain install would not have."""
    allowed = runtime_closure(requirements) | {"tfprune", *_FRESH_VENV}
    modules = set()
    for module, dists in metadata.packages_distributions().items():
        if module in sys.stdlib_module_names or module == "tfprune":
            continue
        if not any(canonicalize_name(d) in allowed for d in dists):
            modules.add(module)
    dists = {canonicalize_name(d.metadata["Name"]) for d in metadata.distributions()}
    return sorted(modules), sorted(dists - allowed)


def run_runtime_only(code, cwd, requirements=None, timeout=600):
    """Runs Python ``code`` in a subprocess that can import only the runtime requirements.

    Args:
        code: Python source run after the import restriction is installed.
        cwd: working directory (not the repository, so that ``tfprune`` comes from the install).
        requirements: the requirements whose closure is importable; ``setup.cfg``'s by default.
        timeout: seconds.

    Returns:
        The `subprocess.CompletedProcess` (text output captured).
    """
    modules, dists = blocked(setup_cfg_requirements() if requirements is None else requirements)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0",
               TFPRUNE_TEST_RUNTIME_ONLY=json.dumps({"modules": modules, "dists": dists}))
    env.pop("PYTHONPATH", None)
    env.pop("TF_USE_LEGACY_KERAS", None)
    return subprocess.run([sys.executable, "-c", _HOOK + "\n" + code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_tf_extra_of_tfp_is_what_brings_tf_keras():
    """The metadata fact the fix relies on (fails if TFP stops declaring it)."""
    plain = runtime_closure([Requirement("tensorflow-probability>=0.25")])
    with_tf = runtime_closure([Requirement("tensorflow-probability[tf]>=0.25")])
    assert "tf-keras" not in plain
    assert {"tf-keras", "tensorflow"} <= with_tf
    assert "tf-keras" in runtime_closure(setup_cfg_requirements())


def test_dev_only_packages_are_not_importable(tmp_path):
    """The restriction works: a dev-only package looks uninstalled, a runtime one does not."""
    modules, dists = blocked(setup_cfg_requirements())
    assert "pytest" in modules and "pytest" in dists
    code = textwrap.dedent("""\
        import importlib.metadata, importlib.util
        import numpy, tqdm
        assert importlib.util.find_spec("pytest") is None
        assert importlib.util.find_spec("numpy") is not None
        try:
            importlib.metadata.version("pytest")
        except importlib.metadata.PackageNotFoundError:
            pass
        else:
            raise AssertionError("pytest metadata visible")
        import pytest
    """)
    proc = run_runtime_only(code, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "ModuleNotFoundError: No module named 'pytest'" in proc.stderr, proc.stderr


def test_tfp_without_its_tf_extra_fails_as_on_a_plain_install(tmp_path):
    """The old ``install_requires`` (no ``[tf]``) reproduces the user's crash here."""
    old = [Requirement("tensorflow-probability>=0.25") if r.name == "tensorflow-probability"
           else r for r in setup_cfg_requirements()]
    code = "import tensorflow_probability as tfp\ntfp.distributions.Normal(0.0, 1.0)"
    proc = run_runtime_only(code, tmp_path, requirements=old)
    assert proc.returncode != 0
    assert "No module named 'tf_keras'" in proc.stderr, proc.stderr[-3000:]
    fixed = run_runtime_only(code, tmp_path)  # the current setup.cfg
    assert fixed.returncode == 0, fixed.stderr[-3000:]


@pytest.mark.parametrize("method", DEMO_METHODS)
def test_demo_runs_every_method_with_only_the_runtime_requirements(method, tmp_path):
    out = tmp_path / "out"
    argv = ["demo", "--method", method, "--epochs", "1", "--max-samples", "256", "--out", str(out)]
    code = f"import sys\nfrom tfprune.cli import main\nsys.exit(main({argv!r}))\n"
    proc = run_runtime_only(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"method={method}" in proc.stdout and "LiteRT latency" in proc.stdout
    for name in ("pruned.keras", "shrunk.keras", "shrunk_float32.tflite", "shrunk_int8.tflite"):
        assert (out / name).stat().st_size > 0, name
