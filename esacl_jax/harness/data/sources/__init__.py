"""Where the raw datasets come from: local files, tensorflow-datasets, scikit-learn.

Every loader returns a `RawDataset` of NHWC uint8 images and int32 global labels, or raises
`DataError` with a one-line message. Sources are tried in this documented order:

1. a local directory: the `data_dir` argument, else the `ESACL_DATA_DIR` environment variable.
   Accepted layouts (the dataset folder may also be given directly as the directory):
   - `<dir>/mnist/`, `<dir>/fashion_mnist/`: the four IDX files under their standard names,
     `.gz` or uncompressed (torchvision's `MNIST/raw`, `FashionMNIST/raw` also work);
   - `<dir>/cifar10/` or `<dir>`: `cifar-10-python.tar.gz` or the extracted
     `cifar-10-batches-py/`; likewise `cifar-100-python.tar.gz` / `cifar-100-python/`
     (fine labels) for CIFAR-100;
   - `<dir>/tiny-imagenet-200/`: the standard folder (wnids.txt, train/<wnid>/images/*.JPEG,
     val/images + val/val_annotations.txt; val is the test split).
2. tensorflow-datasets: `tfds.data_source(..., download=False)` for already-prepared data
   (works without TensorFlow); only if that fails, TensorFlow is importable and the network
   answers within a few seconds, `tfds.load(..., download=True)`.
3. scikit-learn's bundled 8x8 digits (no download) for `digits`.

Nothing ever falls back to other or synthetic data. Found-but-broken files (truncated gzip,
bad magic, wrong size, checksum mismatch) raise `DataError` at once instead of being skipped.

Verification: decoded-content checksums of the official files (`verify_checksums=True`);
structural checks (IDX magic and sizes, image/label counts, label range, pickle keys, image
sizes) always run. Tiny-ImageNet has no content checksum, so with verification on its official
counts (200 classes, 500 train images each, 10000 val images) are enforced instead; with it
off only consistency is checked (every class has train images, every val image exists and is
annotated with a known class), so that tests can use a miniature folder.

One module per source: `idx` (MNIST, Fashion-MNIST), `cifar`, `tiny_imagenet`, `tfds`,
`digits`; `common` holds `RawDataset` and the shared helpers. The names below are re-exported
for convenience; a test that patches a function must patch it in the module that calls it
(e.g. `sources.tfds.network_available`), not here.
"""

from __future__ import annotations

import os

from esacl_jax.harness.data.base import DataError
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
from esacl_jax.harness.data.sources.idx import (
    FASHION_MNIST_MD5,
    IDX_FILES,
    MNIST_MD5,
    MNIST_SHA256,
    find_idx_local,
    parse_idx,
)
from esacl_jax.harness.data.sources.tfds import (
    NETWORK_PROBE_TIMEOUT_S,
    TFDS_NAMES,
    TFDS_NUM_CLASSES,
    TFDS_SHAPES,
    network_available,
    tensorflow_available,
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
    "ENV_VAR",
    "FASHION_MNIST_MD5",
    "IDX_FILES",
    "MNIST_MD5",
    "MNIST_SHA256",
    "NETWORK_PROBE_TIMEOUT_S",
    "TFDS_NAMES",
    "TFDS_NUM_CLASSES",
    "TFDS_SHAPES",
    "TINY_FOLDER",
    "TINY_OFFICIAL",
    "DataError",
    "RawDataset",
    "load_dataset",
    "load_digits",
    "local_root",
    "network_available",
    "parse_idx",
    "tensorflow_available",
    "tfds_available",
]

_FIX = {
    "mnist": "put the four MNIST IDX files (train-images-idx3-ubyte.gz, ...) in "
    "$ESACL_DATA_DIR/mnist or pass --config.data_dir=DIR holding mnist/",
    "fashion_mnist": "put the four Fashion-MNIST IDX files in $ESACL_DATA_DIR/fashion_mnist "
    "or pass --config.data_dir=DIR holding fashion_mnist/",
    "cifar10": "put cifar-10-python.tar.gz (or the extracted cifar-10-batches-py/) in "
    "$ESACL_DATA_DIR/cifar10 or pass --config.data_dir=DIR",
    "cifar100": "put cifar-100-python.tar.gz (or the extracted cifar-100-python/) in "
    "$ESACL_DATA_DIR/cifar100 or pass --config.data_dir=DIR",
    "tiny_imagenet": "extract tiny-imagenet-200.zip into $ESACL_DATA_DIR (giving "
    "$ESACL_DATA_DIR/tiny-imagenet-200/) or pass --config.data_dir=DIR",
}


def load_dataset(
    dataset: str, data_dir: str | os.PathLike[str] | None = None, *, verify_checksums: bool = True
) -> RawDataset:
    """Find and decode a dataset from the documented sources, in order; DataError if none works.

    Args:
      dataset: one of `DATASETS`.
      data_dir: local directory to search; None means $ESACL_DATA_DIR.
      verify_checksums: compare decoded content with the official checksums (structural checks
        always run).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    if dataset == "digits":
        return load_digits()
    root, origin = local_root(data_dir)
    tried: list[str] = []
    if root is None:
        tried.append(f"local directory (none: data_dir not given and ${ENV_VAR} unset)")
    elif not root.is_dir():
        tried.append(f"{root} (from {origin}: not a directory)")
    else:
        if dataset in ("mnist", "fashion_mnist"):
            found = find_idx_local(dataset, root, verify_checksums, tried)
        elif dataset in ("cifar10", "cifar100"):
            found = find_cifar_local(dataset, root, verify_checksums, tried)
        else:
            found = find_tiny_imagenet_local(root, verify_checksums, tried)
        if found is not None:
            return found
    if dataset in TFDS_NAMES:
        found = try_tfds(dataset, root if root is not None and root.is_dir() else None, tried)
        if found is not None:
            return found
    else:
        tried.append("tfds (no Tiny-ImageNet in tfds: local directory only)")
    raise data_error(
        f"{PRETTY[dataset]} not found. Tried: {'; '.join(tried)}. Fix: {_FIX[dataset]}."
    )
