"""Tests of the data layer: real MNIST/Fashion-MNIST/digits, and CIFAR/Tiny-ImageNet loaders on
small files written here in the official formats, corrupt files, missing data, augmentation."""

from __future__ import annotations

import dataclasses
import gzip
import io
import pathlib
import pickle
import shutil
import socket
import sys
import tarfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esacl_jax.harness.data import (
    BENCHMARKS,
    Benchmark,
    DataError,
    augment_batch,
    class_mask,
    load_benchmark,
    preprocess,
    random_crop_flip,
    sources,
)
from esacl_jax.harness.data.benchmarks import (
    pixel_permutations,
    stratified_holdout,
    stratified_subset,
)
from esacl_jax.harness.data.sources import download as download_source

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_FIRST_TRAIN_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


def assert_one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message.strip() == message and message
    return message


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """No ESACL_DATA_DIR, an empty tfds dir and download cache, downloads off (as everywhere in
    the tests, conftest.py): only explicit local data counts."""
    monkeypatch.delenv(sources.ENV_VAR, raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds_empty"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache_empty"))
    monkeypatch.setenv(sources.DOWNLOAD_ENV, "0")
    monkeypatch.delenv(sources.MIRROR_ENV, raising=False)


# ----------------------------------------------------------------------------------------------
# Writers for the official formats


