"""``rcds replicate`` (``rcds.cvmfs.replica``): a stratum 1 pulled over real HTTP from real repositories.

Sources are rcds repositories published with the core writer and the reference repository written by the
CVMFS 2.12 tools, served by ``rcds.web.repo_http`` on 127.0.0.1; the server records every request, which is
how "fetches only what is missing" is checked. Replicas are checked with ``check_repository`` and served by
``repo_http`` too, then read back file by file. Interruptions are real processes killed at a failpoint, an
object deleted from or damaged on the source, a stale mirror; proxies are a dead port and a real squid.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from conftest import FQRN, Hardlink, Symlink, Unpacked, write_tree
from rcds.cvmfs import failpoints
from rcds.cvmfs.checker import check_repository
from rcds.cvmfs.hashes import Algorithm, ContentHash, Suffix
from rcds.cvmfs.objects import compress
from rcds.cvmfs.reader import ReaderError, RepositoryReader
from rcds.cvmfs.reflog import Reflog
from rcds.cvmfs.replica import PRIVATE_DIR, ReplicaError, SnapshotReport, date_utc, snapshot, watch
from rcds.cvmfs.repository import Repository
from rcds.web.repo_http import add_repository_routes
from squid import SquidProxy, free_port, require_squid
from test_materialize import ForwardProxy

MANIFEST = ".cvmfspublished"
ENSEMBLE = {".cvmfs_master_replica", ".cvmfspublished", ".cvmfswhitelist"}


class Server:
    """repo_http in a thread on 127.0.0.1, recording the path of every request."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.requests: list[str] = []

        @web.middleware
        async def record(request: web.Request, handler: Callable[..., object]) -> web.StreamResponse:
            self.requests.append(request.path)
            return await handler(request)  # type: ignore[misc,no-any-return]

        app = web.Application(middlewares=[record])
        add_repository_routes(app, repos)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = web.AppRunner(app)

        async def start() -> int:
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", 0).start()
            return int(self.runner.addresses[0][1])

        self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=5)

    def url(self, fqrn: str = FQRN) -> str:
        return f"http://127.0.0.1:{self.port}/cvmfs/{fqrn}"

    def taken(self) -> list[str]:
        """Repository-relative keys requested since the last call."""
        out = [p.split("/", 3)[3] for p in self.requests if p.startswith("/cvmfs/") and p.count("/") >= 3]
        self.requests.clear()
        return out

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


@pytest.fixture
def servers() -> Iterator[Callable[[dict[str, Path]], Server]]:
    started: list[Server] = []

    def factory(repos: dict[str, Path]) -> Server:
        started.append(Server(repos))
        return started[-1]

    yield factory
    for s in started:
        s.close()


def _tree(tmp: Path, name: str, seed: int) -> Path:
    """Chunked and whole files, hard links, symlinks, an empty file and directory, a nested catalog."""
    rnd = random.Random(seed)
    return write_tree(
        tmp / name,
        {
            "README": f"tree {name}\n".encode(),
            "empty": b"",
            "big.bin": rnd.randbytes(300 * 1024),  # > SMALL_CHUNKS max: several chunks
            "bin": {"tool": rnd.randbytes(5000), "tool-alias": Hardlink("bin/tool")},
            "link": Symlink("README"),
            "dangling": Symlink("../nowhere"),
            "empty_dir": {},
            "sub": {".cvmfscatalog": b"", "inner.txt": f"nested {seed}\n".encode(), "deep": {"x": b"x"}},
        },
    )


def _publish(repo: Repository, path: str, src: Path | None, tag: str | None = None) -> int:
    with repo.transaction() as txn:
        if src is None:
            txn.remove(path)
        else:
            txn.mkdir("/sw", nested=True)
            txn.add_directory(path, src, nested=True)
        return txn.commit(tag=tag).revision


def _data(storage: Path) -> set[str]:
    """Every object key in a storage directory (not the staging area)."""
    return {
        f"data/{p.parent.name}/{p.name}"
        for p in (storage / "data").glob("??/*")
        if p.is_file() and p.parent.name != "txn"
    }


