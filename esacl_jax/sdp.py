"""SDP, sharpness-aware directional pruning, as an optax transform, and `keep_sparse`.

Usage (the two pieces always go together; forgetting the wrapper raises at trace time)::

    tx = esacl_jax.keep_sparse(optax.chain(
        esacl_jax.sdp_transform(sparsity=0.9, rho=0.05),
        optax.adamw(1e-3, weight_decay=1e-2),
    ))
    opt_state = tx.init(params)          # masks: per-layer magnitude pruning of params
    params = esacl_jax.apply_masks(params, esacl_jax.find_sdp_state(opt_state).masks)
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

Notes:
- `grad_fn` takes the (perturbed) params only, unlike `optax.contrib.sam`'s `grad_fn(params, i)`.
- Under `optax.inject_hyperparams(sdp_transform)`, numeric arguments become arrays in the params'
  dtype: pass `hyperparam_dtype=jnp.float32` for bf16 params, and
  `static_args=("mask_update_every_steps",)` to keep a 0 schedule free (a traced schedule computes the
  candidate masks at every step); a custom `prunable` filter needs `static_args=("prunable",)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from esacl_jax import masks as masks_lib
from esacl_jax.masks import PrunableFn, PyTree
from esacl_jax.sharpness import add_perturbation, sam_perturbation

KEEP_SPARSE_MARKER = "_esacl_keep_sparse"

_MISSING_WRAPPER = (
    "sdp_transform was updated outside keep_sparse, so pruned weights would drift (momentum, Adam "
    "state and weight decay of the optimizer chained after it move them off zero): wrap the chain "
    "as esacl_jax.keep_sparse(optax.chain(sdp_transform(...), optimizer)), or build "
    "sdp_transform(..., check_projection=False) if you zero the pruned weights yourself."
)


class SDPState(NamedTuple):
    """State of `sdp_transform`.

    Attributes:
      count: int32 step counter.
      masks: bool tree like params (scalar True for non-prunable leaves).
      grad_ema: G, float32 EMA of the dense sharpness-aware gradient (scalar 0 placeholder on
        non-prunable leaves, which are never scored).
      curvature_ema: h, float32 EMA of g_sam**2 for the "taylor" score (scalar 0 placeholders
        everywhere unless the transform was built with score="taylor").
      key: typed PRNG key for random regrowth.
    """

    count: jax.Array
    masks: PyTree
    grad_ema: PyTree
    curvature_ema: PyTree
    key: jax.Array


def _is_placeholder(state_leaf: jax.Array, mask_leaf: jax.Array) -> bool:
    """A scalar state entry standing in for a non-scalar (prunable) leaf."""
    return jnp.ndim(state_leaf) == 0 and jnp.ndim(mask_leaf) > 0


def _validate(
    sparsity: Any, rho: Any, distribution: str, score: str, regrow: str, every: Any
) -> None:
    """Check the static choices and whatever numbers are concrete (traced ones pass through)."""
    if distribution not in masks_lib.DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {masks_lib.DISTRIBUTIONS}: {distribution!r}")
    if score not in masks_lib.SCORE_KINDS:
        raise ValueError(f"score must be one of {masks_lib.SCORE_KINDS}: {score!r}")
    if regrow not in masks_lib.REGROW_KINDS:
        raise ValueError(f"regrow must be one of {masks_lib.REGROW_KINDS}: {regrow!r}")
    s = masks_lib.concrete_float(sparsity)
    if s is not None and not 0.0 <= s <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {s}")
    r = masks_lib.concrete_float(rho)
    if r is not None and r < 0.0:
        raise ValueError(f"rho must be >= 0, got {r}")
    e = masks_lib.concrete_int(every)
    if e is not None and e < 0:
        raise ValueError(f"mask_update_every_steps must be >= 0, got {e}")


def update_masks(
    state: SDPState,
    params: PyTree,
    *,
    score: str = "magnitude_gradient",
    score_lambda: Any = 0.5,
    prune_fraction: Any = 0.01,
    regrow: str = "gradient",
    prunable: PrunableFn | PyTree | None = None,
) -> SDPState:
    """One SDP mask update at constant sparsity: score, prune the lowest, regrow by |G|.

    The function `sdp_transform` uses on its schedule; call it directly (under `jit` or not) to
    refresh masks at host-chosen points. It only changes `masks` and `key`: use `refresh_masks`
    to also zero the newly pruned weights. Pass the same options the transform was built with.
    """
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
    key, sub = jax.random.split(state.key)
    new_masks, _ = masks_lib.prune_and_regrow(
        state.masks,
        scores,
        state.grad_ema,
        fraction=prune_fraction,
        key=sub,
        regrow=regrow,
        prunable=prunable,
    )
    return state._replace(masks=new_masks, key=key)


def sdp_transform(
    sparsity: Any = 0.9,
    rho: Any = 0.05,
    *,
    distribution: str = "uniform",
    prunable: PrunableFn | PyTree | None = None,
    score: str = "magnitude_gradient",
    score_lambda: Any = 0.5,
    ema_decay: Any = 0.9,
    prune_fraction: Any = 0.01,
    regrow: str = "gradient",
    mask_update_every_steps: Any = 0,
    seed: Any = 0,
    check_projection: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Sharpness-aware directional pruning: masked SAM gradient + SDP mask updates.

    Args:
      sparsity: fraction of pruned weights in each prunable layer (global target for "erk");
        only used at init.
      rho: SAM radius. A static 0 evaluates `grad_fn` at w itself (no perturbation).
      distribution: "uniform" or "erk" per-layer sparsities.
      prunable: filter `(path, leaf) -> bool` or bool tree; None means
        `masks.default_prunable`. (None, not the function, is the default so that
        `optax.inject_hyperparams` does not mistake it for a schedule; a custom filter under
        inject_hyperparams needs `static_args=("prunable",)`.)
      score: "magnitude_gradient" (|w| + lambda |G|) or "taylor" (|w G| + 0.5 h w^2; also keeps
        the curvature EMA h, one more float32 copy of the prunable weights).
      score_lambda: lambda of the magnitude_gradient score.
      ema_decay: decay of the G (and h) EMAs.
      prune_fraction: fraction of each layer pruned and regrown per mask update.
      regrow: "gradient" (largest |G| among inactive weights) or "random".
      mask_update_every_steps: 0 (default): masks change only through `update_masks`/`refresh_masks`
        called by the training loop. k > 0: inside `update`, at steps with count > 0 and
        count % k == 0 (selected with jnp.where, no lax.cond: the candidate masks, two top_k
        per prunable layer, are then computed at every step).
      seed: seed of the PRNG key used by random regrowth.
      check_projection: raise at trace time when not run inside `keep_sparse`.

    Returns:
      A `GradientTransformationExtraArgs`. `update(updates, state, params, *, grad_fn=None)`:
      `updates` is the clean gradient g at `params`, used only for the ascent direction eps;
      `grad_fn(params) -> grads` is the descent gradient (it may use other data than g, e.g.
      IDS-selected examples plus replay), evaluated at the perturbed point w + eps (at w itself
      when rho is a static 0). With `grad_fn=None` there is NO SAM inside: the incoming
      `updates` are used as g_sam (pass a g_sam you computed yourself).
    """
    _validate(sparsity, rho, distribution, score, regrow, mask_update_every_steps)
    prunable_fn = masks_lib.default_prunable if prunable is None else prunable

    def init_fn(params: PyTree) -> SDPState:
        flat, flags, treedef = masks_lib._flat_with_prunable(params, prunable_fn)
        flag_tree = treedef.unflatten(flags)
        sparsities = masks_lib.layer_sparsities(params, sparsity, distribution, flag_tree)
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

        return SDPState(
            count=jnp.zeros((), jnp.int32),
            masks=init_masks,
            grad_ema=zeros(True),
            curvature_ema=zeros(score == "taylor"),
            key=jax.random.key(seed),
        )

    def update_fn(
        updates: PyTree,
        state: SDPState,
        params: PyTree | None = None,
        *,
        grad_fn: Callable[[PyTree], PyTree] | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, SDPState]:
        if check_projection and not extra_args.get(KEEP_SPARSE_MARKER, False):
            raise ValueError(_MISSING_WRAPPER)
        if params is None:
            raise ValueError("sdp_transform needs params: call update(updates, state, params)")
        if grad_fn is None:
            g_sam = updates  # no SAM: the caller's gradient is used as it is
        elif masks_lib.concrete_float(rho) == 0.0:
            # rho == 0: no perturbation, but grad_fn is still the descent gradient, which may
            # differ from the clean one (e.g. EsaCL's descent adds replay and IDS selection).
            g_sam = grad_fn(params)
        else:
            eps = sam_perturbation(updates, state.masks, rho)
            g_sam = grad_fn(add_perturbation(params, eps))

        decay = jnp.asarray(ema_decay, jnp.float32)

        def ema(old: jax.Array, g: jax.Array, square: bool) -> jax.Array:
            if jnp.shape(old) != jnp.shape(g):  # placeholder of a leaf that is never scored
                return old
            g = jnp.asarray(g, jnp.float32)
            return decay * old + (1.0 - decay) * (jnp.square(g) if square else g)

        grad_ema = jax.tree.map(lambda o, g: ema(o, g, False), state.grad_ema, g_sam)
        curvature_ema = jax.tree.map(lambda o, g: ema(o, g, True), state.curvature_ema, g_sam)
        new_state = state._replace(
            count=optax.safe_increment(state.count),
            grad_ema=grad_ema,
            curvature_ema=curvature_ema,
        )

        every = masks_lib.concrete_int(mask_update_every_steps)
        if every != 0:  # a positive static int, or traced (inject_hyperparams)
            candidate = update_masks(
                new_state,
                params,
                score=score,
                score_lambda=score_lambda,
                prune_fraction=prune_fraction,
                regrow=regrow,
                prunable=None,
            )
            if every is not None:
                do = (state.count > 0) & (state.count % every == 0)
            else:
                k = jnp.asarray(mask_update_every_steps, jnp.int32)
                do = (k > 0) & (state.count > 0) & (state.count % jnp.maximum(k, 1) == 0)
            new_masks = jax.tree.map(lambda a, b: jnp.where(do, a, b), candidate.masks, state.masks)
            key_data = jnp.where(
                do, jax.random.key_data(candidate.key), jax.random.key_data(state.key)
            )
            new_state = new_state._replace(masks=new_masks, key=jax.random.wrap_key_data(key_data))

        out = jax.tree.map(
            lambda g, m, p: jnp.where(m, g, jnp.zeros((), jnp.result_type(g))).astype(p.dtype),
            g_sam,
            new_state.masks,
            params,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- state surgery


def _is_sdp(x: Any) -> bool:
    return isinstance(x, SDPState)


def find_sdp_state(opt_state: Any) -> SDPState:
    """The single `SDPState` inside an optimizer state (through chain, inject_hyperparams, ...)."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_sdp) if _is_sdp(x)]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one sdp_transform state in the optimizer state, found {len(found)}"
        )
    return found[0]


def replace_sdp_state(opt_state: Any, new_state: SDPState) -> Any:
    """`opt_state` with its single `SDPState` replaced by `new_state` (structure unchanged)."""
    find_sdp_state(opt_state)
    return jax.tree.map(lambda x: new_state if _is_sdp(x) else x, opt_state, is_leaf=_is_sdp)


def _project(u: jax.Array, p: jax.Array, old: jax.Array, new: jax.Array) -> jax.Array:
    """u where the weight was and stays active, else -p (so p + u == 0 exactly)."""
    return jnp.where(old & new, u, -jnp.asarray(p, jnp.result_type(u)))


def refresh_masks(opt_state: Any, params: PyTree, **kwargs: Any) -> tuple[Any, PyTree]:
    """`update_masks` on the SDPState inside `opt_state`, and zero what is no longer active.

    Returns `(new_opt_state, new_params)`: newly pruned weights are set to 0 and regrown weights
    start at exactly 0. `kwargs` go to `update_masks` (score, score_lambda, prune_fraction,
    regrow, prunable): pass the options the transform was built with. Works under `jit`.
    """
    old = find_sdp_state(opt_state)
    new = update_masks(old, params, **kwargs)
    params = jax.tree.map(
        lambda p, a, b: jnp.where(a & b, p, jnp.zeros((), p.dtype)), params, old.masks, new.masks
    )
    return replace_sdp_state(opt_state, new), params


def keep_sparse(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Wrap a chain holding one `sdp_transform` so pruned weights stay exactly zero.

    Runs `tx` and then projects its final updates: u where the mask is True both before and
    after this step, -params elsewhere. After `optax.apply_updates` pruned weights are exactly 0
    (p + (-p) == 0 in IEEE) and weights regrown at this step are exactly 0, whatever `tx` does
    after the transform (momentum, Adam, weight decay). Must be the outermost transform that
    produces updates. The state is `tx`'s own state (no extra wrapper level).
    """
    inner = optax.with_extra_args_support(tx)

    def init_fn(params: PyTree) -> Any:
        state = inner.init(params)
        find_sdp_state(state)
        return state

    def update_fn(
        updates: PyTree, state: Any, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, Any]:
        if params is None:
            raise ValueError("keep_sparse needs params: call update(updates, state, params)")
        old_masks = find_sdp_state(state).masks
        extra_args = {**extra_args, KEEP_SPARSE_MARKER: True}
        updates, new_state = inner.update(updates, state, params, **extra_args)
        new_masks = find_sdp_state(new_state).masks
        updates = jax.tree.map(_project, updates, params, old_masks, new_masks)
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
