"""``rcds shrinkwrap`` exports from real repositories: one written by rcds, and the CVMFS 2.12 reference.

The oracle is the source directory the repository was published from (and, for the reference
repository, the content tarball it was made from). Kills are real: the CLI runs in a subprocess that a
failpoint ends with ``os._exit`` (as kill -9) in the middle of placing files, or that gets SIGKILL.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import DEFAULT_MTIME, Dir, File, Hardlink, Symlink, Unpacked, new_repo, write_tree
from rcds.client.materialize import materialize
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import Repository
from rcds.shrinkwrap.api import build_rules, shrinkwrap
from rcds.shrinkwrap.dryrun import dry_run, format_dry_run
from rcds.shrinkwrap.export import DATA, MARKER, ExportStats, ShrinkwrapError, collect_garbage, export
from rcds.shrinkwrap.spec import Selector, parse_spec

CID = "/sw/alice/" + "ab" * 32
rng = random.Random(5)
BIG = rng.randbytes(700 * 1024)  # chunked (SMALL_CHUNKS)
NON_UTF8 = os.fsdecode(b"caf\xe9-latin1.txt")

TREE: dict[str, object] = {
    "README": File(b"hello\n", mtime=1_600_000_001),
    "same_as_readme": File(b"hello\n", mtime=1_600_000_001),  # identical content and metadata: one inode
    "readme_other_mode": File(b"hello\n", mode=0o600, mtime=1_600_000_001),
    "empty.txt": b"",
    "bin": {"run.sh": File(b"#!/bin/sh\necho hi\n", mode=0o755, mtime=1_600_000_002)},
    "links": {
        "relative": Symlink("../README", mtime=1_600_000_003),
        "variant": Symlink("/cvmfs/$(ARCH:-x86_64)/lib"),
    },
    "empty_dir": {},
    "read_only": Dir({"inside.txt": b"ro\n"}, mode=0o555),
    "data": {"orig.txt": b"two names\n", "alias.txt": Hardlink("data/orig.txt"), "big.bin": BIG},
    NON_UTF8: b"latin-1 name\n",
    "sub": {".cvmfscatalog": b"", "inside.txt": b"nested catalog\n", "deeper": {"x.txt": b"x"}},
}


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """relative path -> (type, mode, mtime ns, content or target); the export marker left out."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            if rel == MARKER:
                continue
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                data: object = p.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                data = os.readlink(p)
            else:
                data = None
            mtime = st.st_mtime_ns if not stat.S_ISDIR(st.st_mode) else None  # see test docstrings
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), mtime, data)
    return out


def expected(
    src: Path, prefix: str, keep: Callable[[str], bool] = lambda rel: True
) -> dict[str, tuple[object, ...]]:
    """The source tree as it must appear under ``prefix`` in the export (files keep mode & 0777)."""
    snap = {f"{prefix}/{k}": v for k, v in snapshot(src).items() if keep(k)}
    parts = prefix.split("/")
    for i in range(1, len(parts) + 1):
        snap["/".join(parts[:i])] = (stat.S_IFDIR, 0o755, None, None)
    return snap


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, repo_template: Path) -> tuple[Repository, Path]:
    base = tmp_path_factory.mktemp("shrinkwrap")
    repo = new_repo(base / "storage", repo_template)
    src = write_tree(base / "src", TREE)
    os.mkfifo(src / "fifo")  # special files are skipped, as the materializer does
    os.utime(src, (DEFAULT_MTIME, DEFAULT_MTIME))
    with repo.transaction() as txn:
        txn.mkdir("/sw", nested=True)
        txn.mkdir("/sw/alice", nested=True)
        txn.add_directory(CID, src)
        txn.mkdir("/other", nested=False)
        txn.commit()
    os.unlink(src / "fifo")
    return repo, src


@pytest.fixture
def reader(published: tuple[Repository, Path], tmp_path: Path) -> Iterator[RepositoryReader]:
    repo, _ = published
    r = RepositoryReader.open(repo.storage, repo.public_key_path, fqrn=repo.fqrn, cache_dir=tmp_path / "rc")
    yield r
    r.close()


