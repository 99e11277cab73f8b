"""The two layers: the optimizer library installs and imports with jax + optax + numpy alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv

import pytest

from tests.conftest import REPO_ROOT
from tests.test_readme import readme_section_code

HARNESS_ONLY = ("flax", "ml_collections", "tensorflow_datasets", "sklearn", "orbax",
                "matplotlib", "tensorboardX", "tqdm", "pooch")  # absl comes with optax itself


def test_library_imports_load_no_harness_dependency():
    code = (
        "import sys\n"
        "import esacl_jax, esacl_jax.sdp, esacl_jax.masks, esacl_jax.sharpness, esacl_jax.ids\n"
        "import esacl_jax.replay, esacl_jax.metrics, esacl_jax.esacl, esacl_jax.export\n"
        f"loaded = [m for m in {HARNESS_ONLY!r} if m in sys.modules]\n"
        "print(','.join(loaded))\n"
        "assert not loaded, loaded\n"
        "import esacl_jax.harness\n"  # the harness itself does load them (the check can fail)
        "assert 'flax' in sys.modules and 'ml_collections' in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.slow
def test_plain_install_runs_the_readme_example(tmp_path):
    """`pip install .` (no extras) into a fresh venv: the README's two own-loop examples (EsaCL
    whole, sdp_transform alone) run, and flax is absent."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "esacl_jax", source / "esacl_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(source)],
                             capture_output=True, text=True, timeout=600, env=env)
    assert install.returncode == 0, install.stderr[-3000:]
    examples = (("sdp_transform in your own training loop", "sparsity of the pruned layers 0.90"),
                ("EsaCL in your own training loop", "sparsity over all weights 0.87"))
    for section, expected in examples:
        example = tmp_path / "example.py"
        example.write_text(readme_section_code(section))
        run = subprocess.run([str(python), str(example)], capture_output=True, text=True,
                             timeout=300, cwd=tmp_path, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        assert expected in run.stdout
    missing = subprocess.run([str(python), "-c", "import flax"], capture_output=True, text=True,
                             cwd=tmp_path, env=env)
    assert missing.returncode != 0  # the library install pulled in no harness dependency
