"""The README's own-loop examples (EsaCL whole, and sdp_transform alone)."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT


def readme_section_code(title: str) -> str:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert blocks, f"no python block under '## {title}'"
    return blocks[0]


# Both examples run, and are checked for what they print (learning, sparsity), as a user runs
# them: in a fresh library-only virtual environment (tests/test_packaging.py). Here: they are
# valid Python, and the EsaCL one keeps its promised length.
def test_own_loop_examples_compile_and_esacl_fits_in_40_lines():
    for title in ("sdp_transform in your own training loop", "EsaCL in your own training loop"):
        compile(readme_section_code(title), "README.md", "exec")
    assert len(readme_section_code("EsaCL in your own training loop").splitlines()) <= 40
