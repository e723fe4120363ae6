"""The download threads of ``rcds get``, ``rcds shrinkwrap`` and ``rcds replicate`` share one CPU
(``rcds.affinity``).

Threads are observed from the inside: a profile hook that ``threading`` installs in every new thread
reads that thread's own CPU affinity when it starts. The exports and gets are real ones, from a real
repository on disk.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import new_repo, write_tree
from rcds.affinity import ENV, threads_on_one_cpu
from rcds.client.materialize import materialize
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.replica import snapshot
from rcds.cvmfs.repository import Repository
from rcds.shrinkwrap.export import export
from rcds.shrinkwrap.spec import Selector, parse_spec

ALLOWED = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
pytestmark = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs a process allowed on two CPUs or more")


class ThreadCpus:
    """The CPUs each thread started while this is active may run on, as the thread itself reads them."""

    def __init__(self) -> None:
        self.seen: dict[str, set[int]] = {}
        self._lock = threading.Lock()

    def _hook(self, *_args: Any) -> None:
        sys.setprofile(None)  # once per thread is enough
        with self._lock:
            self.seen[threading.current_thread().name] = os.sched_getaffinity(0)

    def assert_on_one_cpu(self, prefix: str) -> None:
        """Several threads named ``prefix...`` ran, all on the same single CPU; the caller has its CPUs back."""
        workers = [frozenset(s) for name, s in self.seen.items() if name.startswith(prefix)]
        assert len(workers) >= 2
        assert len(set(workers)) == 1
        assert len(workers[0]) == 1
        assert os.sched_getaffinity(0) == ALLOWED

    def __enter__(self) -> ThreadCpus:
        threading.setprofile(self._hook)
        return self

    def __exit__(self, *_exc: object) -> None:
        threading.setprofile(None)  # type: ignore[arg-type]


@pytest.fixture
def repo_reader(tmp_path: Path, repo_template: Path) -> Iterator[RepositoryReader]:
    repo = new_repo(tmp_path / "storage", repo_template)
    src = write_tree(
        tmp_path / "src",
        {f"d{i}": {f"f{j}": f"{i}.{j}\n".encode() * 50 for j in range(30)} for i in range(4)},
    )
    with repo.transaction() as txn:
        txn.add_directory("/sw/tree", src)
        txn.commit()
    r = RepositoryReader.open(repo.storage, repo.public_key_path, fqrn=repo.fqrn, cache_dir=tmp_path / "rc")
    yield r
    r.close()


def test_threads_started_inside_run_on_the_callers_cpu_and_the_caller_gets_its_cpus_back() -> None:
    with ThreadCpus() as cpus, threads_on_one_cpu() as cpu:
        assert cpu in ALLOWED
        assert os.sched_getaffinity(0) == {cpu}
        t = threading.Thread(target=lambda: None, name="inside")
        t.start()
        t.join()
    assert cpus.seen["inside"] == {cpu}
    assert os.sched_getaffinity(0) == ALLOWED


def _run_for(seconds: float, step: Any) -> set[int]:
    """Call ``step`` in a thread started inside ``threads_on_one_cpu`` until its CPUs widen or
    ``seconds`` pass; the CPUs it may use at the end."""
    seen: list[set[int]] = []

    def work() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and len(os.sched_getaffinity(0)) == 1:
            step()
        seen.append(os.sched_getaffinity(0))

    with threads_on_one_cpu() as cpu:
        assert cpu is not None
        t = threading.Thread(target=work)
        t.start()
        t.join()
    return seen[0]


def test_threads_busy_in_the_kernel_get_every_cpu_back() -> None:
    """System calls run in parallel whatever the GIL: a thread whose time goes to the kernel (here
    copying zeros out of /dev/zero, as file creation on a slow file system would) is spread again."""
    buffer = bytearray(4 << 20)
    with open("/dev/zero", "rb", buffering=0) as zero:
        assert _run_for(5.0, lambda: zero.readinto(buffer)) == ALLOWED


def test_threads_busy_in_python_stay_on_one_cpu() -> None:
    def python_work() -> None:
        sum(i * i for i in range(20_000))

    assert len(_run_for(2.0, python_work)) == 1


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "0")
    with threads_on_one_cpu() as cpu:
        assert cpu is None
        assert os.sched_getaffinity(0) == ALLOWED


def test_a_thread_already_on_one_cpu_is_left_alone() -> None:
    one = min(ALLOWED)
    os.sched_setaffinity(0, {one})
    try:
        with threads_on_one_cpu() as cpu:
            assert cpu is None
            assert os.sched_getaffinity(0) == {one}
        assert os.sched_getaffinity(0) == {one}
    finally:
        os.sched_setaffinity(0, ALLOWED)


def test_shrinkwrap_download_threads_share_one_cpu(repo_reader: RepositoryReader, tmp_path: Path) -> None:
    with ThreadCpus() as cpus:
        stats = export(
            repo_reader, Selector(parse_spec("/sw/tree*"), "2.14"), tmp_path / "out", jobs=4, progress=False
        )
    assert stats.fetched_files == 120
    cpus.assert_on_one_cpu("rcds-shrinkwrap")


def test_get_download_threads_share_one_cpu(repo_reader: RepositoryReader, tmp_path: Path) -> None:
    with ThreadCpus() as cpus:
        materialize(repo_reader, "/sw/tree", tmp_path / "out", jobs=4, progress=False)
    assert (tmp_path / "out" / "d3" / "f29").read_bytes() == b"3.29\n" * 50
    cpus.assert_on_one_cpu("rcds-get")


def test_replica_pull_threads_share_one_cpu(repo_reader: RepositoryReader, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    with ThreadCpus() as cpus:
        report = snapshot(
            str(storage), tmp_path / "replica", public_keys=[Repository(storage).public_key_path], jobs=4
        )
    assert report.objects_fetched > 120
    cpus.assert_on_one_cpu("replica")


def test_switched_off_the_threads_run_anywhere(
    repo_reader: RepositoryReader, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, "0")
    with ThreadCpus() as cpus:
        materialize(repo_reader, "/sw/tree", tmp_path / "out", jobs=4, progress=False)
    workers = [s for name, s in cpus.seen.items() if name.startswith("rcds-get")]
    assert workers and all(s == ALLOWED for s in workers)
