"""``materialize`` (the engine of ``rcds get``) against real repositories served over real HTTP.

A tree is published with the core writer the way the publish service lays out CIDs (``/sw`` and the group
are nested catalogs, the CID is one too, and the tree holds another ``.cvmfscatalog``), served by
``rcds.web.repo_http`` on 127.0.0.1 and read back with an ``HttpSource``. The oracle is the source directory.
Failures are real too: objects removed from or damaged in the store, a dead port, a forwarding proxy that cuts
transfers short, a file-size limit for write errors. Nothing of rcds is mocked.
"""

from __future__ import annotations

import asyncio
import http.server
import logging
import os
import random
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from conftest import DEFAULT_MTIME, Dir, File, Hardlink, Symlink, new_repo, write_tree
from rcds.client.materialize import MaterializeError, MaterializeStats, materialize
from rcds.cvmfs.catalog import Dirent
from rcds.cvmfs.hashes import Suffix
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import Repository
from rcds.cvmfs.sources import HttpSettings
from rcds.web.repo_http import make_app

CID = "/sw/alice/" + "ab" * 32
rng = random.Random(11)
BIG = rng.randbytes(700 * 1024)  # > SMALL_CHUNKS.max_size: several chunks
BIG_TEXT = b"".join(b"line %d of a compressible chunked file\n" % i for i in range(20_000))  # ~800 KB
MEDIUM = rng.randbytes(3000)

TREE: dict[str, object] = {
    "README": File(b"hello world\n", mtime=1_600_000_001),
    "empty.txt": b"",
    "private.key": File(b"secret\n", mode=0o600),
    "bin": {
        "run.sh": File(b"#!/bin/sh\necho hi\n", mode=0o755, mtime=1_600_000_002),
        "tool": File(b"\x7fELF\x02\x01\x01" + bytes(5000), mode=0o750),
    },
    "links": {
        "relative": Symlink("../README", mtime=1_600_000_003),
        "absolute": Symlink("/cvmfs/other.example/lib"),
        "dangling": Symlink("does/not/exist"),
    },
    "empty_dir": {},
    "read_only": Dir(
        {"inside.txt": b"in a read-only directory\n", "deeper": Dir({}, mode=0o500)}, mode=0o555
    ),
    "a": {"b": {"c": {"deep.txt": File(b"deep\n", mtime=1_600_000_004)}}},
    "data": {
        "orig.txt": File(b"shared by two names\n", mtime=1_600_000_005),
        "same_dir_link.txt": Hardlink("data/orig.txt"),
        "medium.bin": MEDIUM,
    },
    "with space.txt": b"a name with spaces\n",
    "ünïcødé 文件.txt": b"unicode name\n",
    "big.bin": BIG,
    "big.txt": File(BIG_TEXT, mode=0o755),
    "same_as_readme_other_mode": File(b"hello world\n", mode=0o600, mtime=1_600_000_001),
    "sub": {
        ".cvmfscatalog": b"",
        "inside.txt": b"inside a nested catalog of the tree\n",
        "deeper": {"x.txt": b"x"},
        "big_copy.bin": BIG,
    },
}


# --- a repository served over HTTP -----------------------------------------------------------------


