"""Where the raw datasets come from: local files, tfds-prepared data, downloads, scikit-learn.

Every loader returns a `RawDataset` of NHWC uint8 images and int32 global labels, or raises
`DataError` with a one-line message. Sources are tried in this documented order:

1. a local directory, the "local root": the `data_dir` argument, else the `ESACL_DATA_DIR`
   environment variable, else the per-user download cache (`download.cache_dir()`,
   `~/.cache/esacl_jax` on Linux). Accepted layouts (the dataset folder may also be given
   directly as the directory):
   - `<dir>/mnist/`, `<dir>/fashion_mnist/`: the four IDX files under their standard names,
     `.gz` or uncompressed (torchvision's `MNIST/raw`, `FashionMNIST/raw` also work);
   - `<dir>/cifar10/` or `<dir>`: `cifar-10-python.tar.gz` or the extracted
     `cifar-10-batches-py/`; likewise `cifar-100-python.tar.gz` / `cifar-100-python/`
     (fine labels) for CIFAR-100;
   - `<dir>/tiny-imagenet-200/`: the standard folder (wnids.txt, train/<wnid>/images/*.JPEG,
     val/images + val/val_annotations.txt; val is the test split).
2. tensorflow-datasets: data a user has already prepared, read with
   `tfds.data_source(..., download=False)` (no TensorFlow needed). tfds never downloads.
3. a download into the local root (`download.download_dataset`): the official files from
   `$ESACL_DATA_MIRROR/<dataset>/<file>` if set, then the canonical hosts, with pooch, verified
   before they are moved into place; then source 1 reads them. Offline this is skipped within
   seconds; `ESACL_DATA_DOWNLOAD=0` turns it off.
4. scikit-learn's bundled 8x8 digits (no download) for `digits`.

Nothing ever falls back to other or synthetic data. Found-but-broken files (truncated gzip,
bad magic, wrong size, checksum mismatch) raise `DataError` at once instead of being skipped.

Verification: decoded-content checksums of the official files (`verify_checksums=True`);
structural checks (IDX magic and sizes, image/label counts, label range, pickle keys, image
sizes) always run. A Tiny-ImageNet folder has no content checksum (its download has the zip's
md5), so with verification on its official counts (200 classes, 500 train images each, 10000
val images) are enforced instead; with it off only consistency is checked (every class has
train images, every val image exists and is annotated with a known class), so that tests can
use a miniature folder.

One module per source: `idx` (MNIST, Fashion-MNIST), `cifar`, `tiny_imagenet`, `tfds`,
`download`, `digits`; `common` holds `RawDataset` and the shared helpers. The names below are
re-exported for convenience; a test that patches a function must patch it in the module that
calls it (e.g. `sources.download.download_dataset`), not here.
"""

from __future__ import annotations

import os
import pathlib

from esacl_jax.harness.data.base import DataError
from esacl_jax.harness.data.sources import download
from esacl_jax.harness.data.sources.cifar import (
    CIFAR_ARCHIVE_MD5,
    CIFAR_ARCHIVES,
    CIFAR_BATCHES,
    CIFAR_FOLDERS,
    CIFAR_LABEL_KEY,
    CIFAR_NUM_CLASSES,
    CIFAR_SUBDIRS,
    find_cifar_local,
)
from esacl_jax.harness.data.sources.common import (
    DATASETS,
    ENV_VAR,
    PRETTY,
    RawDataset,
    data_error,
    local_root,
)
from esacl_jax.harness.data.sources.digits import load_digits
from esacl_jax.harness.data.sources.download import DOWNLOAD_ENV, MIRROR_ENV, TIMEOUT_ENV
from esacl_jax.harness.data.sources.idx import (
    FASHION_MNIST_MD5,
    IDX_FILES,
    MNIST_MD5,
    MNIST_SHA256,
    find_idx_local,
    parse_idx,
)
from esacl_jax.harness.data.sources.tfds import (
    TFDS_NAMES,
    TFDS_NUM_CLASSES,
    TFDS_SHAPES,
    tfds_available,
    try_tfds,
)
from esacl_jax.harness.data.sources.tiny_imagenet import (
    TINY_FOLDER,
    TINY_OFFICIAL,
    find_tiny_imagenet_local,
)

