"""Nested catalog abuse: limits at ingest, and deep chains that the reader and checker walk in linear time.

A ``.cvmfscatalog`` in a user's directory makes it a nested catalog. A 21 KB tarball of 1,100 nested
levels, or a 14 KB one of 3,000 sibling catalogs, used to publish (tens of MB, a minute of worker time),
after which ``rcds repo check`` died of RecursionError and ``rcds get`` of the CID ran for many minutes.
Ingest now refuses them (``[limits] max_nested_catalogs``, ``max_catalog_depth``); repositories made
before that, or by other tools, can still hold such chains, so the reader and checker must cope.
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rcds.client.materialize import materialize
from rcds.cvmfs.catalog import NESTED_MARKER
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import Repository
from rcds.cvmfs.tree import EntryKind, TreeEntry
from rcds.ingest.tarstream import IngestError, IngestLimits, tar_entries
from rcds.publish.config import settings_from_dict
from server import RcdsServer
from tarballs import directory, file, symlink, tar

CHAIN = 1100  # nested catalog levels of the abusive tarball in the issue
SIBLINGS = 3000  # nested catalogs side by side in the other one


def chain_tarball(levels: int) -> bytes:
    """``a/.cvmfscatalog``, ``a/a/.cvmfscatalog``, ... ``levels`` deep, with a file at the bottom."""
    members = []
    path = ""
    for _ in range(levels):
        path = f"{path}/a" if path else "a"
        members.append(file(f"{path}/{NESTED_MARKER}"))  # the directories are implied
    members.append(file(f"{path}/deep.txt", b"bottom\n"))
    return gzip.compress(tar(*members), 9)


def siblings_tarball(count: int) -> bytes:
    return gzip.compress(tar(*(file(f"d{i}/{NESTED_MARKER}") for i in range(count))), 9)


def drain(archive: bytes, **kwargs: object) -> list[str]:
    paths = []
    for e in tar_entries(io.BytesIO(archive), **kwargs):  # type: ignore[arg-type]
        while e.stream is not None and e.stream.read(1 << 20):
            pass
        paths.append(e.path)
    return paths


def refusal(archive: bytes, **kwargs: object) -> str:
    with pytest.raises(IngestError) as info:
        drain(archive, **kwargs)
    return info.value.reason


# --- limits at ingest ------------------------------------------------------------------------------


def test_the_1100_level_chain_of_the_issue_is_refused_by_the_default_depth_limit() -> None:
    archive = chain_tarball(CHAIN)
    assert len(archive) < 32_000  # the cheap attack the issue describes
    reason = refusal(archive)
    assert reason.startswith("nested catalogs too deep: 33 levels, more than 32 (at member 'a/a/a/")
    assert reason.endswith("/.cvmfscatalog'; [limits] max_catalog_depth)")


def test_the_3000_sibling_catalogs_of_the_issue_are_refused_by_the_default_count_limit() -> None:
    archive = siblings_tarball(SIBLINGS)
    assert len(archive) < 32_000
    assert refusal(archive) == (
        "too many nested catalogs: more than 500 directories with a .cvmfscatalog "
        "(at member 'd500/.cvmfscatalog'; [limits] max_nested_catalogs)"
    )


def test_the_defaults_leave_room_for_real_trees() -> None:
    # A software stack with a catalog per package and per version: 20 x 20 + 20 = 420 catalogs, depth 2.
    members = []
    for p in range(20):
        members.append(file(f"pkg{p}/{NESTED_MARKER}"))
        members += [file(f"pkg{p}/v{v}/{NESTED_MARKER}") for v in range(20)]
    assert len(drain(tar(*members))) == 1 + 420  # the root and the markers (directories are implied)
    # ... and a chain exactly as deep as allowed.
    assert drain(chain_tarball(32))[-1].endswith("/deep.txt")


def test_depth_counts_markers_that_come_after_the_deeper_ones() -> None:
    # Members in any order: the shallower markers arrive last and push the deep one down.
    members = [file(f"a/b/c/d/{NESTED_MARKER}"), file(f"a/b/c/{NESTED_MARKER}"), file(f"a/b/{NESTED_MARKER}")]
    archive = tar(*members, file(f"a/{NESTED_MARKER}"))
    assert drain(archive, limits=IngestLimits(max_catalog_depth=4))
    assert refusal(archive, limits=IngestLimits(max_catalog_depth=3)) == (
        "nested catalogs too deep: 4 levels, more than 3 (at member 'a/.cvmfscatalog'; [limits] max_catalog_depth)"
    )
    # Siblings do not deepen each other.
    flat = tar(*(file(f"x{i}/{NESTED_MARKER}") for i in range(5)), file(f"x0/y/{NESTED_MARKER}"))
    assert drain(flat, limits=IngestLimits(max_catalog_depth=2))


def test_every_kind_of_marker_counts_but_the_one_at_the_top() -> None:
    """The writer nests a directory on the name alone: a symlink, a directory or an implied directory
    called .cvmfscatalog makes a catalog just as a file does. One at the top is the tree's own catalog."""
    archive = tar(
        file(NESTED_MARKER),
        symlink(f"a/{NESTED_MARKER}", "x"),
        directory(f"b/{NESTED_MARKER}"),
        file(f"c/{NESTED_MARKER}/inside"),
    )
    assert drain(archive, limits=IngestLimits(max_nested_catalogs=3))
    assert refusal(archive, limits=IngestLimits(max_nested_catalogs=2)) == (
        "too many nested catalogs: more than 2 directories with a .cvmfscatalog "
        "(at member 'c/.cvmfscatalog/inside'; [limits] max_nested_catalogs)"
    )
    # With --strip-components the top moves down too.
    stripped = tar(file(f"top/{NESTED_MARKER}"), file(f"top/a/{NESTED_MARKER}"))
    assert drain(stripped, striplevels=1, limits=IngestLimits(max_nested_catalogs=1))


