"""Real repositories read through a real squid: failover, cacheability, new publishes, 404s, outages.

The repositories are written by the core writer and served by repo_http's aiohttp app on 127.0.0.1 (a
new port per test, so squid's cache keys never carry over between tests); the reader talks to that
server through ``tests/squid.py``'s squid, and squid's access log says what it did with each request.
"""

from __future__ import annotations

import asyncio
import random
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from conftest import FQRN, File, write_tree
from rcds.cvmfs.hashes import ContentHash, Suffix
from rcds.cvmfs.reader import ReaderError, RepositoryReader
from rcds.cvmfs.repository import Repository
from rcds.cvmfs.sources import HttpSource, NotFound
from rcds.shrinkwrap.export import ShrinkwrapError, export
from rcds.shrinkwrap.spec import Selector, parse_spec
from rcds.web.repo_http import make_app
from squid import LogEntry, SquidProxy, free_port, require_squid

README = b"read through a squid\n"
RUN_SH = b"#!/bin/sh\necho hi\n"
INSIDE = b"in a nested catalog\n"
BIG = random.Random(11).randbytes(700 * 1024)  # several chunks with the test repositories' SMALL_CHUNKS
TREE: dict[str, object] = {
    "README": README,
    "bin": {"run.sh": File(RUN_SH, mode=0o755)},
    "big.bin": BIG,
    "sub": {".cvmfscatalog": b"", "inside.txt": INSIDE},
}
FILES = {"/cid/README": README, "/cid/bin/run.sh": RUN_SH, "/cid/big.bin": BIG, "/cid/sub/inside.txt": INSIDE}
HITS = ("TCP_HIT/200", "TCP_MEM_HIT/200")


@pytest.fixture(scope="module")
def squid() -> Iterator[SquidProxy]:
    """One squid for the module (each test has its own server URLs): a squid takes ~2 s to stop."""
    require_squid()
    with SquidProxy() as proxy:
        yield proxy


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    loop.close()


@dataclass
class Origin:
    """repo_http on 127.0.0.1: ``repos`` is read per request, so repositories can appear while it runs."""

    base: str
    repos: dict[str, Path] = field(default_factory=dict)

    @property
    def repo_url(self) -> str:
        return f"{self.base}/cvmfs/{FQRN}"

    def url(self, key: str) -> str:
        return f"{self.repo_url}/{key}"


@pytest.fixture
def origin(loop: asyncio.AbstractEventLoop) -> Iterator[Origin]:
    repos: dict[str, Path] = {}
    runner = web.AppRunner(make_app(repos))

    async def start() -> int:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return int(runner.addresses[0][1])

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    yield Origin(f"http://127.0.0.1:{port}", repos)
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)


@pytest.fixture
def repo(make_repo: Callable[..., Repository], origin: Origin, tmp_path: Path) -> Repository:
    """Revision 1: ``TREE`` at /cid (its own nested catalog plus one inside), served by ``origin``."""
    repo = make_repo()
    with repo.transaction() as txn:
        txn.add_directory("/cid", write_tree(tmp_path / "src", TREE), nested=True)
        assert txn.commit().revision == 1
    origin.repos[FQRN] = repo.storage
    return repo


def open_via(origin: Origin, repo: Repository, proxies: list[str], cache_dir: Path) -> RepositoryReader:
    return RepositoryReader.open(
        origin.repo_url,
        public_key=repo.public_key_path,
        fqrn=repo.fqrn,
        cache_dir=cache_dir,
        proxies=proxies,
    )


def read_all(reader: RepositoryReader) -> dict[str, bytes]:
    return {path: reader.read(path) for path in FILES}


def fetched_objects(cache_dir: Path) -> list[str]:
    """Keys (``data/XX/...``) of every object a reader fetched: its cache holds each one it verified."""
    return sorted(p.relative_to(cache_dir).as_posix() for p in (cache_dir / "data").glob("*/*"))


def outcomes(entries: list[LogEntry]) -> list[str]:
    return [e.outcome for e in entries]


def dead_proxy() -> str:
    """A proxy URL nobody listens on: connections are refused at once."""
    return f"http://127.0.0.1:{free_port()}"


# --- 1. reading through squid, past a dead proxy ---------------------------------------------------


def test_reads_fail_over_past_a_dead_proxy_and_go_through_squid(
    squid: SquidProxy, origin: Origin, repo: Repository, tmp_path: Path
) -> None:
    with open_via(origin, repo, [dead_proxy(), squid.url], tmp_path / "cache") as reader:
        assert reader.revision == 1
        assert read_all(reader) == FILES
        assert isinstance(reader.source, HttpSource)
        assert reader.source.proxies[reader.source._good_proxy] == squid.url  # the failover stuck
    objects = fetched_objects(tmp_path / "cache")
    assert any(k.endswith("C") for k in objects) and any(k.endswith("P") for k in objects), objects
    # Every file the reader needed went through squid exactly once, fetched from the server.
    for key in [".cvmfspublished", ".cvmfswhitelist", *objects]:
        entries = squid.wait_entries(origin.url(key), 1)
        assert outcomes(entries) == ["TCP_MISS/200"], (key, squid.access_log_lines())
        assert entries[0].hierarchy == "HIER_DIRECT/127.0.0.1"


