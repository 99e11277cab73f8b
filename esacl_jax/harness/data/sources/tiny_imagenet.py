"""Tiny-ImageNet from the standard `tiny-imagenet-200/` folder of JPEGs; val is the test split.

Tiny-ImageNet has no content checksum: with verification on, the official counts (200 classes,
500 train images each, 10000 val images) are enforced; with it off only consistency is checked
(every class has train images, every val image exists and is annotated with a known class), so
that tests can use a miniature folder.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from esacl_jax.harness.data.sources.common import (
    RawDataset,
    data_error,
    describe_exception,
    file_stamp,
    freeze,
)

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
            raise data_error(f"{path}: cannot decode image ({describe_exception(exc)})") from exc
        if rgb.shape != (size, size, 3):
            raise data_error(
                f"{path}: image is {rgb.shape[1]}x{rgb.shape[0]}, expected {size}x{size}"
            )
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
        raise data_error(f"cannot read {path}: {describe_exception(exc)}") from exc


@functools.lru_cache(maxsize=2)
def _load_tiny_imagenet(
    folder: str, verify: bool, _stamp: tuple[tuple[int, int], ...]
) -> RawDataset:
    root = pathlib.Path(folder)
    wnids = [w.strip() for w in _read_text(root / "wnids.txt").splitlines() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise data_error(f"{root / 'wnids.txt'}: empty or has duplicate class ids")
    # Class ids follow the sorted wnids (the ImageFolder convention), not the file order.
    wnids = sorted(wnids)
    class_of = {w: i for i, w in enumerate(wnids)}
    if verify and len(wnids) != TINY_OFFICIAL["classes"]:
        raise data_error(f"{root / 'wnids.txt'}: {len(wnids)} classes, the official set has 200")

    train_paths: list[pathlib.Path] = []
    train_labels: list[int] = []
    for wnid in wnids:
        images_dir = root / "train" / wnid / "images"
        files = sorted(p for p in images_dir.glob("*") if p.suffix.lower() in (".jpeg", ".jpg"))
        if not files:
            raise data_error(f"{images_dir}: no training images for class {wnid}")
        if verify and len(files) != TINY_OFFICIAL["train_per_class"]:
            raise data_error(
                f"{images_dir}: {len(files)} images, the official set has 500 per class"
            )
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
            raise data_error(f"{annotations}:{line_no}: expected '<file>\\t<wnid>...'")
        fname, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in class_of:
            raise data_error(f"{annotations}:{line_no}: class {wnid} is not in wnids.txt")
        path = root / "val" / "images" / fname
        if not path.is_file():
            raise data_error(f"{annotations}:{line_no}: {path} does not exist")
        val_paths.append(path)
        val_labels.append(class_of[wnid])
    if not val_paths:
        raise data_error(f"{annotations}: no validation images listed")
    if verify and len(val_paths) != TINY_OFFICIAL["val"]:
        raise data_error(f"{annotations}: {len(val_paths)} images, the official val set has 10000")

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
    freeze(result.x_train, result.y_train, result.x_test, result.y_test)
    return result


def find_tiny_imagenet_local(
    root: pathlib.Path, verify: bool, tried: list[str]
) -> RawDataset | None:
    """Tiny-ImageNet under `root`, or None after noting in `tried` where it looked.

    Raises DataError for a folder with `wnids.txt` but no train folder or val annotations, or a
    broken file.
    """
    for folder in (root / TINY_FOLDER, root / "tiny_imagenet", root / "tiny-imagenet", root):
        if (folder / "wnids.txt").is_file():
            stamp_files = [folder / "wnids.txt", folder / "val" / "val_annotations.txt"]
            for required in stamp_files[1:] + [folder / "train"]:
                if not required.exists():
                    raise data_error(
                        f"{folder} is incomplete: missing {required}; extract it again"
                    )
            return _load_tiny_imagenet(str(folder.resolve()), verify, file_stamp(stamp_files))
    tried.append(f"{root}/{TINY_FOLDER} and {root} (no wnids.txt)")
    return None

