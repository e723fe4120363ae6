"""Reproducible tarballs: the same directory tree gives the same bytes, and so the same CID, anywhere.

A CID names a tarball by its hash, so a tarball that changes with file mtimes, readdir order, owner
names or the tar version defeats deduplication: every submission of unchanged code is a new upload and
a new directory in the repository. Here every member is normalised:

- members in a fixed order (a depth-first walk, each directory's entries sorted by their bytes);
- a fixed mtime, uid/gid 0 and empty owner names;
- modes normalised as git does: 0755 for directories and for files with any execute bit, else 0644;
- POSIX pax format, whose extended headers appear only for what ustar cannot hold (long or non-ASCII
  names, files over 8 GiB) and then hold only that field, so nothing in them depends on the host;
- hard links inside the tree kept as links to the member first seen.

The CID hashes the *uncompressed* tar stream: compressors differ in output between versions and builds
(zlib and zlib-ng, for one), so hashing compressed bytes would break "same tree, same CID". The upload
itself is compressed (zstd) for the wire; the server accepts any compression.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO

import zstandard

from .errors import ClientError

# 1970-01-01T00:00:01Z, as jobsub_lite uses for single files; 0 upsets some tools.
REPRODUCIBLE_MTIME = 1
# Left out of a directory unless --no-default-excludes: version control, Python bytecode, editor and
# crash debris, the build and editor part of what jobsub_lite's excludes file drops. Bytecode matters
# most: the tarball's fixed mtimes make every shipped .pyc stale against its .py on the worker node, so
# it would be recompiled by every job anyway (or fail to be written on read-only CVMFS). jobsub's
# list also drops images, PDFs, logs and archives; those may be a job's inputs, so they stay.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git",
    ".svn",
    ".hg",
    "CVS",
    "__pycache__",
    "*.pyc",
    "*.pyo",
    ".pytest_cache",
    ".mypy_cache",
    "*~",
    ".*.swp",
    ".*.swo",
    ".#*",
    "#*#",
    ".DS_Store",
    "*.core",
)
# The upload compression: fast, and well inside what the server's zstd reader accepts.
UPLOAD_ZSTD_LEVEL = 3
_COPY_BLOCK = 1 << 20


class TarballError(ClientError):
    """The directory cannot be turned into a tarball (unreadable, special file, changed meanwhile)."""


@dataclass
class TarSummary:
    """What a tar stream held: its hash (the CID's second half) and size."""

    sha256: str
    tar_bytes: int
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    content_bytes: int = 0
    excluded: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Member:
    relpath: str  # "" for the top directory, which is not a member
    path: Path
    st: os.stat_result


class _HashingSink:
    """Hashes what tarfile writes, then passes it on (or drops it when only the hash is wanted)."""

    def __init__(self, out: IO[bytes] | None, on_bytes: Callable[[int], object] | None = None) -> None:
        self.hasher = hashlib.sha256()
        self.out = out
        self.count = 0
        self.on_bytes = on_bytes

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        self.count += len(data)
        if self.out is not None:
            self.out.write(data)
        if self.on_bytes is not None:
            self.on_bytes(len(data))
        return len(data)


def _excluded(relpath: str, name: str, patterns: Sequence[str]) -> bool:
    # As tar's --exclude: a pattern matches the member's whole relative path or any single name.
    return any(fnmatch.fnmatchcase(relpath, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _walk(top: Path, patterns: Sequence[str], excluded: list[str]) -> Iterator[_Member]:
    stack: list[tuple[str, Path]] = [("", top)]
    while stack:
        rel, directory = stack.pop()
        try:
            names = sorted(os.listdir(directory), key=os.fsencode)
        except OSError as exc:
            raise TarballError(f"cannot list {directory}: {exc.strerror}") from exc
        subdirs: list[tuple[str, Path]] = []
        for name in names:
            relpath = f"{rel}/{name}" if rel else name
            if _excluded(relpath, name, patterns):
                excluded.append(relpath)
                continue
            path = directory / name
            try:
                st = os.lstat(path)
            except OSError as exc:
                raise TarballError(f"cannot stat {path}: {exc.strerror}") from exc
            yield _Member(relpath, path, st)
            if stat.S_ISDIR(st.st_mode):
                subdirs.append((relpath, path))
        # Depth-first in sorted order: push the subdirectories reversed so the first pops first.
        # Entries of a directory come before those of its subdirectories, which is what a reader needs.
        stack.extend(reversed(subdirs))


def _normal_mode(st: os.stat_result) -> int:
    if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
        return 0o755 if stat.S_ISDIR(st.st_mode) else 0o777
    return 0o755 if st.st_mode & 0o111 else 0o644


def _info(name: str, type_: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.mode = mode
    info.mtime = REPRODUCIBLE_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_tar(
    directory: Path,
    out: IO[bytes] | None,
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
    on_bytes: Callable[[int], object] | None = None,
) -> TarSummary:
    """Write the reproducible tar stream of ``directory`` to ``out`` (None: only hash it).

    ``on_bytes`` is told the size of each piece of the stream as it is written (for a progress line).
    """
    top = Path(directory)
    if not top.is_dir():
        raise TarballError(f"{top} is not a directory")
    sink = _HashingSink(out, on_bytes)
    summary = TarSummary(sha256="", tar_bytes=0)
    seen_inodes: dict[tuple[int, int], str] = {}
    with tarfile.open(  # type: ignore[call-overload]  # a write-only sink is enough for "w|"
        fileobj=sink,
        mode="w|",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
    ) as tar:
        tar.copybufsize = _COPY_BLOCK  # tarfile's default of 16 KiB costs a Python loop turn per block
        for m in _walk(top, excludes, summary.excluded):
            mode = m.st.st_mode
            if stat.S_ISDIR(mode):
                tar.addfile(_info(m.relpath, tarfile.DIRTYPE, 0o755))
                summary.directories += 1
            elif stat.S_ISLNK(mode):
                info = _info(m.relpath, tarfile.SYMTYPE, 0o777)
                info.linkname = os.readlink(m.path)
                tar.addfile(info)
                summary.symlinks += 1
            elif stat.S_ISREG(mode):
                key = (m.st.st_dev, m.st.st_ino)
                if m.st.st_nlink > 1 and key in seen_inodes:
                    info = _info(m.relpath, tarfile.LNKTYPE, _normal_mode(m.st))
                    info.linkname = seen_inodes[key]
                    tar.addfile(info)
                    summary.files += 1
                    continue
                if m.st.st_nlink > 1:
                    seen_inodes[key] = m.relpath
                _add_regular(tar, m)
                summary.files += 1
                summary.content_bytes += m.st.st_size
            else:
                raise TarballError(
                    f"{m.path} is a special file (device, fifo or socket), which cannot be published;"
                    " leave it out with --exclude"
                )
    summary.sha256 = sink.hasher.hexdigest()
    summary.tar_bytes = sink.count
    return summary


def _add_regular(tar: tarfile.TarFile, m: _Member) -> None:
    info = _info(m.relpath, tarfile.REGTYPE, _normal_mode(m.st))
    info.size = m.st.st_size
    try:
        with open(m.path, "rb") as f:
            tar.addfile(info, f)
            # A file that grew while being read would give a tarball that no longer matches the tree.
            if f.read(1) or os.fstat(f.fileno()).st_size != m.st.st_size:
                raise TarballError(f"{m.path} changed while being read; publish again when it is stable")
    except OSError as exc:
        raise TarballError(f"cannot read {m.path}: {exc.strerror or exc}") from exc


def hash_file(path: Path, on_bytes: Callable[[int], object] | None = None) -> tuple[str, int]:
    """The sha256 (hex) and size of a file, the CID of a tarball given as is."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while block := f.read(_COPY_BLOCK):
            h.update(block)
            n += len(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return h.hexdigest(), n


def write_compressed_tar(
    directory: Path,
    out: BinaryIO,
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
    on_bytes: Callable[[int], object] | None = None,
) -> TarSummary:
    """Write the tar stream zstd-compressed to ``out``; the summary's hash is of the uncompressed stream."""
    cctx = zstandard.ZstdCompressor(level=UPLOAD_ZSTD_LEVEL, threads=-1)
    with cctx.stream_writer(out, closefd=False) as zout:
        summary = write_tar(directory, zout, excludes, on_bytes)
    return summary


__all__ = [
    "DEFAULT_EXCLUDES",
    "REPRODUCIBLE_MTIME",
    "TarSummary",
    "TarballError",
    "hash_file",
    "write_compressed_tar",
    "write_tar",
]