def run_export(
    reader: RepositoryReader, dest: Path, spec: str, dialect: str = "2.14", **kw: object
) -> ExportStats:
    kw.setdefault("progress", False)
    return export(reader, Selector(parse_spec(spec), dialect), dest, **kw)  # type: ignore[arg-type]


def tree_of(dest: Path, fqrn: str) -> dict[str, tuple[object, ...]]:
    return snapshot(dest / fqrn)


def test_full_export_equals_the_source(
    published: tuple[Repository, Path], reader: RepositoryReader, tmp_path: Path
) -> None:
    repo, src = published
    dest = tmp_path / "out"
    stats = run_export(reader, dest, f"{CID}*")
    got = tree_of(dest, repo.fqrn)
    want = expected(src, CID.lstrip("/"))
    # the marker rcds adds at the top of a published tree is part of the repository, so it is exported
    want[f"{CID.lstrip('/')}/.cvmfscatalog"] = got[f"{CID.lstrip('/')}/.cvmfscatalog"]
    assert got == want
    root = dest / repo.fqrn / CID.lstrip("/")
    # directories get their mode and mtime (checked here: snapshot leaves directory mtimes out)
    assert stat.S_IMODE(os.lstat(root / "read_only").st_mode) == 0o555
    assert os.lstat(root / "bin").st_mtime_ns == DEFAULT_MTIME * 10**9
    # hard links into .data: same content and metadata share one inode, other metadata another
    ino = lambda p: os.lstat(root / p).st_ino  # noqa: E731
    assert ino("README") == ino("same_as_readme") != ino("readme_other_mode")
    assert ino("data/orig.txt") == ino("data/alias.txt")
    assert os.lstat(root / "README").st_nlink == 3  # .data + two visible names
    data_files = [p for p in (dest / DATA).glob("*/*") if p.parent.name != "tmp"]
    assert ino("README") in {os.lstat(p).st_ino for p in data_files}
    assert (dest / repo.fqrn / MARKER).is_file()
    assert not (dest / repo.fqrn / "other").exists()  # not selected
    assert stats.files == sum(1 for v in want.values() if v[0] == stat.S_IFREG)
    assert stats.skipped_special == 1
    assert stats.deduplicated_files >= 2
    prov = dest / ".provenance" / repo.fqrn
    assert f"revision={reader.revision}" in (prov / "src.info").read_text()
    assert (prov / "spec.txt").read_text() == f"# dialect 2.14\n{CID}*\n"
    assert not (prov / "incomplete").exists()


