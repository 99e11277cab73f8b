"""sdp_transform on 8 CPU devices (one subprocess with XLA_FLAGS): batch_axis_name under
jax.shard_map with the global and the per-device (m-sharpness) perturbation, each against a
hand-written reference, and sharded params (explicit and auto mesh axes) keeping their sharding.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO_ROOT, xla_flags

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from esacl_jax import masks
    from esacl_jax.sdp import find_sdp_state, keep_sparse, sdp_transform
    from tests.test_sdp import LAYERS, apply_mlp, init_params, loss_fn, make_data

    assert jax.device_count() == 8
    print("devices", jax.device_count())

    # ---- batch_axis_name under shard_map: global vs per-device perturbation
    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,))
    x, y = make_data(64, 3)
    rho, lr = 0.1, 0.5
    grad = jax.jit(jax.grad(loss_fn))

    def sharded_step(perturbation):
        tx = keep_sparse(optax.chain(
            sdp_transform(0.5, rho, batch_axis_name="d", perturbation=perturbation),
            optax.sgd(lr)))
        params = init_params()
        state = tx.init(params)
        params = masks.apply_masks(params, find_sdp_state(state).masks)

        def local(params, state, x, y):
            if perturbation == "per_device":  # this device's own gradient, not reduced
                g = jax.grad(loss_fn)(jax.lax.pcast(params, "d", to="varying"), x, y)
            else:  # shard_map's autodiff sums it over devices: fine for the global direction
                g = jax.grad(loss_fn)(params, x, y)
            updates, state = tx.update(g, state, params,
                                       grad_fn=lambda p: jax.grad(loss_fn)(p, x, y))
            return optax.apply_updates(params, updates), state

        step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("d"), P("d")),
                                     out_specs=(P(), P())))
        new_params, new_state = step(params, state, x, y)
        return params, find_sdp_state(state).masks, new_params, find_sdp_state(new_state)

    def point(params, g, m):
        gm = jax.tree.map(lambda a, b: jnp.where(b, a, 0.0), g, m)
        norm = jnp.sqrt(sum(jnp.sum(a * a) for a in jax.tree.leaves(gm)))
        return jax.tree.map(lambda w, a: w + rho * a / norm, params, gm)

    def close(a, b):
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-4, atol=1e-6), a, b)

    params, m, got, state = sharded_step("global")
    g = grad(params, x, y)  # equal shards: the mean of the 8 local means
    g_sam = grad(point(params, g, m), x, y)
    want = jax.tree.map(lambda w, a, b: jnp.where(b, w - lr * a, 0.0), params, g_sam, m)
    close(got, want)
    close(state.grad_ema, jax.tree.map(lambda e, a: 0.1 * a if e.ndim else e,
                                       state.grad_ema, g_sam))
    print("global ok")
    global_result = got

    params, m, got, _ = sharded_step("per_device")
    xs, ys = x.reshape(8, 8, -1), y.reshape(8, 8)
    g_sams = [grad(point(params, grad(params, xi, yi), m), xi, yi) for xi, yi in zip(xs, ys)]
    g_sam = jax.tree.map(lambda *a: sum(a) / 8, *g_sams)
    want = jax.tree.map(lambda w, a, b: jnp.where(b, w - lr * a, 0.0), params, g_sam, m)
    close(got, want)
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(got), jax.tree.leaves(global_result)))
    assert gap > 1e-4, gap  # the two modes differ
    print("per_device ok", gap)

    # per_device with an already reduced incoming gradient: one clear error
    tx = keep_sparse(optax.chain(
        sdp_transform(0.5, rho, batch_axis_name="d", perturbation="per_device"), optax.sgd(lr)))
    params = init_params()

    def reduced(params, state, x, y):
        g = jax.grad(loss_fn)(params, x, y)
        return tx.update(g, state, params, grad_fn=lambda p: jax.grad(loss_fn)(p, x, y))[0]

    try:
        jax.jit(jax.shard_map(reduced, mesh=mesh, in_specs=(P(), P(), P("d"), P("d")),
                              out_specs=P()))(params, tx.init(params), x, y)
        raise AssertionError("no error")
    except ValueError as err:
        assert "already reduced" in str(err), err
    print("reduced per_device error ok")

    # ---- sharded params keep their sharding (explicit and auto axes, 4 devices)
    for kind in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((4,), ("x",), axis_types=(kind,), devices=jax.devices()[:4])
        spec = {name: {"kernel": P(None, "x"), "bias": P("x")} for name in LAYERS[:-1]}
        spec["classifier"] = {"kernel": P(), "bias": P()}  # 3 classes: not divisible by 4
        params = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)),
                              init_params(), spec)
        tx = keep_sparse(optax.chain(sdp_transform(0.5, 0.05, mask_update_every_steps=1),
                                     optax.adamw(1e-2)))
        state0 = jax.jit(tx.init)(params)
        xb, yb = make_data(8)
        targets = jax.nn.one_hot(yb, 3)

        def mse(params):  # no integer-label gather: explicit sharding types stay unambiguous
            return jnp.mean((apply_mlp(params, xb) - targets) ** 2)

        @jax.jit
        def step(params, state):
            updates, state = tx.update(jax.grad(mse)(params), state, params,
                                       grad_fn=jax.grad(mse))
            return optax.apply_updates(params, updates), state, updates

        new_params, state, updates = step(*step(params, state0)[:2])
        def spec(a):  # P() == P(None,): trailing Nones dropped
            parts = list(a.sharding.spec)
            while parts and parts[-1] is None:
                parts.pop()
            return tuple(parts)

        for before, after, u in zip(*(jax.tree.leaves(t) for t in (params, new_params, updates))):
            assert after.sharding.device_set == before.sharding.device_set
            if kind == AxisType.Explicit or spec(before):  # auto: the compiler places the rest
                assert spec(after) == spec(before) == spec(u), (spec(before), spec(after))
        hidden_mask = find_sdp_state(state).masks["hidden"]["kernel"]
        assert spec(hidden_mask) == spec(params["hidden"]["kernel"]) == (None, "x")
        assert int(find_sdp_state(state).count) == 2
        if kind == AxisType.Explicit:
            assert jax.tree.map(jax.typeof, state) == jax.tree.map(jax.typeof, state0)
        print("sharding ok", kind)
    print("ALL OK")
""")


def test_eight_devices_batch_axis_name_and_sharding():
    env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "ALL OK" in proc.stdout, proc.stdout
