"""``rcds wait`` in a job: through a mount, over HTTP without one, and timing out with a useful error."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import client_env, dead_server, rcds, rcds_json
from server import REPOS, RcdsServer, make_tarball


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcdsServer]:
    srv = RcdsServer(tmp_path_factory.mktemp("srv")).start()
    yield srv
    srv.close()


def http_env(server: RcdsServer, home: Path, extra: str = "", **env: str) -> dict[str, str]:
    """A worker node without a mount: reads the repositories from the server, trusting their keys."""
    keys = ", ".join(f'"{server.storage(r) / ".rcds" / "keys"}"' for r in REPOS)
    return client_env(home, f'servers = ["{server.url}"]\nkeys = [{keys}]\n{extra}', **env)


def publish(server: RcdsServer, cid: str, files: dict[str, bytes | str] | None = None) -> str:
    assert server.publish(cid, make_tarball(files or {"run.py": f"print('{cid}')\n"})).text == "OK\n"
    doc = server.wait_state(cid)
    assert doc["state"] == "published", doc
    return str(doc["path"])


def test_wait_over_http_sees_a_cid_published_while_it_waits(server: RcdsServer, tmp_path: Path) -> None:
    env = http_env(server, tmp_path / "home")
    cid = "wait/while-waiting"
    args = ["wait", cid, "--mode", "http", "--timeout", "60", "--max-interval", "1", "--json"]
    waiter = subprocess.Popen(
        [sys.executable, "-m", "rcds.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    time.sleep(1.0)
    assert waiter.poll() is None  # still waiting: the CID is not there yet
    path = publish(server, cid)
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    doc = json.loads(out)
    assert doc["path"] == path and doc["repository"] == path.split("/")[2]
    assert doc["directory"] == ""  # no mount here: nothing local to point at
    assert doc["looks"] >= 2
    assert doc["env"]["RCDS_PATH"] == path and doc["env"]["RCDS_CID"] == cid


def test_wait_times_out_naming_each_repository_and_why(server: RcdsServer, tmp_path: Path) -> None:
    publish(server, "wait/something-else")
    env = http_env(server, tmp_path / "home")
    started = time.monotonic()
    p = rcds(
        "wait", "wait/never-published", "--mode", "http", "--timeout", "2", "--max-interval", "0.5", env=env
    )
    assert p.returncode == 3, p.stderr
    assert time.monotonic() - started < 30
    assert "wait/never-published did not appear within 2 s" in p.stderr
    for repo in REPOS:
        assert f"{repo} via {server.url}/cvmfs/{repo}: not in revision" in p.stderr


def test_an_unreachable_stratum_is_reported_at_the_timeout(server: RcdsServer, tmp_path: Path) -> None:
    dead = dead_server()
    env = http_env(
        server, tmp_path / "home", f'stratum_urls = ["{dead}/cvmfs/@fqrn@"]\nconnect_timeout = 1\n'
    )
    p = rcds("wait", "wait/x", "--mode", "http", "--timeout", "1", env=env)
    assert p.returncode == 3
    assert f"via {dead}/cvmfs/{REPOS[0]}: cannot fetch manifest" in p.stderr


def test_a_missing_master_key_is_an_error_not_a_wait(server: RcdsServer, tmp_path: Path) -> None:
    env = client_env(tmp_path / "home", f'servers = ["{server.url}"]\nkeys = ["{tmp_path}"]\n')
    started = time.monotonic()
    p = rcds("wait", "wait/x", "--mode", "http", "--timeout", "30", env=env)
    assert p.returncode == 1 and "no master public key for" in p.stderr
    assert time.monotonic() - started < 20  # at once: waiting cannot fix a configuration


def test_wait_through_a_mount_links_and_writes_the_environment(server: RcdsServer, tmp_path: Path) -> None:
    mount = tmp_path / "cvmfs"
    for repo in REPOS:
        (mount / repo / "sw").mkdir(parents=True)
    cid = "mount/abc"
    target = mount / REPOS[1] / "sw" / cid

    def appear() -> None:  # as the CVMFS client shows a new revision after its TTL
        time.sleep(1.5)
        target.mkdir(parents=True)

    threading.Thread(target=appear, daemon=True).start()
    env = client_env(tmp_path / "home", f'servers = ["{server.url}"]\nmount_root = "{mount}"\n')
    link = tmp_path / "job" / "input" / "code"
    env_file = tmp_path / "job" / "rcds.env"
    p = rcds(
        "wait",
        cid,
        "--timeout",
        "30",
        "--link",
        link,
        "--env-file",
        env_file,
        "--max-interval",
        "0.5",
        env=env,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(target)
    assert link.is_symlink() and link.resolve() == target.resolve()
    text = env_file.read_text()
    assert f"export INPUT_TAR_DIR_LOCAL={target}\n" in text
    assert f"export RCDS_PATH=/cvmfs/{REPOS[1]}/sw/{cid}\n" in text
    # the same wrapper run again (a retried job) replaces its own symlink
    p = rcds("wait", f"/cvmfs/{REPOS[1]}/sw/{cid}", "--link", link, env=env)
    assert p.returncode == 0, p.stderr
    link.unlink()
    link.mkdir()
    p = rcds("wait", cid, "--link", link, env=env)
    assert p.returncode == 1 and "not a symlink" in p.stderr


def test_a_path_names_its_repository_and_a_bad_one_is_refused(server: RcdsServer, tmp_path: Path) -> None:
    path = publish(server, "wait/by-path")
    env = http_env(server, tmp_path / "home")
    doc = rcds_json("wait", path, "--mode", "http", "--timeout", "10", env=env)
    assert doc["path"] == path
    p = rcds("wait", "/cvmfs/x.example/other/c/d", "--timeout", "1", env=env)
    assert p.returncode == 1 and "is not a /cvmfs/<repository>/sw/<cid> path" in p.stderr
    p = rcds("wait", "bad cid!", "--timeout", "1", env=env)
    assert p.returncode == 1 and "bad CID" in p.stderr


def test_touch_refreshes_the_last_use_time(server: RcdsServer, tmp_path: Path) -> None:
    cid = "wait/touched"
    publish(server, cid)
    before = server.status(cid).get("last_used")
    env = http_env(server, tmp_path / "home")
    rcds_json("wait", cid, "--mode", "http", "--touch", "--timeout", "10", env=env)
    deadline = time.monotonic() + 10
    while server.status(cid).get("last_used") == before:
        assert time.monotonic() < deadline, "last_used never changed"
        time.sleep(0.1)


def test_link_without_a_mount_says_to_use_get(server: RcdsServer, tmp_path: Path) -> None:
    publish(server, "wait/no-mount")
    env = http_env(server, tmp_path / "home")
    p = rcds("wait", "wait/no-mount", "--mode", "http", "--link", tmp_path / "l", "--timeout", "10", env=env)
    assert p.returncode == 1 and "--get DIR" in p.stderr


def test_repositories_come_from_the_servers_config_when_not_configured(
    server: RcdsServer, tmp_path: Path
) -> None:
    path = publish(server, "wait/from-config")
    env = http_env(server, tmp_path / "home")
    assert rcds_json("wait", "wait/from-config", "--mode", "http", env=env)["path"] == path
    other = next(r for r in REPOS if r != path.split("/")[2])
    env = http_env(server, tmp_path / "home2", f'repositories = ["{other}"]\n')
    p = rcds("wait", "wait/from-config", "--mode", "http", "--timeout", "1", env=env)
    assert p.returncode == 3  # configured to look in the other repository only
