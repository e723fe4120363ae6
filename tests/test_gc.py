"""Garbage collection (``rcds.cvmfs.gc``) on real repositories: what is kept, what is deleted, and that a
crash, a concurrent publish or a client on the previous revision never sees a broken repository.

The timeline used by most tests (``DAY`` = 86400 s, GC at ``T0 + 8 days`` with the default 3-day horizon)::

    rev 0  template creation (before T0)      empty
    rev 1  T0          add /sw/a, /sw/b
    rev 2  T0 + 1 day  remove /sw/a, add /sw/c (c shares a file with a)
    rev 3  T0 + 2 days remove /sw/b, add /sw/d  <- current at the horizon (T0 + 5 days): kept
    rev 4  T0 + 6 days add /sw/e                <- within the horizon; also tag trunk-previous
    rev 5  T0 + 7 days add /sw/f                <- current

so revisions 3, 4, 5 are kept and 0, 1, 2 swept: everything of /sw/a and /sw/b except the file shared
with /sw/c and the empty ``.cvmfscatalog`` marker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import GcExpectation as Expectation
from conftest import write_tree
from rcds.cvmfs import failpoints
from rcds.cvmfs.checker import check_repository
from rcds.cvmfs.contentindex import ContentIndex
from rcds.cvmfs.gc import GcError, GcReport, collect_garbage
from rcds.cvmfs.hashes import ContentHash, Suffix
from rcds.cvmfs.objects import compress
from rcds.cvmfs.reader import ReaderError, RepositoryReader
from rcds.cvmfs.reflog import Reflog, RefType
from rcds.cvmfs.repository import Repository
from rcds.cvmfs.writer import CommitResult
from rcds.storage.local import LocalStore

DAY = 86400
SHARED = b"a file both /sw/a and /sw/c contain\n" * 20

GC_SCRIPT = """
import sys
from rcds.cvmfs.gc import collect_garbage
from rcds.cvmfs.repository import Repository

