"""The tensorflow-datasets source, offline, with `tfds.testing.mock_data`.

What runs without TensorFlow: the prepared-data path (`tfds.data_source`, array_record). The
mock serves random examples of each dataset's real features, but `try_tfds` first asks
`builder.is_prepared()`, so a metadata directory is written for each dataset
(`<dir>/<name>/<version>/dataset_info.json` + `features.json`, with train and test splits) and
the mock runs with `MockPolicy.USE_FILES` on it. The download path (`tfds.load`) needs TensorFlow
and is not tested here.
"""

from __future__ import annotations

import numpy as np
import pytest

from esacl_jax.harness.data import DataError, sources
from esacl_jax.harness.data.sources import download as download_source

tfds = pytest.importorskip("tensorflow_datasets")
mocking = pytest.importorskip("tensorflow_datasets.testing.mocking")

NUM_EXAMPLES = 60


def _no_download(*args, **kwargs):
    raise AssertionError("prepared tfds data must be read without a download attempt")


def _getitems(*args, generator, serialized=False):
    """tfds 4.9.x's mock sets `__getitems__` as a plain MagicMock attribute, so it is called
    without the `self` its `_getitems` expects (TypeError: missing 'record_keys'). This
    replacement takes the keys as the last positional argument either way."""
    del serialized
    return [generator[key] for key in args[-1]]


def _write_metadata(data_dir, name: str, num_examples: int) -> str:
    """dataset_info.json and features.json of `name` (from tfds's code) with train/test splits."""
    builder = tfds.builder(name, data_dir=str(data_dir))
    builder.data_path.mkdir(parents=True)
    template = tfds.core.ShardedFileTemplate(
        data_dir=builder.data_path, dataset_name=name, filetype_suffix="array_record")
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[num_examples], num_bytes=0,
                            filename_template=template)
        for split in ("train", "test")]))
    builder.info.write_to_directory(builder.data_path)
    return str(builder.data_path)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    for name in ("mnist", "cifar10"):
        _write_metadata(root, name, NUM_EXAMPLES)
    return root


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No local dataset directory, no TFDS_DATA_DIR, and any download attempt fails the test."""
    monkeypatch.delenv(sources.ENV_VAR, raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds_default"))
    monkeypatch.setattr(download_source, "download_dataset", _no_download)
    if hasattr(mocking, "_getitems"):
        monkeypatch.setattr(mocking, "_getitems", _getitems)


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_prepared_tfds_data_is_read_without_tensorflow(offline, tfds_dir, name, shape):
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=str(tfds_dir)):
        data = sources.load_dataset(name, data_dir=tfds_dir)
    assert data.name == name and data.num_classes == 10
    assert data.source.startswith(f"tfds:{name} (")
    for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        assert x.shape == (NUM_EXAMPLES, *shape) and x.dtype == np.uint8
        assert y.shape == (NUM_EXAMPLES,) and y.dtype == np.int32
        assert 0 <= y.min() and y.max() < 10
        assert not x.flags.writeable and not y.flags.writeable
    assert len(np.unique(data.y_train)) > 1  # real random labels, not a constant


def test_tfds_data_reaches_the_benchmark(offline, tfds_dir):
    from esacl_jax.harness.data import load_benchmark

    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=str(tfds_dir)):
        bench = load_benchmark("split_cifar10", data_dir=str(tfds_dir), seed=0)
    assert bench.source.startswith("tfds:cifar10")
    assert bench.num_classes == 10 and bench.input_shape == (32, 32, 3)
    assert len(bench.tasks) == 5
    assert sum(len(task.y_train) for task in bench.tasks) == NUM_EXAMPLES
    for task in bench.tasks:
        assert set(np.unique(task.y_train)) <= set(task.classes)


def test_unprepared_tfds_data_is_a_clear_error_and_never_downloaded(monkeypatch, tmp_path):
    """tfds only reads prepared data: unprepared, the next source (a download, off here) follows
    and the one-line error names both."""
    monkeypatch.delenv(sources.ENV_VAR, raising=False)
    monkeypatch.setenv(sources.DOWNLOAD_ENV, "0")
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(DataError) as err:
            sources.load_dataset("cifar10", data_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert "CIFAR-10 not found" in message
    assert "tfds.data_source('cifar10')" in message and "not prepared" in message
    assert "download (off: $ESACL_DATA_DOWNLOAD=0)" in message
