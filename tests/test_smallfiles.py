"""Small files stored by worker processes (``rcds.cvmfs.smallfiles``): what they publish equals what the
ingest threads publish, re-publishing finds everything in the content index, a file that goes bad fails
alone, a worker killed mid-batch fails the transaction instead of hanging it, and a command's workers end
with it.

Real worker processes, real repositories, real SQLite; ``processes_after_files = 0`` sends every batch
to the workers (by default only a transaction past 1,000 small files uses them).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import File, Hardlink, Symlink, new_repo, write_tree
from rcds.cvmfs import catalogtree, content, smallfiles, treenodes
from rcds.cvmfs.checker import check_repository
from rcds.cvmfs.contentindex import ContentIndex
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import Repository
from rcds.cvmfs.tree import TreeEntry, entries_from_directory
from rcds.cvmfs.writer import Transaction

SRC = Path(__file__).resolve().parent.parent / "src"


def small_tree(n: int, seed: int = 1) -> dict[str, object]:
    """``n`` small text files in 10 directories, some with the same content."""
    rng = random.Random(seed)
    words = [b"import", b"numpy", b"def", b"return", b"self", b"event", b"track", b"energy", b"\n"]
    tree: dict[str, dict[str, object]] = {}
    for i in range(n):
        body = b" ".join(rng.choice(words) for _ in range(rng.randrange(5, 400)))
        tree.setdefault(f"d{i % 10}", {})[f"f{i}.py"] = body if i % 7 else b"# the same in every seventh\n"
    return dict(tree)


def in_workers(txn: Transaction) -> Transaction:
    txn.content.processes_after_files = 0
    return txn


def content_objects(storage: Path) -> dict[str, bytes]:
    """The store's objects without a suffix (file content, not catalogs or histories), by name."""
    return {
        f"{p.parent.name}/{p.name}": p.read_bytes()
        for p in (storage / "data").glob("*/*")
        if len(p.name) == 38  # 40 hex digits, the first two in the directory's name
    }


def files_of(reader: RepositoryReader, top: str) -> dict[str, bytes]:
    out = {}
    for d in reader.listdir(top):
        if not d.is_dir:
            continue  # the .cvmfscatalog marker
        for f in reader.listdir(f"{top}/{d.name}"):
            out[f"{d.name}/{f.name}"] = reader.read(f"{top}/{d.name}/{f.name}")
    return out


