"""Hostile and broken tarballs sent to a real server: each fails with its reason and publishes nothing.

The whole corpus goes into the queue at once, between good tarballs, so the group commit has to reject
the bad ones and still publish the good ones in the same revisions.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator

import pytest

from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import Repository
from server import REPOS, RcdsServer
from tarballs import (
    compress,
    corrupt_header,
    file,
    hardlink,
    special,
    symlink,
    tar,
    without_end,
)
from test_pubapi import assert_repository_ok

RANDOM = os.urandom(200_000)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


CORPUS: dict[str, tuple[bytes, str]] = {
    "absolute": (tar(file("/etc/passwd", b"x")), "absolute paths are not allowed"),
    "dotdot": (tar(file("a/../../x", b"x")), "'..' path components are not allowed"),
    "symlink-dir": (
        tar(symlink("lib", "/etc"), file("lib/passwd", b"x")),
        "a symlink cannot be used as a directory",
    ),
    "chardev": (tar(special("dev/null")), "is a character device"),
    "blockdev": (tar(special("dev/sda", tarfile.BLKTYPE)), "is a block device"),
    "fifo": (tar(special("pipe", tarfile.FIFOTYPE)), "is a fifo"),
    "hardlink-out": (tar(hardlink("h", "/etc/shadow")), "absolute paths are not allowed"),
    "hardlink-missing": (tar(hardlink("h", "nothere")), "not an earlier regular file of the archive"),
    "gzip-truncated": (compress(tar(file("a", RANDOM)), "gzip")[:-100], "truncated gzip data"),
    "xz-truncated": (compress(tar(file("a", RANDOM)), "xz")[:-50], "truncated xz data"),
    "zstd-truncated": (compress(tar(file("a", RANDOM)), "zstd")[:-30], "truncated zstd data"),
    "bzip2-corrupt": (_flip(compress(tar(file("a", RANDOM)), "bzip2"), 100), "corrupt bzip2 data"),
    "header-corrupt": (corrupt_header(tar(file("a", b"1"), file("b", b"2")), 1024), "bad checksum"),
    "no-end": (without_end(tar(file("a", b"1"))), "no end-of-archive marker"),
    "cut-data": (tar(file("a", RANDOM))[:2048], "the data of member 'a' is cut short"),
    "not-tar": (RANDOM[:5000], "not a tar archive"),
    "duplicate": (tar(file("a", b"1"), file("a", b"2")), "duplicate member 'a'"),
    "file-as-dir": (tar(file("a", b"1"), file("a/b", b"2")), "which is a file, not a directory"),
    "many": (tar(*[file(f"f{i}", b"") for i in range(60)]), "too many entries: more than 50"),
    "big-file": (tar(file("big", bytes(2_000_000))), "is too large: 2000000 bytes"),
    "total-size": (tar(*[file(f"f{i}", RANDOM[:100_000] * 9) for i in range(12)]), "total"),
    "long-path": (tar(file("d/" * 300 + "f", b"")), "path longer than 512 bytes"),
    "long-name": (tar(file("n" * 300, b"")), "a path component is longer than 255 bytes"),
    "bomb": (compress(tar(file("zeros", bytes(900_000))), "gzip"), "compression ratio"),
}

LIMITS = """[limits]
max_entries = 50
max_file_size = 1000000
max_total_size = 10000000
max_path_length = 512
max_compression_ratio = 50.0
ratio_grace = 100000
"""


@pytest.fixture(scope="module")
def outcome(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RcdsServer, dict[str, dict[str, object]]]]:
    srv = RcdsServer(tmp_path_factory.mktemp("corpus"), LIMITS).start()
    uploads = []
    for i, (name, (data, _)) in enumerate(CORPUS.items()):
        uploads.append((f"bad/{name}", data))
        uploads.append(
            (f"good/n{i}", tar(file("ok.txt", f"{i}\n".encode()), file("setuid", b"#!", mode=0o4755)))
        )
    for cid, data in uploads:
        r = srv.publish(cid, data)
        assert (r.status_code, r.text) == (200, "OK\n"), cid
    docs = {cid: srv.wait_state(cid) for cid, _ in uploads}
    yield srv, docs
    srv.close()


@pytest.mark.parametrize("name", list(CORPUS))
def test_each_hostile_tarball_fails_with_its_reason(
    outcome: tuple[RcdsServer, dict[str, dict[str, object]]], name: str
) -> None:
    srv, docs = outcome
    doc = docs[f"bad/{name}"]
    assert doc["state"] == "failed"
    assert str(doc["reason"]).startswith("rejected: ")
    assert CORPUS[name][1] in str(doc["reason"])
    assert srv.api("exists", cid=f"bad/{name}").text == "MISSING\n"


def test_the_good_tarballs_in_between_were_published(
    outcome: tuple[RcdsServer, dict[str, dict[str, object]]],
) -> None:
    srv, docs = outcome
    good = {c: d for c, d in docs.items() if c.startswith("good/")}
    assert all(d["state"] == "published" for d in good.values()), good
    for repo_name in REPOS:
        repo = Repository(srv.storage(repo_name))
        assert_repository_ok(repo)
        with RepositoryReader.open(repo.storage, repo.public_key_path, cache_dir=srv.root / "rc") as reader:
            names = {d.name for d in reader.listdir("/sw")}
            assert "bad" not in names  # not even an empty group directory was left behind
            for cid, d in good.items():
                if d["repository"] == repo_name:
                    mode = reader.stat(f"/sw/{cid}/setuid").mode
                    assert mode & 0o7777 == 0o755  # setuid dropped, the rest kept


def test_the_failures_are_counted_in_the_metrics(
    outcome: tuple[RcdsServer, dict[str, dict[str, object]]],
) -> None:
    srv, _ = outcome
    metrics = srv.client.get("/metrics").text
    assert f'rcds_publish_failures_total{{reason="rejected"}} {float(len(CORPUS))}' in metrics
