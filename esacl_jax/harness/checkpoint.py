"""Resumable runs: the train state and the run's progress, saved with orbax during and after tasks.

The whole train state is one pytree (params, BatchNorm statistics, optimizer state with masks and
score averages, replay buffer, per-example statistics, PRNG key), so one orbax checkpoint holds
it; the loop's progress (position in the run, accuracy rows, timings, FLOPs so far) goes beside
it as JSON. Per-step PRNG keys derive from the state's key and step counter, so a resumed run
gives the same result as an uninterrupted one.

Checkpoints cannot lie: the progress JSON holds a SHA-256 of the state's leaves (dtype, shape
and bytes, in tree order), verified after every restore. The last two checkpoints are kept; a
damaged latest one (unreadable, or its checksum differs) is skipped with a one-line warning and
the previous one restored. A write that fails (disk full, read-only directory) removes its
partial folder, keeps the previous checkpoint and raises `atomic_io.WriteError` (one line).

Several processes (`esacl_jax.harness.distributed`): every process calls save and restore (orbax
saves multi-process itself: each replicated array is written once, the progress JSON by process
0) on a directory all of them see; the checksum is computed by each from the replicated state,
so it is the same everywhere; only process 0 removes folders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import shutil
import sys
import threading
import time
from typing import Any

import jax
import numpy as np

from esacl_jax.harness.atomic_io import WriteError
from esacl_jax.harness.config import NON_COMPUTATIONAL_FIELDS
from esacl_jax.harness.run_logger import quiet_absl

KEEP = 2  # checkpoints kept: the latest and one to fall back to


class CheckpointError(ValueError):
    """No usable checkpoint (or one of another run). The message names the path and what to do."""


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
    """Typed PRNG keys -> their uint32 key data (what orbax can store)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _data_to_keys(tree: Any, template: Any) -> Any:
    """Inverse of `_keys_to_data`, with each key's implementation taken from `template`."""
    return jax.tree.map(
        lambda d, t: jax.random.wrap_key_data(d, impl=jax.random.key_impl(t)) if _is_key(t) else d,
        tree, template)


def tree_checksum(tree: Any) -> str:
    """SHA-256 over the leaves of `tree` (PRNG keys as their data): dtype, shape and bytes of
    each leaf, in tree order. Equal for equal values whatever device the leaves live on."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(_keys_to_data(tree)):
        array = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _comparable(config_dict: dict) -> str:
    """The config as compared on resumption: fields that do not change the computation (and so
    may differ between the interrupted run and its resumption) are left out."""
    kept = {k: v for k, v in config_dict.items() if k not in NON_COMPUTATIONAL_FIELDS}
    return json.dumps(kept, sort_keys=True, default=str)


def _cause(err: BaseException) -> str:
    """A short one-line description of an exception (storage errors can be pages long)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = " ".join(str(err).split())
    if isinstance(err, (KeyError, IndexError, TypeError, AttributeError)) or not text:
        text = f"{type(err).__name__}: {text}".rstrip(": ")
    return text if len(text) <= 120 else text[:117] + "..."


def _quiet_storage_logs():
    """Silences orbax's own error logs (tracebacks and storage settings, hundreds of lines for
    one failed write or read) while it runs: the checkpointer reports each failure in one line."""
    return quiet_absl(logging.CRITICAL)


def _join_storage_threads(timeout_s: float = 60.0) -> None:
    """Waits for orbax's writer threads: after one item's write failed, the others go on and
    would recreate the partial folder after it was removed."""
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and \
                type(thread).__module__.startswith("orbax"):
            thread.join(max(0.0, deadline - time.monotonic()))


