"""Tests of esacl_jax.sharpness: masked SAM perturbation and per-example sharpness."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esacl_jax import sharpness


def _tree(seed: int, dtype=jnp.float32) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "dense": {"kernel": jax.random.normal(k1, (6, 5)).astype(dtype)},
        "bias": jax.random.normal(k2, (5,)).astype(dtype),
    }


def _masks() -> dict:
    kernel = np.zeros((6, 5), bool)
    kernel[::2] = True
    return {"dense": {"kernel": jnp.asarray(kernel)}, "bias": jnp.ones((), bool)}


def test_masked_global_norm():
    g, m = _tree(0), _masks()
    want = np.sqrt(
        np.sum(np.where(m["dense"]["kernel"], g["dense"]["kernel"], 0.0) ** 2)
        + np.sum(np.asarray(g["bias"]) ** 2)
    )
    np.testing.assert_allclose(jax.jit(sharpness.masked_global_norm)(g, m), want, rtol=1e-6)


@pytest.mark.parametrize("rho", [0.05, 1.0])
def test_perturbation_norm_and_support(rho):
    g, m = _tree(1), _masks()
    eps = jax.jit(sharpness.sam_perturbation)(g, m, rho)
    np.testing.assert_allclose(sharpness.masked_global_norm(eps, m), rho, rtol=1e-6)
    pruned = ~np.asarray(m["dense"]["kernel"])
    assert np.all(np.asarray(eps["dense"]["kernel"])[pruned] == 0.0)
    # Direction: the masked gradient.
    scale = rho / sharpness.masked_global_norm(g, m)
    np.testing.assert_allclose(eps["bias"], g["bias"] * scale, rtol=1e-6)


def test_zero_gradient_gives_zero_eps():
    g = jax.tree.map(jnp.zeros_like, _tree(0))
    eps = jax.jit(sharpness.sam_perturbation)(g, _masks(), 0.05)
    for e in jax.tree.leaves(eps):
        assert np.all(np.asarray(e) == 0.0)
    # Gradient nonzero only on pruned coordinates: still zero, not NaN.
    g2 = {
        "dense": {"kernel": jnp.where(_masks()["dense"]["kernel"], 0.0, 1.0)},
        "bias": jnp.zeros((5,)),
    }
    eps2 = sharpness.sam_perturbation(g2, _masks(), 0.05)
    assert all(np.all(np.asarray(e) == 0.0) for e in jax.tree.leaves(eps2))


def test_perturbation_dtype_bf16():
    g = _tree(2, jnp.bfloat16)
    eps = sharpness.sam_perturbation(g, _masks(), jnp.float32(0.05))
    assert all(e.dtype == jnp.bfloat16 for e in jax.tree.leaves(eps))
    perturbed = sharpness.add_perturbation(g, eps)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(perturbed))
    # In float32: eps and w + eps exact to float32, so the small steps are not rounded away.
    eps32 = sharpness.sam_perturbation(g, _masks(), 0.05, dtype=jnp.float32)
    assert all(e.dtype == jnp.float32 for e in jax.tree.leaves(eps32))
    point = sharpness.add_perturbation(g, eps32, dtype=jnp.float32)
    for w, e, q in zip(*(jax.tree.leaves(t) for t in (g, eps32, point)), strict=True):
        assert q.dtype == jnp.float32
        np.testing.assert_array_equal(q, np.asarray(w, np.float32) + np.asarray(e))
    f32 = _tree(2)
    assert all(q.dtype == jnp.float32 for q in
               jax.tree.leaves(sharpness.add_perturbation(f32, eps32, dtype=jnp.float32)))


def test_per_example_sharpness():
    params = {"w": jnp.array([1.0, -1.0]), "b": jnp.array(0.5)}
    x = jnp.array([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]])
    y = jnp.array([1.0, 0.0, 2.0])

    def per_example_loss(p, x, y):
        return (x @ p["w"] + p["b"] - y) ** 2

    eps = {"w": jnp.array([0.1, 0.0]), "b": jnp.array(-0.2)}
    fn = jax.jit(lambda p, e: sharpness.per_example_sharpness(per_example_loss, p, e, x, y))
    a, perturbed = fn(params, eps)
    shifted = {"w": params["w"] + eps["w"], "b": params["b"] + eps["b"]}
    np.testing.assert_allclose(perturbed, per_example_loss(shifted, x, y), rtol=1e-6)
    np.testing.assert_allclose(
        a, per_example_loss(shifted, x, y) - per_example_loss(params, x, y), rtol=1e-6
    )
    clean = per_example_loss(params, x, y)
    a2, _ = sharpness.per_example_sharpness(per_example_loss, params, eps, x, y, clean_losses=clean)
    np.testing.assert_allclose(a2, a, rtol=1e-6)
    assert a.dtype == jnp.float32
