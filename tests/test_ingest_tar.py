"""Streaming tarball ingest: what a user's tarball becomes, and every way a tarball is refused.

Tarballs are built in memory (see ``tarballs.py``): ordinary ones by Python's tarfile, hostile and broken
ones by hand. Entries are consumed the way the repository writer consumes them: each file's data is read
before the next entry is requested.
"""

from __future__ import annotations

import gzip
import io
import random
import stat
import tarfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import pytest

from rcds.cvmfs.checker import check_repository
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import Repository
from rcds.cvmfs.tree import EntryKind
from rcds.ingest.tarstream import GiB, IngestError, IngestLimits, MiB, detect_compression, tar_entries
from tarballs import (
    BLOCK,
    END,
    FORMATS,
    OWNER,
    Member,
    TarFormat,
    ZeroBomb,
    compress,
    corrupt_header,
    data_end,
    directory,
    file,
    hardlink,
    in_pieces,
    member,
    pax_header,
    special,
    symlink,
    tar,
    without_end,
)


@dataclass
class Got:
    """One entry as yielded, with the file data read."""

    path: str
    kind: EntryKind
    mode: int
    mtime: int
    uid: int
    gid: int
    size: int
    target: str
    data: bytes | None


Upload = bytes | BinaryIO | io.RawIOBase


def as_stream(archive: Upload) -> BinaryIO:
    return io.BytesIO(archive) if isinstance(archive, bytes) else cast(BinaryIO, archive)


def ingest(archive: Upload, **kwargs: object) -> list[Got]:
    """Every entry of a tarball; each file's data is read (1 MiB at a time) before the next entry."""
    stream = as_stream(archive)
    out = []
    for e in tar_entries(stream, **kwargs):  # type: ignore[arg-type]
        data = None
        if e.stream is not None:
            parts = []
            while chunk := e.stream.read(MiB):
                parts.append(chunk)
            data = b"".join(parts)
            assert len(data) == e.size, e.path
        out.append(Got(e.path, e.kind, e.mode, e.mtime, e.uid, e.gid, e.size, e.target, data))
    return out


def drain(archive: Upload, **kwargs: object) -> None:
    """Consume a tarball as the writer would, keeping nothing."""
    stream = as_stream(archive)
    for e in tar_entries(stream, **kwargs):  # type: ignore[arg-type]
        while e.stream is not None and e.stream.read(MiB):
            pass


def tree(archive: Upload, **kwargs: object) -> dict[str, Got]:
    """The entries by path, merged as ``Transaction.add_tree`` merges them (a directory listed again wins)."""
    merged: dict[str, Got] = {}
    for g in ingest(archive, **kwargs):
        assert g.path not in merged or (g.kind is merged[g.path].kind is EntryKind.DIRECTORY), g.path
        merged[g.path] = g
    return merged


def file_data(archive: Upload, **kwargs: object) -> dict[str, bytes | None]:
    return {p: g.data for p, g in tree(archive, **kwargs).items() if g.kind is EntryKind.FILE}


SAMPLE = tar(
    directory("./", mode=0o755, mtime=1_600_000_000),
    file("./README", b"hello\n", mtime=1_600_000_001),
    directory("./bin"),
    file("./bin/run.sh", b"#!/bin/sh\necho hi\n", mode=0o755),
    file("./bin/empty"),
    symlink("./bin/current", "run.sh"),
    hardlink("./bin/again.sh", "./bin/run.sh"),
    file("./lib/deep/x.bin", bytes(range(256)) * 10),
)
SAMPLE_FILES = {
    "README": b"hello\n",
    "bin/run.sh": b"#!/bin/sh\necho hi\n",
    "bin/empty": b"",
    "lib/deep/x.bin": bytes(range(256)) * 10,
}


# --- what a tarball becomes ----------------------------------------------------------------------------


def test_entries_are_the_root_then_every_member_in_archive_order() -> None:
    got = ingest(SAMPLE)
    assert [(g.path, g.kind) for g in got] == [
        ("", EntryKind.DIRECTORY),
        ("README", EntryKind.FILE),
        ("bin", EntryKind.DIRECTORY),
        ("bin/run.sh", EntryKind.FILE),
        ("bin/empty", EntryKind.FILE),
        ("bin/current", EntryKind.SYMLINK),
        ("bin/again.sh", EntryKind.HARDLINK),
        ("lib/deep/x.bin", EntryKind.FILE),
    ]
    assert file_data(SAMPLE) == SAMPLE_FILES


def test_file_entries_carry_size_mode_and_mtime() -> None:
    entries = tree(SAMPLE)
    assert (entries["bin/run.sh"].size, entries["bin/run.sh"].mode) == (18, 0o755)
    assert (entries["README"].mode, entries["README"].mtime) == (0o644, 1_600_000_001)
    assert entries["bin/empty"].size == 0 and entries["bin/empty"].data == b""


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_is_detected_by_content(fmt: str) -> None:
    assert detect_compression(compress(SAMPLE, fmt)[:BLOCK]) == fmt
    assert file_data(compress(SAMPLE, fmt)) == SAMPLE_FILES


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_names_do_not_matter_only_content(fmt: str, tmp_path: Path) -> None:
    misleading = tmp_path / ("upload.tar.bz2" if fmt == "gzip" else "upload.tar.gz")
    misleading.write_bytes(compress(SAMPLE, fmt))
    with misleading.open("rb") as f:
        assert file_data(f) == SAMPLE_FILES


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_plain_tar_of_every_header_format_is_detected(tar_format: TarFormat) -> None:
    assert detect_compression(tar(file("a", b"x"), format=tar_format)[:BLOCK]) == "none"