def test_workers_publish_what_the_threads_publish_and_republishing_hits_the_index(
    tmp_path: Path, repo_template: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    src = write_tree(tmp_path / "src", small_tree(400))
    by_threads = new_repo(tmp_path / "threads", repo_template)
    by_workers = new_repo(tmp_path / "workers", repo_template)
    with by_threads.transaction() as txn:
        txn.content.processes_after_files = None
        txn.add_directory("/sw/t", src)
        threads_stats = txn.commit().stats
    with in_workers(by_workers.transaction()) as txn:
        txn.add_directory("/sw/t", src)
        workers_stats = txn.commit().stats
    assert smallfiles.POOL.pids()  # the workers ran (and stay for the next transaction)
    assert workers_stats == threads_stats
    distinct = {p.read_bytes() for p in src.rglob("*.py")}
    assert workers_stats.objects_written == len(distinct) < 400  # each distinct content once
    # The same content objects, byte for byte (the catalogs differ by their timestamps), and the same tree.
    threads_objects, workers_objects = (
        content_objects(tmp_path / "threads"),
        content_objects(tmp_path / "workers"),
    )
    assert threads_objects == workers_objects and len(workers_objects) >= len(distinct)
    reader = open_reader(by_workers)
    assert files_of(reader, "/sw/t") == files_of(open_reader(by_threads), "/sw/t")
    assert files_of(reader, "/sw/t")["d3/f3.py"] == (src / "d3" / "f3.py").read_bytes()
    assert check_repository(reader).errors == []
    # Again under another path: the workers find every file in the content index, write nothing.
    with in_workers(by_workers.transaction()) as txn:
        txn.add_directory("/sw/again", src)
        again = txn.commit().stats
    assert (again.files, again.objects_written, again.pieces_from_index) == (400, 0, 400)


def test_workers_start_half_way_to_the_threshold_and_the_first_batch_takes_them(
    tmp_path: Path, repo_template: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    """Past half of ``processes_after_files`` the workers are spawned without waiting for them: they
    import while the threads go on, and the batches past the threshold go to those very processes."""
    smallfiles.POOL.stop()
    repo = new_repo(tmp_path / "storage", repo_template)
    src = write_tree(tmp_path / "src", small_tree(300))
    with repo.transaction() as txn:
        txn.content.processes_after_files = 400  # 300 files: past half, never past the threshold
        txn.add_directory("/sw/t", src)
        spawned = smallfiles.POOL.pids()
        txn.commit()
    assert len(spawned) == smallfiles.POOL.size
    with in_workers(repo.transaction()) as txn:
        txn.add_directory("/sw/again", src)
        assert txn.commit().stats.files == 300
    assert sorted(smallfiles.POOL.pids()) == sorted(spawned)  # taken, not spawned again
    reader = open_reader(repo)
    assert files_of(reader, "/sw/again") == files_of(reader, "/sw/t")
    assert files_of(reader, "/sw/t")["d1/f11.py"] == (src / "d1" / "f11.py").read_bytes()


def test_tar_members_go_to_the_workers_as_bytes(
    tmp_path: Path, repo_template: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    import io
    import tarfile

    from rcds.ingest.tarstream import tar_entries

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(150):
            data = f"member {i}\n".encode() * (i + 1)
            info = tarfile.TarInfo(f"pkg/m{i}.txt")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    buf.seek(0)
    repo = new_repo(tmp_path / "storage", repo_template)
    with in_workers(repo.transaction()) as txn:
        txn.add_tree("/sw/tar", tar_entries(buf))
        stats = txn.commit().stats
    assert stats.objects_written == 150
    reader = open_reader(repo)
    assert reader.read("/sw/tar/pkg/m42.txt") == b"member 42\n" * 43
    assert check_repository(reader).errors == []


def test_a_file_that_shrank_fails_the_transaction_and_nothing_is_published(
    tmp_path: Path, repo_template: Path
) -> None:
    src = write_tree(tmp_path / "src", small_tree(50))
    repo = new_repo(tmp_path / "storage", repo_template)
    before = repo.manifest().revision
    with in_workers(repo.transaction()) as txn:
        size = os.path.getsize(src / "d0" / "f0.py")
        pending = txn.content.add_file(src / "d0" / "f0.py", size + 10)  # listed longer than it is
        good = txn.content.add_file(src / "d1" / "f1.py")
        with pytest.raises(EOFError, match=r"f0\.py: ended 10 bytes early"):
            pending.result()
        assert good.result().hash is not None  # the rest of its batch is stored
    assert repo.manifest().revision == before


@pytest.mark.parametrize("processes_after_files", [None, 0], ids=["threads", "workers"])
def test_a_file_failing_after_hundreds_of_rows_leaves_the_old_tree_and_the_transaction_whole(
    tmp_path: Path,
    repo_template: Path,
    open_reader: Callable[..., RepositoryReader],
    processes_after_files: int | None,
) -> None:
    """The tree's rows go into its catalog while content is stored; one file failing after hundreds of
    them (its source shorter than listed) fails ``add_tree`` with nothing of the new tree attached: the
    old tree stays, and the same transaction publishes its other changes."""
    repo = new_repo(tmp_path / "storage", repo_template)
    old = write_tree(tmp_path / "old", {"keep.txt": b"the old tree\n"})
    with repo.transaction() as txn:
        txn.add_directory("/sw/t", old)
        txn.commit()
    src = write_tree(tmp_path / "src", small_tree(900))

    def one_file_listed_longer(entries: Iterator[TreeEntry]) -> Iterator[TreeEntry]:
        for e in entries:
            yield replace(e, size=e.size + 10) if e.path == "d7/f697.py" else e

    with repo.transaction() as txn:
        txn.content.processes_after_files = processes_after_files
        with pytest.raises(EOFError, match=r"f697\.py: ended 10 bytes early"):
            txn.add_tree("/sw/t", one_file_listed_longer(entries_from_directory(src)))
        txn.write_file("/sw/other.txt", b"published\n", mtime=0)
        txn.commit()
    reader = open_reader(repo)
    assert [d.name for d in reader.listdir("/sw/t")] == [".cvmfscatalog", "keep.txt"]
    assert reader.read("/sw/t/keep.txt") == b"the old tree\n"
    assert reader.read("/sw/other.txt") == b"published\n"
    assert check_repository(reader).errors == []


def test_hard_links_to_files_whose_rows_went_in_early_get_their_groups(
    tmp_path: Path, repo_template: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    """A file's row may be written long before the walk meets its other names; joining a hard link
    group within its directory, it is written again with the group's id."""
    tree = small_tree(600)
    tree["d0"]["g0.py"] = Hardlink("d0/f0.py")  # type: ignore[index]  # two names in the target's directory
    tree["zz"] = {"a.py": Hardlink("d1/f1.py"), "b.py": Hardlink("d1/f1.py")}  # two in another one
    src = write_tree(tmp_path / "src", tree)
    repo = new_repo(tmp_path / "storage", repo_template)
    with repo.transaction() as txn:
        txn.add_directory("/sw/t", src)
        txn.commit()
    reader = open_reader(repo)
    pair, others = [reader.stat(f"/sw/t/d0/{n}") for n in ("f0.py", "g0.py")], reader.stat("/sw/t/d0/f10.py")
    assert [d.linkcount for d in pair] == [2, 2] and pair[0].hardlink_group == pair[1].hardlink_group > 0
    assert (others.linkcount, others.hardlink_group) == (1, 0)
    zz = [reader.stat(f"/sw/t/zz/{n}") for n in ("a.py", "b.py")]
    assert [d.linkcount for d in zz] == [2, 2] and zz[0].hardlink_group == zz[1].hardlink_group > 0
    assert zz[0].hardlink_group != pair[0].hardlink_group
    assert reader.stat("/sw/t/d1/f1.py").linkcount == 1  # alone in its directory: a copy, as CVMFS has it
    assert (
        reader.read("/sw/t/zz/b.py") == reader.read("/sw/t/d1/f1.py") == (src / "d1" / "f1.py").read_bytes()
    )
    assert reader.read("/sw/t/d0/g0.py") == (src / "d0" / "f0.py").read_bytes()
    assert check_repository(reader).errors == []


def test_rows_written_as_content_is_stored_equal_rows_written_at_the_end(
    tmp_path: Path,
    repo_template: Path,
    open_reader: Callable[..., RepositoryReader],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same tree published twice in one transaction: once with every file's row written as soon as
    its content is stored (batches of one file, a look after every entry, the entries slowed so that
    each file is stored before the next comes), once with every row written at the end (an interval no
    tree reaches). Every row below the two roots is the same: content, chunks, modes, sizes, symlinks,
    hard link counts and groups."""
    rng = random.Random(5)
    tree = small_tree(120)
    tree["big"] = {"blob.bin": rng.randbytes(700_000), "empty": b"", "run.sh": File(b"#!/bin/sh\n", 0o755)}
    tree["d0"]["g0.py"] = Hardlink("d0/f0.py")  # type: ignore[index]
    tree["links"] = {"a.py": Hardlink("d1/f1.py"), "b.py": Hardlink("d1/f1.py"), "up": Symlink("../d2")}
    src = write_tree(tmp_path / "src", tree)
    repo = new_repo(tmp_path / "storage", repo_template)

    def slowly(entries: Iterator[TreeEntry]) -> Iterator[TreeEntry]:
        for e in entries:
            yield e
            time.sleep(0.004)

    written: list[int] = []
    write_nodes = catalogtree.CatalogTree.write_nodes

    def counting(self: catalogtree.CatalogTree, *args: object) -> None:
        early = args[-1]
        written.append(len(early.written) if isinstance(early, treenodes.EarlyRows) else -1)
        write_nodes(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(catalogtree.CatalogTree, "write_nodes", counting)
    with repo.transaction() as txn:
        monkeypatch.setattr(treenodes.EarlyRows, "FLUSH_EVERY", 1)
        monkeypatch.setattr(content, "BATCH_FILES", 1)
        txn.add_tree("/sw/early", slowly(entries_from_directory(src)))
        monkeypatch.setattr(treenodes.EarlyRows, "FLUSH_EVERY", 10**9)
        monkeypatch.setattr(content, "BATCH_FILES", 64)
        txn.add_tree("/sw/late", entries_from_directory(src))
        txn.commit()
    assert written[0] > 100 and written[1] == 0  # most rows early in the first; none in the second
    reader = open_reader(repo)
    rows = {  # all but the root and the .cvmfscatalog marker, whose mtimes are the time of the call
        top: {
            e.path[len(f"/sw/{top}") :]: e.dirent
            for e in reader.walk(f"/sw/{top}")
            if e.path not in (f"/sw/{top}", f"/sw/{top}/.cvmfscatalog")
        }
        for top in ("early", "late")
    }
    assert rows["early"] == rows["late"] and len(rows["early"]) > 130
    assert rows["early"]["/d0/g0.py"].hardlink_group > 0 and rows["early"]["/links/b.py"].linkcount == 2
    assert rows["early"]["/big/blob.bin"].is_chunked
    assert check_repository(reader).errors == []


def test_a_content_index_that_cannot_be_written_costs_later_dedup_not_the_revision(
    tmp_path: Path,
    repo_template: Path,
    open_reader: Callable[..., RepositoryReader],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The index is written beside the catalogs, once the objects are durable; a failure there (a failing
    disk under ``.rcds``) is logged and the revision published: the next publish of that content only
    compresses it again, and records it."""
    src = write_tree(tmp_path / "src", small_tree(300))
    repo = new_repo(tmp_path / "storage", repo_template)
    monkeypatch.setenv("RCDS_FAILPOINT", "index-flush:eio")
    with caplog.at_level(logging.WARNING, logger="rcds.writer"), repo.transaction() as txn:
        txn.add_directory("/sw/first", src)
        first = txn.commit()
    assert [r.getMessage() for r in caplog.records] == ["content index not updated"]
    assert first.revision == repo.manifest().revision
    monkeypatch.delenv("RCDS_FAILPOINT")
    stats = []
    for path in ("/sw/second", "/sw/third"):
        with repo.transaction() as txn:
            txn.add_directory(path, src)
            stats.append(txn.commit().stats)
    assert (stats[0].pieces_from_index, stats[1].pieces_from_index) == (0, 300)  # recorded the second time
    reader = open_reader(repo)
    assert files_of(reader, "/sw/first") == files_of(reader, "/sw/third")
    assert check_repository(reader).errors == []


def _fifo(tmp_path: Path) -> Path:
    fifo = tmp_path / "blocks"
    os.mkfifo(fifo)
    return fifo


def test_a_worker_killed_mid_batch_fails_the_transaction_and_the_next_one_gets_a_new_worker(
    tmp_path: Path, repo_template: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    repo = new_repo(tmp_path / "storage", repo_template)
    before = repo.manifest().revision
    fifo = _fifo(tmp_path)  # a worker that opens it waits there for a writer: busy, as long as we like
    with in_workers(repo.transaction()) as txn:
        pending = txn.content.add_file(fifo, 5)
        txn.content._submit_batch()
        deadline = time.monotonic() + 10
        while not any(_opening_fifo(pid) for pid in smallfiles.POOL.pids()):
            assert time.monotonic() < deadline, "no worker took the batch"
            time.sleep(0.02)
        killed = smallfiles.POOL.pids()
        # The idle one first, and ended (a zombie until reaped) before the busy one dies: the pool learns
        # of the busy one's end at once, and must find the idle one's then.
        killed.sort(key=_opening_fifo)
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _state(pid) not in ("Z", None):
                assert time.monotonic() < deadline, f"worker {pid} still runs"
                time.sleep(0.01)
        with pytest.raises(smallfiles.WorkerGone, match="ended"):
            pending.result()
    assert repo.manifest().revision == before
    # Both leave the pool with the busy one's loss, the idle one before it is given another batch.
    deadline = time.monotonic() + 10
    while set(killed) & set(smallfiles.POOL.pids()):
        assert time.monotonic() < deadline, f"a killed worker stays in the pool: {smallfiles.POOL.pids()}"
        time.sleep(0.02)
    # The next batches go to new workers instead of failing.
    src = write_tree(tmp_path / "src", small_tree(30))
    with in_workers(repo.transaction()) as txn:
        txn.add_directory("/sw/after", src)
        txn.commit()
    assert not set(killed) & set(smallfiles.POOL.pids())
    assert open_reader(repo).read("/sw/after/d2/f2.py") == (src / "d2" / "f2.py").read_bytes()


def _state(pid: int) -> str | None:
    """The state letter of process ``pid`` (R, S, Z, ...), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _opening_fifo(pid: int) -> bool:
    """Whether process ``pid`` waits in ``open(2)`` for the other end of a FIFO."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text() == "wait_for_partner"
    except OSError:
        return False


def test_an_aborted_transaction_records_nothing_its_workers_stored_after_the_abort(
    tmp_path: Path, repo_template: Path
) -> None:
    """Work still running when a transaction is given up ends before the transaction closes, and what
    it stored is not recorded in the content index: nothing synced those objects."""
    src = write_tree(tmp_path / "src", {"a.txt": b"stored while the transaction is given up\n"})
    repo = new_repo(tmp_path / "storage", repo_template)
    fifo = _fifo(tmp_path)
    txn = in_workers(repo.transaction())
    txn.content.add_file(src / "a.txt")
    txn.content.add_file(fifo, 5)  # the same batch: its outcome waits for the FIFO
    txn.content._submit_batch()
    closed = threading.Event()
    threading.Thread(target=lambda: (txn.abort(), closed.set()), daemon=True).start()
    assert not closed.wait(0.5)  # the abort waits for the batch
    # The writer's end opened and closed: the worker's open returns, its read of the FIFO fails (a FIFO
    # cannot be read at an offset), and the batch ends with that file's error.
    os.close(os.open(fifo, os.O_WRONLY))
    assert closed.wait(10)
    index = ContentIndex(repo.private / "content-index.db")
    try:
        assert index.db.execute("SELECT count(*) FROM pieces").fetchone()[0] == 0
    finally:
        index.close()


def test_a_command_with_workers_leaves_none_behind(tmp_path: Path, repo_template: Path) -> None:
    src = write_tree(tmp_path / "src", small_tree(1200))  # past the default 1,000: workers start
    storage = tmp_path / "storage"
    new_repo(storage, repo_template)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rcds.cli", "repo", "add", "--storage", str(storage), "/sw/cmd", str(src)],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    session = [p for p in os.listdir("/proc") if p.isdigit() and _session_of(int(p)) == proc.pid]
    assert session == []  # no worker outlived the command
    reader = RepositoryReader.open(storage, Repository(storage).public_key_path, cache_dir=tmp_path / "c")
    assert reader.read("/sw/cmd/d5/f1195.py") == (src / "d5" / "f1195.py").read_bytes()
    assert check_repository(reader).errors == []


@pytest.mark.parametrize("interpreter", ["missing", "not-python"])
def test_where_no_worker_can_start_the_threads_store_the_files(
    tmp_path: Path, repo_template: Path, interpreter: str
) -> None:
    """An interpreter path that is gone (a venv rebuilt under a running server), or a program that does
    not run ``-c`` (a frozen executable): the command warns once and publishes through its threads,
    instead of failing every transaction past 1,000 files on a worker that died at start-up."""
    program = tmp_path / interpreter
    if interpreter == "not-python":
        program.write_text("#!/bin/sh\necho 'usage: app [options]' >&2\nexit 2\n")
        program.chmod(0o755)
    src = write_tree(tmp_path / "src", small_tree(2500))  # past 1,000 files, in many batches
    storage = tmp_path / "storage"
    new_repo(storage, repo_template)
    run_cli = "import sys; sys.executable = sys.argv.pop(1); sys.argv[0] = 'rcds'; from rcds.cli import main; main()"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            run_cli,
            str(program),
            "repo",
            "add",
            "--storage",
            str(storage),
            "/sw/t",
            str(src),
        ],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("could not start a small-file worker process") == 1, proc.stderr
    reader = RepositoryReader.open(storage, Repository(storage).public_key_path, cache_dir=tmp_path / "c")
    assert files_of(reader, "/sw/t") == {
        f"{d.name}/{f.name}": f.read_bytes() for d in src.iterdir() for f in d.iterdir()
    }
    assert check_repository(reader).errors == []


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None
