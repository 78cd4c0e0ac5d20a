"""The documentation site builds with `mkdocs build --strict` (and its hooks work)."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD_BUDGET_S = 60


def _missing_docs_tools():
    for module, package in (("mkdocs", "mkdocs"), ("material", "mkdocs-material"),
                            ("mkdocstrings", "mkdocstrings"),
                            ("mkdocstrings_handlers.python", "mkdocstrings-python")):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return package
        if "." in module:
            try:
                importlib.import_module(module)
            except ImportError:
                return package
    return None


_MISSING = _missing_docs_tools()
needs_mkdocs = pytest.mark.skipif(
    _MISSING is not None,
    reason=f"{_MISSING} is not installed (pip install -e '.[docs]')")


def _load_hooks():
    spec = importlib.util.spec_from_file_location("tfprune_docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=BUILD_BUDGET_S * 2)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out, elapsed


@needs_mkdocs
def test_mkdocs_build_strict_passes_quickly(site):
    out, elapsed = site
    assert (out / "index.html").is_file()
    assert elapsed < BUILD_BUDGET_S, f"mkdocs build took {elapsed:.0f} s"


@needs_mkdocs
def test_every_page_of_the_nav_is_built(site):
    out, _ = site
    for page in ["getting-started", "concepts/structures", "concepts/methods",
                 "concepts/callback", "concepts/strip-shrink-export", "concepts/speed",
                 "methods/magnitude", "methods/dpp", "methods/turbo-vbi", "tutorials",
                 "benchmarks", "migration", "faq", "api/core"]:
        assert (out / page / "index.html").is_file(), page


# Every public name of the API contract has an entry in the API reference.
PUBLIC = {
    "api/core": ["tfprune.api.prune", "tfprune.api.strip", "tfprune.wrapper.PruneWrapper"],
    "api/surgery": ["tfprune.surgery.shrink.shrink"],
    "api/report": ["tfprune.report.sparsity_report", "tfprune.report.Report"],
    "api/export": ["tfprune.export.export_tflite", "tfprune.export.run_tflite",
                   "tfprune.export.benchmark_tflite"],
    "api/datasets": ["tfprune.datasets.mnist.load_mnist"],
    "api/callbacks": ["tfprune.callbacks.Pruning"],
    "api/schedules": ["tfprune.schedules.ConstantSparsity", "tfprune.schedules.PolynomialDecay"],
    "api/structures": ["tfprune.structures." + name
                       for name in ("Unstructured", "Kernel", "Filter", "Block", "KOutOfN")],
    "api/methods": ["tfprune.methods.magnitude.Magnitude"],
}


@needs_mkdocs
@pytest.mark.parametrize("page", sorted(PUBLIC))
def test_api_reference_documents_public_names(site, page):
    out, _ = site
    html = (out / page / "index.html").read_text(encoding="utf-8")
    for name in PUBLIC[page]:
        assert f'id="{name}"' in html, f"{name} is missing from {page}"


@needs_mkdocs
def test_api_reference_documents_every_method_in_the_package(site):
    import tfprune.methods as methods

    out, _ = site
    html = (out / "api" / "methods" / "index.html").read_text(encoding="utf-8")
    for name, cls in methods.BY_NAME.items():
        assert f'id="{cls.__module__}.{cls.__name__}"' in html, f"method {name!r} not documented"


@needs_mkdocs
def test_no_hook_marker_is_left_in_the_site(site):
    out, _ = site
    for page in out.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert "[[notebook:" not in text, page
        assert "benchmark-results -->" not in text, page


@needs_mkdocs
def test_present_tutorials_are_published_and_linked(site):
    out, _ = site
    tutorials = (out / "tutorials" / "index.html").read_text(encoding="utf-8")
    for nb in sorted((ROOT / "tutorials").glob("*.ipynb")):
        assert (out / "tutorials" / nb.name).is_file(), nb.name
        assert f'href="{nb.name}"' in tutorials, nb.name


# -- the hooks, on a fake project (no mkdocs build needed) ----------------------------------


class _Page:
    def __init__(self, src_uri):
        self.file = type("F", (), {"src_uri": src_uri})()


def test_hooks_include_benchmark_tables_and_plots(tmp_path):
    hooks = _load_hooks()
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "quick.md").write_text("# Quick\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
                                      "![acc](results/acc.png)\n")
    (results / "acc.png").write_bytes(b"png")
    (results / "latency.png").write_bytes(b"png")
    config = {"config_file_path": str(tmp_path / "mkdocs.yml")}
    text = hooks._benchmark_results(config)
    assert "## Quick" in text  # headings nest under the page title
    assert "| 1 | 2 |" in text
    assert "![acc](acc.png)" in text  # image links point next to the page
    assert "![latency.png](latency.png)" in text  # images not referenced are appended


def test_hooks_show_only_the_best_benchmark_mode(tmp_path):
    hooks = _load_hooks()
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    for name in ("benchmark_quick.md", "benchmark_full.md", "shrink_latency.md"):
        (results / name).write_text(f"# {name}\n")
    for name in ("speedup_vs_flops_quick.png", "speedup_vs_flops_full.png", "shrink_latency.png"):
        (results / name).write_bytes(b"png")
    config = {"config_file_path": str(tmp_path / "mkdocs.yml")}
    text = hooks._benchmark_results(config)
    assert "benchmark_full.md" in text and "shrink_latency.md" in text
    assert "benchmark_quick.md" not in text
    assert "speedup_vs_flops_full.png" in text and "shrink_latency.png" in text
    assert "speedup_vs_flops_quick.png" not in text


def test_hooks_without_results_or_notebooks_leave_a_note(tmp_path):
    hooks = _load_hooks()
    config = {"config_file_path": str(tmp_path / "mkdocs.yml")}
    assert "No results in this build" in hooks._benchmark_results(config)
    link = hooks._notebook_link(_Page("methods/dpp.md"), config, "dpp.ipynb")
    assert link == "`tutorials/dpp.ipynb` (not yet available)"


def test_hooks_link_a_present_notebook_relative_to_the_page(tmp_path):
    hooks = _load_hooks()
    (tmp_path / "tutorials").mkdir()
    (tmp_path / "tutorials" / "dpp.ipynb").write_text(json.dumps({"cells": []}))
    config = {"config_file_path": str(tmp_path / "mkdocs.yml")}
    assert hooks._notebook_link(_Page("methods/dpp.md"), config, "dpp.ipynb") == (
        "[`tutorials/dpp.ipynb`](../tutorials/dpp.ipynb)")
    assert hooks._notebook_link(_Page("tutorials.md"), config, "dpp.ipynb") == (
        "[`tutorials/dpp.ipynb`](tutorials/dpp.ipynb)")
