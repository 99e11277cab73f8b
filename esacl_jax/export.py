"""A sparse model that is actually small: save a params pytree with only its active weights.

`save_sparse(path, params, masks)` writes one compressed numpy `.npz` file (format version 2: zip
DEFLATE, as `np.savez_compressed`). A sparse leaf (its mask is a full bool array, the
`esacl_jax.masks` convention; non-prunable leaves carry a scalar `True`) is stored as the values of
its active weights, byte-plane shuffled (all first bytes, then all second bytes, ...: the sign and
exponent bytes of float weights then deflate well), plus a packed bitmask (`np.packbits`, one bit
per weight); every other leaf is stored as it is. `save_dense` writes the same params dense in the
same format, uncompressed (`np.savez`) or compressed (`np.savez_compressed`): the fair sizes to
compare with. `load_sparse` rebuilds the tree, pruned entries exactly zero, without a template
(the tree structure and the key paths are in the file) or into the structure of `like=`; it also
reads version-1 files (uncompressed, values not shuffled).

The round trip is lossless, bit for bit, unless `values_dtype="bfloat16"` is asked for: a weight
outside the mask that is not all-zero bits (which `keep_sparse` and `apply_masks` never leave) is
stored as active too. Dtypes numpy cannot store natively (bfloat16, float8, int4: the `ml_dtypes`
types jax uses) are stored as their raw bits (an unsigned integer view) and restored from the
dtype name. `values_dtype="bfloat16"` (lossy) stores every float32 and float64 leaf rounded to
bfloat16 and restores it to its own dtype on load.

Writes are atomic (a temporary file in the same directory, renamed over the target): a failed or
interrupted write leaves the old file, or none, never a half-written one.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import uuid
import zipfile
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from esacl_jax import masks as masks_lib

PyTree = Any

FORMAT = "esacl_jax.sparse_npz"
VERSION = 2  # what save_sparse / save_dense write
READABLE_VERSIONS = (1, 2)  # what load_sparse reads
META_KEY = "__meta__"
LOSSY_VALUES_DTYPES = ("bfloat16",)  # values_dtype= choices besides None (lossless)


class SparseFileError(ValueError):
    """A file is not a readable esacl_jax sparse model file. The message is one line."""


# ----------------------------------------------------------------------------- dtypes, bits


def _stored(x: np.ndarray) -> np.ndarray:
    """The array as npz can store it: builtin numpy dtypes as they are, others as raw bits."""
    if x.dtype.kind in "biufc":
        return x
    if x.dtype.kind == "V" and x.dtype.names is None and x.dtype.itemsize in (1, 2, 4, 8):
        return x.view(np.dtype(f"u{x.dtype.itemsize}"))  # bfloat16, float8_*, int4, ...
    raise TypeError(f"cannot save a leaf of dtype {x.dtype}: numeric dtypes only")


def _restored_dtype(name: str) -> np.dtype:
    """The numpy dtype called `name` (ml_dtypes' names resolve once jax has imported them)."""
    try:
        return np.dtype(name)
    except TypeError as err:
        raise SparseFileError(f"unknown dtype {name!r}") from err


def _nonzero_bits(x: np.ndarray) -> np.ndarray:
    """Per entry: are any of its bits set? (-0.0 and NaN count as nonzero: the file is exact.)"""
    flat = np.ascontiguousarray(x).reshape(-1)
    return flat.view(np.uint8).reshape(flat.size, x.dtype.itemsize).any(axis=1)


def _compact_is_smaller(x: np.ndarray, active: np.ndarray) -> bool:
    """Values + packed bits take fewer bytes than the dense leaf."""
    itemsize = x.dtype.itemsize
    return int(active.sum()) * itemsize + math.ceil(x.size / 8) < x.size * itemsize


def _shuffled(values: np.ndarray) -> np.ndarray:
    """uint8 (itemsize, n): byte plane j holds byte j of every value (a byte-shuffle filter)."""
    flat = np.ascontiguousarray(values).reshape(-1)
    return np.ascontiguousarray(flat.view(np.uint8).reshape(flat.size, flat.dtype.itemsize).T)


def _unshuffled(planes: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The inverse of `_shuffled`: the 1-D array of `dtype` whose byte planes are `planes`."""
    return np.ascontiguousarray(planes.T).view(dtype).reshape(-1)


def _storage_dtype(x: np.ndarray, values_dtype: str | None) -> np.dtype:
    """The dtype a leaf is stored in: its own, or bfloat16 for a float32/64 leaf when asked."""
    if values_dtype is not None and x.dtype.kind == "f" and x.dtype.itemsize > 2:
        return _restored_dtype(values_dtype)
    return x.dtype


# ----------------------------------------------------------------------------- tree structure


class _Unsupported(Exception):
    pass


def _skeleton(node: Any, path: tuple, index: dict[str, int]) -> Any:
    """JSON description of the tree: dicts, lists, tuples and None, leaves by their position.

    Raises _Unsupported for any other container (the file then loads only with `like=`).
    """
    key = jax.tree_util.keystr(path)
    if key in index:
        return {"leaf": index[key]}
    if node is None:
        return None
    if isinstance(node, Mapping):
        items = []
        for k, child in node.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise _Unsupported(f"dict key {k!r}")
            items.append([k, _skeleton(child, (*path, jax.tree_util.DictKey(k)), index)])
        return {"dict": items}
    if type(node) in (list, tuple):
        children = [_skeleton(child, (*path, jax.tree_util.SequenceKey(i)), index)
                    for i, child in enumerate(node)]
        return {type(node).__name__: children}
    raise _Unsupported(type(node).__name__)


def _build(skeleton: Any, leaves: list[Any]) -> Any:
    if skeleton is None:
        return None
    if "leaf" in skeleton:
        return leaves[skeleton["leaf"]]
    if "dict" in skeleton:
        return {k: _build(child, leaves) for k, child in skeleton["dict"]}
    if "list" in skeleton:
        return [_build(child, leaves) for child in skeleton["list"]]
    if "tuple" in skeleton:
        return tuple(_build(child, leaves) for child in skeleton["tuple"])
    raise SparseFileError(f"bad tree structure entry {sorted(skeleton)}")


# ----------------------------------------------------------------------------- writing


def _write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], compressed: bool) -> int:
    """`np.savez_compressed` (or `np.savez`) to a temporary file beside `path`, fsync, rename
    over `path`; its size."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:  # a plain open: the file gets 0o666 & ~umask
            writer: Callable[..., None] = np.savez_compressed if compressed else np.savez
            writer(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # e.g. the parent is not a directory: there is no temporary file
        if isinstance(err, OSError):
            raise OSError(f"cannot write {path}: {err.strerror or err}") from err
        raise
    return path.stat().st_size


def _save(path: str | os.PathLike, params: PyTree, masks: PyTree | None, *, dense: bool,
          compressed: bool, values_dtype: str | None = None) -> int:
    if values_dtype is not None and values_dtype not in LOSSY_VALUES_DTYPES:
        raise ValueError(f"values_dtype must be None (lossless) or one of "
                         f"{', '.join(LOSSY_VALUES_DTYPES)}, not {values_dtype!r}")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if masks is not None:
        try:
            mask_leaves = treedef.flatten_up_to(masks)
        except (ValueError, TypeError) as err:
            raise ValueError("masks must have the tree structure of params (scalar True on "
                             "the leaves that are not sparse)") from err
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    try:
        structure = _skeleton(params, (), {p: i for i, p in enumerate(paths)})
    except _Unsupported:
        structure = None  # some container other than dict/list/tuple: load with like=
    arrays: dict[str, np.ndarray] = {}
    leaves_meta = []
    for i, (_, leaf) in enumerate(flat):
        x = np.asarray(leaf)
        entry = {"path": paths[i], "dtype": x.dtype.name, "shape": list(x.shape)}
        active = None
        if not dense and x.ndim > 0:
            if masks is None:
                if x.ndim >= 2:
                    nonzero = _nonzero_bits(x)
                    active = nonzero if _compact_is_smaller(x, nonzero) else None
            elif masks_lib.is_prunable_mask(mask_leaves[i]):
                mask = np.broadcast_to(np.asarray(mask_leaves[i], bool), x.shape).reshape(-1)
                active = mask | _nonzero_bits(x)  # lossless even if params break the mask
        storage_dtype = _storage_dtype(x, values_dtype)
        if storage_dtype != x.dtype:
            entry["stored_dtype"] = storage_dtype.name  # lossy: rounded to it
        stored = _stored(x.astype(storage_dtype, copy=False))
        if active is None:
            arrays[f"d{i}"] = stored
        else:
            arrays[f"v{i}"] = _shuffled(stored.reshape(-1)[active])
            arrays[f"m{i}"] = np.packbits(active)
            entry["sparse"] = True
        leaves_meta.append(entry)
    meta = {"format": FORMAT, "version": VERSION, "structure": structure, "leaves": leaves_meta}
    if values_dtype is not None:
        meta["lossy_values_dtype"] = values_dtype
    arrays[META_KEY] = np.frombuffer(json.dumps(meta, separators=(",", ":")).encode(), np.uint8)
    return _write_npz(path, arrays, compressed)


def save_sparse(path: str | os.PathLike, params: PyTree, masks: PyTree | None = None, *,
                values_dtype: str | None = None) -> int:
    """Writes `params` compactly to `path` (a compressed `.npz`, atomically).

    With `masks` (a tree like params; the `esacl_jax.masks` convention), a leaf whose mask is a
    full bool array is stored as its active values (byte-plane shuffled) plus a packed bitmask;
    leaves with a scalar mask are stored dense. Without masks, every leaf of ndim >= 2 whose
    compact form is smaller (enough exact zeros) is stored compactly. The file is written at
    exactly `path` (no ".npz" is appended).

    Args:
        path: the file to write.
        params: a pytree of arrays (dicts, lists, tuples, flax params).
        masks: None, or a tree like `params`: a bool array per sparse leaf, scalar True elsewhere.
        values_dtype: None (the default): lossless, every leaf in its own dtype. "bfloat16":
            LOSSY, every float32/float64 leaf rounded to bfloat16 in the file (about half the
            bytes) and cast back to its own dtype by `load_sparse`.

    Returns:
        The size of the file in bytes.

    Raises:
        OSError: "cannot write PATH: CAUSE" when the write fails (the old file, if any, stays).
        ValueError: an unknown `values_dtype`, or masks not shaped like params.
    """
    return _save(path, params, masks, dense=False, compressed=True, values_dtype=values_dtype)


def save_dense(path: str | os.PathLike, params: PyTree, *, compressed: bool = False) -> int:
    """Writes `params` dense in the format of `save_sparse`: the sizes to compare with.

    Args:
        path: the file to write.
        params: a pytree of arrays.
        compressed: False: an uncompressed zip (`np.savez` of the dense params). True: zip
            DEFLATE (`np.savez_compressed` of the dense params, the container `save_sparse`
            writes): pruned zeros then cost little, so this is the harder size to beat.

    Returns:
        The size of the file in bytes (`load_sparse` reads it back exactly).

    Raises:
        OSError: "cannot write PATH: CAUSE" when the write fails.
    """
    return _save(path, params, None, dense=True, compressed=compressed)


# ----------------------------------------------------------------------------- reading


def _read(path: pathlib.Path) -> tuple[dict, list[np.ndarray], list[np.ndarray]]:
    """(meta, leaves, active flags) from the file; raises KeyError/ValueError/... if broken."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(bytes(data[META_KEY]).decode("utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        version = meta.get("version")
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise ValueError(f"format version {version!r}, this reader reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}")
        leaves, actives = [], []
        for i, entry in enumerate(meta["leaves"]):
            dtype = _restored_dtype(entry["dtype"])
            stored_dtype = _restored_dtype(entry.get("stored_dtype", entry["dtype"]))
            shape = tuple(entry["shape"])
            size = math.prod(shape)
            storage = _stored(np.zeros((), stored_dtype)).dtype
            if entry.get("sparse"):
                values = data[f"v{i}"]
                if version >= 2:  # byte planes (itemsize, n)
                    if values.dtype != np.uint8 or values.ndim != 2 \
                            or values.shape[0] != storage.itemsize:
                        raise ValueError(f"leaf {entry['path']}: values stored as "
                                         f"{values.dtype}{list(values.shape)}, expected uint8 "
                                         f"byte planes [{storage.itemsize}, n]")
                    values = _unshuffled(values, storage)
                active = np.unpackbits(data[f"m{i}"], count=size).astype(bool)
                if values.dtype != storage or values.shape != (int(active.sum()),):
                    raise ValueError(f"leaf {entry['path']}: {values.shape[0]} {values.dtype} "
                                     f"values for {int(active.sum())} active {storage} entries")
                x = np.zeros(size, storage)
                x[active] = values
                x = x.reshape(shape)
            else:
                x = data[f"d{i}"]
                active = None
                if x.dtype != storage or x.shape != shape:
                    raise ValueError(f"leaf {entry['path']}: stored {x.dtype}{list(x.shape)}, "
                                     f"expected {storage}{list(shape)}")
            if storage != stored_dtype:
                x = x.view(stored_dtype)
            leaves.append(x.astype(dtype) if stored_dtype != dtype else x)
            actives.append(None if active is None else active.reshape(shape))
    return meta, leaves, actives


def load_sparse(path: str | os.PathLike, like: PyTree | None = None, *,
                with_masks: bool = False) -> PyTree | tuple[PyTree, PyTree]:
    """The params saved by `save_sparse` or `save_dense`, as numpy arrays (pruned entries 0).

    Reads format versions 1 and 2. Every leaf comes back in its own dtype (a leaf saved with
    `values_dtype="bfloat16"` too, its values rounded to bfloat16).

    Args:
        path: the file.
        like: None: the tree (dicts, lists, tuples) is rebuilt from the file. Else any pytree
            with the same leaves in the same order (e.g. the model's freshly initialised params
            or a flax FrozenDict): the leaves are unflattened into its structure; key paths and
            shapes must match.
        with_masks: also return the stored masks: a bool array per sparse leaf, scalar True
            elsewhere (the `esacl_jax.masks` convention).

    Returns:
        The params, or (params, masks) with `with_masks=True`.

    Raises:
        FileNotFoundError: a missing file.
        SparseFileError: (a ValueError; one line) a file that is not a complete sparse model
            file (truncated, corrupt, another format or version).
        ValueError: `like` does not match the file.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sparse model file at {path}")
    try:
        meta, leaves, actives = _read(path)
        masks = [np.ones((), bool) if a is None else a for a in actives]
        if like is None and (meta["structure"] is not None or not leaves):
            params, mask_tree = _build(meta["structure"], leaves), _build(meta["structure"], masks)
    except SparseFileError as err:
        raise SparseFileError(f"cannot load {path}: {err}") from err
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, KeyError, IndexError, ValueError,
            TypeError, AttributeError) as err:
        cause = " ".join(str(err).split()) or type(err).__name__
        raise SparseFileError(f"cannot load {path}: not a complete esacl_jax sparse model "
                              f"file ({type(err).__name__}: {cause})") from err
    if like is not None:
        flat, treedef = jax.tree_util.tree_flatten_with_path(like)
        if len(flat) != len(leaves):
            raise ValueError(f"like= has {len(flat)} leaves, {path} has {len(leaves)}")
        for (p, leaf), entry in zip(flat, meta["leaves"], strict=True):
            if jax.tree_util.keystr(p) != entry["path"]:
                raise ValueError(f"like= has leaf {jax.tree_util.keystr(p)} where {path} has "
                                 f"{entry['path']}")
            if hasattr(leaf, "shape") and tuple(leaf.shape) != tuple(entry["shape"]):
                raise ValueError(f"like= leaf {entry['path']} has shape {tuple(leaf.shape)}, "
                                 f"{path} has {tuple(entry['shape'])}")
        params, mask_tree = treedef.unflatten(leaves), treedef.unflatten(masks)
    elif meta["structure"] is None and leaves:
        raise ValueError(f"{path} holds a tree with containers other than dicts, lists and "
                         "tuples: load it with like= (a tree of the same structure)")
    return (params, mask_tree) if with_masks else params