def test_second_run_with_an_unchanged_source_copies_nothing(reader: RepositoryReader, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    first = run_export(reader, dest, f"{CID}*")
    before = {p: os.lstat(p).st_ino for p in (dest / reader.fqrn).rglob("*") if p.is_file()}
    second = run_export(reader, dest, f"{CID}*")
    assert first.placed_files == first.files > 0
    assert second.placed_files == 0 and second.downloaded_bytes == 0 and second.fetched_files == 0
    assert second.unchanged_files == second.files == first.files
    assert second.removed_entries == 0
    assert before == {p: os.lstat(p).st_ino for p in (dest / reader.fqrn).rglob("*") if p.is_file()}


def test_narrower_spec_prunes_and_gc_frees_data(
    published: tuple[Repository, Path], reader: RepositoryReader, tmp_path: Path
) -> None:
    repo, src = published
    dest = tmp_path / "out"
    run_export(reader, dest, f"{CID}*")
    n_data = len(list((dest / DATA).glob("??/*")))
    stats = run_export(reader, dest, f"{CID}*\n!{CID}/data\n!{CID}/sub/deeper\n")
    got = tree_of(dest, repo.fqrn)
    want = expected(src, CID.lstrip("/"), lambda rel: not rel.startswith(("data", "sub/deeper")))
    want[f"{CID.lstrip('/')}/.cvmfscatalog"] = got[f"{CID.lstrip('/')}/.cvmfscatalog"]
    assert got == want
    assert stats.removed_entries == 2 and stats.placed_files == 0
    assert len(list((dest / DATA).glob("??/*"))) == n_data  # without --gc the data stays
    removed, freed = collect_garbage(dest)
    assert removed == 3 and freed == len(BIG) + len(b"two names\n") + 1  # orig/alias share one; x.txt
    assert tree_of(dest, repo.fqrn) == got  # gc never touches what is visible


def test_newer_revision_changes_only_what_differs(
    make_repo: Callable[..., Repository], open_reader: Callable[..., RepositoryReader], tmp_path: Path
) -> None:
    repo = make_repo()
    src = write_tree(
        tmp_path / "v1",
        {"keep.txt": b"same\n", "change.txt": b"old\n", "gone.txt": b"bye\n", "d": {"f": b"f"}},
    )
    # One publish time for both revisions: the nested catalog marker carries it as its mtime, and a
    # second boundary between the two commits would otherwise make it a changed file.
    with repo.transaction() as txn:
        txn.clock = lambda: float(DEFAULT_MTIME)
        txn.add_directory("/p", src)
        txn.commit()
    dest = tmp_path / "out"
    run_export(open_reader(repo), dest, "/p*")
    keep_ino = os.lstat(dest / repo.fqrn / "p/keep.txt").st_ino
    (src / "change.txt").write_bytes(b"new content\n")
    os.utime(src / "change.txt", (DEFAULT_MTIME, DEFAULT_MTIME))
    (src / "gone.txt").unlink()
    (src / "d" / "f").unlink()
    (src / "d").rmdir()
    (src / "d").write_bytes(b"now a file\n")  # a directory that became a file
    (src / "added.txt").write_bytes(b"added\n")
    for name in ("d", "added.txt"):
        os.utime(src / name, (DEFAULT_MTIME, DEFAULT_MTIME))
    with repo.transaction() as txn:
        txn.clock = lambda: float(DEFAULT_MTIME)
        txn.remove("/p")
        txn.add_directory("/p", src)
        txn.commit()
    stats = run_export(open_reader(repo), dest, "/p*")
    got = tree_of(dest, repo.fqrn)
    assert got.pop("p/.cvmfscatalog")[3] == b""  # the nested catalog marker add_directory publishes
    assert got == expected(src, "p")
    assert (
        stats.placed_files == 3 and stats.unchanged_files == 2 and stats.removed_entries == 2
    )  # keep.txt, marker
    assert os.lstat(dest / repo.fqrn / "p/keep.txt").st_ino == keep_ino


def test_the_node_cache_of_rcds_get_is_reused(reader: RepositoryReader, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    materialize(reader, CID, tmp_path / "got", cache_dir=cache, progress=False)
    stats = run_export(reader, tmp_path / "out", f"{CID}*", cache_dir=cache)
    assert stats.downloaded_bytes == 0 and stats.fetched_files == 0
    assert stats.cached_files > 0
    got = tmp_path / "out" / reader.fqrn / CID.lstrip("/") / "data/big.bin"
    assert got.read_bytes() == BIG
    # hard-linked from the cache, not copied: one inode for the cache entry, .data and the tree
    assert os.lstat(got).st_ino == os.lstat(tmp_path / "got/data/big.bin").st_ino


@pytest.mark.parametrize("dialect", ["2.12", "2.14"])
def test_rule_kinds_on_a_real_repository(
    published: tuple[Repository, Path], reader: RepositoryReader, tmp_path: Path, dialect: str
) -> None:
    repo, src = published
    c = CID.lstrip("/")
    spec = f"^{CID}/*\n{CID}/data*\n!{CID}/data/big.bin\n!{CID}/sub*\n{CID}/sub/deeper*\n{CID}/bin\n"
    run_export(reader, tmp_path / "out", spec, dialect)
    got = set(tree_of(tmp_path / "out", repo.fqrn))
    top = {f"{c}/{n}" for n in os.listdir(src)} | {f"{c}/.cvmfscatalog", "sw", "sw/alice", c}
    data = {f"{c}/data/orig.txt", f"{c}/data/alias.txt"}
    # flat copy: direct children only (directories empty unless other rules fill them); an exact rule
    # on a directory copies it alone; an exclusion is final in 2.12, re-included below in 2.14
    if dialect == "2.12":
        assert got == (top - {f"{c}/sub"}) | data
    else:
        assert got == top | data | {f"{c}/sub/deeper", f"{c}/sub/deeper/x.txt"}


def test_dry_run_counts_and_lint(reader: RepositoryReader) -> None:
    spec = (
        f"{CID}/data*\n"  # 1: 3 files
        f"!{CID}/data/big.bin\n"  # 2: removes 1 file
        f"!{CID}/nothing\n"  # 3: does not exist
        f"!{CID}/bin/run.sh\n"  # 4: excludes nothing selected
        f"{CID}/sub\n"  # 5: a directory without *
        f"{CID}/sub/deeper*\n"  # 6: 2.12: shadowed by 7 (same path, later)
        f"!{CID}/sub/deeper\n"  # 7: 2.12: also removes what 8 names
        f"{CID}/sub/deeper/x.txt\n"  # 8: 2.12: ignored under 7; 2.14: re-included
    )
    result = dry_run(reader, Selector(parse_spec(spec, "s.spec"), "2.12"))
    counts = result.counts
    assert (counts[0].files, counts[0].bytes) == (2, 2 * len(b"two names\n"))
    assert (counts[1].removed_files, counts[1].removed_bytes) == (1, len(BIG))
    assert counts[4].directories == 1 and counts[4].files == 0
    assert result.files == 2
    text = "\n".join(str(f) for f in result.findings)
    assert "s.spec:3" in text and "matches nothing" in text
    assert "s.spec:4: !" in text and "excludes nothing" in text
    assert "s.spec:5" in text and "without its content" in text
    assert "s.spec:7: !" in text and "removes more than it names" in text and "s.spec:8 includes" in text
    assert "s.spec:8" in text and "s.spec:7 (!" in text and "s.spec:6" in text
    assert "s.spec:1" not in text
    assert "excludes 1 files, 700.0 KiB" in format_dry_run(result)
    # 2.14: rule 8 re-includes, so rule 7 no longer removes more than it names
    result = dry_run(reader, Selector(parse_spec(spec, "s.spec"), "2.14"))
    assert result.files == 3
    assert not any("removes more" in str(f) for f in result.findings)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "rcds.cli", "shrinkwrap", *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=300,
    )


def _export_args(repo: Repository, dest: Path, spec: Path) -> list[str]:
    return [
        str(repo.storage),
        "--key",
        str(repo.public_key_path),
        "--spec",
        str(spec),
        "--dialect",
        "2.14",
        "--dest",
        str(dest),
        "-q",
        "--jobs",
        "4",
    ]


def _visible_files_are_right(dest: Path, fqrn: str, src: Path, prefix: str) -> int:
    """Every regular file present in the export has exactly the source's content and metadata."""
    n = 0
    for p in (dest / fqrn / prefix).rglob("*"):
        if p.is_file() and not p.is_symlink():
            s = src / p.relative_to(dest / fqrn / prefix)
            if not s.exists() and s.name == ".cvmfscatalog":  # the marker of a published tree
                assert p.read_bytes() == b""
                continue
            assert p.read_bytes() == s.read_bytes(), p
            assert stat.S_IMODE(os.lstat(p).st_mode) == stat.S_IMODE(os.lstat(s).st_mode) & 0o777
            assert os.lstat(p).st_mtime_ns == os.lstat(s).st_mtime_ns
            n += 1
    return n


@pytest.mark.parametrize("point", ["shrinkwrap.placed.3", "shrinkwrap.data", "shrinkwrap.placed.9"])
def test_killed_export_resumes_to_the_complete_tree(
    published: tuple[Repository, Path], tmp_path: Path, point: str
) -> None:
    repo, src = published
    spec = tmp_path / "s.spec"
    spec.write_text(f"{CID}*\n")
    dest = tmp_path / "out"
    killed = _cli(*_export_args(repo, dest, spec), env={"RCDS_FAILPOINT": point})
    assert killed.returncode == 137, killed.stderr
    assert (dest / ".provenance" / repo.fqrn / "incomplete").exists()
    placed = _visible_files_are_right(dest, repo.fqrn, src, CID.lstrip("/"))
    assert placed < sum(1 for p in src.rglob("*") if p.is_file())
    done = _cli(*_export_args(repo, dest, spec), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["unchanged_files"] >= (placed if point != "shrinkwrap.data" else 0)
    got = tree_of(dest, repo.fqrn)
    want = expected(src, CID.lstrip("/"))
    want[f"{CID.lstrip('/')}/.cvmfscatalog"] = got[f"{CID.lstrip('/')}/.cvmfscatalog"]
    assert got == want
    assert not list((dest / DATA / "tmp").iterdir())
    assert not list((dest / DATA).glob("??/.tmp-*"))
    assert not (dest / ".provenance" / repo.fqrn / "incomplete").exists()


def test_sigkill_at_a_random_moment_then_rerun(make_repo: Callable[..., Repository], tmp_path: Path) -> None:
    repo = make_repo()
    r = random.Random(3)
    spec_tree = {
        f"d{i}": {f"f{j}.bin": r.randbytes(r.randrange(1, 40_000)) for j in range(60)} for i in range(20)
    }
    src = write_tree(tmp_path / "src", spec_tree)  # type: ignore[arg-type]
    with repo.transaction() as txn:
        txn.add_directory("/big", src)
        txn.commit()
    spec = tmp_path / "s.spec"
    spec.write_text("/big*\n")
    dest = tmp_path / "out"
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rcds.cli", "shrinkwrap", *_export_args(repo, dest, spec)], env=full
    )
    deadline = time.monotonic() + 60
    while (
        time.monotonic() < deadline
        and len(list((dest / repo.fqrn).rglob("*.bin")) if (dest / repo.fqrn).exists() else []) < 100
    ):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert (dest / ".provenance" / repo.fqrn / "incomplete").exists()  # killed in the middle
    _visible_files_are_right(dest, repo.fqrn, src, "big")
    done = _cli(*_export_args(repo, dest, spec))
    assert done.returncode == 0, done.stderr
    got = tree_of(dest, repo.fqrn)
    assert got.pop("big/.cvmfscatalog")[3] == b""
    assert got == expected(src, "big")


def test_export_of_the_cvmfs_212_reference_repository(unpacked: Unpacked, tmp_path: Path) -> None:
    ref = unpacked["cvmfs-2.12"]
    reader = ref.open(cache_dir=tmp_path / "rc")
    try:
        spec = "/analysis*\n/lib*\n!/lib/nested/data.txt\n/cids*\n"
        run_export(reader, tmp_path / "out", spec, "2.14")
        root = tmp_path / "out" / ref.fqrn
        content = unpacked.content_rev2
        for rel in [
            "analysis/run.sh",
            "analysis/src/a.txt",
            "analysis/src/main.py",
            "analysis/src/new_in_rev2.txt",
            "cids/sw/group/abc123/code.py",
        ]:
            assert (root / rel).read_bytes() == (content / rel).read_bytes()
            d = reader.stat("/" + rel)
            st = os.lstat(root / rel)
            assert stat.S_IMODE(st.st_mode) == d.mode & 0o777 and st.st_mtime_ns // 10**9 == d.mtime
        assert (root / "lib/big.dat").read_bytes() == reader.read("/lib/big.dat")  # chunked
        assert reader.stat("/lib/big.dat").is_chunked
        assert os.readlink(root / "analysis/variant_link") == "/cvmfs/$(CMSSW_VERSION:-none)/x"
        assert os.readlink(root / "analysis/link_to_main") == "src/main.py"
        assert (
            os.lstat(root / "analysis/src/a.txt").st_ino
            == os.lstat(root / "analysis/src/a_hardlink.txt").st_ino
        )
        assert (root / "analysis/empty_dir").is_dir() and not list((root / "analysis/empty_dir").iterdir())
        assert (root / "lib/nested").is_dir() and not (root / "lib/nested/data.txt").exists()
        assert (root / "lib/nested/.cvmfscatalog").is_file()
    finally:
        reader.close()


def test_api_with_cids_and_json_cli(published: tuple[Repository, Path], tmp_path: Path) -> None:
    repo, _ = published
    rules = build_rules(cids=[CID.split("/", 2)[2]], prefix="sw")
    assert [r.text for r in rules] == [f"{CID}/*"]
    result = shrinkwrap(
        str(repo.storage), [repo.public_key_path], tmp_path / "out", rules, dialect="2.12", progress=False
    )
    assert result.stats is not None and result.stats.files > 0
    assert (tmp_path / "out" / repo.fqrn / CID.lstrip("/") / "README").read_bytes() == b"hello\n"
    with pytest.raises(ShrinkwrapError):
        shrinkwrap(str(repo.storage), [], tmp_path / "x", rules, dialect="2.12")
    lint = _cli(
        str(repo.storage),
        "--key",
        str(repo.public_key_path),
        "--path",
        "/nothing/here",
        "--dialect",
        "2.12",
        "--dest",
        str(tmp_path / "l"),
        "--lint",
    )
    assert lint.returncode == 6 and "matches nothing" in lint.stdout
    assert not (tmp_path / "l").exists()  # a dry run writes nothing


def test_a_corrupt_object_fails_cleanly_and_never_shows(
    published: tuple[Repository, Path], tmp_path: Path
) -> None:
    repo, _ = published
    storage = tmp_path / "storage"
    shutil.copytree(repo.storage, storage)
    reader = RepositoryReader.open(storage, repo.public_key_path, cache_dir=tmp_path / "rc")
    try:
        d = reader.stat(f"{CID}/bin/run.sh")
        assert d.hash is not None
        obj = storage / d.hash.object_name()
        obj.chmod(0o644)
        obj.write_bytes(zlib.compress(b"#!/bin/sh\nrm -rf /\n"))  # a valid zlib stream, the wrong content
        with pytest.raises(ShrinkwrapError, match="corrupt"):
            run_export(reader, tmp_path / "out", f"{CID}*", jobs=1)
        assert not (tmp_path / "out" / repo.fqrn / CID.lstrip("/") / "bin/run.sh").exists()
        assert not list((tmp_path / "out" / DATA).glob("??/.tmp-*"))
    finally:
        reader.close()


@pytest.mark.parametrize(
    ("victim", "names"),
    [("bin/run.sh", ["bin/run.sh"]), ("data/orig.txt", ["data/orig.txt", "data/alias.txt"]),
     ("sub/inside.txt", ["sub/inside.txt"])],
)  # fmt: skip
def test_a_corrupt_object_in_a_batch_is_named_itself(
    published: tuple[Repository, Path], tmp_path: Path, victim: str, names: list[str]
) -> None:
    """Small objects are fetched a batch at a time; an object that is not even a zlib stream fails while
    it is written, and the error must name that object's file, not the first of its batch."""
    repo, _ = published
    storage = tmp_path / "storage"
    shutil.copytree(repo.storage, storage)
    reader = RepositoryReader.open(storage, repo.public_key_path, cache_dir=tmp_path / "rc")
    try:
        d = reader.stat(f"{CID}/{victim}")
        assert d.hash is not None
        obj = storage / d.hash.object_name()
        obj.chmod(0o644)
        obj.write_bytes(b"this is not a zlib stream" * 4)
        with pytest.raises(ShrinkwrapError, match="corrupt") as info:
            run_export(reader, tmp_path / "out", f"{CID}*", jobs=1)
        message = str(info.value)  # the object, and one of the names of its file (hard links share it)
        assert f"{d.hash.object_name()} of " in message and any(f"/{n} is corrupt" in message for n in names)
        assert not list((tmp_path / "out" / DATA).glob("??/.tmp-*"))
    finally:
        reader.close()


def test_a_file_changed_through_its_hard_link_is_restored(reader: RepositoryReader, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    run_export(reader, dest, f"{CID}*")
    readme = dest / reader.fqrn / CID.lstrip("/") / "README"
    twin = dest / reader.fqrn / CID.lstrip("/") / "same_as_readme"
    readme.chmod(0o644)
    readme.write_bytes(b"edited\n")  # changes the shared .data inode, its size and mtime
    stats = run_export(reader, dest, f"{CID}*")
    assert readme.read_bytes() == twin.read_bytes() == b"hello\n"
    assert os.lstat(readme).st_ino == os.lstat(twin).st_ino
    assert os.lstat(readme).st_mtime_ns == 1_600_000_001 * 10**9
    # made again from the same content under another mode (readme_other_mode), not downloaded
    assert stats.copied_files == 1 and stats.fetched_files == 0 and stats.placed_files == 2


def test_formats_through_the_api(published: tuple[Repository, Path], tmp_path: Path) -> None:
    repo, _ = published
    rules = build_rules(paths=[f"{CID}/bin"])
    key = [repo.public_key_path]
    tar = shrinkwrap(str(repo.storage), key, tmp_path / "d", rules, dialect="2.14", fmt="tar",
                     output=tmp_path / "x.tar", progress=False)  # fmt: skip
    assert tar.output == str(tmp_path / "x.tar")
    with tarfile.open(tmp_path / "x.tar") as t:
        assert f"{repo.fqrn}{CID}/bin/run.sh" in t.getnames()
    options = json.loads((tmp_path / "d" / ".provenance" / repo.fqrn / "options.json").read_text())
    assert options["format"] == "tar" and options["dialect"] == "2.14"
    with pytest.raises(ShrinkwrapError, match="needs --output"):
        shrinkwrap(str(repo.storage), key, tmp_path / "d", rules, dialect="2.14", fmt="squashfs")


def test_a_modified_variant_is_not_copied_from(reader: RepositoryReader, tmp_path: Path) -> None:
    """``same_as_readme`` and ``readme_other_mode`` hold the same content under other metadata: a
    rebuilt README may be copied from the other one's .data file, unless that was written to."""
    dest = tmp_path / "out"
    run_export(reader, dest, f"{CID}*")
    top = dest / reader.fqrn / CID.lstrip("/")
    (top / "readme_other_mode").write_bytes(b"HELLO\n")  # same size, other bytes, new mtime
    (top / "README").chmod(0o644)
    (top / "README").write_bytes(b"edited\n")
    stats = run_export(reader, dest, f"{CID}*")
    assert (top / "README").read_bytes() == (top / "readme_other_mode").read_bytes() == b"hello\n"
    assert stats.copied_files == 0 and stats.fetched_files == 2


def test_a_full_disk_fails_cleanly_and_a_rerun_completes(
    published: tuple[Repository, Path], tmp_path: Path
) -> None:
    repo, src = published
    spec = tmp_path / "s.spec"
    spec.write_text(f"{CID}*\n")
    dest = tmp_path / "out"
    failed = _cli(*_export_args(repo, dest, spec), env={"RCDS_FAILPOINT": "shrinkwrap.placed.4:enospc"})
    assert failed.returncode == 1
    assert "No space left on device" in failed.stderr and "Traceback" not in failed.stderr
    _visible_files_are_right(dest, repo.fqrn, src, CID.lstrip("/"))
    assert not list((dest / DATA).glob("??/.tmp-*"))  # temporary files of unfinished downloads removed
    done = _cli(*_export_args(repo, dest, spec))
    assert done.returncode == 0, done.stderr
    got = tree_of(dest, repo.fqrn)
    assert got.pop(f"{CID.lstrip('/')}/.cvmfscatalog")[3] == b""
    assert got == expected(src, CID.lstrip("/"))
