"""A full disk never loses an acknowledged upload (issue 12, defect 4).

A real ``rcds serve`` whose storage fails: through the failpoint file (``RCDS_FAILPOINT_FILE``: writing
``after-objects:enospc`` into it makes every commit fail with ENOSPC, emptying it frees the "disk" of
the running server), or through RLIMIT_FSIZE (real writes fail; the restart without the limit is the
disk coming back). The upload answered OK must wait, kept with its spool file, beyond ``publish_attempts``
tries, say why in ``status``, and publish once the storage works again.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from rcds.cvmfs.checker import check_repository
from rcds.cvmfs.failpoints import FILE_ENV
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import Repository
from server import RcdsServer, make_tarball

REPO = "solo.rcds.test"
ENOSPC_REASON = "waiting for disk space: OSError: [Errno 28] No space left on device"
# Fast backoff so that a test sees many tries: 0.05 s doubling, at most 0.4 s.
FAST = "retry_delay = 0.05\nmax_retry_delay = 0.4\npublish_attempts = 2"


def cid_of(data: bytes) -> str:
    return f"disk/{hashlib.sha256(data).hexdigest()[:16]}"


def spool_files(srv: RcdsServer) -> list[Path]:
    return sorted((srv.root / "data" / "queue" / "spool").iterdir())


def events(srv: RcdsServer, text: str) -> list[dict[str, Any]]:
    found = []
    for line in srv.log().splitlines():
        if line.startswith("{"):
            doc = json.loads(line)
            if text in doc["event"]:
                found.append(doc)
    return found


def metric(srv: RcdsServer, line_start: str) -> float:
    for line in srv.client.get("/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {line_start}")


def wait_for(srv: RcdsServer, cid: str, waits: int, timeout: float = 60) -> dict[str, Any]:
    """The status once the job has waited ``waits`` times."""
    deadline = time.monotonic() + timeout
    while True:
        doc = srv.status(cid)
        if doc.get("waits", 0) >= waits:
            return doc
        assert doc["state"] in ("queued", "publishing"), doc
        assert time.monotonic() < deadline, f"{cid}: {doc}\n{srv.log()[-3000:]}"
        time.sleep(0.05)


def assert_repository_ok(srv: RcdsServer) -> None:
    repo = Repository(srv.storage(REPO))
    with RepositoryReader.open(repo.storage, repo.public_key_path, cache_dir=srv.root / "check-cache") as r:
        report = check_repository(r)
    assert report.ok, report.errors


def test_an_acknowledged_upload_waits_out_a_full_disk_and_publishes_when_space_returns(
    tmp_path: Path,
) -> None:
    disk = tmp_path / "failpoint"
    disk.write_text("after-objects:enospc")  # the disk is full from the start
    srv = RcdsServer(tmp_path, repos=(REPO,), top_config=FAST)
    try:
        srv.start(env={FILE_ENV: str(disk)})
        first, second = make_tarball({"a.txt": "first\n"}), make_tarball({"b.txt": "second\n"})
        assert srv.publish(cid_of(first), first).text == "OK\n"
        doc = wait_for(srv, cid_of(first), waits=5)  # far more tries than publish_attempts (2)
        assert doc["state"] in ("queued", "publishing")
        assert doc["reason"] == ENOSPC_REASON
        assert "attempts" not in doc  # the retry budget is not spent on the disk
        # Uploads go on being accepted meanwhile, and wait too.
        assert srv.publish(cid_of(second), second).text == "OK\n"
        wait_for(srv, cid_of(second), waits=1)
        assert len(spool_files(srv)) == 2  # both kept
        assert srv.api("exists", cid=cid_of(first)).text == "MISSING\n"
        assert metric(srv, "rcds_waiting_jobs") >= 1
        assert metric(srv, f'rcds_storage_waiting{{repository="{REPO}"}}') == 1
        assert metric(srv, 'rcds_publish_failures_total{reason="waiting"}') >= 6
        assert 'reason="error"' not in srv.client.get("/metrics").text
        # One warning for the operator, with the reason, not one per try.
        warnings = events(srv, "publishing waits for the storage")
        assert len(warnings) == 1, warnings
        assert (warnings[0]["level"], warnings[0]["reason"]) == ("warning", ENOSPC_REASON)
        assert Repository(srv.storage(REPO)).manifest().revision == 0  # nothing half-published

        disk.write_text("")  # space is back, the server was not restarted
        freed = time.monotonic()
        for cid in (cid_of(first), cid_of(second)):
            assert srv.wait_state(cid, timeout=30)["state"] == "published"
        assert time.monotonic() - freed < 5  # the backoff is capped (0.4 s here, a minute by default)
        assert srv.api("exists", cid=cid_of(first)).text.startswith("PRESENT:")
        assert spool_files(srv) == []
        assert metric(srv, "rcds_waiting_jobs") == 0
        assert metric(srv, f'rcds_storage_waiting{{repository="{REPO}"}}') == 0
        assert len(events(srv, "publishing resumed")) == 1
        assert_repository_ok(srv)
    finally:
        srv.close()


def test_a_job_left_waiting_on_a_full_disk_publishes_after_a_restart_with_space(tmp_path: Path) -> None:
    """Real failing writes: RLIMIT_FSIZE lets the small upload and the state database through, but not the
    catalog of 6,000 files with 200-character names (several MB; long names make it big with few files,
    which keeps the test short). The default backoff (a minute at most) is kept: the restart retries at
    once."""
    srv = RcdsServer(tmp_path, repos=(REPO,), top_config="retry_delay = 0.05\npublish_attempts = 2")
    try:
        srv.start(max_file_size=1_500_000)
        data = make_tarball({f"many/{'n' * 190}{i:05d}.txt": b"" for i in range(6_000)})
        assert len(data) < 1_000_000
        cid = cid_of(data)
        assert srv.publish(cid, data).text == "OK\n"
        doc = wait_for(srv, cid, waits=3)
        # SQLite reports a write failing for anything but ENOSPC as an I/O error: "storage", not "space".
        assert doc["reason"] in (
            "waiting for storage: OperationalError: disk I/O error",
            "waiting for disk space: OSError: [Errno 27] File too large",
        ), doc
        kept = spool_files(srv)
        assert len(kept) == 1 and kept[0].suffix == ".tar"
        srv.stop()
        srv.start()  # no file size limit: the disk has room again
        restarted = time.monotonic()
        assert srv.wait_state(cid, timeout=60)["state"] == "published"
        assert time.monotonic() - restarted < 20
        assert spool_files(srv) == []
        assert_repository_ok(srv)
    finally:
        srv.close()


def test_other_errors_keep_the_bounded_retries(tmp_path: Path) -> None:
    """An error that is not the storage's (here an injected one, as a bug would raise) is retried
    ``publish_attempts`` times, then the job fails with the error and its spool file goes."""
    disk = tmp_path / "failpoint"
    disk.write_text("after-objects:error")
    srv = RcdsServer(tmp_path, repos=(REPO,), top_config="retry_delay = 0.05\npublish_attempts = 3")
    try:
        srv.start(env={FILE_ENV: str(disk)})
        data = make_tarball({"x.txt": "x\n"})
        assert srv.publish(cid_of(data), data).text == "OK\n"
        doc = srv.wait_state(cid_of(data), ("failed",))
        assert doc["reason"] == "error: FailpointError: failpoint after-objects"
        assert 'rcds_publish_failures_total{reason="retried"} 2.0' in srv.client.get("/metrics").text
        deadline = time.monotonic() + 10  # the spool file goes right after the job is marked failed
        while spool_files(srv) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert spool_files(srv) == []
        assert events(srv, "publishing waits for the storage") == []
    finally:
        srv.close()


def test_a_state_database_on_the_full_disk_catches_up_when_space_returns(tmp_path: Path) -> None:
    """The revision went through but recording it did not (the state database shares the full disk):
    the job must not stay "publishing" until a restart; the write is replayed once it can be."""
    disk = tmp_path / "failpoint"
    disk.write_text("state-published:enospc")
    srv = RcdsServer(tmp_path, repos=(REPO,), top_config=FAST)
    try:
        srv.start(env={FILE_ENV: str(disk)})
        data = make_tarball({"c.txt": "recorded late\n"})
        cid = cid_of(data)
        assert srv.publish(cid, data).text == "OK\n"
        deadline = time.monotonic() + 30
        while not srv.api("exists", cid=cid).text.startswith("PRESENT:"):
            assert time.monotonic() < deadline, srv.log()[-3000:]
            time.sleep(0.05)
        time.sleep(1.0)  # several tries to record it, all failing
        assert srv.status(cid)["state"] == "publishing"  # live, but not recorded yet
        assert len(events(srv, "publishing waits for the storage")) == 1
        disk.write_text("")
        doc = srv.wait_state(cid, ("published",), timeout=10)
        # As the replayed write recorded it: the tree's root, c.txt, .publisher and the catalog marker.
        assert doc["files"] == 4
        assert Repository(srv.storage(REPO)).manifest().revision == 1  # published once, not again
    finally:
        srv.close()
