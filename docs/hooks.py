"""MkDocs hooks: link the tutorial notebooks and include the benchmark results.

Both live outside ``docs/`` (``tutorials/*.ipynb`` and ``benchmarks/results/``)
and are written by other parts of the project, so they may be absent. The
hooks keep ``mkdocs build --strict`` passing either way:

- every ``tutorials/*.ipynb`` is published at ``tutorials/<name>.ipynb`` in the
  site, and the marker ``[[notebook:NAME.ipynb]]`` in any page becomes a link
  to it, or, when the notebook is absent, the plain path with "(not yet
  available)";
- ``<!-- benchmark-results -->`` in ``benchmarks/index.md`` is replaced by the
  markdown files of ``benchmarks/results/`` (sorted; of ``benchmarks.run``'s
  ``*_full`` / ``*_quick`` / ``*_tiny`` outputs only the best mode present),
  and the images there are published next to that page
  (``benchmarks/<name>``), so relative image links in the included files keep
  working; images no included file references are appended. Without results
  the marker becomes a note;
- ``<!-- results:NAME.md -->`` in any page is replaced by
  ``benchmarks/results/NAME.md`` (headings demoted one level), or a note when
  it is absent. Results with a page of their own (``_OWN_PAGE``, e.g. the
  architecture zoo on ``architectures.md``) are not repeated on the
  benchmarks page.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

_NOTEBOOK = re.compile(r"\[\[notebook:([A-Za-z0-9_.-]+\.ipynb)\]\]")
_RESULTS_MARKER = "<!-- benchmark-results -->"
_IMAGE_EXT = (".png", ".svg", ".jpg", ".jpeg", ".gif")
_RESULT_FILE = re.compile(r"<!-- results:([A-Za-z0-9_.-]+\.md) -->")
# results files shown on a page of their own (through the marker above), not on benchmarks/
_OWN_PAGE = ("architectures", "budgets")
_IMAGE_LINK = re.compile(r"(!\[[^\]]*\]\()([^)\s]+)(\s*(?:\"[^\"]*\")?\))")


def _root(config):
    return Path(config["config_file_path"]).resolve().parent


def _notebooks(config):
    folder = _root(config) / "tutorials"
    return sorted(folder.glob("*.ipynb")) if folder.is_dir() else []


_MODES = ("full", "quick", "tiny")  # benchmarks.run --full / --quick / tiny test runs, best first
_MODE_SUFFIX = re.compile(r"_(full|quick|tiny)$")


def _results(config):
    """Files of ``benchmarks/results/`` to publish.

    ``benchmarks.run`` names its outputs ``*_<mode>.*``; only the best mode
    present is shown (the committed full run rather than a quick one).
    Files without a mode suffix (e.g. ``shrink_latency.md``) are always shown.
    """
    folder = _root(config) / "benchmarks" / "results"
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.stem not in _OWN_PAGE)
    modes = {m.group(1) for p in files if (m := _MODE_SUFFIX.search(p.stem))}
    best = next((mode for mode in _MODES if mode in modes), None)

    def shown(path):
        m = _MODE_SUFFIX.search(path.stem)
        return m is None or m.group(1) == best

    return [p for p in files if shown(p)]


def on_files(files, config):
    for nb in _notebooks(config):
        files.append(File.generated(config, f"tutorials/{nb.name}", abs_src_path=str(nb)))
    for res in _results(config):
        if res.suffix.lower() in _IMAGE_EXT:
            files.append(File.generated(config, f"benchmarks/{res.name}", abs_src_path=str(res)))
    return files


def _notebook_link(page, config, name):
    present = {nb.name for nb in _notebooks(config)}
    if name not in present:
        return f"`tutorials/{name}` (not yet available)"
    here = posixpath.dirname(page.file.src_uri)
    rel = posixpath.relpath(f"tutorials/{name}", here or ".")
    return f"[`tutorials/{name}`]({rel})"


def _benchmark_results(config):
    parts = []
    images = {r.name for r in _results(config) if r.suffix.lower() in _IMAGE_EXT}
    for res in _results(config):
        if res.suffix.lower() != ".md":
            continue
        text = res.read_text(encoding="utf-8")

        def fix(m, images=images):
            # Images of benchmarks/results/ are published next to the page: link by name.
            name = posixpath.basename(m.group(2))
            return m.group(1) + (name if name in images else m.group(2)) + m.group(3)

        text = _IMAGE_LINK.sub(fix, text)
        # Demote headings so that the included files nest under this page's title.
        text = re.sub(r"^(#{1,5}) ", r"#\1 ", text, flags=re.M)
        parts.append(f"<!-- from benchmarks/results/{res.name} -->\n\n{text.strip()}\n")
    shown = set()
    for part in parts:
        shown |= {posixpath.basename(m.group(2)) for m in _IMAGE_LINK.finditer(part)}
    rest = sorted(images - shown)
    if rest:
        parts.append("## Plots\n\n" + "\n\n".join(f"![{n}]({n})" for n in rest) + "\n")
    if not parts:
        return ("!!! note \"No results in this build\"\n"
                "    `benchmarks/results/` holds no results yet: run the benchmark "
                "(see above) and rebuild the site.\n")
    return "\n".join(parts)


def _result_file(config, name):
    """``benchmarks/results/<name>`` with its headings demoted one level, or a note."""
    path = _root(config) / "benchmarks" / "results" / name
    if not path.is_file():
        return ("!!! note \"No results in this build\"\n"
                f"    `benchmarks/results/{name}` is absent: run the benchmark (see above) "
                "and rebuild the site.\n")
    text = re.sub(r"^(#{1,5}) ", r"#\1 ", path.read_text(encoding="utf-8"), flags=re.M)
    return f"<!-- from benchmarks/results/{name} -->\n\n{text.strip()}\n"


def on_page_markdown(markdown, page, config, files):
    markdown = _NOTEBOOK.sub(lambda m: _notebook_link(page, config, m.group(1)), markdown)
    markdown = _RESULT_FILE.sub(lambda m: _result_file(config, m.group(1)), markdown)
    if _RESULTS_MARKER in markdown:
        markdown = markdown.replace(_RESULTS_MARKER, _benchmark_results(config))
    return markdown
