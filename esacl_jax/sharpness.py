"""Sharpness-aware pieces as pure functions: the masked SAM perturbation and per-example sharpness.

The perturbation lives on the active (unpruned) coordinates only: the adversarial point w + eps
stays inside the sparse subspace, so the sharpness we minimise is the sharpness of the sparse model
(and eps is exactly zero where the mask is False).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def masked_global_norm(tree: PyTree, masks: PyTree) -> jax.Array:
    """L2 norm (float32) of `tree` over the coordinates where `masks` is True.

    `masks` is a tree like `tree` whose leaves broadcast against it (scalar `True` for unmasked
    leaves, the `magnitude_masks` convention).

    Args:
      tree: a tree of arrays.
      masks: a tree like `tree` of masks that broadcast against its leaves.

    Returns:
      A float32 scalar.
    """
    # where(m, x**2, 0) rather than where(m, x, 0)**2: not the masked gradient the SAM step
    # computes next, so XLA fuses each expression into its own consumer instead of materialising
    # one shared masked copy of the gradient for both. A Python bool mask folds away.
    def one(x: jax.Array, m: Any) -> jax.Array:
        return jnp.sum(jnp.where(m, jnp.square(jnp.asarray(x, jnp.float32)), 0.0))

    sq = jax.tree.map(one, tree, masks)
    return jnp.sqrt(sum(jax.tree.leaves(sq), jnp.zeros((), jnp.float32)))


def sam_perturbation(grads: PyTree, masks: PyTree, rho: Any, dtype: Any = None) -> PyTree:
    """SAM ascent step on the active coordinates: eps = rho * (g * m) / ||g * m||.

    Exactly zero on pruned coordinates; all zeros (never NaN) when the masked gradient is zero.
    Math in float32; result in `dtype`, by default each gradient leaf's dtype (the param dtype
    under `jax.grad`).

    Args:
      grads: the ascent direction g (a tree like the params).
      masks: a mask tree like `grads`.
      rho: the radius.
      dtype: the result's dtype (None: each gradient leaf's).

    Returns:
      eps, a tree like `grads`.
    """
    norm = masked_global_norm(grads, masks)
    positive = norm > 0
    scale = jnp.where(positive, jnp.asarray(rho, jnp.float32) / jnp.where(positive, norm, 1.0), 0.0)

    def one(g: jax.Array, m: jax.Array) -> jax.Array:
        g32 = jnp.where(m, jnp.asarray(g, jnp.float32), 0.0)
        return (g32 * scale).astype(jnp.result_type(g) if dtype is None else dtype)

    return jax.tree.map(one, grads, masks)


def _is_low_precision(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < 4


def add_perturbation(params: PyTree, eps: PyTree, dtype: Any = None) -> PyTree:
    """w + eps, by default each leaf kept in the param's dtype.

    With `dtype` (e.g. `jnp.float32`), low-precision floating leaves (bf16, f16) are computed and
    returned in `dtype` instead: in bf16 a SAM step of radius 0.05 spread over many weights is
    far below half an ulp of most weights, so w + eps rounds back to w and SAM does nothing.
    Leaves of 32 bits or more keep their dtype.

    Args:
      params: w.
      eps: a tree like `params`.
      dtype: the dtype of low-precision leaves' sums (None: the param's).

    Returns:
      w + eps, a tree like `params`.
    """

    def one(w: jax.Array, e: jax.Array) -> jax.Array:
        out = jnp.result_type(w)
        if dtype is not None and _is_low_precision(out):
            out = dtype
        return jnp.asarray(w, out) + jnp.asarray(e, out)

    return jax.tree.map(one, params, eps)


def per_example_sharpness(
    per_example_loss_fn: Callable[..., jax.Array],
    params: PyTree,
    eps: PyTree,
    *args: Any,
    clean_losses: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-example sharpness a_i = l_i(w + eps) - l_i(w) (float32) and the perturbed losses.

    `per_example_loss_fn(params, *args)` returns a vector of per-example losses. Pass the clean
    losses the training step already computed as `clean_losses` to save a forward pass.

    Args:
      per_example_loss_fn: `(params, *args) -> float[n]` per-example losses.
      params: w.
      eps: the perturbation, a tree like `params`.
      *args: the loss function's other arguments (e.g. the batch).
      clean_losses: l_i(w), when the caller has it.

    Returns:
      `(sharpness, perturbed_losses)`, two float32[n] arrays.
    """
    perturbed = jnp.asarray(per_example_loss_fn(add_perturbation(params, eps), *args), jnp.float32)
    if clean_losses is None:
        clean_losses = per_example_loss_fn(params, *args)
    return perturbed - jnp.asarray(clean_losses, jnp.float32), perturbed
