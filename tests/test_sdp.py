"""Tests of esacl_jax.sdp: the SDP optax transform, keep_sparse and the state helpers.

Everything runs under jit. The contract tests follow optax's (extra args, inject_hyperparams,
dtype, sharding, abstract init) plus the sparse-specific ones: exact zeros, exact counts.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from esacl_jax import masks
from esacl_jax.sdp import (
    SDPState,
    find_sdp_state,
    keep_sparse,
    refresh_masks,
    replace_sdp_state,
    sdp_transform,
    update_masks,
)

# ----------------------------------------------------------------------------- a small MLP

SHAPES = {
    "stem": {"kernel": (6, 16), "bias": (16,)},
    "hidden": {"kernel": (16, 16), "bias": (16,)},
    "hidden2": {"kernel": (16, 12), "bias": (12,)},
    "classifier": {"kernel": (12, 3), "bias": (3,)},
}
LAYERS = ("stem", "hidden", "hidden2", "classifier")


@functools.partial(jax.jit, static_argnames=("seed", "dtype"))
def init_params(seed: int = 0, dtype=jnp.float32) -> dict:
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    return {
        name: {
            "kernel": (jax.random.normal(next(keys), s["kernel"]) / np.sqrt(s["kernel"][0])).astype(
                dtype
            ),
            "bias": (0.1 * jax.random.normal(next(keys), s["bias"])).astype(dtype),
        }
        for name, s in SHAPES.items()
    }


def apply_mlp(params: dict, x: jax.Array) -> jax.Array:
    for name in LAYERS[:-1]:
        x = jax.nn.relu(x @ params[name]["kernel"] + params[name]["bias"])
    return x @ params["classifier"]["kernel"] + params["classifier"]["bias"]


@functools.partial(jax.jit, static_argnames=("n", "seed"))
def make_data(n: int = 48, seed: int = 1) -> tuple[jax.Array, jax.Array]:
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, 6))
    y = jnp.argmax(x @ jax.random.normal(kw, (6, 3)), axis=-1)
    return x, y


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = apply_mlp(params, x).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


_jit_grad = jax.jit(jax.grad(loss_fn))


def sparse_start(tx, params):
    """init + zero the initially pruned weights (what a training loop does once)."""
    state = tx.init(params)
    return masks.apply_masks(params, find_sdp_state(state).masks), state


def run_steps(tx, params, state, batches, *, with_grad_fn=True):
    """Scan of train steps; returns final params/state and the per-step updates."""

    def step(carry, batch):
        params, state = carry
        x, y = batch
        grads = jax.grad(loss_fn)(params, x, y)
        kwargs = {"grad_fn": lambda p: jax.grad(loss_fn)(p, x, y)} if with_grad_fn else {}
        updates, state = tx.update(grads, state, params, **kwargs)
        return (optax.apply_updates(params, updates), state), updates

    (params, state), updates = jax.lax.scan(step, (params, state), batches)
    return params, state, updates


def batches(num: int, size: int = 8, seed: int = 1):
    x, y = make_data(num * size, seed)
    return x.reshape(num, size, 6), y.reshape(num, size)


# ----------------------------------------------------------------------------- equivalence

OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-2),
}


def _compare_with_plain(opt, jit: bool, steps: int = 6, every: int = 2):
    """Step `keep_sparse(chain(sdp_transform(0, 0), opt))` and `opt` side by side on the same
    gradients (from one compiled function, so both see bitwise the same inputs); yield both
    updates. `jit=False` runs the two updates op by op."""
    tx = keep_sparse(optax.chain(sdp_transform(0.0, 0.0, mask_update_every_steps=every), opt))

    def tx_update(g, s, p, x, y):
        # Op by op: no grad_fn (it would be evaluated op by op, the reference is compiled).
        kwargs = {"grad_fn": lambda q: jax.grad(loss_fn)(q, x, y)} if jit else {}
        return tx.update(g, s, p, **kwargs)

    opt_update = opt.update
    if jit:
        tx_update, opt_update = jax.jit(tx_update), jax.jit(opt_update)
    grad = _jit_grad
    params = plain = init_params()
    state, plain_state = jax.jit(tx.init)(params), jax.jit(opt.init)(params)
    xs, ys = batches(steps)
    for x, y in zip(xs, ys, strict=True):
        g = grad(params, x, y)
        with contextlib.nullcontext() if jit else jax.disable_jit():
            updates, state = tx_update(g, state, params, x, y)
            plain_updates, plain_state = opt_update(g, plain_state, plain)
        yield updates, plain_updates
        params = optax.apply_updates(params, updates)
        plain = optax.apply_updates(plain, plain_updates)
    assert int(find_sdp_state(state).count) == steps
    assert all(bool(jnp.all(m)) for m in jax.tree.leaves(find_sdp_state(state).masks))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_no_rho_no_sparsity_is_exactly_the_plain_optimizer(name):
    """Bitwise equal updates, op by op: XLA:CPU contracts a*b+c into FMAs depending on how a
    program is fused, so two different compiled programs may differ in the last bit (e.g. Adam's
    moment updates) even for identical arithmetic; without fusion they cannot."""
    pairs = _compare_with_plain(OPTIMIZERS[name](), jit=False, steps=3, every=0)
    for updates, plain_updates in pairs:
        jax.tree.map(np.testing.assert_array_equal, updates, plain_updates)


def test_rho_zero_uses_grad_fn_at_params():
    """grad_fn is the descent gradient (it may differ from the clean g that only sets the ascent
    direction): with rho == 0 it is evaluated at w itself and replaces g."""
    params = init_params()
    tx = keep_sparse(optax.chain(sdp_transform(0.0, 0.0), optax.sgd(1.0)))
    clean = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(
        lambda g, s, p: tx.update(g, s, p, grad_fn=lambda q: jax.tree.map(lambda x: 2 * x, q))
    )(clean, tx.init(params), params)
    jax.tree.map(lambda u, p: np.testing.assert_array_equal(u, -2 * p), updates, params)


@pytest.mark.parametrize("name", ["momentum", "adamw"])
def test_no_rho_no_sparsity_matches_the_plain_optimizer_under_jit(name):
    """Compiled, with grad_fn and the in-update mask schedule: equal up to FMA contraction."""
    for updates, plain_updates in _compare_with_plain(OPTIMIZERS[name](), jit=True, steps=4):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
            updates,
            plain_updates,
        )


# ----------------------------------------------------------------------------- exact sparsity


def _active_counts(state_masks) -> list[int]:
    return [int(m.sum()) for m in jax.tree.leaves(state_masks) if m.ndim > 0]


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_init_exact_per_layer_sparsity(distribution):
    params = init_params()
    state = jax.jit(sdp_transform(0.8, distribution=distribution).init)(params)
    sp = masks.layer_sparsities(params, 0.8, distribution)
    summary = masks.sparsity_summary(state.masks)
    assert set(summary["layers"]) == {"hidden/kernel", "hidden2/kernel"}
    for name in ("hidden", "hidden2"):
        size = int(np.prod(SHAPES[name]["kernel"]))
        pruned = round(sp[name]["kernel"] * size)
        assert summary["layers"][f"{name}/kernel"]["active"] == size - pruned
    total = 16 * 16 + 16 * 12
    assert abs(summary["global_sparsity"] - 0.8) <= 1.0 / total
    # Placeholders: scalar True masks, scalar G on non-prunable leaves; no curvature by default.
    assert state.masks["stem"]["kernel"].shape == () and bool(state.masks["stem"]["kernel"])
    assert state.grad_ema["stem"]["kernel"].shape == ()
    assert state.grad_ema["hidden"]["kernel"].shape == (16, 16)
    assert all(h.shape == () for h in jax.tree.leaves(state.curvature_ema))
    assert state.grad_ema["hidden"]["kernel"].dtype == jnp.float32


def test_adamw_200_steps_pruned_weights_stay_zero_and_masks_move():
    """Pruned weights exactly 0 at every step, regrown ones 0 at regrowth, counts exact."""
    tx = keep_sparse(
        optax.chain(
            sdp_transform(0.8, 0.05, mask_update_every_steps=20, prune_fraction=0.1),
            optax.adamw(1e-2, weight_decay=1e-2),
        )
    )
    params, state = sparse_start(tx, init_params())
    x, y = make_data(64)
    init_masks = find_sdp_state(state).masks

    def step(carry, _):
        params, state = carry
        old = find_sdp_state(state).masks
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(
            grads, state, params, grad_fn=lambda p: jax.grad(loss_fn)(p, x, y)
        )
        params = optax.apply_updates(params, updates)
        new = find_sdp_state(state).masks
        leaves = list(zip(*(jax.tree.leaves(t) for t in (params, old, new)), strict=True))
        off = sum(jnp.sum(jnp.where(n, 0.0, jnp.abs(p))) for p, _, n in leaves)
        regrown = sum(jnp.sum(n & ~o) for _, o, n in leaves)
        regrown_abs = sum(jnp.sum(jnp.where(n & ~o, jnp.abs(p), 0.0)) for p, o, n in leaves)
        counts = jnp.stack([jnp.sum(n) for _, _, n in leaves if n.ndim > 0])
        return (params, state), (off, regrown, regrown_abs, counts, loss_fn(params, x, y))

    run = jax.jit(lambda p, s: jax.lax.scan(step, (p, s), None, length=200))
    (params, state), (off, regrown, regrown_abs, counts, losses) = run(params, state)
    assert np.all(np.asarray(off) == 0.0)  # pruned weights exactly zero after every step
    assert np.all(np.asarray(regrown_abs) == 0.0)  # regrown weights start at exactly zero
    changed_at = np.flatnonzero(np.asarray(regrown))
    np.testing.assert_array_equal(changed_at, np.arange(20, 200, 20))  # count 20, 40, ..., 180
    np.testing.assert_array_equal(counts, np.broadcast_to(_active_counts(init_masks), counts.shape))
    final = find_sdp_state(state).masks
    assert not np.array_equal(final["hidden"]["kernel"], init_masks["hidden"]["kernel"])
    assert float(losses[-1]) < float(losses[0])


def test_update_masks_and_refresh_masks_keep_counts():
    tx = keep_sparse(optax.chain(sdp_transform(0.75, 0.05), optax.sgd(0.1)))
    params, state = sparse_start(tx, init_params())
    data = batches(5)
    params, state, _ = jax.jit(lambda p, s: run_steps(tx, p, s, data, with_grad_fn=False))(
        params, state
    )
    sdp = find_sdp_state(state)
    new = jax.jit(lambda s, p: update_masks(s, p, prune_fraction=0.2))(sdp, params)
    assert _active_counts(new.masks) == _active_counts(sdp.masks)
    assert not np.array_equal(new.masks["hidden"]["kernel"], sdp.masks["hidden"]["kernel"])
    assert int(new.count) == int(sdp.count)

    new_state, new_params = jax.jit(lambda s, p: refresh_masks(s, p, prune_fraction=0.2))(
        state, params
    )
    m_old, m_new = (
        sdp.masks["hidden"]["kernel"],
        find_sdp_state(new_state).masks["hidden"]["kernel"],
    )
    np.testing.assert_array_equal(m_new, new.masks["hidden"]["kernel"])
    w_old, w_new = params["hidden"]["kernel"], new_params["hidden"]["kernel"]
    assert np.all(np.asarray(w_new)[~np.asarray(m_new)] == 0.0)  # newly pruned zeroed
    assert np.all(np.asarray(w_new)[np.asarray(m_new & ~m_old)] == 0.0)  # regrown start at 0
    keep = np.asarray(m_new & m_old)
    np.testing.assert_array_equal(np.asarray(w_new)[keep], np.asarray(w_old)[keep])
    np.testing.assert_array_equal(new_params["stem"]["kernel"], params["stem"]["kernel"])
    # The rest of the optimizer state is untouched.
    assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_random_regrowth_and_taylor_score():
    tx = keep_sparse(
        optax.chain(
            sdp_transform(
                0.5, 0.05, score="taylor", regrow="random", mask_update_every_steps=3, prune_fraction=0.1
            ),
            optax.sgd(0.1),
        )
    )
    params, state = sparse_start(tx, init_params())
    assert find_sdp_state(state).curvature_ema["hidden"]["kernel"].shape == (16, 16)
    data = batches(4)
    params, state, _ = jax.jit(lambda p, s: run_steps(tx, p, s, data, with_grad_fn=False))(
        params, state
    )
    sdp = find_sdp_state(state)
    assert _active_counts(sdp.masks) == _active_counts(find_sdp_state(tx.init(params)).masks)
    assert float(jnp.sum(sdp.curvature_ema["hidden"]["kernel"])) > 0.0
    # Taylor scores need the curvature EMA: a magnitude_gradient state cannot provide it.
    plain = sdp_transform(0.5).init(params)
    with pytest.raises(ValueError, match="taylor"):
        update_masks(plain, params, score="taylor")


# ----------------------------------------------------------------------------- convergence


def _quadratic(sparse_seed: int = 0):
    rng = np.random.default_rng(sparse_seed)
    a = rng.normal(size=(40, 16)) / np.sqrt(40) + np.eye(40, 16)
    w_true = rng.normal(size=16)
    b = a @ w_true
    lipschitz = float(np.linalg.eigvalsh(a.T @ a).max())
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)

    def loss(params):
        r = a32 @ params["kernel"].reshape(-1) - b32
        return 0.5 * jnp.sum(r * r)

    return a, b, loss, lipschitz


def _minimize(tx, params, loss, steps):
    grad = jax.grad(loss)

    def step(carry, _):
        params, state = carry
        updates, state = tx.update(grad(params), state, params, grad_fn=grad)
        return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params, state


def test_quadratic_converges_with_sam():
    _, _, loss, lip = _quadratic()
    params = {"kernel": jnp.zeros((4, 4))}
    lr = optax.exponential_decay(0.5 / lip, transition_steps=100, decay_rate=0.5)
    tx = keep_sparse(optax.chain(sdp_transform(0.0, 0.05), optax.sgd(lr)))
    final, _ = jax.jit(lambda p: _minimize(tx, p, loss, 1500))(params)
    assert float(loss(params)) > 1.0
    assert float(loss(final)) < 1e-4


def test_quadratic_sparse_converges_to_restricted_minimum():
    a, b, loss, lip = _quadratic()
    params = {"kernel": jax.random.normal(jax.random.key(0), (4, 4))}
    lr = optax.exponential_decay(0.5 / lip, transition_steps=100, decay_rate=0.5)
    tx = keep_sparse(optax.chain(sdp_transform(0.5, 0.02), optax.sgd(lr)))
    final, state = jax.jit(lambda p: _minimize(tx, p, loss, 1500))(params)
    active = np.asarray(find_sdp_state(state).masks["kernel"]).reshape(-1)
    assert active.sum() == 8
    w_star = np.zeros(16)
    w_star[active] = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
    w = np.asarray(final["kernel"]).reshape(-1)
    assert np.all(w[~active] == 0.0)
    np.testing.assert_allclose(w, w_star, atol=2e-3)


# ----------------------------------------------------------------------------- contract


def test_bf16_params_keep_their_dtype():
    params = init_params(dtype=jnp.bfloat16)
    tx = keep_sparse(optax.chain(sdp_transform(0.5, 0.05, mask_update_every_steps=2), optax.adam(1e-2)))
    params, state = sparse_start(tx, params)
    data = batches(3)
    new_params, state, updates = jax.jit(lambda p, s: run_steps(tx, p, s, data))(params, state)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(new_params), strict=True):
        assert u.dtype == jnp.bfloat16 and p.dtype == jnp.bfloat16
    sdp = find_sdp_state(state)
    assert all(m.dtype == jnp.bool_ for m in jax.tree.leaves(sdp.masks))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(sdp.grad_ema))
    hidden, mask = new_params["hidden"]["kernel"], sdp.masks["hidden"]["kernel"]
    assert np.all(np.asarray(hidden, np.float32)[~np.asarray(mask)] == 0.0)


def test_abstract_init():
    params = init_params()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    tx = keep_sparse(optax.chain(sdp_transform(0.9, distribution="erk"), optax.adamw(1e-3)))
    shapes = jax.eval_shape(tx.init, abstract)
    real = tx.init(params)
    assert jax.tree.structure(shapes) == jax.tree.structure(real)
    for s, r in zip(jax.tree.leaves(shapes), jax.tree.leaves(real), strict=True):
        assert s.shape == r.shape and s.dtype == r.dtype


def test_inject_hyperparams_matches_plain():
    params = init_params()
    data = batches(5)
    plain = keep_sparse(
        optax.chain(
            sdp_transform(0.5, 0.05, mask_update_every_steps=2, prune_fraction=0.1), optax.sgd(0.1)
        )
    )
    injected = keep_sparse(
        optax.chain(
            optax.inject_hyperparams(sdp_transform)(
                sparsity=0.5, rho=0.05, mask_update_every_steps=2, prune_fraction=0.1
            ),
            optax.sgd(0.1),
        )
    )

    @jax.jit
    def both(params):
        params = masks.apply_masks(params, find_sdp_state(plain.init(params)).masks)
        p1, s1, u1 = run_steps(plain, params, plain.init(params), data)
        p2, s2, u2 = run_steps(injected, params, injected.init(params), data)
        return p1, find_sdp_state(s1).masks, u1, p2, find_sdp_state(s2).masks, u2

    p1, m1, u1, p2, m2, u2 = both(params)
    jax.tree.map(np.testing.assert_array_equal, m1, m2)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)  # noqa: E731
    jax.tree.map(close, u1, u2)
    jax.tree.map(close, p1, p2)
    state = injected.init(params)
    assert isinstance(find_sdp_state(state), SDPState)
    assert jax.eval_shape(injected.init, params) is not None


def test_extra_args_tolerated_and_missing_wrapper_raises():
    params = init_params()
    grads = jax.grad(loss_fn)(params, *make_data())
    tx = keep_sparse(optax.chain(sdp_transform(0.5), optax.sgd(0.1)))
    state = tx.init(params)
    jax.jit(lambda g, s, p: tx.update(g, s, p, unknown_arg=1, value=2.0))(grads, state, params)

    bare = optax.chain(sdp_transform(0.5), optax.sgd(0.1))
    with pytest.raises(ValueError, match="keep_sparse"):
        jax.jit(bare.update)(grads, bare.init(params), params)
    unchecked = optax.chain(sdp_transform(0.5, check_projection=False), optax.sgd(0.1))
    jax.jit(unchecked.update)(grads, unchecked.init(params), params)
    with pytest.raises(ValueError, match="exactly one"):
        keep_sparse(optax.sgd(0.1)).init(params)
    with pytest.raises(ValueError):
        sdp_transform(1.5)
    with pytest.raises(ValueError):
        sdp_transform(0.5, score="random")


def test_replace_sdp_state_roundtrip():
    params = init_params()
    tx = keep_sparse(optax.chain(sdp_transform(0.5), optax.adam(1e-3)))
    state = tx.init(params)
    sdp = find_sdp_state(state)
    bumped = replace_sdp_state(state, sdp._replace(count=sdp.count + 7))
    assert int(find_sdp_state(bumped).count) == 7
    assert jax.tree.structure(bumped) == jax.tree.structure(state)


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_sharding_preserved(axis_type):
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    kind = AxisType.Explicit if axis_type == "explicit" else AxisType.Auto
    mesh = jax.make_mesh((1,), ("x",), axis_types=(kind,))
    spec = {name: {"kernel": P(None, "x"), "bias": P("x")} for name in LAYERS}
    params = jax.tree.map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), init_params(), spec
    )
    tx = keep_sparse(optax.chain(sdp_transform(0.5, 0.05, mask_update_every_steps=1), optax.adamw(1e-2)))
    state0 = jax.jit(tx.init)(params)
    x, y = make_data(8)
    targets = jax.nn.one_hot(y, 3)

    def mse(params):  # no integer-label gather: explicit sharding types stay unambiguous
        return jnp.mean((apply_mlp(params, x) - targets) ** 2)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(mse)(params), state, params, grad_fn=jax.grad(mse))
        return optax.apply_updates(params, updates), state, updates

    new_params, state, updates = step(*step(params, state0)[:2])
    for before, after, u in zip(
        *(jax.tree.leaves(t) for t in (params, new_params, updates)), strict=True
    ):
        assert after.sharding.is_equivalent_to(before.sharding, after.ndim)
        assert u.sharding.is_equivalent_to(before.sharding, u.ndim)
    hidden_mask = find_sdp_state(state).masks["hidden"]["kernel"]
    assert hidden_mask.sharding.is_equivalent_to(params["hidden"]["kernel"].sharding, 2)
    if axis_type == "explicit":
        assert jax.tree.map(jax.typeof, state) == jax.tree.map(jax.typeof, state0)


def test_flax_nnx_optimizer():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.stem = nnx.Linear(6, 16, rngs=rngs)
            self.hidden = nnx.Linear(16, 16, rngs=rngs)
            self.classifier = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            return self.classifier(nnx.relu(self.hidden(nnx.relu(self.stem(x)))))

    x, y = make_data(32)

    def nnx_loss(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    model = Net(nnx.Rngs(0))
    tx = keep_sparse(
        optax.chain(
            sdp_transform(0.5, 0.05, mask_update_every_steps=3), optax.adamw(1e-2, weight_decay=1e-2)
        )
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    start_masks = nnx.as_pure(find_sdp_state(optimizer.opt_state).masks)
    assert start_masks["stem"]["kernel"].shape == ()
    nnx.update(model, masks.apply_masks(nnx.as_pure(nnx.state(model, nnx.Param)), start_masks))

    @nnx.jit
    def train_step(model, optimizer):
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)

        def grad_fn(params):
            grads = nnx.grad(nnx_loss)(nnx.merge(graphdef, params, rest))
            return nnx.as_pure(nnx.state(grads, nnx.Param))

        loss, grads = nnx.value_and_grad(nnx_loss)(model)
        optimizer.update(model, grads, grad_fn=grad_fn)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(8)]
    assert losses[-1] < losses[0]
    final_masks = nnx.as_pure(find_sdp_state(optimizer.opt_state).masks)
    kernel = np.asarray(model.hidden.kernel[...])
    mask = np.asarray(final_masks["hidden"]["kernel"])
    assert mask.sum() == 128 and np.all(kernel[~mask] == 0.0)
