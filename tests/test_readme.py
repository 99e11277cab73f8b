"""The README's own-loop examples (EsaCL whole, and sdp_transform alone) run as written."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT


def readme_section_code(title: str) -> str:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert blocks, f"no python block under '## {title}'"
    return blocks[0]


def test_sdp_transform_example_runs(capsys):
    code = readme_section_code("sdp_transform in your own training loop")
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    assert "sparsity of the pruned layers 0.90" in capsys.readouterr().out


def test_esacl_example_runs_learns_and_fits_in_40_lines(capsys):
    code = readme_section_code("EsaCL in your own training loop")
    assert len(code.splitlines()) <= 40
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert "class-IL accuracy per task" in out and "sparsity over all weights 0.87" in out
