"""Sparse masks as pure functions of pytrees: which weights are prunable, how sparse each layer
is, the initial magnitude masks, the SDP scores, and the prune-and-regrow mask update.

Conventions (shared with `sdp.py` and `sharpness.py`):
- A mask tree has the structure of the params. Prunable leaves get a boolean array of the leaf's
  shape; non-prunable leaves get a scalar `True` (broadcastable, never `None`). Hence "is this leaf
  prunable" can always be read off the mask tree: `mask.ndim > 0`.
- Counts are exact: a layer of `size` weights at sparsity `s` has exactly `round(s * size)` pruned
  weights (round half to even), and prune-and-regrow keeps the active count unchanged.
- Everything works under `jit` and with traced hyper-parameters (sparsity, fraction) so the
  functions compose with `optax.inject_hyperparams`. Selections use `lax.top_k` when the count is
  static (fast: a mask update touches ~1% of a layer) and a rank from one stable argsort when it
  is traced; both give the same masks (ties go to the lower index).
- Explicitly sharded leaves (sharding in types) are gathered for the per-layer ranking and the
  results get the leaf's sharding back.
- Which leaves are prunable (`resolve_prunable`), one vocabulary for the library and the
  harness (`PRUNABLE_SETS`, distinct names for distinct sets):
  `"all_but_output"` (default, also None): every kernel but the logits layer, found from shapes
  and order (`structural_prunable`); `"all_but_input_and_output"`: the first layer (input layer
  or embedding) dense as well (`structural_prunable(params, dense_first=True)`);
  `"by_layer_name"`: by layer names (`name_prunable`: SparCL's set, on the ResNet-18 its 16
  block convolutions, so also the 1x1 shortcuts dense); or a filter / bool tree. The old
  spellings ("structural", "sparcl", "name") still resolve, with a DeprecationWarning
  (`OLD_PRUNABLE_NAMES`).
"""

from __future__ import annotations

import functools
import logging
import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from esacl_jax import _deprecation
from esacl_jax._defaults import ESACL_DEFAULTS

PyTree = Any
KeyPath = tuple[Any, ...]
PrunableFn = Callable[[KeyPath, Any], bool]

EXCLUDED_NAME_PARTS = ("stem", "classifier", "shortcut", "head", "embed")
SCORE_KINDS = ("magnitude_gradient", "taylor")
REGROW_KINDS = ("gradient", "random")
DISTRIBUTIONS = ("uniform", "erk")


# ----------------------------------------------------------------------------- paths, filters


def _key_name(key: Any) -> str:
    """The name of one path entry, whatever its kind (dict key, attribute, sequence index)."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return str(key.name)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def is_prunable_mask(mask: Any) -> bool:
    """The one "is this leaf prunable?" rule of a mask tree (module docstring, conventions).

    Args:
      mask: one leaf of a mask tree.

    Returns:
      True for a bool array (a prunable leaf), False for the scalar placeholder.
    """
    return jnp.ndim(mask) > 0


def path_names(path: KeyPath) -> tuple[str, ...]:
    """Names of the entries of a key path, e.g. `("params", "Dense_0", "kernel")`.

    A trailing `.value` attribute (how a `flax.nnx.Variable` appears in a key path) is dropped, so
    an nnx `State` of `Param`s and its pure-array version give the same names.

    Args:
      path: a key path (`jax.tree_util.tree_flatten_with_path`).

    Returns:
      The names of its entries, a tuple of strings.
    """
    names = [_key_name(k) for k in path]
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names = names[:-1]
    return tuple(names)


def path_string(path: KeyPath) -> str:
    """`"/".join(path_names(path))`: the layer name used in summaries.

    Args:
      path: a key path.

    Returns:
      The names joined by "/".
    """
    return "/".join(path_names(path))


def name_prunable(path: KeyPath, leaf: Any) -> bool:
    """True for conv/dense kernels (ndim >= 2, last name "kernel") outside the excluded layers.

    Excluded: any path component whose name contains "stem", "classifier", "shortcut", "head" or
    "embed" (first layer, classifier, ResNet 1x1 projections, heads, embeddings). For the CIFAR
    ResNet-18 this leaves exactly the 16 3x3 convolutions of the residual blocks.

    Args:
      path: the leaf's key path.
      leaf: the leaf (an array or a shape struct).

    Returns:
      Whether the leaf is in the name-based set (`prunable="by_layer_name"`).
    """
    names = path_names(path)
    if not names or names[-1] != "kernel" or len(np.shape(leaf)) < 2:
        return False
    lowered = [n.lower() for n in names]
    return not any(part in name for name in lowered for part in EXCLUDED_NAME_PARTS)


def _natural_key(path: KeyPath) -> tuple:
    """Sort key of a path with numbers compared as numbers ("Dense_2" before "Dense_10")."""
    return tuple(
        tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))
        for name in path_names(path)
    )


def _dtype(x: Any) -> Any:
    dtype = getattr(x, "dtype", None)
    return np.result_type(x) if dtype is None else dtype


def _in_dims(shape: tuple[int, ...]) -> set[int]:
    """The dimensions a kernel may read its input from: (in, out) dense -> in; conv kernels
    (..., in, out) -> in; 3-D kernels (DenseGeneral's (in, heads, head_dim) or (heads, head_dim,
    out), Conv1D's (width, in, out)) -> the first two."""
    if len(shape) == 2:
        return {shape[0]}
    if len(shape) == 3:
        return {shape[0], shape[1]}
    return {shape[-2]}


