"""ResNet-18, CIFAR variant (3x3 stride-1 stem, no max-pool), as used by DER, SparCL and EsaCL.

Parameter names are part of the contract with the pruning filter: the 16 3x3 convolutions inside
the residual blocks live under ``block{stage}_{idx}/conv{1,2}/kernel``; the stem, the 1x1
projection shortcuts and the classifier carry "stem", "shortcut" and "classifier" in their paths
so the default prunable filter can exclude them (SparCL's profile).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch BatchNorm2d(momentum=0.1) keeps 0.9 of the old running statistics per update.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        name=name,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity or 1x1-projection shortcut."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = lambda f, k, s, name: nn.Conv(  # noqa: E731
            f, (k, k), strides=(s, s), padding=((k // 2, k // 2),) * 2, use_bias=False,
            dtype=self.dtype, name=name,
        )
        out = conv(self.features, 3, self.strides, "conv1")(x)
        out = nn.relu(_batch_norm(train, self.dtype, "bn1")(out))
        out = conv(self.features, 3, 1, "conv2")(out)
        out = _batch_norm(train, self.dtype, "bn2")(out)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, 1, self.strides, "shortcut_conv")(x)
            shortcut = _batch_norm(train, self.dtype, "shortcut_bn")(shortcut)
        return nn.relu(out + shortcut)


class ResNet18(nn.Module):
    """CIFAR ResNet-18: stem conv3x3 (stride 1) + BN, 4 stages x 2 BasicBlocks, GAP, Dense.

    With ``nf=64`` and 10 classes it has 11,173,962 parameters, the same as the PyTorch model
    of DER/mammoth and SparCL. ``dtype`` is the computation dtype; parameters stay float32.
    Inputs are NHWC float images (already normalised).
    """

    num_classes: int
    nf: int = 64
    dtype: Any = jnp.float32
    stage_sizes: Sequence[int] = (2, 2, 2, 2)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = jnp.asarray(x, self.dtype)
        x = nn.Conv(
            self.nf, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), use_bias=False,
            dtype=self.dtype, name="stem_conv",
        )(x)
        x = nn.relu(_batch_norm(train, self.dtype, "stem_bn")(x))
        for stage, num_blocks in enumerate(self.stage_sizes, start=1):
            features = self.nf * 2 ** (stage - 1)
            for idx in range(num_blocks):
                strides = 2 if (stage > 1 and idx == 0) else 1
                x = BasicBlock(features, strides, self.dtype, name=f"block{stage}_{idx}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
        return jnp.asarray(x, jnp.float32)