def test_old_v7_tar_without_ustar_magic_is_detected_by_its_header_checksum() -> None:
    header = bytearray(member(file("a", b"x"), tarfile.USTAR_FORMAT)[:BLOCK])
    header[257:265] = bytes(8)  # no "ustar" magic and version
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    archive = bytes(header) + member(file("a", b"x"))[BLOCK:] + END
    assert detect_compression(archive) == "none"
    assert file_data(archive) == {"a": b"x"}


def test_an_empty_archive_is_a_tar_and_gives_just_the_root() -> None:
    empty = tar()
    assert detect_compression(empty) == "none"
    assert [(g.path, g.kind, g.mode, g.mtime) for g in ingest(empty)] == [("", EntryKind.DIRECTORY, 0o755, 0)]


@pytest.mark.parametrize(
    ("head", "match"),
    [
        (b"", r"^not a tar archive: the upload is empty$"),
        (b"just some text\n" * 100, r"^not a tar archive \(nor a gzip, bzip2, xz or zstd compressed one\)$"),
        (b"PK\x03\x04" + bytes(600), r"^not a tar archive"),  # a zip file
        (b"x" * 100, r"^not a tar archive"),
    ],
    ids=["empty", "text", "zip", "short"],
)
def test_things_that_are_not_tarballs_are_refused(head: bytes, match: str) -> None:
    with pytest.raises(IngestError, match=match):
        detect_compression(head)
    with pytest.raises(IngestError, match=match):
        ingest(head)


@pytest.mark.parametrize("fmt", ["gzip", "bzip2", "xz", "zstd"])
def test_compressed_data_that_is_not_a_tar_is_refused(fmt: str) -> None:
    with pytest.raises(
        IngestError, match=r"^not a tar archive: the data does not start with a valid tar header$"
    ):
        ingest(compress(b"hello world\n" * 1000, fmt))


@pytest.mark.parametrize("fmt", ["gzip", "bzip2", "xz", "zstd"])
def test_concatenated_compressed_streams_read_as_one(fmt: str) -> None:
    # Cut anywhere: inside a header, inside file data, inside the end marker.
    assert file_data(in_pieces(SAMPLE, fmt, [100, 700, 1500, len(SAMPLE) - 600])) == SAMPLE_FILES


@pytest.mark.parametrize("fmt", ["gzip", "bzip2", "xz"])
def test_zero_padding_after_the_compressed_stream_is_accepted(fmt: str) -> None:
    assert file_data(compress(SAMPLE, fmt) + bytes(3000)) == SAMPLE_FILES


def test_member_names_are_normalised() -> None:
    archive = tar(
        file("./a", b"1"), file("b//c", b"2"), directory("dir/"), file("dir/./d", b"3"), file("e/", b"4")
    )
    assert [g.path for g in ingest(archive)] == ["", "a", "b/c", "dir", "dir/d", "e"]


def test_setuid_and_setgid_bits_are_dropped_other_permission_bits_kept() -> None:
    archive = tar(
        file("suid", mode=0o4755),
        file("sgid", mode=0o2711),
        file("sticky", mode=0o1777),
        directory("d", mode=0o2770),
    )
    assert {p: g.mode for p, g in tree(archive).items() if p} == {
        "suid": 0o755,
        "sgid": 0o711,
        "sticky": 0o1777,
        "d": 0o770,
    }


def test_ownership_comes_from_the_arguments_not_the_tarball() -> None:
    assert {(g.uid, g.gid) for g in ingest(SAMPLE)} == {(0, 0)}
    assert {(g.uid, g.gid) for g in ingest(SAMPLE, uid=4242, gid=77)} == {(4242, 77)}
    assert OWNER not in (4242, 77, 0)


@pytest.mark.parametrize(
    ("archive", "mtime"),
    [
        (tar(file("f", mtime=-100), format=tarfile.GNU_FORMAT), 0),
        (tar(file("f", mtime=2**40), format=tarfile.GNU_FORMAT), 2**32 - 1),
        (tar(file("f", mtime=-100), format=tarfile.PAX_FORMAT), 0),
        (tar(file("f", mtime=1_700_000_000.75)), 1_700_000_000),
        (pax_header({"mtime": "nan"}) + member(file("f")) + END, 0),
        (pax_header({"mtime": "1e30"}) + member(file("f")) + END, 2**32 - 1),
    ],
    ids=["negative", "far-future", "negative-pax", "fraction", "nan", "huge-pax"],
)
def test_mtimes_are_clamped_to_0_to_2_pow_32_minus_1(archive: bytes, mtime: int) -> None:
    assert tree(archive)["f"].mtime == mtime


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_and_link_targets_survive(tar_format: TarFormat) -> None:
    long_dir = "/".join(["d" * 100] * 5)
    long_target = "/cvmfs/" + "t" * 200
    archive = tar(
        file(f"{long_dir}/file.txt", b"deep"),
        symlink(f"{long_dir}/link", long_target),
        hardlink(f"{long_dir}/hard", f"{long_dir}/file.txt"),
        format=tar_format,
    )
    entries = tree(archive)
    assert entries[f"{long_dir}/file.txt"].data == b"deep"
    assert entries[f"{long_dir}/link"].target == long_target
    assert entries[f"{long_dir}/hard"].target == f"{long_dir}/file.txt"


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_utf8_and_non_utf8_names_survive(tar_format: TarFormat) -> None:
    latin1 = b"caf\xe9.txt".decode("utf-8", "surrogateescape")
    archive = tar(file("grüße/naïve.txt", b"u"), file(latin1, b"l"), symlink("s", latin1), format=tar_format)
    entries = tree(archive)
    assert entries["grüße/naïve.txt"].data == b"u"
    assert entries[latin1].path.encode("utf-8", "surrogateescape") == b"caf\xe9.txt"
    assert entries[latin1].data == b"l"
    assert entries["s"].target == latin1