def structural_prunable(params: PyTree, *, dense_first: bool = False) -> PyTree:
    """The default prunable set ("all_but_output"), from shapes and order only (no names).

    Candidates are the floating leaves with ndim >= 2 (dense, conv, attention and embedding
    kernels; biases, norms and scalars never). Every candidate is prunable except:
    - the output (logits) layers: the candidates whose output dimension (last axis) feeds no
      other candidate (it is none of their input dimensions, nor, for a conv kernel, a divisor
      of a dense kernel's input: a flatten); a multi-head model (task-IL heads on a trunk) so
      keeps every head dense;
    - with `dense_first=True` (`prunable="all_but_input_and_output"`), also the input layer
      or embedding: among the candidates whose input dimensions are produced by no other
      candidate (none is another's last axis), the first in natural path order.
    When no candidate qualifies for a role, the last (first) candidate in natural path order
    (numbers in names compared as numbers) is used. A single candidate is the logits layer, so
    nothing is prunable. Check the result with `sparsity_summary(masks, params=params)` or
    `prunable_tree(params)`, and pass a filter or bool tree (`prunable=`) when it is not what
    you want (e.g. `name_prunable`, the name-based set).

    Args:
      params: the params (arrays or shape structs).
      dense_first: keep the input layer dense too (`prunable="all_but_input_and_output"`).

    Returns:
      A tree of Python bools like `params`.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    cands = [
        i
        for i, (_, x) in enumerate(flat)
        if len(np.shape(x)) >= 2 and jnp.issubdtype(_dtype(x), jnp.floating)
    ]
    cands.sort(key=lambda i: _natural_key(flat[i][0]))
    shapes = {i: tuple(np.shape(flat[i][1])) for i in cands}
    flags = [False] * len(flat)
    if len(cands) >= 2:
        def feeds(i: int, j: int) -> bool:
            """Kernel i's output can be kernel j's input: the same dimension, or a conv's
            channels flattened into a dense kernel's input (in = positions x channels)."""
            out = shapes[i][-1]
            if out in _in_dims(shapes[j]):
                return True
            return (len(shapes[i]) >= 4 and len(shapes[j]) == 2 and shapes[j][0] > out
                    and shapes[j][0] % out == 0)

        last = [i for i in cands if not any(feeds(i, j) for j in cands if j != i)]
        first = [i for i in cands if not any(feeds(j, i) for j in cands if j != i)]
        heads = set(last) if 0 < len(last) < len(cands) else {cands[-1]}
        rest = [i for i in cands if i not in heads]
        first = [i for i in first if i not in heads]
        embed = (first[0] if first and rest else (rest[0] if rest else None)) if dense_first \
            else None
        for i in rest:
            flags[i] = i != embed
    return treedef.unflatten(flags)


# The prunable sets by name (`prunable="..."`), shared by the library and the harness
# (`config.prunable`): every kernel but the output layers; the input layer dense as well; SparCL's
# set by layer names (on the ResNet-18 the last two differ: the 1x1 shortcuts).
PRUNABLE_SETS = ("all_but_output", "all_but_input_and_output", "by_layer_name")
# Old spellings, resolved with a DeprecationWarning: the library's three and the harness's
# `prune_scope` values ("sparcl" meant different sets in the two, so neither keeps the name).
OLD_PRUNABLE_NAMES = {"structural": "all_but_output", "sparcl": "all_but_input_and_output",
                      "name": "by_layer_name"}


