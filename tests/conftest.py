"""Shared fixtures: where the real datasets are, and a subprocess runner for multi-device tests."""

from __future__ import annotations

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


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


# Nothing in `make test` may reach the internet: a dataset missing from a test's local
# directory must not start a download from the canonical hosts (subprocesses inherit this).
# The download tests (tests/test_download.py) turn downloads on for a local HTTP server only.
os.environ["ESACL_DATA_DOWNLOAD"] = "0"