def _object_valid(storage: Path, key: str) -> bool:
    name = key[5:7] + key[8:]
    suffix = name[-1] if len(name) % 2 else ""  # 40 hex (+ suffix letter); only SHA-1 here
    h = ContentHash.from_hex(name[: len(name) - len(suffix)])
    return ContentHash.of((storage / key).read_bytes(), Algorithm.SHA1) == h


def _content(reader: RepositoryReader) -> dict[str, tuple[object, ...]]:
    """Every entry with its metadata, and every regular file's bytes."""
    out: dict[str, tuple[object, ...]] = {}
    for e in reader.walk():
        d = e.dirent
        data = reader.read(e.path) if d.is_regular else None
        out[e.path] = (d.mode, d.size, d.mtime, d.symlink, d.linkcount, d.hardlink_group > 0, data)
    return out


def _check_clean(storage: Path, key: Path) -> None:
    with RepositoryReader.open(storage, key) as reader:
        report = check_repository(reader)
    assert report.issues == [], report.issues
    assert report.objects > 0


@pytest.fixture
def source(make_repo: Callable[..., Repository], tmp_path: Path) -> Repository:
    """An rcds repository with three revisions: /sw/a (named tag), /sw/b, and /sw/a again."""
    repo: Repository = make_repo()
    _publish(repo, "/sw/a", _tree(tmp_path, "a1", 1), tag="release-1")
    _publish(repo, "/sw/b", _tree(tmp_path, "b", 2))
    _publish(repo, "/sw/a", _tree(tmp_path, "a2", 3))
    return repo


# --- a full replica --------------------------------------------------------------------------------------