def prunable_set_name(prunable: str) -> str:
    """The `PRUNABLE_SETS` name of a set's name, old spellings included (with a warning).

    Args:
      prunable: a name of `PRUNABLE_SETS` or of `OLD_PRUNABLE_NAMES`.

    Returns:
      The name in `PRUNABLE_SETS`.

    Raises:
      ValueError: an unknown name (one line listing the known ones).
    """
    if prunable in PRUNABLE_SETS:
        return prunable
    if prunable in OLD_PRUNABLE_NAMES:
        new = OLD_PRUNABLE_NAMES[prunable]
        _deprecation.warn(f'prunable="{prunable}"', f'write prunable="{new}" (the same set)')
        return new
    raise ValueError(f"prunable must be one of {PRUNABLE_SETS}, a filter or a bool tree: "
                     f"{prunable!r}")


def resolve_prunable(prunable: Any, params: PyTree) -> PyTree:
    """The bool tree of a `prunable=` argument.

    Args:
      prunable: None or "all_but_output" (default: every kernel but the logits layer,
        `structural_prunable`); "all_but_input_and_output" (the first layer dense as well,
        `structural_prunable(params, dense_first=True)`); "by_layer_name" (`name_prunable`);
        a `(path, leaf) -> bool` filter; or a bool tree (returned as it is).
      params: the params the set is of.

    Returns:
      A tree of Python bools like `params` (or `prunable` itself when it is a bool tree).
    """
    if isinstance(prunable, str):
        prunable = prunable_set_name(prunable)
    if prunable is None or prunable == "all_but_output":
        return structural_prunable(params)
    if prunable == "all_but_input_and_output":
        return structural_prunable(params, dense_first=True)
    if prunable == "by_layer_name":
        prunable = name_prunable
    _, flags, treedef = _flat_with_prunable(params, prunable)
    return treedef.unflatten(flags)


