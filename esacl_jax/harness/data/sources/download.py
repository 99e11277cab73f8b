"""Datasets that download themselves: the official files, fetched with pooch and verified.

When no local copy is found, `download_dataset` fetches a dataset's original distribution files
into the local root (`--config.data_dir`, else `$ESACL_DATA_DIR`, else the per-user cache
`cache_dir()`, e.g. `~/.cache/esacl_jax` on Linux), laid out as the local loaders expect:

- `mnist/`, `fashion_mnist/`: the four IDX `.gz` files;
- `cifar10/cifar-10-python.tar.gz`, `cifar100/cifar-100-python.tar.gz`;
- `tiny-imagenet-200/`: extracted from `tiny-imagenet-200.zip` (the zip is not kept).

URLs are tried in order: `$ESACL_DATA_MIRROR/<dataset>/<original file name>` first when the
variable is set (a site mirror or a test server), then the canonical hosts (for MNIST the
mirrors torchvision uses). Each file is downloaded by pooch into a private staging folder beside
its destination, verified (with `verify_checksums` the official checksum: MNIST's and
Fashion-MNIST's decompressed content, CIFAR's and Tiny-ImageNet's archive md5; without it only
that the archive reads to its end), and only then renamed into place, all files of a dataset
together. A failed, truncated, corrupt or stalled download therefore leaves no file where a good
one is expected, and the next run tries again.

Failures: when no host answers within `PROBE_TIMEOUT_S` (offline), `download_dataset` returns
False and notes why, so the caller's usual "not found" line follows within seconds. When a host
answers but every URL of a file fails (HTTP error, a server that sends nothing for
`$ESACL_DATA_TIMEOUT` seconds, a connection that breaks half way, a checksum mismatch), it
raises a one-line `DataError` naming each URL and what went wrong. `ESACL_DATA_DOWNLOAD=0`
turns downloads off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import logging
import os
import pathlib
import shutil
import socket
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Sequence

from esacl_jax.harness.data.sources.cifar import CIFAR_ARCHIVE_MD5, CIFAR_ARCHIVES
from esacl_jax.harness.data.sources.common import PRETTY, data_error, describe_exception
from esacl_jax.harness.data.sources.idx import FASHION_MNIST_MD5, IDX_FILES, MNIST_SHA256
from esacl_jax.harness.data.sources.tiny_imagenet import TINY_FOLDER

MIRROR_ENV = "ESACL_DATA_MIRROR"
TIMEOUT_ENV = "ESACL_DATA_TIMEOUT"
DOWNLOAD_ENV = "ESACL_DATA_DOWNLOAD"
DEFAULT_TIMEOUT_S = 30.0  # a server that sends nothing for this long has stalled
PROBE_TIMEOUT_S = 3.0  # how long the offline check waits for any host to answer
RETRIES = 1  # further attempts per URL after a server error or a broken connection (1 s apart)

# md5 of tiny-imagenet-200.zip as distributed by cs231n (the value avalanche and others check).
TINY_ZIP_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"

_MNIST_HOSTS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_HOSTS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
_CIFAR_HOSTS = ("https://www.cs.toronto.edu/~kriz/",)
_TINY_HOSTS = ("http://cs231n.stanford.edu/",)


@dataclasses.dataclass(frozen=True)
class Remote:
    """One distribution file of a dataset.

    Attributes:
      filename: the original file name (also its name on a mirror and on disk).
      hosts: canonical base URLs, tried in order after the mirror.
      folder: the folder under the local root it goes to ("" for an archive that is extracted).
      algo, digest: the official checksum (of the decompressed content when `gunzip`).
      gunzip: whether the checksum is of the gunzipped content (MNIST's gzip wrappers vary
        between copies, their content does not).
    """

    filename: str
    hosts: tuple[str, ...]
    folder: str
    algo: str
    digest: str
    gunzip: bool = False


def _idx_remotes(dataset: str) -> tuple[Remote, ...]:
    hosts, algo, table = (
        (_MNIST_HOSTS, "sha256", MNIST_SHA256)
        if dataset == "mnist"
        else (_FASHION_HOSTS, "md5", FASHION_MNIST_MD5)
    )
    return tuple(
        Remote(f"{stem}.gz", hosts, dataset, algo, table[stem], gunzip=True)
        for stem in IDX_FILES.values()
    )


# Patched by tests to point the canonical hosts at a local server (nothing in `make test` goes out).
REMOTES: dict[str, tuple[Remote, ...]] = {
    "mnist": _idx_remotes("mnist"),
    "fashion_mnist": _idx_remotes("fashion_mnist"),
    **{
        name: (Remote(CIFAR_ARCHIVES[name], _CIFAR_HOSTS, name, "md5", CIFAR_ARCHIVE_MD5[name]),)
        for name in ("cifar10", "cifar100")
    },
    "tiny_imagenet": (Remote("tiny-imagenet-200.zip", _TINY_HOSTS, "", "md5", TINY_ZIP_MD5),),
}


def cache_dir() -> pathlib.Path:
    """The per-user download cache: `$XDG_CACHE_HOME/esacl_jax` (`~/.cache/esacl_jax`) on Linux,
    the platform's user cache folder elsewhere. Never inside the checkout."""
    import pooch  # noqa: PLC0415 (only the harness's data layer needs it)

    return pathlib.Path(pooch.os_cache("esacl_jax"))