class RepoServer:
    """repo_http in a thread on 127.0.0.1 (a real socket, real HTTP)."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = web.AppRunner(make_app(repos))

        async def start() -> int:
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", 0).start()
            return int(self.runner.addresses[0][1])

        self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=5)

    def url(self, fqrn: str) -> str:
        return f"http://127.0.0.1:{self.port}/cvmfs/{fqrn}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


@dataclass
class Served:
    repo: Repository
    src: Path
    src2: Path  # the same files with other modes and mtimes, published at CID2
    server: RepoServer

    @property
    def url(self) -> str:
        return self.server.url(self.repo.fqrn)


CID2 = "/sw/alice/" + "cd" * 32


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, repo_template: Path) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("materialize")
    repo = new_repo(base / "storage", repo_template)
    src = write_tree(base / "src", TREE)
    os.mkfifo(src / "a" / "fifo")
    os.utime(src / "a", (DEFAULT_MTIME, DEFAULT_MTIME))
    src2 = base / "src2"
    src2.mkdir()
    for name in ("README", "big.bin", "big.txt"):
        (src2 / name).write_bytes((src / name).read_bytes())
        (src2 / name).chmod(0o640)
        os.utime(src2 / name, (DEFAULT_MTIME + 7, DEFAULT_MTIME + 7))
    os.utime(src2, (DEFAULT_MTIME, DEFAULT_MTIME))
    with repo.transaction() as txn:
        txn.mkdir("/sw", nested=True)
        txn.mkdir("/sw/alice", nested=True)
        txn.add_directory(CID, src)
        txn.add_directory(CID2, src2)
        txn.commit()
    server = RepoServer({repo.fqrn: repo.storage})
    try:
        yield Served(repo, src, src2, server)
    finally:
        server.close()


@pytest.fixture
def reader(served: Served, tmp_path: Path) -> Iterator[RepositoryReader]:
    r = RepositoryReader.open(
        served.url, served.repo.public_key_path, fqrn=served.repo.fqrn, cache_dir=tmp_path / "reader-cache"
    )
    yield r
    r.close()


# --- helpers ---------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """relative path -> (type, mode bits, mtime ns, content or symlink target) for everything below root."""
    out: dict[str, tuple[object, ...]] = {}

    def record(p: Path, rel: str) -> None:
        st = os.lstat(p)
        if stat.S_ISREG(st.st_mode):
            data: object = p.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            data = os.readlink(p)
        elif stat.S_ISDIR(st.st_mode):
            data = None
        else:
            return  # special files are not materialised
        out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_mtime_ns, data)

    record(root, ".")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            record(p, p.relative_to(root).as_posix())
    return out


def cache_inodes(cache: Path) -> dict[int, Path]:
    return {os.lstat(p).st_ino: p for p in (cache / "files").glob("*/*")}


def object_path(served: Served, rel: str) -> Path:
    """The stored object of a whole (unchunked) file of the CID."""
    r = RepositoryReader.open(served.repo.storage, served.repo.public_key_path)
    try:
        d: Dirent = r.stat(f"{CID}/{rel}")
    finally:
        r.close()
    assert d.hash is not None and not d.is_chunked
    return served.repo.storage / d.hash.object_name()


def chunk_path(served: Served, rel: str, index: int) -> Path:
    r = RepositoryReader.open(served.repo.storage, served.repo.public_key_path)
    try:
        d = r.stat(f"{CID}/{rel}")
    finally:
        r.close()
    return served.repo.storage / d.chunks[index].hash.object_name(Suffix.PARTIAL)


def assert_not_left(dest: Path) -> None:
    assert not os.path.lexists(dest)
    assert not os.path.lexists(dest.parent / f".{dest.name}.rcds-partial")


GetFn = Callable[..., MaterializeStats]


@pytest.fixture
def get(reader: RepositoryReader) -> GetFn:
    def run(dest: Path, path: str = CID, **kwargs: object) -> MaterializeStats:
        kwargs.setdefault("progress", False)
        return materialize(reader, path, dest, **kwargs)  # type: ignore[arg-type]

    return run


# --- the tree -------------------------------------------------------------------------------------


def test_materialised_tree_is_identical_to_the_source(
    served: Served, get: GetFn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dest = tmp_path / "out" / "dest"
    with caplog.at_level(logging.INFO, logger="rcds.client"):
        stats = get(dest, cache_dir=tmp_path / "cache")
    assert snapshot(dest) == snapshot(served.src)
    assert not (dest / ".cvmfscatalog").exists()  # the marker rcds adds; sub/'s came from the source
    assert (dest / "sub" / ".cvmfscatalog").is_file()
    assert os.lstat(dest / "data/orig.txt").st_ino == os.lstat(dest / "data/same_dir_link.txt").st_ino
    assert stat.S_IMODE(os.lstat(dest / "read_only").st_mode) == 0o555
    assert stats.files == sum(1 for v in snapshot(served.src).values() if v[0] == stat.S_IFREG)
    assert stats.directories == sum(1 for v in snapshot(served.src).values() if v[0] == stat.S_IFDIR)
    assert stats.symlinks == 3
    assert stats.bytes == sum(len(v[3]) for v in snapshot(served.src).values() if isinstance(v[3], bytes))
    assert 0 < stats.downloaded_bytes < stats.bytes  # compressed, and identical content fetched once
    assert stats.cached_files == 0
    assert stats.linked_files == stats.files and stats.copied_files == 0
    assert any("skipping special file" in r.getMessage() for r in caplog.records)
    assert any(r.getMessage() == "get" for r in caplog.records)
    assert sorted(os.listdir(dest.parent)) == ["dest"]  # no staging directory left beside it


def test_a_nested_catalog_boundary_is_crossed(reader: RepositoryReader) -> None:
    assert reader.stat(CID).is_nested_root
    assert reader.catalog_for(f"{CID}/sub/inside.txt")[0] == f"{CID}/sub"


def test_chunked_files_are_assembled_from_their_chunks(served: Served, get: GetFn, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    get(dest, cache_dir=tmp_path / "cache", jobs=3)
    assert (dest / "big.bin").read_bytes() == BIG
    assert (dest / "big.txt").read_bytes() == BIG_TEXT
    assert (dest / "sub" / "big_copy.bin").read_bytes() == BIG


def test_private_cache_is_removed_after_success(served: Served, get: GetFn, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    stats = get(dest)
    assert sorted(os.listdir(tmp_path)) == ["dest", "reader-cache"]
    assert snapshot(dest) == snapshot(served.src)
    assert stats.linked_files == stats.files  # the hard links keep the data of the removed cache


# --- the node cache -------------------------------------------------------------------------------


def test_second_get_with_the_same_cache_downloads_nothing(served: Served, get: GetFn, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = get(tmp_path / "one", cache_dir=cache)
    second = get(tmp_path / "two", cache_dir=cache)
    assert second.downloaded_bytes == 0
    assert second.cached_files == second.files == first.files
    assert second.linked_files == second.files and second.copied_files == 0
    assert snapshot(tmp_path / "two") == snapshot(served.src)
    inodes = cache_inodes(cache)
    for p in (tmp_path / "two").rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert p.stat().st_ino in inodes, p


def test_other_mode_and_mtime_of_cached_content_is_a_local_copy(
    served: Served, get: GetFn, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    get(tmp_path / "one", cache_dir=cache)
    stats = get(tmp_path / "two", CID2, cache_dir=cache)
    assert stats.downloaded_bytes == 0 and stats.cached_files == 3
    assert snapshot(tmp_path / "two") == snapshot(served.src2)
    assert os.lstat(tmp_path / "two" / "README").st_ino != os.lstat(tmp_path / "one" / "README").st_ino


def test_a_cache_entry_written_through_a_hard_link_is_not_propagated(
    served: Served, get: GetFn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    get(tmp_path / "one", cache_dir=cache)
    with open(tmp_path / "one" / "README", "r+b") as f:  # same size, new bytes: only the mtime tells
        f.write(b"HELLO")
    (tmp_path / "one" / "bin" / "tool").chmod(0o700)  # a metadata change shows through the link too
    with caplog.at_level(logging.WARNING, logger="rcds.client"):
        stats = get(tmp_path / "two", cache_dir=cache)
    assert snapshot(tmp_path / "two") == snapshot(served.src)
    assert 0 < stats.downloaded_bytes < 1000
    assert stats.cached_files == stats.files - 1  # tool; README was copied from its other-mode twin
    assert sum("cache entry was modified" in r.getMessage() for r in caplog.records) == 2


def test_link_false_copies(served: Served, get: GetFn, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    stats = get(tmp_path / "dest", cache_dir=cache, link=False)
    dest = tmp_path / "dest"
    assert snapshot(dest) == snapshot(served.src)
    inodes = cache_inodes(cache)
    assert not any(p.lstat().st_ino in inodes for p in dest.rglob("*"))
    # the hard-link pair is still one inode (its second name is a link to the first), nothing else is
    assert os.lstat(dest / "data/orig.txt").st_ino == os.lstat(dest / "data/same_dir_link.txt").st_ino
    assert os.lstat(dest / "data/orig.txt").st_nlink == 2
    assert os.lstat(dest / "sub/big_copy.bin").st_ino != os.lstat(dest / "big.bin").st_ino
    assert (stats.linked_files, stats.copied_files) == (1, stats.files - 1)


def test_cache_on_another_file_system_is_copied_from(served: Served, get: GetFn, tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's tmp_path")
    cache = Path(tempfile.mkdtemp(prefix="rcds-test-cache-", dir=shm))
    try:
        stats = get(tmp_path / "dest", cache_dir=cache)
        assert snapshot(tmp_path / "dest") == snapshot(served.src)
        assert (stats.linked_files, stats.copied_files) == (1, stats.files - 1)  # the hard-link pair: 1
        again = get(tmp_path / "again", cache_dir=cache)
        assert again.downloaded_bytes == 0 and again.cached_files == again.files
        assert snapshot(tmp_path / "again") == snapshot(served.src)
    finally:
        shutil.rmtree(cache)


def test_concurrent_gets_share_one_cache(served: Served, reader: RepositoryReader, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    results: dict[int, MaterializeStats | BaseException] = {}

    def one(i: int) -> None:
        try:
            results[i] = materialize(reader, CID, tmp_path / f"d{i}", cache_dir=cache, jobs=4, progress=False)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = snapshot(served.src)
    for i in range(3):
        assert isinstance(results[i], MaterializeStats), results[i]
        assert snapshot(tmp_path / f"d{i}") == expected
    assert os.listdir(cache / "tmp") == []
    # the first writer of an entry wins and the others link its inode: one copy of the data on disk
    for p in ("README", "big.bin", "sub/inside.txt"):
        assert len({os.lstat(tmp_path / f"d{i}" / p).st_ino for i in range(3)}) == 1, p


GET_SCRIPT = """
import sys
from pathlib import Path
from rcds.client.materialize import materialize
from rcds.cvmfs.reader import RepositoryReader
url, key, path, dest, cache = sys.argv[1:]
with RepositoryReader.open(url, Path(key), cache_dir=Path(dest + ".reader")) as reader:
    s = materialize(reader, path, Path(dest), cache_dir=Path(cache), progress=False)
