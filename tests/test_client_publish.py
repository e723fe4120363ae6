"""``rcds publish`` against real servers: reproducible CIDs, skipped re-uploads, failover, errors."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from client import client_env, dead_server, hanging_server, rcds, rcds_json
from rcds.client.errors import ServersUnavailable
from rcds.client.pubapi import PubApiClient
from rcds.client.tarball import write_tar
from rcds.cvmfs.reader import RepositoryReader
from server import RcdsServer, make_tarball


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcdsServer]:
    srv = RcdsServer(tmp_path_factory.mktemp("srv")).start()
    yield srv
    srv.close()


def write_code(root: Path, reverse: bool = False, mtime: int = 1_600_000_000) -> Path:
    """A small analysis checkout. ``reverse`` creates the entries in the opposite order (other readdir order)."""
    files = {
        "README.md": b"# analysis\n",
        "bin/run.sh": b"#!/bin/sh\necho run\n",
        "src/ana/__init__.py": b"",
        "src/ana/fit.py": b"import math\n" * 200,
        "data/calib.bin": bytes(range(256)) * 64,
        "docs/\u00fcber l\u00e4nge.txt": b"unicode and spaces\n",
        ".git/HEAD": b"ref: refs/heads/main\n",
        "deep/" + "d" * 60 + "/" + "e" * 60 + "/long-name.txt": b"beyond ustar's 100 characters\n",
    }
    items = list(files.items())
    for name, data in reversed(items) if reverse else items:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "bin/run.sh").chmod(0o755 if not reverse else 0o700)  # any execute bit means 0755
    (root / "data/calib.bin").chmod(0o644 if not reverse else 0o600)
    (root / "empty").mkdir()
    (root / "latest").symlink_to("src/ana")
    os.link(root / "README.md", root / "README.copy")
    for p in [root, *root.rglob("*")]:
        os.utime(p, (mtime, mtime), follow_symlinks=False)
    return root


def test_a_directory_gives_the_same_tar_bytes_whatever_the_checkout(tmp_path: Path) -> None:
    a = write_code(tmp_path / "a")
    b = write_code(tmp_path / "b", reverse=True, mtime=1_700_000_123)
    if os.geteuid() == 0:  # another owner, as another user's checkout would have
        for p in [b, *b.rglob("*")]:
            os.lchown(p, 4321, 4321)
    out_a, out_b = io.BytesIO(), io.BytesIO()
    sa, sb = write_tar(a, out_a), write_tar(b, out_b)
    assert out_a.getvalue() == out_b.getvalue()
    assert sa.sha256 == sb.sha256 == hashlib.sha256(out_a.getvalue()).hexdigest()
    assert sa.excluded == [".git"]
    with tarfile.open(fileobj=io.BytesIO(out_a.getvalue())) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert not any(n.startswith(".git") for n in members)
    assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members.values()} == {(0, 0, "", "", 1)}
    assert members["bin/run.sh"].mode == 0o755 and members["data/calib.bin"].mode == 0o644
    assert members["latest"].issym() and members["latest"].linkname == "src/ana"
    # hard links: the first in member order holds the data, the others link to it
    assert members["README.copy"].isreg() and members["README.md"].islnk()
    assert members["README.md"].linkname == "README.copy"
    # parents before children, each directory sorted
    names = list(members)
    assert names.index("src") < names.index("src/ana") < names.index("src/ana/fit.py")


def test_publish_twice_from_two_checkouts_uploads_once(server: RcdsServer, tmp_path: Path) -> None:
    env = client_env(tmp_path / "home", f'servers = ["{server.url}"]\ngroup = "alice"\n')
    first = rcds_json("publish", write_code(tmp_path / "a"), "--wait", env=env)
    assert first["state"] == "published" and first["uploaded_bytes"] > 0
    cid = first["cid"]
    assert cid.startswith("alice/") and len(cid) == len("alice/") + 64
    repo = first["path"].split("/")[2]
    assert first["path"] == f"/cvmfs/{repo}/sw/{cid}"

    other = write_code(tmp_path / "b", reverse=True, mtime=1_234_567_890)
    if os.geteuid() == 0:  # another user's checkout
        for p in [other, *other.rglob("*")]:
            os.lchown(p, 4321, 4321)
    second = rcds_json("publish", other, env=env)
    assert (second["cid"], second["state"], second["uploaded_bytes"]) == (cid, "present", 0)
    assert second["path"] == first["path"]
    assert server.status(cid).get("last_used") is not None  # `update` refreshed it

    key = server.storage(repo) / ".rcds" / "keys" / f"{repo}.pub"
    with RepositoryReader.open(f"{server.url}/cvmfs/{repo}", key, cache_dir=tmp_path / "c") as reader:
        base = f"sw/{cid}"
        assert reader.read(f"{base}/src/ana/fit.py") == b"import math\n" * 200
        assert reader.stat(f"{base}/bin/run.sh").mode & 0o777 == 0o755
        assert reader.stat(f"{base}/latest").symlink == "src/ana"
        assert reader.lookup(f"{base}/.git") is None
        assert reader.lookup(f"{base}/empty") is not None


def test_plain_output_is_the_cid_and_the_path(server: RcdsServer, tmp_path: Path) -> None:
    env = client_env(tmp_path / "home", RCDS_GROUP="bob", RCDS_SERVERS=server.url)
    code = write_code(tmp_path / "code")
    (code / "extra.txt").write_text("plain output\n")
    p = rcds("publish", code, "--wait", "--quiet", env=env)
    assert p.returncode == 0, p.stderr
    cid, path = p.stdout.split()
    assert cid.startswith("bob/")
    assert path.endswith(f"/sw/{cid}")
    again = rcds("publish", code, "--quiet", env=env)
    assert again.stdout.split() == [cid, path]
    assert "already published" in again.stderr


def test_dry_run_needs_no_server_and_matches_the_published_cid(server: RcdsServer, tmp_path: Path) -> None:
    env = client_env(tmp_path / "home", 'group = "carol"\n')
    code = write_code(tmp_path / "code")
    dry = rcds_json("publish", code, "--dry-run", env=env)
    assert dry["state"] == "dry-run"
    done = rcds_json("publish", code, "--server", server.url, env=env)
    assert done["cid"] == dry["cid"]


def test_excludes_and_the_default_exclusion_of_git(server: RcdsServer, tmp_path: Path) -> None:
    env = client_env(tmp_path / "home", f'servers = ["{server.url}"]\ngroup = "dave"\n')
    code = write_code(tmp_path / "code")
    (code / "big.log").write_text("noise\n")
    base = rcds_json("publish", code, "--dry-run", env=env)["cid"]
    excluded = rcds_json("publish", code, "--dry-run", "--exclude", "*.log", env=env)["cid"]
    (code / "big.log").unlink()
    assert excluded == rcds_json("publish", code, "--dry-run", env=env)["cid"] != base
    with_git = rcds_json("publish", code, "--dry-run", "--no-default-excludes", env=env)["cid"]
    assert with_git != excluded


def test_a_tarball_is_published_as_given_under_its_sha256(server: RcdsServer, tmp_path: Path) -> None:
    data = make_tarball({"job.py": "print('tar')\n", "lib/": b""})
    tarball = tmp_path / "code.tar.gz"
    tarball.write_bytes(data)
    env = client_env(tmp_path / "home", f'servers = ["{server.url}"]\ngroup = "erin"\n')
    doc = rcds_json("publish", tarball, "--wait", env=env)
    assert doc["cid"] == f"erin/{hashlib.sha256(data).hexdigest()}"
    assert doc["uploaded_bytes"] == len(data) and doc["state"] == "published"


def test_the_upload_is_zstd_compressed_and_the_cid_hashes_the_plain_tar(tmp_path: Path) -> None:
    from rcds.client.tarball import write_compressed_tar

    code = write_code(tmp_path / "code")
    out = io.BytesIO()
    summary = write_compressed_tar(code, out)
    plain = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(out.getvalue())).read()
    assert hashlib.sha256(plain).hexdigest() == summary.sha256
    assert len(out.getvalue()) < len(plain)


def test_failover_past_a_dead_and_a_hung_server(server: RcdsServer, tmp_path: Path) -> None:
    with hanging_server() as hung:
        api = PubApiClient([dead_server(), hung, server.url], connect_timeout=1, read_timeout=1, retries=1)
        api.servers = [api.servers[i] for i in sorted(range(3), key=lambda i: api.servers[i] == server.url)]
        started = time.monotonic()
        assert api.ping() == server.url
        assert time.monotonic() - started < 10  # the hung server cost one read timeout, not forever
        assert api.last_server == server.url  # and the good one is used first from now on
        api.close()
        # The command line, servers in random order: always succeeds, whichever it tries first.
        env = client_env(
            tmp_path / "home",
            f'servers = ["{dead_server()}", "{hung}", "{server.url}"]\ngroup = "frank"\n'
            "connect_timeout = 1\nread_timeout = 1\nretries = 1\n",
        )
        code = write_code(tmp_path / "code")
        (code / "failover.txt").write_text("x\n")
        doc = rcds_json("publish", code, "--wait", env=env)
        assert doc["state"] == "published" and doc["server"] == server.url


def test_every_server_down_is_exit_4_naming_each(tmp_path: Path) -> None:
    with hanging_server() as hung:
        dead = dead_server()
        env = client_env(
            tmp_path / "home",
            f'servers = ["{dead}", "{hung}"]\nconnect_timeout = 1\nread_timeout = 1\nretries = 2\n',
        )
        started = time.monotonic()
        p = rcds("publish", write_code(tmp_path / "code"), env=env)
        elapsed = time.monotonic() - started
    assert p.returncode == 4, p.stderr
    assert "failed on every server" in p.stderr
    assert f"{dead}: ConnectError" in p.stderr and f"{hung}: timed out (ReadTimeout)" in p.stderr
    assert f"{hung}: timed out (ReadTimeout) (2 times)" in p.stderr  # two rounds, with a backoff between
    assert elapsed < 20


def test_servers_unavailable_lists_attempts_in_the_api() -> None:
    api = PubApiClient([dead_server()], retries=2, backoff=0.01)
    with pytest.raises(ServersUnavailable) as info:
        api.exists("a/b")
    assert len(info.value.attempts) == 2
    api.close()


def test_a_bad_cid_is_refused_before_any_upload(server: RcdsServer, tmp_path: Path) -> None:
    env = client_env(tmp_path / "home", f'servers = ["{server.url}"]\n')
    p = rcds("publish", write_code(tmp_path / "code"), "--cid", "../etc", env=env)
    assert p.returncode == 1 and "bad --cid" in p.stderr
    p = rcds("publish", write_code(tmp_path / "c2"), "--group", "bad group", env=env)
    assert p.returncode == 1 and "cannot make a CID" in p.stderr


def test_a_tarball_the_server_rejects_fails_the_wait_with_its_reason(
    server: RcdsServer, tmp_path: Path
) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("/etc/passwd")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(buf.getvalue())
    env = client_env(tmp_path / "home", f'servers = ["{server.url}"]\ngroup = "gina"\n')
    p = rcds("publish", bad, "--wait", env=env)
    assert p.returncode == 5, p.stderr
    assert "could not publish" in p.stderr and "absolute" in p.stderr


def test_no_server_configured_is_a_clear_error(tmp_path: Path) -> None:
    p = rcds("publish", write_code(tmp_path / "code"), env=client_env(tmp_path / "home"))
    assert p.returncode == 1 and "no publish server configured" in p.stderr


def test_a_directory_that_changes_before_the_upload_is_not_published(
    server: RcdsServer, tmp_path: Path
) -> None:
    from rcds.client.errors import ClientError
    from rcds.client.publish import _upload, tarball_digest

    code = write_code(tmp_path / "code")
    digest, _ = tarball_digest(code)  # what the CID was made from
    (code / "README.md").write_text("changed after hashing\n")
    with PubApiClient([server.url]) as api, pytest.raises(ClientError, match="changed while it was being"):
        _upload(api, code, f"hal/{digest}", digest, [".git"], False, None)
    assert server.status(f"hal/{digest}")["state"] == "missing"


def run_on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, bytes]:
    """Run the command line with stdout and stderr on a pseudo-terminal of 120 columns, as a person would."""
    import fcntl
    import pty
    import struct
    import sys
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes the command
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.execve(sys.executable, [sys.executable, "-m", "rcds.cli", *args], env)
    out = b""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        out += data
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out


def test_a_progress_bar_on_a_terminal_and_none_with_quiet(server: RcdsServer, tmp_path: Path) -> None:
    env = client_env(tmp_path / "home", f'servers = ["{server.url}"]\ngroup = "ivy"\n')
    code = tmp_path / "code"
    code.mkdir()
    (code / "blob").write_bytes(os.urandom(8 << 20))
    rc, out = run_on_a_terminal(["publish", str(code)], env)
    assert rc == 0, out
    assert b"upload:" in out and b"B/s" in out and b"8.00M" in out  # name, rate, total size
    (code / "blob").write_bytes(os.urandom(8 << 20))
    rc, out = run_on_a_terminal(["publish", str(code), "--quiet"], env)
    assert rc == 0 and b"upload:" not in out


def test_a_cid_still_being_published_is_not_uploaded_again(server: RcdsServer, tmp_path: Path) -> None:
    env = client_env(tmp_path / "home", f'servers = ["{server.url}"]\ngroup = "jack"\n')
    code = tmp_path / "code"
    code.mkdir()
    for i in range(3000):  # enough files that publishing takes a moment after the upload
        (code / f"f{i}.txt").write_text(f"{i}\n" * 100)
    first = rcds_json("publish", code, env=env)
    second = rcds_json("publish", code, "--wait", env=env)
    assert first["state"] == "queued" and first["uploaded_bytes"] > 0
    # Still queued or publishing (status says so), or already published (exists says so): never a 2nd upload.
    assert second["uploaded_bytes"] == 0 and second["state"] in ("published", "present"), second
    assert second["path"].endswith(first["cid"])
