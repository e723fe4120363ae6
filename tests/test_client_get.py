"""``rcds get`` and ``rcds wait --get`` end to end: publish with the client, read back over HTTP, no FUSE."""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import client_env, dead_server, rcds, rcds_json
from server import REPOS, RcdsServer
from squid import SquidProxy, require_squid


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcdsServer]:
    srv = RcdsServer(tmp_path_factory.mktemp("srv")).start()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def squid() -> Iterator[SquidProxy]:
    require_squid()
    with SquidProxy() as proxy:
        yield proxy


def node_env(server: RcdsServer, home: Path, extra: str = "", **env: str) -> dict[str, str]:
    keys = ", ".join(f'"{server.storage(r) / ".rcds" / "keys"}"' for r in REPOS)
    return client_env(home, f'servers = ["{server.url}"]\ngroup = "hpc"\nkeys = [{keys}]\n{extra}', **env)


def write_source(root: Path) -> Path:
    """A code tree whose modes are already what a reproducible tarball keeps (0644/0755)."""
    files = {
        "run.sh": (b"#!/bin/sh\nexec python3 ana.py\n", 0o755),
        "ana.py": (b"print('analysis')\n" * 500, 0o644),
        "lib/big.dat": (os.urandom(3 << 20) + bytes(2 << 20), 0o644),  # large: chunked by the server
        "lib/empty": (b"", 0o644),
        "conf/\u00e9t\u00e9 settings.cfg": (b"x = 1\n", 0o644),
    }
    for name, (data, mode) in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(mode)
    (root / "empty-dir").mkdir()
    (root / "current").symlink_to("lib")
    (root / "dangling").symlink_to("/nonexistent/target")
    return root


def tree(root: Path) -> dict[str, tuple[str, int, bytes | str | None]]:
    """Everything that must survive the round trip: type, permission bits, contents or link target.

    ``.publisher`` (who published it, added by the server, as a mount shows it too) is left out.
    """
    out: dict[str, tuple[str, int, bytes | str | None]] = {}
    for p in sorted(root.rglob("*")):
        if p.name == ".publisher" and p.parent == root:
            continue
        st = p.lstat()
        rel = str(p.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", 0, os.readlink(p))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode), None)
        else:
            out[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


@pytest.fixture(scope="module")
def published(server: RcdsServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    d = tmp_path_factory.mktemp("pub")
    source = write_source(d / "code")
    doc = rcds_json("publish", source, "--wait", env=node_env(server, d / "home"))
    assert doc["state"] == "published"
    return str(doc["cid"]), source


def test_get_gives_the_source_tree_and_a_second_get_comes_from_the_node_cache(
    server: RcdsServer, published: tuple[str, Path], tmp_path: Path
) -> None:
    cid, source = published
    env = node_env(server, tmp_path / "home")
    cache = tmp_path / "node-cache"
    first = rcds_json("get", cid, tmp_path / "job1" / "code", "--cache", cache, env=env)
    assert tree(tmp_path / "job1" / "code") == tree(source)
    assert first["downloaded_bytes"] > 0 and first["cid"] == cid
    assert (tmp_path / "job1" / "code" / ".publisher").read_text() == "localhost\n"

    second = rcds_json("get", cid, tmp_path / "job2" / "code", "--cache", cache, env=env)
    assert tree(tmp_path / "job2" / "code") == tree(source)
    assert second["downloaded_bytes"] == 0
    assert second["linked_files"] == second["files"] > 0
    a, b = (tmp_path / f"job{i}" / "code" / "ana.py" for i in (1, 2))
    assert a.stat().st_ino == b.stat().st_ino  # one copy of the data on the node


def test_get_refuses_an_existing_destination_and_an_unknown_cid(server: RcdsServer, tmp_path: Path) -> None:
    env = node_env(server, tmp_path / "home")
    (tmp_path / "taken").mkdir()
    p = rcds("get", "hpc/x", tmp_path / "taken", env=env)
    assert p.returncode == 1 and "already exists" in p.stderr
    p = rcds("get", "hpc/never-published", tmp_path / "new", env=env)
    assert p.returncode == 1 and "is not published" in p.stderr
    assert not (tmp_path / "new").exists()


def test_wait_then_get_without_a_mount_links_the_copy(
    server: RcdsServer, published: tuple[str, Path], tmp_path: Path
) -> None:
    cid, source = published
    env = node_env(server, tmp_path / "home")
    link, copy = tmp_path / "input" / "code", tmp_path / "scratch" / "code"
    doc = rcds_json("wait", cid, "--mode", "http", "--get", copy, "--link", link, "--timeout", "30", env=env)
    assert doc["directory"] == str(copy.resolve())
    assert link.resolve() == copy.resolve()
    assert doc["env"]["INPUT_TAR_DIR_LOCAL"] == str(copy.resolve())
    assert tree(link) == tree(source)


def test_get_through_a_real_squid_with_the_first_proxy_down(
    server: RcdsServer, published: tuple[str, Path], tmp_path: Path, squid: SquidProxy
) -> None:
    cid, source = published
    down = dead_server()
    env = node_env(server, tmp_path / "home", f'proxies = "{down};{squid.url}"\nconnect_timeout = 2\n')
    doc = rcds_json("get", cid, tmp_path / "a", "--cache", tmp_path / "cache-a", env=env)
    assert tree(tmp_path / "a") == tree(source) and doc["downloaded_bytes"] > 0
    # Another node (its own cache) behind the same squid: the objects come from squid's cache.
    rcds_json("get", cid, tmp_path / "b", "--cache", tmp_path / "cache-b", env=env)
    assert tree(tmp_path / "b") == tree(source)
    data = [e for e in squid.entries() if e.url.startswith(f"{server.url}/cvmfs/") and "/data/" in e.url]
    hits = {e.url for e in data if e.hit}
    assert hits and hits == {e.url for e in data if not e.hit}  # every object: one miss, then a hit


def test_cache_prune_removes_only_what_no_job_uses(
    server: RcdsServer, published: tuple[str, Path], tmp_path: Path
) -> None:
    from rcds.client.cache import prune_cache

    cid, source = published
    env = node_env(server, tmp_path / "home")
    cache = tmp_path / "node-cache"
    rcds_json("get", cid, tmp_path / "old-job", "--cache", cache, env=env)
    entries = [p for p in (cache / "files").rglob("*") if p.is_file()]
    assert entries
    # While the job's directory exists every entry is in use, however old.
    report = prune_cache(cache, max_age=0, now=time.time() + 30 * 86400)
    assert (report.entries_removed, report.entries_in_use) == (0, len(entries))

    shutil.rmtree(tmp_path / "old-job")  # the job ended
    dry = rcds_json("cache", "prune", cache, "--max-size", "0", "--dry-run", env=env)
    assert dry["entries_removed"] == len(entries) and all(p.exists() for p in entries)
    # Young unused entries stay under the age rule...
    assert rcds_json("cache", "prune", cache, env=env)["entries_removed"] == 0
    # ...and go once old enough (here: the clock moved on).
    report = prune_cache(cache, now=time.time() + 8 * 86400)
    assert report.entries_removed == len(entries) and report.bytes_freed > 0
    assert not any(p.exists() for p in entries)
    # The next job downloads again, and gets the same tree.
    again = rcds_json("get", cid, tmp_path / "new-job", "--cache", cache, env=env)
    assert again["downloaded_bytes"] > 0 and tree(tmp_path / "new-job") == tree(source)
    p = rcds("cache", "prune", tmp_path, env=env)
    assert p.returncode == 1 and "not an rcds node cache" in p.stderr