def downloads_enabled() -> bool:
    """False when `$ESACL_DATA_DOWNLOAD` is 0/false/no/off (then only local data is used)."""
    return os.environ.get(DOWNLOAD_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def read_timeout() -> float:
    """Seconds without data after which a download counts as stalled (`$ESACL_DATA_TIMEOUT`)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise data_error(f"${TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return value


def mirror_base() -> str | None:
    """`$ESACL_DATA_MIRROR` without its trailing slash, or None; a non-http(s) value is an error."""
    base = os.environ.get(MIRROR_ENV, "").strip()
    if not base:
        return None
    parsed = urllib.parse.urlparse(base)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise data_error(
            f"${MIRROR_ENV} must be an http(s) base URL holding <dataset>/<file>, got {base!r}"
        )
    return base.rstrip("/")


def urls_of(dataset: str, remote: Remote) -> list[str]:
    """The URLs of one file in the order they are tried: the mirror, then the canonical hosts.

    Args:
      dataset: a key of `REMOTES` (the mirror's folder name).
      remote: the file.

    Returns:
      `$ESACL_DATA_MIRROR/<dataset>/<file>` when the variable is set, then each canonical URL.
    """
    mirror = mirror_base()
    urls = [f"{mirror}/{dataset}/{remote.filename}"] if mirror else []
    return urls + [host + remote.filename for host in remote.hosts]


def _host_port(url: str) -> tuple[str, int]:
    parsed = urllib.parse.urlparse(url)
    return parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)


def _first_hop(url: str) -> tuple[str, int]:
    """Where a request for `url` first connects: the proxy the environment names for it
    (`https_proxy`, `http_proxy`, `all_proxy`, unless `no_proxy` bypasses the host), else the
    host itself. This is what the offline probe tries."""
    parsed = urllib.parse.urlparse(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parsed.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(parsed.hostname or ""):
        if "://" not in proxy:
            proxy = f"http://{proxy}"
        return _host_port(proxy)
    return _host_port(url)


def reachable(urls: Sequence[str], timeout: float = PROBE_TIMEOUT_S) -> set[tuple[str, int]]:
    """Which first hops of `urls` (host or proxy, `_first_hop`) accept a TCP connection.

    Every hop is probed at once in a daemon thread, so an offline machine whose DNS hangs never
    blocks the caller (or interpreter exit) for longer than `timeout`.

    Args:
      urls: the URLs a download may use.
      timeout: seconds to wait for the answers, all probes together.

    Returns:
      The (host, port) pairs that answered in time.
    """
    targets = sorted({_first_hop(url) for url in urls})
    answered: set[tuple[str, int]] = set()
    lock = threading.Lock()

    def probe(target: tuple[str, int]) -> None:
        try:
            with socket.create_connection(target, timeout=timeout):
                with lock:
                    answered.add(target)
        except (OSError, ValueError):
            pass

    threads = [
        threading.Thread(target=probe, args=(t,), name="esacl-download-probe", daemon=True)
        for t in targets
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)  # all run at once: the total wait is about `timeout`
    with lock:
        return set(answered)


def _file_digest(path: pathlib.Path, algo: str) -> str:
    digest = hashlib.new(algo)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _problem(remote: Remote, path: pathlib.Path, verify: bool) -> str | None:
    """Why the downloaded file is not the official one (None when it is)."""
    size = path.stat().st_size
    if remote.gunzip:
        try:
            content = gzip.decompress(path.read_bytes())
        except EOFError:
            return f"truncated ({size} bytes, the gzip stream ends early)"
        except (OSError, zlib.error) as exc:
            return f"not a gzip file ({describe_exception(exc)})"
        if not verify:
            return None
        digest = hashlib.new(remote.algo, content).hexdigest()
        if digest != remote.digest:
            return (
                f"checksum mismatch, decompressed {remote.algo} {digest} != official "
                f"{remote.digest}"
            )
        return None
    if verify:
        digest = _file_digest(path, remote.algo)
        if digest != remote.digest:
            return (
                f"checksum mismatch, {remote.algo} {digest} != official {remote.digest} "
                f"({size} bytes)"
            )
        return None
    try:  # unverified: the archive must at least read to its end
        if remote.filename.endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            return None if bad is None else f"corrupt zip member {bad}"
        with tarfile.open(path, mode="r:*") as archive:
            for _ in archive:
                pass
    except (EOFError, OSError, zlib.error, tarfile.TarError, zipfile.BadZipFile) as exc:
        return f"not a readable archive ({describe_exception(exc)}, {size} bytes)"
    return None


def _reason(exc: BaseException, timeout: float) -> str:
    """A short description of a failed HTTP download."""
    import requests  # noqa: PLC0415 (pooch's dependency)

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} {exc.response.reason or ''}".strip()
    text = describe_exception(exc)
    if isinstance(exc, requests.Timeout) or "timed out" in text.lower():
        return f"the server sent nothing for {timeout:g} s (stalled; ${TIMEOUT_ENV} sets the limit)"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError) or "IncompleteRead" in text:
        return "the connection broke before the file was complete"
    if isinstance(exc, requests.ConnectionError):
        return f"cannot connect ({text})"
    return text


@contextlib.contextmanager
def _quiet_pooch() -> Iterator[None]:
    """pooch logs every download and its sha256 at INFO on stderr: keep the run's output clean."""
    import pooch  # noqa: PLC0415

    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed: a server error (5xx) or a broken connection, not a
    client error (404: the file is not there) or a stall (another wait as long)."""
    import requests  # noqa: PLC0415

    if isinstance(exc, requests.HTTPError):
        return exc.response is None or exc.response.status_code >= 500
    if isinstance(exc, requests.Timeout) or "timed out" in str(exc).lower():
        return False
    return isinstance(exc, requests.ConnectionError | requests.exceptions.ChunkedEncodingError)


def _fetch(url: str, folder: pathlib.Path, filename: str, timeout: float) -> pathlib.Path:
    """One HTTP download by pooch into `folder` (pooch streams to a temporary file and renames
    it when complete), attempted again `RETRIES` times after a transient failure."""
    import pooch  # noqa: PLC0415

    downloader = pooch.HTTPDownloader(
        progressbar=sys.stderr.isatty(), timeout=timeout, chunk_size=1 << 16
    )
    for attempt in range(RETRIES + 1):
        try:
            with _quiet_pooch():
                return pathlib.Path(pooch.retrieve(
                    url, known_hash=None, fname=filename, path=folder, downloader=downloader))
        except Exception as exc:
            if attempt == RETRIES or not _transient(exc):
                raise
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def _download_one(
    dataset: str, remote: Remote, urls: Sequence[str], answered: set[tuple[str, int]],
    staging: pathlib.Path, verify: bool, timeout: float,
) -> pathlib.Path:
    """The verified file in `staging`, from the first URL that delivers it; else DataError.

    URLs whose host did not answer the probe (`answered`) are not tried.
    """
    import requests  # noqa: PLC0415

    failures = []
    for url in urls:
        if _first_hop(url) not in answered:
            failures.append(f"{url}: no answer within {PROBE_TIMEOUT_S:g} s")
            continue
        folder = pathlib.Path(tempfile.mkdtemp(dir=staging, prefix="try-"))
        try:
            path = _fetch(url, folder, remote.filename, timeout)
        except (requests.RequestException, ValueError) as exc:
            failures.append(f"{url}: {_reason(exc, timeout)}")
            shutil.rmtree(folder, ignore_errors=True)
            continue
        problem = _problem(remote, path, verify)
        if problem is None:
            return path
        failures.append(f"{url}: {problem}")
        shutil.rmtree(folder, ignore_errors=True)
    raise data_error(
        f"cannot download {PRETTY[dataset]} {remote.filename}: {'; '.join(failures)}. Nothing "
        f"was kept; the next run tries again (${MIRROR_ENV}=URL tries a mirror first, "
        f"${DOWNLOAD_ENV}=0 turns downloads off)"
    )


def _install(dataset: str, remote: Remote, path: pathlib.Path, root: pathlib.Path) -> None:
    """Move a verified file (or the folder a zip holds) to where the local loaders look."""
    if remote.filename.endswith(".zip"):
        extract = path.parent / "extracted"
        try:
            with zipfile.ZipFile(path) as archive:
                archive.extractall(extract)  # zipfile drops absolute and ".." member paths
        except (OSError, zipfile.BadZipFile, zlib.error) as exc:
            raise data_error(
                f"cannot extract {PRETTY[dataset]} {remote.filename} into {root}: "
                f"{describe_exception(exc)}"
            ) from exc
        if not (extract / TINY_FOLDER / "wnids.txt").is_file():
            raise data_error(
                f"{PRETTY[dataset]} {remote.filename} holds no {TINY_FOLDER}/wnids.txt; it is "
                "not the official archive"
            )
        target = root / TINY_FOLDER
        if target.exists():
            raise data_error(
                f"{target} exists but is not a complete {PRETTY[dataset]} folder; remove it and "
                "run again"
            )
        os.replace(extract / TINY_FOLDER, target)
        return
    (root / remote.folder).mkdir(parents=True, exist_ok=True)
    os.replace(path, root / remote.folder / remote.filename)


def download_dataset(dataset: str, root: pathlib.Path, verify: bool, tried: list[str]) -> bool:
    """Download `dataset`'s files into `root`; True when they are in place.

    Args:
      dataset: a key of `REMOTES`.
      root: the local root the loaders search (created if missing).
      verify: check the official checksums (else only that each archive reads to its end).
      tried: where a skipped download is noted (downloads off, or no host answers).

    Returns:
      True when every file is verified and in place, False (noted in `tried`) when downloads are
      off or no host answered.

    Raises:
      DataError: one line, when a host answered but a file could not be downloaded intact, or
        the files cannot be written under `root`.
    """
    remotes = REMOTES[dataset]
    if not downloads_enabled():
        tried.append(f"download (off: ${DOWNLOAD_ENV}={os.environ.get(DOWNLOAD_ENV)})")
        return False
    timeout = read_timeout()
    all_urls = {remote.filename: urls_of(dataset, remote) for remote in remotes}
    answered = reachable([url for urls in all_urls.values() for url in urls])
    if not answered:
        hosts = sorted({_host_port(u)[0] for urls in all_urls.values() for u in urls})
        tried.append(
            f"download from {', '.join(hosts)} (no network: no host answered within "
            f"{PROBE_TIMEOUT_S:g} s)"
        )
        return False
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(dir=root, prefix=".esacl-download-"))
    except OSError as exc:
        raise data_error(
            f"cannot download {PRETTY[dataset]} into {root}: {describe_exception(exc)}; pass "
            "--config.data_dir=DIR (or set $ESACL_DATA_DIR) to a writable directory"
        ) from exc
    try:
        fetched = []
        for remote in remotes:
            urls = all_urls[remote.filename]
            path = _download_one(dataset, remote, urls, answered, staging, verify, timeout)
            fetched.append((remote, path))
        # Only now, all files verified: move them into place together.
        for remote, path in fetched:
            _install(dataset, remote, path, root)
    except OSError as exc:
        raise data_error(
            f"cannot write {PRETTY[dataset]} under {root}: {describe_exception(exc)}"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True