# --- 2. what squid caches ----------------------------------------------------------------------


def test_a_second_reader_gets_every_object_from_squids_cache_and_still_verifies_it(
    squid: SquidProxy, origin: Origin, repo: Repository, tmp_path: Path
) -> None:
    with open_via(origin, repo, [squid.url], tmp_path / "cache1") as first:
        assert read_all(first) == FILES
    with open_via(origin, repo, [squid.url], tmp_path / "cache2") as second:
        assert read_all(second) == FILES
    objects = fetched_objects(tmp_path / "cache1")
    assert fetched_objects(tmp_path / "cache2") == objects
    for key in objects:  # content-addressed, "public, max-age=259200": cached on first sight
        entries = squid.wait_entries(origin.url(key), 2)
        assert outcomes(entries)[0] == "TCP_MISS/200" and outcomes(entries)[1] in HITS, (key, entries)
        assert entries[1].hierarchy == "HIER_NONE/-"  # the server was not asked again
        assert entries[1].reply_cache_control == "public, max-age=259200"
    # The manifest ensemble (max-age=61) absorbs the second reader's non-fresh poll as well.
    for key in (".cvmfspublished", ".cvmfswhitelist"):
        entries = squid.wait_entries(origin.url(key), 2)
        assert outcomes(entries)[1] in HITS, (key, entries)
        assert entries[1].reply_cache_control == "max-age=61"


def test_objects_of_tens_of_megabytes_are_cached(
    squid: SquidProxy, origin: Origin, repo: Repository, tmp_path: Path
) -> None:
    """CVMFS objects reach tens of MB (unchunked files, catalogs): they must be cache hits too."""
    blob = zlib.compress(random.Random(3).randbytes(20 << 20), 1)
    h = ContentHash.of(blob)
    (repo.storage / h.object_name()).parent.mkdir(exist_ok=True)
    (repo.storage / h.object_name()).write_bytes(blob)
    for i in range(2):
        with open_via(origin, repo, [squid.url], tmp_path / f"cache{i}") as reader:
            assert reader.object_file(h).read_bytes() == blob
    entries = squid.wait_entries(origin.url(h.object_name()), 2)
    assert outcomes(entries)[0] == "TCP_MISS/200" and outcomes(entries)[1] in HITS, entries


def test_content_served_from_squids_cache_is_verified_like_any_other(
    squid: SquidProxy, origin: Origin, repo: Repository, tmp_path: Path
) -> None:
    """A corrupt object in a proxy cache is rejected, not handed out (squid cannot know it is bad)."""
    good = zlib.compress(b"the real content\n")
    h = ContentHash.of(good)
    (repo.storage / h.object_name()).parent.mkdir(exist_ok=True)
    (repo.storage / h.object_name()).write_bytes(zlib.compress(b"tampered content\n"))
    for i in range(2):
        with open_via(origin, repo, [squid.url], tmp_path / f"cache{i}") as reader:
            with pytest.raises(ReaderError, match="corrupt"):
                reader.object_file(h)
            assert not reader.cache.object_path(h, Suffix.NONE).exists()
    entries = squid.wait_entries(origin.url(h.object_name()), 2)
    assert entries[0].outcome == "TCP_MISS/200" and any(e.hit for e in entries[1:]), entries


def test_a_corrupt_object_cached_by_squid_is_fetched_again_past_the_cache(
    squid: SquidProxy, origin: Origin, repo: Repository, tmp_path: Path
) -> None:
    """As the CVMFS client does: a hash mismatch is retried once with no-cache, which replaces squid's copy."""
    good = zlib.compress(b"repaired content\n")
    h = ContentHash.of(good)
    stored = repo.storage / h.object_name()
    stored.parent.mkdir(exist_ok=True)
    stored.write_bytes(zlib.compress(b"bad bytes, once\n"))
    with open_via(origin, repo, [squid.url], tmp_path / "cache1") as reader, pytest.raises(ReaderError):
        reader.object_file(h)
    stored.write_bytes(good)  # the server is repaired; squid still holds the bad copy
    with open_via(origin, repo, [squid.url], tmp_path / "cache2") as reader:
        assert reader.read_object(h) == b"repaired content\n"
    entries = squid.wait_entries(origin.url(h.object_name()), 4)
    assert entries[2].hit and entries[3].outcome == "TCP_MISS/200", entries
    assert entries[3].request_cache_control == "no-cache", entries


