"""Training-time image augmentation on device, per example: pad-and-crop and horizontal flip
(the benchmarks' protocol), and the pieces of contrastive views (CO2L): random resized crop,
random flip, brightness/contrast jitter.

Runs inside the jit-compiled train step on the uint8 NHWC batch (before `preprocess`), so the
host never materialises augmented copies.
"""

from __future__ import annotations

import functools
import math

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


def _resize_matrix(start: jax.Array, length: jax.Array, size: int) -> jax.Array:
    """[n, size, size] bilinear-interpolation matrices resampling the window [start, start +
    length) of an axis of `size` pixels (per example) onto `size` output pixels: output pixel o
    reads input coordinate start + (o + 0.5) * length / size - 0.5 (pixel centres, as
    torchvision's resize with align_corners=False), clamped to the image."""
    o = jnp.arange(size, dtype=jnp.float32)
    coord = start[:, None] + (o[None, :] + 0.5) * (length[:, None] / size) - 0.5
    coord = jnp.clip(coord, 0.0, size - 1.0)
    lo = jnp.floor(coord)
    frac = (coord - lo)[..., None]
    lo = lo.astype(jnp.int32)
    hi = jnp.minimum(lo + 1, size - 1)
    return (jax.nn.one_hot(lo, size, dtype=jnp.float32) * (1.0 - frac)
            + jax.nn.one_hot(hi, size, dtype=jnp.float32) * frac)


def random_resized_crop(key: jax.Array, images: jax.Array, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> jax.Array:
    """torchvision's RandomResizedCrop back to the input size, per example, as float32.

    Each example draws an area fraction in `scale` and a log-uniform aspect ratio in `ratio`; the
    window (clipped to the image, no retries: torchvision retries up to 10 times, then crops the
    centre) is placed uniformly at a sub-pixel position and resampled bilinearly to (H, W) by two
    interpolation matrices (out = Ry @ image @ Rx^T), a few small matmuls per example.

    Args:
      key: a JAX PRNG key.
      images: (N, H, W, C) batch, any dtype; values keep their range (uint8 images: [0, 255]).
    """
    n, h, w, _ = images.shape
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    area = jax.random.uniform(k_area, (n,), minval=scale[0], maxval=scale[1]) * (h * w)
    log_ratio = jax.random.uniform(k_ratio, (n,), minval=math.log(ratio[0]),
                                   maxval=math.log(ratio[1]))
    r = jnp.exp(log_ratio)
    crop_w = jnp.minimum(jnp.sqrt(area * r), float(w))
    crop_h = jnp.minimum(jnp.sqrt(area / r), float(h))
    top = jax.random.uniform(k_top, (n,)) * (h - crop_h)
    left = jax.random.uniform(k_left, (n,)) * (w - crop_w)
    ry = _resize_matrix(top, crop_h, h)  # [n, H_out, H_in]
    rx = _resize_matrix(left, crop_w, w)  # [n, W_out, W_in]
    return jnp.einsum("nij,njkc,nlk->nilc", ry, images.astype(jnp.float32), rx)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Horizontal flip of each example with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def brightness_contrast(key: jax.Array, images: jax.Array, strength: float, p: float = 0.8,
                        max_value: float = 255.0) -> jax.Array:
    """torchvision's ColorJitter(brightness=strength, contrast=strength) under RandomApply(p),
    per example, on images in [0, max_value]: brightness multiplies by a factor in
    [1 - strength, 1 + strength], contrast blends with the image's mean intensity by another
    (brightness first; torchvision draws the order), each clipped to [0, max_value]. Saturation
    and hue, which grey images lack, are not applied."""
    n = images.shape[0]
    k_apply, k_b, k_c = jax.random.split(key, 3)
    shape = (n, 1, 1, 1)
    apply = jax.random.bernoulli(k_apply, p, shape)
    b = jax.random.uniform(k_b, shape, minval=1.0 - strength, maxval=1.0 + strength)
    c = jax.random.uniform(k_c, shape, minval=1.0 - strength, maxval=1.0 + strength)
    x = images.astype(jnp.float32)
    out = jnp.clip(x * b, 0.0, max_value)
    mean = jnp.mean(out, axis=(1, 2, 3), keepdims=True)
    out = jnp.clip(c * out + (1.0 - c) * mean, 0.0, max_value)
    return jnp.where(apply, out, x)
