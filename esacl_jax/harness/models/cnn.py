"""A small convolutional network for the MNIST-family benchmarks (fast on CPU)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def patch_conv(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None,
               rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
               precision=None, preferred_element_type=None) -> jax.Array:
    """`lax.conv_general_dilated` computed as im2col + one matmul for the plain case (NHWC/HWIO,
    stride 1, no dilation, one group, explicit padding); anything else goes to lax.

    Same function, another lowering: XLA:CPU runs the weight-gradient convolution of a small
    3x3 conv through a slow generic loop (about 0.7 GFLOP/s here for the (32, 64) SmallCNN),
    while the patches' slices, pads and the matmuls of this form and of its gradient run at
    GEMM speed. The sums are the same products in another order, so results agree to float
    rounding, not bit for bit, with the lax convolution.
    """
    ones = lambda d: d is None or all(int(v) == 1 for v in d)  # noqa: E731
    plain = (lhs.ndim == 4 and rhs.ndim == 4 and ones(window_strides) and ones(lhs_dilation)
             and ones(rhs_dilation) and feature_group_count == 1
             and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    if plain and isinstance(padding, str):
        padding = (lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
                   if padding in ("SAME", "VALID") else None)
        plain = padding is not None
    if not plain:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision,
            preferred_element_type=preferred_element_type)
    kh, kw, cin, cout = rhs.shape
    (top, bottom), (left, right) = padding
    x = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    h = x.shape[1] - kh + 1
    w = x.shape[2] - kw + 1
    # Patch feature order (i, j, c) matches the HWIO kernel flattened row-major.
    patches = jnp.concatenate([x[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)],
                              axis=-1)
    out = jnp.dot(patches.reshape(-1, kh * kw * cin), rhs.reshape(kh * kw * cin, cout),
                  precision=precision, preferred_element_type=preferred_element_type)
    return out.reshape(lhs.shape[0], h, w, cout)


class SmallCNN(nn.Module):
    """conv3x3 "stem_conv" -> relu -> maxpool2 -> conv3x3 "conv1" -> relu -> maxpool2 ->
    flatten -> Dense "hidden" -> relu -> Dense "classifier".

    Flattened inputs ``[B, D]`` (the MNIST-family layout) are reshaped to ``image_shape``, or to
    a square single-channel image when ``image_shape`` is None. ``train`` is unused (no
    BatchNorm/dropout) but kept so every model shares the ``(x, train)`` call signature.

    The convolutions are flax ``nn.Conv`` layers (same parameters, FLOPs and activation
    accounting) computed by `patch_conv` when ``im2col`` is True (the default; fast on CPU),
    else by XLA's convolution. The harness builds it from config.resnet_nf as
    ``features=(nf // 2, nf), dense=2 * nf`` (nf=64: the defaults below).
    """

    num_classes: int
    features: Sequence[int] = (32, 64)
    dense: int = 128
    image_shape: Sequence[int] | None = None
    im2col: bool = True

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
        conv = dict(conv_general_dilated=patch_conv) if self.im2col else {}
        x = nn.Conv(self.features[0], (3, 3), padding="SAME", name="stem_conv", **conv)(x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = nn.Conv(self.features[1], (3, 3), padding="SAME", name="conv1", **conv)(x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.dense, name="hidden")(x))
        return nn.Dense(self.num_classes, name="classifier")(x)
