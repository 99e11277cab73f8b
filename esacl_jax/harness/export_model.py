"""The trained sparse model as a compact file: `sparse_model.npz` beside results.json.

At the end of a run of a sparse method (`method.sparse_masks(state)` is not None), the primary
process saves the evaluated params (`method.eval_variables(state)[0]`, with the masks of those
params) with `esacl_jax.export.save_sparse` and records in results.json

    "sparse_export": {"file": "sparse_model.npz", "format_version": 2, "bytes": ...,
                      "dense_bytes": ..., "ratio": ...,
                      "dense_compressed_bytes": ..., "ratio_compressed": ...}

`dense_bytes` is the size of the same params written by `export.save_dense` (same format,
uncompressed: `np.savez` of the dense params) and `dense_compressed_bytes` by
`export.save_dense(..., compressed=True)` (`np.savez_compressed` of the dense params, where the
pruned zeros already cost little), both to temporary files that are deleted; `ratio` and
`ratio_compressed` are bytes / each. The file itself is lossless. Only the params are saved: a
model with batch normalisation also needs its batch_stats (results.json does not carry them).
Like every file the harness writes, the file is written atomically. A failed write does not fail
the run: its results matter more, so the error is recorded under "sparse_export" and printed.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
from typing import Any

from esacl_jax import export

FILE_NAME = "sparse_model.npz"


def export_sparse_model(workdir: str | os.PathLike, method: Any, state: Any) -> dict | None:
    """Writes `workdir/sparse_model.npz` for a sparse method; the `sparse_export` entry.

    None for a dense method (no file written).
    """
    weight_masks = method.sparse_masks(state)
    if weight_masks is None:
        return None
    params = method.eval_variables(state)[0]
    if isinstance(params, dict) and isinstance(weight_masks, dict):
        # The masks of the evaluated params only: a method may train modules it does not
        # evaluate with (CO2L's projection head).
        weight_masks = {k: weight_masks[k] for k in params}
    path = pathlib.Path(workdir) / FILE_NAME
    try:
        nbytes = export.save_sparse(path, params, weight_masks)
    except OSError as err:
        try:
            path.unlink(missing_ok=True)  # no stale file from an earlier run beside the results
        except OSError:
            pass
        return {"file": None, "error": _failed(err)}
    entry = {"file": FILE_NAME, "format_version": export.VERSION, "bytes": nbytes}
    try:
        with tempfile.TemporaryDirectory(prefix=".dense-size.", dir=path.parent) as tmp:
            dense_bytes = export.save_dense(pathlib.Path(tmp) / "dense.npz", params)
            dense_compressed = export.save_dense(pathlib.Path(tmp) / "dense_compressed.npz",
                                                 params, compressed=True)
    except OSError as err:
        return {**entry, "error": _failed(err)}
    return {**entry, "dense_bytes": dense_bytes, "ratio": nbytes / dense_bytes,
            "dense_compressed_bytes": dense_compressed,
            "ratio_compressed": nbytes / dense_compressed}


def _failed(err: OSError) -> str:
    message = " ".join(str(err).split())
    print(f"warning: sparse model export: {message}", file=sys.stderr, flush=True)
    return message
