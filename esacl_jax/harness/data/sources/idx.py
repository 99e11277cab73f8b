"""MNIST and Fashion-MNIST from the four official IDX files, `.gz` or uncompressed.

Accepted folders under the local root: `mnist/`, `fashion_mnist/` (and torchvision's
`MNIST/raw`, `FashionMNIST/raw`, see `_IDX_SUBDIRS`), or the root itself. With verification on,
the decompressed content is compared with the official checksums; the IDX magic, sizes and label
range are always checked.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import pathlib
import zlib

import numpy as np

from esacl_jax.harness.data.sources.common import (
    PRETTY,
    RawDataset,
    data_error,
    describe_exception,
    file_stamp,
    freeze,
)

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Checksums of the DECOMPRESSED official IDX files: the gzip wrappers in circulation differ
# in their headers, the content does not.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
# Used only to make a mismatch message more helpful ("this is MNIST, not Fashion-MNIST").
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

_IDX_SUBDIRS = {
    "mnist": ("mnist", "MNIST/raw", "MNIST", "mnist/raw"),
    "fashion_mnist": (
        "fashion_mnist",
        "fashion-mnist",
        "FashionMNIST/raw",
        "FashionMNIST",
        "fashion_mnist/raw",
        "fashion",
    ),
}


def _idx_file(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    """The file for an IDX stem in a directory: uncompressed preferred (faster), else `.gz`."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_maybe_gzip(path: pathlib.Path) -> bytes:
    """File bytes, gunzipped when the name ends in .gz; corrupt archives -> DataError."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise data_error(f"cannot read {path}: {describe_exception(exc)}") from exc
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError as exc:
        raise data_error(
            f"{path} is truncated (gzip stream ends early, {len(raw)} bytes); "
            "download the file again"
        ) from exc
    except (OSError, zlib.error) as exc:
        raise data_error(
            f"{path} is not a valid gzip file ({describe_exception(exc)}); download it again"
        ) from exc


def parse_idx(data: bytes, path: pathlib.Path | str, ndim: int) -> np.ndarray:
    """Decode an IDX uint8 array (big-endian header), checking magic, rank and size."""
    magic = bytes([0, 0, 0x08, ndim])
    if data[:4] != magic:
        kind = "labels (1-d)" if ndim == 1 else f"images ({ndim}-d)"
        raise data_error(
            f"{path}: bad IDX magic {data[:4].hex() or '(empty file)'} (expected {magic.hex()}, "
            f"uint8 {kind}); the file is not the right IDX file, replace it with the official one"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise data_error(f"{path}: IDX header truncated ({len(data)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise data_error(
            f"{path}: wrong size {len(data)} bytes for IDX dims {dims} (expected {expected}); "
            "the file is truncated or corrupt, download it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _checksum_mismatch_hint(dataset: str, stem: str, content: bytes) -> str:
    other = {"mnist": ("Fashion-MNIST", FASHION_MNIST_MD5), "fashion_mnist": ("MNIST", MNIST_MD5)}
    name, table = other[dataset]
    if hashlib.md5(content).hexdigest() == table[stem]:
        return f" (this is the {name} file: point {PRETTY[dataset]} at its own folder)"
    return ""


def _verify_idx(dataset: str, stem: str, content: bytes, path: pathlib.Path) -> None:
    if dataset == "mnist":
        algo, table = "sha256", MNIST_SHA256
    else:
        algo, table = "md5", FASHION_MNIST_MD5
    digest = hashlib.new(algo, content).hexdigest()
    if digest != table[stem]:
        raise data_error(
            f"{path}: checksum mismatch, decompressed {algo} {digest} != official {table[stem]}"
            f"{_checksum_mismatch_hint(dataset, stem, content)}; replace it with the official "
            "file (or pass verify_checksums=False for deliberately modified data)"
        )


@functools.lru_cache(maxsize=8)
def _load_idx_dir(
    dataset: str, directory: str, verify: bool, _stamp: tuple[tuple[int, int], ...]
) -> RawDataset:
    """Decode (and verify) the four IDX files of a folder; cached per process.

    `_stamp` (sizes and mtimes) is part of the cache key so replaced files are re-read.
    """
    folder = pathlib.Path(directory)
    arrays: dict[str, np.ndarray] = {}
    for key, stem in IDX_FILES.items():
        path = _idx_file(folder, stem)
        assert path is not None  # checked by the caller
        content = _read_maybe_gzip(path)
        if verify:
            _verify_idx(dataset, stem, content, path)
        arrays[key] = parse_idx(content, path, ndim=3 if key.endswith("images") else 1)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        img_path = _idx_file(folder, IDX_FILES[f"{split}_images"])
        if images.shape[1:] != (28, 28):
            raise data_error(f"{img_path}: images are {images.shape[1:]}, expected 28x28")
        if images.shape[0] != labels.shape[0]:
            raise data_error(
                f"{folder}: {split} has {images.shape[0]} images but {labels.shape[0]} labels; "
                "the files do not belong together, replace them with the official ones"
            )
        if images.shape[0] == 0:
            raise data_error(f"{img_path}: holds no images")
        if labels.size and int(labels.max()) >= 10:
            raise data_error(
                f"{_idx_file(folder, IDX_FILES[f'{split}_labels'])}: label {int(labels.max())} "
                "out of range [0, 10)"
            )
    how = "checksums verified" if verify else "checksums not verified"
    result = RawDataset(
        name=dataset,
        x_train=arrays["train_images"][..., None],
        y_train=arrays["train_labels"].astype(np.int32),
        x_test=arrays["test_images"][..., None],
        y_test=arrays["test_labels"].astype(np.int32),
        num_classes=10,
        source=f"{folder} (IDX, {how})",
    )
    freeze(result.x_train, result.y_train, result.x_test, result.y_test)
    return result


def find_idx_local(
    dataset: str, root: pathlib.Path, verify: bool, tried: list[str]
) -> RawDataset | None:
    """The IDX dataset under `root`, or None after noting in `tried` where it looked.

    Raises DataError for a folder that holds some but not all four files, or a broken file.
    """
    candidates = [root / sub for sub in _IDX_SUBDIRS[dataset]]
    # The folder itself, unless its name says it is Fashion-MNIST (both use the same file names).
    if dataset == "fashion_mnist" or "fashion" not in root.name.lower():
        candidates.append(root)
    for folder in candidates:
        if not folder.is_dir():
            continue
        found = {stem: _idx_file(folder, stem) for stem in IDX_FILES.values()}
        missing = [stem for stem, path in found.items() if path is None]
        if not missing:
            paths = [p for p in found.values() if p is not None]
            return _load_idx_dir(dataset, str(folder.resolve()), verify, file_stamp(paths))
        if folder != root and len(missing) < len(IDX_FILES):
            raise data_error(
                f"{folder} is incomplete: missing {', '.join(m + '[.gz]' for m in missing)}; "
                f"copy all four {PRETTY[dataset]} IDX files there"
            )
    subdirs = ",".join(_IDX_SUBDIRS[dataset])
    if root not in candidates:
        tried.append(
            f"{root}/{{{subdirs}}} (no IDX files; {root} itself skipped: its name says "
            "Fashion-MNIST)"
        )
    else:
        tried.append(f"{root}/{{{subdirs}}} and {root} (no {PRETTY[dataset]} IDX files)")
    return None

