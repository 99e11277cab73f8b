"""The two layers, and a package ready to publish: the optimizer library installs and imports with
jax + optax + numpy alone, from a wheel that `python -m build` makes and `twine check` accepts."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile

import pytest

import esacl_jax
from tests.conftest import REPO_ROOT
from tests.test_readme import LIBRARY_ONLY_EXAMPLES, section_code

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


# What the sdist is built from (with esacl_jax/): every file the packaging reads.
PACKAGE_SOURCES = ("setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE",
                   "CHANGELOG.md")


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)


@pytest.mark.slow
def test_wheel_builds_passes_twine_and_runs_the_readme_example_from_a_fresh_venv(tmp_path):
    """What publishing needs, as CI checks it: `python -m build` makes the sdist and, from it,
    the wheel; `twine check --strict` accepts both (metadata, README rendering); the wheel alone
    (no extras) installs into a fresh venv, where the library-only examples of the README and
    docs/OWN_LOOP.md (EsaCL in 20 lines and in 40, sdp_transform alone) run and flax is absent."""
    source = tmp_path / "src"
    source.mkdir()
    for name in PACKAGE_SOURCES:
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "esacl_jax", source / "esacl_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    dist = tmp_path / "dist"
    # --no-isolation: this environment's setuptools (the test extra's, satisfying pyproject's
    # build requirement) instead of two fresh build environments; `make dist` builds isolated.
    built = _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, source],
                 timeout=600, env=env)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    version = esacl_jax.__version__
    wheel = dist / f"esacl_jax-{version}-py3-none-any.whl"
    sdist = dist / f"esacl_jax-{version}.tar.gz"
    assert sorted(p.name for p in dist.iterdir()) == sorted([sdist.name, wheel.name])
    checked = _run([sys.executable, "-m", "twine", "check", "--strict", sdist, wheel], timeout=120)
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(f"esacl_jax-{version}.dist-info/METADATA").decode()
    assert f"esacl_jax-{version}.dist-info/licenses/LICENSE" in names
    assert not [n for n in names if n.startswith(("tests/", "experiments/"))]
    for field in ("License: Apache-2.0", "Requires-Python: >=3.10", "Project-URL: Source,",
                  "Classifier: Programming Language :: Python :: 3.11"):
        assert field in metadata, field
    with tarfile.open(sdist) as archive:
        members = {m.split("/", 1)[1] for m in archive.getnames() if "/" in m}
    assert {"LICENSE", "CHANGELOG.md", "README.md"} <= members

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # --no-compile: byte-compiling all of jax, scipy and numpy costs more than the few imports
    # below compiling what they load.
    install = _run([python, "-m", "pip", "install", "--quiet", "--no-compile", wheel],
                   timeout=600, env=env)
    assert install.returncode == 0, install.stderr[-3000:]
    installed = _run([python, "-c", "import esacl_jax; print(esacl_jax.__version__)"],
                     cwd=tmp_path, env=env, timeout=120)
    assert installed.stdout.strip() == version, installed.stderr[-2000:]
    for path, section, index, expected in LIBRARY_ONLY_EXAMPLES:
        example = tmp_path / "example.py"
        example.write_text(section_code(path, section, index))
        run = _run([python, example], timeout=300, cwd=tmp_path, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        assert re.search(expected, run.stdout), run.stdout[-2000:]
    missing = _run([python, "-c", "import flax"], cwd=tmp_path, env=env)
    assert missing.returncode != 0  # the library install pulled in no harness dependency
    # Without the extra, the harness and the flax glue name the install command in one line.
    for module in ("esacl_jax.harness", "esacl_jax.flax_utils"):
        run = _run([python, "-c", f"import {module}"], cwd=tmp_path, env=env)
        assert run.returncode != 0
        last = run.stderr.strip().splitlines()[-1]
        assert last.startswith("ModuleNotFoundError: ") and 'pip install "esacl_jax[harness]"' \
            in last, run.stderr[-2000:]


def test_one_version_string():
    """setup.cfg reads the version from esacl_jax.__version__ (no second copy to drift), and
    the changelog has a section for it."""
    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    assert setup["metadata"]["version"] == "attr: esacl_jax.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+", esacl_jax.__version__)
    changelog = (REPO_ROOT / "CHANGELOG.md").read_text()
    assert f"## [{esacl_jax.__version__}]" in changelog
    assert (REPO_ROOT / "LICENSE").read_text().split()[:3] == ["Apache", "License", "Version"]