collect_garbage(Repository(sys.argv[1]), now=float(sys.argv[2]))
"""
FAILPOINTS = ["gc-after-mark", "gc-mid-sweep", "gc-before-reflog", "gc-before-manifest", "gc-after-manifest"]


def tree(tag: str, big: int = 0) -> dict[str, object]:
    spec: dict[str, object] = {f"{tag}.txt": f"only in {tag}\n".encode() * 30, "sub": {"x": tag.encode() * 7}}
    if big:  # chunked with the test repositories' small chunk sizes (64/128/256 KiB)
        spec["big.bin"] = hashlib.shake_256(tag.encode()).digest(big)
    return spec


@dataclass
class Timeline:
    repo: Repository
    t0: int
    roots: dict[int, ContentHash]
    sources: dict[str, Path]

    @property
    def gc_time(self) -> int:
        return self.t0 + 8 * DAY


def commit(
    repo: Repository,
    when: int,
    add: dict[str, Path] | None = None,
    remove: tuple[str, ...] = (),
    tag: str | None = None,
) -> CommitResult:
    with repo.transaction() as txn:
        txn.clock = lambda: when
        for path in remove:
            assert txn.remove(path)
        for path, src in (add or {}).items():
            txn.add_directory(path, src)
        return txn.commit(tag=tag)


def build_timeline(repo: Repository, tmp_path: Path, tag_first: str | None = None) -> Timeline:
    t0 = int(time.time()) + 10  # later than revision 0 of the template (commit timestamps never go back)
    src = {
        name: write_tree(tmp_path / f"src-{name}", spec)
        for name, spec in {
            "a": {**tree("a", big=300_000), "shared.txt": SHARED},
            "b": tree("b", big=200_000),
            "c": {**tree("c"), "shared.txt": SHARED},
            "d": tree("d"),
            "e": tree("e"),
            "f": tree("f"),
            "g": tree("g"),
        }.items()
    }
    roots = {0: repo.manifest().root_catalog}
    steps: list[tuple[int, dict[str, Path], tuple[str, ...]]] = [
        (t0, {"/sw/a": src["a"], "/sw/b": src["b"]}, ()),
        (t0 + DAY, {"/sw/c": src["c"]}, ("/sw/a",)),
        (t0 + 2 * DAY, {"/sw/d": src["d"]}, ("/sw/b",)),
        (t0 + 6 * DAY, {"/sw/e": src["e"]}, ()),
        (t0 + 7 * DAY, {"/sw/f": src["f"]}, ()),
    ]
    for rev, (when, add, remove) in enumerate(steps, start=1):
        result = commit(repo, when, add, remove, tag=tag_first if rev == 1 else None)
        assert result.revision == rev
        roots[rev] = result.root_hash
    return Timeline(repo, t0, roots, src)


@pytest.fixture
def timeline(make_repo: Callable[..., Repository], tmp_path: Path) -> Timeline:
    return build_timeline(make_repo(), tmp_path)


# --- helpers -------------------------------------------------------------------------------------


def on_revision(reader: RepositoryReader, root: ContentHash) -> RepositoryReader:
    """Point a reader at an older root catalog (as a client still on that revision would be)."""
    reader.manifest = dataclasses.replace(reader.manifest, root_catalog=root)
    return reader


def read_revision(reader: RepositoryReader, root: ContentHash) -> dict[str, bytes]:
    on_revision(reader, root)
    return {e.path: reader.read(e.path) for e in reader.walk("/") if e.dirent.is_regular}


def revision_objects(reader: RepositoryReader, root: ContentHash) -> set[str]:
    """Every object a revision needs, found by walking it with the client-side reader."""
    keys = {h.object_name(Suffix.CATALOG) for _m, h, _c in reader.iter_catalogs(root)}
    on_revision(reader, root)
    for e in reader.walk("/"):
        d = e.dirent
        if d.is_regular and d.is_chunked:
            keys |= {c.hash.object_name(Suffix.PARTIAL) for c in d.chunks}
        elif d.is_regular and d.hash is not None:
            keys.add(d.hash.object_name())
    return keys


def data_listing(repo: Repository) -> dict[str, int]:
    """Object name -> stored size of every object in the repository (its store: a directory or a bucket)."""
    return {key: repo.store.size(key) for key in repo.store.iter_keys("data/")}


def full_listing(repo: Repository) -> dict[str, str]:
    """Every file of the storage (public and private, and the bucket's objects) -> SHA-1 of its bytes."""
    listing = {
        p.relative_to(repo.storage).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(repo.storage.rglob("*"))
        if p.is_file()
    }
    if not isinstance(repo.store, LocalStore):
        listing |= {f"s3:{k}": hashlib.sha1(repo.store.get(k)).hexdigest() for k in repo.store.iter_keys("")}
    return listing


def clone_repository(repo: Repository, dest: Path) -> Repository:
    """An independent copy (private state, and the public files under a new prefix of the same bucket)."""
    shutil.copytree(repo.storage, dest, symlinks=True)
    if isinstance(repo.store, LocalStore):
        return Repository(dest)
    config_path = dest / ".rcds" / "repo.json"
    config = json.loads(config_path.read_text())
    config["store"] = {**config["store"], "url": config["store"]["url"] + "-clone"}
    config_path.write_text(json.dumps(config))
    clone = Repository(dest)
    for key in repo.store.iter_keys(""):
        clone.store.put(key, repo.store.get(key))
    return clone


@pytest.fixture(params=["local", "s3"])
def storage_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def reflog_rows(repo: Repository) -> set[tuple[str, RefType, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ".cvmfsreflog"
        path.write_bytes(repo.store.get(".cvmfsreflog"))
        reflog = Reflog(path)
        try:
            return {(h.hex, kind, ts) for h, kind, ts in reflog.list()}
        finally:
            reflog.close()


def source_files(src: Path, top: str) -> dict[str, bytes]:
    out = {f"{top}/.cvmfscatalog": b""}
    out.update(
        {f"{top}/{p.relative_to(src).as_posix()}": p.read_bytes() for p in src.rglob("*") if p.is_file()}
    )
    return out


def expected_revision(t: Timeline, cids: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for c in cids:
        out.update(source_files(t.sources[c], f"/sw/{c}"))
    return out


def assert_healthy(open_reader: Callable[..., RepositoryReader], repo: Repository) -> RepositoryReader:
    """The checker finds no error and the manifest's Y matches the reflog (the reader verifies it signed)."""
    reader = open_reader(repo)
    report = check_repository(reader)
    assert report.errors == [], [str(i) for i in report.issues]
    reflog_bytes = repo.store.get(".cvmfsreflog")
    assert reader.manifest.reflog == ContentHash.of(reflog_bytes)
    return reader


def expectation(t: Timeline, reader: RepositoryReader, swept: list[int], kept: list[int]) -> Expectation:
    doomed = set().union(*(revision_objects(reader, t.roots[r]) for r in swept))
    live = set().union(*(revision_objects(reader, t.roots[r]) for r in kept))
    gone = doomed - live
    rows = reflog_rows(t.repo)
    oldest_kept = min(ts for h, kind, ts in rows if kind is RefType.CATALOG and h == t.roots[min(kept)].hex)
    manifest = t.repo.manifest()
    aux = {
        ContentHash.from_hex(h).object_name(Suffix.HISTORY)
        for h, kind, ts in rows
        if kind is RefType.HISTORY and ts < oldest_kept and h != (manifest.history and manifest.history.hex)
    }
    catalogs = {k for k in gone if k.endswith("C")}
    return Expectation(gone - catalogs, catalogs, aux)


# --- what is kept and what is swept --------------------------------------------------------------


def test_gc_keeps_the_horizon_and_the_revision_current_at_it_and_deletes_exactly_the_rest(
    timeline: Timeline, open_reader: Callable[..., RepositoryReader]
) -> None:
    t, repo = timeline, timeline.repo
    expected = expectation(t, open_reader(repo), swept=[0, 1, 2], kept=[3, 4, 5])
    shared_object = compress(SHARED)[1].object_name()  # /sw/a's copy is in revision 3 through /sw/c
    before = data_listing(repo)
    progress: list[tuple[str, int, int]] = []

    report = collect_garbage(repo, now=t.gc_time, progress=lambda *p: progress.append(p))

    after = data_listing(repo)
    removed = set(before) - set(after)
    assert set(after) <= set(before)
    assert removed == expected.all
    assert expected.objects and expected.catalogs and expected.aux
    assert any(k.endswith("P") for k in expected.objects), "the chunks of /sw/a/big.bin must go too"
    assert shared_object in after
    assert report.revisions_kept == [3, 4, 5]
    assert report.roots_swept == 3
    assert report.objects_swept == len(expected.objects)
    assert report.catalogs_swept == len(expected.catalogs)
    assert report.aux_swept == len(expected.aux)
    assert report.bytes_freed == sum(before[k] for k in removed)
    assert report.objects_examined > 0 and not report.dry_run and report.warnings == []
    assert {p[0] for p in progress} >= {"mark", "plan", "lock", "sweep", "publish"}
    assert (
        "sweep",
        report.objects_swept + report.catalogs_swept,
        report.objects_swept + report.catalogs_swept,
    ) in progress

    # Every kept revision reads back completely; the swept ones are gone.
    reader = assert_healthy(open_reader, repo)
    assert read_revision(reader, t.roots[5]) == expected_revision(t, "cdef")
    assert read_revision(reader, t.roots[4]) == expected_revision(t, "cde")
    assert read_revision(reader, t.roots[3]) == expected_revision(t, "cd")
    with pytest.raises(ReaderError):
        read_revision(open_reader(repo), t.roots[1])

    # The reflog forgot the swept roots and histories, and still lists what it must.
    listed = {h for h, _kind, _ts in reflog_rows(repo)}
    assert {t.roots[r].hex for r in (0, 1, 2)}.isdisjoint(listed)
    assert {t.roots[r].hex for r in (3, 4, 5)} <= listed
    manifest = repo.manifest()
    assert (manifest.revision, manifest.root_catalog) == (5, t.roots[5])
    # The private catalog cache dropped the swept catalogs.
    cached = {p.name for p in repo.catalog_cache.iterdir()}
    assert cached.isdisjoint({k.split("/")[1] + k.split("/")[2][:-1] for k in expected.catalogs})
    assert "last_gc" in json.loads(repo.store.get(".cvmfs_status.json"))


def test_the_content_index_forgets_swept_objects_and_a_republish_stores_them_again(
    timeline: Timeline, open_reader: Callable[..., RepositoryReader]
) -> None:
    t, repo = timeline, timeline.repo
    collect_garbage(repo, now=t.gc_time)
    index = ContentIndex(repo.private / "content-index.db")
    try:
        for _key, value in index.db.execute("SELECT key, value FROM pieces"):
            value = bytes(value)
            digests = (
                [value] if len(value) == 20 else [value[i + 16 : i + 36] for i in range(0, len(value), 36)]
            )
            for d in digests:
                h = ContentHash(d)
                assert repo.store.exists(h.object_name()) or repo.store.exists(h.object_name(Suffix.PARTIAL))
    finally:
        index.close()
    result = commit(repo, t.gc_time, {"/sw/a-again": t.sources["a"]})
    assert result.stats.objects_written > 0
    reader = assert_healthy(open_reader, repo)
    assert read_revision(reader, result.root_hash) == {
        **expected_revision(t, "cdef"),
        **source_files(t.sources["a"], "/sw/a-again"),
    }


def test_tagged_revisions_are_kept_with_everything_they_reference(
    make_repo: Callable[..., Repository], tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    t = build_timeline(make_repo(), tmp_path, tag_first="release-1")
    report = collect_garbage(t.repo, now=t.gc_time)
    assert report.revisions_kept == [1, 3, 4, 5]
    assert report.roots_swept == 2  # revisions 0 and 2
    reader = assert_healthy(open_reader, t.repo)
    assert read_revision(reader, t.roots[1]) == expected_revision(t, "ab")
    assert read_revision(open_reader(t.repo), t.roots[5]) == expected_revision(t, "cdef")


def test_a_longer_horizon_keeps_more_and_nothing_is_swept_twice(
    timeline: Timeline, open_reader: Callable[..., RepositoryReader]
) -> None:
    t = timeline
    first = collect_garbage(t.repo, now=t.gc_time, horizon=7.5 * DAY)  # horizon at T0 + 0.5 days: rev 1
    assert first.revisions_kept == [1, 2, 3, 4, 5]
    assert (first.roots_swept, first.objects_swept) == (1, 0)  # revision 0 is an empty root catalog
    second = collect_garbage(t.repo, now=t.gc_time)
    assert second.revisions_kept == [3, 4, 5]
    assert second.roots_swept == 2 and second.objects_swept > 0
    assert_healthy(open_reader, t.repo)


def test_a_dry_run_changes_nothing_and_reports_what_the_real_run_deletes(timeline: Timeline) -> None:
    t = timeline
    before = full_listing(t.repo)
    dry = collect_garbage(t.repo, now=t.gc_time, dry_run=True)
    assert full_listing(t.repo) == before
    assert dry.dry_run
    real = collect_garbage(t.repo, now=t.gc_time)
    for f in ("revisions_kept", "roots_swept", "objects_swept", "bytes_freed", "catalogs_swept", "aux_swept"):
        assert getattr(dry, f) == getattr(real, f), f


def test_a_second_gc_finds_nothing_to_do(timeline: Timeline) -> None:
    t = timeline
    collect_garbage(t.repo, now=t.gc_time)
    objects = data_listing(t.repo)
    manifest = t.repo.store.get(".cvmfspublished")
    reflog = t.repo.store.get(".cvmfsreflog")
    again = collect_garbage(t.repo, now=t.gc_time)
    assert (again.roots_swept, again.objects_swept, again.catalogs_swept, again.aux_swept) == (0, 0, 0, 0)
    assert again.bytes_freed == 0 and again.revisions_kept == [3, 4, 5]
    assert data_listing(t.repo) == objects
    assert t.repo.store.get(".cvmfspublished") == manifest
    assert t.repo.store.get(".cvmfsreflog") == reflog


def test_objects_of_an_aborted_publish_are_untouched(
    timeline: Timeline, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    t = timeline
    before = data_listing(t.repo)
    src = write_tree(tmp_path / "aborted", tree("aborted", big=150_000))
    with t.repo.transaction() as txn:
        txn.add_directory("/sw/aborted", src)
        # no commit: the transaction aborts, its objects stay in the store
    orphans = set(data_listing(t.repo)) - set(before)
    assert len(orphans) >= 3
    collect_garbage(t.repo, now=t.gc_time)
    assert orphans <= set(data_listing(t.repo))
    assert_healthy(open_reader, t.repo)


def test_a_repository_that_is_not_garbage_collectable_is_refused(timeline: Timeline) -> None:
    repo = timeline.repo
    with repo.lock():
        repo.publish_manifest(
            dataclasses.replace(repo.manifest(), garbage_collectable=False), repo.reflog_copy()
        )
    before = data_listing(repo)
    with pytest.raises(GcError, match="not garbage-collectable"):
        collect_garbage(repo, now=timeline.gc_time)
    assert data_listing(repo) == before


# --- clients and publishers running meanwhile ----------------------------------------------------


def test_a_client_on_the_previous_revision_reads_all_of_it_after_gc(
    timeline: Timeline, open_reader: Callable[..., RepositoryReader]
) -> None:
    t = timeline
    client = open_reader(t.repo)  # mounted revision 5, nothing fetched but the root catalog yet
    assert client.manifest.revision == 5
    commit(t.repo, t.gc_time, {"/sw/g": t.sources["g"]}, remove=("/sw/c",))
    report = collect_garbage(t.repo, now=t.gc_time + 3600)
    assert 5 in report.revisions_kept and report.roots_swept == 3
    assert {
        e.path: client.read(e.path) for e in client.walk("/") if e.dirent.is_regular
    } == expected_revision(t, "cdef")


def test_an_object_reused_by_a_publish_during_gc_is_never_swept(
    timeline: Timeline, open_reader: Callable[..., RepositoryReader]
) -> None:
    """A publish re-adds /sw/a (whose objects only swept revision 1 references) after GC planned their
    deletion: the writer deduplicates against the old objects, GC waits for the writer lock, marks the new
    revision and deletes none of them."""
    t, repo = timeline, timeline.repo
    expected = expectation(t, open_reader(repo), swept=[0, 1, 2], kept=[3, 4, 5])
    a_objects = {  # the file contents only rev 1 references (its /sw/a catalog goes: a-again has its own)
        k
        for k in revision_objects(open_reader(repo), t.roots[1])
        - revision_objects(open_reader(repo), t.roots[2])
        if not k.endswith("C")
    }
    holding = threading.Event()
    results: list[CommitResult] = []
    errors: list[BaseException] = []

    def publish_again() -> None:
        try:
            with Repository(repo.storage).transaction() as txn:
                txn.clock = lambda: t.gc_time
                txn.add_directory("/sw/a-again", t.sources["a"])
                holding.set()  # the lock is held, the content deduplicated against rev 1's objects
                time.sleep(0.3)  # GC is waiting for the lock now
                results.append(txn.commit())
        except BaseException as exc:
            errors.append(exc)
            holding.set()

    publisher = threading.Thread(target=publish_again)
    waited: list[float] = []

    def progress(phase: str, done: int, total: int) -> None:
        if (phase, done) == ("lock", 0):
            publisher.start()
            assert holding.wait(30)
            waited.append(time.monotonic())
        elif (phase, done) == ("lock", 1):
            waited.append(time.monotonic())

    report = collect_garbage(repo, now=t.gc_time, progress=progress)
    publisher.join(30)
    assert errors == []
    assert waited[1] - waited[0] >= 0.2, "GC should have waited for the publisher's lock"
    (result,) = results
    assert result.revision == 6 and result.stats.objects_written == 0  # everything was deduplicated
    assert report.revisions_kept == [3, 4, 5, 6]
    assert report.objects_swept == len(expected.objects - a_objects)
    assert a_objects <= set(data_listing(repo))
    reader = assert_healthy(open_reader, repo)
    assert read_revision(reader, result.root_hash) == {
        **expected_revision(t, "cdef"),
        **source_files(t.sources["a"], "/sw/a-again"),
    }


def test_gc_waits_for_a_writer_holding_the_lock_in_another_process(timeline: Timeline) -> None:
    t = timeline
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom rcds.cvmfs.repository import Repository\n"
         "with Repository(sys.argv[1]).lock():\n    print('locked', flush=True)\n    time.sleep(1.0)\n",
         str(t.repo.storage)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        report = collect_garbage(t.repo, now=t.gc_time)
        assert time.monotonic() - started >= 0.5
        assert holder.wait(10) == 0
    finally:
        holder.kill()
    assert report.roots_swept == 3


def test_only_one_gc_at_a_time(timeline: Timeline) -> None:
    t = timeline

    def second(phase: str, done: int, _total: int) -> None:
        if (phase, done) == ("lock", 0):
            with pytest.raises(Exception, match="another garbage collection"):
                collect_garbage(t.repo, now=t.gc_time)
            collect_garbage(t.repo, now=t.gc_time, dry_run=True)  # a dry run needs no exclusion

    assert collect_garbage(t.repo, now=t.gc_time, progress=second).roots_swept == 3


# --- crashes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("failpoint", FAILPOINTS)
def test_gc_killed_at_any_point_leaves_a_valid_repository_and_a_rerun_finishes_the_job(
    timeline: Timeline, failpoint: str, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    t, repo = timeline, timeline.repo
    reference = clone_repository(repo, tmp_path / "reference")
    clean = collect_garbage(reference, now=t.gc_time)
    before = data_listing(repo)

    child = subprocess.run(
        [sys.executable, "-c", GC_SCRIPT, str(repo.storage), str(t.gc_time)],
        env={**os.environ, failpoints.ENV: failpoint},
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == failpoints.EXIT_CODE, child.stderr.decode()
    reader = open_reader(repo)
    report = check_repository(reader)
    assert report.errors == [], [str(i) for i in report.issues]
    assert read_revision(reader, t.roots[5]) == expected_revision(t, "cdef")
    deleted_by_crashed_run = len(set(before) - set(data_listing(repo)))
    if failpoint == "gc-after-mark":
        assert deleted_by_crashed_run == 0
    elif failpoint == "gc-mid-sweep":
        assert 0 < deleted_by_crashed_run < len(set(before) - set(data_listing(reference)))

    rerun = collect_garbage(repo, now=t.gc_time)
    assert data_listing(repo) == data_listing(reference)
    assert reflog_rows(repo) == reflog_rows(reference)
    assert rerun.revisions_kept == clean.revisions_kept
    reader = assert_healthy(open_reader, repo)
    assert not any(i.where == ".cvmfsreflog" for i in check_repository(reader).issues)
    assert read_revision(reader, t.roots[3]) == expected_revision(t, "cd")
    assert not (repo.private / "gc").exists() or not any((repo.private / "gc").iterdir())


# --- command line --------------------------------------------------------------------------------


def test_rcds_repo_gc_prints_a_json_report(make_repo: Callable[..., Repository], tmp_path: Path) -> None:
    now = int(time.time())
    repo = make_repo(now=now - 10 * DAY)  # a repository of its own that started ten days ago
    old = write_tree(tmp_path / "old", tree("old"))
    commit(repo, now - 10 * DAY, {"/sw/old": old})
    commit(repo, now - 9 * DAY, {"/sw/new": write_tree(tmp_path / "new", tree("new"))}, remove=("/sw/old",))
    commit(repo, now - 3600, {"/sw/newer": write_tree(tmp_path / "newer", tree("newer"))})

    def rcds(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rcds.cli", "repo", "gc", "--storage", str(repo.storage), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    dry = rcds("--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    real = rcds("--json")
    assert real.returncode == 0, real.stderr
    report = GcReport(**json.loads(real.stdout))
    assert report.revisions_kept == [2, 3] and report.roots_swept == 2 and not report.dry_run
    assert report.objects_swept == 2  # old.txt and sub/x: the marker is shared
    assert {**json.loads(dry.stdout), "dry_run": False, "seconds": 0} == {
        **json.loads(real.stdout),
        "seconds": 0,
    }
    text = rcds("--horizon-days", "0")
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith(
        f"{repo.fqrn}: kept 2 revisions (2, 3); deleted 0 root catalogs"
    )  # 2: trunk-previous