def _flat_with_prunable(
    params: PyTree, prunable: PrunableFn | PyTree
) -> tuple[list[tuple[KeyPath, Any]], list[bool], Any]:
    """Flattened (path, leaf) pairs, their prunable flags and the treedef.

    `prunable` is a filter `(path, leaf) -> bool`, an already computed tree of bools, or None /
    a set's name (`resolve_prunable`). Scalar leaves are never prunable (their mask would be
    indistinguishable from the placeholder).
    """
    if prunable is None or isinstance(prunable, str):
        prunable = resolve_prunable(prunable, params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if callable(prunable):
        flags = [bool(prunable(p, x)) for p, x in flat]
    else:
        flags = [bool(f) for f in treedef.flatten_up_to(prunable)]
    flags = [f and len(np.shape(x)) > 0 for f, (_, x) in zip(flags, flat, strict=True)]
    return flat, flags, treedef


def prunable_tree(params: PyTree, prunable: PrunableFn | PyTree | str | None = None) -> PyTree:
    """A tree of Python bools (static) saying which leaves of `params` are pruned (`prunable=`
    as in `resolve_prunable`; default: every kernel but the logits layer).

    Args:
      params: the params.
      prunable: a `prunable=` argument (`resolve_prunable`'s forms).

    Returns:
      A tree of Python bools like `params`.
    """
    _, flags, treedef = _flat_with_prunable(params, prunable)
    return treedef.unflatten(flags)


def _mask_flags(masks: PyTree, prunable: PrunableFn | PyTree | None) -> tuple[list, list, Any]:
    """Flattened masks and prunable flags; with `prunable=None` a leaf is prunable iff its mask
    is not the scalar placeholder (the convention of `magnitude_masks`)."""
    leaves, treedef = jax.tree.flatten(masks)
    flags = [is_prunable_mask(m) for m in leaves]
    if prunable is not None:
        _, extra, _ = _flat_with_prunable(masks, prunable)
        flags = [a and b for a, b in zip(flags, extra, strict=True)]
    return leaves, flags, treedef


# ----------------------------------------------------------------------------- sparsity levels


def concrete(x: Any, cast: Callable[[Any], Any] = float) -> Any:
    """`cast(x)` when `x` is a concrete number, None when it is traced (a static value lets
    the functions here choose `lax.top_k` and skip work at trace time).

    Args:
      x: a number or an array.
      cast: `float` or `int`.

    Returns:
      The Python number, or None when `x` is traced.
    """
    try:
        return cast(x)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


_concrete_int = functools.partial(concrete, cast=int)


def _erk_sparsities(shapes: list[tuple[int, ...]], sparsity: Any, xp: Any) -> list[Any]:
    """ERK (RigL, Evci et al. 2020) per-layer sparsities hitting the global target `sparsity`.

    Density of layer l is eps * (sum of dims)/(prod of dims); eps is set so the total number of
    active weights is (1 - sparsity) * total. Layers whose density would exceed 1 are made dense
    and eps is recomputed for the rest (at most one round per layer, so a fixed-length loop works
    with a traced `sparsity` too). `xp` is numpy (static) or jax.numpy (traced).
    """
    sizes = np.array([math.prod(s) for s in shapes], dtype=np.float64)
    raw = np.array([sum(s) / math.prod(s) for s in shapes], dtype=np.float64)
    target_active = (1.0 - sparsity) * sizes.sum()
    dense = xp.zeros(len(shapes), dtype=bool)

    def eps_of(dense: Any) -> Any:
        rhs = target_active - xp.sum(xp.where(dense, sizes, 0.0))
        divisor = xp.sum(xp.where(dense, 0.0, raw * sizes))
        return xp.where(divisor > 0, rhs / xp.where(divisor > 0, divisor, 1.0), 0.0)

    for _ in range(len(shapes)):
        eps = eps_of(dense)
        max_raw = xp.max(xp.where(dense, -np.inf, raw))
        dense = dense | ((~dense) & (raw == max_raw) & (max_raw * eps > 1.0))
    eps = eps_of(dense)
    density = xp.where(dense, 1.0, xp.clip(eps * raw, 0.0, 1.0))
    return [1.0 - density[i] for i in range(len(shapes))]


def layer_sparsities(
    params: PyTree,
    sparsity: Any,
    distribution: str = "uniform",
    prunable: PrunableFn | PyTree | str | None = None,
) -> PyTree:
    """Per-leaf target sparsity: a tree of Python floats (0.0 for non-prunable leaves).

    `distribution="uniform"` gives every prunable layer `sparsity`; `"erk"` distributes the same
    global number of pruned weights by Erdos-Renyi-Kernel. A traced `sparsity` (abstract init,
    `inject_hyperparams` under `jit`) gives traced scalars instead of Python floats.

    Args:
      params: the params (arrays or shape structs).
      sparsity: the target sparsity (per layer for "uniform", global for "erk").
      distribution: "uniform" or "erk".
      prunable: a `prunable=` argument (`resolve_prunable`'s forms).

    Returns:
      A tree like `params` of per-leaf sparsities.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    flat, flags, treedef = _flat_with_prunable(params, prunable)
    static = concrete(sparsity)
    shapes = [tuple(np.shape(x)) for (_, x), f in zip(flat, flags, strict=True) if f]
    if distribution == "uniform" or not shapes:
        values = [static if static is not None else sparsity] * len(shapes)
    elif static is not None:
        values = [float(v) for v in _erk_sparsities(shapes, static, np)]
    else:
        values = _erk_sparsities(shapes, jnp.asarray(sparsity, jnp.float32), jnp)
    it = iter(values)
    return treedef.unflatten([next(it) if f else 0.0 for f in flags])


# ----------------------------------------------------------------------------- masks


def _explicit_sharding(x: jax.Array) -> Any:
    """The array's sharding type when it is sharded over explicit mesh axes, else None."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or all(axis is None for axis in spec):
        return None
    return sharding


def _flatten(x: jax.Array) -> jax.Array:
    """x as a 1-D array; an explicitly sharded x is gathered (replicated) first, because an exact
    per-layer ranking needs the whole layer."""
    x = jnp.asarray(x)
    sharding = _explicit_sharding(x)
    if sharding is None:
        return jnp.reshape(x, (-1,))
    return jax.lax.reshape(x, (x.size,), out_sharding=sharding.update(spec=PartitionSpec()))


def _unflatten(flat: jax.Array, like: jax.Array) -> jax.Array:
    """Inverse of `_flatten`: the shape and (explicit) sharding of `like`."""
    sharding = _explicit_sharding(jnp.asarray(like))
    if sharding is None:
        return jnp.reshape(flat, jnp.shape(like))
    return jax.lax.reshape(flat, jnp.shape(like), out_sharding=sharding)


def _top_k_mask(flat: jax.Array, k: int, take: Any = None) -> jax.Array:
    """Mask of the first `take` (default all k) of `lax.top_k(flat, k)` (static k; ties go to
    the lower index). Cheaper than a full sort when k is small (the 1% of a mask update)."""
    if k == 0:
        return jnp.zeros(flat.shape, bool)
    _, idx = jax.lax.top_k(flat, k)
    chosen = True if take is None else jnp.arange(k) < take
    return jnp.zeros(flat.shape, bool).at[idx].set(chosen)


def _top_mask_flat(flat: jax.Array, num_keep: Any) -> jax.Array:
    """`top_mask` on a 1-D array: `lax.top_k` for a static count, a rank otherwise."""
    flat = jnp.where(jnp.isnan(flat), -jnp.inf, flat)
    static = _concrete_int(num_keep)
    if static is not None:
        return _top_k_mask(flat, min(max(static, 0), flat.size))
    order = jnp.argsort(flat, descending=True, stable=True)
    rank = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return rank < jnp.clip(jnp.asarray(num_keep, jnp.int32), 0, flat.size)


def top_mask(scores: jax.Array, num_keep: Any) -> jax.Array:
    """Boolean mask (shape of `scores`) with exactly `num_keep` True at the highest scores.

    Ties are broken by flat index (lower index kept first); NaN scores rank lowest. `num_keep` may
    be a traced integer: the selection is then `rank < num_keep` with the rank from one stable
    argsort (and a scatter), so no static k is needed; a concrete `num_keep` uses `lax.top_k`
    (same result, faster). `num_keep` is clipped to [0, scores.size].

    Args:
      scores: an array of scores.
      num_keep: how many to keep (a Python int or a traced integer).

    Returns:
      A bool array of the shape of `scores`.
    """
    return _unflatten(_top_mask_flat(_flatten(scores), num_keep), scores)


def _num_pruned(sparsity: Any, size: int) -> Any:
    """round(sparsity * size): a Python int when static, an int32 scalar when traced."""
    static = concrete(sparsity)
    if static is not None:
        return int(round(static * size))
    return jnp.round(jnp.asarray(sparsity, jnp.float32) * size).astype(jnp.int32)


def magnitude_masks(
    params: PyTree, sparsities: PyTree, prunable: PrunableFn | PyTree | str | None = None
) -> PyTree:
    """Initial masks: per prunable leaf keep the `size - round(s * size)` largest |w|.

    Non-prunable leaves get a scalar `True`. `sparsities` is a tree like params (e.g. from
    `layer_sparsities`); its entries may be traced.

    Args:
      params: the params.
      sparsities: a tree like `params` of per-leaf sparsities.
      prunable: a `prunable=` argument (`resolve_prunable`'s forms).

    Returns:
      The mask tree (bool arrays on prunable leaves, scalar True elsewhere).
    """
    flat, flags, treedef = _flat_with_prunable(params, prunable)
    sparse_leaves = treedef.flatten_up_to(sparsities)
    out = []
    for (_, w), flag, s in zip(flat, flags, sparse_leaves, strict=True):
        if not flag:
            out.append(jnp.ones((), bool))
            continue
        size = math.prod(np.shape(w))
        magnitude = jnp.abs(jnp.asarray(w, jnp.float32))
        out.append(top_mask(magnitude, size - _num_pruned(s, size)))
    return treedef.unflatten(out)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Zero the pruned weights: `where(mask, w, 0)`, dtype preserved (exact zeros, even for NaN).

    Args:
      params: the params.
      masks: a mask tree like `params`.

    Returns:
      The params with every pruned weight exactly 0.
    """
    return jax.tree.map(lambda w, m: jnp.where(m, w, jnp.zeros((), w.dtype)), params, masks)


def masked_start(params: PyTree, masks: PyTree, *,
                 rescale: bool = ESACL_DEFAULTS["init_rescale"]) -> PyTree:
    """Masked initial params; with `rescale`, each unit keeps its dense incoming norm.

    `esacl_jax.sparse_start(params, opt_state)` calls it with the transform's masks: the one
    way to start sparse.

    Pruning 90% of a layer at init shrinks every output unit's incoming weight norm (magnitude
    pruning of a Gaussian init keeps ~44% of the squared norm at s = 0.9), so activations and
    gradients shrink layer after layer. Rescaling the kept weights of each output unit (last
    axis of a kernel; the sum runs over all other axes) to the unit's dense norm restores the
    dense network's signal scale, the sparsity-aware initialisation argument of Evci et al.
    (AAAI 2022) adapted to magnitude masks. Non-prunable leaves (scalar masks) are untouched; a
    unit with no kept weight stays zero. Dtypes are preserved.

    Args:
      params: the dense initial params.
      masks: their mask tree.
      rescale: rescale each unit's kept weights to its dense incoming norm.

    Returns:
      The sparse initial params.
    """

    def one(w: jax.Array, m: jax.Array) -> jax.Array:
        kept = jnp.where(m, w, jnp.zeros((), w.dtype))
        if not rescale or not is_prunable_mask(m) or jnp.ndim(w) < 2:
            return kept
        axes = tuple(range(jnp.ndim(w) - 1))
        w32, kept32 = jnp.asarray(w, jnp.float32), jnp.asarray(kept, jnp.float32)
        dense_norm = jnp.sum(jnp.square(w32), axis=axes, keepdims=True)
        kept_norm = jnp.sum(jnp.square(kept32), axis=axes, keepdims=True)
        scale = jnp.where(kept_norm > 0, jnp.sqrt(dense_norm / jnp.where(kept_norm > 0,
                                                                        kept_norm, 1.0)), 0.0)
        return (kept32 * scale).astype(w.dtype)

    return jax.tree.map(one, params, masks)


def sparse_init(params: PyTree, masks: PyTree, *,
                rescale: bool = ESACL_DEFAULTS["init_rescale"]) -> PyTree:
    """Deprecated: `esacl_jax.sparse_start(params, opt_state)` (or `masks.masked_start`).

    Args:
      params: the dense initial params.
      masks: their mask tree.
      rescale: as `masked_start`'s.

    Returns:
      `masked_start(params, masks, rescale=rescale)`.
    """
    warnings.warn("esacl_jax.sparse_init is deprecated: start sparse with "
                  "esacl_jax.sparse_start(params, opt_state) (or masks.masked_start(params, "
                  "masks))", DeprecationWarning, stacklevel=2)
    return masked_start(params, masks, rescale=rescale)


# ----------------------------------------------------------------------------- scores, updates


def sdp_scores(
    params: PyTree,
    grad_ema: PyTree,
    *,
    kind: str = "magnitude_gradient",
    score_lambda: Any = ESACL_DEFAULTS["score_lambda"],
    curvature: PyTree | None = None,
    normalize: bool = True,
) -> PyTree:
    """Importance of each weight for SDP pruning (higher = keep), in float32.

    - `"magnitude_gradient"`: |w| + lambda * |G| * c, G the EMA of the sharpness-aware gradient.
    - `"taylor"`: |w * G| * c' + 0.5 * h * w**2 * c'**2 (first- plus second-order loss change of
      zeroing w, h a diagonal curvature estimate such as an EMA of squared gradients); needs
      `curvature`.
    With `normalize` (default) the scores do not depend on the loss's scale (its reduction, the
    batch size, a loss weight): per layer, c = mean|w| / mean|G| (G brought to the layer's weight
    scale, so lambda weighs two terms of the same size) and c' = 1 / mean|G| (the Taylor estimate
    for the loss rescaled so that mean|G| = 1); a layer with G == 0 gets c = c' = 0. Without it,
    c = c' = 1 (the raw formulas, which change with the loss's scale).
    Leaves whose `grad_ema` is a scalar placeholder get the placeholder shape back (not scored).

    Args:
      params: the params.
      grad_ema: G, a tree like params (scalar placeholders on non-prunable leaves).
      kind: "magnitude_gradient" or "taylor".
      score_lambda: lambda of the magnitude_gradient score.
      curvature: h, needed by "taylor".
      normalize: make the scores independent of the loss's scale.

    Returns:
      A float32 tree of scores like `params`.
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"score must be one of {SCORE_KINDS}, got {kind!r}")

    def inverse_mean(x: jax.Array) -> jax.Array:
        m = jnp.mean(x)
        return jnp.where(m > 0, 1.0 / jnp.where(m > 0, m, 1.0), 0.0)

    def one(w: jax.Array, g: jax.Array, h: jax.Array | None) -> jax.Array:
        w = jnp.asarray(w, jnp.float32)
        g = jnp.asarray(g, jnp.float32)
        if jnp.ndim(g) == 0 and jnp.ndim(w) > 0:  # non-prunable placeholder
            return jnp.zeros((), jnp.float32)
        abs_g = jnp.abs(g)
        c = inverse_mean(abs_g) if normalize else jnp.ones((), jnp.float32)
        if kind == "magnitude_gradient":
            scale = c * jnp.mean(jnp.abs(w)) if normalize else c
            return jnp.abs(w) + score_lambda * abs_g * scale
        h = jnp.asarray(h, jnp.float32)
        return jnp.abs(w * g) * c + 0.5 * h * jnp.square(w) * jnp.square(c)

    if kind == "taylor":
        if curvature is None:
            raise ValueError('score="taylor" needs a curvature tree (e.g. an EMA of g**2)')
        return jax.tree.map(one, params, grad_ema, curvature)
    return jax.tree.map(lambda w, g: one(w, g, None), params, grad_ema)


