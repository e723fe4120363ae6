"""The ``rcds repo`` command line, run as a real subprocess (``python -m rcds.cli``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FQRN, File, Symlink, write_tree
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import Repository

SOURCE = {
    "hello.txt": b"hello from the CLI\n",
    "bin": {"run.sh": File(b"#!/bin/sh\nexit 0\n", mode=0o755)},
    "link": Symlink("hello.txt"),
    "blob.bin": bytes(range(256)) * 2000,  # 512000 bytes
}


def rcds(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "rcds.cli", *map(str, args)], capture_output=True, timeout=120, check=False
    )


def ok(*args: str | Path) -> str:
    proc = rcds(*args)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
    return proc.stdout.decode()


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository created and published to with the CLI."""
    base = tmp_path_factory.mktemp("cli")
    out = ok("repo", "create", FQRN, "--storage", base / "storage")
    assert f"created {FQRN}" in out
    assert "revision 0" in out
    out = ok("repo", "add", "--storage", base / "storage", "/sw/cid1", write_tree(base / "src", SOURCE))
    assert out.startswith("revision 1: ")
    return base / "storage"


def test_create_makes_a_repository_at_revision_0_with_the_requested_ttl(tmp_path: Path) -> None:
    out = ok("repo", "create", "ttl.example", "--storage", tmp_path / "s", "--ttl", "60")
    assert "revision 0, TTL 60 s" in out
    repo = Repository(tmp_path / "s")
    assert (repo.manifest().revision, repo.manifest().ttl) == (0, 60)
    assert repo.public_key_path.is_file()
    assert f"master public key: {repo.public_key_path}" in out


def test_create_on_an_existing_storage_fails_with_a_clear_message(storage: Path) -> None:
    manifest = (storage / ".cvmfspublished").read_bytes()
    proc = rcds("repo", "create", FQRN, "--storage", storage)
    assert proc.returncode != 0
    assert b"already holds a repository" in proc.stderr
    assert b"Traceback" not in proc.stderr
    assert (storage / ".cvmfspublished").read_bytes() == manifest


def test_create_refuses_a_bad_repository_name(tmp_path: Path) -> None:
    proc = rcds("repo", "create", "bad name/..", "--storage", tmp_path / "s")
    assert proc.returncode != 0
    assert b"bad repository name" in proc.stderr


def test_info_prints_revision_ttl_and_whitelist_expiry(storage: Path) -> None:
    out = ok("repo", "info", "--storage", storage)
    fields = dict(line.split(None, 1) for line in out.splitlines())
    assert fields["fqrn"] == FQRN
    assert fields["revision"] == "1"
    assert fields["ttl"] == "15"
    assert fields["root_catalog"] == Repository(storage).manifest().root_catalog.hex
    assert "whitelist_expires" in fields


def test_info_json_is_machine_readable(storage: Path) -> None:
    info = json.loads(ok("repo", "info", "--storage", storage, "--json"))
    repo = Repository(storage)
    assert info["fqrn"] == FQRN
    assert info["revision"] == repo.manifest().revision == 1
    assert info["root_catalog"] == repo.manifest().root_catalog.hex
    assert info["ttl"] == 15
    assert info["warning"] is None
    assert info["public_key"] == str(repo.public_key_path)


def test_ls_lists_a_directory_with_types_modes_sizes_and_link_targets(storage: Path) -> None:
    lines = ok("repo", "ls", storage, "/sw/cid1").splitlines()
    assert lines == [
        "-0644            0 .cvmfscatalog",
        "d0755         4096 bin",
        "-0644       512000 blob.bin",
        "-0644           19 hello.txt",
        "l0777            9 link -> hello.txt",
    ]
    assert ok("repo", "ls", storage, "/sw/cid1/bin").splitlines() == ["-0755           17 run.sh"]


def test_ls_of_a_missing_directory_fails(storage: Path) -> None:
    proc = rcds("repo", "ls", storage, "/nope")
    assert proc.returncode != 0
    assert b"FileNotFoundError: /nope" in proc.stderr


def test_cat_writes_the_exact_file_bytes(storage: Path) -> None:
    for path, expected in (
        ("/sw/cid1/hello.txt", SOURCE["hello.txt"]),
        ("/sw/cid1/blob.bin", SOURCE["blob.bin"]),
    ):
        proc = rcds("repo", "cat", storage, path)
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout == expected


def test_cat_of_a_missing_file_fails(storage: Path) -> None:
    proc = rcds("repo", "cat", storage, "/sw/cid1/missing.txt")
    assert proc.returncode != 0
    assert proc.stdout == b""
    assert b"missing.txt" in proc.stderr


