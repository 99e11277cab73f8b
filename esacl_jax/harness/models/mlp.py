"""The MLP of the MNIST-family protocols (784-100-100-10, ReLU) with configurable widths."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Kernel initialisers by config name (`config.mlp_init`); biases start at zero in both.
KERNEL_INITS = {
    # The reference protocol's (mammoth's MNIST MLP: torch's xavier_uniform_, gain 1).
    "xavier_uniform": nn.initializers.xavier_uniform(),
    # flax's Dense default.
    "lecun_normal": nn.initializers.lecun_normal(),
}


class MLP(nn.Module):
    """Flattens its input, then Dense layers named stem, hidden_1.., classifier.

    The names matter: the harness's pruning filter (`masks.name_prunable`) excludes the first
    layer ("stem") and the classifier, as METHOD.md's prunable set does.
    """

    num_classes: int
    widths: Sequence[int] = (100, 100)
    dtype: jnp.dtype = jnp.float32
    init_name: str = "xavier_uniform"  # a key of KERNEL_INITS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or normalisation
        if self.init_name not in KERNEL_INITS:
            raise ValueError(f"unknown mlp_init {self.init_name!r}; choose one of "
                             f"{', '.join(KERNEL_INITS)}")
        kernel_init = KERNEL_INITS[self.init_name]
        x = x.reshape((x.shape[0], -1)).astype(self.dtype)
        for i, width in enumerate(self.widths):
            name = "stem" if i == 0 else f"hidden_{i}"
            x = nn.relu(nn.Dense(width, dtype=self.dtype, kernel_init=kernel_init, name=name)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=kernel_init,
                        name="classifier")(x)
