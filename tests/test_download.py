"""Datasets that download themselves: official-format files served by a local HTTP server.

The server (fixture `server`) stands in for both `$ESACL_DATA_MIRROR` and the canonical hosts
(`download.REMOTES` is patched to point at it), so nothing here reaches the internet. It serves
the real MNIST files of the shared data folder and small CIFAR/Tiny-ImageNet files written here
in their official formats, and can answer with an HTTP error, a truncated or corrupted file, a
connection that breaks half way, or silence.
"""

from __future__ import annotations

import dataclasses
import http.server
import io
import pathlib
import threading
import time
import zipfile

import numpy as np
import pytest

from esacl_jax.harness.data import DataError, load_benchmark, sources
from esacl_jax.harness.data.sources import download
from tests.test_data import assert_one_line, write_cifar, write_tiny_imagenet

MNIST_FILES = [f"{stem}.gz" for stem in sources.IDX_FILES.values()]


@dataclasses.dataclass
class Server:
    """What the local server answers per path, and the paths it was asked for."""

    url: str
    routes: dict[str, object]
    requests: list[str]
    release: threading.Event

    def serve(self, prefix: str, files: dict[str, bytes]) -> None:
        for name, data in files.items():
            self.routes[f"{prefix}/{name}"] = data


class _Handler(http.server.BaseHTTPRequestHandler):
    """Route values: bytes (served), ("status", code), ("cut", bytes) (announces the full
    length, sends half, closes), ("stall", bytes) (headers, then nothing), ("fail_once", bytes)
    (a 500, then the file)."""

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:
        server: Server = self.server.state  # type: ignore[attr-defined]
        server.requests.append(self.path)
        route = server.routes.get(self.path, ("status", 404))
        if isinstance(route, tuple) and route[0] == "fail_once":
            server.routes[self.path] = route[1]
            route = ("status", 500)
        if isinstance(route, tuple) and route[0] == "status":
            self.send_error(route[1])
            return
        kind, data = ("ok", route) if isinstance(route, bytes) else route
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if kind == "stall":
            server.release.wait(30)
            return
        if kind == "cut":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)


@pytest.fixture()
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path):
    """A local HTTP server that is the only host of every dataset; an empty download cache."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    state = Server(url, {}, [], threading.Event())
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    for name, remotes in download.REMOTES.items():
        monkeypatch.setitem(download.REMOTES, name, tuple(
            dataclasses.replace(r, hosts=(f"{url}/canonical/{name}/",)) for r in remotes))
    monkeypatch.setattr(download, "RETRIES", 0)
    monkeypatch.setenv(download.DOWNLOAD_ENV, "1")
    monkeypatch.setenv(download.MIRROR_ENV, f"{url}/mirror")
    monkeypatch.delenv(download.TIMEOUT_ENV, raising=False)
    monkeypatch.delenv(sources.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds_empty"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(sources.tfds, "tfds_available", lambda: False)  # fast: no tfds import
    yield state
    state.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def mnist_files(tmp_path_factory) -> dict[str, bytes]:
    """The real MNIST .gz files (shared data folder), skipped where there is none."""
    from tests.conftest import find_shared_data_dir

    root = find_shared_data_dir()
    if root is None:
        pytest.skip("no MNIST copy found (set ESACL_DATA_DIR to a directory holding mnist/)")
    return {name: (root / "mnist" / name).read_bytes() for name in MNIST_FILES}


def cache() -> pathlib.Path:
    return download.cache_dir()


def left_in(folder: pathlib.Path) -> list[str]:
    """Every file and folder under `folder`, relative (empty if it does not exist)."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_split_mnist_downloads_into_the_empty_cache_and_the_run_trains(server, mnist_files):
    from esacl_jax.harness.loop import train_and_evaluate
    from experiments.configs import split_mnist

    server.serve("/mirror/mnist", mnist_files)
    assert left_in(cache()) == []
    config = split_mnist.get_config("finetune")
    config.update(max_train_per_task=200, max_test_per_task=100, num_tasks=2, epochs=1,
                  progress=False, tensorboard=False)
    workdir = cache().parent / "run"
    result = train_and_evaluate(config, workdir, progress=False)
    assert server.requests == [f"/mirror/mnist/{name}" for name in MNIST_FILES]
    assert left_in(cache()) == ["mnist", *(f"mnist/{name}" for name in sorted(MNIST_FILES))]
    for name in MNIST_FILES:  # the very files served, byte for byte
        assert (cache() / "mnist" / name).read_bytes() == mnist_files[name]
    assert np.asarray(result["task_il_matrix"]).shape == (2, 2)
    assert (workdir / "results.json").exists()
    # The next run reads the cache: no request.
    bench = load_benchmark("split_mnist", num_tasks=1, max_train_per_task=10)
    assert str(cache() / "mnist") in bench.source and "checksums verified" in bench.source
    assert len(server.requests) == len(MNIST_FILES)


