"""The MLP of the MNIST-family protocols (784-100-100-10, ReLU) with configurable widths."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    """Flattens its input, then Dense layers named stem, hidden_1.., classifier.

    The names matter: the default pruning filter excludes the first layer ("stem") and the
    classifier, as METHOD.md's prunable set does.
    """

    num_classes: int
    widths: Sequence[int] = (100, 100)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or normalisation
        x = x.reshape((x.shape[0], -1)).astype(self.dtype)
        for i, width in enumerate(self.widths):
            name = "stem" if i == 0 else f"hidden_{i}"
            x = nn.relu(nn.Dense(width, dtype=self.dtype, name=name)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
