"""Resumable runs: the train state and the run's progress, saved with orbax after every task.

The whole train state is one pytree (params, BatchNorm statistics, optimizer state with masks and
score averages, replay buffer, per-example statistics, PRNG key), so one orbax checkpoint holds
it; the accuracy rows, timings and FLOPs so far go beside it as JSON. Per-step PRNG keys derive
from the state's key and step counter, so a resumed run gives the same result as an
uninterrupted one.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax

from esacl_jax.harness.config import NON_COMPUTATIONAL_FIELDS


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


def _comparable(config_dict: dict) -> str:
    """The config as compared on resumption: fields that do not change the computation (and so
    may differ between the interrupted run and its resumption) are left out."""
    kept = {k: v for k, v in config_dict.items() if k not in NON_COMPUTATIONAL_FIELDS}
    return json.dumps(kept, sort_keys=True, default=str)


class RunCheckpointer:
    """Saves (state, progress) after each task under `directory`; restores the latest one."""

    def __init__(self, directory: str | pathlib.Path, config_dict: dict):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.config_dict = config_dict
        self.manager = ocp.CheckpointManager(
            pathlib.Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

    def save(self, task_id: int, state: Any, progress: dict) -> None:
        ocp = self._ocp
        payload = {**progress, "config": self.config_dict}
        self.manager.save(task_id, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_keys_to_data(state)),
            progress=ocp.args.JsonSave(payload)))
        self.manager.wait_until_finished()

    def restore(self, template: Any) -> tuple[Any, dict] | None:
        """(state, progress) of the latest completed task, or None when there is none.

        Raises ValueError when the checkpoint was written by a run with another config.
        """
        step = self.manager.latest_step()
        if step is None:
            return None
        ocp = self._ocp
        progress = self.manager.restore(step, args=ocp.args.Composite(
            progress=ocp.args.JsonRestore()))["progress"]
        if _comparable(progress.get("config", {})) != _comparable(self.config_dict):
            raise ValueError(f"{self.manager.directory} holds checkpoints of a run with another "
                             "config: use a new --workdir or delete that directory")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _keys_to_data(template))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
        return _data_to_keys(restored, template), progress

    def close(self) -> None:
        self.manager.close()
