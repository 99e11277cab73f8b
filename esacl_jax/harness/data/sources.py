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
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import gzip
import hashlib
import importlib
import importlib.util
import io
import logging
import os
import pathlib
import pickle
import socket
import sys
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from esacl_jax.harness.data.base import DataError

ENV_VAR = "ESACL_DATA_DIR"
DATASETS = ("mnist", "fashion_mnist", "digits", "cifar10", "cifar100", "tiny_imagenet")
NETWORK_PROBE_TIMEOUT_S = 3.0


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


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error(message: str) -> DataError:
    """A DataError whose message is guaranteed to be one line."""
    return DataError(_one_line(message))


def _freeze(*arrays: np.ndarray) -> None:
    """Cached arrays are shared between callers: make accidental in-place edits fail loudly."""
    for array in arrays:
        array.flags.writeable = False


def _describe_exception(exc: BaseException) -> str:
    text = _one_line(str(exc)) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# ----------------------------------------------------------------------------------------------
# Local directory resolution


def local_root(data_dir: str | os.PathLike[str] | None) -> tuple[pathlib.Path | None, str]:
    """The local directory to search (argument first, then $ESACL_DATA_DIR) and its origin."""
    if data_dir is not None and str(data_dir) != "":
        return pathlib.Path(data_dir).expanduser(), "data_dir"
    env = os.environ.get(ENV_VAR, "")
    if env:
        return pathlib.Path(env).expanduser(), f"${ENV_VAR}"
    return None, ""