class RunCheckpointer:
    """Saves (state, progress) under `directory`, keeping the last two; restores the latest good
    one. Checkpoints are numbered 0, 1, 2, ... in the order they were written."""

    def __init__(self, directory: str | pathlib.Path, config_dict: dict):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = pathlib.Path(directory).absolute()
        self.config_dict = config_dict
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # Synchronous saves: a failed write raises here, not in a background thread.
            # Temporary folders left by a killed run are removed when the manager starts.
            with _quiet_storage_logs():
                self.manager = ocp.CheckpointManager(
                    self.directory,
                    options=ocp.CheckpointManagerOptions(
                        max_to_keep=KEEP, create=True, enable_async_checkpointing=False,
                        cleanup_tmp_directories=True))
        except OSError as err:
            raise WriteError(f"cannot write checkpoints to {self.directory}: {_cause(err)}") \
                from err
        steps = self._steps()
        self._next_step = max(steps) + 1 if steps else 0

    def check_space(self, state: Any) -> None:
        """Raises WriteError (one line) unless the directory's filesystem has room for the kept
        checkpoints and one being written (uncompressed size of `state`, three times)."""
        size = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(_keys_to_data(state)))
        need, free = (KEEP + 1) * size, shutil.disk_usage(self.directory).free
        if free < need:
            raise WriteError(f"cannot write checkpoints to {self.directory}: {free / 2**20:.0f} "
                             f"MiB free, {KEEP + 1} checkpoints of this run need about "
                             f"{need / 2**20:.0f} MiB (free space, or --config.checkpoint=False)")

    def _steps(self) -> list[int]:
        """The finished checkpoints on disk."""
        with _quiet_storage_logs():
            self.manager.reload()
            return list(self.manager.all_steps())

    def step_path(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def _remove_partial(self, step: int) -> None:
        """Removes what a failed save of `step` left behind (its folder, temporary folders)."""
        if jax.process_index() != 0:
            return
        for path in self.directory.iterdir():
            if path.name == str(step) or ".orbax-checkpoint-tmp" in path.name:
                shutil.rmtree(path, ignore_errors=True)

    def save(self, state: Any, progress: dict) -> int:
        """Writes a new checkpoint (the oldest beyond the last two is deleted); returns its number.

        Raises WriteError (one line; partial folder removed, previous checkpoint kept).
        """
        ocp = self._ocp
        step = self._next_step
        payload = {**progress, "config": self.config_dict, "state_sha256": tree_checksum(state)}
        try:
            with _quiet_storage_logs():
                self.manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(_keys_to_data(state)),
                    progress=ocp.args.JsonSave(payload)), force=True)
                self.manager.wait_until_finished()
        except Exception as err:
            with _quiet_storage_logs():
                _join_storage_threads()  # the other items' writers may still be running
            self._remove_partial(step)
            previous = [s for s in self._steps() if s < step]
            kept = (f"the previous checkpoint {self.step_path(max(previous))} is kept" if previous
                    else "no earlier checkpoint exists")
            raise WriteError(f"cannot write checkpoint {self.step_path(step)}: {_cause(err)} "
                             f"(partial folder removed; {kept})") from err
        self._next_step = step + 1
        return step

    def _restore_step(self, step: int, template: Any) -> tuple[Any, dict]:
        ocp = self._ocp
        progress = self.manager.restore(step, args=ocp.args.Composite(
            progress=ocp.args.JsonRestore()))["progress"]
        if _comparable(progress.get("config", {})) != _comparable(self.config_dict):
            raise CheckpointError(f"{self.directory} holds checkpoints of a run with another "
                                  "config: use a new --workdir or delete that directory")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _keys_to_data(template))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))["state"]
        except ValueError as err:
            if "structures do not match" not in str(err):  # orbax's words for another tree
                raise
            raise CheckpointError(
                f"{self.directory} holds checkpoints whose train state is laid out differently "
                "(written by another version of esacl_jax): use a new --workdir or delete that "
                "directory") from err
        if tree_checksum(restored) != progress.get("state_sha256"):
            raise ValueError("its content checksum does not match (the files were altered)")
        return _data_to_keys(restored, template), progress

    def restore(self, template: Any) -> tuple[Any, dict] | None:
        """(state, progress) of the latest good checkpoint, or None when there is none.

        A damaged checkpoint is skipped with a one-line warning on stderr (printed once a good
        one is found). Raises CheckpointError (one line, no warnings before it) when every
        checkpoint is damaged or they were written by a run with another config.
        """
        steps = sorted(self._steps(), reverse=True)
        failures, damaged = [], []
        for step in steps:
            try:
                with _quiet_storage_logs():
                    state, progress = self._restore_step(step, template)
            except CheckpointError:
                raise
            except Exception as err:  # any failure to read or verify is damage
                failures.append(f"checkpoint {self.step_path(step)} is damaged ({_cause(err)})")
                damaged.append(step)
                continue
            # The warnings only when a good one is found: when none is, the error says it all
            # in one line (a SIGKILL between a save and the oldest's removal leaves three).
            for failure, older in zip(failures, steps[1:len(failures) + 1], strict=True):
                print(f"warning: {failure}; trying the previous one, {self.step_path(older)}",
                      file=sys.stderr, flush=True)
            # The damaged newer ones go, so the next saves keep a good one to fall back to.
            for bad in damaged if jax.process_index() == 0 else ():
                shutil.rmtree(self.step_path(bad), ignore_errors=True)
            if damaged:
                self._steps()
            self._next_step = max(steps) + 1
            return state, progress
        if failures:
            more = (f" (and the {len(failures) - 1} older one{'s' * (len(failures) > 2)} "
                    "too)") if len(failures) > 1 else ""
            raise CheckpointError(f"no usable checkpoint: {failures[0]}{more}; delete "
                                  f"{self.directory} to start the run over")
        return None

    def close(self) -> None:
        """Ends the manager's work (idempotent: the loop closes it on every way out)."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        with _quiet_storage_logs():
            self.manager.close()
