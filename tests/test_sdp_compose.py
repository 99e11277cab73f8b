"""sdp_transform composed with other optax wrappers, as a researcher would in their own loop.

Each composition either matches a hand-written reference or fails at trace time with one
sentence naming the fix (docs/OWN_LOOP.md lists the decisions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from esacl_jax import masks
from esacl_jax.sdp import (
    accumulate_grad_fn,
    find_sdp_state,
    keep_sparse,
    sdp_transform,
)
from tests.test_sdp import init_params, loss_fn, make_data


def _setup():
    params = init_params()
    x, y = make_data(16)
    grad_fn = jax.grad(lambda p: loss_fn(p, x, y))
    return params, x, y, grad_fn


def _masked_sam_point(params, grads, mask_tree, rho):
    """w + rho g m / ||g m||, by hand."""
    gm = jax.tree.map(lambda g, m: jnp.where(m, g, 0.0), grads, mask_tree)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(gm)))
    return jax.tree.map(lambda w, g: w + rho * g / norm, params, gm)


def _close(a, b, rtol=1e-5, atol=1e-7):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


# ----------------------------------------------------------------------------- grad_fn


def test_missing_grad_fn_raises_unless_opted_out():
    params, x, y, grad_fn = _setup()
    g = grad_fn(params)
    tx = keep_sparse(optax.chain(sdp_transform(0.5, 0.05), optax.sgd(0.1)))
    with pytest.raises(ValueError, match="needs grad_fn"):
        jax.jit(tx.update)(g, tx.init(params), params)
    # Opt-outs: rho a static 0, or require_grad_fn=False; both use the incoming gradient.
    for front in (sdp_transform(0.5, 0.0), sdp_transform(0.5, 0.05, require_grad_fn=False)):
        tx = keep_sparse(optax.chain(front, optax.sgd(1.0)))
        state = tx.init(params)
        updates, _ = jax.jit(tx.update)(g, state, params)
        m = find_sdp_state(state).masks
        _close(updates, jax.tree.map(lambda g, m, w: jnp.where(m, -g, -w), g, m, params))


def test_flax_train_state_helper():
    from flax.training import train_state

    from esacl_jax.flax_utils import SDPTrainState

    params, x, y, grad_fn = _setup()
    tx = keep_sparse(optax.chain(sdp_transform(0.5, 0.05), optax.sgd(0.1, momentum=0.9)))
    # flax's own TrainState cannot pass grad_fn: the error names the helper.
    plain = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
    with pytest.raises(ValueError, match="SDPTrainState"):
        plain.apply_gradients(grads=grad_fn(params))

    state = SDPTrainState.create(apply_fn=None, params=params, tx=tx)
    ref_params = masks.apply_masks(params, find_sdp_state(tx.init(params)).masks)
    jax.tree.map(np.testing.assert_array_equal, state.params, ref_params)

    @jax.jit
    def step(state):
        return state.apply_gradients(grads=grad_fn(state.params), grad_fn=grad_fn)

    ref_state = tx.init(params)
    for _ in range(3):
        state = step(state)
        updates, ref_state = jax.jit(
            lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))(ref_params, ref_state)
        ref_params = optax.apply_updates(ref_params, updates)
    assert int(state.step) == 3
    _close(state.params, ref_params)
    refreshed = jax.jit(lambda s: s.refresh_masks())(state)
    assert not np.array_equal(refreshed.masks["hidden"]["kernel"], state.masks["hidden"]["kernel"])


# ----------------------------------------------------------------------------- chain order


def test_wrong_order_and_missing_optimizer_are_rejected():
    params, x, y, grad_fn = _setup()
    g = grad_fn(params)

    def update(tx):
        return jax.jit(lambda s, p: tx.update(g, s, p, grad_fn=grad_fn))(tx.init(params), params)

    with pytest.raises(ValueError, match="must be the first transform"):
        update(keep_sparse(optax.chain(optax.sgd(0.1), sdp_transform(0.5))))
    with pytest.raises(ValueError, match="must be the first transform"):
        update(keep_sparse(optax.chain(optax.clip_by_global_norm(1.0), sdp_transform(0.5),
                                       optax.sgd(0.1))))
    with pytest.raises(ValueError, match="no optimizer runs after sdp_transform"):
        update(keep_sparse(optax.chain(sdp_transform(0.5))))
    with pytest.raises(ValueError, match="no optimizer runs after sdp_transform"):
        update(keep_sparse(optax.chain(sdp_transform(0.5), optax.identity())))
    # optax.masked leaving some leaves without optimizer: ascent on them, rejected.
    only_kernels = jax.tree.map(lambda x: x.ndim == 2, params)
    with pytest.raises(ValueError, match="no optimizer runs after sdp_transform"):
        update(keep_sparse(optax.chain(sdp_transform(0.5),
                                       optax.masked(optax.sgd(0.1), only_kernels))))
    # A multi_transform group with no transform at all gets the raw gradient: rejected.
    labels = jax.tree.map(lambda x: "sparse" if x.ndim == 2 else "rest", params)
    with pytest.raises(ValueError, match="raw gradient"):
        update(keep_sparse(optax.multi_transform(
            {"sparse": optax.chain(sdp_transform(0.5), optax.sgd(0.1)),
             "rest": optax.identity()}, labels)))


def test_clip_after_sdp_clips_the_sharpness_aware_gradient():
    params, x, y, grad_fn = _setup()
    tx = keep_sparse(optax.chain(sdp_transform(0.5, 0.05), optax.clip_by_global_norm(1e-3),
                                 optax.sgd(1.0)))
    state = tx.init(params)
    params = masks.apply_masks(params, find_sdp_state(state).masks)
    g = grad_fn(params)
    updates, _ = jax.jit(lambda s, p: tx.update(g, s, p, grad_fn=grad_fn))(state, params)
    m = find_sdp_state(state).masks
    g_sam = grad_fn(_masked_sam_point(params, grad_fn(params), m, 0.05))
    g_sam = jax.tree.map(lambda a, b: jnp.where(b, a, 0.0), g_sam, m)
    norm = optax.global_norm(g_sam)
    _close(updates, jax.tree.map(lambda a: -a * 1e-3 / norm, g_sam), rtol=1e-4, atol=1e-9)
    assert abs(float(optax.global_norm(updates)) - 1e-3) < 1e-7


# ----------------------------------------------------------------------------- MultiSteps


def test_multisteps_is_rejected_in_both_nestings():
    params, x, y, grad_fn = _setup()
    g = grad_fn(params)
    inner = keep_sparse(optax.chain(sdp_transform(0.5), optax.sgd(0.1)))
    outer = optax.MultiSteps(inner, every_k_schedule=2)
    with pytest.raises(ValueError, match="MultiSteps"):
        jax.jit(lambda s, p: outer.update(g, s, p, grad_fn=grad_fn))(outer.init(params), params)
    ms = optax.MultiSteps(optax.chain(sdp_transform(0.5), optax.sgd(0.1)), every_k_schedule=2)
    wrapped = keep_sparse(ms.gradient_transformation())
    with pytest.raises(ValueError, match="MultiSteps"):
        jax.jit(lambda s, p: wrapped.update(g, s, p, grad_fn=grad_fn))(wrapped.init(params),
                                                                       params)


def test_accumulate_grad_fn_is_sam_on_the_full_batch():
    """4 micro-batches of 4 through accumulate_grad_fn == one SAM step on the batch of 16,
    with grad_fn called once per update."""
    params, x, y, grad_fn = _setup()
    micro = (x.reshape(4, 4, -1), y.reshape(4, 4))
    calls = []

    def per_batch(p, batch):
        return jax.grad(loss_fn)(p, *batch)

    tx = keep_sparse(optax.chain(sdp_transform(0.5, 0.05), optax.sgd(0.1)))
    state = tx.init(params)
    params = masks.apply_masks(params, find_sdp_state(state).masks)
    accumulated = accumulate_grad_fn(per_batch, micro)

    def counted(p):
        calls.append(1)
        return accumulated(p)

    @jax.jit
    def step(p, s):
        return tx.update(accumulated(p), s, p, grad_fn=counted)

    updates, _ = step(params, state)
    m = find_sdp_state(state).masks
    point = _masked_sam_point(params, grad_fn(params), m, 0.05)
    want = jax.tree.map(lambda a, b: jnp.where(b, -0.1 * a, 0.0), grad_fn(point), m)
    _close(updates, want, rtol=1e-4, atol=1e-7)
    assert len(calls) == 1  # the descent gradient of all micro-batches, once per update


# ----------------------------------------------------------------------------- masked, partition


def test_multi_transform_hands_grad_fn_the_full_params():
    params, x, y, grad_fn = _setup()
    labels = {k: jax.tree.map(lambda _, k=k: "sparse" if k in ("hidden", "hidden2") else "dense",
                              v) for k, v in params.items()}
    tx = keep_sparse(optax.multi_transform(
        {"sparse": optax.chain(sdp_transform(0.5, 0.05, prunable="by_layer_name"), optax.sgd(0.1)),
         "dense": optax.adam(1e-2)}, labels))
    state = tx.init(params)
    sdp = find_sdp_state(state)
    assert isinstance(sdp.masks["stem"]["kernel"], optax.MaskedNode)
    seen = []

    def recording_grad_fn(p):
        seen.append(jax.tree.structure(p))
        return grad_fn(p)

    params = jax.tree.map(lambda w, m: w if isinstance(m, optax.MaskedNode) else w * m,
                          params, sdp.masks, is_leaf=lambda v: isinstance(v, optax.MaskedNode))
    g = grad_fn(params)
    updates, new_state = jax.jit(lambda s, p: tx.update(g, s, p, grad_fn=recording_grad_fn))(
        state, params)
    assert seen == [jax.tree.structure(params)]
    # Reference: SAM over the sparse group only (eps 0 on the others), SGD on it; Adam on the
    # others with the clean gradient.
    group = {k: params[k] for k in ("hidden", "hidden2")}
    group_masks = {k: sdp.masks[k] for k in ("hidden", "hidden2")}
    point_group = _masked_sam_point(group, {k: g[k] for k in group}, group_masks, 0.05)
    g_sam = grad_fn({**params, **point_group})
    for k in ("hidden", "hidden2"):
        want = jax.tree.map(lambda a, b: jnp.where(b, -0.1 * a, 0.0), g_sam[k], group_masks[k])
        _close(updates[k], want, rtol=1e-4, atol=1e-7)
    adam = optax.adam(1e-2)
    dense = {k: params[k] for k in ("stem", "classifier")}
    want_dense, _ = adam.update({k: g[k] for k in dense}, adam.init(dense), dense)
    for k in dense:
        _close(updates[k], want_dense[k])


def test_keep_sparse_inside_masked_is_rejected():
    params, x, y, grad_fn = _setup()
    mask = jax.tree.map(lambda w: w.ndim == 2, params)
    tx = optax.masked(keep_sparse(optax.chain(sdp_transform(0.5), optax.sgd(0.1))), mask)
    with pytest.raises(ValueError, match="outside optax.masked"):
        jax.jit(lambda s, p: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))(tx.init(params),
                                                                           params)


# ----------------------------------------------------------------------------- apply_if_finite


def test_apply_if_finite_after_sdp_catches_nan_from_grad_fn():
    params, x, y, grad_fn = _setup()
    outer = optax.apply_if_finite(keep_sparse(optax.chain(sdp_transform(0.5), optax.sgd(0.1))),
                                  3)
    with pytest.raises(ValueError, match="apply_if_finite"):
        jax.jit(lambda s, p: outer.update(grad_fn(p), s, p, grad_fn=grad_fn))(outer.init(params),
                                                                              params)
    tx = keep_sparse(optax.chain(sdp_transform(0.5),
                                 optax.apply_if_finite(optax.sgd(0.1, momentum=0.9), 3)))
    state = tx.init(params)
    params = masks.apply_masks(params, find_sdp_state(state).masks)

    def nan_grad_fn(p):
        return jax.tree.map(lambda a: a * jnp.nan, grad_fn(p))

    step = jax.jit(lambda s, p, f: tx.update(grad_fn(p), s, p, grad_fn=f), static_argnums=2)
    updates, state1 = step(state, params, grad_fn)  # one good step: count 1, momentum set
    params1 = optax.apply_updates(params, updates)
    updates, state2 = step(state1, params1, nan_grad_fn)  # NaN from grad_fn: skipped
    params2 = optax.apply_updates(params1, updates)
    jax.tree.map(np.testing.assert_array_equal, params2, params1)
    sdp1, sdp2 = find_sdp_state(state1), find_sdp_state(state2)
    jax.tree.map(np.testing.assert_array_equal, sdp2.grad_ema, sdp1.grad_ema)  # NaN skipped
    assert int(sdp2.count) == 2
    inner_if_finite = state2[1]
    assert int(inner_if_finite.total_notfinite) == 1
