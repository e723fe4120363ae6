"""Tarballs for tests, built in memory: ordinary ones with Python's tarfile, hostile and broken ones by
hand where tarfile will not write them.

Describe members with ``file``, ``directory``, ``symlink``, ``hardlink`` or ``special`` (or ``Member``
for anything odd), then::

    tar(file("a.txt", b"hi"), directory("d"), symlink("d/l", "/etc"))   # a complete archive (bytes)
    compress(archive, "gzip")                                           # "none", "gzip", "bzip2", "xz", "zstd"

Hand-made archives are concatenations of pieces, closed with ``END``::

    member(file("a", b"x")) + pax_header({"path": "b\\0c"}) + member(file("x")) + END
    corrupt_header(archive, offset)        # one header with a bad checksum
    without_end(archive)                   # cut right after the last member's data

``ZeroBomb(size, padding=0)`` is a file object producing, lazily, a gzip'd tar holding one file of ``size`` zero
bytes (a few GiB cost a few MB of compressed data, generated as it is read).
"""

from __future__ import annotations

import bz2
import gzip
import io
import itertools
import lzma
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import zstandard

DEFAULT_MTIME = 1_700_000_000
OWNER = 1000  # uid and gid written into every member
BLOCK = tarfile.BLOCKSIZE
END = bytes(2 * BLOCK)  # the end-of-archive marker
FORMATS = ("none", "gzip", "bzip2", "xz", "zstd")
TarFormat = Literal[0, 1, 2]  # tarfile.USTAR_FORMAT, GNU_FORMAT, PAX_FORMAT


@dataclass(frozen=True)
class Member:
    """One member to write. ``size`` overrides the header's size field (default: ``len(data)``)."""

    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    linkname: str = ""
    mode: int = 0o644
    mtime: float = DEFAULT_MTIME
    size: int | None = None
    pax: dict[str, str] = field(default_factory=dict)  # extra pax records (PAX_FORMAT only)

    def tarinfo(self) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self.name)
        info.type = self.type
        info.size = len(self.data) if self.size is None else self.size
        info.linkname = self.linkname
        info.mode = self.mode
        info.mtime = self.mtime
        info.uid = info.gid = OWNER
        info.uname = info.gname = "user"
        info.pax_headers = dict(self.pax)
        return info


def file(name: str, data: bytes = b"", *, mode: int = 0o644, mtime: float = DEFAULT_MTIME) -> Member:
    return Member(name, tarfile.REGTYPE, data, mode=mode, mtime=mtime)


def directory(name: str, *, mode: int = 0o755, mtime: float = DEFAULT_MTIME) -> Member:
    return Member(name, tarfile.DIRTYPE, mode=mode, mtime=mtime)


def symlink(name: str, target: str, *, mtime: float = DEFAULT_MTIME) -> Member:
    return Member(name, tarfile.SYMTYPE, linkname=target, mode=0o777, mtime=mtime)


def hardlink(name: str, target: str, *, mode: int = 0o644, mtime: float = DEFAULT_MTIME) -> Member:
    return Member(name, tarfile.LNKTYPE, linkname=target, mode=mode, mtime=mtime)


def special(name: str, type: bytes = tarfile.CHRTYPE) -> Member:
    """A device, fifo, contiguous file, old GNU sparse file or any other type byte."""
    return Member(name, type)


