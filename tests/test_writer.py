"""Publishing with rcds transactions, read back through the reader and verified by the checker.

Everything here uses real repositories on disk (real SQLite catalogs, real signatures); the oracle for a
published tree is the source directory itself.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import random
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import SMALL_CHUNKS, File, Hardlink, Symlink, new_repo, write_tree
from rcds.cvmfs.catalog import COUNTER_KINDS, add_counts
from rcds.cvmfs.checker import CheckReport, check_repository
from rcds.cvmfs.errors import TransactionError, TreeError
from rcds.cvmfs.hashes import ContentHash, Suffix
from rcds.cvmfs.history import TRUNK, TRUNK_PREVIOUS
from rcds.cvmfs.objects import EMPTY_HASH
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.reflog import Reflog, RefType
from rcds.cvmfs.repository import Repository, RepositoryError
from rcds.cvmfs.tree import EntryKind, TreeEntry
from rcds.cvmfs.treenodes import xattr_blob
from rcds.ingest.tarstream import tar_entries
from rcds.storage.local import LocalStore

BIG = random.Random(7).randbytes(700 * 1024)  # > SMALL_CHUNKS.max_size: several chunks

RICH_TREE: dict[str, object] = {
    "README": File(b"hello world\n", mtime=1_600_000_001),
    "empty.txt": b"",
    "private.key": File(b"secret\n", mode=0o600),
    "bin": {
        "run.sh": File(b"#!/bin/sh\necho hi\n", mode=0o755, mtime=1_600_000_002),
        "tool": File(b"\x7fELF\x02\x01\x01" + bytes(100), mode=0o750),
    },
    "links": {
        "relative": Symlink("../README", mtime=1_600_000_003),
        "absolute": Symlink("/cvmfs/other.example/lib"),
        "dangling": Symlink("does/not/exist"),
        "variant": Symlink("/cvmfs/$(RCDS_SITE:-default)/x"),
    },
    "empty_dir": {},
    "a": {"b": {"c": {"deep.txt": File(b"deep\n", mtime=1_600_000_004)}}},
    "data": {
        "orig.txt": File(b"shared by three names\n", mtime=1_600_000_005),
        "same_dir_link.txt": Hardlink("data/orig.txt"),
    },
    "other": {"cross_dir_link.txt": Hardlink("data/orig.txt")},
    "big.bin": BIG,
    "pair_a.txt": b"one name here, one in the nested catalog\n",
    "sub": {
        ".cvmfscatalog": b"",
        "inside.txt": b"inside a nested catalog of the tree\n",
        "deeper": {"x.txt": b"x"},
        "cross_catalog_link.txt": Hardlink("pair_a.txt"),
    },
}


def check(reader: RepositoryReader) -> CheckReport:
    report = check_repository(reader)
    assert report.errors == [], [str(i) for i in report.issues]
    return report


def source_entries(src: Path, prefix: str) -> dict[str, os.stat_result]:
    """``prefix + /relative/path`` -> lstat, for the tree root and everything below it."""
    out = {prefix: os.lstat(src)}
    for dirpath, dirnames, filenames in os.walk(src):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            out[f"{prefix}/{p.relative_to(src).as_posix()}"] = os.lstat(p)
    return out


def tree_dir(tmp_path: Path, spec: dict[str, object], name: str = "src") -> Path:
    return write_tree(tmp_path / name, spec)


def publish(repo: Repository, path: str, src: Path, nested: bool = True) -> int:
    with repo.transaction() as txn:
        txn.add_directory(path, src, nested=nested)
        return txn.commit().revision


def remove(repo: Repository, *paths: str) -> int:
    with repo.transaction() as txn:
        for p in paths:
            assert txn.remove(p), p
        return txn.commit().revision


# --- one rich tree, published once -----------------------------------------------------------------


@dataclass
class Published:
    repo: Repository
    src: Path
    reader: RepositoryReader
    revision: int


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, repo_template: Path) -> Iterator[Published]:
    base = tmp_path_factory.mktemp("rich")
    repo = new_repo(base / "storage", repo_template)
    src = write_tree(base / "src", RICH_TREE)
    revision = publish(repo, "/cid", src)
    reader = RepositoryReader.open(
        repo.storage, repo.public_key_path, fqrn=repo.fqrn, cache_dir=base / "cache"
    )
    yield Published(repo, src, reader, revision)
    reader.close()


def test_publish_makes_revision_1(published: Published) -> None:
    assert published.revision == 1
    assert published.reader.manifest.revision == 1
    assert published.reader.root_catalog.revision == 1


def test_published_paths_are_the_source_paths_plus_the_tree_marker(published: Published) -> None:
    in_repo = {e.path for e in published.reader.walk("/cid")}
    assert in_repo == set(source_entries(published.src, "/cid")) | {"/cid/.cvmfscatalog"}


def test_published_files_read_back_byte_identical(published: Published) -> None:
    for path, st in source_entries(published.src, "/cid").items():
        if stat.S_ISREG(st.st_mode):
            assert published.reader.read(path) == (published.src / path.removeprefix("/cid/")).read_bytes(), (
                path
            )


def test_published_entries_keep_type_mode_bits_size_and_mtime(published: Published) -> None:
    for path, st in source_entries(published.src, "/cid").items():
        d = published.reader.stat(path)
        assert stat.S_IFMT(d.mode) == stat.S_IFMT(st.st_mode), path
        assert stat.S_IMODE(d.mode) == stat.S_IMODE(st.st_mode), path
        assert d.mtime == int(st.st_mtime), path
        if not stat.S_ISDIR(st.st_mode):
            assert d.size == st.st_size, path
        assert (d.uid, d.gid) == (st.st_uid, st.st_gid), path


def test_published_modes_include_executable_and_private_bits(published: Published) -> None:
    r = published.reader
    assert stat.S_IMODE(r.stat("/cid/bin/run.sh").mode) == 0o755
    assert stat.S_IMODE(r.stat("/cid/bin/tool").mode) == 0o750
    assert stat.S_IMODE(r.stat("/cid/private.key").mode) == 0o600
    assert r.stat("/cid/README").mtime == 1_600_000_001


def test_published_symlinks_keep_relative_absolute_dangling_and_variant_targets(published: Published) -> None:
    expected = {
        "relative": "../README",
        "absolute": "/cvmfs/other.example/lib",
        "dangling": "does/not/exist",
        "variant": "/cvmfs/$(RCDS_SITE:-default)/x",
    }
    for name, target in expected.items():
        d = published.reader.stat(f"/cid/links/{name}")
        assert d.is_symlink
        assert d.symlink == target
        assert d.size == len(target)
        assert d.hash is None
    assert published.reader.stat("/cid/links/relative").mtime == 1_600_000_003


def test_empty_file_references_the_empty_object(published: Published) -> None:
    d = published.reader.stat("/cid/empty.txt")
    assert d.is_regular and d.size == 0
    assert d.hash == EMPTY_HASH
    assert (published.repo.storage / EMPTY_HASH.object_name()).is_file()
    assert published.reader.read("/cid/empty.txt") == b""


def test_empty_directory_is_published(published: Published) -> None:
    assert published.reader.stat("/cid/empty_dir").is_dir
    assert published.reader.listdir("/cid/empty_dir") == []


def test_file_larger_than_the_maximum_chunk_is_stored_in_contiguous_chunks(published: Published) -> None:
    d = published.reader.stat("/cid/big.bin")
    assert d.is_chunked
    assert d.hash is None
    assert len(d.chunks) >= 3
    offset = 0
    for c in d.chunks:
        assert c.offset == offset
        assert 0 < c.size <= SMALL_CHUNKS.max_size
        assert (published.repo.storage / c.hash.object_name(Suffix.PARTIAL)).is_file()
        offset += c.size
    assert offset == len(BIG) == d.size
    assert published.reader.read("/cid/big.bin") == BIG


def test_small_files_are_stored_whole(published: Published) -> None:
    d = published.reader.stat("/cid/README")
    assert not d.is_chunked and d.chunks == []
    assert d.hash is not None
    assert (published.repo.storage / d.hash.object_name()).is_file()


def test_hard_links_in_one_directory_share_a_group_and_the_link_count(published: Published) -> None:
    rows = [published.reader.stat(p) for p in ("/cid/data/orig.txt", "/cid/data/same_dir_link.txt")]
    assert rows[0].hardlink_group != 0
    assert rows[0].hardlink_group == rows[1].hardlink_group
    assert [d.linkcount for d in rows] == [2, 2]
    assert rows[0].hash == rows[1].hash
    assert published.reader.read("/cid/data/same_dir_link.txt") == b"shared by three names\n"


def test_hard_links_in_another_directory_become_independent_copies(published: Published) -> None:
    # CVMFS groups hard links per directory (cvmfs_swissknife check counts group members per listing).
    orig = published.reader.stat("/cid/data/orig.txt")
    other = published.reader.stat("/cid/other/cross_dir_link.txt")
    assert (other.linkcount, other.hardlink_group) == (1, 0)
    assert other.hash == orig.hash
    assert (other.mode, other.mtime, other.size) == (orig.mode, orig.mtime, orig.size)
    assert published.reader.read("/cid/other/cross_dir_link.txt") == b"shared by three names\n"


def test_hard_links_across_catalogs_become_independent_files(published: Published) -> None:
    outer = published.reader.stat("/cid/pair_a.txt")
    inner = published.reader.stat("/cid/sub/cross_catalog_link.txt")
    assert published.reader.catalog_for("/cid/sub/cross_catalog_link.txt")[0] == "/cid/sub"
    assert (outer.linkcount, inner.linkcount) == (1, 1)
    assert outer.hash == inner.hash
    assert published.reader.read("/cid/sub/cross_catalog_link.txt") == RICH_TREE["pair_a.txt"]


def test_every_directory_link_count_is_two_plus_its_subdirectories(published: Published) -> None:
    r = published.reader
    dirs = [e for e in r.walk("") if e.dirent.is_dir]
    assert len(dirs) >= 10
    for e in dirs:
        subdirs = sum(1 for d in r.listdir(e.path) if d.is_dir)
        assert e.dirent.linkcount == 2 + subdirs, e.path


def test_tree_and_cvmfscatalog_subdirectory_become_nested_catalogs(published: Published) -> None:
    r = published.reader
    assert {m for m, _h, _c in r.iter_catalogs()} == {"", "/cid", "/cid/sub"}
    assert r.catalog_for("/cid/sub/deeper/x.txt")[0] == "/cid/sub"
    assert r.catalog_for("/cid/a/b/c/deep.txt")[0] == "/cid"
    assert r.stat("/cid").is_nested_root and r.stat("/cid/sub").is_nested_root
    assert r.read("/cid/.cvmfscatalog") == b""
    assert r.stat("/cid/.cvmfscatalog").hash == EMPTY_HASH


def test_catalogs_are_written_in_the_current_schema(published: Published) -> None:
    for mount, _h, cat in published.reader.iter_catalogs():
        assert cat.properties["schema"] == "2.5"
        assert cat.properties["schema_revision"] == "7"
        assert ("root_prefix" in cat.properties) == bool(mount)
        if mount:
            assert cat.root_prefix == mount
    assert published.reader.root_catalog.ttl == 15 == published.reader.manifest.ttl


def test_checker_finds_nothing_wrong_with_the_published_tree(published: Published) -> None:
    report = check(published.reader)
    assert report.issues == []
    assert report.catalogs == 3


# --- successive commits ----------------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def storage_backend(request: pytest.FixtureRequest) -> str:
    """The tests from here on run on local storage and on a real S3 server (``make_repo``)."""
    return str(request.param)


@pytest.fixture
def repo(make_repo: Callable[..., Repository]) -> Repository:
    return make_repo()


def small_tree(tmp_path: Path, name: str, files: dict[str, bytes] | None = None) -> Path:
    return tree_dir(tmp_path, files or {f"{name}.txt": f"content of {name}\n".encode()}, name)


def test_each_commit_increments_the_revision_by_one(repo: Repository, tmp_path: Path) -> None:
    assert repo.manifest().revision == 0
    revisions = [publish(repo, f"/cid{i}", small_tree(tmp_path, f"t{i}")) for i in range(3)]
    assert revisions == [1, 2, 3]
    assert repo.manifest().revision == 3


def test_manifest_revision_and_timestamp_agree_with_the_root_catalog(
    repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    for i in range(2):
        publish(repo, f"/cid{i}", small_tree(tmp_path, f"t{i}"))
        reader = open_reader(repo)
        root = reader.root_catalog
        assert reader.manifest.revision == root.revision == i + 1
        assert reader.manifest.timestamp >= root.last_modified > 0
        assert reader.manifest.root_catalog_size == root.path.stat().st_size


def test_root_catalog_previous_revision_is_the_previous_root_hash(
    repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    roots = [repo.manifest().root_catalog]
    for i in range(2):
        publish(repo, f"/cid{i}", small_tree(tmp_path, f"t{i}"))
        roots.append(repo.manifest().root_catalog)
    reader = open_reader(repo)
    assert reader.root_catalog.previous_revision == roots[1]
    assert reader.catalog(roots[1]).previous_revision == roots[0]
    assert reader.catalog(roots[0]).previous_revision is None


def test_history_has_trunk_at_the_current_and_trunk_previous_at_the_previous_revision(
    repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    publish(repo, "/a", small_tree(tmp_path, "a"))
    previous = repo.manifest()
    publish(repo, "/b", small_tree(tmp_path, "b"))
    current = repo.manifest()
    history = open_reader(repo).history()
    assert history is not None
    tags = {t.name: t for t in history.tags()}
    history.close()
    assert set(tags) == {TRUNK, TRUNK_PREVIOUS}
    assert (tags[TRUNK].root_hash, tags[TRUNK].revision) == (current.root_catalog, 2)
    assert (tags[TRUNK_PREVIOUS].root_hash, tags[TRUNK_PREVIOUS].revision) == (previous.root_catalog, 1)
    assert tags[TRUNK].size == current.root_catalog_size


def test_reflog_lists_every_root_catalog_ever_published(repo: Repository, tmp_path: Path) -> None:
    roots = {repo.manifest().root_catalog}
    for i in range(3):
        publish(repo, f"/cid{i}", small_tree(tmp_path, f"t{i}"))
        roots.add(repo.manifest().root_catalog)
    publish(repo, "/cid0", small_tree(tmp_path, "replacement"))
    roots.add(repo.manifest().root_catalog)
    reflog_file = tmp_path / "reflog.db"  # a copy: the published one may be in a bucket
    reflog_file.write_bytes(repo.store.get(".cvmfsreflog"))
    assert ContentHash.of(reflog_file.read_bytes()) == repo.manifest().reflog
    reflog = Reflog(reflog_file)
    try:
        assert {h for h, _t, _ts in reflog.list(RefType.CATALOG)} == roots
        assert reflog.contains(repo.manifest().certificate)  # type: ignore[arg-type]
        assert reflog.contains(repo.manifest().history)  # type: ignore[arg-type]
    finally:
        reflog.close()
    assert len(roots) == 5


def test_nested_catalog_previous_revision_chain_follows_its_parents_listing(
    repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    with repo.transaction() as txn:
        txn.mkdir("/sw", nested=True)
        txn.add_directory("/sw/a", small_tree(tmp_path, "a"))
        txn.commit()
    listed = []
    for name in ("b", "c"):
        reader = open_reader(repo)
        ref = reader.root_catalog.nested_ref("/sw")
        assert ref is not None
        listed.append(ref.hash)
        publish(repo, f"/sw/{name}", small_tree(tmp_path, name))
    reader = open_reader(repo)
    ref = reader.root_catalog.nested_ref("/sw")
    assert ref is not None
    sw = reader.catalog(ref.hash)
    assert sw.revision == 3
    assert sw.previous_revision == listed[1]
    assert reader.catalog(listed[1]).previous_revision == listed[0]
    assert reader.catalog(listed[1]).revision == 2
    assert reader.catalog(listed[0]).previous_revision is None
    # A nested catalog that did not change keeps its hash (no previous_revision churn).
    a_hash = sw.nested_ref("/sw/a").hash  # type: ignore[union-attr]
    assert reader.catalog(listed[0]).nested_ref("/sw/a").hash == a_hash  # type: ignore[union-attr]


def test_removing_a_cid_leaves_the_others_readable_and_the_checker_clean(
    repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    srcs = {
        f"cid{i}": small_tree(tmp_path, f"c{i}", {"f.txt": f"{i}".encode() * 100, "d": {"g": b"g"}})
        for i in range(3)
    }
    with repo.transaction() as txn:
        for name, src in srcs.items():
            txn.add_directory(f"/grp/{name}", src)
        txn.commit()
    assert remove(repo, "/grp/cid1") == 2
    reader = open_reader(repo)
    assert reader.lookup("/grp/cid1") is None
    assert [d.name for d in reader.listdir("/grp")] == ["cid0", "cid2"]
    for name in ("cid0", "cid2"):
        assert reader.read(f"/grp/{name}/f.txt") == (srcs[name] / "f.txt").read_bytes()
    assert {m for m, _h, _c in reader.iter_catalogs()} == {"", "/grp/cid0", "/grp/cid2"}
    assert reader.stat("/grp").linkcount == 4
    check(reader)


def test_removing_a_plain_directory_holding_nested_catalogs(
    repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    with repo.transaction() as txn:
        txn.add_directory("/top/x/cid", small_tree(tmp_path, "x"))
        txn.add_directory("/keep", small_tree(tmp_path, "k"))
        txn.commit()
    remove(repo, "/top")
    reader = open_reader(repo)
    assert reader.lookup("/top") is None
    assert {m for m, _h, _c in reader.iter_catalogs()} == {"", "/keep"}
    assert reader.root_catalog.counters().subtree["regular"] == 2  # type: ignore[union-attr]
    check(reader)


def test_adding_at_an_existing_path_replaces_what_was_there(
    repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    publish(repo, "/cid", tree_dir(tmp_path, {"old.txt": b"old", "olddir": {"x": b"x"}}, "v1"))
    publish(repo, "/cid", tree_dir(tmp_path, {"new.txt": b"new"}, "v2"))
    reader = open_reader(repo)
    assert reader.manifest.revision == 2
    assert [d.name for d in reader.listdir("/cid")] == [".cvmfscatalog", "new.txt"]
    assert reader.lookup("/cid/old.txt") is None and reader.lookup("/cid/olddir/x") is None
    assert reader.read("/cid/new.txt") == b"new"
    assert reader.stat("").linkcount == 3  # one subdirectory, not two
    check(reader)


def test_a_file_can_be_replaced_by_a_tree(
    repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    publish(repo, "/cid", tree_dir(tmp_path, {"thing": b"a file"}, "v1"))
    publish(repo, "/cid/thing", tree_dir(tmp_path, {"inner.txt": b"now a directory"}, "v2"), nested=False)
    reader = open_reader(repo)
    assert reader.stat("/cid/thing").is_dir
    assert reader.read("/cid/thing/inner.txt") == b"now a directory"
    assert reader.stat("/cid").linkcount == 3
    check(reader)


def test_a_tree_added_without_nesting_goes_into_the_parent_catalog(
    repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    src = tree_dir(
        tmp_path, {"f.txt": b"plain", "d": {"g.txt": b"g"}, "sub": {".cvmfscatalog": b"", "h": b"h"}}
    )
    publish(repo, "/plain", src, nested=False)
    reader = open_reader(repo)
    assert reader.catalog_for("/plain/d/g.txt")[0] == ""
    assert reader.catalog_for("/plain/sub/h")[0] == "/plain/sub"  # its own marker still nests it
    assert reader.lookup("/plain/.cvmfscatalog") is None
    assert reader.read("/plain/d/g.txt") == b"g"
    assert reader.stat("/plain").mtime == int(src.stat().st_mtime)
    check(reader)


def test_a_marker_at_the_top_of_a_tree_nests_it_even_without_the_nested_option(
    repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    publish(repo, "/marked", tree_dir(tmp_path, {".cvmfscatalog": b"", "f": b"f"}), nested=False)
    reader = open_reader(repo)
    assert reader.catalog_for("/marked/f")[0] == "/marked"
    check(reader)


def test_the_marker_of_a_nested_catalog_cannot_be_removed_alone(
    repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    publish(repo, "/cid", small_tree(tmp_path, "c"))
    with repo.transaction() as txn, pytest.raises(TransactionError, match="marks the nested catalog"):
        txn.remove("/cid/.cvmfscatalog")
    assert remove(repo, "/cid") == 2  # removing the whole nested tree is fine
    check(open_reader(repo))


def test_removing_one_name_of_a_hard_link_pair_decrements_the_partner(
    repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    spec = {"orig.txt": b"linked", "link.txt": Hardlink("orig.txt"), "third.txt": Hardlink("orig.txt")}
    publish(repo, "/cid", tree_dir(tmp_path, spec))
    assert open_reader(repo).stat("/cid/orig.txt").linkcount == 3
    remove(repo, "/cid/third.txt")
    reader = open_reader(repo)
    assert [reader.stat(p).linkcount for p in ("/cid/orig.txt", "/cid/link.txt")] == [2, 2]
    check(reader)
    remove(repo, "/cid/link.txt")
    reader = open_reader(repo)
    assert reader.stat("/cid/orig.txt").linkcount == 1
    assert reader.read("/cid/orig.txt") == b"linked"
    check(reader)


def test_removing_a_missing_path_reports_false_and_the_root_cannot_be_removed(repo: Repository) -> None:
    with repo.transaction() as txn:
        assert txn.remove("/does/not/exist") is False
        with pytest.raises(TransactionError):
            txn.remove("/")


def test_only_catalogs_on_the_changed_path_are_rewritten(
    repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    with repo.transaction() as txn:
        txn.mkdir("/sw", nested=True)
        txn.mkdir("/sw/grp", nested=True)
        for i in range(50):
            txn.add_directory(f"/sw/grp/cid{i}", small_tree(tmp_path, f"c{i}"))
        assert txn.commit().catalogs_written == 53
    before = open_reader(repo)
    grp_before = before.catalog_for("/sw/grp/x")[1]
    old = {ref.path: ref.hash for ref in grp_before.nested()}
    assert len(old) == 50
    with repo.transaction() as txn:
        txn.add_directory("/sw/grp/cid50", small_tree(tmp_path, "c50"))
        result = txn.commit()
    assert result.catalogs_written == 4  # root, /sw, /sw/grp and the new CID
    after = open_reader(repo)
    mount, grp_after = after.catalog_for("/sw/grp/x")
    assert mount == "/sw/grp"
    new = {ref.path: ref.hash for ref in grp_after.nested()}
    assert set(new) == set(old) | {"/sw/grp/cid50"}
    assert {p: h for p, h in new.items() if p in old} == old
    assert after.read("/sw/grp/cid50/c50.txt") == b"content of c50\n"
    check(after)


def test_root_subtree_counters_are_the_sum_over_all_nested_catalogs(
    repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    with repo.transaction() as txn:
        txn.mkdir("/sw", nested=True)
        for i in range(4):
            files = {"a": b"a" * i, "b": b"b", "l": Symlink("a"), "big": BIG[: 300 * 1024], "d": {"c": b"c"}}
            txn.add_directory(f"/sw/cid{i}", tree_dir(tmp_path, files, f"c{i}"))
        txn.add_directory("/plain", tree_dir(tmp_path, {"p": b"p"}, "plain"), nested=False)
        txn.commit()
    remove(repo, "/sw/cid1")
    publish(repo, "/sw/cid2", tree_dir(tmp_path, {"only": b"one file"}, "c2b"))
    remove(repo, "/plain/p")
    reader = open_reader(repo)
    check(reader)  # recounts every catalog bottom-up
    total = dict.fromkeys(COUNTER_KINDS, 0)
    for mount, _h, cat in reader.iter_catalogs():
        if mount:
            total = add_counts(total, cat.compute_self_counters())
    root = reader.root_catalog.counters()
    assert root is not None
    assert root.subtree == total
    # /sw/cid0 and /sw/cid3: a, b, big, d/c, marker; /sw/cid2: only, marker; /sw: marker.
    assert root.subtree["regular"] == 2 * 5 + 2 + 1
    assert root.subtree["chunked"] == 2
    assert root.subtree["symlink"] == 2
    assert root.subtree["nested"] == 3
    assert root.self_["regular"] == 0


def test_transaction_left_without_commit_publishes_nothing(
    repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    publish(repo, "/first", small_tree(tmp_path, "first"))
    manifest_bytes = repo.store.get(".cvmfspublished")
    with repo.transaction() as txn:
        txn.add_directory("/second", small_tree(tmp_path, "second"))
        txn.remove("/first")
    with pytest.raises(RuntimeError, match="boom"), repo.transaction() as txn:
        txn.add_directory("/third", small_tree(tmp_path, "third"))
        raise RuntimeError("boom")
    assert repo.store.get(".cvmfspublished") == manifest_bytes
    reader = open_reader(repo)
    assert reader.manifest.revision == 1
    assert reader.lookup("/second") is None and reader.lookup("/third") is None
    assert reader.read("/first/first.txt") == b"content of first\n"
    # The lock was released: the next transaction starts and publishes.
    assert publish(repo, "/second", small_tree(tmp_path, "second")) == 2


def test_a_closed_transaction_refuses_further_changes(repo: Repository, tmp_path: Path) -> None:
    with repo.transaction() as txn:
        txn.mkdir("/x")
        txn.commit()
        with pytest.raises(TransactionError, match="closed"):
            txn.mkdir("/y")


def _data_objects(repo: Repository) -> set[str]:
    return {k for k in repo.store.iter_keys() if k[-1] not in "CHX"}


def test_republishing_unchanged_content_writes_no_new_objects(repo: Repository, tmp_path: Path) -> None:
    src = tree_dir(tmp_path, {"big.bin": BIG, "small.txt": b"small", "d": {"e.txt": b"e"}})
    with repo.transaction() as txn:
        txn.add_directory("/cid", src)
        first = txn.commit()
    assert first.stats.objects_written > 0
    objects = _data_objects(repo)
    with repo.transaction() as txn:
        txn.add_directory("/cid", src)
        again = txn.commit()
    assert again.revision == first.revision + 1
    assert again.stats.objects_written == 0
    assert again.stats.bytes_written == 0
    assert again.stats.pieces_from_index > 0
    assert _data_objects(repo) == objects


def test_identical_content_under_two_paths_is_stored_once(
    repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    with repo.transaction() as txn:
        txn.add_directory("/a", tree_dir(tmp_path, {"big.bin": BIG, "x": b"same"}, "a"))
        txn.add_directory("/b", tree_dir(tmp_path, {"copy.bin": BIG, "y": b"same"}, "b"))
        result = txn.commit()
    reader = open_reader(repo)
    a, b = reader.stat("/a/big.bin"), reader.stat("/b/copy.bin")
    assert a.chunks == b.chunks
    assert reader.stat("/a/x").hash == reader.stat("/b/y").hash
    assert result.stats.files == 4
    assert result.stats.objects_written == len({c.hash for c in a.chunks}) + 1


def test_mkdir_nested_gives_a_directory_its_own_catalog_with_a_marker(
    repo: Repository, open_reader: Callable[..., RepositoryReader]
) -> None:
    with repo.transaction() as txn:
        txn.mkdir("/sw/grp", nested=True)
        txn.commit()
    reader = open_reader(repo)
    assert reader.catalog_for("/sw/grp")[0] == "/sw/grp"
    assert reader.catalog_for("/sw")[0] == ""  # the parent created on the way is a plain directory
    assert [d.name for d in reader.listdir("/sw/grp")] == [".cvmfscatalog"]
    check(reader)


def test_mkdir_nested_refuses_a_non_empty_directory(repo: Repository, tmp_path: Path) -> None:
    publish(repo, "/plain", small_tree(tmp_path, "p"), nested=False)
    with repo.transaction() as txn, pytest.raises(TransactionError, match="not empty"):
        txn.mkdir("/plain", nested=True)


def test_an_existing_empty_directory_can_become_a_nested_catalog(
    repo: Repository, open_reader: Callable[..., RepositoryReader]
) -> None:
    with repo.transaction() as txn:
        txn.mkdir("/later")
        txn.commit()
    with repo.transaction() as txn:
        txn.mkdir("/later", nested=True)
        txn.commit()
    reader = open_reader(repo)
    assert reader.catalog_for("/later")[0] == "/later"
    check(reader)


# --- trees from streams: special files, xattrs, owners ---------------------------------------------


def _stream_entries() -> list[TreeEntry]:
    notes = b"notes from a stream\n"
    inner = b"in an implied directory\n"
    return [
        TreeEntry("", EntryKind.DIRECTORY, mode=0o750, mtime=1_650_000_000, uid=1234, gid=5678),
        TreeEntry(
            "notes.txt",
            EntryKind.FILE,
            mode=0o640,
            mtime=1_650_000_001,
            uid=1234,
            gid=5678,
            size=len(notes),
            stream=io.BytesIO(notes),
            xattrs={b"user.origin": b"stream", b"user.a": b"1"},
        ),
        TreeEntry("alias.txt", EntryKind.HARDLINK, target="notes.txt"),
        TreeEntry("big.bin", EntryKind.FILE, size=len(BIG), stream=io.BytesIO(BIG)),
        TreeEntry("fifo", EntryKind.SPECIAL, mode=stat.S_IFIFO | 0o644),
        TreeEntry("null", EntryKind.SPECIAL, mode=stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3)),
        TreeEntry("implied/dir/inner.txt", EntryKind.FILE, size=len(inner), stream=io.BytesIO(inner)),
        TreeEntry("link", EntryKind.SYMLINK, target="notes.txt"),
    ]


def test_add_tree_from_streams_keeps_owners_xattrs_and_special_files(
    repo: Repository, open_reader: Callable[..., RepositoryReader]
) -> None:
    with repo.transaction() as txn:
        txn.add_tree("/streamed", _stream_entries())
        txn.commit()
    reader = open_reader(repo)
    top = reader.stat("/streamed")
    assert (stat.S_IMODE(top.mode), top.mtime, top.uid, top.gid) == (0o750, 1_650_000_000, 1234, 5678)
    notes = reader.stat("/streamed/notes.txt")
    assert (stat.S_IMODE(notes.mode), notes.uid, notes.gid) == (0o640, 1234, 5678)
    assert notes.xattr == xattr_blob({b"user.a": b"1", b"user.origin": b"stream"})
    assert reader.read("/streamed/alias.txt") == b"notes from a stream\n"
    assert notes.linkcount == 2 == reader.stat("/streamed/alias.txt").linkcount
    assert reader.read("/streamed/big.bin") == BIG
    fifo, null = reader.stat("/streamed/fifo"), reader.stat("/streamed/null")
    assert stat.S_ISFIFO(fifo.mode) and fifo.size == 0 and fifo.hash is None
    assert stat.S_ISCHR(null.mode) and null.rdev == os.makedev(1, 3)
    implied = reader.stat("/streamed/implied/dir")
    assert implied.is_dir and stat.S_IMODE(implied.mode) == 0o755
    assert reader.read("/streamed/implied/dir/inner.txt") == b"in an implied directory\n"
    counters = reader.catalog_for("/streamed/x")[1].counters()
    assert counters is not None
    assert counters.self_["xattr"] == 2  # both names of the hard link carry the attributes
    assert counters.self_["special"] == 2
    check(reader)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([TreeEntry("x", EntryKind.HARDLINK, target="missing")], "hard link"),
        ([TreeEntry("d", EntryKind.DIRECTORY), TreeEntry("d", EntryKind.SYMLINK, target="x")], "duplicate"),
        ([TreeEntry("../escape", EntryKind.DIRECTORY)], "not allowed"),
        ([TreeEntry("f", EntryKind.FILE)], "without content"),
        ([TreeEntry("s", EntryKind.SPECIAL, mode=0o644)], "special"),
        ([TreeEntry("", EntryKind.SYMLINK, target="x")], "must be a directory"),
    ],
)
def test_malformed_trees_are_refused_and_nothing_is_published(
    repo: Repository, entries: list[TreeEntry], message: str
) -> None:
    with repo.transaction() as txn, pytest.raises(TreeError, match=message):
        txn.add_tree("/bad", entries)
    assert repo.manifest().revision == 0


def test_the_repository_root_cannot_be_replaced_by_a_tree(repo: Repository) -> None:
    with repo.transaction() as txn, pytest.raises(TransactionError):
        txn.add_tree("/", [TreeEntry("", EntryKind.DIRECTORY)])


# --- repository-level behaviour ---------------------------------------------------------------------


def test_a_named_tag_stays_in_the_history_across_later_publishes(
    repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    with repo.transaction() as txn:
        txn.add_directory("/v1", small_tree(tmp_path, "v1"))
        tagged = txn.commit(tag="release-1", description="first release")
    publish(repo, "/v2", small_tree(tmp_path, "v2"))
    reader = open_reader(repo)
    history = reader.history()
    assert history is not None
    tag = history.get("release-1")
    trunk = history.get(TRUNK)
    history.close()
    assert tag is not None and trunk is not None
    assert (tag.root_hash, tag.revision, tag.description) == (tagged.root_hash, 1, "first release")
    assert (trunk.root_hash, trunk.revision) == (reader.manifest.root_catalog, 2)
    check(reader)


def test_an_open_reader_sees_a_new_revision_after_reloading_the_manifest(
    repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    publish(repo, "/a", small_tree(tmp_path, "a"))
    reader = open_reader(repo)
    assert reader.load_manifest() is False  # nothing new
    publish(repo, "/b", small_tree(tmp_path, "b"))
    assert reader.lookup("/b") is None  # still on revision 1
    assert reader.load_manifest(fresh=True) is True
    assert reader.revision == 2
    assert reader.read("/b/b.txt") == b"content of b\n"


@pytest.mark.parametrize(
    "size",
    [
        SMALL_CHUNKS.min_size - 1,
        SMALL_CHUNKS.min_size,
        SMALL_CHUNKS.min_size + 1,
        SMALL_CHUNKS.max_size,
        SMALL_CHUNKS.max_size + 1,
        2 * SMALL_CHUNKS.max_size,
    ],
)
def test_files_around_the_chunk_size_limits_read_back_and_follow_the_chunking_rules(
    size: int, repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    data = random.Random(size).randbytes(size)
    publish(repo, "/cid", tree_dir(tmp_path, {"f.bin": data}))
    reader = open_reader(repo)
    d = reader.stat("/cid/f.bin")
    assert reader.read("/cid/f.bin") == data
    if size <= SMALL_CHUNKS.min_size:
        assert not d.is_chunked  # only files larger than the minimum chunk size are chunked
    if size > SMALL_CHUNKS.max_size:
        assert d.is_chunked
    if d.is_chunked:
        assert d.hash is None and len(d.chunks) >= 2  # a sole piece is stored as a whole file
        assert sum(c.size for c in d.chunks) == size
        assert all(c.size <= SMALL_CHUNKS.max_size for c in d.chunks)
    else:
        assert d.hash is not None and d.chunks == []
    check(reader)


def test_a_big_file_is_cut_alike_from_a_directory_and_from_a_tar_stream(
    repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    # a directory's big files are cut where they lie (file_cuts), a tar's as they stream by (iter_chunks)
    data = random.Random(11).randbytes(6 * SMALL_CHUNKS.max_size + 4321)
    publish(repo, "/from-dir", tree_dir(tmp_path, {"f.bin": data}))
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("f.bin")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    tar.seek(0)
    with repo.transaction() as txn:
        txn.add_tree("/from-tar", tar_entries(tar))
        txn.commit()
    reader = open_reader(repo)
    from_dir, from_tar = reader.stat("/from-dir/f.bin"), reader.stat("/from-tar/f.bin")
    assert len(from_dir.chunks) > 3
    assert from_dir.chunks == from_tar.chunks
    assert reader.read("/from-dir/f.bin") == data


def test_objects_of_a_large_ingest_start_going_to_disk_before_the_commit(
    tmp_path: Path, repo_template: Path
) -> None:
    repo = new_repo(tmp_path / "storage", repo_template)  # a local store: its early sync
    store = repo.store
    assert isinstance(store, LocalStore)
    store.early_sync_bytes = 64 << 10  # instead of 64 MiB
    files = {f"f{i}.bin": random.Random(i).randbytes(16 << 10) for i in range(12)}  # incompressible
    with repo.transaction() as txn:
        txn.add_directory("/cid", tree_dir(tmp_path, files))
        started = store._early_sync
        assert started is not None and started.name == "rcds-early-sync"  # before the commit
        txn.commit()
    started.join(10)
    assert not started.is_alive()
    check(RepositoryReader.open(repo.storage, repo.public_key_path, fqrn=repo.fqrn, cache_dir=tmp_path / "c"))


def test_resign_replaces_the_whitelist_and_the_warning_follows_its_expiry(repo: Repository) -> None:
    now = dt.datetime.now(dt.UTC)
    assert repo.whitelist_warning(now) is None  # 30 days by default
    wl = repo.resign(days=3)
    assert repo.whitelist().expires == wl.expires
    assert abs(wl.expires - now - dt.timedelta(days=3)) < dt.timedelta(minutes=1)
    warning = repo.whitelist_warning(now)
    assert warning is not None and "expires" in warning and "resign" in warning
    expired = repo.whitelist_warning(now + dt.timedelta(days=4))
    assert expired is not None and "EXPIRED" in expired
    repo.resign()
    assert repo.whitelist_warning(now) is None


def test_a_second_writer_cannot_take_the_lock_while_a_transaction_is_open(repo: Repository) -> None:
    other = Repository(repo.storage)
    with repo.transaction(), pytest.raises(RepositoryError, match="locked"), other.lock(blocking=False):
        pass
    with other.lock(blocking=False):
        pass


def test_file_names_that_are_not_utf8_are_published_as_raw_bytes(
    repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"latin-1 name")
    publish(repo, "/cid", src)
    reader = open_reader(repo)
    assert reader.read(os.fsdecode(b"/cid/caf\xe9.txt")) == b"latin-1 name"
    check(reader)


def test_hundreds_of_small_files_read_back_and_each_content_is_stored_once(
    repo: Repository, tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    # More files than one background batch holds (BATCH_FILES), with duplicates inside and across
    # batches, files from disk and from streams, and an empty file.
    contents = [f"content {i % 50}\n".encode() * (i % 5 + 1) for i in range(300)]  # 50 distinct
    spec: dict[str, object] = {f"d{i // 100}": {} for i in range(300)}
    for i, data in enumerate(contents):
        directory = spec[f"d{i // 100}"]
        assert isinstance(directory, dict)
        directory[f"f{i}.txt"] = data
    spec["empty"] = b""
    src = tree_dir(tmp_path, spec)
    streamed = [
        TreeEntry(f"s{i}", EntryKind.FILE, size=len(data), stream=io.BytesIO(data))
        for i, data in enumerate(contents[:100])
    ]
    before = _data_objects(repo)
    with repo.transaction() as txn:
        txn.add_directory("/disk", src)
        txn.add_tree("/streams", [TreeEntry("", EntryKind.DIRECTORY), *streamed])
        result = txn.commit()
    assert result.stats.files == 300 + 1 + 100
    # One object per distinct content, plus the empty one (the file, the markers). The count of writes
    # may be higher: two threads storing the same new content at once both write it (harmless renames).
    assert len(_data_objects(repo) - before) == len(set(contents)) + 1 == 51
    assert result.stats.objects_written >= 50
    reader = open_reader(repo)
    for i, data in enumerate(contents):
        assert reader.read(f"/disk/d{i // 100}/f{i}.txt") == data
    for i, data in enumerate(contents[:100]):
        assert reader.read(f"/streams/s{i}") == data
    assert reader.read("/disk/empty") == b""
    with repo.transaction() as txn:
        txn.add_directory("/again", src)
        again = txn.commit()
    assert again.stats.objects_written == 0
    assert again.stats.pieces_from_index == 301


def test_a_file_that_cannot_be_read_fails_the_add_and_leaves_the_old_tree(
    repo: Repository, tmp_path: Path
) -> None:
    publish(repo, "/cid", tree_dir(tmp_path, {"old.txt": b"old"}))
    entries = [
        TreeEntry("", EntryKind.DIRECTORY),
        TreeEntry("fine.txt", EntryKind.FILE, size=4, stream=io.BytesIO(b"fine")),
        TreeEntry("gone.txt", EntryKind.FILE, size=5, source=tmp_path / "vanished.txt"),
    ]
    with repo.transaction() as txn:
        with pytest.raises(FileNotFoundError, match=r"vanished\.txt"):
            txn.add_tree("/cid", entries)
        assert txn.exists("/cid/old.txt")
        assert not txn.exists("/cid/fine.txt")
