"""results.json: what a run records about itself (environment, git commit).

The file itself is written with `esacl_jax.harness.atomic_io.write_json_atomic`.
"""

from __future__ import annotations

import os
import pathlib
import platform
import subprocess
from importlib import metadata
from typing import Any

import jax

__all__ = ["environment", "git_commit"]

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "chex", "numpy", "tensorflow-datasets",
             "ml_collections", "esacl_jax")


# Local changes, without taking the index lock (git status refreshes the index under
# .git/index.lock otherwise): a run's provenance must not make a `git commit` in the same
# checkout fail.
GIT_DIRTY = ("git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no")


def git_commit(repo: pathlib.Path | None = None) -> str:
    """The checkout's commit (with '-dirty' when it has local changes), or 'unknown'."""
    cwd = repo or pathlib.Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(GIT_DIRTY, cwd=cwd, capture_output=True, text=True,
                               timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict[str, Any]:
    """Versions, device and host: enough to say which machine produced a number."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    devices = jax.devices()
    return {
        "git_commit": git_commit(),
        "packages": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [str(d.device_kind) for d in devices],
        "num_devices": len(devices),
    }
