"""results.json: what a run records about itself, written atomically."""

from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import subprocess
import tempfile
from importlib import metadata
from typing import Any

import jax
import numpy as np

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "chex", "numpy", "tensorflow-datasets",
             "ml_collections", "esacl_jax")


def git_commit(repo: pathlib.Path | None = None) -> str:
    """The checkout's commit (with '-dirty' when it has local changes), or 'unknown'."""
    cwd = repo or pathlib.Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5).stdout.strip()
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


def to_jsonable(value: Any) -> Any:
    """numpy/jax values -> plain JSON (NaN becomes null so the file stays standard JSON)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, jax.Array)):
        return to_jsonable(np.asarray(value).tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes to a temporary file in the same directory, then renames: never a half-written file.

    Creates the parent directory. Every file the project writes goes through here.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """results.json and friends: standard JSON (NaN as null), written atomically."""
    text = json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))