@pytest.mark.parametrize("damage, expected", [
    ("corrupt", "checksum mismatch, decompressed sha256"),
    ("truncated", "truncated"),
    ("cut", "the connection broke before the file was complete"),
    ("http", "HTTP 500"),
])
def test_a_bad_download_is_one_line_keeps_nothing_and_the_next_run_succeeds(
        server, mnist_files, damage, expected):
    name = "train-labels-idx1-ubyte.gz"
    good = mnist_files[name]
    if damage == "corrupt":  # a valid gzip of other content
        import gzip

        content = bytearray(gzip.decompress(good))
        content[100] ^= 1
        bad: object = gzip.compress(bytes(content))
    elif damage == "truncated":
        bad = good[: len(good) // 2]
    elif damage == "cut":
        bad = ("cut", good)
    else:
        bad = ("status", 500)
    server.serve("/mirror/mnist", {**mnist_files, name: bad})
    server.serve("/canonical/mnist", {name: ("status", 404)})
    start = time.perf_counter()
    with pytest.raises(DataError) as exc:
        sources.load_dataset("mnist")
    assert time.perf_counter() - start < 20
    message = assert_one_line(exc)
    assert f"cannot download MNIST {name}" in message and expected in message
    assert f"{server.url}/mirror/mnist/{name}" in message and "HTTP 404" in message
    assert "the next run tries again" in message
    # Nothing where a good file is expected, and no staging folder left behind.
    assert left_in(cache()) == []
    server.serve("/mirror/mnist", mnist_files)
    data = sources.load_dataset("mnist")
    assert data.x_train.shape == (60000, 28, 28, 1) and "checksums verified" in data.source
    assert left_in(cache()) == ["mnist", *(f"mnist/{n}" for n in sorted(MNIST_FILES))]


def test_a_stalled_server_ends_in_one_line_after_the_timeout(server, mnist_files, monkeypatch):
    monkeypatch.setenv(download.TIMEOUT_ENV, "0.5")
    server.serve("/mirror/mnist", {**mnist_files, MNIST_FILES[0]: ("stall", b"x" * 1000)})
    start = time.perf_counter()
    with pytest.raises(DataError) as exc:
        sources.load_dataset("mnist")
    assert time.perf_counter() - start < 10
    message = assert_one_line(exc)
    assert "the server sent nothing for 0.5 s (stalled; $ESACL_DATA_TIMEOUT" in message
    assert left_in(cache()) == []


def test_mirror_first_then_canonical_host_and_a_retry(server, mnist_files, monkeypatch):
    """A mirror without the files (404) falls back to the canonical host; a server error is
    retried (pooch's retry_if_failed) before the URL counts as failed."""
    monkeypatch.setattr(download, "RETRIES", 1)
    server.serve("/canonical/mnist", {**mnist_files,
                                      MNIST_FILES[1]: ("fail_once", mnist_files[MNIST_FILES[1]])})
    data = sources.load_dataset("mnist")
    assert data.y_train.shape == (60000,)
    assert server.requests[:2] == [f"/mirror/mnist/{MNIST_FILES[0]}",
                                   f"/canonical/mnist/{MNIST_FILES[0]}"]
    assert server.requests.count(f"/canonical/mnist/{MNIST_FILES[1]}") == 2  # 500, then the file


def test_without_a_mirror_the_canonical_hosts_serve(server, mnist_files, monkeypatch, tmp_path):
    monkeypatch.delenv(download.MIRROR_ENV)
    server.serve("/canonical/mnist", mnist_files)
    target = tmp_path / "my_data"  # --config.data_dir / $ESACL_DATA_DIR: downloads go there
    bench = load_benchmark("split_mnist", data_dir=target, num_tasks=1, max_train_per_task=10)
    assert str(target / "mnist") in bench.source
    assert all(r.startswith("/canonical/mnist/") for r in server.requests)
    assert left_in(cache()) == []


def _packed(folder: pathlib.Path) -> bytes:
    return next(folder.glob("*.tar.gz")).read_bytes()


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_archive_downloads(server, tmp_path, dataset):
    """Small archives in the official format: the md5 check refuses them (one line, nothing
    kept); without verification the archive is read to its end, installed and loaded."""
    write_cifar(tmp_path / "src", dataset, packed=True)
    archive = sources.CIFAR_ARCHIVES[dataset]
    server.serve(f"/mirror/{dataset}", {archive: _packed(tmp_path / "src")})
    with pytest.raises(DataError) as exc:
        sources.load_dataset(dataset)
    assert "checksum mismatch, md5" in assert_one_line(exc)
    assert left_in(cache()) == []
    data = sources.load_dataset(dataset, verify_checksums=False)
    assert data.num_classes == (100 if dataset == "cifar100" else 10)
    assert (cache() / dataset / archive).is_file()
    # A truncated archive is refused without verification too.
    server.serve(f"/mirror/{dataset}", {archive: _packed(tmp_path / "src")[:3000]})
    other = tmp_path / "other"
    with pytest.raises(DataError) as exc:
        sources.load_dataset(dataset, data_dir=other, verify_checksums=False)
    assert "not a readable archive" in assert_one_line(exc)
    assert left_in(other) == []


def test_tiny_imagenet_zip_downloads_and_is_extracted(server, tmp_path):
    wnids = write_tiny_imagenet(tmp_path / "src", num_classes=3, train_per_class=2)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted((tmp_path / "src").rglob("*")):
            archive.write(path, path.relative_to(tmp_path / "src"))
    server.serve("/mirror/tiny_imagenet", {"tiny-imagenet-200.zip": buffer.getvalue()})
    data = sources.load_dataset("tiny_imagenet", verify_checksums=False)
    assert data.num_classes == len(wnids) and data.x_train.shape[1:] == (64, 64, 3)
    assert (cache() / "tiny-imagenet-200" / "wnids.txt").is_file()
    assert not (cache() / "tiny-imagenet-200.zip").exists()  # the zip is not kept
    assert [p for p in left_in(cache()) if p.startswith(".")] == []


@pytest.mark.parametrize("variable, value, expected", [
    (download.TIMEOUT_ENV, "soon", "ESACL_DATA_TIMEOUT must be a positive number"),
    (download.TIMEOUT_ENV, "-1", "ESACL_DATA_TIMEOUT must be a positive number"),
    (download.MIRROR_ENV, "ftp://mirror.example/data", "ESACL_DATA_MIRROR must be an http(s)"),
])
def test_bad_download_settings_are_one_line(server, monkeypatch, variable, value, expected):
    monkeypatch.setenv(variable, value)
    with pytest.raises(DataError) as exc:
        sources.load_dataset("fashion_mnist")
    assert expected in assert_one_line(exc)
    assert server.requests == []


def test_an_unwritable_root_is_one_line(server, mnist_files, tmp_path):
    server.serve("/mirror/mnist", mnist_files)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(DataError) as exc:
        sources.load_dataset("mnist", data_dir=blocker / "data")
    assert "cannot download MNIST into" in assert_one_line(exc)


def test_the_offline_probe_tries_the_proxy_the_environment_names(monkeypatch):
    """Behind a proxy the hosts themselves may be unreachable: the probe connects to the proxy
    (unless no_proxy bypasses the host), as requests will."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert download._first_hop(url) == ("www.cs.toronto.edu", 443)
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    assert download._first_hop(url) == ("proxy.example", 3128)
    assert download._first_hop("http://yann.lecun.com/exdb/mnist/x.gz") == ("yann.lecun.com", 80)
    monkeypatch.setenv("no_proxy", "www.cs.toronto.edu")
    assert download._first_hop(url) == ("www.cs.toronto.edu", 443)
