"""scikit-learn's bundled 8x8 digits: no files and no download needed."""

from __future__ import annotations

import functools

import numpy as np

from esacl_jax.harness.data.sources.common import RawDataset, freeze


@functools.lru_cache(maxsize=1)
def load_digits() -> RawDataset:
    """scikit-learn's bundled 8x8 digits (no download), stratified 75/25 split, fixed seed.

    Pixel values 0..16 are rescaled to uint8 by round(x * 255 / 16).
    """
    from sklearn.datasets import load_digits as sk_load_digits  # slow import
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels
    )
    result = RawDataset(
        name="digits",
        x_train=np.ascontiguousarray(x_train),
        y_train=np.ascontiguousarray(y_train),
        x_test=np.ascontiguousarray(x_test),
        y_test=np.ascontiguousarray(y_test),
        num_classes=10,
        source="sklearn.datasets.load_digits (stratified 75/25 split, random_state=0)",
    )
    freeze(result.x_train, result.y_train, result.x_test, result.y_test)
    return result