def idx_bytes(array: np.ndarray, magic_dims: int | None = None) -> bytes:
    ndim = array.ndim if magic_dims is None else magic_dims
    header = bytes([0, 0, 0x08, ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx_set(
    folder: pathlib.Path, n_train: int = 40, n_test: int = 20, gz: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    """A small MNIST-format set (all ten classes present) under the standard file names."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
    }
    for stem, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


def cifar_batch(n: int, num_classes: int, rng: np.random.Generator, cifar100: bool) -> dict:
    labels = [int(c) for c in np.arange(n) % num_classes]
    batch = {
        b"batch_label": b"synthetic batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    if cifar100:
        batch[b"fine_labels"] = labels
        batch[b"coarse_labels"] = [c // 5 for c in labels]
    else:
        batch[b"labels"] = labels
    return batch


def write_cifar(root: pathlib.Path, dataset: str, packed: bool) -> dict[str, dict]:
    """Small CIFAR-10/100 python batches, as an extracted folder or a packed .tar.gz."""
    rng = np.random.default_rng(1)
    cifar100 = dataset == "cifar100"
    k = 100 if cifar100 else 10
    files = {name: cifar_batch(2 * k, k, rng, cifar100) for name in (
        ("train", "test") if cifar100 else (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
    )}  # fmt: skip
    folder_name = sources.CIFAR_FOLDERS[dataset]
    root.mkdir(parents=True, exist_ok=True)
    if packed:
        with tarfile.open(root / sources.CIFAR_ARCHIVES[dataset], "w:gz") as tar:
            for name, batch in files.items():
                payload = pickle.dumps(batch, protocol=2)
                info = tarfile.TarInfo(f"{folder_name}/{name}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    else:
        (root / folder_name).mkdir()
        for name, batch in files.items():
            # The official files reference numpy.core (numpy 1.x); numpy 2 writes numpy._core.
            payload = pickle.dumps(batch, protocol=2)
            payload = payload.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
            assert b"cnumpy.core.multiarray\n" in payload
            (root / folder_name / name).write_bytes(payload)
    return files


def write_tiny_imagenet(root: pathlib.Path, num_classes: int, train_per_class: int) -> list[str]:
    """A miniature tiny-imagenet-200 folder: one solid colour per class (survives JPEG)."""
    from PIL import Image

    folder = root / "tiny-imagenet-200"
    wnids = [f"n{9000000 - 7 * i:08d}" for i in range(num_classes)]  # file order != sorted
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for i, wnid in enumerate(wnids):
        colour = ((37 * i) % 256, (91 * i) % 256, (13 * i + 50) % 256)
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for j in range(train_per_class):
            Image.new("RGB", (64, 64), colour).save(images / f"{wnid}_{j}.JPEG", quality=95)
        Image.new("RGB", (64, 64), colour).save(folder / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    # One grayscale image, as the real set has: it must come back as RGB.
    Image.new("L", (64, 64), 128).save(folder / "train" / min(wnids) / "images" / "gray.JPEG")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return wnids


# ----------------------------------------------------------------------------------------------
# Registry


def test_registry_matches_protocols() -> None:
    expected = {
        "split_digits": ("digits", 5, 2, "class_il", (8, 8, 1), "none"),
        "split_mnist": ("mnist", 5, 2, "class_il", (28, 28, 1), "none"),
        "split_fashion_mnist": ("fashion_mnist", 5, 2, "class_il", (28, 28, 1), "none"),
        "permuted_mnist": ("mnist", 20, 10, "domain_il", (28, 28, 1), "none"),
        "split_cifar10": ("cifar10", 5, 2, "class_il", (32, 32, 3), "crop_flip"),
        "split_cifar100": ("cifar100", 10, 10, "class_il", (32, 32, 3), "crop_flip"),
        "split_tiny_imagenet": ("tiny_imagenet", 10, 20, "class_il", (64, 64, 3), "crop_flip"),
    }
    assert set(BENCHMARKS) == set(expected)
    for name, (dataset, tasks, per_task, scenario, shape, augment) in expected.items():
        spec = BENCHMARKS[name]
        got = (spec.dataset, spec.num_tasks, spec.classes_per_task, spec.scenario)
        assert got == (dataset, tasks, per_task, scenario)
        assert (spec.input_shape, spec.augment) == (shape, augment)
        assert len(spec.mean) == len(spec.std) == shape[-1]
    assert BENCHMARKS["split_cifar10"].mean == (0.4914, 0.4822, 0.4465)
    assert BENCHMARKS["split_cifar100"].std == (0.2673, 0.2564, 0.2762)
    assert BENCHMARKS["split_mnist"].mean == (0.0,) and BENCHMARKS["split_mnist"].std == (1.0,)


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError) as exc:
        load_benchmark("split_mnist", num_tasks=6)
    assert "num_tasks=6" in assert_one_line(exc)
    with pytest.raises(ValueError):
        load_benchmark("split_cifar100", num_tasks=11)
    with pytest.raises(ValueError):
        load_benchmark("no_such_benchmark")
    with pytest.raises(ValueError):
        load_benchmark("split_digits", validation_fraction=1.0)
    with pytest.raises(ValueError):
        load_benchmark("split_digits", max_train_per_task=0)


# ----------------------------------------------------------------------------------------------
# Real MNIST / Fashion-MNIST / digits


def test_split_mnist_real(shared_data_dir: pathlib.Path) -> None:
    start = time.perf_counter()
    bench = load_benchmark("split_mnist", data_dir=shared_data_dir)
    assert time.perf_counter() - start < 5.0
    assert isinstance(bench, Benchmark)
    assert (bench.scenario, bench.num_classes, bench.num_tasks) == ("class_il", 10, 5)
    assert bench.input_shape == (28, 28, 1) and bench.augment == "none"
    assert bench.eval_split == "test" and "checksums verified" in bench.source
    for t, task in enumerate(bench.tasks):
        assert task.classes == (2 * t, 2 * t + 1)
        assert task.x_train.dtype == np.uint8 and task.x_train.shape[1:] == (28, 28, 1)
        assert task.y_train.dtype == np.int32 and task.x_test.shape[0] == task.y_test.shape[0]
        assert set(np.unique(task.y_train)) == set(task.classes)
        assert set(np.unique(task.y_test)) == set(task.classes)
    all_train = np.concatenate([task.y_train for task in bench.tasks])
    assert np.bincount(all_train).tolist() == MNIST_TRAIN_COUNTS
    assert sum(task.num_test for task in bench.tasks) == 10000
    assert bench.classes_up_to(1) == (0, 1, 2, 3)
    # Labels in dataset order: task 0's first labels are MNIST's first 0/1 labels.
    raw = sources.load_dataset("mnist", shared_data_dir)
    assert raw.y_train[:10].tolist() == MNIST_FIRST_TRAIN_LABELS
    first01 = raw.y_train[np.isin(raw.y_train, [0, 1])][:5]
    assert bench.tasks[0].y_train[:5].tolist() == first01.tolist()
    mean = float(raw.x_train.mean() / 255.0)
    assert abs(mean - 0.1307) < 1e-3
    x = preprocess(jnp.asarray(bench.tasks[0].x_train[:4]), bench.mean, bench.std)
    assert x.dtype == jnp.float32 and float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_env_var_data_dir(shared_data_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sources.ENV_VAR, str(shared_data_dir))
    bench = load_benchmark("split_mnist", num_tasks=2)
    assert bench.num_tasks == 2 and bench.tasks[1].classes == (2, 3)
    assert str(shared_data_dir) in bench.source or str(shared_data_dir.resolve()) in bench.source


def test_dataset_folder_given_directly(shared_data_dir: pathlib.Path) -> None:
    bench = load_benchmark("split_fashion_mnist", data_dir=shared_data_dir / "fashion_mnist",
                           num_tasks=1)  # fmt: skip
    assert bench.tasks[0].num_train == 12000


def test_fashion_mnist_real(shared_data_dir: pathlib.Path) -> None:
    bench = load_benchmark("split_fashion_mnist", data_dir=shared_data_dir)
    assert bench.num_tasks == 5
    for task in bench.tasks:
        assert task.num_train == 12000 and task.num_test == 2000
        assert task.x_train.shape[1:] == (28, 28, 1) and task.x_train.dtype == np.uint8
    fashion = sources.load_dataset("fashion_mnist", shared_data_dir)
    mnist = sources.load_dataset("mnist", shared_data_dir)
    assert "checksums verified" in fashion.source
    assert not np.array_equal(fashion.x_test[:10], mnist.x_test[:10])
    assert np.bincount(fashion.y_test).tolist() == [1000] * 10


def test_split_digits_offline(offline: None) -> None:
    bench = load_benchmark("split_digits")
    assert bench.num_tasks == 5 and bench.input_shape == (8, 8, 1)
    assert bench.source.startswith("sklearn")
    n_train = sum(task.num_train for task in bench.tasks)
    n_test = sum(task.num_test for task in bench.tasks)
    assert (n_train, n_test) == (1347, 450)
    x = np.concatenate([task.x_train for task in bench.tasks])
    assert x.dtype == np.uint8 and x.max() == 255 and x.min() == 0
    # round(x * 255 / 16) of integers 0..16: only 17 distinct values.
    assert set(np.unique(x).tolist()) <= {round(v * 255 / 16) for v in range(17)}
    again = load_benchmark("split_digits")
    assert np.array_equal(again.tasks[3].x_test, bench.tasks[3].x_test)


def test_permuted_mnist(shared_data_dir: pathlib.Path) -> None:
    bench = load_benchmark("permuted_mnist", data_dir=shared_data_dir, num_tasks=3,
                           max_train_per_task=500)  # fmt: skip
    assert bench.scenario == "domain_il" and bench.num_tasks == 3
    raw = sources.load_dataset("mnist", shared_data_dir)
    flat_test = raw.x_test.reshape(raw.x_test.shape[0], -1)
    expected = pixel_permutations(3, 784, 0)
    for task, perm in zip(bench.tasks, expected, strict=True):
        assert task.classes == tuple(range(10))
        assert task.num_train == 500 and task.num_test == 10000
        assert task.x_test.shape == (10000, 28, 28, 1) and task.x_test.dtype == np.uint8
        # Same examples and labels in every task; only the fixed pixel permutation differs.
        assert np.array_equal(task.y_train, bench.tasks[0].y_train)
        assert np.array_equal(task.y_test, raw.y_test)
        assert np.array_equal(task.x_test.reshape(10000, -1), flat_test[:, perm])
    assert not np.array_equal(bench.tasks[0].x_test, raw.x_test)  # task 0 is permuted too
    assert not np.array_equal(bench.tasks[0].x_test, bench.tasks[1].x_test)
    assert not np.array_equal(expected[1], expected[2])
    assert BENCHMARKS["permuted_mnist"].num_tasks == 20


def test_class_order_seed(shared_data_dir: pathlib.Path) -> None:
    kwargs = dict(data_dir=shared_data_dir, max_train_per_task=50, max_test_per_task=20)
    a = load_benchmark("split_mnist", class_order_seed=3, **kwargs)
    b = load_benchmark("split_mnist", class_order_seed=3, **kwargs)
    c = load_benchmark("split_mnist", class_order_seed=4, **kwargs)
    default = load_benchmark("split_mnist", **kwargs)
    order = [task.classes for task in a.tasks]
    assert order == [task.classes for task in b.tasks]
    assert order != [task.classes for task in default.tasks]
    assert order != [task.classes for task in c.tasks]
    assert sorted(c for classes in order for c in classes) == list(range(10))
    for task in a.tasks:
        assert set(np.unique(task.y_train)) == set(task.classes)
        assert np.isin(task.y_test, task.classes).all()
    assert "class order shuffled" in a.source


def test_max_per_task_subsets(shared_data_dir: pathlib.Path) -> None:
    a = load_benchmark("split_mnist", data_dir=shared_data_dir, max_train_per_task=100,
                       max_test_per_task=30, seed=0)  # fmt: skip
    b = load_benchmark("split_mnist", data_dir=shared_data_dir, max_train_per_task=100,
                       max_test_per_task=30, seed=0)  # fmt: skip
    c = load_benchmark("split_mnist", data_dir=shared_data_dir, max_train_per_task=100,
                       max_test_per_task=30, seed=1)  # fmt: skip
    for ta, tb in zip(a.tasks, b.tasks, strict=True):
        assert ta.num_train == 100 and ta.num_test == 30
        assert np.array_equal(ta.x_train, tb.x_train) and np.array_equal(ta.y_test, tb.y_test)
        counts = np.bincount(ta.y_train, minlength=10)[list(ta.classes)]
        assert counts.min() >= 40  # stratified: both classes well represented
    assert not np.array_equal(a.tasks[0].x_train, c.tasks[0].x_train)


def test_validation_split_disjoint_from_train(shared_data_dir: pathlib.Path) -> None:
    full = load_benchmark("split_mnist", data_dir=shared_data_dir, num_tasks=2)
    bench = load_benchmark("split_mnist", data_dir=shared_data_dir, num_tasks=2,
                           validation_fraction=0.1)  # fmt: skip
    assert bench.eval_split == "validation" and "hold-out" in bench.source
    for task, ref in zip(bench.tasks, full.tasks, strict=True):
        assert task.num_train + task.num_test == ref.num_train
        assert abs(task.num_test - 0.1 * ref.num_train) <= 2
        for c in task.classes:  # stratified
            frac = np.mean(task.y_test == c) - np.mean(ref.y_train == c)
            assert abs(frac) < 0.01
        train_rows = {row.tobytes() for row in task.x_train.reshape(task.num_train, -1)}
        val_rows = [row.tobytes() for row in task.x_test.reshape(task.num_test, -1)]
        assert not any(row in train_rows for row in val_rows)
        # The test set is not used at all.
        test_rows = {row.tobytes() for row in ref.x_test.reshape(ref.num_test, -1)}
        assert not any(row in test_rows for row in val_rows)


def test_stratified_helpers() -> None:
    labels = np.repeat(np.arange(3), [50, 30, 20])
    rng = np.random.default_rng(0)
    subset = stratified_subset(labels, 10, rng)
    assert subset.shape == (10,) and np.all(np.diff(subset) > 0)
    assert np.bincount(labels[subset]).tolist() == [5, 3, 2]
    keep, hold = stratified_holdout(labels, 0.2, np.random.default_rng(0))
    assert np.intersect1d(keep, hold).size == 0 and keep.size + hold.size == labels.size
    assert np.bincount(labels[hold]).tolist() == [10, 6, 4]


# ----------------------------------------------------------------------------------------------
# Synthetic IDX files: structural checks, corrupt files


def test_synthetic_idx_loads_without_checksums(tmp_path: pathlib.Path, offline: None) -> None:
    arrays = write_idx_set(tmp_path / "mnist", gz=False)
    bench = load_benchmark("split_mnist", data_dir=tmp_path, verify_checksums=False)
    assert "checksums not verified" in bench.source
    task = bench.tasks[1]
    labels = arrays["train-labels-idx1-ubyte"]
    expected = arrays["train-images-idx3-ubyte"][np.isin(labels, [2, 3])]
    assert np.array_equal(task.x_train[..., 0], expected)
    with pytest.raises(DataError) as exc:
        load_benchmark("split_mnist", data_dir=tmp_path, verify_checksums=True)
    message = assert_one_line(exc)
    assert "checksum mismatch" in message and "ubyte" in message


def test_truncated_gzip(shared_data_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    for stem in sources.IDX_FILES.values():
        src = shared_data_dir / "mnist" / f"{stem}.gz"
        if stem == "train-labels-idx1-ubyte":
            (folder / src.name).write_bytes(src.read_bytes()[: src.stat().st_size // 2])
        else:
            (folder / src.name).symlink_to(src)
    with pytest.raises(DataError) as exc:
        load_benchmark("split_mnist", data_dir=tmp_path)
    message = assert_one_line(exc)
    assert "train-labels-idx1-ubyte.gz" in message and "truncated" in message


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("magic", "bad IDX magic"),
        ("size", "wrong size"),
        ("count", "11 labels"),
        ("label_range", "out of range"),
        ("not_gzip", "not a valid gzip"),
        ("incomplete", "incomplete"),
    ],
)
def test_corrupt_idx(tmp_path: pathlib.Path, offline: None, damage: str, expected: str) -> None:
    folder = tmp_path / "mnist"
    write_idx_set(folder, n_test=10, gz=False)
    images = folder / "t10k-images-idx3-ubyte"
    labels = folder / "t10k-labels-idx1-ubyte"
    if damage == "magic":
        images.write_bytes(b"\x00\x00\x08\x01" + images.read_bytes()[4:])
    elif damage == "size":
        images.write_bytes(images.read_bytes()[:-7])
    elif damage == "count":
        labels.write_bytes(idx_bytes(np.zeros(11, np.uint8)))
    elif damage == "label_range":
        labels.write_bytes(idx_bytes(np.full(10, 12, np.uint8)))
    elif damage == "not_gzip":
        labels.unlink()
        (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip at all")
    elif damage == "incomplete":
        labels.unlink()
    with pytest.raises(DataError) as exc:
        load_benchmark("split_mnist", data_dir=tmp_path, verify_checksums=False)
    assert expected in assert_one_line(exc)


def test_missing_data_names_every_place(
    tmp_path: pathlib.Path, offline: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline (every download host refuses or does not answer): one line within seconds."""
    monkeypatch.setenv(sources.DOWNLOAD_ENV, "1")
    with socket.socket() as closed:  # a local port nobody listens on: connection refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    for name, remotes in download_source.REMOTES.items():
        monkeypatch.setitem(download_source.REMOTES, name, tuple(
            dataclasses.replace(r, hosts=(f"http://127.0.0.1:{port}/",)) for r in remotes))
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    for name in ("split_mnist", "split_cifar10", "split_cifar100", "split_tiny_imagenet"):
        start = time.perf_counter()
        with pytest.raises(DataError) as exc:
            load_benchmark(name, data_dir=empty)
        assert time.perf_counter() - start < 10.0
        message = assert_one_line(exc)
        assert str(empty) in message and "tfds" in message and "ESACL_DATA_DIR" in message
        assert "Fix:" in message and "no network" in message
    with pytest.raises(DataError) as exc:
        load_benchmark("split_mnist")  # no data_dir, no env var
    message = assert_one_line(exc)
    assert "ESACL_DATA_DIR unset" in message and "no network" in message


def test_tfds_prepared_source_is_used(
    tmp_path: pathlib.Path, offline: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Source 2 with a stand-in tfds module (no prepared tfds data exists on this machine)."""
    rng = np.random.default_rng(0)
    splits = {
        split: [{"image": rng.integers(0, 256, (28, 28, 1), dtype=np.uint8), "label": i % 10}
                for i in range(n)]
        for split, n in (("train", 30), ("test", 20))
    }  # fmt: skip
    calls = []

    class Builder:
        data_dir = str(tmp_path / "tfds" / "mnist" / "3.0.1")

        def is_prepared(self) -> bool:
            return True

    fake = types.ModuleType("tensorflow_datasets")
    fake.builder = lambda name, data_dir=None: Builder()

    def data_source(name, split, data_dir=None, download=True):
        calls.append((name, split, download))
        return splits[split]

    fake.data_source = data_source
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    bench = load_benchmark("split_mnist", data_dir=tmp_path, num_tasks=1)
    assert bench.source.startswith("tfds:mnist")
    assert all(not download for _, _, download in calls)
    assert bench.tasks[0].num_train == 6 and bench.tasks[0].x_train.shape[1:] == (28, 28, 1)


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 on small files in the official python format


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
@pytest.mark.parametrize("packed", [True, False])
def test_cifar_loaders(tmp_path: pathlib.Path, offline: None, dataset: str, packed: bool) -> None:
    root = tmp_path / dataset if packed else tmp_path  # both documented layouts
    files = write_cifar(root, dataset, packed)
    name = f"split_{dataset}"
    bench = load_benchmark(name, data_dir=tmp_path, verify_checksums=False)
    k = 10 if dataset == "cifar10" else 100
    spec = BENCHMARKS[name]
    assert bench.num_tasks == spec.num_tasks and bench.num_classes == k
    assert bench.augment == "crop_flip" and bench.mean == spec.mean
    train_names = [n for n in files if n not in ("test", "test_batch")]
    test_batch = files["test" if dataset == "cifar100" else "test_batch"]
    label_key = b"fine_labels" if dataset == "cifar100" else b"labels"
    n_train = sum(len(files[n][label_key]) for n in train_names)
    assert sum(task.num_train for task in bench.tasks) == n_train
    task = bench.tasks[0]
    assert task.x_train.shape[1:] == (32, 32, 3) and task.x_train.dtype == np.uint8
    assert task.classes == tuple(range(spec.classes_per_task))
    # Channel-planar rows (1024 R, 1024 G, 1024 B) become HWC images.
    data = test_batch[b"data"][np.isin(test_batch[label_key], task.classes)]
    x = task.x_test
    assert np.array_equal(x[:, 3, 5, 0], data[:, 0 * 1024 + 3 * 32 + 5])
    assert np.array_equal(x[:, 31, 0, 2], data[:, 2 * 1024 + 31 * 32 + 0])
    assert np.array_equal(x.transpose(0, 3, 1, 2).reshape(len(x), -1), data)
    with pytest.raises(DataError) as exc:
        load_benchmark(name, data_dir=tmp_path, verify_checksums=True)
    assert "checksum mismatch" in assert_one_line(exc)


def test_cifar_corrupt(tmp_path: pathlib.Path, offline: None) -> None:
    write_cifar(tmp_path / "a", "cifar10", packed=True)
    archive = tmp_path / "a" / sources.CIFAR_ARCHIVES["cifar10"]
    archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(DataError) as exc:
        load_benchmark("split_cifar10", data_dir=tmp_path / "a", verify_checksums=False)
    assert str(archive) in assert_one_line(exc)

    write_cifar(tmp_path / "b", "cifar100", packed=False)
    folder = tmp_path / "b" / "cifar-100-python"
    (folder / "test").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(DataError) as exc:
        load_benchmark("split_cifar100", data_dir=tmp_path / "b", verify_checksums=False)
    assert "fine_labels" in assert_one_line(exc)

    # A pickle that would run code is refused, not executed.
    (folder / "test").write_bytes(pickle.dumps(shutil.rmtree))
    with pytest.raises(DataError) as exc:
        load_benchmark("split_cifar100", data_dir=tmp_path / "b", verify_checksums=False)
    assert "not allowed" in assert_one_line(exc)


# ----------------------------------------------------------------------------------------------
# Tiny-ImageNet on a miniature folder


def test_tiny_imagenet_folder(tmp_path: pathlib.Path, offline: None) -> None:
    wnids = write_tiny_imagenet(tmp_path, num_classes=40, train_per_class=2)
    bench = load_benchmark("split_tiny_imagenet", data_dir=tmp_path, num_tasks=2,
                           verify_checksums=False)  # fmt: skip
    assert bench.num_classes == 200 and bench.augment == "crop_flip"
    assert bench.tasks[1].classes == tuple(range(20, 40))
    task = bench.tasks[0]
    assert task.num_train == 20 * 2 + 1 and task.num_test == 20  # + the grayscale image
    assert task.x_train.shape[1:] == (64, 64, 3) and task.x_train.dtype == np.uint8
    # Class ids follow the sorted wnids; each class has its solid colour.
    order = sorted(wnids)
    for x, y in zip(task.x_test, task.y_test, strict=True):
        i = wnids.index(order[y])
        colour = np.array(((37 * i) % 256, (91 * i) % 256, (13 * i + 50) % 256))
        assert np.abs(x.reshape(-1, 3).mean(0) - colour).max() < 6
    gray = task.x_train[np.all(task.x_train.reshape(len(task.x_train), -1) == 128, axis=1)]
    assert len(gray) == 1
    # Official structure is enforced when verifying (there is no content checksum).
    with pytest.raises(DataError) as exc:
        load_benchmark("split_tiny_imagenet", data_dir=tmp_path, verify_checksums=True)
    assert "200" in assert_one_line(exc)
    # More tasks than the miniature folder has classes for: a clear DataError.
    with pytest.raises(DataError) as exc:
        load_benchmark("split_tiny_imagenet", data_dir=tmp_path, num_tasks=3,
                       verify_checksums=False)  # fmt: skip
    assert "only 40 classes" in assert_one_line(exc)


def test_tiny_imagenet_bad_annotation(tmp_path: pathlib.Path, offline: None) -> None:
    write_tiny_imagenet(tmp_path, num_classes=20, train_per_class=1)
    annotations = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_x.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(DataError) as exc:
        load_benchmark("split_tiny_imagenet", data_dir=tmp_path, num_tasks=1,
                       verify_checksums=False)  # fmt: skip
    assert "not in wnids.txt" in assert_one_line(exc)


# ----------------------------------------------------------------------------------------------
# Augmentation


def test_random_crop_flip() -> None:
    images = jnp.asarray(np.random.default_rng(0).integers(1, 256, (64, 32, 32, 3), np.uint8))
    key = jax.random.key(0)
    out = random_crop_flip(key, images)
    assert out.shape == images.shape and out.dtype == jnp.uint8
    assert np.array_equal(out, random_crop_flip(key, images))
    assert not np.array_equal(out, random_crop_flip(jax.random.key(1), images))
    changed = np.any(np.asarray(out) != np.asarray(images), axis=(1, 2, 3))
    assert changed.mean() > 0.8
    # Zero padding shows up as zero pixels (inputs are >= 1) where a crop was shifted.
    assert np.any(np.asarray(out) == 0)
    # pad=0: only flips; each example is either itself or its mirror, and both happen.
    flipped = np.asarray(random_crop_flip(key, images, pad=0))
    same = np.all(flipped == np.asarray(images), axis=(1, 2, 3))
    mirror = np.all(flipped == np.asarray(images)[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirror) and same.any() and mirror.any()


def test_augment_batch_dispatch_and_jit() -> None:
    x = jnp.arange(2 * 8 * 8 * 1, dtype=jnp.uint8).reshape(2, 8, 8, 1)
    key = jax.random.key(3)
    assert augment_batch(key, x, "none") is x
    step = jax.jit(augment_batch, static_argnames="mode")
    out = step(key, x, mode="crop_flip")
    assert out.shape == x.shape and out.dtype == x.dtype
    assert np.array_equal(out, augment_batch(key, x, "crop_flip"))
    with pytest.raises(ValueError):
        augment_batch(key, x, "mixup")


def test_class_mask() -> None:
    assert class_mask((2, 3), 10).tolist() == [False] * 2 + [True] * 2 + [False] * 6
