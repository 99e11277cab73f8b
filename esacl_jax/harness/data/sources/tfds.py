"""tensorflow-datasets as a source: a reader of data a user has already prepared with tfds.

`try_tfds` reads prepared data with `tfds.data_source(..., download=False)`, which needs no
TensorFlow. It never downloads: missing datasets are downloaded by `sources.download` (pooch),
so TensorFlow is needed for no benchmark. Tiny-ImageNet is not in tfds. `try_tfds` looks up
`tfds_available` in this module at call time, so tests patch it here.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from esacl_jax.harness.data.base import DataError
from esacl_jax.harness.data.sources.common import (
    RawDataset,
    data_error,
    describe_exception,
    freeze,
)
from esacl_jax.harness.run_logger import quiet_absl

TFDS_NAMES = {
    "mnist": "mnist",
    "fashion_mnist": "fashion_mnist",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
}
TFDS_SHAPES = {
    "mnist": (28, 28, 1),
    "fashion_mnist": (28, 28, 1),
    "cifar10": (32, 32, 3),
    "cifar100": (32, 32, 3),
}
TFDS_NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}


def _installed(module: str) -> bool:
    """Whether a module can be imported, checked without importing it (tfds/TF are slow)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def tfds_available() -> bool:
    """Whether tensorflow-datasets is installed."""
    return _installed("tensorflow_datasets")


def _records_to_arrays(
    dataset: str, records: Sequence[Any], where: str
) -> tuple[np.ndarray, np.ndarray]:
    """A random-access tfds split (sequence of {'image','label'} dicts) -> uint8/int32 arrays."""
    n = len(records)
    if n == 0:
        raise data_error(f"{where}: the split is empty")
    getitems = getattr(records, "__getitems__", None)
    items = (
        list(getitems(list(range(n)))) if getitems is not None else [records[i] for i in range(n)]
    )
    images = np.stack([np.asarray(item["image"]) for item in items])
    labels = np.asarray([int(item["label"]) for item in items], dtype=np.int32)
    return _check_tfds_arrays(dataset, images, labels, where)


def _check_tfds_arrays(
    dataset: str, images: np.ndarray, labels: np.ndarray, where: str
) -> tuple[np.ndarray, np.ndarray]:
    shape = TFDS_SHAPES[dataset]
    if images.ndim == 3 and shape[-1] == 1:
        images = images[..., None]
    if images.dtype != np.uint8 or images.shape[1:] != shape:
        raise data_error(
            f"{where}: images are {images.dtype}{images.shape[1:]}, expected uint8{shape}"
        )
    if labels.shape != (images.shape[0],):
        raise data_error(f"{where}: {images.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= TFDS_NUM_CLASSES[dataset]):
        raise data_error(f"{where}: labels out of range [0, {TFDS_NUM_CLASSES[dataset]})")
    return np.ascontiguousarray(images), labels.astype(np.int32)


def _tfds_raw(
    dataset: str, load_split: Callable[[str], tuple[np.ndarray, np.ndarray]], source: str
) -> RawDataset:
    x_train, y_train = load_split("train")
    x_test, y_test = load_split("test")
    result = RawDataset(
        dataset, x_train, y_train, x_test, y_test, TFDS_NUM_CLASSES[dataset], source
    )
    freeze(result.x_train, result.y_train, result.x_test, result.y_test)
    return result


def _tfds_data_source(dataset: str, tfds_dir: str | None) -> RawDataset:
    """Already-prepared tfds data (array_record), read without TensorFlow; raises if absent."""
    import tensorflow_datasets as tfds  # slow, optional

    name = TFDS_NAMES[dataset]
    # tfds's absl warnings while probing for prepared data that is usually absent
    with quiet_absl(logging.ERROR):
        builder = tfds.builder(name, data_dir=tfds_dir)
        prepared = builder.is_prepared()
    if not prepared:
        raise FileNotFoundError(f"not prepared in {builder.data_dir}")
    where = f"tfds:{name} ({builder.data_dir})"

    def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
        records = tfds.data_source(name, split=split, data_dir=tfds_dir, download=False)
        return _records_to_arrays(dataset, records, f"{where} {split}")

    return _tfds_raw(dataset, load_split, f"{where}, tfds-verified at preparation")


def try_tfds(dataset: str, root: pathlib.Path | None, tried: list[str]) -> RawDataset | None:
    """Source 2: data tfds has prepared in `root` or tfds's default dir (never a download).

    Returns None after noting in `tried` why each attempt failed; a DataError (data found but
    malformed) propagates.
    """
    name = TFDS_NAMES[dataset]
    if not tfds_available():
        tried.append("tfds (tensorflow-datasets not installed)")
        return None
    default_dir = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    dirs: list[tuple[str | None, str]] = []
    if root is not None:
        dirs.append((str(root), str(root)))
    dirs.append((None, default_dir))
    for tfds_dir, shown in dirs:
        try:
            return _tfds_data_source(dataset, tfds_dir)
        except DataError:
            raise
        except Exception as exc:  # every tfds failure means "not available"
            tried.append(f"tfds.data_source('{name}') in {shown} ({describe_exception(exc)})")
    return None