print(s.downloaded_bytes, s.files)
"""


def test_concurrent_processes_share_one_cache(served: Served, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = [served.url, str(served.repo.public_key_path), CID]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", GET_SCRIPT, *args, str(tmp_path / f"p{i}"), str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    expected = snapshot(served.src)
    for i in range(3):
        assert snapshot(tmp_path / f"p{i}") == expected
    assert os.listdir(cache / "tmp") == []


# --- failures ---------------------------------------------------------------------------------------


def test_dest_that_exists_is_refused_and_left_alone(get: GetFn, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine.txt").write_bytes(b"keep me")
    with pytest.raises(MaterializeError, match="already exists"):
        get(dest, cache_dir=tmp_path / "cache")
    assert os.listdir(dest) == ["mine.txt"] and (dest / "mine.txt").read_bytes() == b"keep me"
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / ".dest.rcds-partial").exists()


def test_path_that_is_not_a_directory_is_refused(get: GetFn, tmp_path: Path) -> None:
    with pytest.raises(MaterializeError, match="does not exist"):
        get(tmp_path / "dest", "/sw/nothing/here")
    with pytest.raises(MaterializeError, match="not a directory"):
        get(tmp_path / "dest", f"{CID}/README")
    assert_not_left(tmp_path / "dest")


def test_interrupted_get_resumes_from_the_private_cache(served: Served, get: GetFn, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    obj = object_path(served, "sub/deeper/x.txt")  # the smallest: fetched last
    hidden = obj.with_name(obj.name + ".away")
    obj.rename(hidden)
    try:
        # jobs=1 and biggest first: everything else is complete in the cache when the missing one fails
        with pytest.raises(MaterializeError, match=r"sub/deeper/x\.txt is missing on the server"):
            get(dest, jobs=1)
    finally:
        hidden.rename(obj)
    assert_not_left(dest)
    assert (tmp_path / ".dest.rcds-cache").is_dir()  # kept for the re-run
    stats = get(dest)
    assert snapshot(dest) == snapshot(served.src)
    assert stats.downloaded_bytes == obj.stat().st_size
    assert not (tmp_path / ".dest.rcds-cache").exists()


def test_stale_staging_directory_is_replaced(served: Served, get: GetFn, tmp_path: Path) -> None:
    stale = tmp_path / ".dest.rcds-partial"
    write_tree(stale, {"junk": Dir({"x": b"half-written"}, mode=0o500)})
    get(tmp_path / "dest", cache_dir=tmp_path / "cache")
    assert not stale.exists()
    assert snapshot(tmp_path / "dest") == snapshot(served.src)


@pytest.mark.parametrize("damage", ["flip", "truncate", "other-content"])
def test_corrupt_object_on_the_server_is_detected(
    served: Served, get: GetFn, tmp_path: Path, damage: str
) -> None:
    obj = chunk_path(served, "big.txt", 1)
    original = obj.read_bytes()
    if damage == "flip":
        bad = bytearray(original)
        bad[len(bad) // 2] ^= 0xFF
        obj.write_bytes(bytes(bad))
    elif damage == "truncate":
        obj.write_bytes(original[: len(original) // 2])
    else:
        obj.write_bytes(zlib.compress(zlib.decompress(original)[::-1]))
    try:
        with pytest.raises(MaterializeError, match=rf"{obj.name} of big\.txt is corrupt"):
            get(tmp_path / "dest", cache_dir=tmp_path / "cache")
    finally:
        obj.write_bytes(original)
    assert_not_left(tmp_path / "dest")
    assert os.listdir(tmp_path / "cache" / "tmp") == []
    for entry in (tmp_path / "cache" / "files").glob("*/*"):  # whatever is in the cache is complete
        assert entry.stat().st_size > 0 or entry.name.startswith("pty_")


def test_failover_from_a_dead_server(served: Served, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nothing listens once the socket is closed
    urls = f"http://127.0.0.1:{dead}/cvmfs/{served.repo.fqrn};{served.url}"
    with RepositoryReader.open(urls, served.repo.public_key_path, cache_dir=tmp_path / "rc") as reader:
        reader.source._good_url = 0  # type: ignore[attr-defined]  # objects start at the dead one too
        materialize(reader, CID, tmp_path / "dest", cache_dir=tmp_path / "cache", progress=False)
    assert snapshot(tmp_path / "dest") == snapshot(served.src)


# --- the HTTP path: proxies, failover mid-transfer, write errors ------------------------------------


class ForwardProxy:
    """A minimal HTTP forward proxy (absolute-form requests, keep-alive) that can cut bodies short.

    ``truncate`` names object keys whose next response is cut after half of the body and the connection
    closed, the way a proxy or server dying mid-transfer looks to the client.
    """

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.truncate: set[str] = set()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()  # headers and body go out in two writes: no Nagle delay between them
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self) -> None:
                proxy.requests.append(self.path)
                try:
                    with urllib.request.urlopen(self.path, timeout=5) as r:
                        status, body = r.status, r.read()
                except urllib.error.HTTPError as exc:
                    status, body = exc.code, exc.read()
                key = self.path.split("/cvmfs/", 1)[1].split("/", 1)[1]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if key in proxy.truncate:
                    proxy.truncate.discard(key)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy() -> Iterator[ForwardProxy]:
    p = ForwardProxy()
    yield p
    p.close()


def test_objects_go_through_the_configured_http_proxy(
    served: Served, proxy: ForwardProxy, tmp_path: Path
) -> None:
    with RepositoryReader.open(
        served.url, served.repo.public_key_path, cache_dir=tmp_path / "rc", proxies=[proxy.url]
    ) as reader:
        materialize(reader, CID, tmp_path / "dest", cache_dir=tmp_path / "cache", progress=False)
    assert snapshot(tmp_path / "dest") == snapshot(served.src)
    big = chunk_path(served, "big.bin", 0)
    assert f"{served.url}/data/{big.parent.name}/{big.name}" in proxy.requests


def test_a_transfer_cut_short_is_retried_from_the_start(
    served: Served, proxy: ForwardProxy, tmp_path: Path
) -> None:
    chunk = chunk_path(served, "big.txt", 2)
    whole = object_path(served, "bin/tool")
    proxy.truncate = {f"data/{p.parent.name}/{p.name}" for p in (chunk, whole)}
    with RepositoryReader.open(
        served.url, served.repo.public_key_path, cache_dir=tmp_path / "rc", proxies=[proxy.url]
    ) as reader:
        stats = materialize(reader, CID, tmp_path / "dest", cache_dir=tmp_path / "cache", progress=False)
    assert proxy.truncate == set()  # both were cut once...
    assert snapshot(tmp_path / "dest") == snapshot(served.src)  # ...and fetched again, whole
    half = (chunk.stat().st_size // 2) + (whole.stat().st_size // 2)
    assert stats.downloaded_bytes > half


def test_failover_to_the_next_proxy_mid_transfer(served: Served, proxy: ForwardProxy, tmp_path: Path) -> None:
    chunk = chunk_path(served, "big.bin", 1)
    key = f"data/{chunk.parent.name}/{chunk.name}"
    second = ForwardProxy()
    try:
        proxy.truncate = {key}
        settings = HttpSettings(retries=0)  # no second try on the same proxy: the next one must serve it
        with RepositoryReader.open(
            served.url,
            served.repo.public_key_path,
            cache_dir=tmp_path / "rc",
            proxies=[proxy.url, second.url],
            settings=settings,
        ) as reader:
            materialize(reader, CID, tmp_path / "dest", cache_dir=tmp_path / "cache", progress=False)
        assert f"{served.url}/{key}" in second.requests
    finally:
        second.close()
    assert snapshot(tmp_path / "dest") == snapshot(served.src)


def test_a_write_error_fails_cleanly_and_a_rerun_completes(
    served: Served, get: GetFn, tmp_path: Path
) -> None:
    # No file above 100 KB can be written (EFBIG), the way a full disk stops a get part-way.
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, old_limit[1]))
    try:
        with pytest.raises(MaterializeError, match=r"cannot write big\.(bin|txt)"):
            get(tmp_path / "dest", cache_dir=tmp_path / "cache", jobs=1)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert_not_left(tmp_path / "dest")
    assert os.listdir(tmp_path / "cache" / "tmp") == []
    stats = get(tmp_path / "dest", cache_dir=tmp_path / "cache")
    assert snapshot(tmp_path / "dest") == snapshot(served.src)
    assert stats.downloaded_bytes > 0


def test_through_httpsource_with_a_rewind_mid_transfer(
    served: Served, proxy: ForwardProxy, tmp_path: Path
) -> None:
    # A proxy with credentials is not for the http.client path: every object goes through
    # HttpSource.fetch (httpx), which rewinds the sink with seek(0) + truncate() to retry a cut transfer.
    chunk = chunk_path(served, "big.bin", 2)
    proxy.truncate = {f"data/{chunk.parent.name}/{chunk.name}"}
    host_port = proxy.url.removeprefix("http://")
    with RepositoryReader.open(
        served.url,
        served.repo.public_key_path,
        cache_dir=tmp_path / "rc",
        proxies=[f"http://user:secret@{host_port}"],
    ) as reader:
        stats = materialize(reader, CID, tmp_path / "dest", cache_dir=tmp_path / "cache", progress=False)
    assert proxy.truncate == set()
    assert snapshot(tmp_path / "dest") == snapshot(served.src)
    assert stats.downloaded_bytes > 0


def test_a_local_storage_directory_works_too(served: Served, tmp_path: Path) -> None:
    with RepositoryReader.open(
        served.repo.storage, served.repo.public_key_path, cache_dir=tmp_path / "rc"
    ) as reader:
        stats = materialize(reader, CID, tmp_path / "dest", cache_dir=tmp_path / "cache", progress=False)
    assert snapshot(tmp_path / "dest") == snapshot(served.src)
    assert stats.downloaded_bytes > 0
