"""The documentation stands alone and tells the truth about the code.

- Every relative link and image in README.md and docs/**/*.md points at a file or folder inside
  the repository, and a `#fragment` names a heading of its target.
- No document points outside the repository into the team's shared folders (`../shared`,
  `shared/design`): the repository's docs must stand alone.
- The defaults and protocol values docs/METHOD.md quotes in its tables are the harness's
  (`base_config()`, `get_config`) and, where a library argument is named, the library's.
"""

from __future__ import annotations

import ast
import inspect
import re
import unicodedata

import pytest

from tests.conftest import REPO_ROOT

DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
METHOD = REPO_ROOT / "docs" / "METHOD.md"

# [text](target) and ![alt](target), an optional "title" after the target; reference
# definitions `[label]: target`; HTML src=/href= attributes.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
HTML_LINK = re.compile(r"""\b(?:src|href)\s*=\s*["']([^"']+)["']""")
OUTSIDE = re.compile(r"\.\./shared\b|\bshared/design\b")
# A repository path written as text (`docs/ablation.md`, tests/test_x.py): it must exist too.
TEXT_PATH = re.compile(r"(?<![\w./-])((?:docs|tests|esacl_jax|experiments|notebooks)/[\w./-]*)")
# A section named in prose: README's "Choices" section, README "Data", docs/harness.md "Data".
SECTION_NAMED = re.compile(r"(README(?:\.md)?|docs/[\w/.-]+\.md)(?:'s)? \"([^\"]+)\"")


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", text, flags=re.S)


def links(text: str) -> list[str]:
    prose = _prose(text)
    return [m.group(1) for pattern in (INLINE_LINK, REFERENCE_LINK, HTML_LINK)
            for m in pattern.finditer(prose)]


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, markup and punctuation dropped, spaces -> '-'."""
    text = re.sub(r"`|\*\*|__|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
    text = unicodedata.normalize("NFKC", text).strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path) -> set[str]:
    """The fragments a markdown file's headings define (duplicates get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", path.read_text(encoding="utf-8"),
                  flags=re.S | re.M)
    for line in text.splitlines():
        match = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        found.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return found


def broken_links(document) -> list[str]:
    """'target: why' for every relative link of `document` that does not resolve."""
    problems = []
    root = REPO_ROOT.resolve()
    for target in links(document.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        path_part, _, fragment = target.partition("#")
        if path_part.startswith("/"):
            problems.append(f"{target}: an absolute path (use one relative to the document)")
            continue
        resolved = (document.parent / path_part).resolve() if path_part else document.resolve()
        if not resolved.is_relative_to(root):
            problems.append(f"{target}: outside the repository")
            continue
        if not resolved.exists():
            problems.append(f"{target}: no such file ({resolved.relative_to(root)})")
            continue
        if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            problems.append(f"{target}: no heading #{fragment} in {resolved.relative_to(root)}")
    return problems


def missing_text_paths(document) -> list[str]:
    """Repository paths written as text (in code spans and blocks too) that do not exist, and
    README sections named in prose that README.md does not have."""
    text = document.read_text(encoding="utf-8")
    problems = [f"{path}: no such file or folder"
                for path in TEXT_PATH.findall(text)
                if not (REPO_ROOT / path.rstrip(".")).exists()]
    return problems + missing_sections(text)


def missing_sections(text: str) -> list[str]:
    """Sections named in `text` (README "Data", docs/harness.md "Several hosts") that their
    document does not have (a heading starting with the name)."""
    problems = []
    for document, name in SECTION_NAMED.findall(text):
        name = " ".join(name.split())  # a name wrapped over two lines
        path = REPO_ROOT / ("README.md" if document.startswith("README") else document)
        if not path.exists():
            problems.append(f'{document} "{name}": no such file')
            continue
        headings = {h.replace("-", " ") for h in anchors(path)}
        if not any(h.startswith(github_slug(name).replace("-", " ")) for h in headings):
            problems.append(f'{document} "{name}": {path.name} has no such section')
    return problems


def _name(path) -> str:
    return str(path.relative_to(REPO_ROOT))


def test_the_documents_are_found():
    names = {_name(d) for d in DOCUMENTS}
    assert {"README.md", "docs/METHOD.md", "docs/RESULTS.md", "docs/OWN_LOOP.md"} <= names


def test_the_link_finder_sees_links_and_skips_code():
    text = ("see [a](docs/A.md#x) and ![img](p.png \"t\") and `[no](code.md)`\n"
            "```\n[no](block.md)\n```\n[ref]: other.md\n<img src=\"pic.png\">\n"
            "[web](https://example.com)")
    assert links(text) == ["docs/A.md#x", "p.png", "https://example.com", "other.md", "pic.png"]
    assert github_slug("sdp_transform in your own training loop") == \
        "sdp_transform-in-your-own-training-loop"
    assert github_slug("Reading `results.json`: the keys") == "reading-resultsjson-the-keys"


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_relative_links_resolve_inside_the_repository(document):
    assert broken_links(document) == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_paths_and_sections_named_in_the_text_exist(document):
    assert missing_text_paths(document) == []


def test_sections_the_code_names_exist():
    """A comment or docstring that sends the reader to a section ("see README "Data"",
    docs/harness.md "Several hosts") names one its document has."""
    sources = sorted([*(REPO_ROOT / "esacl_jax").rglob("*.py"),
                      *(REPO_ROOT / "experiments").rglob("*.py")])
    problems = [f"{_name(source)}: {problem}" for source in sources
                for problem in missing_sections(source.read_text(encoding="utf-8"))]
    assert problems == []
    assert missing_sections('README "No such section"') != []  # the check can fail


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_no_path_points_into_the_shared_folders(document):
    hits = [f"line {n}: {line.strip()}"
            for n, line in enumerate(document.read_text(encoding="utf-8").splitlines(), 1)
            if OUTSIDE.search(line)]
    assert hits == [], "the repository's docs must stand alone"


# ----------------------------------------------------------------------------- METHOD.md defaults


def _section(text: str, title: str) -> str:
    assert f"\n## {title}\n" in text, f"docs/METHOD.md has no '## {title}' section"
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _table_rows(section: str) -> list[list[str]]:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.strip().startswith("|")]
    return [row for row in rows[2:]]  # header and separator rows dropped


