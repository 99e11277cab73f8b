"""Sphinx configuration of the esacl_jax documentation site (`make docs`).

The pages are the markdown files of docs/ (myst-parser); the API reference is generated from the
code at build time (see `_api_reference`): `esacl_jax.__all__`, every public submodule of the
library, and the harness's public entry points, so no hand-typed list of names can go stale.
The build needs no network (no intersphinx, no remote images) and runs with -W.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's esacl_jax and experiments, not an installed copy

import esacl_jax  # noqa: E402

project = "esacl_jax"
author = "esacl_jax contributors"
copyright = "esacl_jax contributors (Apache-2.0)"
release = version = esacl_jax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns: list[str] = []  # the site is built into build/docs, outside docs/
# The report folders (paper_table/, speed/, ...) are pages too, reached from RESULTS.md's links
# (index.md's hidden toctree). They are written by report commands with heading levels of their
# own (tables under ###, a bare table), so these two warnings are not errors here; every other
# warning is.
suppress_warnings = ["myst.header", "toc.no_title"]
# `code` in a docstring is code, as in the markdown pages (not reST's italic "title reference").
default_role = "literal"

myst_heading_anchors = 4  # GitHub-style #fragments in links between pages
myst_enable_extensions = ["colon_fence"]

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # a NamedTuple's Attributes: once, as fields of its class
autodoc_member_order = "bysource"  # for a module with __all__: the order of __all__
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}

html_theme = "sphinx_book_theme"
html_title = f"esacl_jax {release}"
html_theme_options = {"show_toc_level": 2}
html_static_path: list[str] = []

# Library modules that are not a public namespace of their own.
_PRIVATE = {"harness"}
# The harness's public entry points: the package (its __all__) and the config schema; and the
# command lines, documented by their module docstrings (their functions are not an API).
HARNESS_MODULES = ("esacl_jax.harness", "esacl_jax.harness.config",
                   "esacl_jax.harness.reporting.records")
COMMAND_LINES = ("experiments.main", "experiments.compare", "experiments.ablation",
                 "experiments.report", "experiments.side_by_side")


def public_submodules() -> list[str]:
    """Every public module of the library package (a leading underscore or the harness: not)."""
    return sorted(f"esacl_jax.{info.name}" for info in pkgutil.iter_modules(esacl_jax.__path__)
                  if not info.name.startswith("_") and info.name not in _PRIVATE)


def _api_reference() -> str:
    """The markdown of the API page's generated part: one automodule per public module."""
    blocks = ["## `esacl_jax`\n",  # its constants (DEFAULTS, STATIC_ARGS) too
              "```{eval-rst}\n.. automodule:: esacl_jax\n   :undoc-members:\n```\n"]
    for name in public_submodules():
        blocks += [f"## `{name}`\n",
                   f"```{{eval-rst}}\n.. automodule:: {name}\n```\n"]
    blocks.append("## The harness\n")
    for name in HARNESS_MODULES:
        blocks += [f"### `{name}`\n", f"```{{eval-rst}}\n.. automodule:: {name}\n```\n"]
    blocks.append("## The command lines\n")
    for name in COMMAND_LINES:
        blocks += [f"### `python -m {name}`\n",
                   f"```{{eval-rst}}\n.. automodule:: {name}\n   :no-members:\n```\n"]
    return "\n".join(blocks)


_LIST_ITEM = re.compile(r"^(\s*)(?:[-*+]|\d+\.)\s+\S")
_BULLET = re.compile(r"^\s*(?:[-*+]|\d+\.)\s+")
_CODE_SPAN = re.compile(r"(?<!`)(`+)([^`]+?)\1(?!`)", re.S)
_SECTION = re.compile(r"^\s*(Args|Arguments|Keyword Args|Returns|Return|Yields|Raises|"
                      r"Attributes|Examples?|Notes?|Warnings?|See Also|References|Todo):\s*$")


def _escape(text: str) -> str:
    return re.sub(r"([|*\\])", r"\\\1", text)


def _inline(text: str) -> str:
    """A prose paragraph in reST: `code` spans (one or several lines) as ``literals``, and the
    `|` and `*` of formulas written outside them (|w|, w * G, h**2) as plain characters."""
    out, last = [], 0
    for match in _CODE_SPAN.finditer(text):
        code = match.group(2)
        if code != code.strip():  # not a code span reST could end: leave it as text
            continue
        before, after = text[last:match.start()], text[match.end():match.end() + 1]
        out.append(_escape(before))
        if before and (before[-1].isalnum() or before[-1] in "_)"):
            out.append("\\ ")  # reST: inline markup must not touch a word
        out.append(f"``{code}``")
        if after and (after.isalnum() or after in "_("):
            out.append("\\ ")
        last = match.end()
    out.append(_escape(text[last:]))
    return "".join(out)


