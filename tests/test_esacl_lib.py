"""The library's EsaCL step (`esacl_jax.esacl_gradients`, `esacl_optimizer`, `sparse_start`).

The harness's EsaCL runs on it (tests/test_esacl.py); here: the defaults agree with the harness,
the step against hand-written references of variant C and B, the reductions (rho = 0, gamma = 1,
sparsity 0 -> the plain optimizer), the table's bookkeeping, jit, and a mesh of 8 CPU devices.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import esacl_jax
from esacl_jax import ids, sdp
from tests.conftest import REPO_ROOT, xla_flags

SIZES = (6, 32, 32, 4)


def init_params(seed: int = 0) -> dict:
    keys = jax.random.split(jax.random.key(seed), len(SIZES) - 1)
    names = ["layer1", "layer2", "logits"]
    return {n: {"kernel": jax.random.normal(k, (a, b)) / np.sqrt(a), "bias": jnp.zeros(b)}
            for n, k, a, b in zip(names, keys, SIZES[:-1], SIZES[1:], strict=True)}


def logits_of(params: dict, x: jax.Array) -> jax.Array:
    h = x
    for name in ("layer1", "layer2"):
        h = jax.nn.relu(h @ params[name]["kernel"] + params[name]["bias"])
    return h @ params["logits"]["kernel"] + params["logits"]["bias"]


def loss_fn(params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
    logits = logits_of(params, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]), logits


def make_batch(n: int = 16, seed: int = 1) -> dict:
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, SIZES[0]))
    y = jnp.argmax(x @ jax.random.normal(kw, (SIZES[0], SIZES[-1])), axis=-1)
    return {"x": x, "y": y, "index": jnp.arange(n, dtype=jnp.int32)}


def rows(batch: dict) -> dict:
    return {"x": batch["x"], "y": batch["y"]}


def replay_term(params: dict) -> jax.Array:
    """A stand-in replay loss (any scalar function of the params)."""
    return 0.1 * jnp.sum(jnp.square(params["logits"]["kernel"]))


def test_library_defaults_are_the_harness_defaults():
    from esacl_jax.harness.config import base_config

    harness = base_config().esacl
    for name, value in esacl_jax.ESACL_DEFAULTS.items():
        if name == "init_rescale":
            # the harness's start is config.sparse_start, the same for every sparse method
            # (esacl.init_rescale is its deprecated alias, unset by default)
            assert harness[name] is None and base_config().sparse_start == "magnitude"
            continue
        assert harness[name] == value, name
    assert harness.step_variant == "C"  # the library's default with table= given
    # sdp_transform's own defaults are the same numbers.
    import inspect

    signature = inspect.signature(esacl_jax.sdp_transform).parameters
    for name in ("sparsity", "rho", "distribution", "score", "score_lambda", "ema_decay",
                 "prune_fraction", "regrow"):
        assert signature[name].default == esacl_jax.ESACL_DEFAULTS[name], name


def test_variant_c_matches_a_hand_written_step():
    params, batch = init_params(), make_batch()
    rho, gamma = 0.05, 0.25
    tx = esacl_jax.esacl_optimizer(optax.sgd(0.1), rho=rho)
    opt_state = tx.init(params)
    params = esacl_jax.sparse_start(params, opt_state)
    table = esacl_jax.init_example_stats(64)
    # Record an earlier pass so the table ranks (losses of some examples, unscored others).
    table = ids.update_example_stats(table, batch["index"][:8],
                                     loss=jnp.linspace(0.1, 2.0, 8), sharpness=jnp.full(8, jnp.nan))
    g = jax.jit(lambda p, s, t: esacl_jax.esacl_gradients(
        loss_fn, p, rows(batch), s, table=t, example_index=batch["index"], gamma=gamma,
        replay_loss_fn=replay_term))(params, opt_state, table)

    # By hand: the top 4 of 16 by the table's (estimated) sharpness at the mean for unseen ones.
    scores = ids.table_scores(table, batch["index"], "estimated_sharpness", unseen="mean")
    selected = np.argsort(-np.asarray(scores), kind="stable")[:4]
    np.testing.assert_array_equal(np.sort(np.asarray(g.selected)), np.sort(selected))
    sub = {k: v[selected] for k, v in rows(batch).items()}
    masks = esacl_jax.find_sdp_state(opt_state).masks

    @jax.jit
    def by_hand(params):
        clean = jax.grad(lambda p: loss_fn(p, sub)[0].mean())(params)
        active = jax.tree.map(lambda m: True if jnp.ndim(m) == 0 else m, masks)
        norm = jnp.sqrt(sum(jnp.sum(jnp.where(m, c, 0.0) ** 2)
                            for c, m in zip(jax.tree.leaves(clean), jax.tree.leaves(active),
                                            strict=True)))
        point = jax.tree.map(lambda w, c, m: w + jnp.where(m, rho * c / norm, 0.0), params,
                             clean, active)
        descent = jax.grad(lambda p: loss_fn(p, rows(batch))[0].mean() + replay_term(p))(point)
        return (clean, descent, loss_fn(point, rows(batch))[0], loss_fn(params, sub)[0],
                tx.update(g.ascent_grads, opt_state, params, grad_fn=g.grad_fn)[0])

    clean, descent, per_example, clean_sub, updates = by_hand(params)
    for a, b in zip(jax.tree.leaves(g.ascent_grads), jax.tree.leaves(clean), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g.descent_grads), jax.tree.leaves(descent), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The table: every example's loss at w + eps; sharpness only where measured (selected).
    np.testing.assert_allclose(g.table.loss[:16], per_example, rtol=1e-5)
    sharp = np.asarray(g.table.sharpness[:16])
    assert np.all(np.isfinite(sharp[selected]))
    assert np.all(np.isnan(np.delete(sharp, selected)))
    np.testing.assert_allclose(
        sharp[selected], per_example[selected] - clean_sub, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(g.table.seen[:16]) == np.r_[np.full(8, 2), np.full(8, 1)])
    # And the optimizer step with it keeps pruned weights at zero.
    new = optax.apply_updates(params, updates)
    for w, m in zip(jax.tree.leaves(new), jax.tree.leaves(masks), strict=True):
        assert np.all(np.asarray(w)[~np.broadcast_to(np.asarray(m), w.shape)] == 0)


def test_variant_b_descends_on_the_sharpest_examples():
    params, batch = init_params(), make_batch()
    tx = esacl_jax.esacl_optimizer(optax.sgd(0.1), rho=0.05)
    opt_state = tx.init(params)
    g = esacl_jax.esacl_gradients(loss_fn, params, rows(batch), opt_state, gamma=0.5)
    clean = jax.grad(lambda p: loss_fn(p, rows(batch))[0].mean())(params)
    point = sdp.perturbed_params(clean, esacl_jax.find_sdp_state(opt_state).masks, params, 0.05)
    sharpness = loss_fn(point, rows(batch))[0] - loss_fn(params, rows(batch))[0]
    top = np.argsort(-np.asarray(sharpness), kind="stable")[:8]
    np.testing.assert_array_equal(np.sort(np.asarray(g.selected)), np.sort(top))
    sub = {k: v[top] for k, v in rows(batch).items()}
    descent = jax.grad(lambda p: loss_fn(p, sub)[0].mean())(point)
    for a, b in zip(jax.tree.leaves(g.descent_grads), jax.tree.leaves(descent), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert g.per_example.shape == (8,) and g.table.shape == ()


@pytest.mark.parametrize("optimizer", [optax.sgd(0.1, momentum=0.9), optax.adamw(1e-2)])
def test_rho_0_gamma_1_sparsity_0_is_the_plain_optimizer(optimizer):
    params, batch = init_params(), make_batch()
    tx = esacl_jax.esacl_optimizer(optimizer, sparsity=0.0, rho=0.0)
    state, plain_state = tx.init(params), optimizer.init(params)
    p, q = esacl_jax.sparse_start(params, state), params
    for _ in range(3):
        g = esacl_jax.esacl_gradients(loss_fn, p, rows(batch), state, gamma=1.0)
        updates, state = tx.update(g.ascent_grads, state, p, grad_fn=g.grad_fn)
        p = optax.apply_updates(p, updates)
        grads = jax.grad(lambda w: loss_fn(w, rows(batch))[0].mean())(q)
        plain, plain_state = optimizer.update(grads, plain_state, q)
        q = optax.apply_updates(q, plain)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_bad_arguments_say_what_is_missing():
    params, batch = init_params(), make_batch()
    state = esacl_jax.esacl_optimizer(optax.sgd(0.1)).init(params)
    with pytest.raises(ValueError, match="example_index"):
        esacl_jax.esacl_gradients(loss_fn, params, rows(batch), state,
                                  table=esacl_jax.init_example_stats(16))
    with pytest.raises(ValueError, match="key="):
        esacl_jax.esacl_gradients(loss_fn, params, rows(batch), state, ids_score="random")
    with pytest.raises(ValueError, match="ids_score"):
        esacl_jax.esacl_gradients(loss_fn, params, rows(batch), state, ids_score="sharpest")
    with pytest.raises(ValueError, match="replay_at"):
        esacl_jax.esacl_gradients(loss_fn, params, rows(batch), state, replay_at="later")


def test_on_a_mesh_of_8_cpu_devices_it_matches_one_device():
    """jit with the batch sharded over 8 devices (the harness's data parallelism): the same
    gradients and table as on one device (a fresh process: the device count is fixed at start)."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np, optax
        from jax.sharding import NamedSharding, PartitionSpec as P
        import esacl_jax
        from tests.test_esacl_lib import init_params, loss_fn, make_batch, rows, replay_term
        assert jax.device_count() == 8
        params, batch = init_params(), make_batch(32)
        tx = esacl_jax.esacl_optimizer(optax.sgd(0.1))
        state = tx.init(params)
        params = esacl_jax.sparse_start(params, state)
        table = esacl_jax.init_example_stats(32)

        @jax.jit
        def step(params, state, table, batch):
            g = esacl_jax.esacl_gradients(loss_fn, params, rows(batch), state, table=table,
                                          example_index=batch["index"], replay_loss_fn=replay_term)
            updates, state = tx.update(g.ascent_grads, state, params, grad_fn=g.grad_fn)
            return optax.apply_updates(params, updates), state, g.table

        one = step(params, state, table, batch)
        one = step(*one, make_batch(32, seed=2))
        mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        shard = lambda b: jax.device_put(b, NamedSharding(mesh, P("data")))
        many = step(params, state, table, shard(batch))
        many = step(*many, shard(make_batch(32, seed=2)))
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many), strict=True):
            np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                       rtol=2e-5, atol=1e-6)
        print("MESH_OK")
    """)
    env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"),
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "MESH_OK" in out.stdout, out.stderr[-3000:]
