"""SDP, sharpness-aware directional pruning, as an optax transform, and `keep_sparse`.

Usage (the two pieces always go together; forgetting the wrapper raises at trace time)::

    tx = esacl_jax.keep_sparse(optax.chain(
        esacl_jax.sdp_transform(sparsity=0.9, rho=0.05),
        optax.adamw(1e-3, weight_decay=1e-2),
    ))
    opt_state = tx.init(params)          # masks: per-layer magnitude pruning of params
    params = esacl_jax.sparse_start(params, opt_state)   # pruned weights exactly 0
    ...
    grads = jax.grad(loss)(params, batch)                      # clean gradient g at w
    updates, opt_state = tx.update(grads, opt_state, params,
                                   grad_fn=lambda p: jax.grad(loss)(p, batch))
    params = optax.apply_updates(params, updates)              # pruned weights exactly 0
    ...
    opt_state, params = esacl_jax.refresh_masks(opt_state, params)   # e.g. every 5 epochs

What `sdp_transform` does per step (opaque SAM, as `optax.contrib.sam(opaque_mode=True)`):
eps = rho * (g*m)/||g*m|| on the active coordinates; g_sam = grad_fn(w + eps) (dense); G and h
are EMAs of g_sam and g_sam**2 (used to score weights at mask updates); the output is g_sam * m.
`keep_sparse` runs the whole chain and then projects the final updates so that after
`optax.apply_updates` every pruned (and every just-regrown) weight is exactly zero, whatever the
followers did (momentum, Adam moments, weight decay).

Compositions (each decided, tested in tests/test_sdp_compose.py, see docs/OWN_LOOP.md); anything
else raises at trace time with one sentence naming the fix:
- `sdp_transform` is the FIRST transform inside `keep_sparse` (what comes before it is discarded:
  its output replaces the gradient), and an optimizer follows it (its output is a gradient, which
  `apply_updates` would add). `clip_by_global_norm` and the like go after it.
- `update` needs `grad_fn` unless `rho` is a static 0 or the transform was built with
  `require_grad_fn=False` (then the incoming updates are the descent gradient, no SAM inside).
- `optax.MultiSteps` (either nesting) is rejected: accumulate micro-batches inside one update
  with `accumulate_grad_fn` (SAM on the accumulated gradient, grad_fn called once per update).
- `optax.apply_if_finite` goes after `sdp_transform` (it then sees what grad_fn returned); around
  it, it would check only the clean gradient, so that nesting is rejected. The transform's
  score averages G and h skip the non-finite entries of the sharpness-aware gradient, so a NaN
  step does not poison later mask updates.
- `optax.multi_transform` (or `optax.masked`) inside `keep_sparse` works: `grad_fn` always gets
  the full params (w + eps on the transform's own leaves, w elsewhere); SAM's radius and the
  masks cover the transform's leaves only. Every other leaf needs its own optimizer (or
  `optax.set_to_zero()`): a leaf whose final update is the raw gradient is rejected.
  `keep_sparse` inside them is rejected.
- flax's `TrainState.apply_gradients` cannot pass `grad_fn`: use
  `esacl_jax.flax_utils.SDPTrainState`.
- `batch_axis_name` (under `jax.shard_map` / `pmap`): `grad_fn` returns this device's gradient
  of its local loss (the transform hands it the point marked varying over the axis, so that
  shard_map's autodiff does not sum it over devices) and the transform averages it
  (`lax.pmean`), so every device applies the same update. The perturbation uses the averaged
  incoming gradient (`perturbation="global"`, default: the SAM of the whole batch; a gradient
  already reduced by shard_map is fine) or each device's own (`"per_device"`, m-sharpness with
  m = the per-device batch; that gradient must be computed at
  `jax.lax.pcast(params, axis, to="varying")`, a reduced one raises). Under plain `jit` of
  sharded arrays the gradient is global.

Notes:
- `grad_fn` takes the (perturbed) params only, unlike `optax.contrib.sam`'s `grad_fn(params, i)`.
- `keep_sparse` is the outermost transform: in an `optax.chain`, another transform before it
  (its output would only steer the perturbation, then be dropped) or after it (it would move
  pruned weights off zero) is rejected; put it inside, after `sdp_transform`.
- `optax.inject_hyperparams(sdp_transform, static_args=esacl_jax.STATIC_ARGS)` (the same for
  `esacl_optimizer`): rho, score_lambda, ema_decay, prune_fraction and mask_update_every_steps
  are mutable hyperparameters; sparsity, seed and prunable are used only at init, so leaving
  them out of `static_args` raises (a custom `prunable` filter or a dtype object as
  `perturbation_dtype` needs to be named there too). Numeric arguments become arrays in the
  params' dtype: pass `hyperparam_dtype=jnp.float32` for bf16 params. A rho schedule goes to
  the transform itself (`rho=schedule`), so that `esacl_gradients` evaluates the same one.
- `grad_fn` must return the gradient in the params' structure (one line says so otherwise).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from esacl_jax import _deprecation, _guards
from esacl_jax import masks as masks_lib
from esacl_jax._defaults import ESACL_DEFAULTS, SDP_OPTION_DEFAULTS
from esacl_jax.masks import PrunableFn, PyTree
from esacl_jax.sharpness import add_perturbation, sam_perturbation

PERTURBATIONS = _guards.PERTURBATIONS

# The sdp_transform / esacl_optimizer arguments used only at init (they make the masks and the
# regrowth key): `optax.inject_hyperparams(..., static_args=STATIC_ARGS)` keeps them static.
STATIC_ARGS = ("sparsity", "seed", "prunable")


# ----------------------------------------------------------------------------- state


@dataclasses.dataclass(frozen=True)
class SDPState:
    """State of `sdp_transform` (a pytree; every leaf is an array, nothing is None).

    Attributes:
      count: int32 step counter.
      masks: bool tree like params (scalar True for non-prunable leaves).
      grad_ema: G, float32 EMA of the dense sharpness-aware gradient (scalar 0 placeholder on
        non-prunable leaves, which are never scored).
      curvature_ema: h, float32 EMA of g_sam**2 for the "taylor" score (scalar 0 placeholders
        everywhere unless the transform was built with score="taylor").
      key: uint32 raw key data (`jax.random.key_data`) of the PRNG key for random regrowth
        (plain integers, so `optax.tree_utils.tree_cast` and checkpointers handle it).
      score_lambda: float32, the transform's score_lambda (read by `mask_update`).
      prune_fraction: float32, the transform's prune_fraction (read by `mask_update`).
      score: the transform's score kind (static: part of the tree structure).
      regrow: the transform's regrowth kind (static).
      static_prune_fraction: prune_fraction as a Python float when the transform was built with
        a Python number (static, so mask updates use `lax.top_k` with a static k), else None.
      rho: the transform's SAM radius as built (static): a Python float, a schedule
        `count -> rho` evaluated at `count`, or None when it is an array (an injected
        hyperparameter: `optax.inject_hyperparams` then holds its value). `esacl_gradients` reads
        it through `sam_radius(opt_state)`, so the step and the transform share one rho.
      perturbation_dtype: the transform's `perturbation_dtype` (static), read the same way.
    """

    count: jax.Array
    masks: PyTree
    grad_ema: PyTree
    curvature_ema: PyTree
    key: jax.Array
    score_lambda: jax.Array
    prune_fraction: jax.Array
    score: str = dataclasses.field(default="magnitude_gradient", metadata={"static": True})
    regrow: str = dataclasses.field(default="gradient", metadata={"static": True})
    static_prune_fraction: float | None = dataclasses.field(default=None,
                                                            metadata={"static": True})
    rho: float | Callable[[jax.Array], Any] | None = dataclasses.field(default=None,
                                                                       metadata={"static": True})
    perturbation_dtype: Any = dataclasses.field(default="float32", metadata={"static": True})

    def _replace(self, **changes: Any) -> SDPState:
        """`dataclasses.replace`, under the NamedTuple name the state had before."""
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    SDPState,
    data_fields=["count", "masks", "grad_ema", "curvature_ema", "key", "score_lambda",
                 "prune_fraction"],
    meta_fields=["score", "regrow", "static_prune_fraction", "rho", "perturbation_dtype"],
)


def _is_placeholder(state_leaf: jax.Array, mask_leaf: jax.Array) -> bool:
    """A scalar state entry standing in for a non-scalar (prunable) leaf."""
    return jnp.ndim(state_leaf) == 0 and masks_lib.is_prunable_mask(mask_leaf)


def static_zero(rho: Any) -> bool:
    """Whether `rho` is a concrete 0 (the one "is rho zero?" rule: the transform then evaluates
    `grad_fn` at w itself and `esacl_gradients` skips the perturbation).

    Args:
      rho: a SAM radius (Python number, concrete or traced array).

    Returns:
      True for a concrete 0, False for any other value or a traced one.
    """
    return masks_lib.concrete(rho) == 0.0


# ----------------------------------------------------------------------------- mask updates


def mask_update(
    state: SDPState,
    params: PyTree,
    *,
    score: str | None = None,
    score_lambda: Any = None,
    prune_fraction: Any = None,
    regrow: str | None = None,
    prunable: PrunableFn | PyTree | None = None,
) -> SDPState:
    """One SDP mask update at constant sparsity: score, prune the lowest, regrow by |G|.

    The function `sdp_transform` uses on its schedule; call it directly (under `jit` or not) to
    refresh masks at host-chosen points. It only changes `masks` and `key`: use `refresh_masks`
    (on the optimizer state) to also zero the newly pruned weights. The options default to
    those the transform was built with (read from the state); pass one to override it for this
    update only. (Called `update_masks` before; that name is a deprecated alias.)

    Args:
      state: the transform's `SDPState` (`find_sdp_state(opt_state)`).
      params: the current params (scored by magnitude).
      score: "magnitude_gradient" or "taylor" (default: the state's).
      score_lambda: lambda of the magnitude_gradient score (default: the state's).
      prune_fraction: fraction of each layer pruned and regrown (default: the state's).
      regrow: "gradient" or "random" (default: the state's).
      prunable: restrict the update to this set (`masks.resolve_prunable`'s forms).

    Returns:
      The state with new `masks` and `key` (same active count per layer).
    """
    score = state.score if score is None else score
    regrow = state.regrow if regrow is None else regrow
    score_lambda = state.score_lambda if score_lambda is None else score_lambda
    if prune_fraction is None:
        prune_fraction = state.static_prune_fraction
        if prune_fraction is None:
            prune_fraction = state.prune_fraction
    if score == "taylor":
        curvature, leaves = jax.tree.leaves(state.curvature_ema), jax.tree.leaves(state.masks)
        if any(_is_placeholder(h, m) for h, m in zip(curvature, leaves, strict=True)):
            raise ValueError('score="taylor" needs sdp_transform(..., score="taylor") state')
    scores = masks_lib.sdp_scores(
        params,
        state.grad_ema,
        kind=score,
        score_lambda=score_lambda,
        curvature=state.curvature_ema,
    )
    key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
    new_masks, _ = masks_lib.prune_and_regrow(
        state.masks,
        scores,
        state.grad_ema,
        fraction=prune_fraction,
        key=sub,
        regrow=regrow,
        prunable=prunable,
    )
    return state._replace(masks=new_masks, key=jax.random.key_data(key))


# ----------------------------------------------------------------------------- the transform


def _rho_spec(rho: Any) -> float | Callable[[jax.Array], Any] | None:
    """What the state records of `rho` (`SDPState.rho`): a Python number as a float, a schedule
    as it is, None for an array (an injected hyperparameter, read from its wrapper's state)."""
    if callable(rho):
        return rho
    if isinstance(rho, (int, float, np.number)) and not isinstance(rho, bool):
        return float(rho)
    if isinstance(rho, np.ndarray) and rho.ndim == 0:
        return float(rho)
    return None


@dataclasses.dataclass(frozen=True)
class _Options:
    """`sdp_transform`'s arguments as given (Python numbers, schedules or injected arrays)."""

    sparsity: Any
    rho: Any
    distribution: str
    prunable: Any
    score: str
    score_lambda: Any
    ema_decay: Any
    prune_fraction: Any
    regrow: str
    mask_update_every_steps: Any
    seed: Any
    check_projection: bool
    require_grad_fn: bool
    batch_axis_name: Any
    perturbation: str
    perturbation_dtype: Any


def sdp_transform(
    sparsity: Any = ESACL_DEFAULTS["sparsity"],
    rho: Any = ESACL_DEFAULTS["rho"],
    *,
    distribution: str = ESACL_DEFAULTS["distribution"],
    prunable: PrunableFn | PyTree | str | None = None,
    score: str = ESACL_DEFAULTS["score"],
    score_lambda: Any = ESACL_DEFAULTS["score_lambda"],
    ema_decay: Any = ESACL_DEFAULTS["ema_decay"],
    prune_fraction: Any = ESACL_DEFAULTS["prune_fraction"],
    regrow: str = ESACL_DEFAULTS["regrow"],
    mask_update_every_steps: Any = SDP_OPTION_DEFAULTS["mask_update_every_steps"],
    seed: Any = SDP_OPTION_DEFAULTS["seed"],
    check_projection: bool = True,
    require_grad_fn: bool = True,
    batch_axis_name: Any = None,
    perturbation: str = SDP_OPTION_DEFAULTS["perturbation"],
    perturbation_dtype: Any = SDP_OPTION_DEFAULTS["perturbation_dtype"],
) -> optax.GradientTransformationExtraArgs:
    """Sharpness-aware directional pruning: masked SAM gradient + SDP mask updates.

    Args:
      sparsity: fraction of pruned weights in each prunable layer (global target for "erk"),
        used only at init (static under `optax.inject_hyperparams`: `STATIC_ARGS`). With no
        prunable leaf, a sparsity > 0 raises.
      rho: SAM radius, a Python float or a schedule `count -> rho` of the transform's step
        count (`sam_radius(opt_state)` gives the next update's, which `esacl_gradients`
        perturbs with). A static 0 evaluates `grad_fn` at w itself. Mutable under
        `optax.inject_hyperparams`.
      distribution: "uniform" or "erk" per-layer sparsities.
      prunable: which leaves are pruned: a name of `masks.PRUNABLE_SETS` (None is
        "all_but_output": every kernel but the logits layer, found from shapes and order),
        a filter `(path, leaf) -> bool` or a bool tree. A set that leaves more than half of
        all weights dense logs one warning line.
      score: "magnitude_gradient" or "taylor" (keeps the curvature EMA h too; `masks.sdp_scores`).
      score_lambda: lambda of the magnitude_gradient score.
      ema_decay: decay of the G (and h) EMAs.
      prune_fraction: fraction of each layer pruned and regrown per mask update.
      regrow: "gradient" (largest |G| among inactive weights) or "random".
      mask_update_every_steps: 0: masks change only through `refresh_masks` / `mask_update`
        called by the loop; k > 0: also inside `update` at counts > 0 divisible by k (under
        `lax.cond`, so other steps compute no candidate masks).
      seed: seed of the PRNG key used by random regrowth (init only).
      check_projection: raise at trace time when not run inside `keep_sparse`.
      require_grad_fn: False: without `grad_fn` the incoming updates are the descent gradient
        (no SAM inside); True: that raises unless rho is a static 0.
      batch_axis_name: the mapped axis name (or names) under `jax.shard_map` / `pmap`, as in
        `optax.contrib.sam`: `grad_fn` returns this device's gradient and the transform
        averages it (module docstring, "batch_axis_name").
      perturbation: with `batch_axis_name`, "global" (eps from the averaged incoming gradient)
        or "per_device" (each device's own: m-sharpness; module docstring).
      perturbation_dtype: dtype of w + eps handed to `grad_fn` for low-precision params
        ("float32": in bf16, w + eps == w on most coordinates); None: the params' dtype.

    Returns:
      A `GradientTransformationExtraArgs`. `update(updates, state, params, *, grad_fn=None)`:
      `updates` is the clean gradient g at `params` (only the ascent direction eps);
      `grad_fn(params) -> grads` is the descent gradient (it may use other data, e.g.
      IDS-selected examples plus replay), evaluated once at w + eps. The output is the masked
      descent gradient in the params' dtypes.
    """
    opts = _Options(**locals())  # every argument, as given
    _guards.check_options(sparsity, rho, distribution, score, regrow, mask_update_every_steps,
                          perturbation, batch_axis_name)
    _guards.check_init_only_args(sparsity=sparsity, seed=seed)

    def init_fn(params: PyTree) -> SDPState:
        return _init_state(params, opts)

    def update_fn(updates: PyTree, state: SDPState, params: PyTree | None = None, *,
                  grad_fn: Callable[[PyTree], PyTree] | None = None,
                  **extra_args: Any) -> tuple[PyTree, SDPState]:
        call = _guards.check_transform_update(updates, params, extra_args, check_projection)
        rho_now = rho(state.count) if callable(rho) else rho
        g_sam = _sharpness_aware_gradient(updates, state, params, grad_fn, call, rho_now, opts)
        new_state = _record_gradient(state, g_sam, opts)
        new_state = _scheduled_mask_update(new_state, state.count, params, opts)
        return _masked_output(g_sam, new_state.masks, params, call), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _init_state(params: PyTree, opts: _Options) -> SDPState:
    """The transform's init: magnitude masks of `params` on the prunable set, zero averages."""
    flat, flags, treedef = masks_lib._flat_with_prunable(
        params, masks_lib.resolve_prunable(opts.prunable, params)
    )
    static_sparsity = masks_lib.concrete(opts.sparsity)
    if not any(flags) and static_sparsity is not None and static_sparsity > 0:
        raise ValueError(
            f"sdp_transform(sparsity={static_sparsity}) found no prunable leaf in the params: "
            "pass prunable= (a (path, leaf) -> bool filter, a bool tree, or \"by_layer_name\") "
            "or sparsity=0."
        )
    flag_tree = treedef.unflatten(flags)
    masks_lib.warn_if_mostly_dense(params, flag_tree, opts.sparsity)
    sparsities = masks_lib.layer_sparsities(params, opts.sparsity, opts.distribution, flag_tree)
    init_masks = masks_lib.magnitude_masks(params, sparsities, flag_tree)

    def zeros(use_full: bool) -> PyTree:
        return treedef.unflatten(
            [
                jnp.zeros_like(x, dtype=jnp.float32)
                if use_full and f
                else jnp.zeros((), jnp.float32)
                for (_, x), f in zip(flat, flags, strict=True)
            ]
        )

    prune_fraction = opts.prune_fraction
    return SDPState(
        count=jnp.zeros((), jnp.int32),
        masks=init_masks,
        grad_ema=zeros(True),
        curvature_ema=zeros(opts.score == "taylor"),
        key=jax.random.key_data(jax.random.key(jnp.asarray(opts.seed).astype(jnp.int32))),
        score_lambda=jnp.asarray(opts.score_lambda, jnp.float32),
        prune_fraction=jnp.asarray(prune_fraction, jnp.float32),
        score=opts.score,
        regrow=opts.regrow,
        static_prune_fraction=(
            float(prune_fraction)
            if isinstance(prune_fraction, (int, float)) and not isinstance(prune_fraction, bool)
            else None
        ),
        rho=_rho_spec(opts.rho),
        perturbation_dtype=opts.perturbation_dtype,
    )


def _all_reduce(tree: PyTree, batch_axis_name: Any) -> PyTree:
    """The mean over the mapped axis (a no-op without one)."""
    if batch_axis_name is None:
        return tree
    return jax.lax.pmean(tree, axis_name=batch_axis_name)


def _sharpness_aware_gradient(
    updates: PyTree, state: SDPState, params: PyTree, grad_fn: Callable[[PyTree], PyTree] | None,
    call: _guards.KeepSparseCall | None, rho: Any, opts: _Options,
) -> PyTree:
    """g_sam: `grad_fn` at w + eps, eps SAM's ascent step along `updates` on the active weights
    (at w itself for a static rho of 0; the incoming updates themselves without grad_fn)."""
    axis = opts.batch_axis_name
    zero_rho = static_zero(rho)
    _guards.check_grad_fn(grad_fn, opts.require_grad_fn, 0.0 if zero_rho else None)
    if grad_fn is None:
        return _all_reduce(updates, axis)
    _guards.check_per_device(updates, opts.perturbation, 0.0 if zero_rho else None, axis)
    if zero_rho:
        # rho == 0: no perturbation, but grad_fn is still the descent gradient, which may
        # differ from the clean one (e.g. EsaCL's descent adds replay and IDS selection).
        point = params
    else:
        g = updates if opts.perturbation == "per_device" else _all_reduce(updates, axis)
        point = perturbed_params(g, state.masks, params, rho,
                                 perturbation_dtype=opts.perturbation_dtype)
    if axis is not None:
        point = _as_varying(point, axis)
    return _all_reduce(_call_grad_fn(grad_fn, point, params, call), axis)


def _record_gradient(state: SDPState, g_sam: PyTree, opts: _Options) -> SDPState:
    """The state after one step: count + 1, g_sam folded into the score averages G (and h), and
    the injected score options recorded for `mask_update`."""
    decay = jnp.asarray(opts.ema_decay, jnp.float32)

    def ema(old: jax.Array, g: jax.Array, square: bool) -> jax.Array:
        if jnp.shape(old) != jnp.shape(g):  # placeholder of a leaf that is never scored
            return old
        g = jnp.asarray(g, jnp.float32)
        new = decay * old + (1.0 - decay) * (jnp.square(g) if square else g)
        # A non-finite entry of g_sam leaves its average unchanged (elementwise: no extra
        # pass over the gradient, unlike a global all-finite reduction).
        return jnp.where(jnp.isfinite(g), new, old)

    score_lambda, prune_fraction = opts.score_lambda, opts.prune_fraction
    return state._replace(
        count=optax.safe_increment(state.count),
        grad_ema=jax.tree.map(lambda o, g: ema(o, g, False), state.grad_ema, g_sam),
        curvature_ema=jax.tree.map(lambda o, g: ema(o, g, True), state.curvature_ema, g_sam),
        # Array values (inject_hyperparams) are recorded for mask_update; Python numbers are
        # already in the state since init (passed through: no new buffers).
        score_lambda=state.score_lambda if isinstance(score_lambda, (int, float))
        else jnp.asarray(score_lambda, jnp.float32),
        prune_fraction=state.prune_fraction if isinstance(prune_fraction, (int, float))
        else jnp.asarray(prune_fraction, jnp.float32),
    )


def _scheduled_mask_update(state: SDPState, count: jax.Array, params: PyTree,
                           opts: _Options) -> SDPState:
    """`mask_update` under `lax.cond` at the steps `mask_update_every_steps` names (count > 0
    and count % k == 0); the state as it is when k is a static 0."""
    every = masks_lib.concrete(opts.mask_update_every_steps, int)
    if every == 0:
        return state
    if every is not None:
        do = (count > 0) & (count % every == 0)
    else:  # traced (inject_hyperparams)
        k = jnp.asarray(opts.mask_update_every_steps, jnp.int32)
        do = (k > 0) & (count > 0) & (count % jnp.maximum(k, 1) == 0)
    return jax.lax.cond(
        do,
        lambda s: mask_update(s, params, score_lambda=opts.score_lambda,
                              prune_fraction=opts.prune_fraction),
        lambda s: s,
        state,
    )


def _masked_output(g_sam: PyTree, masks: PyTree, params: PyTree,
                   call: _guards.KeepSparseCall | None) -> PyTree:
    """g_sam * m in the params' dtypes (recorded for keep_sparse's check of the chain)."""
    out = jax.tree.map(
        lambda g, m, p: jnp.where(m, g, jnp.zeros((), jnp.result_type(g))).astype(p.dtype),
        g_sam,
        _active(masks),
        params,
    )
    if call is not None:
        call.outputs.extend(jax.tree.leaves(out))
    return out


def _as_varying(tree: PyTree, axis_name: Any) -> PyTree:
    """Mark the leaves as varying over the mapped axes (a no-op on values): then `jax.grad` at
    them under `jax.shard_map` gives each device's own gradient, not the sum over devices."""

    def one(x: jax.Array) -> jax.Array:
        varying = getattr(getattr(jax.typeof(x), "manual_axis_type", None), "varying", None)
        missing = tuple(a for a in _guards.axes(axis_name) if varying is None or a not in varying)
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(one, tree)


def _call_grad_fn(
    grad_fn: Callable[[PyTree], PyTree], point: PyTree, params: PyTree,
    call: _guards.KeepSparseCall | None,
) -> PyTree:
    """grad_fn at `point`; under optax.masked / multi_transform (params with MaskedNode leaves)
    the user's grad_fn gets the full params (keep_sparse's), with `point` on this transform's
    leaves, and its result is cut back to them."""
    if not _guards.has_masked_nodes(params):
        return _like_params(grad_fn(point), point)
    if call is None or _guards.has_masked_nodes(call.params):
        raise ValueError(_guards.INSIDE_MASKED)
    full = jax.tree.map(
        lambda full_p, q: full_p if _guards.is_masked_node(q) else q,
        call.params, point, is_leaf=_guards.is_masked_node,
    )
    grads = _like_params(grad_fn(full), full)
    return jax.tree.map(
        lambda q, g: q if _guards.is_masked_node(q) else g, point, grads,
        is_leaf=_guards.is_masked_node,
    )


def _like_params(grads: PyTree, params: PyTree) -> PyTree:
    """`grads` as grad_fn returned them, or one line when their structure is not the params'."""
    want, got = jax.tree.structure(params), jax.tree.structure(grads)
    if got != want:
        raise ValueError(_guards.GRAD_FN_STRUCTURE.format(got=got.num_leaves, want=want.num_leaves))
    return grads


def accumulate_grad_fn(
    grad_fn: Callable[[PyTree, Any], PyTree], microbatches: Any
) -> Callable[[PyTree], PyTree]:
    """`params -> mean_i grad_fn(params, microbatches[i])` over the leading axis, via `lax.scan`.

    Gradient accumulation with SAM, in place of `optax.MultiSteps` (rejected): compute the clean
    gradient as `accumulate_grad_fn(f, mbs)(params)` and pass `grad_fn=accumulate_grad_fn(f,
    mbs)`; the update then perturbs along the accumulated gradient and evaluates the descent
    gradient of all micro-batches at that one point (exactly SAM on the full batch when the
    loss is a mean over equal micro-batches). Sums in float32; results in grad_fn's dtypes.

    Args:
      grad_fn: `(params, microbatch) -> grads`.
      microbatches: a tree of arrays with the micro-batches on the leading axis.

    Returns:
      `params -> grads`, the mean gradient over the micro-batches.
    """

    def fn(params: PyTree) -> PyTree:
        first = jax.tree.map(lambda x: x[0], microbatches)
        shapes = jax.eval_shape(grad_fn, params, first)
        n = jax.tree.leaves(microbatches)[0].shape[0]

        def body(acc: PyTree, batch: Any) -> tuple[PyTree, None]:
            g = grad_fn(params, batch)
            return jax.tree.map(lambda a, x: a + jnp.asarray(x, jnp.float32), acc, g), None

        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
        total, _ = jax.lax.scan(body, zeros, microbatches)
        return jax.tree.map(lambda t, s: (t / n).astype(s.dtype), total, shapes)

    return fn


# ----------------------------------------------------------------------------- state surgery


def _is_sdp(x: Any) -> bool:
    return isinstance(x, SDPState)


def perturbed_params(grads: PyTree, masks: PyTree, params: PyTree, rho: Any, *,
                     perturbation_dtype: Any = "float32") -> PyTree:
    """w + eps, the point where `sdp_transform` evaluates `grad_fn`: SAM's ascent step of radius
    `rho` along `grads` on the active weights of `masks` (an `SDPState`'s masks).

    For a training step that takes the descent gradient itself (and needs more from that pass
    than the gradient, e.g. per-example losses) and hands it over as ``grad_fn=lambda _: g``:
    computed with this function, its point is the transform's to the bit, low-precision
    params included (`perturbation_dtype` as in `sdp_transform`).

    Args:
      grads: the ascent direction g (a tree like the params).
      masks: the `SDPState`'s masks.
      params: w.
      rho: the radius (`sam_radius(opt_state)`).
      perturbation_dtype: as `sdp_transform`'s.

    Returns:
      w + eps, a tree like `params`.
    """
    eps = sam_perturbation(grads, _active(masks), rho, dtype=perturbation_dtype)
    return add_perturbation(params, eps, dtype=perturbation_dtype)


def find_sdp_state(opt_state: Any) -> SDPState:
    """The single `SDPState` inside an optimizer state (through chain, inject_hyperparams, ...).

    Args:
      opt_state: an optimizer state.

    Returns:
      Its `SDPState` (ValueError when there is none or more than one).
    """
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_sdp) if _is_sdp(x)]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one sdp_transform state in the optimizer state, found {len(found)}"
        )
    return found[0]


def _is_inject_state(x: Any) -> bool:
    return isinstance(x, optax.InjectStatefulHyperparamsState)


def sam_radius(opt_state: Any) -> Any:
    """The SAM radius rho the `sdp_transform` inside `opt_state` uses at its next update.

    The one source of rho for a step that perturbs by itself (`esacl_gradients`): the Python
    float the transform was built with, its schedule evaluated at the transform's step count,
    or, under `optax.inject_hyperparams`, the hyperparameter's current value in the wrapper's
    state (which is what the next update uses).

    Args:
      opt_state: an optimizer state holding exactly one `sdp_transform` state.

    Returns:
      rho as a Python float (static: a 0 lets a step skip the perturbation) or a scalar array.

    Raises:
      ValueError: rho is scheduled by `optax.inject_hyperparams` (pass the schedule to the
        transform instead), or was built from a bare array.
    """
    state = find_sdp_state(opt_state)
    if isinstance(state.rho, float):
        return state.rho
    if callable(state.rho):
        return state.rho(state.count)
    for wrapper in jax.tree.leaves(opt_state, is_leaf=_is_inject_state):
        if not _is_inject_state(wrapper) or "rho" not in wrapper.hyperparams:
            continue
        inner = jax.tree.leaves(wrapper.inner_state, is_leaf=_is_sdp)
        if not any(x is state for x in inner):
            continue
        if "rho" in wrapper.hyperparams_states:
            raise ValueError(_guards.INJECTED_RHO_SCHEDULE)
        return wrapper.hyperparams["rho"]
    raise ValueError(_guards.UNKNOWN_RHO)


def replace_sdp_state(opt_state: Any, new_state: SDPState) -> Any:
    """`opt_state` with its single `SDPState` replaced by `new_state` (structure unchanged).

    Args:
      opt_state: an optimizer state holding one `SDPState`.
      new_state: the state to put in its place.

    Returns:
      The optimizer state with `new_state` in it.
    """
    find_sdp_state(opt_state)
    return jax.tree.map(lambda x: new_state if _is_sdp(x) else x, opt_state, is_leaf=_is_sdp)


def _project(u: jax.Array, p: jax.Array, old: jax.Array, new: jax.Array) -> jax.Array:
    """u where the weight was and stays active, else -p (so p + u == 0 exactly)."""
    keep = old if old is new else old & new  # the same tracer when masks cannot change
    return jnp.where(keep, u, -jnp.asarray(p, jnp.result_type(u)))


def _active(masks: PyTree) -> PyTree:
    """The masks with each scalar placeholder (a non-prunable leaf, always True) replaced by a
    Python True, so that the where()s on those leaves fold away at trace time."""
    return jax.tree.map(lambda m: m if masks_lib.is_prunable_mask(m) else True, masks)


def _full_masks(masks: PyTree, params: PyTree) -> PyTree:
    """`_active` masks with the structure of the full params: MaskedNode (leaves of other
    groups of an optax.multi_transform) becomes True as well."""
    return jax.tree.map(
        lambda _, m: True if _guards.is_masked_node(m) or not masks_lib.is_prunable_mask(m)
        else m, params, masks
    )


def refresh_masks(opt_state: Any, params: PyTree, **kwargs: Any) -> tuple[Any, PyTree]:
    """`mask_update` on the SDPState inside `opt_state`, and zero what is no longer active.

    Newly pruned weights are set to 0 and regrown weights start at exactly 0. By default the
    transform's own options (score, score_lambda, prune_fraction, regrow; stored in its state)
    are used. Works under `jit`.

    Args:
      opt_state: an optimizer state holding one `sdp_transform` state.
      params: the current params.
      **kwargs: `mask_update`'s options (score, score_lambda, prune_fraction, regrow,
        prunable), overriding the transform's for this call.

    Returns:
      `(new_opt_state, new_params)`.
    """
    old = find_sdp_state(opt_state)
    new = mask_update(old, params, **kwargs)
    old_masks, new_masks = _full_masks(old.masks, params), _full_masks(new.masks, params)
    params = jax.tree.map(
        lambda p, a, b: jnp.where(a & b, p, jnp.zeros((), p.dtype)), params, old_masks, new_masks
    )
    return replace_sdp_state(opt_state, new), params


def keep_sparse(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Wrap a chain holding one `sdp_transform` so pruned weights stay exactly zero.

    Runs `tx` and then projects its final updates: u where the mask is True both before and
    after this step, -params elsewhere. After `optax.apply_updates` pruned weights are exactly 0
    (p + (-p) == 0 in IEEE) and weights regrown at this step are exactly 0, whatever `tx` does
    after the transform (momentum, Adam, weight decay). Must be the outermost transform that
    produces updates (an `optax.MultiSteps` or `optax.apply_if_finite` around it is rejected).
    The state is `tx`'s own state (no extra wrapper level).

    At trace time it also checks the chain: `sdp_transform` must see the incoming gradient
    unchanged (nothing before it), and no leaf's final update may be the transform's output or
    the raw gradient (no optimizer after it); each mistake raises one sentence naming the fix.

    Args:
      tx: a chain holding one `sdp_transform`, first.

    Returns:
      A `GradientTransformationExtraArgs` whose `update` takes `grad_fn=` (passed through).
    """
    inner = optax.with_extra_args_support(tx)

    def init_fn(params: PyTree) -> Any:
        state = inner.init(params)
        find_sdp_state(state)
        _guards.check_keep_sparse_state(state)
        return state

    def update_fn(
        updates: PyTree, state: Any, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, Any]:
        _guards.check_keep_sparse_update(params)
        old_masks = _full_masks(find_sdp_state(state).masks, params)
        call = _guards.KeepSparseCall(updates, params)
        extra_args = {**extra_args, _guards.KEEP_SPARSE_MARKER: call}
        new_updates, new_state = inner.update(updates, state, params, **extra_args)
        _guards.check_chain_output(call, new_updates)
        new_masks = _full_masks(find_sdp_state(new_state).masks, params)
        new_updates = jax.tree.map(_project, new_updates, params, old_masks, new_masks)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__getattr__ = _deprecation.forwarding_getattr(__name__, {
    "update_masks": ("esacl_jax.sdp:mask_update", ""),
})