def test_a_replica_is_complete_verified_and_reads_like_the_source(
    source: Repository, servers: Callable[[dict[str, Path]], Server], tmp_path: Path
) -> None:
    server = servers({FQRN: source.storage})
    replica = tmp_path / "replica"
    seen: list[tuple[str, int, int]] = []
    report = snapshot(
        server.url(), replica, public_keys=[source.public_key_path], progress=lambda *a: seen.append(a)
    )
    assert report.fqrn == FQRN and report.revision == source.manifest().revision == 3
    assert report.changed and report.previous_revision is None
    assert report.revisions_pulled == [3, 2, 1]  # current, trunk-previous, the tag release-1
    assert {phase for phase, _done, _total in seen} == {"objects", "catalogs"}
    assert seen[-2][1] == seen[-2][2] > 0  # objects: all fetched in the end

    # byte-identical root files; layout of a stratum 1; every object hash-valid
    for name in (MANIFEST, ".cvmfswhitelist"):
        assert (replica / name).read_bytes() == (source.storage / name).read_bytes()
    assert sorted(p.name for p in (replica / "data").iterdir()) == sorted(
        [f"{i:02x}" for i in range(256)] + ["txn"]
    )
    keys = _data(replica)
    assert report.objects_fetched == len(keys) and report.bytes_fetched == sum(
        (replica / k).stat().st_size for k in keys
    )
    assert all(_object_valid(replica, k) for k in keys)
    assert keys <= _data(source.storage)
    assert not list((replica / "data" / "txn").iterdir())

    # the replica's own reflog lists the root catalogs it holds and the current certificate and history
    m = source.manifest()
    reflog = Reflog(replica / ".cvmfsreflog")
    listed = {h for h, _kind, _ts in reflog.list()}
    reflog.close()
    # ...and its checksum sits where `cvmfs_swissknife check -R` of a stock stratum 1 looks for it
    own = hashlib.sha1((replica / ".cvmfsreflog").read_bytes()).hexdigest()
    assert (replica / ".rcds-replica" / "reflog.chksum").read_text() == own + "\n"
    assert {m.root_catalog, m.certificate, m.history} <= listed
    assert (replica / ".cvmfs_last_snapshot").read_text().endswith(" UTC " + date_utc()[-4:] + "\n")
    status = json.loads((replica / ".cvmfs_status.json").read_text())
    assert status["last_snapshot"] == (replica / ".cvmfs_last_snapshot").read_text().strip()

    _check_clean(replica, source.public_key_path)

    # served like a stratum 1: stamps yes, the private area no; read back over HTTP, file by file
    replica_server = servers({FQRN: replica})
    with httpx.Client(base_url=replica_server.url()) as client:
        assert client.get("/.cvmfs_last_snapshot").status_code == 200
        assert client.get("/.cvmfs_status.json").json()["last_snapshot"]
        assert client.get(f"/{PRIVATE_DIR}/lock").status_code == 404
    with (
        RepositoryReader.open(source.storage, source.public_key_path, fqrn=FQRN) as want,
        RepositoryReader.open(replica_server.url(), source.public_key_path, fqrn=FQRN) as got,
    ):
        expected = _content(want)
        assert _content(got) == expected
        assert any(size[1] > 256 * 1024 for size in expected.values())  # the chunked files are there
        tag = got.history()
        assert tag is not None
        old = tag.get("release-1")
        tag.close()
        assert old is not None and (replica / old.root_hash.object_name(Suffix.CATALOG)).is_file()

    # a replica is not a source for replication, a stratum 0 is no replica's storage, one snapshot at a time
    with pytest.raises(ReplicaError, match="not a CernVM-FS server for replication"):
        snapshot(replica_server.url(), tmp_path / "r2", public_keys=[source.public_key_path])
    with pytest.raises(ReplicaError, match="stratum 0"):
        snapshot(server.url(), source.storage, public_keys=[source.public_key_path])
    with open(replica / PRIVATE_DIR / "lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ReplicaError, match="another snapshot"):
            snapshot(server.url(), replica, public_keys=[source.public_key_path])


def test_the_cvmfs_reference_repository_replicates_identically(
    unpacked: Unpacked, servers: Callable[[dict[str, Path]], Server], tmp_path: Path
) -> None:
    ref = unpacked["cvmfs-2.12"]
    server = servers({ref.fqrn: ref.storage})
    replica = tmp_path / "replica"
    report = snapshot(server.url(ref.fqrn), replica, public_keys=[ref.public_key], fqrn=ref.fqrn, jobs=3)
    assert report.revision == 2 and report.catalogs == 3  # root, /lib/nested, /cids/sw/group/abc123
    assert (replica / MANIFEST).read_bytes() == (ref.storage / MANIFEST).read_bytes()
    assert all(_object_valid(replica, k) for k in _data(replica))
    _check_clean(replica, ref.public_key)
    replica_server = servers({ref.fqrn: replica})
    with (
        RepositoryReader.open(ref.storage, ref.public_key) as want,
        RepositoryReader.open(replica_server.url(ref.fqrn), ref.public_key) as got,
    ):
        assert _content(got) == _content(want)
    assert snapshot(server.url(ref.fqrn), replica, public_keys=[ref.public_key]).objects_fetched == 0


# --- incremental snapshots ------------------------------------------------------------------------------


def test_a_new_revision_fetches_only_its_new_objects_and_changed_catalogs(
    source: Repository, servers: Callable[[dict[str, Path]], Server], tmp_path: Path
) -> None:
    server = servers({FQRN: source.storage})
    replica = tmp_path / "replica"
    keys = [source.public_key_path]
    snapshot(server.url(), replica, public_keys=keys)
    before = _data(source.storage)
    server.taken()

    # /sw/c: a new CID; its big.bin repeats /sw/b's (present), the rest is new
    c = _tree(tmp_path, "c", 4)
    shutil.copyfile(tmp_path / "b" / "big.bin", c / "big.bin")
    assert _publish(source, "/sw/c", c) == 4
    new = _data(source.storage) - before
    report = snapshot(server.url(), replica, public_keys=keys)
    requested = server.taken()
    data_requests = [k for k in requested if k.startswith("data/")]
    assert sorted(data_requests) == sorted(new)  # each new object once, nothing else
    assert set(requested) - set(data_requests) == ENSEMBLE
    assert report.changed and (report.previous_revision, report.revision) == (3, 4)
    assert report.objects_fetched == len(new)
    # root, /sw, /sw/c, /sw/c/sub; not /sw/a, /sw/b or their nested catalogs
    assert report.catalogs == sum(k.endswith("C") for k in new) == 4
    assert report.objects_present > 0  # what /sw/c shares with /sw/b, referenced but not fetched
    assert (replica / MANIFEST).read_bytes() == (source.storage / MANIFEST).read_bytes()

    # two revisions at once: the intermediate one is pulled too (swissknife pull -p), so that a client
    # still on it can fail over here; a third one, swept from the source by GC (G=yes), is skipped
    d_tree = write_tree(tmp_path / "d", {"only-in-5.txt": b"published in revision 5 only\n"})
    assert _publish(source, "/sw/d", d_tree) == 5
    assert _publish(source, "/sw/d", None) == 6
    assert _publish(source, "/sw/e", write_tree(tmp_path / "e", {"e.txt": b"e\n"})) == 7
    report = snapshot(server.url(), replica, public_keys=keys)
    assert report.revisions_pulled == [7, 6, 5]  # back to revision 4, which the replica has
    assert report.skipped == []
    only_in_5 = compress(b"published in revision 5 only\n")[1]
    assert (replica / only_in_5.object_name()).is_file()
    reflog = Reflog(replica / ".cvmfsreflog")
    assert all(reflog.contains(_root_of(source, rev)) for rev in (4, 5, 6, 7))
    reflog.close()
    _check_clean(replica, keys[0])


def _root_of(repo: Repository, revision: int) -> ContentHash:
    """The root catalog of ``revision`` (walking back from the current one)."""
    h: ContentHash | None = repo.manifest().root_catalog
    while h is not None:
        cat = repo.open_catalog(h)
        rev, prev = cat.revision, cat.previous_revision
        cat.close()
        if rev == revision:
            return h
        h = prev
    raise KeyError(revision)


def test_revisions_swept_from_a_gc_able_source_are_skipped(
    source: Repository, servers: Callable[[dict[str, Path]], Server], tmp_path: Path
) -> None:
    server = servers({FQRN: source.storage})
    replica = tmp_path / "replica"
    snapshot(server.url(), replica, public_keys=[source.public_key_path])
    _publish(source, "/sw/x", write_tree(tmp_path / "x", {"x": b"x5\n"}))
    _publish(source, "/sw/y", write_tree(tmp_path / "y", {"y": b"y6\n"}))
    _publish(source, "/sw/z", write_tree(tmp_path / "z", {"z": b"z7\n"}))
    (source.storage / _root_of(source, 4).object_name(Suffix.CATALOG)).unlink()  # as a GC sweep does
    report = snapshot(server.url(), replica, public_keys=[source.public_key_path])
    assert report.revisions_pulled == [6, 5]
    assert len(report.skipped) == 1 and "revisions before 5" in report.skipped[0]
    _check_clean(replica, source.public_key_path)


def test_a_snapshot_with_nothing_new_changes_nothing_and_fetches_only_the_manifest_ensemble(
    source: Repository, servers: Callable[[dict[str, Path]], Server], tmp_path: Path
) -> None:
    server = servers({FQRN: source.storage})
    replica = tmp_path / "replica"
    snapshot(server.url(), replica, public_keys=[source.public_key_path])
    stamps = {".cvmfs_last_snapshot", ".cvmfs_status.json"}

    def state() -> dict[str, tuple[int, bytes]]:
        return {
            str(p.relative_to(replica)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in replica.rglob("*")
            if p.is_file() and PRIVATE_DIR not in p.parts and p.name not in stamps
        }

    before = state()
    server.taken()
    report = snapshot(server.url(), replica, public_keys=[source.public_key_path])
    assert set(server.taken()) == ENSEMBLE
    assert not report.changed and report.revision == report.previous_revision == 3
    assert (report.objects_fetched, report.bytes_fetched, report.catalogs) == (0, 0, 0)
    assert state() == before

    # a whitelist re-signed at the source (no new revision) still reaches the replica before it expires
    source.resign(days=60)
    report = snapshot(server.url(), replica, public_keys=[source.public_key_path])
    assert not report.changed and set(server.taken()) == ENSEMBLE
    assert (replica / ".cvmfswhitelist").read_bytes() == (source.storage / ".cvmfswhitelist").read_bytes()
    after = state()
    assert after.pop(".cvmfswhitelist") != before.pop(".cvmfswhitelist") and after == before


def test_a_snapshot_with_nothing_new_writes_only_its_stamps_unless_a_killed_run_left_files(
    source: Repository, servers: Callable[[dict[str, Path]], Server], tmp_path: Path
) -> None:
    server = servers({FQRN: source.storage})
    replica = tmp_path / "replica"
    key = [source.public_key_path]
    snapshot(server.url(), replica, public_keys=key)
    private = replica / PRIVATE_DIR
    # what a full pass rewrites even when nothing changed: the reflog checksum (fsynced, renamed)
    chksum = (private / "reflog.chksum").stat()
    (replica / ".cvmfs_last_snapshot").unlink()
    server.taken()
    report = snapshot(server.url(), replica, public_keys=key)
    assert set(server.taken()) == ENSEMBLE  # verified all the same
    assert not report.changed and report.revision == 3 and report.revisions_pulled == []
    assert (private / "reflog.chksum").stat().st_ino == chksum.st_ino  # not rewritten
    assert (private / "reflog.chksum").stat().st_mtime_ns == chksum.st_mtime_ns
    assert not (private / "unfinished").exists()
    assert (replica / ".cvmfs_last_snapshot").read_text().strip() == json.loads(
        (replica / ".cvmfs_status.json").read_text()
    )["last_snapshot"]  # the stamps a monitor reads are still written

    # a killed run left a staged download and its marker: the next snapshot takes the full path and cleans up
    staged = replica / "data" / "ab" / ".cdef.x1.tmp"
    staged.write_bytes(b"partial")
    (private / "unfinished").touch()
    report = snapshot(server.url(), replica, public_keys=key)
    assert not report.changed and not staged.exists() and not (private / "unfinished").exists()
    assert (private / "reflog.chksum").stat().st_ino != chksum.st_ino
    _check_clean(replica, source.public_key_path)


# --- interruptions and bad sources ----------------------------------------------------------------------

SNAPSHOT_CLI = [sys.executable, "-m", "rcds.cli", "replicate"]


@pytest.mark.parametrize(
    "failpoint", ["replica-after-catalogs-batch", "replica-after-objects", "replica-before-manifest"]
)
def test_a_killed_snapshot_leaves_the_old_revision_and_a_rerun_fetches_only_what_is_missing(
    source: Repository, servers: Callable[[dict[str, Path]], Server], tmp_path: Path, failpoint: str
) -> None:
    server = servers({FQRN: source.storage})
    replica = tmp_path / "replica"
    key = source.public_key_path
    snapshot(server.url(), replica, public_keys=[key])
    old_manifest = (replica / MANIFEST).read_bytes()
    before = _data(source.storage)
    _publish(source, "/sw/c", _tree(tmp_path, "c", 5))
    _publish(source, "/sw/d", _tree(tmp_path, "d", 6))
    history = source.manifest().history
    assert history is not None
    # what the replica needs: everything both revisions added, but only the newest history database
    needed = {k for k in _data(source.storage) - before if not k.endswith("H")} | {
        history.object_name(Suffix.HISTORY)
    }
    server.taken()

    killed = subprocess.run(
        [*SNAPSHOT_CLI, server.url(), "--storage", str(replica), "--key", str(key)],
        env={**os.environ, failpoints.ENV: failpoint},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert killed.returncode == failpoints.EXIT_CODE, killed.stderr.decode()
    first = [k for k in server.taken() if k.startswith("data/")]
    assert (replica / MANIFEST).read_bytes() == old_manifest  # still the old revision, and consistent
    assert (replica / ".cvmfs_is_snapshotting").is_file()  # as a killed cvmfs_server snapshot leaves it
    _check_clean(replica, key)
    stored = _data(replica)

    report = snapshot(server.url(), replica, public_keys=[key])
    second = [k for k in server.taken() if k.startswith("data/")]
    # nothing that reached data/ in the killed run is fetched again; only catalogs and the history
    # object that were downloaded but not yet stored are
    assert not set(second) & stored
    assert all(k[-1] in "CH" for k in set(first) & set(second))
    assert set(first) | set(second) == needed
    if failpoint != "replica-after-catalogs-batch":  # every object and catalog was in place already
        assert report.catalogs == 0 and all(k.endswith("H") for k in second)
    assert report.revision == 5 and report.previous_revision == 3
    assert (replica / MANIFEST).read_bytes() == (source.storage / MANIFEST).read_bytes()
    assert not list(replica.glob("data/*/.*.tmp"))  # the killed run's staged downloads are gone
    assert not (replica / ".cvmfs_is_snapshotting").exists()
    _check_clean(replica, key)


def test_an_object_missing_on_the_source_fails_the_snapshot_and_a_rerun_resumes(
    source: Repository, servers: Callable[[dict[str, Path]], Server], tmp_path: Path
) -> None:
    server = servers({FQRN: source.storage})
    replica = tmp_path / "replica"
    key = [source.public_key_path]
    snapshot(server.url(), replica, public_keys=key)
    old_manifest = (replica / MANIFEST).read_bytes()
    before = _data(source.storage)
    _publish(source, "/sw/c", _tree(tmp_path, "c", 7))
    new = _data(source.storage) - before
    victim = next(k for k in sorted(new) if k.endswith("P"))
    (source.storage / victim).rename(tmp_path / "victim")
    server.taken()
    with pytest.raises(ReplicaError, match=victim):
        snapshot(server.url(), replica, public_keys=key, jobs=2)
    first = server.taken()
    assert (replica / MANIFEST).read_bytes() == old_manifest
    assert not (replica / victim).exists()
    assert not list(replica.glob("data/*/.*.tmp")) and not (replica / PRIVATE_DIR / "unfinished").exists()
    _check_clean(replica, key[0])

    (tmp_path / "victim").rename(source.storage / victim)
    report = snapshot(server.url(), replica, public_keys=key)
    second = [k for k in server.taken() if k.startswith("data/")]
    assert victim in second  # it failed (404) in the first run; everything else it fetched stayed
    assert all(k.endswith(("C", "H")) for k in set(first) & set(second) - {victim})
    assert report.revision == 4
    assert _data(replica) >= new
    _check_clean(replica, key[0])


def test_a_damaged_object_on_the_source_is_refused_and_the_replica_keeps_its_revision(
    source: Repository, servers: Callable[[dict[str, Path]], Server], tmp_path: Path
) -> None:
    server = servers({FQRN: source.storage})
    replica = tmp_path / "replica"
    key = [source.public_key_path]
    snapshot(server.url(), replica, public_keys=key)
    old_manifest = (replica / MANIFEST).read_bytes()
    before = _data(source.storage)
    _publish(source, "/sw/c", _tree(tmp_path, "c", 8))
    victim = next(k for k in sorted(_data(source.storage) - before) if k[-1] in "0123456789abcdef")
    damaged = bytearray((source.storage / victim).read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (source.storage / victim).write_bytes(bytes(damaged))
    server.taken()
    with pytest.raises(ReplicaError, match=f"{victim} on the source is corrupt"):
        snapshot(server.url(), replica, public_keys=key)
    assert server.taken().count(victim) == 2  # the second time past proxy caches (no-cache)
    assert (replica / MANIFEST).read_bytes() == old_manifest
    assert not (replica / victim).exists()
    _check_clean(replica, key[0])


def test_a_source_older_than_the_replica_is_refused(
    source: Repository, servers: Callable[[dict[str, Path]], Server], tmp_path: Path
) -> None:
    stale = tmp_path / "stale-mirror"
    shutil.copytree(source.storage, stale, ignore=shutil.ignore_patterns(".rcds"))
    _publish(source, "/sw/c", write_tree(tmp_path / "c", {"c": b"c\n"}))
    server = servers({FQRN: source.storage})
    old = servers({FQRN: stale})
    replica = tmp_path / "replica"
    key = [source.public_key_path]
    assert snapshot(server.url(), replica, public_keys=key).revision == 4
    manifest = (replica / MANIFEST).read_bytes()
    with pytest.raises(
        ReplicaError, match=r"revision 3 .* older than the replica's 4: refusing to roll back"
    ):
        snapshot(old.url(), replica, public_keys=key)
    assert (replica / MANIFEST).read_bytes() == manifest
    other = servers({"other.example": source.storage})
    with pytest.raises(ReplicaError, match=r"expected 'other\.example'"):  # the fqrn from the URL
        snapshot(other.url("other.example"), tmp_path / "r2", public_keys=key)
    with pytest.raises(ReplicaError, match="whitelist signature does not verify with any master key"):
        wrong = Repository.create("wrong.example", tmp_path / "wrong").public_key_path
        snapshot(server.url(), tmp_path / "r3", public_keys=[wrong])


# --- proxies, the command line, watch --------------------------------------------------------------------


def test_snapshots_go_through_squid_after_a_dead_proxy(
    source: Repository, servers: Callable[[dict[str, Path]], Server], tmp_path: Path
) -> None:
    require_squid()
    server = servers({FQRN: source.storage})
    replica = tmp_path / "replica"
    dead = f"http://127.0.0.1:{free_port()}"
    with SquidProxy() as squid:
        proxies = [dead, squid.url]
        report = snapshot(server.url(), replica, public_keys=[source.public_key_path], proxies=proxies)
        assert report.revision == 3
        assert squid.entries(f"{server.url()}/.cvmfspublished")
        # squid now holds the manifest for a minute; the next snapshot still sees a new revision at once
        _publish(source, "/sw/c", write_tree(tmp_path / "c", {"c": b"via squid\n"}))
        report = snapshot(server.url(), replica, public_keys=[source.public_key_path], proxies=proxies)
        assert report.revision == 4 and report.objects_fetched > 0
    assert (replica / MANIFEST).read_bytes() == (source.storage / MANIFEST).read_bytes()
    _check_clean(replica, source.public_key_path)


def test_a_transfer_cut_mid_way_is_fetched_again_and_verified(
    source: Repository, servers: Callable[[dict[str, Path]], Server], tmp_path: Path
) -> None:
    server = servers({FQRN: source.storage})
    replica = tmp_path / "replica"
    chunks = sorted(k for k in _data(source.storage) if k.endswith("P"))
    cut = ForwardProxy()
    try:
        cut.truncate = set(chunks[:3])  # each answered once with half of its body, then the connection closed
        snapshot(server.url(), replica, public_keys=[source.public_key_path], proxies=[cut.url])
        assert cut.truncate == set()
        # the retry rewinds the half-written download (file and hash): two requests, not a third one
        # past caches after a hash mismatch
        assert [sum(r.endswith(k) for r in cut.requests) for k in chunks[:3]] == [2, 2, 2]
    finally:
        cut.close()
    assert all(_object_valid(replica, k) for k in _data(replica))
    _check_clean(replica, source.public_key_path)


def test_the_command_line(
    source: Repository, servers: Callable[[dict[str, Path]], Server], tmp_path: Path
) -> None:
    server = servers({FQRN: source.storage})
    replica = tmp_path / "replica"
    dead = f"http://127.0.0.1:{free_port()}/cvmfs/{FQRN}"
    args = [
        *SNAPSHOT_CLI,
        dead,
        server.url(),
        "--storage",
        str(replica),
        "--key",
        str(source.public_key_path),
    ]
    done = subprocess.run(
        [*args, "--json", "--jobs", "4"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["revision"] == 3 and doc["changed"] is True and doc["objects_fetched"] > 0
    again = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 0 and "revision 3 up to date" in again.stdout
    wrong = subprocess.run(
        [*args, "--fqrn", "other.example"], capture_output=True, text=True, timeout=60, check=False
    )
    assert wrong.returncode == 1 and "Error:" in wrong.stderr and "other.example" in wrong.stderr
    # `rcds repo serve` serves the replica like a stratum 1 (its name comes from its manifest)
    port = free_port()
    serving = subprocess.Popen(
        [sys.executable, "-m", "rcds.cli", "repo", "serve", "--storage", str(replica), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}/cvmfs/{FQRN}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with RepositoryReader.open(
                    url, source.public_key_path, fqrn=FQRN, cache_dir=tmp_path / "c"
                ) as r:
                    assert r.revision == 3 and sum(1 for _ in r.walk("")) > 1
                    break
            except ReaderError:
                assert serving.poll() is None and time.monotonic() < deadline, serving.stderr
                time.sleep(0.1)
    finally:
        serving.terminate()
        serving.wait(30)


def test_watch_rides_out_a_source_that_is_down(
    source: Repository,
    servers: Callable[[dict[str, Path]], Server],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    repos: dict[str, Path] = {}
    server = servers(repos)  # the repository is not served yet: every snapshot fails
    reports: list[SnapshotReport] = []
    stop = threading.Event()

    def got(report: SnapshotReport) -> None:
        reports.append(report)
        stop.set()

    thread = threading.Thread(
        target=watch,
        args=(server.url(), tmp_path / "replica"),
        kwargs={"interval": 0.05, "stop": stop, "public_keys": [source.public_key_path], "on_report": got},
    )
    with caplog.at_level(logging.INFO, logger="rcds.replica"):
        thread.start()
        while len(server.requests) < 3:
            stop.wait(0.01)
        repos[FQRN] = source.storage
        thread.join(timeout=20)
    assert not thread.is_alive()
    assert reports and reports[0].revision == 3
    messages = [r.getMessage() for r in caplog.records]
    assert "snapshot failed" in messages and "snapshot source back" in messages


def test_date_stamp_is_date_utc_in_the_c_locale() -> None:
    assert date_utc(1_728_043_200) == "Fri Oct  4 12:00:00 UTC 2024"
    assert date_utc(1_729_166_400) == "Thu Oct 17 12:00:00 UTC 2024"


# What a cron job polling many repositories pays per call is mostly imports: the no-op path must not load
# these (cryptography: ~25 ms, verifying goes through rcds.cvmfs.pkcs1; ctypes: syncfs is looked up on
# the first sync; sqlite3 and our catalog, history and reflog modules: only a snapshot with work reads a
# catalog; http (http.client, with email under it) and ssl: plain HTTP goes over httptools; the pull, its
# thread pool and the pinning of its threads: only a snapshot with work pulls; secrets, shutil, tempfile
# (with bz2, lzma, random, hmac under them, ~5 ms): random names come from os.urandom; encodings.idna
# (with unicodedata): host names go to getaddrinfo as bytes; base64: PEM is decoded with binascii; the
# rest belong to the server and HTTPS paths).
_HEAVY_MODULES = ("cryptography", "aiohttp", "numpy", "httpx", "ctypes", "sqlite3", "http", "email", "ssl",
                  "rcds.cvmfs.catalog", "rcds.cvmfs.history", "rcds.cvmfs.reflog", "rcds.cvmfs.replica_pull",
                  "rcds.affinity", "concurrent", "secrets", "shutil", "tempfile", "bz2", "lzma", "random",
                  "encodings.idna", "unicodedata", "signal", "base64")  # fmt: skip
_NO_OP_COMMAND = f"""
import sys
from rcds.cli import main
try:
    main(["replicate", *sys.argv[1:]])
except SystemExit as exc:
    if exc.code:
        raise
print("loaded:", sorted(({{m.split(".")[0] for m in sys.modules}} | set(sys.modules)) & set({_HEAVY_MODULES!r})))
"""


def test_a_snapshot_with_nothing_new_as_a_command_imports_no_heavy_module(
    source: Repository, servers: Callable[[dict[str, Path]], Server], tmp_path: Path
) -> None:
    server = servers({FQRN: source.storage})
    replica = tmp_path / "replica"
    snapshot(server.url(), replica, public_keys=[source.public_key_path])
    command = [server.url(), "--storage", str(replica), "--key", str(source.public_key_path)]
    done = subprocess.run(
        [sys.executable, "-c", _NO_OP_COMMAND, *command], capture_output=True, text=True, check=True
    )
    assert "up to date" in done.stdout
    assert done.stdout.splitlines()[-1] == "loaded: []"
