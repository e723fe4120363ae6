"""``rcds shrinkwrap`` over HTTP from a real ``rcds serve`` (a stratum 0), with failover from a dead
server first in the list, CIDs chosen on the command line, and an incremental second run that adds a
CID and leaves the first untouched; and through a real squid with the first proxy down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import dead_server
from server import RcdsServer, free_port, make_tarball
from squid import SquidProxy, require_squid

CID1 = "hpc/" + "1" * 64
CID2 = "hpc/" + "2" * 64


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcdsServer]:
    srv = RcdsServer(tmp_path_factory.mktemp("srv"), repos=("user1.rcds.test",)).start()
    try:
        for cid, files in (
            (CID1, {"run.sh": "#!/bin/sh\necho one\n", "lib/": "", "lib/data.txt": "data\n" * 1000}),
            (CID2, {"run.sh": "#!/bin/sh\necho two\n", "doc.txt": "doc\n"}),
        ):
            assert srv.publish(cid, make_tarball(files)).text == "OK\n"
            assert srv.wait_state(cid)["state"] == "published"
        yield srv
    finally:
        srv.close()


def shrinkwrap(server: RcdsServer, dest: Path, *args: str, proxy: str = "DIRECT") -> dict[str, object]:
    repo = "user1.rcds.test"
    dead = f"http://127.0.0.1:{free_port()}/cvmfs/{repo}"
    key = server.storage(repo) / ".rcds" / "keys" / f"{repo}.pub"
    cmd = [sys.executable, "-m", "rcds.cli", "shrinkwrap", f"{dead};{server.url}/cvmfs/{repo}", "--key", str(key),
           "--fqrn", repo, "--dialect", "2.12", "--dest", str(dest), "--proxy", proxy, "--json", *args]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, object] = json.loads(proc.stdout)
    return doc


def test_export_over_http_with_failover_then_add_a_cid(server: RcdsServer, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    first = shrinkwrap(server, dest, "--cid", CID1)
    root = dest / "user1.rcds.test" / "sw"
    assert (root / CID1 / "run.sh").read_text() == "#!/bin/sh\necho one\n"
    assert os.access(root / CID1 / "run.sh", os.X_OK)
    assert (root / CID1 / "lib/data.txt").read_text() == "data\n" * 1000
    assert (root / CID1 / ".publisher").read_text() == "localhost\n"
    assert not (root / CID2).exists()
    assert first["fetched_files"] and first["downloaded_bytes"]
    ino = os.lstat(root / CID1 / "lib/data.txt").st_ino
    second = shrinkwrap(server, dest, "--cid", CID1, "--cid", CID2)
    assert (root / CID2 / "doc.txt").read_text() == "doc\n"
    assert os.lstat(root / CID1 / "lib/data.txt").st_ino == ino
    assert second["unchanged_files"] == first["files"]
    assert second["placed_files"] == second["files"] - first["files"]
    src_info = (dest / ".provenance" / "user1.rcds.test" / "src.info").read_text()
    assert f"{server.url}/cvmfs/user1.rcds.test" in src_info
    third = shrinkwrap(server, dest, "--cid", CID2, "--gc")
    assert not (root / CID1).exists() and (root / CID2 / "doc.txt").exists()
    assert third["removed_entries"] == 1


def test_export_through_a_real_squid_with_the_first_proxy_down(server: RcdsServer, tmp_path: Path) -> None:
    require_squid()
    with SquidProxy() as squid:
        doc = shrinkwrap(server, tmp_path / "a", "--cid", CID1, proxy=f"{dead_server()};{squid.url}")
        assert doc["fetched_files"]
        shrinkwrap(server, tmp_path / "b", "--cid", CID1, proxy=f"{dead_server()};{squid.url}")
        data = [e for e in squid.entries() if "/data/" in e.url]
    for d in ("a", "b"):
        assert (tmp_path / d / "user1.rcds.test/sw" / CID1 / "lib/data.txt").read_text() == "data\n" * 1000
    hits = {e.url for e in data if e.hit}
    assert hits and hits == {e.url for e in data if not e.hit}  # every object: one miss, then a hit