__all__ = [
    "CIFAR_ARCHIVES",
    "CIFAR_ARCHIVE_MD5",
    "CIFAR_BATCHES",
    "CIFAR_FOLDERS",
    "CIFAR_LABEL_KEY",
    "CIFAR_NUM_CLASSES",
    "CIFAR_SUBDIRS",
    "DATASETS",
    "DOWNLOAD_ENV",
    "ENV_VAR",
    "FASHION_MNIST_MD5",
    "IDX_FILES",
    "MNIST_MD5",
    "MIRROR_ENV",
    "MNIST_SHA256",
    "TFDS_NAMES",
    "TFDS_NUM_CLASSES",
    "TFDS_SHAPES",
    "TIMEOUT_ENV",
    "TINY_FOLDER",
    "TINY_OFFICIAL",
    "DataError",
    "RawDataset",
    "download",
    "load_dataset",
    "load_digits",
    "local_root",
    "parse_idx",
    "tfds_available",
]

_FIX = {
    "mnist": "connect to the network (the files download themselves) or set "
    "$ESACL_DATA_MIRROR, or put the four MNIST IDX files (train-images-idx3-ubyte.gz, ...) in "
    "DIR/mnist and pass --config.data_dir=DIR (or set $ESACL_DATA_DIR=DIR)",
    "fashion_mnist": "connect to the network (the files download themselves) or set "
    "$ESACL_DATA_MIRROR, or put the four Fashion-MNIST IDX files in DIR/fashion_mnist and pass "
    "--config.data_dir=DIR (or set $ESACL_DATA_DIR=DIR)",
    "cifar10": "connect to the network (the archive downloads itself) or set "
    "$ESACL_DATA_MIRROR, or put cifar-10-python.tar.gz (or the extracted cifar-10-batches-py/) "
    "in DIR/cifar10 and pass --config.data_dir=DIR (or set $ESACL_DATA_DIR=DIR)",
    "cifar100": "connect to the network (the archive downloads itself) or set "
    "$ESACL_DATA_MIRROR, or put cifar-100-python.tar.gz (or the extracted cifar-100-python/) "
    "in DIR/cifar100 and pass --config.data_dir=DIR (or set $ESACL_DATA_DIR=DIR)",
    "tiny_imagenet": "connect to the network (the archive downloads itself) or set "
    "$ESACL_DATA_MIRROR, or extract tiny-imagenet-200.zip into DIR (giving "
    "DIR/tiny-imagenet-200/) and pass --config.data_dir=DIR (or set $ESACL_DATA_DIR=DIR)",
}


def _find_local(
    dataset: str, root: pathlib.Path, verify: bool, tried: list[str]
) -> RawDataset | None:
    if dataset in ("mnist", "fashion_mnist"):
        return find_idx_local(dataset, root, verify, tried)
    if dataset in ("cifar10", "cifar100"):
        return find_cifar_local(dataset, root, verify, tried)
    return find_tiny_imagenet_local(root, verify, tried)


def load_dataset(
    dataset: str, data_dir: str | os.PathLike[str] | None = None, *, verify_checksums: bool = True
) -> RawDataset:
    """Find, or download, and decode a dataset from the documented sources, in order.

    Args:
      dataset: one of `DATASETS`.
      data_dir: the local root to search and download into; None means $ESACL_DATA_DIR, else
        the per-user download cache.
      verify_checksums: compare decoded content (and downloads) with the official checksums
        (structural checks always run).

    Returns:
      The dataset's official train and test splits.

    Raises:
      DataError: one line, when no source has the dataset or a file found or downloaded is
        broken.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    if dataset == "digits":
        return load_digits()
    root, origin = local_root(data_dir)
    tried: list[str] = []
    if root is None:
        root = download.cache_dir()
        origin = f"the download cache (data_dir not given and ${ENV_VAR} unset)"
    if not root.is_dir():
        tried.append(f"{root} (from {origin}: not a directory)")
    else:
        found = _find_local(dataset, root, verify_checksums, tried)
        if found is not None:
            return found
    if dataset in TFDS_NAMES:
        found = try_tfds(dataset, root if root.is_dir() else None, tried)
        if found is not None:
            return found
    else:
        tried.append("tfds (no Tiny-ImageNet in tfds)")
    if download.download_dataset(dataset, root, verify_checksums, tried):
        found = _find_local(dataset, root, verify_checksums, tried)
        if found is not None:
            return found
    raise data_error(
        f"{PRETTY[dataset]} not found. Tried: {'; '.join(tried)}. Fix: {_FIX[dataset]}."
    )
