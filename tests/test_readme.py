"""The README is a front page: short, its EsaCL example 15-20 lines, and nothing in it that the
documentation site does not also hold (its code blocks and its results table, verbatim)."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
OWN_LOOP = REPO_ROOT / "docs" / "OWN_LOOP.md"


def section_code(path, title: str, index: int = 0) -> str:
    """The `index`-th python block under the `## title` heading of a markdown file."""
    text = path.read_text(encoding="utf-8")
    assert f"\n## {title}\n" in text, f"{path.name} has no '## {title}' section"
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) > index, f"{path.name} '## {title}' has no python block {index}"
    return blocks[index]


def readme_section_code(title: str) -> str:
    return section_code(README, title)


# The programs a user copies to run with the library alone, and a pattern of what each prints
# (re.search); all run in a fresh library-only virtual environment by tests/test_packaging.py
# (the README's short one, the 40-line continual program and sdp_transform alone in plain JAX).
LIBRARY_ONLY_EXAMPLES = (
    (README, "EsaCL in your own training loop", 0,
     r"accuracy 0\.9\d, hidden-layer sparsity 0\.90"),
    (OWN_LOOP, "EsaCL in your own training loop", 0, r"sparsity over all weights 0\.87"),
    (OWN_LOOP, "sdp_transform in your own training loop", 1,
     r"sparsity of the pruned layers 0\.90"),
)


def test_library_only_examples_compile_and_the_readmes_is_15_to_20_lines():
    for path, title, index, _ in LIBRARY_ONLY_EXAMPLES:
        compile(section_code(path, title, index), f"{path.name}: {title}", "exec")
    assert 15 <= len(readme_section_code("EsaCL in your own training loop").splitlines()) <= 20
    assert len(section_code(OWN_LOOP, "EsaCL in your own training loop").splitlines()) <= 40


def test_readme_is_a_front_page_of_at_most_250_lines():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


def _site_text() -> str:
    pages = sorted((REPO_ROOT / "docs").glob("*.md"))
    return "\n".join(page.read_text(encoding="utf-8") for page in pages)


def test_the_site_holds_the_readmes_code_and_results_verbatim():
    readme = README.read_text(encoding="utf-8")
    site = _site_text()
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", readme, flags=re.S | re.M)
    rows = [line for line in readme.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(blocks) >= 4 and len(rows) >= 3  # install, two commands, their output, the example
    # The results the front page quotes (mean ± std or SE) are the Results page's numbers.
    results = readme[readme.index("## Results"):readme.index("## Documentation")]
    quoted = re.findall(r"\d+\.\d+ ± \d+\.\d+", results)
    assert len(quoted) >= 6 and [q for q in quoted if q not in site] == []
    missing = [item.splitlines()[0] for item in blocks + rows if item not in site]
    assert missing == [], "in README.md but on no page of docs/"

