"""Shared fixtures: where the real datasets are, and a subprocess runner for multi-device tests."""

from __future__ import annotations

import atexit
import os
import pathlib
import shutil
import tempfile

# The suite compiles hundreds of small programs, most run for a few steps: XLA's CPU backend
# optimizations cost more compile time than they save there (about a quarter of the suite's CPU
# time). Set before JAX starts a backend; subprocesses inherit it, and a test that sets its own
# XLA_FLAGS adds them to `xla_flags()`. ESACL_TEST_XLA_OPTIMIZE=1 compiles as users do.
TEST_XLA_FLAGS = ("" if os.environ.get("ESACL_TEST_XLA_OPTIMIZE") == "1"
                  else "--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join(filter(None, (os.environ.get("XLA_FLAGS"), TEST_XLA_FLAGS)))

import jax  # noqa: E402 - after XLA_FLAGS
import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def xla_flags(*flags: str) -> str:
    """XLA_FLAGS for a test's subprocess: `flags` (e.g. a CPU device count) and the suite's."""
    return " ".join(filter(None, (*flags, TEST_XLA_FLAGS)))


def find_shared_data_dir() -> pathlib.Path | None:
    """ESACL_DATA_DIR if set, else ../shared/data beside the checkout (the CI layout)."""
    candidates = []
    if os.environ.get("ESACL_DATA_DIR"):
        candidates.append(pathlib.Path(os.environ["ESACL_DATA_DIR"]))
    candidates.append(REPO_ROOT.parent / "shared" / "data")
    for path in candidates:
        if (path / "mnist").is_dir():
            return path
    return None


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
    """The offline MNIST/Fashion-MNIST copies. In CI they must exist: a skip there is a failure."""
    path = find_shared_data_dir()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI=true but no MNIST data: set ESACL_DATA_DIR or put shared/data "
                        "beside the repo")
        pytest.skip("no MNIST copy found (set ESACL_DATA_DIR to a directory holding mnist/)")
    return path


# One persistent XLA compilation cache for the whole test session, shared by the pytest-xdist
# workers, the in-process runs and the subprocesses (`experiments.main` reads
# ESACL_COMPILATION_CACHE): the suite compiles the same small programs in many tests, and a
# cached executable is the one a fresh compilation makes, so results do not change. The process
# that made the directory removes it; tests about cold compilation set the variable to "0".
if not os.environ.get("ESACL_TEST_COMPILATION_CACHE"):
    os.environ["ESACL_TEST_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="esacl_test_xla_")
    atexit.register(shutil.rmtree, os.environ["ESACL_TEST_COMPILATION_CACHE"], True)
if os.environ["ESACL_TEST_COMPILATION_CACHE"] != "0":  # "0": every compilation cold
    os.environ["ESACL_COMPILATION_CACHE"] = os.environ["ESACL_TEST_COMPILATION_CACHE"]
    jax.config.update("jax_compilation_cache_dir", os.environ["ESACL_TEST_COMPILATION_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# Nothing in `make test` may reach the internet: a dataset missing from a test's local
# directory must not start a download from the canonical hosts (subprocesses inherit this).
# The download tests (tests/test_download.py) turn downloads on for a local HTTP server only.
os.environ["ESACL_DATA_DOWNLOAD"] = "0"
