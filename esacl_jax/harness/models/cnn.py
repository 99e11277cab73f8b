"""A small convolutional network for the MNIST-family benchmarks (fast on CPU)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class SmallCNN(nn.Module):
    """conv3x3 "stem_conv" -> relu -> maxpool2 -> conv3x3 "conv1" -> relu -> maxpool2 ->
    flatten -> Dense "hidden" -> relu -> Dense "classifier".

    Flattened inputs ``[B, D]`` (the MNIST-family layout) are reshaped to ``image_shape``, or to
    a square single-channel image when ``image_shape`` is None. ``train`` is unused (no
    BatchNorm/dropout) but kept so every model shares the ``(x, train)`` call signature.
    """

    num_classes: int
    features: Sequence[int] = (32, 64)
    dense: int = 128
    image_shape: Sequence[int] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        x = jnp.asarray(x, jnp.float32)
        if x.ndim == 2:
            shape = self.image_shape
            if shape is None:
                side = math.isqrt(x.shape[-1])
                if side * side != x.shape[-1]:
                    raise ValueError(f"cannot infer a square image from {x.shape[-1]} features")
                shape = (side, side, 1)
            x = x.reshape((x.shape[0], *shape))
        x = nn.Conv(self.features[0], (3, 3), padding="SAME", name="stem_conv")(x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = nn.Conv(self.features[1], (3, 3), padding="SAME", name="conv1")(x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.dense, name="hidden")(x))
        return nn.Dense(self.num_classes, name="classifier")(x)