def tar(*members: Member, format: TarFormat = tarfile.PAX_FORMAT) -> bytes:
    """A complete archive written by Python's tarfile (end marker, padding to 10240-byte records)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=format, encoding="utf-8", errors="surrogateescape") as t:
        for m in members:
            t.addfile(m.tarinfo(), io.BytesIO(m.data) if m.data else None)
    return buf.getvalue()


def padded(data: bytes) -> bytes:
    """``data`` padded with zeros to whole 512-byte blocks."""
    return data + bytes(-len(data) % BLOCK)


def member(m: Member, format: TarFormat = tarfile.PAX_FORMAT) -> bytes:
    """One member as tarfile writes it (extra headers, header, data blocks), for hand-made archives."""
    return m.tarinfo().tobuf(format, "utf-8", "surrogateescape") + padded(m.data)


def pax_record(keyword: str, value: str | bytes) -> bytes:
    """One ``"<length> <keyword>=<value>\\n"`` record (the length counts its own digits)."""
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    body = b" " + keyword.encode() + b"=" + raw + b"\n"
    n = len(body) + 1
    while len(body) + len(str(n)) != n:
        n = len(body) + len(str(n))
    return str(n).encode() + body


def pax_header(
    records: dict[str, str | bytes] | bytes, type: bytes = tarfile.XHDTYPE, name: str = "PaxHeader"
) -> bytes:
    """A pax extended (or, with ``type=XGLTYPE``, global) header member; ``records`` may be raw bytes."""
    data = records if isinstance(records, bytes) else b"".join(pax_record(k, v) for k, v in records.items())
    return member(Member(name, type, data), tarfile.USTAR_FORMAT)


def raw_header(name: str, type: bytes = tarfile.REGTYPE, size: int = 0) -> bytes:
    """A single ustar header block with a valid checksum (``size`` is only the field: add data yourself)."""
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime = type, size, DEFAULT_MTIME
    return info.tobuf(tarfile.USTAR_FORMAT)


def corrupt_header(archive: bytes, offset: int) -> bytes:
    """``archive`` with the header block at ``offset`` damaged (its checksum no longer matches)."""
    damaged = bytearray(archive)
    damaged[offset + 120] ^= 0x01  # a digit in the mtime field
    return bytes(damaged)


def data_end(archive: bytes) -> int:
    """Where the end-of-archive marker of a well-formed plain archive begins."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as t:
        ends = [m.offset_data + len(padded(bytes(m.size))) if m.isreg() else m.offset_data for m in t]
    return max(ends, default=0)


def without_end(archive: bytes) -> bytes:
    """``archive`` ending right after its last member (no end-of-archive marker)."""
    return archive[: data_end(archive)]


def compress(data: bytes, fmt: str) -> bytes:
    """``data`` compressed as ``fmt`` (one of ``FORMATS``)."""
    if fmt == "none":
        return data
    if fmt == "gzip":
        return gzip.compress(data, mtime=0)
    if fmt == "bzip2":
        return bz2.compress(data)
    if fmt == "xz":
        return lzma.compress(data)
    if fmt == "zstd":
        return zstandard.ZstdCompressor(write_checksum=True).compress(data)
    raise ValueError(fmt)


def in_pieces(data: bytes, fmt: str, cuts: list[int]) -> bytes:
    """``data`` cut at ``cuts`` and compressed piece by piece: multi-member gzip, concatenated streams."""
    bounds = [0, *cuts, len(data)]
    return b"".join(compress(data[a:b], fmt) for a, b in itertools.pairwise(bounds))


class ZeroBomb(io.RawIOBase):
    """A gzip'd tar holding one file of ``size`` zero bytes (then ``padding`` zero bytes after the
    end-of-archive marker), generated as it is read.

    Built from one deflate block of 1 MiB of zeros repeated (``Z_FULL_FLUSH`` makes every copy
    identical), so a few GiB cost nothing to make. ``bytes_read`` counts what the reader consumed. The
    gzip trailer is correct, but its CRC is only computed if a reader ever gets that far.
    """

    UNIT = 1 << 20

    def __init__(self, size: int, name: str = "zeros", padding: int = 0) -> None:
        super().__init__()
        self.size = size
        self.bytes_read = 0
        info = tarfile.TarInfo(name)
        info.size, info.mtime = size, DEFAULT_MTIME
        self._header = info.tobuf(tarfile.GNU_FORMAT)
        self._zeros_total = (
            size + (-size % BLOCK) + 2 * BLOCK + padding
        )  # data, its padding, end marker, more
        self._pieces = self._generate()
        self._buf = b""

    def _generate(self) -> Iterator[bytes]:
        c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        yield c.compress(self._header) + c.flush(zlib.Z_FULL_FLUSH)
        unit = c.compress(bytes(self.UNIT)) + c.flush(zlib.Z_FULL_FLUSH)
        full, rest = divmod(self._zeros_total, self.UNIT)
        for _ in range(full):
            yield unit
        crc = zlib.crc32(self._header)
        for _ in range(full):
            crc = zlib.crc32(bytes(self.UNIT), crc)
        tail = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        yield tail.compress(bytes(rest)) + tail.flush()  # raw deflate: ends the stream with BFINAL
        total = len(self._header) + self._zeros_total
        yield zlib.crc32(bytes(rest), crc).to_bytes(4, "little") + (total & 0xFFFFFFFF).to_bytes(4, "little")

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            piece = next(self._pieces, None)
            if piece is None:
                return 0
            self._buf = piece
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self.bytes_read += n
        return n