def test_pax_global_headers_apply_to_the_members_after_them() -> None:
    archive = pax_header({"mtime": "1500000000"}, type=tarfile.XGLTYPE) + member(file("a", b"x")) + END
    assert tree(archive)["a"].mtime == 1_500_000_000


def test_symlink_targets_are_kept_verbatim() -> None:
    targets = [
        "../README",
        "/cvmfs/other.example/lib",
        "does/not/exist",
        "/etc/passwd",
        "$(VAR)/x",
        "a//b/./c",
    ]
    archive = tar(*(symlink(f"l{i}", t) for i, t in enumerate(targets)))
    assert [g.target for g in ingest(archive)[1:]] == targets


def test_hard_links_name_the_original_file_also_through_other_links() -> None:
    archive = tar(
        file("dir/orig", b"shared"),
        hardlink("dir/same", "dir/orig"),
        hardlink("other/link", "./dir//orig"),
        hardlink("other/link2", "other/link"),
    )
    entries = tree(archive)
    assert {p: (g.kind, g.target) for p, g in entries.items() if g.kind is EntryKind.HARDLINK} == {
        "dir/same": (EntryKind.HARDLINK, "dir/orig"),
        "other/link": (EntryKind.HARDLINK, "dir/orig"),
        "other/link2": (EntryKind.HARDLINK, "dir/orig"),
    }


def test_a_directory_may_be_listed_twice_and_after_its_contents() -> None:
    archive = tar(file("a/b/c", b"x"), directory("a/b", mode=0o700), directory("a/b", mode=0o750))
    entries = ingest(archive)
    assert [g.path for g in entries] == ["", "a/b/c", "a/b", "a/b"]
    assert tree(archive)["a/b"].mode == 0o750


def test_file_data_need_not_be_read() -> None:
    paths = [e.path for e in tar_entries(io.BytesIO(compress(SAMPLE, "gzip")))]
    assert paths == [g.path for g in ingest(SAMPLE)]


def test_a_file_stream_cannot_be_read_once_the_next_entry_was_requested() -> None:
    entries = tar_entries(io.BytesIO(tar(file("a", b"aaa"), file("b", b"bbb"))))
    next(entries)
    a = next(entries)
    b = next(entries)
    assert b.stream is not None and b.stream.read() == b"bbb"
    with pytest.raises(ValueError, match="read after the next entry was requested"):
        assert a.stream is not None
        a.stream.read()


# --- the root -------------------------------------------------------------------------------------------


def test_the_root_takes_mode_and_mtime_from_a_leading_dot_member() -> None:
    entries = ingest(tar(directory(".", mode=0o2750, mtime=1_234_567_890), file("a", mtime=1_700_000_000)))
    assert [(g.path, g.kind, g.mode, g.mtime) for g in entries if g.path == ""] == [
        ("", EntryKind.DIRECTORY, 0o750, 1_234_567_890)
    ]
    assert entries[0].path == ""


def test_without_a_dot_member_the_root_is_0755_with_the_newest_member_mtime() -> None:
    archive = tar(
        file("old", mtime=1_000_000_000),
        directory("new", mtime=1_700_000_000),
        file("mid", mtime=1_500_000_000),
    )
    entries = ingest(archive)
    assert entries[0].path == "" and entries[0].mode == 0o755
    # The newest mtime is known at the end only: the root is listed again, last, and the later listing wins.
    assert (entries[-1].path, entries[-1].kind, entries[-1].mtime) == ("", EntryKind.DIRECTORY, 1_700_000_000)
    assert tree(archive)[""].mtime == 1_700_000_000


def test_the_root_is_listed_once_when_the_first_member_is_the_newest() -> None:
    entries = ingest(tar(file("new", mtime=1_700_000_000), file("old", mtime=1_000_000_000)))
    assert [(g.path, g.mtime) for g in entries if g.path == ""] == [("", 1_700_000_000)]


def test_a_dot_member_later_in_the_archive_still_sets_the_root() -> None:
    archive = tar(file("a", mtime=1_700_000_000), directory("./", mode=0o700, mtime=1_111_111_111), file("b"))
    entries = ingest(archive)
    assert entries[0].path == ""
    assert (tree(archive)[""].mode, tree(archive)[""].mtime) == (0o700, 1_111_111_111)
    assert entries[-1].path == "b"


# --- striplevels ---------------------------------------------------------------------------------------

STRIP = tar(
    directory("pkg-1.0", mode=0o750, mtime=1_650_000_000),
    file("pkg-1.0/README", b"readme"),
    directory("pkg-1.0/src", mode=0o700, mtime=1_660_000_000),
    file("pkg-1.0/src/main.c", b"int main;"),
    hardlink("pkg-1.0/src/copy.c", "pkg-1.0/src/main.c"),
    symlink("pkg-1.0/src/link.c", "main.c"),
    file("TOPLEVEL", b"top"),
)


