"""Fetch a model's files from a remote URL into a local, content-addressed cache.

Data flow::

    fetch("s3://bucket/bert/")            the operator's command line or config
      │ no "://" ───────────────────────▶ os.path.abspath(url), nothing fetched
      ▼
    fsspec url_to_fs ─ fs.info / fs.find ─ identity of every file (size, etag, mtime, checksum)
      │ key = sha256(url + identities)
      ▼
    <cache>/<key> exists? ──── yes ─────▶ return it: no lock, no download
      │ no
      ▼
    flock <cache>/<key>.lock              one process per machine downloads, the others wait
      │ exists now? (a waiter finds the finished entry and returns it)
      ▼
    <cache>/.tmp-<key>-<random>/          download, check sizes, fsync
      │ os.rename                         atomic: the entry appears whole or not at all
      ▼
    <cache>/<key>/<basename>  for a file URL;   <cache>/<key>/  for a directory URL

The cache root is ``cache_dir``, else ``$WORKERPOOL_CACHE``, else ``~/.cache/workerpool/models``.
Put it on a filesystem where flock works between all processes that share it (a local disk:
not every NFS setup honours flock), since the lock also makes it safe to delete temporaries
left by a killed fetch. fsspec and its backends (s3fs, gcsfs, ...) are optional: they are
imported only here, on the first remote URL.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from urllib.parse import urlsplit

from ..errors import ModelSourceError

# fsspec backends are separate packages: the one to install for each scheme.
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hdfs": "pyarrow",
            "http": "aiohttp", "https": "aiohttp", "az": "adlfs", "abfs": "adlfs",
            "abfss": "adlfs", "hf": "huggingface_hub"}

# info() fields that change when the object changes. Backends spell them differently
# (s3fs: ETag/LastModified/VersionId, gcsfs: etag/md5Hash/crc32c/generation/updated,
# local and hdfs: mtime), so they are matched lowercased.
IDENTITY_FIELDS = {"size", "etag", "mtime", "lastmodified", "last_modified", "updated",
                   "checksum", "md5hash", "crc32c", "versionid", "generation"}

CHUNK = 1 << 20


def fetch(url: str, cache_dir: str | None = None) -> str:
    """Return a local path holding the model at ``url``, downloading it once per machine.

    A plain path (no ``scheme://``) comes back as it is, made absolute. Any other URL is
    opened with fsspec (``s3://``, ``gs://``, ``hdfs://``, ``https://``, ``file://``,
    ``memory://``, ...): a file is returned as ``<cache>/<key>/<basename>``, a directory
    (e.g. a Hugging Face model: config.json + model.safetensors) as ``<cache>/<key>``
    holding all its files. The key changes when the remote files change (size, etag,
    mtime, checksum), so a new version lands in a new entry; old entries are left alone.
    Every call asks the remote for that identity (one info or listing request).

    Security: model URLs come from the operator's command line or config, never from an
    HTTP request: fetch() reads whatever the URL names, with this process's credentials.

    Raises :class:`ModelSourceError`.
    """
    url = os.fspath(url)
    if "://" not in url:
        return os.path.abspath(url)
    fs, root = _filesystem(url)
    files, is_dir = _list_files(fs, root, url)
    key = _cache_key(url, files)
    cache = _cache_root(cache_dir)
    entry = os.path.join(cache, key)
    if not os.path.exists(entry):  # entries appear only by rename, so one that exists is whole
        with _locked(entry + ".lock"):
            if not os.path.exists(entry):  # another process may have finished it meanwhile
                _download(fs, url, files, cache, key)
    return entry if is_dir else os.path.join(entry, next(iter(files)))


def _filesystem(url: str):
    """(fsspec filesystem, path within it) for ``url``; import errors become install advice."""
    scheme = url.split("://", 1)[0].rsplit("::", 1)[-1]  # "simplecache::s3://..." -> "s3"
    install = f"pip install fsspec {BACKENDS.get(scheme, '')}".rstrip()
    try:
        import fsspec  # optional: only remote URLs need it
    except ImportError as exc:
        raise ModelSourceError(f"cannot fetch {url}: remote model paths need fsspec; "
                               f"{install}") from exc
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        hint = install if scheme in BACKENDS else f"install the fsspec backend for {scheme}://"
        raise ModelSourceError(f"cannot fetch {url}: the fsspec backend for {scheme}:// is "
                               f"not installed; {hint} ({exc})") from exc
    except ValueError as exc:  # "Protocol not known"
        raise ModelSourceError(f"cannot fetch {url}: fsspec does not know {scheme}://; check "
                               f"the URL or install the package providing it ({exc})") from exc
    except Exception as exc:  # some backends authenticate when the filesystem is created
        raise _remote_error(url, exc) from exc


def _list_files(fs, root: str, url: str) -> tuple[dict[str, dict], bool]:
    """({path inside the entry: fsspec info}, whether ``url`` is a directory)."""
    try:
        info = fs.info(root)
        if info.get("type") != "directory":
            return {_basename(root): {**info, "name": root}}, False
        found = fs.find(root, detail=True)
    except Exception as exc:  # backends raise their own types (botocore, aiohttp, ...)
        raise _remote_error(url, exc) from exc
    files, prefix = {}, root.rstrip("/") + "/"
    for name, info in found.items():
        if info.get("type") == "directory":  # object stores may list "dir/" placeholders
            continue
        rel = name[len(prefix):] if name.startswith(prefix) else ""
        # An object key is any string: "a/../../x" must not become a path outside the entry.
        if not rel or any(part in ("", ".", "..") for part in rel.split("/")):
            raise ModelSourceError(f"cannot fetch {url}: {name!r} is not a safe local path "
                                   f"inside the directory; rename it on the source")
        files[rel] = info
    if not files:
        raise ModelSourceError(f"cannot fetch {url}: the directory holds no files; check the URL")
    return files, True


def _basename(root: str) -> str:
    path = urlsplit(root).path if "://" in root else root  # https: drop "?query" / "#frag"
    name = posixpath.basename(path.rstrip("/"))
    return name if name not in ("", ".", "..") else "model"


def _cache_key(url: str, files: dict[str, dict]) -> str:
    """sha256 over the URL and every file's identity: a changed remote file gets a new key."""
    identity = sorted(
        (rel, {k.lower(): str(v) for k, v in info.items() if k.lower() in IDENTITY_FIELDS})
        for rel, info in files.items())
    return hashlib.sha256(json.dumps([url, identity], sort_keys=True).encode()).hexdigest()


def _cache_root(cache_dir: str | None) -> str:
    root = (cache_dir or os.environ.get("WORKERPOOL_CACHE")
            or os.path.join(os.path.expanduser("~"), ".cache", "workerpool", "models"))
    root = os.path.abspath(os.fspath(root))
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise ModelSourceError(f"cannot create the model cache {root}: {exc}; pass cache_dir "
                               f"or set $WORKERPOOL_CACHE to a writable directory") from exc
    return root


@contextlib.contextmanager
def _locked(path: str):
    """Hold an exclusive flock on ``path``. Lock files stay: unlinking one races a waiter."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock, also if this process dies


def _download(fs, url: str, files: dict[str, dict], cache: str, key: str) -> None:
    """Download ``files`` into a temporary sibling, then rename it to ``<cache>/<key>``."""
    # We hold the key's lock, so any temporary of this key is left by a killed fetch.
    for stale in glob.glob(os.path.join(cache, f".tmp-{key}-*")):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache)
    try:
        for rel, info in files.items():
            _copy(fs, url, info, os.path.join(tmp, rel))
        for directory, _, _ in os.walk(tmp):  # file names must be durable before the rename
            _fsync_dir(directory)
        os.rename(tmp, os.path.join(cache, key))
        _fsync_dir(cache)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy(fs, url: str, info: dict, dest: str) -> None:
    """Copy one remote file to ``dest``, fsync it, and check its size against the listing."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        with fs.open(info["name"], "rb") as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
            out.flush()
            os.fsync(out.fileno())
            written = out.tell()
    except Exception as exc:
        raise _remote_error(f"{url} ({info['name']})", exc) from exc
    expected = info.get("size")
    if expected is not None and written != expected:
        raise ModelSourceError(
            f"cannot fetch {url}: got {written} bytes of {info['name']} but the source "
            f"reports {expected}; it may have changed during the download, or the transfer "
            f"was cut short: retry")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remote_error(url: str, exc: Exception) -> ModelSourceError:
    """A ModelSourceError naming the URL, the cause and what to do."""
    if isinstance(exc, FileNotFoundError):
        advice = "nothing found there; check the URL"
    elif isinstance(exc, PermissionError):
        advice = ("access denied; check the credentials for this storage (e.g. AWS_PROFILE, "
                  "GOOGLE_APPLICATION_CREDENTIALS) and that they may read it")
    elif getattr(exc, "errno", None) == errno.ENOSPC:
        advice = "no space left for the cache; free some, or point $WORKERPOOL_CACHE elsewhere"
    else:
        advice = "check the URL, network access and credentials"
    return ModelSourceError(f"cannot fetch {url}: {advice} ({type(exc).__name__}: {exc})")