def test_shrinkwrap_fetches_an_object_squid_cached_corrupt_again_past_the_cache(
    squid: SquidProxy, origin: Origin, repo: Repository, tmp_path: Path
) -> None:
    """Shrinkwrap too: a bad copy in squid's cache fails the first export; once the server is repaired,
    the next export through the same squid gets the object again with no-cache and completes."""
    with open_via(origin, repo, [squid.url], tmp_path / "probe") as reader:
        d = reader.stat("cid/README")
    assert d is not None and d.hash is not None
    stored = repo.storage / d.hash.object_name()
    good = stored.read_bytes()
    stored.chmod(0o644)
    stored.write_bytes(zlib.compress(b"bad bytes, once\n"))
    selector = Selector(parse_spec("/cid/*"), "2.14")
    with (
        open_via(origin, repo, [squid.url], tmp_path / "cache1") as reader,
        pytest.raises(ShrinkwrapError, match="corrupt"),
    ):
        export(reader, selector, tmp_path / "out1", jobs=1, progress=False)
    stored.write_bytes(good)  # the server is repaired; squid still holds the bad copy
    with open_via(origin, repo, [squid.url], tmp_path / "cache2") as reader:
        export(reader, selector, tmp_path / "out2", jobs=1, progress=False)
    assert (tmp_path / "out2" / FQRN / "cid" / "README").read_bytes() == README
    entries = squid.wait_entries(origin.url(d.hash.object_name()), 4)
    assert any(e.hit for e in entries[:3]), entries  # the bad copy was served from the cache once more
    assert entries[-1].request_cache_control == "no-cache" and entries[-1].outcome == "TCP_MISS/200", entries


# --- 3. a new publish shows through squid ------------------------------------------------------


def test_a_new_revision_is_visible_through_squid_with_a_fresh_manifest_fetch(
    squid: SquidProxy, origin: Origin, repo: Repository, tmp_path: Path
) -> None:
    manifest_url = origin.url(".cvmfspublished")
    with open_via(origin, repo, [squid.url], tmp_path / "cache1") as reader:
        assert reader.revision == 1
        with repo.transaction() as txn:
            txn.add_directory("/cid2", write_tree(tmp_path / "src2", {"new.txt": b"published later\n"}))
            assert txn.commit().revision == 2
        # A plain poll within the manifest's 61 s is answered from squid's cache: still revision 1.
        with open_via(origin, repo, [squid.url], tmp_path / "cache2") as poll:
            assert poll.revision == 1
        # A fresh fetch sends "Cache-Control: no-cache": squid goes to the server and stores the answer.
        assert reader.load_manifest(fresh=True) is True
        assert reader.revision == 2
        assert reader.read("/cid2/new.txt") == b"published later\n"
        assert reader.read("/cid/README") == README
    entries = squid.wait_entries(manifest_url, 3)
    assert len(entries) == 3 and entries[1].outcome in HITS, entries
    assert entries[0].outcome == entries[2].outcome == "TCP_MISS/200", entries
    assert entries[2].hierarchy == "HIER_DIRECT/127.0.0.1"
    assert [e.request_cache_control for e in entries] == ["-", "-", "no-cache"]
    assert {e.reply_cache_control for e in entries} == {"max-age=61"}
    # ... so every later reader behind the same squid sees the new revision at once.
    with open_via(origin, repo, [squid.url], tmp_path / "cache3") as later:
        assert later.revision == 2
        assert later.read("/cid2/new.txt") == b"published later\n"
    assert outcomes(squid.wait_entries(manifest_url, 4))[3] in HITS


def test_the_manifest_through_squid_stays_short_lived(
    squid: SquidProxy, origin: Origin, repo: Repository
) -> None:
    """What squid hands on: the server's 61 s lifetime (cacheable, > squid's 60 s minimum), no validators."""
    with httpx.Client(proxy=squid.url, trust_env=False, timeout=10) as client:
        first = client.get(origin.url(".cvmfspublished"))
        second = client.get(origin.url(".cvmfspublished"))
    assert first.status_code == second.status_code == 200
    assert first.content == second.content == (repo.storage / ".cvmfspublished").read_bytes()
    assert second.headers["cache-control"] == "max-age=61"
    assert 0 <= int(second.headers.get("age", "0")) <= 61
    assert second.headers["x-cache"].startswith("HIT from")
    assert "last-modified" not in second.headers and "etag" not in second.headers


# --- 4. 404s must not hide what is published later -----------------------------------------------


