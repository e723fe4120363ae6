"""A stratum 1 whose storage is an S3 bucket (``rcds replicate --storage s3://... --state DIR``), against a
real S3 server (``juicefs gateway``, tests/s3server.py) and a real source served by ``repo_http``.

Every PUT goes through a recording HTTP proxy in front of the server (``ThrottlingProxy`` of test_s3 with
no failures), which is how "writes nothing", "writes only the new objects" and the cache headers are
checked; the replica is read back over the bucket's anonymous HTTP endpoint with rcds's reader and
checked object by object.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import FQRN, S3_BUCKET
from rcds.cvmfs import failpoints
from rcds.cvmfs.checker import check_repository
from rcds.cvmfs.hashes import Suffix
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.replica import PRIVATE_DIR, ReplicaError, snapshot
from rcds.cvmfs.replica_gc import collect_replica_garbage
from rcds.cvmfs.repository import Repository
from rcds.storage import store_from_settings
from rcds.storage.s3 import DATA_CACHE_CONTROL, ROOT_CACHE_CONTROL
from s3server import S3Server
from test_gc import read_revision, revision_objects
from test_replica_gc import GC_SCRIPT, World, build_world, tag_on_source
from test_replicate import ENSEMBLE, MANIFEST, SNAPSHOT_CLI, Server, _content, _data, _publish, _tree
from test_replicate import servers as servers  # the fixture
from test_replicate import source as source  # the fixture
from test_s3 import ThrottlingProxy

STAMPS = {".cvmfs_last_snapshot", ".cvmfs_status.json"}


class BucketReplica:
    """A replica's place in the test bucket (``<random>/<fqrn>``), its state directory, and the PUTs
    sent to the bucket through a recording proxy since the last ``puts()``."""

    def __init__(self, s3_server: S3Server, state: Path) -> None:
        self.server = s3_server
        self.state = state
        self.prefix = f"{secrets.token_hex(4)}/{FQRN}"
        self.seen: list[tuple[str, str]] = []
        self.proxy = ThrottlingProxy(s3_server.endpoint, fail=0, record=self.seen)
        self.endpoint = self.proxy.__enter__()

    @property
    def url(self) -> str:
        return f"s3://{S3_BUCKET}/{self.prefix}"

    @property
    def store(self) -> dict[str, Any]:
        return {"url": self.url, "endpoint": self.endpoint, "retries": 2, "timeout": 10.0}

    @property
    def http(self) -> str:
        """The replica's base URL on the bucket's anonymous HTTP endpoint (what clients and stratum 1s read)."""
        return f"{self.server.endpoint}/{S3_BUCKET}/{self.prefix}"

    def snap(self, source_url: str, key: Path, **kwargs: Any) -> Any:
        return snapshot(source_url, self.state, public_keys=[key], store=self.store, **kwargs)

    def puts(self) -> list[str]:
        """Repository-relative keys PUT since the last call (in order, repeats kept)."""
        base = f"/{S3_BUCKET}/{self.prefix}/"
        out = [path.split("?")[0].removeprefix(base) for path, _cc in self.seen]
        self.seen.clear()
        return out

    def data_keys(self) -> set[str]:
        return {k for k in self.all_keys() if k.startswith("data/")}

    def all_keys(self) -> set[str]:
        s3 = store_from_settings({"url": self.url, "endpoint": self.server.endpoint})
        try:
            return set(s3.iter_keys(""))
        finally:
            s3.close()

    def indexed(self) -> set[str]:
        """The keys the state directory's presence index records."""
        db = sqlite3.connect(self.state / PRIVATE_DIR / "objects.db")
        try:
            return {k for (k,) in db.execute("SELECT key FROM present")}
        finally:
            db.close()

    def get(self, key: str) -> bytes:
        return httpx.get(f"{self.http}/{key}").content

    def check_clean(self, key: Path, cache: Path) -> dict[str, tuple[object, ...]]:
        """Read back over anonymous HTTP: every object of the current revision re-hashed; the content."""
        with RepositoryReader.open(self.http, key, fqrn=FQRN, cache_dir=cache) as reader:
            report = check_repository(reader)
            assert report.issues == [], report.issues
            assert report.objects > 0
            return _content(reader)

    def close(self) -> None:
        self.proxy.__exit__()


@pytest.fixture
def bucket(s3_server: S3Server, tmp_path: Path) -> Iterator[BucketReplica]:
    b = BucketReplica(s3_server, tmp_path / "state")
    yield b
    b.close()


