"""Training-time image augmentation on device, per example: pad-and-crop and horizontal flip.

Runs inside the jit-compiled train step on the uint8 NHWC batch (before `preprocess`), so the
host never materialises augmented copies.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

AUGMENTATIONS = ("none", "crop_flip")


@functools.partial(jax.jit, static_argnames=("pad",))
def random_crop_flip(key: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
    """Per-example random crop after zero padding by `pad` pixels, then a random horizontal flip.

    The CIFAR protocol augmentation (random crop 32 with 4-pixel padding + flip). Each example
    draws its own offset in [0, 2*pad] per axis and its own coin; output keeps shape and dtype.

    Args:
      key: a JAX PRNG key (typed, `jax.random.key`, preferred).
      images: (N, H, W, C) batch, any dtype (uint8 on the training path).
      pad: zero padding on each side before cropping back to (H, W).
    """
    n, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * pad + 1)

    def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    cropped = jax.vmap(crop)(padded, offsets)
    flip = jax.random.bernoulli(flip_key, 0.5, (n,))
    return jnp.where(flip[:, None, None, None], cropped[:, :, ::-1, :], cropped)


def augment_batch(key: jax.Array, x: jax.Array, mode: str) -> jax.Array:
    """Apply the benchmark's training augmentation `mode` ("none" or "crop_flip") to a batch.

    `mode` is a Python string, resolved at trace time; "none" returns `x` unchanged.
    """
    if mode == "none":
        return x
    if mode == "crop_flip":
        return random_crop_flip(key, x)
    raise ValueError(f"unknown augmentation {mode!r}; known: {', '.join(AUGMENTATIONS)}")
