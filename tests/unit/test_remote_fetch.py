"""fetch(): remote model files into a local content-addressed cache. No network: memory://
and file:// sources, real processes for the concurrent start."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import uuid

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from workerpool.errors import ModelSourceError, WorkerpoolError
from workerpool.sources.remote import fetch


class GrowingFS(LocalFileSystem):
    """file:// under the scheme wpgrowing://, where a file grows by a byte just before it is
    opened: an object that changed between the listing and the download."""

    protocol = ("wpgrowing",)

    def _open(self, path, mode="rb", **kwargs):
        with open(path, "ab") as f:
            f.write(b"+")
        return super()._open(path, mode, **kwargs)


class OpenLoggingFS(LocalFileSystem):
    """file:// under the scheme wplogged://, appending a line to $WP_TEST_OPEN_LOG for every
    file it opens: how many downloads happened, counted across processes."""

    protocol = ("wplogged",)

    def _open(self, path, mode="rb", **kwargs):
        with open(os.environ["WP_TEST_OPEN_LOG"], "a") as log:
            log.write(f"{os.getpid()} {path}\n")
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("wplogged", OpenLoggingFS, clobber=True)
fsspec.register_implementation("wpgrowing", GrowingFS, clobber=True)


@pytest.fixture
def mem():
    """A fresh prefix in fsspec's process-wide memory filesystem, removed afterwards."""
    fs = fsspec.filesystem("memory")
    prefix = f"/wp-test/{uuid.uuid4().hex}"  # no test ids: "[...]" is a glob to fs.rm
    yield fs, prefix
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)


def entries(cache) -> list[str]:
    """What is in the cache, lock files aside."""
    return sorted(name for name in os.listdir(cache) if not name.endswith(".lock"))


def tree(root) -> dict[str, bytes]:
    out = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_file_is_fetched_with_its_exact_bytes(mem, tmp_path):
    fs, prefix = mem
    data = os.urandom(300_000)
    fs.pipe(f"{prefix}/model.safetensors", data)
    path = fetch(f"memory://{prefix}/model.safetensors", cache_dir=str(tmp_path))
    key = os.path.basename(os.path.dirname(path))
    assert path == os.path.join(tmp_path, key, "model.safetensors") and len(key) == 64
    with open(path, "rb") as f:
        assert f.read() == data
    assert entries(tmp_path) == [key]  # no .tmp-* left


def test_second_fetch_reuses_the_cached_file(mem, tmp_path):
    fs, prefix = mem
    fs.pipe(f"{prefix}/w.pt", b"weights" * 1000)
    url = f"memory://{prefix}/w.pt"
    first = fetch(url, cache_dir=str(tmp_path))
    before = os.stat(first), os.stat(os.path.dirname(first))
    second = fetch(url, cache_dir=str(tmp_path))
    after = os.stat(second), os.stat(os.path.dirname(second))
    assert second == first
    for old, new in zip(before, after):  # the same inode, never rewritten
        assert (new.st_ino, new.st_mtime_ns) == (old.st_ino, old.st_mtime_ns)


def test_changed_remote_file_gets_a_new_entry(mem, tmp_path):
    fs, prefix = mem
    url = f"memory://{prefix}/w.pt"
    fs.pipe(f"{prefix}/w.pt", b"v1")
    old = fetch(url, cache_dir=str(tmp_path))
    fs.pipe(f"{prefix}/w.pt", b"version 2")
    new = fetch(url, cache_dir=str(tmp_path))
    assert new != old and os.path.basename(new) == "w.pt"
    with open(new, "rb") as f:
        assert f.read() == b"version 2"
    with open(old, "rb") as f:  # the old entry is left alone
        assert f.read() == b"v1"


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_directory_url_fetches_every_file(scheme, mem, tmp_path):
    files = {"config.json": b'{"hidden": 8}', "model.safetensors": os.urandom(50_000),
             os.path.join("tokenizer", "vocab.txt"): b"a\nb\n"}
    if scheme == "memory":
        fs, prefix = mem
        for rel, data in files.items():
            fs.pipe(f"{prefix}/model/{rel}", data)
        url = f"memory://{prefix}/model"
    else:
        for rel, data in files.items():
            (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "src" / rel).write_bytes(data)
        url = f"file://{tmp_path}/src/"
    cache = tmp_path / "cache"
    path = fetch(url, cache_dir=str(cache))
    assert os.path.dirname(path) == str(cache) and tree(path) == files
    assert fetch(url, cache_dir=str(cache)) == path and entries(cache) == [os.path.basename(path)]