# ----------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX)

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Checksums of the DECOMPRESSED official IDX files (see shared/data/README.md): the gzip
# wrappers in circulation differ in their headers, the content does not.
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
_PRETTY = {
    "mnist": "MNIST",
    "fashion_mnist": "Fashion-MNIST",
    "digits": "scikit-learn digits",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "tiny_imagenet": "Tiny-ImageNet",
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
        raise _error(f"cannot read {path}: {_describe_exception(exc)}") from exc
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError as exc:
        raise _error(
            f"{path} is truncated (gzip stream ends early, {len(raw)} bytes); "
            "download the file again"
        ) from exc
    except (OSError, zlib.error) as exc:
        raise _error(
            f"{path} is not a valid gzip file ({_describe_exception(exc)}); download it again"
        ) from exc


def parse_idx(data: bytes, path: pathlib.Path | str, ndim: int) -> np.ndarray:
    """Decode an IDX uint8 array (big-endian header), checking magic, rank and size."""
    magic = bytes([0, 0, 0x08, ndim])
    if data[:4] != magic:
        kind = "labels (1-d)" if ndim == 1 else f"images ({ndim}-d)"
        raise _error(
            f"{path}: bad IDX magic {data[:4].hex() or '(empty file)'} (expected {magic.hex()}, "
            f"uint8 {kind}); the file is not the right IDX file, replace it with the official one"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _error(f"{path}: IDX header truncated ({len(data)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise _error(
            f"{path}: wrong size {len(data)} bytes for IDX dims {dims} (expected {expected}); "
            "the file is truncated or corrupt, download it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _checksum_mismatch_hint(dataset: str, stem: str, content: bytes) -> str:
    other = {"mnist": ("Fashion-MNIST", FASHION_MNIST_MD5), "fashion_mnist": ("MNIST", MNIST_MD5)}
    name, table = other[dataset]
    if hashlib.md5(content).hexdigest() == table[stem]:
        return f" (this is the {name} file: point {_PRETTY[dataset]} at its own folder)"
    return ""


def _verify_idx(dataset: str, stem: str, content: bytes, path: pathlib.Path) -> None:
    if dataset == "mnist":
        algo, table = "sha256", MNIST_SHA256
    else:
        algo, table = "md5", FASHION_MNIST_MD5
    digest = hashlib.new(algo, content).hexdigest()
    if digest != table[stem]:
        raise _error(
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
            raise _error(f"{img_path}: images are {images.shape[1:]}, expected 28x28")
        if images.shape[0] != labels.shape[0]:
            raise _error(
                f"{folder}: {split} has {images.shape[0]} images but {labels.shape[0]} labels; "
                "the files do not belong together, replace them with the official ones"
            )
        if images.shape[0] == 0:
            raise _error(f"{img_path}: holds no images")
        if labels.size and int(labels.max()) >= 10:
            raise _error(
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
    _freeze(result.x_train, result.y_train, result.x_test, result.y_test)
    return result


def _stamp(paths: Iterable[pathlib.Path]) -> tuple[tuple[int, int], ...]:
    stats = [p.stat() for p in paths]
    return tuple((s.st_size, s.st_mtime_ns) for s in stats)


def _find_idx_local(
    dataset: str, root: pathlib.Path, verify: bool, tried: list[str]
) -> RawDataset | None:
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
            return _load_idx_dir(dataset, str(folder.resolve()), verify, _stamp(paths))
        if folder != root and len(missing) < len(IDX_FILES):
            raise _error(
                f"{folder} is incomplete: missing {', '.join(m + '[.gz]' for m in missing)}; "
                f"copy all four {_PRETTY[dataset]} IDX files there"
            )
    subdirs = ",".join(_IDX_SUBDIRS[dataset])
    if root not in candidates:
        tried.append(
            f"{root}/{{{subdirs}}} (no IDX files; {root} itself skipped: its name says "
            "Fashion-MNIST)"
        )
    else:
        tried.append(f"{root}/{{{subdirs}}} and {root} (no {_PRETTY[dataset]} IDX files)")
    return None


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickle format)

CIFAR_ARCHIVE_MD5 = {
    "cifar10": "c58f30108f718f92721af3b95e74349a",
    "cifar100": "eb9058c3a382ffc7106e4002c42a8d85",
}
CIFAR_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_SUBDIRS = {
    "cifar10": ("cifar10", "cifar-10", "CIFAR10", "cifar_10"),
    "cifar100": ("cifar100", "cifar-100", "CIFAR100", "cifar_100"),
}
# Batch files in split order, with the md5 of the extracted official files.
CIFAR_BATCHES = {
    "cifar10": {
        "train": (
            ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            ("data_batch_4", "634d18415352ddfa80567beed471001a"),
            ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
        ),
        "test": (("test_batch", "40351d587109b95175f43aff81a1287e"),),
    },
    "cifar100": {
        "train": (("train", "16019d7e3df5f24257cddd939b257f8d"),),
        "test": (("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
    },
}
CIFAR_LABEL_KEY = {"cifar10": "labels", "cifar100": "fine_labels"}
CIFAR_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and builtins: CIFAR batches need no more.

    The CIFAR files are pickles; refusing arbitrary globals keeps a malicious file from running
    code when a user points the loader at an untrusted directory.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
            if importlib.util.find_spec("numpy._core") is None:  # numpy < 2
                module = "numpy.core.multiarray"
        return getattr(importlib.import_module(module), name)


def _decode_cifar_batch(content: bytes, where: str, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch -> (N, 32, 32, 3) uint8 images and (N,) int32 labels."""
    try:
        batch = _ArrayUnpickler(io.BytesIO(content), encoding="bytes").load()
    except Exception as exc:  # any unpickling failure means a corrupt file
        raise _error(
            f"{where}: not a CIFAR python batch ({_describe_exception(exc)}); "
            "replace it with the official file"
        ) from exc
    if not isinstance(batch, dict):
        raise _error(f"{where}: expected a dict, found {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    label_key = CIFAR_LABEL_KEY[dataset]
    missing = [k for k in ("data", label_key) if k not in batch]
    if missing:
        raise _error(
            f"{where}: missing key(s) {missing} (has {sorted(map(str, batch))}); "
            f"is this a {_PRETTY[dataset]} file?"
        )
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise _error(f"{where}: data is {data.dtype}{data.shape}, expected uint8 (N, 3072)")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise _error(f"{where}: {data.shape[0]} images but labels of shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise _error(f"{where}: labels have dtype {labels.dtype}, expected integers")
    num_classes = CIFAR_NUM_CLASSES[dataset]
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise _error(
            f"{where}: labels span [{int(labels.min())}, {int(labels.max())}], "
            f"expected [0, {num_classes})"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int32)


def _assemble_cifar(
    dataset: str,
    batches: dict[str, list[tuple[np.ndarray, np.ndarray]]],
    source: str,
) -> RawDataset:
    parts = {}
    for split in ("train", "test"):
        xs, ys = zip(*batches[split], strict=True)
        parts[split] = (np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys))
        if parts[split][0].shape[0] == 0:
            raise _error(f"{source}: the {split} split is empty")
    result = RawDataset(
        name=dataset,
        x_train=parts["train"][0],
        y_train=parts["train"][1],
        x_test=parts["test"][0],
        y_test=parts["test"][1],
        num_classes=CIFAR_NUM_CLASSES[dataset],
        source=source,
    )
    _freeze(result.x_train, result.y_train, result.x_test, result.y_test)
    return result


@functools.lru_cache(maxsize=4)
def _load_cifar_folder(
    dataset: str, folder: str, verify: bool, _stamp: tuple[tuple[int, int], ...]
) -> RawDataset:
    batches: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    for split, files in CIFAR_BATCHES[dataset].items():
        for fname, md5 in files:
            path = pathlib.Path(folder) / fname
            content = _read_checked(path, md5 if verify else None,
                                    "replace it with the official file")
            batches[split].append(_decode_cifar_batch(content, str(path), dataset))
    how = "checksums verified" if verify else "checksums not verified"
    return _assemble_cifar(dataset, batches, f"{folder} (python batches, {how})")


def _read_checked(path: pathlib.Path, md5: str | None, fix: str) -> bytes:
    """The file's bytes; a one-line DataError if unreadable or (md5 given) not the official file."""
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise _error(f"cannot read {path}: {_describe_exception(exc)}") from exc
    if md5 is not None:
        digest = hashlib.md5(content).hexdigest()
        if digest != md5:
            raise _error(
                f"{path}: checksum mismatch, md5 {digest} != official {md5}; {fix} (or pass "
                "verify_checksums=False for deliberately modified data)"
            )
    return content


@functools.lru_cache(maxsize=4)
def _load_cifar_archive(
    dataset: str, archive: str, verify: bool, _stamp: tuple[tuple[int, int], ...]
) -> RawDataset:
    path = pathlib.Path(archive)
    raw = _read_checked(path, CIFAR_ARCHIVE_MD5[dataset] if verify else None,
                        "download the official archive again")
    wanted = {fname for files in CIFAR_BATCHES[dataset].values() for fname, _ in files}
    contents: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and base not in contents:
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    contents[base] = extracted.read()
    except EOFError as exc:
        raise _error(f"{path} is truncated; download the archive again") from exc
    except (tarfile.TarError, OSError, zlib.error) as exc:
        raise _error(
            f"{path} is not a readable tar archive ({_describe_exception(exc)}); download it again"
        ) from exc
    missing = sorted(wanted - set(contents))
    if missing:
        raise _error(f"{path}: archive lacks {', '.join(missing)}; download it again")
    batches: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    for split, files in CIFAR_BATCHES[dataset].items():
        for fname, _ in files:
            batches[split].append(_decode_cifar_batch(contents[fname], f"{path}:{fname}", dataset))
    how = "archive checksum verified" if verify else "checksums not verified"
    return _assemble_cifar(dataset, batches, f"{path} ({how})")


def _find_cifar_local(
    dataset: str, root: pathlib.Path, verify: bool, tried: list[str]
) -> RawDataset | None:
    batch_names = [f for files in CIFAR_BATCHES[dataset].values() for f, _ in files]
    bases = [root] + [root / sub for sub in CIFAR_SUBDIRS[dataset]]
    for base in bases:
        if not base.is_dir():
            continue
        for folder in (base / CIFAR_FOLDERS[dataset], base):
            present = [n for n in batch_names if (folder / n).is_file()]
            if len(present) == len(batch_names):
                paths = [folder / n for n in batch_names]
                return _load_cifar_folder(dataset, str(folder.resolve()), verify, _stamp(paths))
            if present and folder != root:
                missing = sorted(set(batch_names) - set(present))
                raise _error(
                    f"{folder} is incomplete: missing {', '.join(missing)}; extract "
                    f"{CIFAR_ARCHIVES[dataset]} again"
                )
        archive = base / CIFAR_ARCHIVES[dataset]
        if archive.is_file():
            return _load_cifar_archive(dataset, str(archive.resolve()), verify, _stamp([archive]))
    tried.append(
        f"{root} and {root}/{CIFAR_SUBDIRS[dataset][0]} (no {CIFAR_ARCHIVES[dataset]} "
        f"or {CIFAR_FOLDERS[dataset]}/)"
    )
    return None


# ----------------------------------------------------------------------------------------------
# Tiny-ImageNet (standard folder of JPEGs)

TINY_FOLDER = "tiny-imagenet-200"
TINY_OFFICIAL = {"classes": 200, "train_per_class": 500, "val": 10000}


def _decode_jpegs(paths: Sequence[pathlib.Path], size: int = 64) -> np.ndarray:
    """Decode RGB images into one (N, size, size, 3) uint8 array, with a thread pool.

    PIL releases the GIL while decoding, so threads give a real speed-up.
    """
    from PIL import Image  # only this loader needs PIL

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def decode(i: int) -> None:
        path = paths[i]
        try:
            with Image.open(path) as img:
                rgb = np.asarray(img.convert("RGB"))
        except Exception as exc:  # any decode failure is a corrupt image
            raise _error(f"{path}: cannot decode image ({_describe_exception(exc)})") from exc
        if rgb.shape != (size, size, 3):
            raise _error(f"{path}: image is {rgb.shape[1]}x{rgb.shape[0]}, expected {size}x{size}")
        out[i] = rgb

    workers = min(16, (os.cpu_count() or 1) * 2)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(decode, i) for i in range(len(paths))]:
            future.result()
    return out


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _error(f"cannot read {path}: {_describe_exception(exc)}") from exc


@functools.lru_cache(maxsize=2)
def _load_tiny_imagenet(
    folder: str, verify: bool, _stamp: tuple[tuple[int, int], ...]
) -> RawDataset:
    root = pathlib.Path(folder)
    wnids = [w.strip() for w in _read_text(root / "wnids.txt").splitlines() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise _error(f"{root / 'wnids.txt'}: empty or has duplicate class ids")
    # Class ids follow the sorted wnids (the ImageFolder convention), not the file order.
    wnids = sorted(wnids)
    class_of = {w: i for i, w in enumerate(wnids)}
    if verify and len(wnids) != TINY_OFFICIAL["classes"]:
        raise _error(f"{root / 'wnids.txt'}: {len(wnids)} classes, the official set has 200")

    train_paths: list[pathlib.Path] = []
    train_labels: list[int] = []
    for wnid in wnids:
        images_dir = root / "train" / wnid / "images"
        files = sorted(p for p in images_dir.glob("*") if p.suffix.lower() in (".jpeg", ".jpg"))
        if not files:
            raise _error(f"{images_dir}: no training images for class {wnid}")
        if verify and len(files) != TINY_OFFICIAL["train_per_class"]:
            raise _error(f"{images_dir}: {len(files)} images, the official set has 500 per class")
        train_paths.extend(files)
        train_labels.extend([class_of[wnid]] * len(files))

    annotations = root / "val" / "val_annotations.txt"
    val_paths: list[pathlib.Path] = []
    val_labels: list[int] = []
    for line_no, line in enumerate(_read_text(annotations).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2:
            raise _error(f"{annotations}:{line_no}: expected '<file>\\t<wnid>...'")
        fname, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in class_of:
            raise _error(f"{annotations}:{line_no}: class {wnid} is not in wnids.txt")
        path = root / "val" / "images" / fname
        if not path.is_file():
            raise _error(f"{annotations}:{line_no}: {path} does not exist")
        val_paths.append(path)
        val_labels.append(class_of[wnid])
    if not val_paths:
        raise _error(f"{annotations}: no validation images listed")
    if verify and len(val_paths) != TINY_OFFICIAL["val"]:
        raise _error(f"{annotations}: {len(val_paths)} images, the official val set has 10000")

    how = "official counts checked" if verify else "structure checked"
    result = RawDataset(
        name="tiny_imagenet",
        x_train=_decode_jpegs(train_paths),
        y_train=np.asarray(train_labels, dtype=np.int32),
        x_test=_decode_jpegs(val_paths),
        y_test=np.asarray(val_labels, dtype=np.int32),
        num_classes=len(wnids),
        source=f"{root} (JPEG folder, val as test, {how})",
    )
    _freeze(result.x_train, result.y_train, result.x_test, result.y_test)
    return result


def _find_tiny_imagenet_local(
    root: pathlib.Path, verify: bool, tried: list[str]
) -> RawDataset | None:
    for folder in (root / TINY_FOLDER, root / "tiny_imagenet", root / "tiny-imagenet", root):
        if (folder / "wnids.txt").is_file():
            stamp_files = [folder / "wnids.txt", folder / "val" / "val_annotations.txt"]
            for required in stamp_files[1:] + [folder / "train"]:
                if not required.exists():
                    raise _error(f"{folder} is incomplete: missing {required}; extract it again")
            return _load_tiny_imagenet(str(folder.resolve()), verify, _stamp(stamp_files))
    tried.append(f"{root}/{TINY_FOLDER} and {root} (no wnids.txt)")
    return None


# ----------------------------------------------------------------------------------------------
# scikit-learn digits


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
    _freeze(result.x_train, result.y_train, result.x_test, result.y_test)
    return result


# ----------------------------------------------------------------------------------------------
# tensorflow-datasets

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


def tensorflow_available() -> bool:
    """Whether TensorFlow is installed (needed by tfds to download and prepare a dataset)."""
    return _installed("tensorflow")


def network_available(timeout: float = NETWORK_PROBE_TIMEOUT_S) -> bool:
    """Whether the tfds download host answers, probed in a daemon thread with a hard timeout.

    The thread is a daemon so an offline machine whose DNS hangs never blocks the caller (or
    interpreter exit) for longer than `timeout`.
    """
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection(("storage.googleapis.com", 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="esacl-network-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _records_to_arrays(
    dataset: str, records: Sequence[Any], where: str
) -> tuple[np.ndarray, np.ndarray]:
    """A random-access tfds split (sequence of {'image','label'} dicts) -> uint8/int32 arrays."""
    n = len(records)
    if n == 0:
        raise _error(f"{where}: the split is empty")
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
        raise _error(f"{where}: images are {images.dtype}{images.shape[1:]}, expected uint8{shape}")
    if labels.shape != (images.shape[0],):
        raise _error(f"{where}: {images.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= TFDS_NUM_CLASSES[dataset]):
        raise _error(f"{where}: labels out of range [0, {TFDS_NUM_CLASSES[dataset]})")
    return np.ascontiguousarray(images), labels.astype(np.int32)


def _tfds_raw(
    dataset: str, load_split: Callable[[str], tuple[np.ndarray, np.ndarray]], source: str
) -> RawDataset:
    x_train, y_train = load_split("train")
    x_test, y_test = load_split("test")
    result = RawDataset(
        dataset, x_train, y_train, x_test, y_test, TFDS_NUM_CLASSES[dataset], source
    )
    _freeze(result.x_train, result.y_train, result.x_test, result.y_test)
    return result


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silence tfds's absl warnings while probing for prepared data that is usually absent."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _tfds_data_source(dataset: str, tfds_dir: str | None) -> RawDataset:
    """Already-prepared tfds data (array_record), read without TensorFlow; raises if absent."""
    import tensorflow_datasets as tfds  # slow, optional

    name = TFDS_NAMES[dataset]
    with _quiet_absl():
        builder = tfds.builder(name, data_dir=tfds_dir)
        prepared = builder.is_prepared()
    if not prepared:
        raise FileNotFoundError(f"not prepared in {builder.data_dir}")
    where = f"tfds:{name} ({builder.data_dir})"

    def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
        records = tfds.data_source(name, split=split, data_dir=tfds_dir, download=False)
        return _records_to_arrays(dataset, records, f"{where} {split}")

    return _tfds_raw(dataset, load_split, f"{where}, tfds-verified at preparation")


def _tfds_download(dataset: str, tfds_dir: str | None) -> RawDataset:
    """Download and prepare with tfds (needs TensorFlow and the network)."""
    import tensorflow_datasets as tfds  # slow, optional

    name = TFDS_NAMES[dataset]

    def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
        batch = tfds.as_numpy(
            tfds.load(name, split=split, data_dir=tfds_dir, download=True, batch_size=-1)
        )
        return _check_tfds_arrays(
            dataset, np.asarray(batch["image"]), np.asarray(batch["label"]), f"tfds:{name}"
        )

    return _tfds_raw(dataset, load_split, f"tfds:{name} (downloaded, tfds-verified)")


def _try_tfds(dataset: str, root: pathlib.Path | None, tried: list[str]) -> RawDataset | None:
    """Source 2: prepared tfds data in `root` or tfds's default dir, then a tfds download."""
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
            tried.append(f"tfds.data_source('{name}') in {shown} ({_describe_exception(exc)})")
    if not tensorflow_available():
        tried.append("tfds download (skipped: TensorFlow not installed)")
        return None
    if not network_available():
        tried.append("tfds download (skipped: no network)")
        return None
    try:
        return _tfds_download(dataset, None if root is None else str(root))
    except DataError:
        raise
    except Exception as exc:
        tried.append(f"tfds.load('{name}', download=True) ({_describe_exception(exc)})")
        return None


# ----------------------------------------------------------------------------------------------
# Entry point

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
            found = _find_idx_local(dataset, root, verify_checksums, tried)
        elif dataset in ("cifar10", "cifar100"):
            found = _find_cifar_local(dataset, root, verify_checksums, tried)
        else:
            found = _find_tiny_imagenet_local(root, verify_checksums, tried)
        if found is not None:
            return found
    if dataset in TFDS_NAMES:
        found = _try_tfds(dataset, root if root is not None and root.is_dir() else None, tried)
        if found is not None:
            return found
    else:
        tried.append("tfds (no Tiny-ImageNet in tfds: local directory only)")
    raise _error(f"{_PRETTY[dataset]} not found. Tried: {'; '.join(tried)}. Fix: {_FIX[dataset]}.")