def _finite(x: jax.Array) -> jax.Array:
    """Map NaN/-inf to the lowest finite value, +inf to the highest and -0.0 to 0.0, so that the
    -inf used to exclude coordinates from a selection always ranks strictly last (exact counts)
    and both selection paths (top_k and rank) order equal values identically."""
    big = float(jnp.finfo(jnp.float32).max)
    x = jnp.nan_to_num(x, nan=-big, posinf=big, neginf=-big)
    return jnp.where(x == 0, 0.0, x)


def prune_and_regrow(
    masks: PyTree,
    scores: PyTree,
    regrow_scores: PyTree,
    *,
    fraction: Any = ESACL_DEFAULTS["prune_fraction"],
    key: jax.Array,
    regrow: str = "gradient",
    prunable: PrunableFn | PyTree | None = None,
) -> tuple[PyTree, PyTree]:
    """One SDP mask update at constant sparsity. Returns `(new_masks, regrown)`.

    Per prunable layer with `size` weights: n = round(fraction * size), capped by the active and
    the inactive counts. The n ACTIVE weights with the lowest `scores` are pruned, and n weights
    that were INACTIVE before this update (so never the ones just pruned) are regrown: those with
    the largest `regrow_scores` (`regrow="gradient"`, e.g. |G| of the dense sharpness-aware
    gradient) or uniformly at random (`"random"`, using `key`). The active count is unchanged.
    `regrown` is a bool tree (scalar False on non-prunable leaves) marking the regrown weights.
    `prunable=None` treats every leaf with a non-scalar mask as prunable.

    Args:
      masks: the current mask tree.
      scores: pruning scores (higher = keep), a tree like the masks.
      regrow_scores: regrowth scores (e.g. G), a tree like the masks.
      fraction: fraction of each layer pruned and regrown.
      key: PRNG key for `regrow="random"`.
      regrow: "gradient" or "random".
      prunable: restrict the update to this set (None: every array mask).

    Returns:
      `(new_masks, regrown)`.
    """
    if regrow not in REGROW_KINDS:
        raise ValueError(f"regrow must be one of {REGROW_KINDS}, got {regrow!r}")
    leaves, flags, treedef = _mask_flags(masks, prunable)
    score_leaves = treedef.flatten_up_to(scores)
    regrow_leaves = treedef.flatten_up_to(regrow_scores)
    keys = jax.random.split(key, len(leaves))
    static_fraction = concrete(fraction)
    if static_fraction is not None and not 0.0 <= static_fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {static_fraction}")
    new_masks, regrown = [], []
    for i, (m, flag, s, r) in enumerate(
        zip(leaves, flags, score_leaves, regrow_leaves, strict=True)
    ):
        if not flag:
            new_masks.append(m)
            regrown.append(jnp.zeros((), bool))
            continue
        like = jnp.asarray(m, bool)
        m = _flatten(like)
        size = m.size
        active = jnp.sum(m, dtype=jnp.int32)
        k = None if static_fraction is None else int(round(static_fraction * size))
        if k is None:
            n = jnp.round(jnp.asarray(fraction, jnp.float32) * size).astype(jnp.int32)
        else:
            n = jnp.asarray(k, jnp.int32)
        n = jnp.minimum(n, jnp.minimum(active, size - active))
        s = _finite(_flatten(jnp.asarray(s, jnp.float32)))
        if regrow == "random":
            r = jax.random.uniform(keys[i], m.shape, jnp.float32)
        else:
            r = _finite(jnp.abs(_flatten(jnp.asarray(r, jnp.float32))))
        if k is not None:
            # Static k = round(fraction * size) >= n: two partial top-k instead of two sorts. The
            # pruned are the first n of the k lowest active scores; the reversal makes equal
            # scores prune the higher index first, exactly as the rank path below.
            lowest = _top_k_mask(jnp.where(m, -s, -jnp.inf)[::-1], k, n)[::-1]
            kept = m & ~lowest
            grown = _top_k_mask(jnp.where(m, -jnp.inf, r), k, n)
        else:
            kept = _top_mask_flat(jnp.where(m, s, -jnp.inf), active - n)
            grown = _top_mask_flat(jnp.where(m, -jnp.inf, r), n)
        new_masks.append(_unflatten(kept | grown, like))
        regrown.append(_unflatten(grown, like))
    return treedef.unflatten(new_masks), treedef.unflatten(regrown)


