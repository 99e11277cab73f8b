"""Pieces shared by every dataset source: the result type, one-line errors, the local root.

Every loader returns a `RawDataset` of NHWC uint8 images and int32 global labels, or raises
`DataError` with a one-line message built by `data_error`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from collections.abc import Iterable

import numpy as np

from esacl_jax.harness.data.base import DataError

ENV_VAR = "ESACL_DATA_DIR"
DATASETS = ("mnist", "fashion_mnist", "digits", "cifar10", "cifar100", "tiny_imagenet")
# Display names used in error messages.
PRETTY = {
    "mnist": "MNIST",
    "fashion_mnist": "Fashion-MNIST",
    "digits": "scikit-learn digits",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "tiny_imagenet": "Tiny-ImageNet",
}


@dataclasses.dataclass(frozen=True)
class RawDataset:
    """A dataset's official train/test split as read-only host arrays.

    Attributes:
      name: dataset key, one of `DATASETS`.
      x_train, x_test: (N, H, W, C) uint8 images.
      y_train, y_test: (N,) int32 labels in [0, num_classes).
      num_classes: number of classes of the dataset.
      source: human-readable provenance (path and how it was verified, or "tfds:..."/"sklearn").
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def data_error(message: str) -> DataError:
    """A DataError whose message is guaranteed to be one line."""
    return DataError(one_line(message))


def freeze(*arrays: np.ndarray) -> None:
    """Cached arrays are shared between callers: make accidental in-place edits fail loudly."""
    for array in arrays:
        array.flags.writeable = False


def describe_exception(exc: BaseException) -> str:
    """A one-line description of `exc` for an error message, cut to 160 characters."""
    text = one_line(str(exc)) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def local_root(data_dir: str | os.PathLike[str] | None) -> tuple[pathlib.Path | None, str]:
    """The local directory to search (argument first, then $ESACL_DATA_DIR) and its origin."""
    if data_dir is not None and str(data_dir) != "":
        return pathlib.Path(data_dir).expanduser(), "data_dir"
    env = os.environ.get(ENV_VAR, "")
    if env:
        return pathlib.Path(env).expanduser(), f"${ENV_VAR}"
    return None, ""


def file_stamp(paths: Iterable[pathlib.Path]) -> tuple[tuple[int, int], ...]:
    """Sizes and mtimes of `paths`, for cache keys that change when a file is replaced."""
    stats = [p.stat() for p in paths]
    return tuple((s.st_size, s.st_mtime_ns) for s in stats)


def read_checked(path: pathlib.Path, md5: str | None, fix: str) -> bytes:
    """The file's bytes; a one-line DataError if unreadable or (md5 given) not the official file.

    `fix` is the remedy the mismatch message suggests.
    """
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise data_error(f"cannot read {path}: {describe_exception(exc)}") from exc
    if md5 is not None:
        digest = hashlib.md5(content).hexdigest()
        if digest != md5:
            raise data_error(
                f"{path}: checksum mismatch, md5 {digest} != official {md5}; {fix} (or pass "
                "verify_checksums=False for deliberately modified data)"
            )
    return content
