"""``rcds push`` (the real command) into a real ``rcds serve``'s gateway: only missing objects travel."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pki import TokenIssuer
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import Repository
from server import RcdsServer

REPO = "push.rcds.test"
ISSUER = "https://tokens.rcds.test"
AUDIENCE = "https://push.rcds.test"


@pytest.fixture(scope="module")
def issuer() -> TokenIssuer:
    return TokenIssuer(ISSUER, audience=AUDIENCE, subject="carol-7")


@pytest.fixture
def server(tmp_path: Path, issuer: TokenIssuer) -> Iterator[RcdsServer]:
    keyfile = tmp_path / "gateway.keys"
    keyfile.write_text("plain_text alice alice-secret\nplain_text bob bob-secret\n")
    for who in ("alice", "bob"):
        (tmp_path / f"{who}.key").write_text(f"plain_text {who} {who}-secret\n")
    config = f"""
[auth]
gridmapfile = ""
audiences = ["{AUDIENCE}"]
[auth.issuers]
"{ISSUER}" = "{issuer.write_jwks(tmp_path / "issuer.jwks")}"
[gateway]
key_files = ["{keyfile}"]
[gateway.key_paths]
alice = ["{REPO}/users/alice"]
bob = ["{REPO}/users/bob"]
"""
    srv = RcdsServer(tmp_path, extra_config=config, repos=(REPO,)).start()
    try:
        yield srv
    finally:
        srv.close()


def rcds_push(
    server: RcdsServer, who: str, source: Path, target: str, token: str | None = None, machine: str = ""
) -> subprocess.CompletedProcess[str]:
    """``who``'s key, or with ``token`` no key: the token found by WLCG discovery ($BEARER_TOKEN).
    Another ``machine`` has a home (and push work directories) of its own."""
    home = server.root / f"home-{who}{machine}"
    credentials = ["--key", str(server.root / f"{who}.key")] if token is None else []
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEARER_TOKEN")}
    return subprocess.run(
        [sys.executable, "-m", "rcds.cli", "push", str(source), target, "--server", server.url,
         *credentials, "--json"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**env, "XDG_CACHE_HOME": str(home), "XDG_RUNTIME_DIR": str(home),
             **({"BEARER_TOKEN": token} if token else {})},
    )  # fmt: skip


def pushed(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def read(server: RcdsServer, path: str) -> bytes:
    key = Repository(server.storage(REPO)).public_key_path
    with RepositoryReader.open(f"{server.url}/cvmfs/{REPO}", key) as reader:
        return reader.read(path)


def test_push_twice_sends_only_the_changed_file(server: RcdsServer, tmp_path: Path) -> None:
    tree = tmp_path / "analysis"
    (tree / "lib").mkdir(parents=True)
    big = os.urandom(300_000)  # incompressible: its object is about this size
    (tree / "lib" / "big.bin").write_bytes(big)
    (tree / "run.sh").write_text("#!/bin/sh\necho one\n")
    first = pushed(rcds_push(server, "alice", tree, f"{REPO}:/users/alice/analysis"))
    assert first["bytes_sent"] > len(big)
    assert read(server, "/users/alice/analysis/lib/big.bin") == big

    (tree / "run.sh").write_text("#!/bin/sh\necho two\n")
    second = pushed(rcds_push(server, "alice", tree, f"{REPO}:/users/alice/analysis"))
    # The changed script's object and the new catalog; not the 300 kB file again.
    assert second["objects_sent"] == 2, second
    assert second["files_unchanged"] == 1, second  # big.bin was not even read again
    assert second["bytes_sent"] < 20_000, second
    assert second["revision"] == first["revision"] + 1
    assert read(server, "/users/alice/analysis/run.sh") == b"#!/bin/sh\necho two\n"
    assert read(server, "/users/alice/analysis/lib/big.bin") == big
    check = subprocess.run([sys.executable, "-m", "rcds.cli", "repo", "check", str(server.storage(REPO))],
                           capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


def test_push_of_a_tarball(server: RcdsServer, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("pkg/README")
        data = b"from a tarball\n"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    tarball = tmp_path / "pkg.tar.gz"
    tarball.write_bytes(buf.getvalue())
    pushed(rcds_push(server, "bob", tarball, f"{REPO}:/users/bob"))
    assert read(server, "/users/bob/pkg/README") == b"from a tarball\n"


def test_push_into_another_users_path_is_refused(server: RcdsServer, tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "f").write_text("x\n")
    before = Repository(server.storage(REPO)).manifest().revision
    proc = rcds_push(server, "bob", tree, f"{REPO}:/users/alice")
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "may not lease" in proc.stderr
    assert Repository(server.storage(REPO)).manifest().revision == before


def test_push_with_a_token_goes_where_its_scope_says(
    server: RcdsServer, tmp_path: Path, issuer: TokenIssuer
) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "f").write_text("carol's\n")
    token = issuer.make_token({"scope": "storage.create:/users/carol"})
    pushed(rcds_push(server, "carol", tree, f"{REPO}:/users/carol/work", token=token))
    assert read(server, "/users/carol/work/f") == b"carol's\n"
    refused = rcds_push(server, "carol", tree, f"{REPO}:/users/alice", token=token)
    assert refused.returncode == 5 and "storage.create" in refused.stderr, refused.stderr


def test_an_interrupted_push_resumes(server: RcdsServer, tmp_path: Path) -> None:
    """Stopped after its first pack: the next run keeps the lease and sends only what did not arrive."""
    from rcds.client.push import GatewayKey, push

    tree = tmp_path / "many"
    tree.mkdir()
    for i in range(6):
        (tree / f"f{i}.bin").write_bytes(os.urandom(50_000))
    key = GatewayKey.load(server.root / "alice.key")
    work = tmp_path / "work"

    def stop_after_first_pack(line: str) -> None:
        if line.startswith("sent "):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        push(
            tree, f"{REPO}:/users/alice/many", server.url, key, work, stop_after_first_pack, pack_bytes=60_000
        )
    (lease_file,) = work.glob("*/lease")
    token = lease_file.read_text().strip()
    lines: list[str] = []
    result = push(tree, f"{REPO}:/users/alice/many", server.url, key, work, lines.append, pack_bytes=60_000)
    assert 0 < result.objects_sent < result.objects, result
    assert result.bytes_sent < 6 * 50_000
    assert not lease_file.exists()
    assert f"reusing lease {token[:8]}" in "\n".join(lines), lines
    for i in range(6):
        assert read(server, f"/users/alice/many/f{i}.bin") == (tree / f"f{i}.bin").read_bytes()


def local_tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry below ``root``: (kind, permission bits, mtime, content or symlink target)."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", int(st.st_mtime), os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777, int(st.st_mtime))
            else:
                out[rel] = ("file", st.st_mode & 0o7777, int(st.st_mtime), p.read_bytes())
    return out


def server_tree(server: RcdsServer, top: str) -> dict[str, tuple[Any, ...]]:
    """The same, read back from the server's published revision (the nested catalog's marker left out)."""
    key = Repository(server.storage(REPO)).public_key_path
    out: dict[str, tuple[Any, ...]] = {}
    with RepositoryReader.open(f"{server.url}/cvmfs/{REPO}", key) as reader:
        for entry in reader.walk(top):
            d = entry.dirent
            rel = entry.path.removeprefix(top).lstrip("/")
            if not rel or rel == ".cvmfscatalog":
                continue
            if d.is_symlink:
                out[rel] = ("link", d.mtime, d.symlink)
            elif d.is_dir:
                out[rel] = ("dir", d.mode & 0o7777, d.mtime)
            else:
                out[rel] = ("file", d.mode & 0o7777, d.mtime, reader.read(entry.path))
    return out


def test_a_repush_shows_every_kind_of_change(server: RcdsServer, tmp_path: Path) -> None:
    """Content (same size, mtime put back), mode, mtime alone, a symlink's target, deletions, a new file
    and a new directory: the server's tree after the re-push is the local tree, field by field."""
    tree = tmp_path / "t"
    for d in ("src", "doc", "old", "keep/deep"):
        (tree / d).mkdir(parents=True)
    (tree / "src" / "a.c").write_text("int a = 1;\n")
    (tree / "src" / "run.sh").write_text("#!/bin/sh\n")
    (tree / "doc" / "notes.txt").write_text("notes\n")
    (tree / "doc" / "gone.txt").write_text("to be deleted\n")
    (tree / "old" / "x").write_text("old dir\n")
    (tree / "keep" / "deep" / "same.txt").write_text("unchanged\n")
    (tree / "current").symlink_to("src")
    target = f"{REPO}:/users/alice/t"
    pushed(rcds_push(server, "alice", tree, target))
    assert server_tree(server, "/users/alice/t") == local_tree(tree)

    a = tree / "src" / "a.c"
    before = a.stat()
    a.write_text("int a = 2;\n")  # same size; mtime put back: only ctime tells the stat cache
    os.utime(a, ns=(before.st_atime_ns, before.st_mtime_ns))
    (tree / "src" / "run.sh").chmod(0o755)
    os.utime(tree / "doc" / "notes.txt", (1_600_000_000, 1_600_000_000))
    (tree / "current").unlink()
    (tree / "current").symlink_to("doc")
    (tree / "doc" / "gone.txt").unlink()
    (tree / "old" / "x").unlink()
    (tree / "old").rmdir()
    (tree / "src" / "new.h").write_text("#define NEW 1\n")
    (tree / "added" / "inner").mkdir(parents=True)
    (tree / "added" / "inner" / "y.txt").write_text("in a new directory\n")
    again = pushed(rcds_push(server, "alice", tree, target))
    assert again["files_unchanged"] == 1, again  # keep/deep/same.txt; notes.txt's mtime changed
    assert server_tree(server, "/users/alice/t") == local_tree(tree)
    check = subprocess.run([sys.executable, "-m", "rcds.cli", "repo", "check", str(server.storage(REPO))],
                           capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_repush_resends_an_object_the_server_lost_since_the_last_push(
    server: RcdsServer, tmp_path: Path
) -> None:
    """The re-push does not ask about objects the server had at the last push; if one went (the path
    replaced from another machine, then garbage collected), the server refuses the commit and the push
    asks about every object, sends the lost one and commits."""
    from rcds.cvmfs.hashes import ContentHash, Suffix

    tree = tmp_path / "t"
    tree.mkdir()
    kept = os.urandom(20_000)
    (tree / "kept.bin").write_bytes(kept)
    (tree / "edited.txt").write_text("one\n")
    target = f"{REPO}:/users/alice/t"
    pushed(rcds_push(server, "alice", tree, target))
    store = Repository(server.storage(REPO)).store
    key = Repository(server.storage(REPO)).public_key_path
    with RepositoryReader.open(f"{server.url}/cvmfs/{REPO}", key) as reader:
        digest = reader.stat("/users/alice/t/kept.bin").hash
    assert isinstance(digest, ContentHash)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "other.txt").write_text("from the laptop\n")
    pushed(rcds_push(server, "alice", elsewhere, target, machine="-laptop"))
    store.delete(digest.object_name(Suffix.NONE))  # as garbage collection would: no revision names it now

    (tree / "edited.txt").write_text("two\n")
    again = pushed(rcds_push(server, "alice", tree, target))
    assert again["objects_sent"] == 3, again  # the edited file, the catalog, and kept.bin again
    assert read(server, "/users/alice/t/kept.bin") == kept
    assert read(server, "/users/alice/t/edited.txt") == b"two\n"
    assert server_tree(server, "/users/alice/t") == local_tree(tree)  # other.txt is gone
    check = subprocess.run([sys.executable, "-m", "rcds.cli", "repo", "check", str(server.storage(REPO))],
                           capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