# ----------------------------------------------------------------------------- summaries


class _SparsitySummary(dict):
    """`sparsity_summary`'s dict; its deprecated key "global_sparsity" reads "prunable_sparsity"
    (the name said "global" but it never counted the weights outside the prunable set)."""

    _OLD = {"global_sparsity": "prunable_sparsity"}

    def __getitem__(self, key: Any) -> Any:
        if key in self._OLD and not dict.__contains__(self, key):
            warnings.warn(f'sparsity_summary(...)["{key}"] is deprecated: it is the prunable '
                          f'set\'s sparsity, now "{self._OLD[key]}"; over all weights it is '
                          '"sparsity_all_weights" (pass params=)', DeprecationWarning,
                          stacklevel=2)
            key = self._OLD[key]
        return dict.__getitem__(self, key)

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self or key in self._OLD else default


def sparsity_summary(masks: PyTree, prunable: PrunableFn | PyTree | None = None, *,
                     params: PyTree | None = None) -> dict[str, Any]:
    """Host-side summary of a mask tree (call outside `jit`).

    Args:
      masks: a mask tree (bool arrays on prunable leaves, scalar True elsewhere).
      prunable: restrict the count to this set (`resolve_prunable`'s forms); None: every leaf
        with an array mask.
      params: the tree the masks belong to (non-prunable leaves carry scalar masks, so their
        sizes come from it); needed for the sparsity over all weights.

    Returns:
      `{"prunable_sparsity", "num_active", "num_prunable", "layers": {name: {"sparsity",
      "active", "size"}}}` over the prunable leaves (names are `"/".join(path_names(path))`):
      `prunable_sparsity` is the sparsity of the PRUNABLE SET only. With `params` also the
      sparsity over all weights: `"num_weights"` (every entry of every leaf, biases and norms
      included), `"num_pruned"`, `"sparsity_all_weights"` (what "sparse" means for a network)
      and `"prunable_fraction"` (the prunable set's share of all weights). The old key
      `"global_sparsity"` (= `prunable_sparsity`) still reads, with a DeprecationWarning.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(masks)
    _, flags, _ = _mask_flags(masks, prunable)
    layers: dict[str, dict[str, Any]] = {}
    total_active = total_size = 0
    for (path, m), flag in zip(flat, flags, strict=True):
        if not flag:
            continue
        arr = np.asarray(jax.device_get(m))
        active, size = int(arr.sum()), int(arr.size)
        layers[path_string(path)] = {
            "sparsity": 1.0 - active / size,
            "active": active,
            "size": size,
        }
        total_active += active
        total_size += size
    summary = _SparsitySummary({
        "prunable_sparsity": 1.0 - total_active / total_size if total_size else 0.0,
        "num_active": total_active,
        "num_prunable": total_size,
        "layers": layers,
    })
    if params is not None:
        num_weights = sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params))
        pruned = total_size - total_active
        summary.update(num_weights=num_weights, num_pruned=pruned,
                       sparsity_all_weights=pruned / num_weights if num_weights else 0.0,
                       prunable_fraction=total_size / num_weights if num_weights else 0.0)
    return summary


def warn_if_mostly_dense(params: PyTree, flags: PyTree, sparsity: Any) -> bool:
    """Log one warning line when the prunable set leaves more than half of all weights dense
    (so "sparsity s" would be far from s over the whole network). Returns whether it warned.

    Args:
      params: the params.
      flags: their prunable tree of bools.
      sparsity: the target sparsity (a concrete 0 never warns).

    Returns:
      Whether it warned.
    """
    s = concrete(sparsity)
    leaves = jax.tree.leaves(params)
    sizes = [math.prod(np.shape(x)) for x in leaves]
    total = sum(sizes)
    prunable = sum(n for n, f in zip(sizes, jax.tree.leaves(flags), strict=True) if f)
    if not total or (s is not None and s == 0.0) or total - prunable <= total / 2:
        return False
    logging.getLogger("esacl_jax").warning(
        "the prunable set covers %.1f%% of all weights, so %.1f%% of them stay dense: sparsity "
        "%s over the prunable set is %s over all weights (pass prunable= to choose the set)",
        100 * prunable / total, 100 * (total - prunable) / total,
        "s" if s is None else f"{s:g}",
        f"s * {prunable / total:.3f}" if s is None else f"{s * prunable / total:.3f}")
    return True


__getattr__ = _deprecation.forwarding_getattr(__name__, {
    # it was never the default prunable set: the name-based one
    "default_prunable": ("esacl_jax.masks:name_prunable",
                         'use masks.name_prunable (prunable="by_layer_name"), or prunable=None '
                         "for the default set"),
    "keep_top": ("esacl_jax.masks:top_mask", ""),
    "concrete_float": ("esacl_jax.masks:concrete", ""),
    "concrete_int": ("esacl_jax.masks:_concrete_int", "use masks.concrete(x, int)"),
})