@pytest.mark.parametrize(
    ("levels", "expected"),
    [
        (
            0,
            {
                "": ("dir", ""),
                "pkg-1.0": ("dir", ""),
                "pkg-1.0/README": ("file", ""),
                "pkg-1.0/src": ("dir", ""),
                "pkg-1.0/src/main.c": ("file", ""),
                "pkg-1.0/src/copy.c": ("hardlink", "pkg-1.0/src/main.c"),
                "pkg-1.0/src/link.c": ("symlink", "main.c"),
                "TOPLEVEL": ("file", ""),
            },
        ),
        (
            1,
            {
                "": ("dir", ""),
                "README": ("file", ""),
                "src": ("dir", ""),
                "src/main.c": ("file", ""),
                "src/copy.c": ("hardlink", "src/main.c"),
                "src/link.c": ("symlink", "main.c"),
            },
        ),
        (
            2,
            {
                "": ("dir", ""),
                "main.c": ("file", ""),
                "copy.c": ("hardlink", "main.c"),
                "link.c": ("symlink", "main.c"),
            },
        ),
    ],
)
def test_striplevels_drops_leading_components_like_gnu_tar(
    levels: int, expected: dict[str, tuple[str, str]]
) -> None:
    assert {p: (g.kind.value, g.target) for p, g in tree(STRIP, striplevels=levels).items()} == expected


def test_with_striplevels_the_directory_at_the_strip_depth_becomes_the_root() -> None:
    assert (tree(STRIP, striplevels=1)[""].mode, tree(STRIP, striplevels=1)[""].mtime) == (
        0o750,
        1_650_000_000,
    )
    assert (tree(STRIP, striplevels=2)[""].mode, tree(STRIP, striplevels=2)[""].mtime) == (
        0o700,
        1_660_000_000,
    )


def test_a_hard_link_to_a_member_that_striplevels_drops_is_refused() -> None:
    archive = tar(file("top", b"x"), hardlink("pkg/link", "top"))
    with pytest.raises(
        IngestError, match=r"^hard link 'pkg/link' points to 'top', which is not an earlier regular file"
    ):
        ingest(archive, striplevels=1)


def test_striplevels_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="striplevels"):
        tar_entries(io.BytesIO(SAMPLE), striplevels=-1)


# --- refused tarballs ----------------------------------------------------------------------------------

_gz = compress(tar(file("a", random.Random(5).randbytes(5000))), "gzip")
_bad_crc = bytearray(_gz)
_bad_crc[-8] ^= 0xFF

REFUSED = {
    # unsafe paths
    "absolute path": (
        tar(file("/etc/passwd", b"x")),
        r"^member '/etc/passwd': absolute paths are not allowed$",
    ),
    "dot-dot": (
        tar(file("a/../../etc/x", b"x")),
        r"^member 'a/../../etc/x': '\.\.' path components are not allowed$",
    ),
    "dot-dot alone": (tar(directory("..")), r"^member '\.\.': '\.\.' path components are not allowed$"),
    "empty name": (tar(file("")), r"^member '': empty name$"),
    "NUL in a pax path": (
        pax_header({"path": "a\0b"}) + member(file("x")) + END,
        r"^member 'a\\x00b': NUL character in the name$",
    ),
    # symlinks used as directories
    "through a symlink to /etc": (
        tar(symlink("link", "/etc"), file("link/passwd", b"x")),
        r"^member 'link/passwd' goes through the symlink 'link': a symlink cannot be used as a directory$",
    ),
    "through a harmless symlink": (
        tar(directory("real"), symlink("alias", "real"), file("alias/x")),
        r"^member 'alias/x' goes through the symlink 'alias'",
    ),
    "deep through a symlink": (
        tar(symlink("a/s", "."), directory("a/s/b/c")),
        r"^member 'a/s/b/c' goes through the symlink 'a/s'",
    ),
    "symlink where a directory was implied": (
        tar(file("a/b"), symlink("a", "/etc")),
        r"^member 'a' is a symlink, but earlier members use 'a' as a directory$",
    ),
    # member types
    "character device": (
        tar(special("dev/null", tarfile.CHRTYPE)),
        r"^member 'dev/null' is a character device: only",
    ),
    "block device": (tar(special("sda", tarfile.BLKTYPE)), r"^member 'sda' is a block device"),
    "fifo": (tar(special("pipe", tarfile.FIFOTYPE)), r"^member 'pipe' is a fifo"),
    "contiguous file": (tar(special("c", tarfile.CONTTYPE)), r"^member 'c' is a contiguous file"),
    "unknown type": (
        tar(special("v", b"V")),
        r"^member 'v' is of unsupported type b'V': only files, directories",
    ),
    "old GNU sparse": (
        member(special("s", tarfile.GNUTYPE_SPARSE), tarfile.GNU_FORMAT) + END,
        r"^member 's' is a sparse file, which is not supported$",
    ),
    "pax sparse": (
        pax_header({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "big.img"})
        + member(file("GNUSparseFile.0/big.img", b"1\n0\n5\n" + bytes(509) + b"hello"))
        + END,
        r"^member 'big.img' is a sparse file, which is not supported$",
    ),
    # hard links
    "hard link to nothing": (
        tar(hardlink("h", "nothere")),
        r"^hard link 'h' points to 'nothere', which is not an earlier regular file of the archive$",
    ),
    "hard link to a later file": (
        tar(hardlink("h", "f"), file("f", b"x")),
        r"^hard link 'h' points to 'f', which is not",
    ),
    "hard link to a directory": (
        tar(directory("d"), hardlink("h", "d")),
        r"^hard link 'h' points to 'd', which is not",
    ),
    "hard link to a symlink": (
        tar(symlink("s", "x"), hardlink("h", "s")),
        r"^hard link 'h' points to 's', which is not",
    ),
    "hard link to an absolute path": (
        tar(hardlink("h", "/etc/shadow")),
        r"^hard link 'h' \(target '/etc/shadow'\): absolute paths are not allowed$",
    ),
    "hard link out of the tree": (
        tar(hardlink("h", "../x")),
        r"^hard link 'h' \(target '\.\./x'\): '\.\.' path",
    ),
    # duplicates and files used as directories
    "duplicate file": (
        tar(file("a", b"1"), file("a", b"2")),
        r"^duplicate member 'a': the path 'a' occurs twice",
    ),
    "duplicate after normalisation": (
        tar(file("a/b"), file("./a//b")),
        r"^duplicate member '\./a//b': the path 'a/b'",
    ),
    "directory then file": (tar(directory("a"), file("a")), r"^duplicate member 'a'"),
    "file then directory": (tar(file("a"), directory("a")), r"^duplicate member 'a'"),
    "symlink then directory": (tar(symlink("a", "b"), directory("a")), r"^duplicate member 'a'"),
    "file used as a directory": (
        tar(file("a", b"x"), file("a/b")),
        r"^member 'a/b' goes through 'a', which is a file, not a directory$",
    ),
    "hard link used as a directory": (
        tar(file("f"), hardlink("h", "f"), file("h/x")),
        r"^member 'h/x' goes through 'h', which is a file",
    ),
    "file where a directory was implied": (
        tar(file("a/b"), file("a")),
        r"^member 'a' is a file, but earlier members use 'a' as a directory$",
    ),
    "root that is a file": (
        tar(file(".", b"x")),
        r"^member '\.' is the root of the tree but not a directory$",
    ),
    # corrupt headers
    "negative size": (
        member(Member("neg", size=-1), tarfile.GNU_FORMAT) + END,
        r"^member 'neg' has an invalid size \(-1\)$",
    ),
    "negative pax size": (
        pax_header({"size": "-5"}) + member(file("x")) + END,
        r"^member 'x' has an invalid size \(-5\)$",
    ),
    "bad header checksum": (
        corrupt_header(tar(file("a", b"x"), file("b", b"y")), 1024),
        r"^corrupt archive: invalid tar header at offset 1024 \(bad checksum\)$",
    ),
    "bad first header": (
        corrupt_header(tar(file("a")), 0),
        r"^not a tar archive: the data does not start with",
    ),
    "malformed pax record": (
        pax_header(b"9999 path=x\n") + member(file("x")) + END,
        r"^corrupt archive: malformed pax header at offset 0$",
    ),
    "pax record without =": (
        pax_header(b"9 path_x\n") + member(file("x")) + END,
        r"^corrupt archive: malformed pax",
    ),
    "huge pax header": (
        pax_header({"comment": "x" * (2 * MiB)}) + member(file("x")) + END,
        r"^corrupt archive: extended header of 2097\d+ bytes at offset 0 \(at most 1048576\)$",
    ),
    "extended header at the end": (
        pax_header({"path": "x"}) + END,
        r"^corrupt archive: an extended header is not followed by a member",
    ),
    "endless long-name headers": (
        b"".join(
            member(Member("././@LongLink", tarfile.GNUTYPE_LONGNAME, b"n%d\0" % i), tarfile.GNU_FORMAT)
            for i in range(9)
        )
        + member(file("x"), tarfile.GNU_FORMAT)
        + END,
        r"^corrupt archive: more than 8 extended headers in a row",
    ),
    # data around the archive
    "concatenated archives": (
        tar(file("a")) + tar(file("b")),
        r"^data after the end-of-archive marker \(concatenated archives are not supported\)$",
    ),
    "garbage after the gzip stream": (
        _gz + b"garbage",
        r"^corrupt gzip data: unexpected bytes after the end",
    ),
    "bad gzip checksum": (bytes(_bad_crc), r"^corrupt gzip data: .*incorrect data check"),
    "truncated gzip": (_gz[:-10], r"^truncated gzip data: the compressed stream ends early"),
    "no end-of-archive marker": (
        without_end(tar(file("a", b"x"))),
        r"^truncated archive: unexpected end of data at byte 1024 after member 'a' \(no end-of-archive marker\)$",
    ),
}


