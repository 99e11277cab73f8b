"""Inference time of a 90%-sparse MLP: dense matmuls against sparse ones, on the host's CPU.

MLPs 784-400-400-10 and 784-1000-1000-10, every kernel but the classifier's pruned to
`--sparsity` by magnitude (`esacl_jax.masks.magnitude_masks`), the classifier and the biases dense.
The weights go through `esacl_jax.export.save_sparse` / `load_sparse` first (the model a user
would ship). Forward passes, all jitted except scipy's:
  dense        x @ W + b with the zero-filled kernels (what the harness evaluates)
  bcoo         `jax.experimental.sparse.BCOO` kernels, x @ W_bcoo (bcoo_dot_general)
  bcsr         `jax.experimental.sparse.BCSR` of W.T times the transposed activations,
               W.T @ x.T (on CPU jax lowers this to its CSR sparse-dense kernel)
  gather-ell   per output unit, its active inputs padded to the layer's largest fan-in
               (ELLPACK, a padded CSR of W.T): y = sum_k x[:, idx[o, k]] * val[o, k]
  segment-coo  the active weights as (row, col, value): x[:, rows] * vals, summed into the
               output columns by `jax.ops.segment_sum`
  scipy-csr    scipy.sparse CSR of W.T times x.T (host numpy, not jitted; a reference point
               for a real CPU sparse kernel)
Every row's outputs are checked against the dense forward's. Timings: the median over
`--repeats` calls (each blocked until ready) after `--warmup` calls, the rows interleaved round by
round so that a change of machine load hits every row alike. Prints a markdown table, ms per
batch and the ratio to dense.

    python -m experiments.bench.sparse_inference --repeats=200
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

from esacl_jax import export, masks

WIDTHS = {"784-400-400-10": (784, 400, 400, 10), "784-1000-1000-10": (784, 1000, 1000, 10)}


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> dict:
    keys = jax.random.split(key, len(sizes) - 1)
    names = [f"dense{i}" for i in range(len(sizes) - 2)] + ["classifier"]
    return {name: {"kernel": jax.random.normal(k, (a, b)) / np.sqrt(a),
                   "bias": 0.1 * jax.random.normal(jax.random.fold_in(k, 1), (b,))}
            for name, k, a, b in zip(names, keys, sizes[:-1], sizes[1:], strict=True)}


def sparse_model(sizes: tuple[int, ...], sparsity: float) -> tuple[dict, dict]:
    """(params, masks) after a save_sparse / load_sparse round trip; every kernel but the
    classifier's at `sparsity`."""
    params = init_mlp(jax.random.key(0), sizes)
    prunable = {name: {"kernel": name != "classifier", "bias": False} for name in params}
    weight_masks = masks.magnitude_masks(
        params, masks.layer_sparsities(params, sparsity, prunable=prunable), prunable)
    params = masks.apply_masks(params, weight_masks)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.npz")
        export.save_sparse(path, params, weight_masks)
        return export.load_sparse(path, with_masks=True)


def layers(params: dict) -> list[str]:
    return sorted((n for n in params if n != "classifier"), key=lambda n: int(n[5:])) + [
        "classifier"]


def mlp_forward(params: dict, x: jax.Array, matmul: Callable) -> jax.Array:
    """The MLP with `matmul(x, kernel_repr)` for the sparse layers; the classifier dense."""
    names = layers(params)
    for name in names[:-1]:
        x = jax.nn.relu(matmul(x, params[name]["kernel"]) + params[name]["bias"])
    return x @ params["classifier"]["kernel"] + params["classifier"]["bias"]


def to_ell(kernel: np.ndarray, mask: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(idx, val) of shape (out, K): output o's active inputs, padded with input 0 and value 0."""
    fan_in = mask.sum(axis=0)
    k = max(int(fan_in.max()), 1)
    idx = np.zeros((kernel.shape[1], k), np.int32)
    val = np.zeros((kernel.shape[1], k), kernel.dtype)
    for o in range(kernel.shape[1]):
        rows = np.flatnonzero(mask[:, o])
        idx[o, :rows.size] = rows
        val[o, :rows.size] = kernel[rows, o]
    return jnp.asarray(idx), jnp.asarray(val)


def ell_matmul(x: jax.Array, ell: tuple[jax.Array, jax.Array]) -> jax.Array:
    idx, val = ell
    return jnp.einsum("bok,ok->bo", x[:, idx], val)


def to_coo(kernel: np.ndarray, mask: np.ndarray) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    rows, cols = np.nonzero(mask)
    return (jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32),
            jnp.asarray(kernel[rows, cols]), kernel.shape[1])


