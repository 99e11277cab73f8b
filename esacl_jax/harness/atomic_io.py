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
import shutil
import socket
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


class WriteError(OSError):
    """A file or folder could not be written. The message is one line: the path and the cause."""


def _cause(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically (temporary file in the same directory, then rename).

    Creates the parent directory. The file's mode is ``0o666 & ~umask``. Raises WriteError
    ("cannot write PATH: CAUSE") for any OSError; the target is then unchanged.
    """
    path = pathlib.Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            pathlib.Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(f"cannot write {path}: {_cause(err)}") from err
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


MIN_FREE_BYTES = 64 * 2**20  # below this a run would fail writing its results or checkpoints


def check_writable(directory: str | os.PathLike, min_free_bytes: int = MIN_FREE_BYTES) -> None:
    """Creates `directory` and proves it writable with a probe file; checks its free space.

    Run before anything expensive, so a full or read-only workdir is found in seconds, not after
    training. Raises WriteError (one line: the path and the cause).
    """
    directory = pathlib.Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"probe")
                f.flush()
                os.fsync(f.fileno())
        finally:
            pathlib.Path(probe).unlink(missing_ok=True)
        free = shutil.disk_usage(directory).free
    except OSError as err:
        raise WriteError(f"cannot write to workdir {directory}: {_cause(err)}") from err
    if free < min_free_bytes:
        raise WriteError(f"cannot write to workdir {directory}: only {free / 2**20:.0f} MiB free "
                         f"on its filesystem (need at least {min_free_bytes / 2**20:.0f} MiB)")


class WorkdirBusyError(RuntimeError):
    """Another live process holds the workdir's lock. The message names it."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class WorkdirLock:
    """`directory/.lock`: one run per workdir. Holds the owner's pid, host and command line.

    The lock file is created atomically (written beside it, then hard-linked into place, which
    fails if it exists), so a second run sees either no lock or a complete one. A lock whose
    process is gone (same host, pid not alive) is taken over with a one-line warning on stderr.
    Use as a context manager; the lock is removed on exit if it is still this process's.
    """

    def __init__(self, directory: str | os.PathLike):
        self.path = pathlib.Path(directory) / ".lock"
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(),
                      "command": " ".join(sys.argv)}

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        text = json.dumps(self.owner)
        for _ in range(3):
            tmp = None
            try:
                fd, tmp = tempfile.mkstemp(prefix=".lock.", dir=self.path.parent)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                os.link(tmp, self.path)
                return
            except FileExistsError:
                pass
            except OSError as err:
                raise WriteError(f"cannot write {self.path}: {_cause(err)}") from err
            finally:
                if tmp is not None:
                    pathlib.Path(tmp).unlink(missing_ok=True)
            other = self._read()
            if other is None:
                stale = True  # unreadable: not written by this class's atomic create
            else:
                stale = other.get("host") == self.owner["host"] and not _pid_alive(
                    int(other.get("pid", -1)))
            if not stale:
                raise WorkdirBusyError(
                    f"workdir {self.path.parent} is in use by pid {other.get('pid')} on "
                    f"{other.get('host')} ({other.get('command', '?')}): wait for it or use "
                    f"another --workdir (if that process is gone, delete {self.path})")
            whose = "unreadable" if other is None else f"of pid {other.get('pid')}, not running"
            print(f"warning: taking over the stale lock {self.path} ({whose})", file=sys.stderr,
                  flush=True)
            self.path.unlink(missing_ok=True)
        raise WorkdirBusyError(f"cannot take the lock {self.path}: it keeps changing; "
                               "is another run starting on this workdir?")

    def release(self) -> None:
        if self._read() == self.owner:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
