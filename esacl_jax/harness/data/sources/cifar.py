"""CIFAR-10 and CIFAR-100 in the official python format: the `.tar.gz` archive or its folder.

Accepted under the local root (or a `cifar10/`, `cifar100/` subfolder, see `CIFAR_SUBDIRS`):
the extracted `cifar-10-batches-py/` / `cifar-100-python/`, the batch files themselves, or the
archive. CIFAR-100 uses the fine labels. With verification on, the batch files (or the archive)
are compared with their official md5; pickle keys, shapes and label range are always checked.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import io
import pathlib
import pickle
import tarfile
import zlib
from typing import Any

import numpy as np

from esacl_jax.harness.data.sources.common import (
    PRETTY,
    RawDataset,
    data_error,
    describe_exception,
    file_stamp,
    freeze,
    read_checked,
)

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
        raise data_error(
            f"{where}: not a CIFAR python batch ({describe_exception(exc)}); "
            "replace it with the official file"
        ) from exc
    if not isinstance(batch, dict):
        raise data_error(f"{where}: expected a dict, found {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    label_key = CIFAR_LABEL_KEY[dataset]
    missing = [k for k in ("data", label_key) if k not in batch]
    if missing:
        raise data_error(
            f"{where}: missing key(s) {missing} (has {sorted(map(str, batch))}); "
            f"is this a {PRETTY[dataset]} file?"
        )
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise data_error(f"{where}: data is {data.dtype}{data.shape}, expected uint8 (N, 3072)")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise data_error(f"{where}: {data.shape[0]} images but labels of shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise data_error(f"{where}: labels have dtype {labels.dtype}, expected integers")
    num_classes = CIFAR_NUM_CLASSES[dataset]
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise data_error(
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
            raise data_error(f"{source}: the {split} split is empty")
    result = RawDataset(
        name=dataset,
        x_train=parts["train"][0],
        y_train=parts["train"][1],
        x_test=parts["test"][0],
        y_test=parts["test"][1],
        num_classes=CIFAR_NUM_CLASSES[dataset],
        source=source,
    )
    freeze(result.x_train, result.y_train, result.x_test, result.y_test)
    return result


@functools.lru_cache(maxsize=4)
def _load_cifar_folder(
    dataset: str, folder: str, verify: bool, _stamp: tuple[tuple[int, int], ...]
) -> RawDataset:
    batches: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    for split, files in CIFAR_BATCHES[dataset].items():
        for fname, md5 in files:
            path = pathlib.Path(folder) / fname
            content = read_checked(
                path, md5 if verify else None, "replace it with the official file"
            )
            batches[split].append(_decode_cifar_batch(content, str(path), dataset))
    how = "checksums verified" if verify else "checksums not verified"
    return _assemble_cifar(dataset, batches, f"{folder} (python batches, {how})")


@functools.lru_cache(maxsize=4)
def _load_cifar_archive(
    dataset: str, archive: str, verify: bool, _stamp: tuple[tuple[int, int], ...]
) -> RawDataset:
    path = pathlib.Path(archive)
    raw = read_checked(
        path, CIFAR_ARCHIVE_MD5[dataset] if verify else None, "download the official archive again"
    )
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
        raise data_error(f"{path} is truncated; download the archive again") from exc
    except (tarfile.TarError, OSError, zlib.error) as exc:
        raise data_error(
            f"{path} is not a readable tar archive ({describe_exception(exc)}); download it again"
        ) from exc
    missing = sorted(wanted - set(contents))
    if missing:
        raise data_error(f"{path}: archive lacks {', '.join(missing)}; download it again")
    batches: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    for split, files in CIFAR_BATCHES[dataset].items():
        for fname, _ in files:
            batches[split].append(_decode_cifar_batch(contents[fname], f"{path}:{fname}", dataset))
    how = "archive checksum verified" if verify else "checksums not verified"
    return _assemble_cifar(dataset, batches, f"{path} ({how})")


def find_cifar_local(
    dataset: str, root: pathlib.Path, verify: bool, tried: list[str]
) -> RawDataset | None:
    """The CIFAR dataset under `root`, or None after noting in `tried` where it looked.

    Extracted batch files win over an archive in the same folder. Raises DataError for a folder
    that holds some but not all batch files, or a broken file.
    """
    batch_names = [f for files in CIFAR_BATCHES[dataset].values() for f, _ in files]
    bases = [root] + [root / sub for sub in CIFAR_SUBDIRS[dataset]]
    for base in bases:
        if not base.is_dir():
            continue
        for folder in (base / CIFAR_FOLDERS[dataset], base):
            present = [n for n in batch_names if (folder / n).is_file()]
            if len(present) == len(batch_names):
                paths = [folder / n for n in batch_names]
                return _load_cifar_folder(dataset, str(folder.resolve()), verify, file_stamp(paths))
            if present and folder != root:
                missing = sorted(set(batch_names) - set(present))
                raise data_error(
                    f"{folder} is incomplete: missing {', '.join(missing)}; extract "
                    f"{CIFAR_ARCHIVES[dataset]} again"
                )
        archive = base / CIFAR_ARCHIVES[dataset]
        if archive.is_file():
            return _load_cifar_archive(
                dataset, str(archive.resolve()), verify, file_stamp([archive])
            )
    tried.append(
        f"{root} and {root}/{CIFAR_SUBDIRS[dataset][0]} (no {CIFAR_ARCHIVES[dataset]} "
        f"or {CIFAR_FOLDERS[dataset]}/)"
    )
    return None