def coo_matmul(x: jax.Array, coo) -> jax.Array:
    rows, cols, vals, out = coo
    contrib = (x[:, rows] * vals).T  # (nnz, batch)
    return jax.ops.segment_sum(contrib, cols, num_segments=out, indices_are_sorted=False).T


def variants(params: dict, weight_masks: dict) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Label -> a function of the (numpy) batch returning the (blocked-until-ready) logits."""
    names = layers(params)[:-1]
    dense = jax.tree.map(jnp.asarray, params)

    def with_kernels(kernels: dict) -> dict:
        return {n: ({**dense[n], "kernel": kernels[n]} if n in kernels else dense[n])
                for n in dense}

    def jitted(p: dict, matmul: Callable) -> Callable:
        fn = jax.jit(lambda p, x: mlp_forward(p, x, matmul))
        return lambda x: jax.block_until_ready(fn(p, x))

    bcoo = with_kernels({n: jsparse.BCOO.fromdense(dense[n]["kernel"]) for n in names})
    ell = with_kernels({n: to_ell(params[n]["kernel"], weight_masks[n]["kernel"]) for n in names})
    coo = {n: to_coo(params[n]["kernel"], weight_masks[n]["kernel"]) for n in names}

    def coo_forward(p, x):
        for n in names:
            x = jax.nn.relu(coo_matmul(x, coo[n]) + p[n]["bias"])
        return x @ p["classifier"]["kernel"] + p["classifier"]["bias"]

    coo_fn = jax.jit(coo_forward)
    bcsr = {n: jsparse.BCSR.fromdense(dense[n]["kernel"].T) for n in names}

    def bcsr_forward(p, x):
        h = x.T  # (features, batch): the sparse operand must be the left one
        for n in names:
            h = jax.nn.relu(bcsr[n] @ h + p[n]["bias"][:, None])
        return h.T @ p["classifier"]["kernel"] + p["classifier"]["bias"]

    bcsr_fn = jax.jit(bcsr_forward)
    out = {
        "dense": jitted(dense, lambda x, w: x @ w),
        "bcoo": jitted(bcoo, lambda x, w: x @ w),
        "bcsr": lambda x: jax.block_until_ready(bcsr_fn(dense, x)),
        "gather-ell": jitted(ell, ell_matmul),
        "segment-coo": lambda x: jax.block_until_ready(coo_fn(dense, x)),
    }
    try:
        import scipy.sparse as scipy_sparse
    except ImportError:
        return out
    csr = {n: scipy_sparse.csr_matrix(np.asarray(params[n]["kernel"]).T) for n in names}
    np_params = jax.tree.map(np.asarray, params)

    def scipy_forward(x: np.ndarray) -> np.ndarray:
        h = x.T  # (features, batch)
        for n in names:
            h = np.maximum(csr[n] @ h + np_params[n]["bias"][:, None], 0.0)
        return h.T @ np_params["classifier"]["kernel"] + np_params["classifier"]["bias"]

    out["scipy-csr"] = scipy_forward
    return out


def time_rows(fns: dict[str, Callable], x: np.ndarray, warmup: int, repeats: int
              ) -> dict[str, float]:
    """Median seconds per call of each function on `x`, interleaved round by round."""
    reference = np.asarray(fns["dense"](x))
    for label, fn in fns.items():
        for _ in range(warmup):
            y = fn(x)
        np.testing.assert_allclose(np.asarray(y), reference, rtol=1e-4, atol=1e-4,
                                   err_msg=f"{label} disagrees with the dense forward")
    times: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            start = time.perf_counter()
            fn(x)
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(WIDTHS))
    parser.add_argument("--batches", default="1,256")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()

    rows = []
    for model in args.models.split(","):
        params, weight_masks = sparse_model(WIDTHS[model], args.sparsity)
        fns = variants(params, weight_masks)
        for batch in (int(b) for b in args.batches.split(",")):
            x = np.asarray(jax.random.normal(jax.random.key(batch), (batch, 784)), np.float32)
            results = time_rows(fns, x, args.warmup, args.repeats)
            for label, seconds in results.items():
                rows.append((model, batch, label, 1e3 * seconds, seconds / results["dense"]))

    print(f"jax {jax.__version__}, {jax.devices()[0].platform} ({os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}), sparsity {args.sparsity} on every "
          f"kernel but the classifier, median of {args.repeats} after {args.warmup} warmup calls")
    print()
    print("| model | batch | forward | ms / batch | x dense |")
    print("|---|---:|---|---:|---:|")
    for model, batch, label, ms, ratio in rows:
        print(f"| {model} | {batch} | {label} | {ms:.3f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
