"""docs/OWN_LOOP.md's python blocks run as written."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO_ROOT
from tests.test_readme import LIBRARY_ONLY_EXAMPLES, section_code

DOC = REPO_ROOT / "docs" / "OWN_LOOP.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_doc_has_the_own_loop_sections():
    text = DOC.read_text()
    for title in ("EsaCL in your own training loop", "sdp_transform in your own training loop"):
        section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
        assert "```python" in section


# The plain-JAX programs run, with the library alone, in a fresh virtual environment
# (tests/test_packaging.py); here every other block: the flax EsaCL program, the flax
# sdp_transform program and the composition snippets.
LIBRARY_ONLY = [section_code(path, title, index) for path, title, index, _ in LIBRARY_ONLY_EXAMPLES
                if path == DOC]
# What each block prints.
EXPECTED = {1: "sparsity over all weights 0.87", 2: "sparsity 0.90"}


def test_the_library_only_blocks_are_blocks_0_and_3():
    assert [_blocks().index(code) for code in LIBRARY_ONLY] == [0, 3]


@pytest.mark.parametrize("index", [1, 2, 4, 5, 6])
def test_doc_block_runs(index, capsys):
    blocks = _blocks()
    assert len(blocks) == 7
    exec(compile(blocks[index], f"OWN_LOOP.md[{index}]", "exec"), {"__name__": "own_loop"})
    if index in EXPECTED:
        assert EXPECTED[index] in capsys.readouterr().out
