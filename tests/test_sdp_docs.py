"""docs/OWN_LOOP.md's python blocks run as written."""

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


# What each block prints: the flax EsaCL program, then sdp_transform's blocks.
EXPECTED = {0: "sparsity over all weights 0.87", 1: "sparsity 0.90"}


@pytest.mark.parametrize("index", range(5))
def test_doc_block_runs(index, capsys):
    blocks = _blocks()
    assert len(blocks) == 5
    exec(compile(blocks[index], f"OWN_LOOP.md[{index}]", "exec"), {"__name__": "own_loop"})
    if index in EXPECTED:
        assert EXPECTED[index] in capsys.readouterr().out