def _prose(lines: list[str]) -> list[str]:
    """`_inline` over a paragraph's lines, keeping each line's indent and list bullet."""
    if not lines:
        return []
    heads, bodies = [], []
    for line in lines:
        bullet = _BULLET.match(line)
        cut = bullet.end() if bullet else len(line) - len(line.lstrip())
        heads.append(line[:cut])
        bodies.append(line[cut:])
    joined = _inline("\x00".join(bodies)).split("\x00")
    lines = [head + body for head, body in zip(heads, joined)]
    merged: list[str] = []
    for line in lines:  # a code span over a line break: one line (napoleon reads line by line)
        if merged and merged[-1].count("``") % 2:
            merged[-1] += " " + line.strip()
        else:
            merged.append(line)
    return merged


def house_docstring(lines: list[str]) -> list[str]:
    """The house's docstrings (Google style, written to read well as plain text) in reST.

    The docstrings are written for `help()` and the source: `code` in single backticks, a list
    straight after the line that introduces it, an indented example after a line ending in `:`,
    formulas such as |w| or w * G in the text. reST reads those as a title reference, a block
    quote or definition list, a substitution and emphasis; so before napoleon reads the
    Args/Returns sections, each docstring gets the blank lines reST wants around a list, `::`
    before an indented example, ``literal`` code spans, and escaped `|` and `*` outside code.
    Doctest lines (`>>>`) and literal blocks are left exactly as written. A docstring that is
    still not valid reST fails the -W build.
    """
    out: list[str] = []
    paragraph: list[str] = []
    list_indent: int | None = None  # the indent of the current list's items, if in a list
    literal_indent: int | None = None  # the indent of the line that opened a literal block
    prose_indent = 0  # the indent of the last prose line

    def flush():
        out.extend(_prose(paragraph))
        paragraph.clear()

    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if literal_indent is not None:
            if stripped and indent <= literal_indent:
                literal_indent = None
                if out and out[-1].strip():
                    out.append("")  # reST: a literal block ends before a blank line
            else:
                out.append(line)
                continue
        if stripped.startswith(">>>") or (stripped and out and not paragraph
                                          and out[-1].strip().startswith((">>>", "..."))):
            flush()
            out.append(line)
            continue
        if not stripped:
            flush()
            out.append(line)
            list_indent = None
            continue
        item = _LIST_ITEM.match(line)
        last = paragraph[-1] if paragraph else ""
        if not item and not paragraph and indent > prose_indent and out and \
                not out[-1].strip() and len(out) > 1 and out[-2].rstrip().endswith(":") \
                and not out[-2].rstrip().endswith("::") and not _SECTION.match(out[-2]) \
                and list_indent is None:
            out[-2] = out[-2].rstrip() + ":"  # an indented example after a blank line
            out.append(line)
            literal_indent = prose_indent
            continue
        if (not item and last and indent > prose_indent and last.rstrip().endswith(":")
                and not last.rstrip().endswith("::") and not _SECTION.match(last)
                and list_indent is None):
            paragraph[-1] = last.rstrip() + ":"  # an indented example: a literal block
            flush()
            out.append("")
            out.append(line)
            literal_indent = prose_indent
            continue
        if item and list_indent is None and (last or (out and _SECTION.match(out[-1])
                                                      and indent <= prose_indent)):
            flush()
            out.append("")  # reST: a list starts after a blank line
        if item:
            list_indent = indent
        elif list_indent is not None and indent <= list_indent:
            flush()
            out.append("")  # and ends before one
            list_indent = None
        if _SECTION.match(line):
            flush()
            out.append(line)
            prose_indent = indent
            continue
        paragraph.append(line)
        prose_indent = indent
        if stripped.endswith("::"):
            flush()
            literal_indent = indent
    flush()
    return out


def _to_rest(app, what, name, obj, options, lines):
    del app, what, name, obj, options
    lines[:] = house_docstring(lines)


def _top_level() -> dict[int, str]:
    return {id(getattr(esacl_jax, name)): name for name in esacl_jax.__all__}


def _skip_repeats(app, what, name, obj, skip, options):
    """A submodule's member that `esacl_jax` exports at the top level is documented there once
    (under `esacl_jax.<name>`), not a second time under its submodule."""
    del app, what, options
    if skip or name.startswith("_"):
        return skip
    owner = getattr(obj, "__module__", None) or ""
    if owner.startswith("esacl_jax.") and not owner.startswith("esacl_jax.harness") \
            and _TOP.get(id(obj)) == name and _CURRENT.get("module") != "esacl_jax":
        return True
    return None


_TOP: dict[int, str] = {}
_CURRENT: dict[str, str] = {}


def _track_module(app, what, name, obj, options, lines):
    del app, obj, options, lines
    if what == "module":
        _CURRENT["module"] = name


def _insert_api(app, docname, source):
    del app
    if docname == "api":
        source[0] = source[0].replace("<!-- api-reference -->", _api_reference())


def setup(app):
    _TOP.update(_top_level())
    for name in (*public_submodules(), *HARNESS_MODULES, *COMMAND_LINES):
        importlib.import_module(name)  # an import error fails the build here, in one line
    app.connect("source-read", _insert_api)
    app.connect("autodoc-process-docstring", _to_rest, priority=400)  # before napoleon (500)
    app.connect("autodoc-process-docstring", _track_module)
    app.connect("autodoc-skip-member", _skip_repeats)