def test_cat_with_the_public_key_given_explicitly(storage: Path) -> None:
    key = Repository(storage).public_key_path
    proc = rcds("repo", "cat", storage, "/sw/cid1/hello.txt", "--key", key)
    assert proc.stdout == SOURCE["hello.txt"]


def test_check_exits_0_on_a_healthy_repository(storage: Path) -> None:
    out = ok("repo", "check", storage)
    assert out.splitlines()[-1].startswith("OK: revision 1, 2 catalogs")


def _copy(storage: Path, dest: Path) -> Path:
    shutil.copytree(storage, dest, symlinks=True)
    return dest


def test_check_exits_1_when_an_object_is_missing(storage: Path, tmp_path: Path) -> None:
    broken = _copy(storage, tmp_path / "broken")
    repo = Repository(broken)
    with RepositoryReader.open(broken, repo.public_key_path) as reader:
        d = reader.stat("/sw/cid1/hello.txt")
    assert d.hash is not None
    (broken / d.hash.object_name()).unlink()
    proc = rcds("repo", "check", broken)
    assert proc.returncode == 1
    out = proc.stdout.decode()
    assert f"missing object {d.hash.object_name()}" in out
    assert out.splitlines()[-1].startswith("1 ERRORS")


def test_add_publishes_a_new_revision_and_remove_takes_it_away(tmp_path: Path) -> None:
    st = tmp_path / "storage"
    ok("repo", "create", "addrm.example", "--storage", st)
    src = write_tree(tmp_path / "src", {"a.txt": b"A", "sub": {"b.txt": b"B"}})
    out = ok("repo", "add", "--storage", st, "/x/cid", src)
    assert out.startswith("revision 1: 5 entries")  # root, a.txt, sub, sub/b.txt, marker
    assert ok("repo", "ls", st, "/x").splitlines() == ["d0755         4096 cid"]
    assert ok("repo", "remove", "--storage", st, "/x/cid").strip() == "revision 2"
    assert ok("repo", "ls", st, "/x").strip() == ""
    assert ok("repo", "check", st).startswith("OK: revision 2")


def test_add_without_nesting_keeps_the_tree_in_the_parent_catalog(tmp_path: Path) -> None:
    st = tmp_path / "storage"
    ok("repo", "create", "flat.example", "--storage", st)
    ok("repo", "add", "--storage", st, "--no-nested", "/flat", write_tree(tmp_path / "src", {"f": b"f"}))
    assert ok("repo", "ls", st, "/flat").splitlines() == ["-0644            1 f"]
    assert ok("repo", "check", st).splitlines()[-1].startswith("OK: revision 1, 1 catalogs")


def test_remove_of_a_missing_path_fails_and_publishes_nothing(storage: Path) -> None:
    proc = rcds("repo", "remove", "--storage", storage, "/does/not/exist")
    assert proc.returncode != 0
    assert b"not found: /does/not/exist" in proc.stderr
    assert Repository(storage).manifest().revision == 1


def test_resign_with_a_short_validity_makes_info_warn_about_expiry(storage: Path, tmp_path: Path) -> None:
    st = _copy(storage, tmp_path / "resigned")
    out = ok("repo", "resign", "--storage", st, "--days", "3")
    assert out.startswith(f"whitelist of {FQRN} valid until ")
    proc = rcds("repo", "info", "--storage", st)
    assert proc.returncode == 0
    assert b"WARNING" in proc.stderr and b"expires" in proc.stderr and b"resign" in proc.stderr
    info = json.loads(ok("repo", "info", "--storage", st, "--json"))
    assert "expires" in info["warning"]
    # The resigned whitelist still verifies: the repository stays readable.
    assert rcds("repo", "cat", st, "/sw/cid1/hello.txt").stdout == SOURCE["hello.txt"]


def test_commands_on_a_directory_that_is_no_repository_fail_cleanly(tmp_path: Path) -> None:
    for args in (("repo", "info", "--storage", tmp_path), ("repo", "check", tmp_path)):
        proc = rcds(*args)
        assert proc.returncode != 0
        assert b"Traceback" not in proc.stderr
        assert b"Error:" in proc.stderr


def test_the_installed_console_script_runs() -> None:
    # The script of the environment running the tests (a venv need not be on PATH), else the one on PATH.
    beside = Path(sys.executable).with_name("rcds")
    script = str(beside) if beside.exists() else shutil.which("rcds")
    if script is None:
        pytest.skip("the rcds console script is not on PATH")
    proc = subprocess.run([script, "--version"], capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0
    assert proc.stdout.decode().startswith("rcds, version ")
