"""File sizes of `esacl_jax.export` on 90%-sparse MLPs, against the dense params' np.savez and
np.savez_compressed (docs/SPARSE_EXPORT.md's table).

MLPs with Gaussian weights (std 1/sqrt(fan-in), `sparse_inference.init_mlp`), every kernel
but the classifier's pruned to 90% by magnitude (`esacl_jax.masks.magnitude_masks`), the classifier
and the biases dense. Per model and dtype: `save_sparse` (lossless), `save_sparse(...,
values_dtype="bfloat16")` (lossy; float32 models only), `save_dense` and `save_dense(...,
compressed=True)`, in bytes, and the ratios. Prints a markdown table.

    python -m experiments.bench.export_sizes
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp

from esacl_jax import export, masks
from experiments.bench.sparse_inference import init_mlp

MODELS = {"784-100-100-10": (784, 100, 100, 10), "784-400-400-10": (784, 400, 400, 10),
          "784-1000-1000-10": (784, 1000, 1000, 10)}


def sizes(shape: tuple[int, ...], dtype, tmp: pathlib.Path) -> dict[str, int | None]:
    params = jax.tree.map(lambda x: x.astype(dtype), init_mlp(jax.random.key(0), shape))
    prunable = {name: {"kernel": name != "classifier", "bias": False} for name in params}
    weight_masks = masks.magnitude_masks(
        params, masks.layer_sparsities(params, 0.9, prunable=prunable), prunable)
    params = masks.apply_masks(params, weight_masks)
    out = {"sparse": export.save_sparse(tmp / "s.npz", params, weight_masks),
           "bf16": None,
           "dense": export.save_dense(tmp / "d.npz", params),
           "dense_compressed": export.save_dense(tmp / "dc.npz", params, compressed=True)}
    if dtype == jnp.float32:
        out["bf16"] = export.save_sparse(tmp / "b.npz", params, weight_masks,
                                         values_dtype="bfloat16")
    return out


def main() -> int:
    print("| MLP | dtype | sparse (lossless) | dense `np.savez` | dense `np.savez_compressed` "
          "| vs savez | vs savez_compressed | bfloat16 values (lossy) | vs savez_compressed |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in MODELS.items():
            for dtype in (jnp.float32, jnp.bfloat16) if name == "784-100-100-10" \
                    else (jnp.float32,):
                s = sizes(shape, dtype, pathlib.Path(tmp))
                bf16 = ("| |" if s["bf16"] is None else
                        f"| {s['bf16']:,} | {s['bf16'] / s['dense_compressed']:.3f} |")
                print(f"| {name} | {jnp.dtype(dtype).name} | {s['sparse']:,} | {s['dense']:,} | "
                      f"{s['dense_compressed']:,} | {s['sparse'] / s['dense']:.3f} | "
                      f"{s['sparse'] / s['dense_compressed']:.3f} {bf16}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