def test_the_limits_are_configurable_in_the_limits_table() -> None:
    base = {"repository": [{"name": "r.example"}]}
    s = settings_from_dict({**base, "limits": {"max_nested_catalogs": 7, "max_catalog_depth": 3}})
    assert (s.limits.max_nested_catalogs, s.limits.max_catalog_depth) == (7, 3)
    d = settings_from_dict(base)
    assert (d.limits.max_nested_catalogs, d.limits.max_catalog_depth) == (500, 32)


def test_a_server_rejects_both_tarballs_with_the_reason_and_publishes_nothing(tmp_path: Path) -> None:
    srv = RcdsServer(tmp_path, repos=("solo.rcds.test",)).start()
    try:
        assert srv.publish("abuse/chain", chain_tarball(CHAIN)).text == "OK\n"
        assert srv.publish("abuse/siblings", siblings_tarball(SIBLINGS)).text == "OK\n"
        chain = srv.wait_state("abuse/chain", ("failed",))
        siblings = srv.wait_state("abuse/siblings", ("failed",))
        assert chain["reason"].startswith("rejected: nested catalogs too deep: 33 levels, more than 32")
        assert chain["reason"].endswith("[limits] max_catalog_depth)")
        assert siblings["reason"].startswith("rejected: too many nested catalogs: more than 500")
        assert siblings["reason"].endswith("[limits] max_nested_catalogs)")
        assert srv.api("exists", cid="abuse/chain").text == "MISSING\n"
        storage = srv.storage("solo.rcds.test")
        assert Repository(storage).manifest().revision == 0  # nothing was published
        spool = tmp_path / "data" / "queue" / "spool"
        deadline = time.monotonic() + 10  # the spool file goes right after the job is marked failed
        while list(spool.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list(spool.iterdir()) == []
    finally:
        srv.close()


# --- deep chains made without the limit: checked and read in linear time ----------------------------


@pytest.fixture(scope="module")
def deep_repo(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    """A repository whose CID /sw/deep holds a chain of 1,100 nested catalogs, written with the writer API
    (which has no such limit, like other tools and rcds before it)."""
    repo = Repository.create("deep.rcds.test", tmp_path_factory.mktemp("deep") / "storage")

    def entries() -> Iterator[TreeEntry]:
        yield TreeEntry("", EntryKind.DIRECTORY, mode=0o755, mtime=1)
        path = ""
        for _ in range(CHAIN):
            path = f"{path}/a" if path else "a"
            yield TreeEntry(path, EntryKind.DIRECTORY, mode=0o755, mtime=1)
            yield TreeEntry(f"{path}/{NESTED_MARKER}", EntryKind.FILE, mode=0o644, mtime=1, size=0,
                            stream=io.BytesIO(b""))  # fmt: skip
        yield TreeEntry(f"{path}/deep.txt", EntryKind.FILE, mode=0o644, mtime=1, size=7,
                        stream=io.BytesIO(b"bottom\n"))  # fmt: skip

    with repo.transaction() as txn:
        txn.add_tree("/sw/deep", entries())
        txn.commit()
    return repo


def deep_dirs() -> list[str]:
    return ["/sw/deep" + "/a" * i for i in range(1, CHAIN + 1)]


def test_repo_check_of_a_1100_deep_chain_finishes_without_recursion_error(deep_repo: Repository) -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "rcds.cli", "repo", "check", str(deep_repo.storage)],
        capture_output=True, timeout=300, check=False,
    )  # fmt: skip
    seconds = time.monotonic() - started
    out = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, out
    assert "RecursionError" not in out
    assert f"OK: revision 1, {CHAIN + 2} catalogs" in out  # the root, /sw/deep and the chain
    assert seconds < 60, seconds  # about 2 s; the check itself is linear in the catalogs