def _code(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _field(config, dotted: str):
    value = config
    for part in dotted.split("."):
        assert part in value, f"METHOD.md quotes {dotted}, which the config schema lacks"
        value = value[part]
    return value


def _value(literal: str):
    value = ast.literal_eval(literal)
    return tuple(value) if isinstance(value, list) else value


def quoted_defaults() -> list[tuple[str, object, list[str]]]:
    """(config field, quoted default, library arguments named `fn(arg=)`) per table row."""
    rows = _table_rows(_section(METHOD.read_text(encoding="utf-8"), "Defaults"))
    out = []
    for row in rows:
        assert len(row) >= 2, f"a Defaults row needs field | default: {row}"
        (field,), (literal,) = _code(row[0]), _code(row[1])
        library = [c for c in _code(row[2]) if re.fullmatch(r"\w+\(\w+=\)", c)] if len(row) > 2 \
            else []
        out.append((field, _value(literal), library))
    return out


def test_method_md_defaults_are_the_configs():
    from esacl_jax.harness.config import base_config

    config = base_config()
    defaults = quoted_defaults()
    fields = {field for field, _, _ in defaults}
    # The knobs METHOD.md describes must all be in the table (so none is quoted from memory).
    assert {"esacl.step_variant", "esacl.sparsity", "esacl.rho", "esacl.gamma", "esacl.ids_score",
            "esacl.ids_unseen", "esacl.replay", "sparse_start",
            "esacl.mask_update_every_epochs", "esacl.mask_update_every_steps",
            "esacl.prune_fraction", "esacl.score", "esacl.score_lambda", "esacl.ema_decay",
            "esacl.regrow", "prunable", "buffer_size"} <= fields
    wrong = [f"{field}: METHOD.md says {value!r}, base_config() has {_field(config, field)!r}"
             for field, value, _ in defaults if _field(config, field) != value]
    assert wrong == []


def test_method_md_library_defaults_are_the_librarys():
    import esacl_jax

    wrong = []
    for field, value, library in quoted_defaults():
        for call in library:
            fn, arg = re.fullmatch(r"(\w+)\((\w+)=\)", call).groups()
            default = inspect.signature(getattr(esacl_jax, fn)).parameters[arg].default
            if default != value:
                wrong.append(f"{field}: METHOD.md says {value!r}, {fn}({arg}=) defaults to "
                             f"{default!r}")
    assert wrong == []


def test_method_md_protocol_values_are_the_protocols():
    from esacl_jax.harness.config import BENCHMARK_PROTOCOLS, base_config, get_config

    rows = _table_rows(_section(METHOD.read_text(encoding="utf-8"), "Protocol values"))
    assert rows
    wrong, listed = [], {}
    for row in rows:
        protocols, (field,), (literal,) = _code(row[0]), _code(row[1]), _code(row[2])
        for protocol in protocols:
            assert protocol in BENCHMARK_PROTOCOLS, f"METHOD.md names protocol {protocol!r}"
            listed.setdefault(protocol, set()).add(field)
            actual = _field(get_config(protocol, "esacl"), field)
            if actual != _value(literal):
                wrong.append(f"{protocol} {field}: METHOD.md says {literal}, the protocol has "
                             f"{actual!r}")
    assert wrong == []
    # Every protocol's epochs (which decide when masks update) and every EsaCL knob it changes.
    base = base_config().esacl
    missing = []
    for protocol in BENCHMARK_PROTOCOLS:
        esacl = get_config(protocol, "esacl").esacl
        needed = {"epochs"} | {f"esacl.{k}" for k in esacl if esacl[k] != base[k]}
        missing += [f"{protocol}: {field}" for field in sorted(needed - listed.get(protocol,
                                                                                   set()))]
    assert missing == [], "rows missing from METHOD.md's 'Protocol values'"


def test_no_development_machine_paths_in_readme_or_docs():
    """README and everything under docs/ name directories by placeholders (DATA, OUT, RUNS,
    ...) or paths relative to a run root, never a development machine's absolute paths."""
    pattern = re.compile(r"(?<![\w.:/])/(?:work|tmp|root|home|Users|mnt|scratch)/")
    offenders = []
    texts = [REPO_ROOT / "README.md", *(p for p in (REPO_ROOT / "docs").rglob("*")
                                        if p.suffix in (".md", ".csv", ".txt", ".log", ".json")
                                        and p.is_file())]
    for path in texts:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()[:100]}")
    assert offenders == [], "\n".join(offenders[:20])


def test_portable_command_replaces_absolute_paths_by_placeholders():
    from esacl_jax.harness.sweep.provenance import portable_command

    command = ("python -m experiments.compare --data_dir=/work/shared/data --out=/tmp/x "
               "--runs=/home/u/runs --seeds=0,1 --docs_dir=docs --cache=/srv/c")
    assert portable_command(command) == (
        "python -m experiments.compare --data_dir=DATA --out=OUT --runs=RUNS --seeds=0,1 "
        "--docs_dir=docs --cache=CACHE")
