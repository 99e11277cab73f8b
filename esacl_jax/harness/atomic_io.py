"""Atomic file writing: every file the harness and the experiments write goes through here.

A file is written to a temporary file in the same directory and renamed over the target, so a
reader never sees a half-written file and an interrupted write leaves the old file (or none).
The written file gets the permissions a plain ``open(path, "w")`` would give it (``0o666``
less the process umask), not the private ``0o600`` of the temporary file.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import tempfile
from typing import Any

import numpy as np


def _umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically (temporary file in the same directory, then rename).

    Creates the parent directory. The file's mode is ``0o666 & ~umask``.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) atomically, creating the parent directory."""
    write_bytes_atomic(path, text.encode("utf-8"))


def _is_jax_array(value: Any) -> bool:
    jax = sys.modules.get("jax")  # no value is a jax.Array unless jax has been imported
    return jax is not None and isinstance(value, jax.Array)


def to_jsonable(value: Any) -> Any:
    """numpy/jax values -> plain JSON (NaN becomes null so the file stays standard JSON)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray) or _is_jax_array(value):
        return to_jsonable(np.asarray(value).tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """results.json and friends: `to_jsonable(payload)` as indented standard JSON, atomically."""
    text = json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n"
    write_text_atomic(path, text)
