"""The documentation site (`make docs` builds it with Sphinx; CI runs that with -W): every page
of docs/ is in its table of contents, the API reference covers every public module, and the
docstring conversion docs/conf.py applies does what it says. Fast: no Sphinx build here."""

from __future__ import annotations

import importlib.util
import pkgutil
import re

import esacl_jax
from tests.conftest import REPO_ROOT

DOCS = REPO_ROOT / "docs"


def _conf():
    spec = importlib.util.spec_from_file_location("docs_conf", DOCS / "conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def toctree_entries() -> list[str]:
    """The entries of every toctree of docs/index.md (page names and glob patterns)."""
    text = (DOCS / "index.md").read_text(encoding="utf-8")
    entries = []
    for body in re.findall(r"^```\{toctree\}\n(.*?)^```", text, flags=re.S | re.M):
        entries += [line.strip() for line in body.splitlines()
                    if line.strip() and not line.startswith(":")]
    return entries


def test_every_page_of_docs_is_in_the_toctree():
    entries = toctree_entries()
    pages = sorted(p.stem for p in DOCS.glob("*.md") if p.name != "index.md")
    assert {"getting_started", "OWN_LOOP", "harness", "sweeps", "RESULTS", "METHOD", "api"} <= \
        set(pages)
    assert [page for page in pages if page not in entries] == []
    assert [entry for entry in entries if "*" not in entry and entry not in pages] == []
    # The report folders' pages (reached from RESULTS.md) through the two glob entries, which
    # reach two folder levels: a report deeper than that would be left out of the site.
    assert {"*/*", "*/*/*"} <= set(entries)
    deeper = [str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")
              if len(p.relative_to(DOCS).parts) > 3]
    assert deeper == []


def test_the_api_reference_covers_every_public_module():
    conf = _conf()
    modules = conf.public_submodules()
    expected = sorted(f"esacl_jax.{m.name}" for m in pkgutil.iter_modules(esacl_jax.__path__)
                      if not m.name.startswith("_") and m.name != "harness")
    assert modules == expected and "esacl_jax.sdp" in modules
    generated = conf._api_reference()
    for name in ["esacl_jax", *modules, *conf.HARNESS_MODULES, *conf.COMMAND_LINES]:
        assert f".. automodule:: {name}\n" in generated
    assert "experiments.main" in conf.COMMAND_LINES
    assert "<!-- api-reference -->" in (DOCS / "api.md").read_text(encoding="utf-8")


def test_house_docstrings_become_rest():
    convert = _conf().house_docstring
    doc = ["Keep the largest |w| of `kernel`s, scored by w * G:",
           "- `magnitude`: |w|;",
           "- `taylor`: h**2.",
           "After the list.",
           "",
           "For instance:",
           "",
           "    tx = esacl_optimizer(sgd)",
           "    opt_state = tx.init(params)",
           "",
           ">>> 1 * 2",
           "2",
           "A `code span over",
           "two lines` ends."]
    assert convert(doc) == [
        r"Keep the largest \|w\| of ``kernel``\ s, scored by w \* G:",
        "",
        r"- ``magnitude``: \|w\|;",
        r"- ``taylor``: h\*\*2.",
        "",
        "After the list.",
        "",
        "For instance::",
        "",
        "    tx = esacl_optimizer(sgd)",
        "    opt_state = tx.init(params)",
        "",
        ">>> 1 * 2",
        "2",
        "A ``code span over two lines`` ends."]
    commands = ["Full run:", "  python -m experiments.compare", "Quick run:",
                "  python -m experiments.compare --seeds=0", "Writes a table."]
    assert convert(commands) == ["Full run::", "", "  python -m experiments.compare", "",
                                 "Quick run::", "", "  python -m experiments.compare --seeds=0",
                                 "", "Writes a table."]
    # Google-style sections are napoleon's: left as they are.
    args = ["Args:", "  params: the `params` tree.", "", "Returns:", "  The masks."]
    assert convert(args) == ["Args:", "  params: the ``params`` tree.", "", "Returns:",
                             "  The masks."]