@pytest.mark.parametrize(("archive", "match"), list(REFUSED.values()), ids=list(REFUSED))
def test_refused(archive: bytes, match: str) -> None:
    with pytest.raises(IngestError, match=match) as exc:
        ingest(archive)
    assert exc.value.reason == str(exc.value)


def test_the_refusal_comes_while_iterating_after_the_good_members() -> None:
    entries = tar_entries(io.BytesIO(tar(file("good", b"x"), file("/etc/passwd", b"y"))))
    assert [next(entries).path, next(entries).path] == ["", "good"]
    with pytest.raises(IngestError, match="absolute paths"):
        next(entries)


def test_very_long_member_names_are_shortened_in_messages() -> None:
    with pytest.raises(IngestError, match=r"^member '/x{154}\.\.\.': absolute paths are not allowed$"):
        ingest(tar(file("/" + "x" * 5000)))


# --- limits --------------------------------------------------------------------------------------------

LIMITED = {
    "total size": (
        IngestLimits(max_total_size=100),
        tar(file("a", bytes(60)), file("b", bytes(60))),
        r"^the files are too large in total: more than 100 bytes \(at member 'b'\)$",
    ),
    "file size": (
        IngestLimits(max_file_size=10),
        tar(file("a", bytes(11))),
        r"^member 'a' is too large: 11 bytes \(at most 10\)$",
    ),
    "entries": (
        IngestLimits(max_entries=3),
        tar(file("a"), file("b"), file("c"), file("d")),
        r"^too many entries: more than 3 \(at member 'd'\)$",
    ),
    "entries with implied directories": (
        IngestLimits(max_entries=3),
        tar(file("a/b/c/d")),
        r"^too many entries: more than 3 \(at directory 'a'\)$",
    ),
    "path length": (
        IngestLimits(max_path_length=10),
        tar(file("abcde/fghij")),
        r"^member 'abcde/fghij': path longer than 10 bytes$",
    ),
    "path length in bytes": (
        IngestLimits(max_path_length=10),
        tar(file("é" * 6)),
        r"path longer than 10 bytes$",
    ),
    "name length": (
        IngestLimits(max_name_length=5),
        tar(file("ok/toolong")),
        r"^member 'ok/toolong': a path component is longer than 5 bytes$",
    ),
    "symlink target": (
        IngestLimits(max_path_length=10),
        tar(symlink("l", "x" * 11)),
        r"^symlink 'l' has a target longer than 10 bytes$",
    ),
    "default name length": (
        IngestLimits(),
        tar(file("n" * 256)),
        r"a path component is longer than 255 bytes$",
    ),
    "default path length": (
        IngestLimits(),
        tar(file("/".join(["p" * 200] * 21))),
        r"path longer than 4096 bytes$",
    ),
}


