"""Memory footprint: analytic byte counts (what a sparse model must store) and measured peaks.

Analytic (docs/METHOD.md "Memory footprint"): nonzero weights of the masked (prunable) leaves plus
one bit per mask entry, every other parameter dense, the optimizer state, the replay buffer, every
other array the method keeps between steps (`costs.CostHooks.stored_method_state`) and the
activations of one step.
Measured: the process's peak RSS and, on GPU/TPU, the device allocator's ``peak_bytes_in_use``.
"""

from __future__ import annotations

import math
import os
import resource
import sys
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from esacl_jax.harness.flops import abstract_variables, default_apply_kwargs, path_to_str


def _nbytes(leaf: Any) -> int:
    """Bytes of an array or ``jax.ShapeDtypeStruct`` leaf (0 for non-array leaves)."""
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        return 0
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # typed keys: their key data
        return int(math.prod(leaf.shape)) * int(np.prod(jax.random.key_data(leaf).shape[-1:])) * 4
    return int(math.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize


def tree_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of a pytree (None leaves and scalars count 0)."""
    return sum(_nbytes(leaf) for leaf in jax.tree.leaves(tree))


def analytic_footprint(
    params: Any,
    masks: Any = None,
    opt_state: Any = None,
    buffer: Any = None,
    activation_bytes: int = 0,
    method_state: Any = None,
) -> dict[str, int]:
    """Analytic memory of a sparse continual learner, in bytes.

    Args:
      params: the parameter pytree.
      masks: binary masks for the prunable leaves, a pytree whose leaves are matched to
        ``params`` by path (same structure with None for unmasked leaves, or any sub-tree).
        A masked leaf costs ``nonzeros * itemsize`` plus ``ceil(size / 8)`` mask bytes.
      opt_state: optimizer state, counted as stored (all array leaves).
      buffer: replay buffer (any pytree of arrays), counted as stored.
      activation_bytes: activations of one step (see `activation_bytes_per_example`).
      method_state: other state the method stores (any pytree, e.g. CO2L's copy of the past
        model), counted as stored.

    Returns:
      dict with "weights" (nonzero + unmasked weights), "masks", "params" (= weights + masks),
      "dense_params" (all parameters dense, for comparison), "opt_state", "buffer",
      "method_state", "activations" and "total" (params + opt_state + buffer + method_state +
      activations).
    """
    mask_by_path = {}
    if masks is not None:
        for path, m in jax.tree_util.tree_flatten_with_path(masks)[0]:
            mask_by_path[path_to_str(path)] = m
    weights = mask_bytes = dense = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        size = int(math.prod(leaf.shape))
        itemsize = np.dtype(leaf.dtype).itemsize
        dense += size * itemsize
        mask = mask_by_path.get(path_to_str(path))
        if mask is None:
            weights += size * itemsize
        else:
            weights += int(np.count_nonzero(np.asarray(mask))) * itemsize
            mask_bytes += math.ceil(size / 8)
    out = {
        "weights": weights,
        "masks": mask_bytes,
        "params": weights + mask_bytes,
        "dense_params": dense,
        "opt_state": tree_bytes(opt_state),
        "buffer": tree_bytes(buffer),
        "method_state": tree_bytes(method_state),
        "activations": int(activation_bytes),
    }
    out["total"] = (out["params"] + out["opt_state"] + out["buffer"] + out["method_state"]
                    + out["activations"])
    return out


def activation_bytes_per_example(
    model: nn.Module,
    variables: Mapping[str, Any] | None,
    sample_input: Any,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> int:
    """Bytes of the activations one example keeps for the backward pass, estimated as the input
    plus the output of every built-in flax layer call (Conv, Dense, BatchNorm, ...), at their
    dtypes. Element-wise functions (relu) and pooling are not modules and are not counted, so
    this is a lower bound of what autodiff stores. Computed abstractly (no FLOPs, no memory).

    ``sample_input`` has a leading batch dimension; the result is per example.
    """
    kwargs = dict(default_apply_kwargs(model) if apply_kwargs is None else apply_kwargs)
    variables = abstract_variables(model, variables, sample_input, kwargs)
    batch = int(jax.tree.leaves(sample_input)[0].shape[0])
    total = [tree_bytes(sample_input)]

    def interceptor(next_fun, args, kw, context):
        out = next_fun(*args, **kw)
        if context.method_name == "__call__" and type(context.module).__module__.startswith(
            "flax.linen"
        ):
            total[0] += tree_bytes(out)
        return out

    def run(v, x):
        with nn.intercept_methods(interceptor):
            return model.apply(v, x, **kwargs)

    jax.eval_shape(run, variables, sample_input)
    return total[0] // max(batch, 1)


def current_rss_bytes() -> int | None:
    """The process's resident set size now (Linux /proc/self/statm), None where unavailable.

    Recorded per task in results.json, so memory growth across tasks shows (the peak alone,
    `peak_memory`, cannot)."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def peak_memory() -> dict[str, Any]:
    """Measured peaks: host peak RSS (bytes) and, per accelerator, the allocator's peak.

    ``ru_maxrss`` is KiB on Linux and bytes on macOS. ``device_peak_bytes`` is the max over
    local devices of ``memory_stats()["peak_bytes_in_use"]``, or None where unavailable (CPU).
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = int(rss if sys.platform == "darwin" else rss * 1024)
    per_device = {}
    for device in jax.local_devices():
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001 - backends without allocator stats
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            per_device[str(device)] = int(stats["peak_bytes_in_use"])
    return {
        "host_peak_rss_bytes": rss_bytes,
        "device_peak_bytes": max(per_device.values()) if per_device else None,
        "device_peak_bytes_per_device": per_device,
        "platform": jax.default_backend(),
    }
