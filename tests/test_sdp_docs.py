"""docs/OWN_LOOP.md's python blocks run as written (the README section is pasted from there)."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO_ROOT

DOC = REPO_ROOT / "docs" / "OWN_LOOP.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_doc_has_the_readme_section():
    text = DOC.read_text()
    section = text.split("## sdp_transform in your own training loop", 1)[1].split("\n## ", 1)[0]
    assert "```python" in section


def _readme_section_code() -> str | None:
    text = (REPO_ROOT / "README.md").read_text()
    if "## sdp_transform in your own training loop" not in text:
        return None
    section = text.split("## sdp_transform in your own training loop", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    return blocks[0] if blocks else None


@pytest.mark.parametrize("index", range(3))
def test_doc_block_runs(index, capsys):
    blocks = _blocks()
    assert len(blocks) == 3
    if index == 0 and _readme_section_code() == blocks[0]:
        pytest.skip("pasted into README.md: tests/test_readme.py runs it")
    exec(compile(blocks[index], f"OWN_LOOP.md[{index}]", "exec"), {"__name__": "own_loop"})
    if index == 0:
        assert "sparsity 0.90" in capsys.readouterr().out
