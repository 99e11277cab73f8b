"""Scalar logging for a training run: TensorBoard event files (via tensorboardX) or nothing.

The training loop logs loss, per-task accuracy, sparsity and cumulative FLOPs through the small
`RunLogger` interface, so it never depends on TensorBoard being wanted or installed.
Named run_logger (not logging) so it never shadows the standard library module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _to_float(tag: str, value: Any) -> float:
    """A Python float from a number, numpy scalar or 0-d (jax) array; ValueError otherwise."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"scalar {tag!r} must be a single number, got shape {arr.shape}")
    return float(arr.reshape(()))


class RunLogger:
    """Scalar logger interface; the base class logs nothing (see `NullLogger`).

    Use as a context manager (``with make_logger(workdir, True) as logger:``) so the writer is
    flushed and closed even when training fails.
    """

    def __init__(self) -> None:
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")

    def _write(self, tag: str, value: float, step: int) -> None:
        del tag, value, step

    def scalar(self, tag: str, value: Any, step: int) -> None:
        """Records `value` (any scalar, incl. numpy/jax 0-d arrays) under `tag` at `step`."""
        self._check_open()
        self._write(tag, _to_float(tag, value), int(step))

    def scalars(self, values: Mapping[str, Any], step: int) -> None:
        """Records each ``tag: value`` of `values` at the same `step`."""
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def flush(self) -> None:
        """Makes everything logged so far visible on disk."""

    def close(self) -> None:
        """Flushes and releases the writer; logging afterwards raises RuntimeError."""
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullLogger(RunLogger):
    """Discards everything (logging disabled)."""


class TensorBoardLogger(RunLogger):
    """Writes TensorBoard event files into `logdir` with tensorboardX (no TensorFlow needed).

    Events are written in the calling thread (not tensorboardX's writer thread, where a write
    error is a traceback on stderr and then a queue that blocks the run forever): a write that
    fails (a full or read-only disk) raises `atomic_io.WriteError`, one line, and the run ends
    like after any other failed write, before results.json. Written events reach the disk every
    `flush_secs` seconds, on `flush` and on `close`.
    """

    def __init__(self, logdir: str | os.PathLike, flush_secs: int = 30) -> None:
        super().__init__()
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2
        from tensorboardX.summary import scalar

        self._event_pb2, self._summary = event_pb2, scalar
        self.logdir = pathlib.Path(logdir)
        self._flush_secs = flush_secs
        self._writer = None
        with self._reporting("create"):
            self.logdir.mkdir(parents=True, exist_ok=True)
            self._writer = EventsWriter(str(self.logdir / "events"))
        self._next_flush = time.monotonic() + flush_secs

    @contextlib.contextmanager
    def _reporting(self, what: str) -> Iterator[None]:
        """OSError -> WriteError, one line naming the directory and the way out."""
        try:
            yield
        except OSError as err:
            from esacl_jax.harness.atomic_io import WriteError

            cause = err.strerror or " ".join(str(err).split())
            raise WriteError(f"cannot {what} TensorBoard logs in {self.logdir}: {cause} "
                             "(--config.tensorboard=False runs without them)") from err

    def _write(self, tag: str, value: float, step: int) -> None:
        event = self._event_pb2.Event(summary=self._summary(tag, value), step=step,
                                      wall_time=time.time())
        with self._reporting("write"):
            self._writer.write_event(event)
            if time.monotonic() >= self._next_flush:
                self._writer.flush()
                self._next_flush = time.monotonic() + self._flush_secs

    def flush(self) -> None:
        if not self._closed:
            with self._reporting("write"):
                self._writer.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True  # a failed close is not retried
            with self._reporting("write"):
                self._writer.close()
        super().close()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        # The run already fails with its own line; the logs' failure to close is not a second.
        with contextlib.suppress(Exception):
            self.close()


def make_logger(workdir: str | os.PathLike, enabled: bool) -> RunLogger:
    """A `TensorBoardLogger` writing into `workdir` when enabled, else a `NullLogger`.

    If tensorboardX cannot be imported, logs a warning and returns a `NullLogger`: a missing
    optional dependency must not stop a training run.
    """
    if not enabled:
        return NullLogger()
    try:
        return TensorBoardLogger(workdir)
    except ImportError as err:
        log.warning("TensorBoard logging disabled: %s", err)
        return NullLogger()


@contextlib.contextmanager
def quiet_absl(level: int) -> Iterator[None]:
    """Raises the absl logger's level to `level` while the block runs (storage and dataset
    libraries log through it: tracebacks and settings dumps the harness reports in one line)."""
    logger = logging.getLogger("absl")
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)