def test_a_replica_in_a_bucket_is_complete_verified_and_written_once(
    source: Repository, servers: Callable[[dict[str, Path]], Server], bucket: BucketReplica, tmp_path: Path
) -> None:
    server = servers({FQRN: source.storage})
    key = source.public_key_path
    report = bucket.snap(server.url(), key)
    assert report.revision == 3 and report.changed and report.revisions_pulled == [3, 2, 1]
    wire = list(bucket.seen)  # (path, Cache-Control) of each PUT
    puts = bucket.puts()
    data_puts = [k for k in puts if k.startswith("data/")]
    assert len(data_puts) == len(set(data_puts)) == report.objects_fetched  # each object once
    assert set(data_puts) <= _data(source.storage)
    assert {k for k in puts if not k.startswith("data/")} == {
        MANIFEST, ".cvmfswhitelist", ".cvmfsreflog", ".cvmfs_is_snapshotting", *STAMPS,
    }  # fmt: skip
    assert puts[-4:-2] == [".cvmfswhitelist", MANIFEST]  # the manifest last, then only the stamps
    # CVMFS's cache headers: data objects never change, the .cvmfs* files do
    cache_control = {p.split("?")[0].split(f"/{FQRN}/", 1)[1]: cc for p, cc in wire}
    assert set(cache_control) == set(puts)
    assert all(cc == DATA_CACHE_CONTROL for k, cc in cache_control.items() if k.startswith("data/"))
    assert all(cc == ROOT_CACHE_CONTROL for k, cc in cache_control.items() if not k.startswith("data/"))

    # the bucket holds the stratum 1's public files; the private state is local, and names the bucket
    keys = bucket.all_keys()
    assert {k for k in keys if not k.startswith("data/")} == {
        MANIFEST,
        ".cvmfswhitelist",
        ".cvmfsreflog",
        *STAMPS,
    }
    for name in (MANIFEST, ".cvmfswhitelist"):
        assert bucket.get(name) == (source.storage / name).read_bytes()
    assert (
        json.loads(bucket.get(".cvmfs_status.json"))["last_snapshot"]
        == bucket.get(".cvmfs_last_snapshot").decode().strip()
    )
    private = bucket.state / PRIVATE_DIR
    assert json.loads((private / "replica.json").read_text())["store"]["url"] == bucket.url
    assert (private / "objects.db").is_file() and (private / "reflog.chksum").is_file()
    assert not (bucket.state / MANIFEST).exists() and not (bucket.state / "data").exists()

    # read back over the bucket's anonymous HTTP endpoint, as a client or a stock stratum 1 would
    with RepositoryReader.open(source.storage, key, fqrn=FQRN) as want:
        expected = _content(want)
    assert bucket.check_clean(key, tmp_path / "c1") == expected

    # nothing new: the manifest ensemble is verified, only the stamps are written
    server.taken()
    again = bucket.snap(server.url(), key)
    assert not again.changed and set(server.taken()) == ENSEMBLE
    assert set(bucket.puts()) <= STAMPS  # (unchanged within the same second: not even those)

    # a new revision: exactly its new objects are PUT, once each (what it shares with /sw/b is not)
    before = _data(source.storage)
    c = _tree(tmp_path, "c", 4)
    (c / "big.bin").write_bytes((tmp_path / "b" / "big.bin").read_bytes())
    assert _publish(source, "/sw/c", c) == 4
    new = _data(source.storage) - before
    report = bucket.snap(server.url(), key)
    assert report.changed and report.revision == 4 and report.objects_present > 0
    data_puts = [k for k in bucket.puts() if k.startswith("data/")]
    assert sorted(data_puts) == sorted(new)
    with RepositoryReader.open(source.storage, key, fqrn=FQRN) as want:
        expected = _content(want)
    assert bucket.check_clean(key, tmp_path / "c2") == expected

    # the command line: the state directory remembers the bucket; a second bucket for it is refused
    out = subprocess.run(
        [*SNAPSHOT_CLI, server.url(), "--storage", str(bucket.state), "--key", str(key), "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["revision"] == 4 and set(bucket.puts()) <= STAMPS
    local = tmp_path / "local"
    snapshot(server.url(), local, public_keys=[key])
    with pytest.raises(ReplicaError, match="holds a replica in the directory itself"):
        snapshot(server.url(), local, public_keys=[key], store=bucket.store)
    with pytest.raises(ReplicaError, match="is the state of the replica in"):
        snapshot(
            server.url(), bucket.state, public_keys=[key], store={**bucket.store, "url": bucket.url + "x"}
        )


def test_the_command_line_makes_a_bucket_replica_with_s3_settings(
    source: Repository, servers: Callable[[dict[str, Path]], Server], bucket: BucketReplica, tmp_path: Path
) -> None:
    server = servers({FQRN: source.storage})
    key = str(source.public_key_path)
    base = [*SNAPSHOT_CLI, server.url(), "--key", key]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=60, check=False)

    no_state = run("--storage", bucket.url)
    assert no_state.returncode == 2 and "needs --state" in no_state.stderr
    bad = run("--storage", bucket.url, "--state", str(bucket.state), "--s3", "adressing=path")
    assert bad.returncode == 2 and "adressing" in bad.stderr and "addressing" in bad.stderr
    bad = run("--storage", bucket.url, "--state", str(bucket.state), "--s3", "https=maybe")
    assert bad.returncode == 2 and "https" in bad.stderr
    done = run(
        "--storage", bucket.url, "--state", str(bucket.state),
        "--s3", f"endpoint={bucket.endpoint.removeprefix('http://')}", "--s3", "https=false",
        "--s3", "addressing=path", "--s3", "region=us-east-1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "revision 3 updated" in done.stdout
    assert bucket.get(MANIFEST) == (source.storage / MANIFEST).read_bytes()
    recorded = json.loads((bucket.state / PRIVATE_DIR / "replica.json").read_text())["store"]
    assert recorded["https"] is False and recorded["addressing"] == "path"
    bucket.check_clean(source.public_key_path, tmp_path / "c")


@pytest.mark.parametrize(
    "failpoint", ["replica-after-catalogs-batch", "replica-after-objects", "replica-before-manifest"]
)
def test_a_killed_snapshot_into_a_bucket_leaves_the_old_revision_and_a_rerun_completes(
    source: Repository,
    servers: Callable[[dict[str, Path]], Server],
    bucket: BucketReplica,
    tmp_path: Path,
    failpoint: str,
) -> None:
    server = servers({FQRN: source.storage})
    key = source.public_key_path
    bucket.snap(server.url(), key)
    old_manifest = bucket.get(MANIFEST)
    before = _data(source.storage)
    _publish(source, "/sw/c", _tree(tmp_path, "c", 5))
    _publish(source, "/sw/d", _tree(tmp_path, "d", 6))
    history = source.manifest().history
    assert history is not None
    needed = {k for k in _data(source.storage) - before if not k.endswith("H")} | {
        history.object_name(Suffix.HISTORY)
    }
    bucket.puts()

    killed = subprocess.run(
        [*SNAPSHOT_CLI, server.url(), "--storage", str(bucket.state), "--key", str(key)],
        env={**os.environ, failpoints.ENV: failpoint}, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert killed.returncode == failpoints.EXIT_CODE, killed.stderr.decode()
    first = [k for k in bucket.puts() if k.startswith("data/")]
    assert first and set(first) <= needed
    assert bucket.get(MANIFEST) == old_manifest  # the bucket still shows the old revision, completely
    assert httpx.get(f"{bucket.http}/.cvmfs_is_snapshotting").status_code == 200
    bucket.check_clean(key, tmp_path / "c1")

    indexed = bucket.indexed()
    assert indexed <= bucket.data_keys()  # the index names only what the bucket holds
    assert len(set(first) - indexed) <= 16  # at most the PUTs in flight when it died are not recorded

    report = bucket.snap(server.url(), key)
    second = [k for k in bucket.puts() if k.startswith("data/")]
    assert report.revision == 5 and report.previous_revision == 3
    assert set(first) | set(second) == needed
    # nothing the killed run recorded is written again (a PUT acknowledged as the process died, not yet
    # recorded, would be: written twice, the same bytes)
    assert not set(second) & indexed
    assert bucket.get(MANIFEST) == (source.storage / MANIFEST).read_bytes()
    assert httpx.get(f"{bucket.http}/.cvmfs_is_snapshotting").status_code == 404
    with RepositoryReader.open(source.storage, key, fqrn=FQRN) as want:
        expected = _content(want)
    assert bucket.check_clean(key, tmp_path / "c2") == expected


def test_a_lost_state_directory_is_rebuilt_from_one_listing_without_trusting_catalogs(
    source: Repository, servers: Callable[[dict[str, Path]], Server], bucket: BucketReplica, tmp_path: Path
) -> None:
    server = servers({FQRN: source.storage})
    key = source.public_key_path
    bucket.snap(server.url(), key)
    bucket.puts()
    other_state = tmp_path / "state2"
    report = snapshot(server.url(), other_state, public_keys=[key], store=bucket.store)
    assert not report.changed and set(bucket.puts()) <= STAMPS
    before = _data(source.storage)
    _publish(source, "/sw/c", _tree(tmp_path, "c", 7))
    new = _data(source.storage) - before
    report = snapshot(server.url(), other_state, public_keys=[key], store=bucket.store)
    assert report.changed and report.revision == 4
    puts = [k for k in bucket.puts() if k.startswith("data/")]
    # the objects present were found in the listing: only the new ones are written; catalogs are fetched
    # and descended again (a catalog in a bucket vouches for nothing without the records of its writer)
    assert {k for k in puts if not k.endswith("C")} == {k for k in new if not k.endswith("C")}
    assert {k for k in new if k.endswith("C")} < {k for k in puts if k.endswith("C")}
    bucket.check_clean(key, tmp_path / "c")


def test_replica_gc_in_a_bucket_deletes_exactly_what_it_deletes_in_a_directory(
    source: Repository, servers: Callable[[dict[str, Path]], Server], bucket: BucketReplica, tmp_path: Path
) -> None:
    """The same snapshots into a directory and into a bucket; the same collection of both deletes the
    same keys (the directory's collection is checked against the revisions in test_replica_gc)."""
    server = servers({FQRN: source.storage})
    key = source.public_key_path
    bucket.endpoint = bucket.server.endpoint  # not through the proxy: it loses HEAD's Content-Length
    local = tmp_path / "local-replica"
    for step in range(3):
        snapshot(server.url(), local, public_keys=[key])
        bucket.snap(server.url(), key)
        _publish(source, f"/sw/n{step}", _tree(tmp_path, f"n{step}", 10 + step))
        _publish(source, f"/sw/n{step}", None)
    # the reflogs record arrival times in seconds: histories of earlier snapshots must be older than the
    # current revision in both replicas to be swept from both
    time.sleep(1.1)
    snapshot(server.url(), local, public_keys=[key])
    bucket.snap(server.url(), key)
    local_before, bucket_before = _data(local), bucket.data_keys()
    assert local_before == bucket_before

    now = time.time() + 60
    want = collect_replica_garbage(local, horizon=0, now=now)
    got = collect_replica_garbage(bucket.state, horizon=0, now=now)
    deleted_local = local_before - _data(local)
    deleted_bucket = bucket_before - bucket.data_keys()
    assert deleted_local and deleted_bucket == deleted_local
    assert (got.objects_swept, got.catalogs_swept, got.aux_swept, got.bytes_freed) == (
        want.objects_swept, want.catalogs_swept, want.aux_swept, want.bytes_freed,
    )  # fmt: skip
    assert got.objects_swept + got.catalogs_swept + got.aux_swept == len(deleted_bucket)
    assert not (bucket.state / PRIVATE_DIR / "gc-unfinished").exists()
    assert "last_gc" in json.loads(bucket.get(".cvmfs_status.json"))
    # the presence index forgot them: a revision needing them again would fetch them
    indexed = bucket.indexed()
    assert not indexed & deleted_bucket and indexed <= bucket_before - deleted_bucket
    with RepositoryReader.open(source.storage, key, fqrn=FQRN) as want_reader:
        expected = _content(want_reader)
    assert bucket.check_clean(key, tmp_path / "c") == expected
    again = collect_replica_garbage(bucket.state, horizon=0, now=now)
    assert (again.objects_swept, again.catalogs_swept) == (0, 0)
    # rcds repo gc finds the bucket through the state directory
    out = subprocess.run(
        [sys.executable, "-m", "rcds.cli", "repo", "gc", "--storage", str(bucket.state), "--horizon-days", "0",
         "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["revisions_kept"] == want.revisions_kept
    # and rcds gc --config covers a replica in a bucket (it holds no manifest in its state directory)
    config = tmp_path / "rcds.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "svc"}"\ngc_horizon_days = 0\n[auth]\ngridmapfile = ""\n'
        f'[[repository]]\nname = "{FQRN}"\nlocal = false\nupstream = "{server.url()}"\n'
        f'public_key = "{key}"\nstorage = "{bucket.url}"\nstate = "{bucket.state}"\n'
        f'[repository.s3]\nendpoint = "{bucket.server.endpoint}"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "rcds.cli", "gc", "--config", str(config), "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[FQRN]["revisions_kept"] == want.revisions_kept


def test_the_service_keeps_a_replica_in_a_bucket(
    source: Repository, servers: Callable[[dict[str, Path]], Server], s3_server: S3Server, tmp_path: Path
) -> None:
    """A ``local = false`` repository with ``storage = "s3://..."``: the replication thread snapshots into
    the bucket, the presence index and the announcements read it there, and the daily cleanup collects
    it."""
    from rcds.publish.config import settings_from_dict
    from rcds.publish.service import PublishService

    server = servers({FQRN: source.storage})
    sub = secrets.token_hex(4)
    settings = settings_from_dict({
        "data_dir": str(tmp_path / "svc"), "gc_horizon_days": 0.0, "replica_interval": 0.05,
        "auto_cleanup": False,  # collected below, when the replica has the revisions to sweep
        "auth": {"gridmapfile": ""},
        "repository": [{
            "name": FQRN, "local": False, "upstream": server.url(), "public_key": str(source.public_key_path),
            "storage": f"s3://{S3_BUCKET}/{sub}", "state": str(tmp_path / "state"),
            "s3": {"endpoint": s3_server.endpoint, "retries": 2},
        }],
    })  # fmt: skip
    http = f"{s3_server.endpoint}/{S3_BUCKET}/{sub}/{FQRN}"
    svc = PublishService(settings)
    svc.start()
    try:

        def served() -> int:
            return svc.known_revision.get(FQRN, -1)  # set by refresh_presence, which reads the bucket

        deadline = time.monotonic() + 30
        while served() != 3:
            assert time.monotonic() < deadline, "the replica did not reach revision 3"
            time.sleep(0.05)
        assert httpx.get(f"{http}/{MANIFEST}").content == (source.storage / MANIFEST).read_bytes()
        assert not (tmp_path / "state" / MANIFEST).exists()  # the state directory holds no public file
        _publish(source, "/sw/c", _tree(tmp_path, "c", 8))
        while served() != 4:
            assert time.monotonic() < deadline, "the replica did not follow to revision 4"
            time.sleep(0.05)
        _publish(source, "/sw/c", None)
        _publish(source, "/sw/d", _tree(tmp_path, "d", 9))  # /sw/c is then only in revision 4: swept
        while served() != 6:
            assert time.monotonic() < deadline, "the replica did not follow to revision 6"
            time.sleep(0.05)
        report = svc.cleanup_replica(FQRN, now=time.time() + 60)
        assert report.gc is not None and report.gc.catalogs_swept > 0 and report.gc.objects_swept > 0
    finally:
        svc.stop()
    with RepositoryReader.open(source.storage, source.public_key_path, fqrn=FQRN) as want:
        expected = _content(want)
    with RepositoryReader.open(http, source.public_key_path, fqrn=FQRN, cache_dir=tmp_path / "c") as got:
        assert check_repository(got).issues == []
        assert _content(got) == expected


@pytest.fixture
def twin_world(make_repo: Callable[..., Repository], bucket: BucketReplica, tmp_path: Path) -> World:
    """test_replica_gc's world, every snapshot also made into the bucket (not through the proxy, which
    loses HEAD's Content-Length)."""
    bucket.endpoint = bucket.server.endpoint
    return build_world(make_repo(), tmp_path, twins=[(bucket.state, bucket.store)])


@pytest.mark.parametrize("failpoint", ["gc-mid-sweep", "gc-before-reflog"])
def test_a_gc_of_a_bucket_killed_mid_sweep_is_finished_before_a_snapshot_trusts_a_catalog(
    twin_world: World,
    bucket: BucketReplica,
    failpoint: str,
    tmp_path: Path,
    open_reader: Callable[..., RepositoryReader],
) -> None:
    """test_replica_gc's trap on a bucket: the sweep deletes /sw/b's objects before revision 3's catalogs,
    so a collection killed mid-way leaves revision 3's root catalog in the bucket (and in the presence
    index) over a half-deleted tree. The source then tags revision 3 again; the next snapshot must finish
    the collection first, then fetch revision 3 again, completely. The directory replica of the same
    world, collected without interruption, is the reference."""
    w = twin_world
    now = time.time() + 60
    assert _data(w.replica) == bucket.data_keys()
    collect_replica_garbage(w.replica, horizon=0, now=now)
    reference = _data(w.replica)
    child = subprocess.run(
        [sys.executable, "-c", GC_SCRIPT, str(bucket.state), str(now)],
        env={**os.environ, failpoints.ENV: failpoint}, capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert child.returncode == failpoints.EXIT_CODE, child.stderr.decode()
    assert (bucket.state / PRIVATE_DIR / "gc-unfinished").is_file()
    bucket.check_clean(w.key, tmp_path / "c1")  # the current revision is untouched
    root3 = w.roots[3].object_name(Suffix.CATALOG)
    if failpoint == "gc-mid-sweep":
        assert root3 in bucket.data_keys()  # the trap is set

    w.twins = []  # from now on only the bucket is snapshotted
    history = tag_on_source(w.source, "pinned", w.roots[3], 3)
    report = bucket.snap(str(w.source.storage), w.key)
    assert report.revision == 5 and report.revisions_pulled == [3]
    assert report.catalogs == 2  # revision 3's root catalog and /sw/b's, fetched again with all below
    assert not (bucket.state / PRIVATE_DIR / "gc-unfinished").exists()
    refetched = revision_objects(open_reader(w.source), w.roots[3])
    # (old history databases aside: which ones are older than the kept revisions depends on the second
    # each replica received them in)
    assert {k for k in bucket.data_keys() if not k.endswith("H")} == {
        k for k in reference | refetched if not k.endswith("H")
    }
    assert history.object_name(Suffix.HISTORY) in bucket.data_keys()
    bucket.check_clean(w.key, tmp_path / "c2")
    assert read_revision(open_reader(bucket.http, w.key), w.roots[3]) == read_revision(
        open_reader(w.source), w.roots[3]
    )


def test_a_throttled_bucket_is_retried_and_a_missing_one_named(
    source: Repository, servers: Callable[[dict[str, Path]], Server], s3_server: S3Server, tmp_path: Path
) -> None:
    server = servers({FQRN: source.storage})
    key = source.public_key_path
    prefix = f"{secrets.token_hex(4)}/{FQRN}"
    with ThrottlingProxy(s3_server.endpoint, fail=3, status=503, code="SlowDown") as endpoint:
        store = {"url": f"s3://{S3_BUCKET}/{prefix}", "endpoint": endpoint, "retries": 5}
        report = snapshot(server.url(), tmp_path / "state", public_keys=[key], store=store)
    assert report.revision == 3
    with RepositoryReader.open(
        f"{s3_server.endpoint}/{S3_BUCKET}/{prefix}", key, fqrn=FQRN, cache_dir=tmp_path / "c"
    ) as reader:
        assert check_repository(reader).issues == []
    missing = {"url": "s3://no-such-bucket/x", "endpoint": s3_server.endpoint, "retries": 0}
    with pytest.raises(ReplicaError, match="bucket no-such-bucket does not exist"):
        snapshot(server.url(), tmp_path / "state2", public_keys=[key], store=missing)


def test_the_presence_index_records_writes_forgets_deletes_and_lists_in_pages(tmp_path: Path) -> None:
    """``IndexedStore`` over a local directory store (the same interface a bucket has)."""
    from rcds.storage.indexed import IndexedStore
    from rcds.storage.local import LocalStore

    inner = LocalStore(tmp_path / "public")
    inner.initialize()
    inner.put("data/00/catalogC", b"c")
    inner.put("data/00/object", b"o")
    store = IndexedStore(inner, tmp_path / "objects.db")  # new: built from a listing, catalogs left out
    assert store.exists("data/00/object") and not store.exists("data/00/catalogC")
    keys = [f"data/{i % 256:02x}/{i:06d}" for i in range(10_050)]  # more than one page
    for k in keys:
        store.put(k, b"x")
    assert list(store.iter_keys("data/")) == sorted([*keys, "data/00/object"])
    assert list(store.iter_keys("data/01/")) == sorted(k for k in keys if k.startswith("data/01/"))
    store.delete_many(keys[:5])
    assert not any(store.exists(k) for k in keys[:5]) and not any(inner.exists(k) for k in keys[:5])
    store.close()
    again = IndexedStore(LocalStore(tmp_path / "public"), tmp_path / "objects.db")  # not rebuilt: kept
    assert again.exists(keys[5]) and not again.exists(keys[0])
    again.close()