@pytest.mark.parametrize(("limits", "archive", "match"), list(LIMITED.values()), ids=list(LIMITED))
def test_limits(limits: IngestLimits, archive: bytes, match: str) -> None:
    with pytest.raises(IngestError, match=match):
        ingest(archive, limits=limits)


def test_path_limits_apply_after_stripping() -> None:
    limits = IngestLimits(max_path_length=11, max_name_length=5)
    assert [g.path for g in ingest(tar(file("a-long-top/abcde/fghij")), limits=limits, striplevels=1)] == [
        "",
        "abcde/fghij",
    ]


def test_limits_are_inclusive() -> None:
    limits = IngestLimits(
        max_total_size=120, max_file_size=60, max_entries=4, max_path_length=11, max_name_length=5
    )
    archive = tar(file("abcde/fghij", bytes(60)), file("abcde/z", bytes(60)))
    assert [g.path for g in ingest(archive, limits=limits)] == ["", "abcde/fghij", "abcde/z"]


@pytest.mark.parametrize("fmt", ["gzip", "bzip2", "xz", "zstd"])
def test_the_compression_ratio_limit_applies_to_every_format(fmt: str) -> None:
    archive = compress(tar(file("zeros", bytes(4 * MiB))), fmt)
    limits = IngestLimits(max_compression_ratio=10, ratio_grace=MiB)
    with pytest.raises(
        IngestError, match=r"^compression ratio above 10:1 \(.*\): refusing a likely decompression bomb"
    ):
        ingest(archive, limits=limits)
    assert file_data(archive, limits=IngestLimits(max_compression_ratio=10, ratio_grace=8 * MiB)) == {
        "zeros": bytes(4 * MiB)
    }


def test_plain_tar_has_no_compression_ratio() -> None:
    archive = tar(file("zeros", bytes(2 * MiB)))
    assert file_data(archive, limits=IngestLimits(max_compression_ratio=1.0, ratio_grace=0)) == {
        "zeros": bytes(2 * MiB)
    }