def test_a_404_for_a_repository_is_not_cached_so_it_appears_once_created(
    squid: SquidProxy, origin: Origin, repo: Repository, tmp_path: Path
) -> None:
    del origin.repos[FQRN]  # not served yet: every path of it is a 404
    with closing(HttpSource([origin.repo_url], [squid.url])) as source, pytest.raises(NotFound):
        source.get(".cvmfspublished")
    origin.repos[FQRN] = repo.storage
    with open_via(origin, repo, [squid.url], tmp_path / "cache") as reader:  # a plain, non-fresh open
        assert reader.read("/cid/README") == README
    entries = squid.wait_entries(origin.url(".cvmfspublished"), 2)
    assert outcomes(entries) == ["TCP_MISS/404", "TCP_MISS/200"], entries
    # The 404 carries no lifetime (no Cache-Control, no Expires): squid's default negative_ttl 0 keeps none.
    assert entries[0].reply_cache_control == "no-store"  # what rcds sends on every 404


def test_a_404_for_an_object_is_not_cached_so_it_appears_once_stored(
    squid: SquidProxy, origin: Origin, repo: Repository, tmp_path: Path
) -> None:
    with open_via(origin, repo, [squid.url], tmp_path / "cache1") as reader:
        d = reader.stat("/cid/README")
    assert d.hash is not None
    key = d.hash.object_name()
    stored = repo.storage / key
    aside = stored.with_name(stored.name + ".aside")
    stored.rename(aside)  # e.g. a stratum 1 that has not replicated it yet
    with closing(HttpSource([origin.repo_url], [squid.url])) as source, pytest.raises(NotFound):
        source.get(key)
    aside.rename(stored)
    with open_via(origin, repo, [squid.url], tmp_path / "cache2") as reader:
        assert reader.read("/cid/README") == README
    entries = squid.wait_entries(origin.url(key), 2)
    assert outcomes(entries) == ["TCP_MISS/404", "TCP_MISS/200"], entries


# --- 5. outages ------------------------------------------------------------------------------------


def test_with_every_proxy_down_the_error_names_each_proxy_tried(
    origin: Origin, repo: Repository, tmp_path: Path
) -> None:
    proxies = [dead_proxy(), dead_proxy()]
    with pytest.raises(ReaderError) as info:
        open_via(origin, repo, proxies, tmp_path / "cache")
    message = str(info.value)
    assert "cannot fetch manifest" in message
    for proxy in proxies:
        assert f".cvmfspublished via {proxy}: ConnectionRefusedError" in message, message


def test_a_squid_that_cannot_reach_the_server_is_named_with_its_answer(
    squid: SquidProxy, repo: Repository, tmp_path: Path
) -> None:
    dead = dead_proxy()
    server = Origin(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(ReaderError) as info:
        open_via(server, repo, [dead, squid.url], tmp_path / "cache")
    message = str(info.value)
    assert f"via {dead}: ConnectionRefusedError" in message, message
    assert f"via {squid.url}: HTTP 503" in message, message
    assert outcomes(squid.wait_entries(server.url(".cvmfspublished"), 1))[0].endswith("/503")


# --- pipelined batches (rcds replicate, rcds get) through squid ------------------------------------


def test_a_replica_pulled_through_squid_twice_is_identical_and_the_second_comes_from_its_cache(
    squid: SquidProxy, origin: Origin, make_repo: Callable[..., Repository], tmp_path: Path
) -> None:
    """A snapshot asks for small objects in pipelined batches: squid must answer every request of a batch,
    in order, whether it fetches from the server (first replica) or from its cache (second)."""
    from rcds.cvmfs.replica import snapshot

    repo = make_repo()
    many = {f"f{i:03d}.txt": f"small file {i}\n".encode() * (i + 1) for i in range(120)}
    with repo.transaction() as txn:
        txn.add_directory("/cid", write_tree(tmp_path / "src", many), nested=True)
        txn.commit()
    origin.repos[FQRN] = repo.storage
    replicas = []
    for name in ("first", "second"):
        report = snapshot(
            origin.repo_url, tmp_path / name, public_keys=[repo.public_key_path], proxies=[squid.url], jobs=2
        )
        assert report.objects_fetched >= 120
        got = sorted(
            p.relative_to(tmp_path / name).as_posix() for p in (tmp_path / name / "data").glob("??/*")
        )
        for key in got:
            assert (tmp_path / name / key).read_bytes() == (repo.storage / key).read_bytes()
        with RepositoryReader.open(str(tmp_path / name), public_key=repo.public_key_path, fqrn=FQRN) as r:
            assert {f"/cid/{n}": r.read(f"/cid/{n}") for n in many} == {
                f"/cid/{n}": d for n, d in many.items()
            }
        replicas.append(got)
    assert replicas[0] == replicas[1] and len(replicas[0]) > 120
    for key in [k for k in replicas[0] if not k.endswith("C")][:40]:
        entries = squid.wait_entries(origin.url(key), 2)
        assert outcomes(entries)[0] == "TCP_MISS/200" and outcomes(entries)[1] in HITS, (key, entries)
