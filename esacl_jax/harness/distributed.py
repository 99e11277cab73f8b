"""Multi-host data parallelism on JAX's multi-controller runtime (one Python process per host).

Every process runs the same program on its own devices; `jax.distributed.initialize` connects
them, after which `jax.devices()` lists the devices of all processes and one jit call runs over
the global ("data",) mesh, XLA inserting the cross-process all-reduce (gloo on CPU, NCCL on
GPU, ICI/DCN on TPU).

The rule the harness keeps across processes (documented in docs/harness.md "Several hosts"):

* Every process loads the whole benchmark from the same files (loading is deterministic), so
  each holds the same task arrays; the device copies `x_dev`/`y_dev` are global arrays
  *replicated* over the mesh (each process fills only its own devices' copies).
* The whole `TrainState` -- parameters, optimizer state, sparse masks, the replay buffer and the
  per-example statistics in `method_state`, the PRNG key -- is *replicated* (PartitionSpec()).
  The reservoir insertion and the statistics updates run inside the compiled step on the
  replicated state with the *global* batch, so reservoir sampling sees the same stream of
  examples, in the same order, as a one-process run with the same global batch: its semantics
  (each example seen so far kept with probability buffer_size / seen) are unchanged, and masks
  are identical on every process by construction (computed by the same replicated program).
* Each step's batch (the positions `batch_idx` into the task arrays) is a global array sharded
  on "data": every process computes the epoch's shuffle (same key, same result) and feeds only
  the columns of its own devices (`global_array`: `jax.make_array_from_callback`, which asks
  each process only for the shards it holds).
* Host-side reads of the state (evaluation, checkpoints' checksums, results) read a replicated
  array, which every process holds whole: every process computes the same accuracy matrix.
  Only process 0 writes files (results.json, TensorBoard events, the workdir lock); orbax
  checkpoints are saved by all processes together (orbax writes each array once, process 0
  the metadata), so the workdir must be on a filesystem every host sees.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def initialize(config: Any) -> bool:
    """Connects this process to the others when `config.distributed` is set; returns whether it
    runs as one of several processes. Call before any other JAX call.

    Unset values (coordinator_address "", num_processes 0, process_id -1) are left to JAX:
    $JAX_COORDINATOR_ADDRESS, then cluster auto-detection (Cloud TPU, SLURM, Open MPI, ...).
    Calling it again in an initialized process does nothing.
    """
    if not config.get("distributed", False):
        return False
    if jax.distributed.is_initialized():
        return True
    address = config.get("coordinator_address", "") or None
    num_processes = config.get("num_processes", 0)
    process_id = config.get("process_id", -1)
    # gloo is jax's default CPU collective implementation; set it explicitly so a CPU-only
    # multi-process run has cross-process collectives whatever the local default.
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=num_processes if num_processes > 0 else None,
        process_id=process_id if process_id >= 0 else None)
    return True


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def is_primary() -> bool:
    """Process 0: the one that writes results, logs and locks."""
    return jax.process_index() == 0


def global_array(value: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """A host array as a global jax.Array with `sharding` (None: the default device).

    One process: `jax.device_put` (what the harness always did). Several: every process holds
    the same `value` and each builds only the shards of its own devices.
    """
    if sharding is None or not is_multiprocess():
        return jax.device_put(value, sharding)
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def replicate(tree: Any, sharding: jax.sharding.Sharding | None) -> Any:
    """Every leaf of `tree` (computed identically on every process) as a global array with
    `sharding` (replicated). One process: `jax.device_put`, as before."""
    if sharding is None or not is_multiprocess():
        return jax.device_put(tree, sharding)

    def leaf(x: Any) -> Any:
        if _is_key(x):
            data = global_array(np.asarray(jax.random.key_data(x)), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return global_array(np.asarray(x), sharding)

    return jax.tree.map(leaf, tree)


def _is_replicated_on(x: Any, sharding: jax.sharding.NamedSharding) -> bool:
    return (isinstance(x, jax.Array) and isinstance(x.sharding, jax.sharding.NamedSharding)
            and x.sharding.mesh == sharding.mesh and x.sharding.is_fully_replicated)


def _identity(xs: Any) -> Any:  # module-level: jit's cache reuses the compiled copy
    return xs


def ensure_replicated(tree: Any, sharding: jax.sharding.NamedSharding | None) -> Any:
    """`tree` with every leaf a global array replicated on `sharding`'s mesh: leaves that are
    process-local (a host hook's `jnp.asarray`, numpy) or sharded otherwise are resharded by one
    compiled identity (a collective: every process must call it at the same point)."""
    if sharding is None:
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    todo = [i for i, x in enumerate(leaves) if not _is_replicated_on(x, sharding)]
    if not todo:
        return tree
    moved = jax.jit(_identity, out_shardings=sharding)([leaves[i] for i in todo])
    for i, x in zip(todo, moved, strict=True):
        leaves[i] = x
    return jax.tree.unflatten(treedef, leaves)


def agree(flag: int) -> int:
    """The largest of every process's `flag` (e.g. a pending stop signal), so all processes
    take the same branch at a chunk boundary. One process: `flag`."""
    if not is_multiprocess():
        return flag
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(flag, np.int32))))