def test_directory_key_escaping_the_directory_is_refused(mem, tmp_path):
    fs, prefix = mem
    fs.pipe(f"{prefix}/model/config.json", b"{}")
    fs.pipe(f"{prefix}/model/a/../../evil", b"x")  # object keys are strings, not paths
    with pytest.raises(ModelSourceError, match="not a safe local path"):
        fetch(f"memory://{prefix}/model", cache_dir=str(tmp_path))
    assert entries(tmp_path) == [] and not (tmp_path.parent / "evil").exists()


def test_local_path_is_returned_as_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    assert fetch("models/w.pt", cache_dir=str(cache)) == str(tmp_path / "models" / "w.pt")
    assert fetch("/abs/w.pt", cache_dir=str(cache)) == "/abs/w.pt"
    assert not cache.exists()  # nothing fetched, no cache created


def test_default_cache_is_workerpool_cache_env(mem, tmp_path, monkeypatch):
    fs, prefix = mem
    fs.pipe(f"{prefix}/w.pt", b"x")
    monkeypatch.setenv("WORKERPOOL_CACHE", str(tmp_path / "envcache"))
    assert fetch(f"memory://{prefix}/w.pt").startswith(str(tmp_path / "envcache") + os.sep)


def fetch_when_told(url: str, cache: str) -> None:
    """Child side of the concurrency test: say "ready", wait for "go", fetch, print the path."""
    print("ready", flush=True)
    assert sys.stdin.readline() == "go\n"
    print(fetch(url, cache_dir=cache), flush=True)


def test_concurrent_processes_download_once(tmp_path):
    data = os.urandom(8 << 20)  # big enough that the downloads would overlap without the lock
    (tmp_path / "w.bin").write_bytes(data)
    log, cache = tmp_path / "opens.log", str(tmp_path / "cache")
    # Fresh interpreters, like the pool's own processes (multiprocessing's spawn would leave
    # its resource tracker running, which the leak check rightly flags).
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            f"from test_remote_fetch import fetch_when_told; "
            f"fetch_when_told({f'wplogged://{tmp_path}/w.bin'!r}, {cache!r})")
    env = {**os.environ, "WP_TEST_OPEN_LOG": str(log)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    try:
        assert [p.stdout.readline() for p in procs] == ["ready\n"] * 4  # all imported
        for p in procs:  # the barrier: release all four at once
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * 4
    paths = {out.strip() for out in outputs}
    assert len(paths) == 1
    with open(paths.pop(), "rb") as f:
        assert f.read() == data
    assert len(log.read_text().splitlines()) == 1  # one process downloaded, three waited
    assert len(entries(cache)) == 1 and not glob.glob(os.path.join(cache, ".tmp-*"))


def test_missing_remote_file_raises_and_leaves_nothing(mem, tmp_path):
    _, prefix = mem
    url = f"memory://{prefix}/nope.pt"
    with pytest.raises(ModelSourceError, match="check the URL") as info:
        fetch(url, cache_dir=str(tmp_path))
    assert url in str(info.value)
    assert isinstance(info.value, WorkerpoolError) and isinstance(info.value, OSError)
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert entries(tmp_path) == []


def test_download_failing_midway_leaves_no_partial_entry(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_bytes(b"{}")
    (src / "model.safetensors").symlink_to(tmp_path / "gone")  # listed, cannot be opened
    cache = tmp_path / "cache"
    with pytest.raises(ModelSourceError, match="model.safetensors"):
        fetch(f"file://{src}", cache_dir=str(cache))
    assert entries(cache) == []  # no entry, no .tmp-* directory


def test_size_mismatch_is_an_error(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"12345")
    cache = tmp_path / "cache"
    with pytest.raises(ModelSourceError, match="got 6 bytes .* reports 5"):
        fetch(f"wpgrowing://{tmp_path}/w.pt", cache_dir=str(cache))
    assert entries(cache) == []


def test_missing_fsspec_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)  # import fsspec now raises ImportError
    with pytest.raises(ModelSourceError, match=r"pip install fsspec s3fs"):
        fetch("s3://bucket/model.pt", cache_dir=str(tmp_path))
    with pytest.raises(ModelSourceError, match=r"pip install fsspec"):
        fetch("memory://x/model.pt", cache_dir=str(tmp_path))


def test_missing_backend_or_unknown_scheme_says_what_to_do(tmp_path):
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(ModelSourceError, match="not installed; pip install fsspec s3fs"):
            fetch("s3://bucket/model.pt", cache_dir=str(tmp_path))
    with pytest.raises(ModelSourceError, match="does not know nosuch://"):
        fetch("nosuch://bucket/model.pt", cache_dir=str(tmp_path))