def test_a_gzip_bomb_is_refused_after_reading_little_quickly_and_in_bounded_memory() -> None:
    bomb = ZeroBomb(3 * GiB)  # about 3 MB compressed
    started = time.monotonic()
    tracemalloc.start()
    try:
        with pytest.raises(IngestError, match=r"^compression ratio above 200:1 .* \(in member 'zeros'\)$"):
            drain(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 5
    assert bomb.bytes_read < MiB
    assert peak < 16 * MiB


def test_a_bomb_hidden_in_the_padding_after_the_archive_is_refused_too() -> None:
    bomb = ZeroBomb(0, padding=3 * GiB)
    with pytest.raises(IngestError, match=r"^compression ratio above 200:1"):
        drain(bomb)
    assert bomb.bytes_read < MiB


def test_the_zero_bomb_helper_makes_a_valid_gzip_tarball() -> None:
    assert file_data(gzip.decompress(ZeroBomb(3 * MiB).read())) == {"zeros": bytes(3 * MiB)}
    assert file_data(ZeroBomb(3 * MiB).read()) == {"zeros": bytes(3 * MiB)}


# --- truncated and corrupt archives ----------------------------------------------------------------------

SWEEP = tar(
    directory("pkg"),
    file("pkg/" + "long/" * 30 + "name.txt", random.Random(1).randbytes(1300)),
    symlink("pkg/l", "/cvmfs/x"),
    file("pkg/é.txt", b"utf8"),
    hardlink("pkg/h", "pkg/é.txt"),
    file("pkg/empty"),
    file("pkg/last", b"z" * 600),
)


def test_a_plain_tar_cut_anywhere_before_its_end_marker_is_refused() -> None:
    end = data_end(SWEEP)
    cuts = sorted(
        {c for b in range(0, end + BLOCK, BLOCK) for c in (b, b + 1, b + 100, b + 511) if c < end + BLOCK}
    )
    assert len(cuts) > 40
    for cut in cuts:
        with pytest.raises(IngestError, match=r"^(truncated archive|not a tar archive)"):
            ingest(SWEEP[:cut])


def test_a_plain_tar_cut_after_its_first_zero_block_has_lost_nothing() -> None:
    # GNU tar ends an archive at the first zero block, too.
    whole = ingest(SWEEP)
    for cut in range(data_end(SWEEP) + BLOCK, len(SWEEP), 1000):
        assert ingest(SWEEP[:cut]) == whole


@pytest.mark.parametrize("fmt", ["gzip", "bzip2", "xz", "zstd"])
def test_a_compressed_tar_cut_at_any_byte_is_refused(fmt: str) -> None:
    archive = compress(SWEEP, fmt)
    for cut in range(len(archive)):
        with pytest.raises(IngestError, match=rf"^(truncated {fmt} data|not a tar archive)"):
            ingest(archive[:cut])


def test_a_multi_member_gzip_cut_between_members_is_refused() -> None:
    first, second = compress(SWEEP[:3000], "gzip"), compress(SWEEP[3000:], "gzip")
    with pytest.raises(IngestError, match=r"^truncated archive"):
        ingest(first)
    assert ingest(first + second) == ingest(SWEEP)


@pytest.mark.parametrize("fmt", ["gzip", "bzip2", "xz", "zstd"])
def test_damaged_compressed_data_is_refused(fmt: str) -> None:
    archive = compress(SWEEP, fmt)
    for offset in range(len(archive) // 3, len(archive), max(1, len(archive) // 40)):
        damaged = bytearray(archive)
        damaged[offset] ^= 0x5A
        with pytest.raises(IngestError, match=r"^(corrupt|truncated)"):
            ingest(bytes(damaged))


@pytest.mark.parametrize("fmt", ["none", "gzip"])
def test_file_data_cut_short_raises_ingest_error_from_the_stream(fmt: str) -> None:
    archive = tar(file("big", random.Random(2).randbytes(200_000)))
    cut = compress(archive, fmt)
    entries = tar_entries(io.BytesIO(cut[: len(cut) // 2]))
    next(entries)
    big = next(entries)
    assert big.stream is not None
    with pytest.raises(IngestError, match=r"^truncated (archive|gzip data).*'big'"):
        while big.stream.read(65536):
            pass


# --- bounded memory ------------------------------------------------------------------------------------


def test_a_20_mb_tarball_streams_in_bounded_memory(tmp_path: Path) -> None:
    rnd = random.Random(3)
    upload = tmp_path / "upload"
    sizes = {f"data/{i:02}.bin": 2 * MiB + i for i in range(8)} | {"data/text.txt": 13 * 300_000}
    members = [file(p, rnd.randbytes(n)) for p, n in sizes.items() if p.endswith(".bin")]
    members.append(file("data/text.txt", b"line of text\n" * 300_000))
    upload.write_bytes(gzip.compress(tar(*members), compresslevel=1))
    del members
    assert upload.stat().st_size > 16 * MiB
    got: dict[str, int] = {}
    with upload.open("rb") as f:
        tracemalloc.start()
        try:
            for e in tar_entries(f):
                if e.stream is not None:
                    got[e.path] = 0
                    while chunk := e.stream.read(MiB):
                        got[e.path] += len(chunk)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert got == sizes
    assert peak < 8 * MiB, peak


# --- decompression in a thread of its own ---------------------------------------------------------------


class WatchedUpload(io.RawIOBase):
    """An upload that notes which threads read it and can fail with an error of its own after ``fail_at``."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        self._data = io.BytesIO(data)
        self._fail_at = fail_at
        self.readers: set[str] = set()

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        self.readers.add(threading.current_thread().name)
        if self._fail_at is not None and self._data.tell() >= self._fail_at:
            raise ConnectionResetError("the upload broke off")
        return self._data.read(size if size is not None and size >= 0 else -1)


def inflating_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("inflate-")]


MANY_FILES = tar(*(file(f"d/{i:04}.txt", f"file {i}\n".encode() * 200) for i in range(300)))


@pytest.mark.parametrize("fmt", ["gzip", "bzip2", "xz", "zstd"])
def test_compressed_uploads_are_inflated_off_the_parsers_thread(fmt: str) -> None:
    upload = WatchedUpload(compress(MANY_FILES, fmt))
    got = file_data(upload)
    assert len(got) == 300 and got["d/0299.txt"] == b"file 299\n" * 200
    # The first block is read on the parser's thread to detect the format; all the rest in the pipe's.
    assert upload.readers - {threading.current_thread().name} == {f"inflate-{fmt}"}
    assert not inflating_threads()


def test_a_plain_tar_is_read_on_the_parsers_thread() -> None:
    upload = WatchedUpload(MANY_FILES)
    drain(upload)
    assert upload.readers == {threading.current_thread().name}


def test_an_ingest_given_up_midway_stops_its_inflating_thread() -> None:
    rnd = random.Random(5)  # 8 MiB that does not compress: more than the pipe holds ahead of the parser
    big = tar(*(file(f"r/{i:03}.bin", rnd.randbytes(64 * 1024)) for i in range(128)))
    entries = tar_entries(as_stream(WatchedUpload(compress(big, "gzip"))))
    for _ in range(3):
        next(entries)
    assert len(inflating_threads()) == 1
    entries.close()  # as add_tree does when it refuses a member, or a lease is lost
    assert not inflating_threads()


@pytest.mark.parametrize("fmt", ["gzip", "zstd"])
def test_an_error_of_the_upload_reaches_the_parser_as_it_was_raised(fmt: str) -> None:
    data = compress(MANY_FILES, fmt)
    upload = WatchedUpload(data, fail_at=len(data) // 2)
    with pytest.raises(ConnectionResetError, match="broke off"):
        drain(upload)
    assert not inflating_threads()


def test_a_corrupt_stream_is_refused_through_the_pipe_after_the_good_members() -> None:
    data = bytearray(compress(MANY_FILES, "gzip"))
    data[len(data) // 2] ^= 0xFF
    seen: list[str] = []
    with pytest.raises(IngestError, match="corrupt gzip data"):
        for e in tar_entries(io.BytesIO(bytes(data))):
            seen.append(e.path)
            while e.stream is not None and e.stream.read(MiB):
                pass
    assert len(seen) > 10
    assert not inflating_threads()


# --- into a repository -----------------------------------------------------------------------------------

BIG = random.Random(7).randbytes(700 * 1024)  # several chunks with the test repositories' small chunk sizes

PACKAGE = tar(
    directory("pkg-1.0/", mode=0o755, mtime=1_600_000_000),
    file("pkg-1.0/README", b"hello\n", mtime=1_600_000_001),
    directory("pkg-1.0/bin", mode=0o750, mtime=1_600_000_002),
    file("pkg-1.0/bin/run.sh", b"#!/bin/sh\necho hi\n", mode=0o4755),
    hardlink("pkg-1.0/bin/run-again.sh", "pkg-1.0/bin/run.sh"),
    file("pkg-1.0/lib/big.bin", BIG),
    file("pkg-1.0/lib/empty"),
    symlink("pkg-1.0/lib/current", "big.bin"),
    symlink("pkg-1.0/lib/other", "/cvmfs/other.example/lib"),
    hardlink("pkg-1.0/share/copy.bin", "pkg-1.0/lib/big.bin"),
)


def prefix(stream: io.RawIOBase, n: int) -> bytes:
    data = b""
    while len(data) < n and (chunk := stream.read(n - len(data))):
        data += chunk
    return data


def check(reader: RepositoryReader) -> None:
    report = check_repository(reader)
    assert report.errors == [], [str(i) for i in report.issues]


def test_a_published_tarball_reads_back_from_the_repository(
    make_repo: Callable[..., Repository], open_reader: Callable[..., RepositoryReader], tmp_path: Path
) -> None:
    repo = make_repo()
    upload = tmp_path / "upload"
    upload.write_bytes(compress(PACKAGE, "xz"))
    with repo.transaction() as txn, upload.open("rb") as f:
        txn.add_tree("/sw/grp/cid", tar_entries(f, striplevels=1, uid=1234, gid=5678))
        assert txn.commit().revision == 1
    r = open_reader(repo)
    base = "/sw/grp/cid"
    assert r.read(f"{base}/README") == b"hello\n"
    assert r.read(f"{base}/bin/run.sh") == r.read(f"{base}/bin/run-again.sh") == b"#!/bin/sh\necho hi\n"
    assert r.read(f"{base}/lib/big.bin") == r.read(f"{base}/share/copy.bin") == BIG
    assert r.stat(f"{base}/lib/big.bin").is_chunked
    assert r.read(f"{base}/lib/empty") == b""
    assert r.stat(f"{base}/lib/current").symlink == "big.bin"
    assert r.stat(f"{base}/lib/other").symlink == "/cvmfs/other.example/lib"
    assert r.stat(f"{base}/bin/run.sh").linkcount == r.stat(f"{base}/bin/run-again.sh").linkcount == 2
    assert stat.S_IMODE(r.stat(f"{base}/bin/run.sh").mode) == 0o755
    assert stat.S_IMODE(r.stat(f"{base}/bin").mode) == 0o750
    assert (r.stat(base).mtime, r.stat(f"{base}/README").mtime) == (1_600_000_000, 1_600_000_001)
    assert {
        (d.uid, d.gid) for d in (r.stat(base), r.stat(f"{base}/README"), r.stat(f"{base}/lib/current"))
    } == {(1234, 5678)}
    assert {e.path for e in r.walk(base)} == {
        base,
        *(f"{base}/{p}" for p in ("README", "bin", "bin/run.sh", "bin/run-again.sh", "lib", "lib/big.bin")),
        *(f"{base}/{p}" for p in ("lib/empty", "lib/current", "lib/other", "share", "share/copy.bin")),
        f"{base}/.cvmfscatalog",
    }
    check(r)


HOSTILE = {
    "escape after a big file": (
        tar(file("big.bin", BIG), file("ok.txt", b"ok"), file("../escape", b"x")),
        r"'\.\.' path components",
    ),
    "symlink as a directory": (
        tar(symlink("etc", "/etc"), file("etc/passwd", b"x")),
        "goes through the symlink",
    ),
    "truncated gzip": (compress(tar(file("big.bin", BIG)), "gzip")[:-100], "truncated gzip data"),
    "gzip bomb": (prefix(ZeroBomb(GiB), MiB), "compression ratio"),
}


@pytest.mark.parametrize(("archive", "match"), list(HOSTILE.values()), ids=list(HOSTILE))
def test_a_refused_tarball_in_an_open_transaction_changes_nothing(
    archive: bytes,
    match: str,
    make_repo: Callable[..., Repository],
    open_reader: Callable[..., RepositoryReader],
) -> None:
    repo = make_repo()
    with repo.transaction() as txn:
        txn.add_tree("/sw/grp/cid", tar_entries(io.BytesIO(SAMPLE)))
        txn.commit()
    before = repo.manifest()
    with repo.transaction() as txn, pytest.raises(IngestError, match=match):
        txn.add_tree("/sw/grp/cid", tar_entries(io.BytesIO(archive)))
    after = repo.manifest()
    assert after.revision == before.revision == 1
    assert after.root_catalog == before.root_catalog
    r = open_reader(repo)
    assert r.read("/sw/grp/cid/README") == b"hello\n"
    assert r.lookup("/sw/grp/cid/big.bin") is None
    check(r)


def test_after_a_refused_tarball_the_transaction_can_still_publish_others(
    make_repo: Callable[..., Repository], open_reader: Callable[..., RepositoryReader]
) -> None:
    repo = make_repo()
    with repo.transaction() as txn:
        with pytest.raises(IngestError):
            txn.add_tree("/sw/grp/bad", tar_entries(io.BytesIO(HOSTILE["escape after a big file"][0])))
        txn.add_tree("/sw/grp/good", tar_entries(io.BytesIO(SAMPLE)))
        assert txn.commit().revision == 1
    r = open_reader(repo)
    assert r.lookup("/sw/grp/bad") is None
    assert r.read("/sw/grp/good/lib/deep/x.bin") == SAMPLE_FILES["lib/deep/x.bin"]
    check(r)
