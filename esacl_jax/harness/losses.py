"""Per-example losses shared by every method."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

_MASKED_LOGIT = -1e9


def mask_logits(logits: jax.Array, class_mask: jax.Array) -> jax.Array:
    """Pushes the logits of classes outside `class_mask` ([num_classes] bool) out of the softmax."""
    return jnp.where(class_mask, logits, jnp.asarray(_MASKED_LOGIT, logits.dtype))


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  class_mask: jax.Array | None = None) -> jax.Array:
    """Per-example cross-entropy in float32, optionally restricted to `class_mask`."""
    logits = logits.astype(jnp.float32)
    if class_mask is not None:
        logits = mask_logits(logits, class_mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def correct(logits: jax.Array, labels: jax.Array, class_mask: jax.Array | None = None) -> jax.Array:
    """Per-example argmax correctness (bool), optionally restricted to `class_mask`."""
    if class_mask is not None:
        logits = mask_logits(logits.astype(jnp.float32), class_mask)
    return jnp.argmax(logits, axis=-1) == labels