def test_lookups_along_a_1100_deep_chain_take_linear_time(deep_repo: Repository, tmp_path: Path) -> None:
    with RepositoryReader.open(deep_repo.storage, deep_repo.public_key_path, cache_dir=tmp_path / "c") as r:
        started = time.monotonic()
        # Every level, top down, as a client resolving paths does; then the bottom again and again.
        for d in deep_dirs():
            dirent = r.lookup(d)
            assert dirent is not None and dirent.is_dir and dirent.is_nested_root, d
        for _ in range(200):
            assert r.read(deep_dirs()[-1] + "/deep.txt") == b"bottom\n"
        seconds = time.monotonic() - started
    # About 1 s. Searching each path's catalog from the root again probed every ancestor at every level:
    # 2.3 s for one lookup of the bottom, hours for these.
    assert seconds < 20, seconds


def test_get_of_a_cid_with_a_1100_deep_chain_takes_seconds(deep_repo: Repository, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with RepositoryReader.open(deep_repo.storage, deep_repo.public_key_path, cache_dir=tmp_path / "c") as r:
        started = time.monotonic()
        stats = materialize(r, "/sw/deep", dest, cache_dir=tmp_path / "node-cache", progress=False)
        seconds = time.monotonic() - started
    try:
        assert (stats.directories, stats.files) == (CHAIN + 1, CHAIN + 1)  # the user's markers are kept
        bottom = dest.joinpath(*["a"] * CHAIN)
        assert (bottom / "deep.txt").read_bytes() == b"bottom\n"
        assert (bottom / NESTED_MARKER).exists()
        # A few seconds. The walk used to find each directory's catalog from the root: cubic, about 25 s
        # for a 300-deep chain and some 20 minutes for this one.
        assert seconds < 30, seconds
    finally:
        remove_deep_tree(dest)


def remove_deep_tree(top: Path) -> None:
    """Remove a directory tree deeper than Python's recursion limit (shutil.rmtree of Python 3.11 and
    pytest's clean-up of old temporary directories recurse)."""
    if not top.exists():
        return
    stack, dirs = [str(top)], []
    while stack:
        d = stack.pop()
        dirs.append(d)
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                else:
                    os.unlink(e.path)
    for d in reversed(dirs):
        os.rmdir(d)
