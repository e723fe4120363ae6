"""Safe, streaming tarball ingest: a tar stream in, ``TreeEntry`` objects for the repository writer out.

The upload (a binary file object, typically the spool file of an HTTP upload) is read once, front to
back, never seeked and never unpacked to disk::

    upload --> _Decompressor --> tarfile "r|" (with _StrictTarInfo) --> checks --> TreeEntry ...
               (gzip/bzip2/xz/zstd or    (headers, pax, GNU long   (paths, types, links,
                plain; counts bytes,      names; strict about       duplicates, limits)
                ratio limit, CRCs;        truncation)
                compressed formats in
                a thread of their own)

Entries are produced lazily and the writer (``Transaction.add_tree``) reads each FILE entry's
``stream`` before asking for the next entry, so memory stays bounded by a few blocks plus the set of
paths seen so far. Anything unsafe, unsupported, over a limit, truncated or corrupt raises
``IngestError`` while iterating; ``add_tree`` collects every entry before it touches a catalog, so a
rejected tarball publishes nothing.

Choices worth knowing:

* The tree root comes first. Its mode and mtime come from a directory member that becomes the root
  (``.``/``./``, or with ``striplevels=N`` a directory of exactly N components), else mode 0755 and the
  newest member mtime. When that is only known later in the stream, another DIRECTORY entry for ``""``
  follows (right where a root member appears, or after the last member): consumers treat a directory
  listed twice as tar does and ``add_tree`` does, the later listing wins.
* mtimes are clamped to ``0 .. 2**32 - 1`` (negative, NaN and far-future times from hostile or odd
  archives become 0 or the 2106 limit); fractional pax mtimes are truncated to whole seconds.
* setuid/setgid bits are dropped, other permission bits (including the sticky bit) kept; owners
  become the ``uid``/``gid`` arguments. Extended attributes (pax ``SCHILY.xattr.*``) are ignored.
* The first zero block ends the archive (as GNU tar has it). Everything after it must be zero
  padding: a second archive appended to the first (``cat a.tar b.tar``) is refused rather than half
  published. The compressed stream is read to its very end so that trailing checksums are verified.
* Directories implied by member paths but not listed themselves count as entries for ``max_entries``;
  they are not yielded (the writer creates them).
"""

from __future__ import annotations

import bz2
import contextlib
import io
import lzma
import math
import queue
import tarfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Protocol, Self, cast

import zstandard

from rcds.cvmfs.catalog import NESTED_MARKER
from rcds.cvmfs.objects import ZLIB_NG, ZlibError
from rcds.cvmfs.tree import EntryKind, TreeEntry

if ZLIB_NG:
    from zlib_ng import zlib_ng

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

BLOCKSIZE = tarfile.BLOCKSIZE  # 512
MTIME_MAX = 2**32 - 1

_RAW_READ = 64 * KiB  # compressed bytes read from the upload at a time
_OUT_BLOCK = 256 * KiB  # most decompressed bytes produced at a time
_META_MAX = 1 * MiB  # largest pax / GNU long name header, and all global pax headers together
_META_CHAIN = 8  # most extended headers in front of one member
_ZSTD_WINDOW_MAX = 1 << 27  # 128 MiB, libzstd's default limit (zstd --long=28 and up need more)
_XZ_MEMLIMIT = 1 << 28  # 256 MiB (xz -9 needs 65 MiB to decompress)
_SHOW_MAX = 160  # longest member name quoted in an error message
_CODEC_ERRORS: tuple[type[Exception], ...] = (OSError, EOFError, ValueError, lzma.LZMAError, *ZlibError)
_PIPE_BLOCKS = 8  # decompressed blocks the inflating thread may run ahead of the tar parser (2 MiB)
_PIPE_POLL = 0.5  # seconds between the inflating thread's checks that the parser still wants its output

_META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
               tarfile.GNUTYPE_LONGLINK)  # fmt: skip
_SPECIAL_NAMES = {
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a fifo",
    tarfile.CONTTYPE: "a contiguous file",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}
_MAGIC = {"gzip": b"\x1f\x8b", "bzip2": b"BZh", "xz": b"\xfd7zXZ\x00", "zstd": b"\x28\xb5\x2f\xfd"}


@dataclass(frozen=True)
class IngestLimits:
    """Limits on one tarball; exceeding any of them rejects it with ``IngestError``.

    ``max_total_size``: sum of the (uncompressed) sizes of all regular file members.
    ``max_entries``: members of any kind (plus directories implied by member paths but not listed).
    ``max_file_size``: size of one regular file member.
    ``max_path_length``: bytes of a member path after stripping (UTF-8, or the raw bytes of non-UTF-8
    names); also the longest symlink target.
    ``max_name_length``: bytes of one path component.
    ``max_compression_ratio``: decompressed tar bytes / compressed bytes read, checked continuously once
    more than ``ratio_grace`` bytes were decompressed (small archives may compress very well).
    ``max_nested_catalogs``: directories holding a ``.cvmfscatalog`` (each becomes a nested catalog of its
    own, some 20 KB of storage and work per publish); one at the top of the tree does not count, it
    names the catalog every published tree gets anyway.
    ``max_catalog_depth``: how deeply such catalogs may nest inside one another below the tree's own
    (``a/.cvmfscatalog`` is 1, ``a/b/.cvmfscatalog`` beside it 2). Clients resolve a path catalog by
    catalog, so every level is a lookup (and a download) for every path below it.
    """

    max_total_size: int = 16 * GiB
    max_entries: int = 1_000_000
    max_file_size: int = 4 * GiB
    max_path_length: int = 4096
    max_name_length: int = 255
    max_compression_ratio: float = 200.0
    ratio_grace: int = 64 * MiB
    max_nested_catalogs: int = 500
    max_catalog_depth: int = 32


DEFAULT_LIMITS = IngestLimits()


class IngestError(Exception):
    """A tarball rejected. ``str(e)`` / ``e.reason`` is a short, user-facing reason (it goes into an
    HTTP 400 body and a status record) that names the member concerned when there is one."""

    reason: str

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- format detection ----------------------------------------------------------------------------


def detect_compression(head: bytes) -> str:
    """The format of an upload from its first bytes (pass at least 512): ``"gzip"``, ``"bzip2"``,
    ``"xz"``, ``"zstd"`` or ``"none"`` (a plain tar). Detection is by content, never by file name.

    ``"none"`` is only returned when ``head`` starts with a tar header (ustar magic at offset 257, a
    valid header checksum, or the zero block of an empty archive); anything else raises IngestError.
    """
    if head.startswith(_MAGIC["gzip"]):
        return "gzip"
    if head.startswith(_MAGIC["bzip2"]) and head[3:4].isdigit() and head[3:4] != b"0":
        return "bzip2"
    if head.startswith(_MAGIC["xz"]):
        return "xz"
    if head.startswith(_MAGIC["zstd"]) or (
        len(head) >= 4 and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18"
    ):
        return "zstd"  # a zstd frame, or a skippable frame (pzstd starts with one)
    if not head:
        raise IngestError("not a tar archive: the upload is empty")
    if len(head) >= BLOCKSIZE and _looks_like_tar_header(head[:BLOCKSIZE]):
        return "none"
    raise IngestError("not a tar archive (nor a gzip, bzip2, xz or zstd compressed one)")


def _looks_like_tar_header(block: bytes) -> bool:
    if block[257:262] == b"ustar" or block.count(0) == BLOCKSIZE:
        return True
    digits = block[148:156].replace(b"\0", b" ").strip()
    if not digits or digits.strip(b"01234567"):
        return False
    stored = int(digits, 8)
    body = block[:148] + block[156:]
    unsigned = sum(body) + 8 * 0x20  # the checksum field counts as eight spaces
    signed = unsigned - 256 * sum(1 for b in body if b >= 0x80)  # old tars summed signed chars
    return stored in (unsigned, signed)


# --- decompression ----------------------------------------------------------------------------------


class _Codec(Protocol):
    """What bz2.BZ2Decompressor and lzma.LZMADecompressor offer (and _GzipMember imitates)."""

    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...
    @property
    def needs_input(self) -> bool: ...
    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


class _GzipMember:
    """One gzip member through zlib, with the bounded-output interface of the bz2/lzma decompressors."""

    def __init__(self) -> None:
        # zlib-ng inflates 1.5-2x faster than stock zlib, with the same interface (and gzip member framing).
        self._d = (zlib_ng.decompressobj if ZLIB_NG else zlib.decompressobj)(16 + zlib.MAX_WBITS)
        self._tail = b""
        self.needs_input = True

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def unused_data(self) -> bytes:
        return self._d.unused_data

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        buf = self._tail + data if self._tail else data
        out = self._d.decompress(buf, max(max_length, 0))
        self._tail = self._d.unconsumed_tail
        self.needs_input = not self._tail and (max_length <= 0 or len(out) < max_length)
        return out


def _new_codec(fmt: str) -> _Codec:
    if fmt == "gzip":
        return _GzipMember()
    if fmt == "bzip2":
        return bz2.BZ2Decompressor()
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=_XZ_MEMLIMIT)


class _ZstdFrames:
    """Follows the frame structure of a zstd stream (RFC 8878) as its compressed bytes go by.

    libzstd's stream reader returns a clean end of data when its input stops in the middle of a frame;
    this tells a complete stream (``complete``) from a truncated one. Block contents are only skipped
    over: decoding and its errors are libzstd's.
    """

    def __init__(self) -> None:
        self.frames = 0
        self._state = "magic"
        self._want = 4  # bytes of the next header field
        self._field = bytearray()
        self._skip = 0  # bytes of block content (or a skippable frame) still to pass over
        self._checksum = False

    @property
    def complete(self) -> bool:
        return self.frames > 0 and self._state == "magic" and not self._field and not self._skip

    def feed(self, data: bytes) -> None:
        pos, n = 0, len(data)
        while pos < n:
            if self._skip:
                k = min(self._skip, n - pos)
                self._skip -= k
                pos += k
                continue
            k = min(self._want - len(self._field), n - pos)
            self._field += data[pos : pos + k]
            pos += k
            if len(self._field) == self._want:
                value = bytes(self._field)
                self._field.clear()
                self._advance(value)

    def _next(self, state: str, want: int) -> None:
        self._state, self._want = state, want

    def _end_frame(self) -> None:
        self.frames += 1
        self._next("magic", 4)

    def _advance(self, value: bytes) -> None:
        state = self._state
        if state == "magic":
            magic = int.from_bytes(value, "little")
            if magic == 0xFD2FB528:
                self._next("descriptor", 1)
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._next("skippable", 4)
            else:
                raise IngestError("corrupt zstd data: unexpected bytes where a zstd frame should start")
        elif state == "skippable":
            self._skip = int.from_bytes(value, "little")
            self._end_frame()
        elif state == "descriptor":
            fhd = value[0]
            if fhd & 0x08:
                raise IngestError("corrupt zstd data: reserved bit set in a frame header")
            single_segment = bool(fhd & 0x20)
            self._checksum = bool(fhd & 0x04)
            rest = (
                (0 if single_segment else 1)
                + (0, 1, 2, 4)[fhd & 3]
                + ((1 if single_segment else 0), 2, 4, 8)[fhd >> 6]
            )
            if rest:
                self._next("header", rest)
            else:
                self._next("block", 3)
        elif state == "header":
            self._next("block", 3)
        elif state == "block":
            header = int.from_bytes(value, "little")
            block_type = (header >> 1) & 3
            if block_type == 3:
                raise IngestError("corrupt zstd data: reserved block type")
            self._skip = 1 if block_type == 1 else header >> 3  # an RLE block holds one byte
            if not header & 1:
                self._next("block", 3)
            elif self._checksum:
                self._next("checksum", 4)
            else:
                self._end_frame()
        else:  # checksum
            self._end_frame()


class _ZstdSource:
    """The upload as libzstd's stream reader reads it: counted, and watched by ``_ZstdFrames``."""

    def __init__(self, owner: _Decompressor, frames: _ZstdFrames) -> None:
        self._owner = owner
        self._frames = frames

    def read(self, size: int = -1) -> bytes:
        data = self._owner._take()
        self._frames.feed(data)
        return data


class _Decompressor:
    """The upload, decompressed: ``read(n)`` returns up to ``n`` bytes of tar data, ``b""`` at the end.

    Counts compressed bytes read (``compressed``) and decompressed bytes produced (``produced``) and
    enforces the compression ratio limit. Corrupt or truncated compressed data, and bytes after the
    compressed stream other than zero padding, raise IngestError. Concatenated gzip members, bzip2
    streams and xz streams are read as one. Output is produced ``_OUT_BLOCK`` bytes at a time.
    """

    def __init__(self, raw: BinaryIO, head: bytes, fmt: str, limits: IngestLimits) -> None:
        self.fmt = fmt
        self.compressed = len(head)
        self.produced = 0
        self._raw = raw
        self._limits = limits
        self._pending = head  # read from the upload, not yet handed on
        self._out = b""
        self._pos = 0
        self._done = False
        self._error: IngestError | None = None
        self._codec: _Codec | None = None
        self._streams = 0
        self._padding = False
        self._frames = _ZstdFrames()
        self._zstd: Any = None
        if fmt == "zstd":
            self._zstd = zstandard.ZstdDecompressor(max_window_size=_ZSTD_WINDOW_MAX).stream_reader(
                cast(IO[bytes], _ZstdSource(self, self._frames)), read_size=_RAW_READ, read_across_frames=True
            )

    def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        if n < 0:
            n = _OUT_BLOCK
        if self._pos >= len(self._out):
            if self._error is not None:
                raise self._error
            try:
                self._out, self._pos = self._produce(), 0
            except IngestError as exc:
                self._error = exc
                raise
        if self._pos == 0 and n >= len(self._out):
            self._pos = len(self._out)
            return self._out
        chunk = self._out[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk

    def _take(self) -> bytes:
        """The next compressed bytes: what was put back first, then the upload; ``b""`` at its end."""
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        data = self._raw.read(_RAW_READ) or b""
        self.compressed += len(data)
        return data

    def _produce(self) -> bytes:
        if self._done:
            return b""
        if self.fmt == "none":
            out = self._take()
        elif self.fmt == "zstd":
            out = self._produce_zstd()
        else:
            out = self._produce_codec()
        if not out:
            self._done = True
            return b""
        self.produced += len(out)
        limits = self._limits
        if (
            self.fmt != "none"
            and self.produced > limits.ratio_grace
            and self.produced > limits.max_compression_ratio * self.compressed
        ):
            raise IngestError(
                f"compression ratio above {limits.max_compression_ratio:g}:1 ({self.produced} bytes "
                f"from {self.compressed} compressed bytes): refusing a likely decompression bomb"
            )
        return out

    def _produce_codec(self) -> bytes:
        fmt, magic = self.fmt, _MAGIC[self.fmt]
        while True:
            codec = self._codec
            if codec is None:  # between streams: another stream, zero padding, or the end
                head = self._take()
                while 0 < len(head) < len(magic) and (more := self._take()):
                    head += more
                if not head:
                    return b""
                if not self._padding and head.startswith(magic):
                    self._codec = _new_codec(fmt)
                    self._streams += 1
                    self._pending = head
                    continue
                if self._streams and head.count(0) == len(head):
                    self._padding = True
                    continue
                raise IngestError(
                    f"corrupt {fmt} data: unexpected bytes after the end of the compressed stream"
                )
            if codec.eof:
                self._pending = codec.unused_data
                self._codec = None
                continue
            data = b""
            if codec.needs_input:
                data = self._take()
                if not data:
                    raise IngestError(f"truncated {fmt} data: the compressed stream ends early")
            try:
                out = codec.decompress(data, _OUT_BLOCK)
            except _CODEC_ERRORS as exc:
                raise IngestError(f"corrupt {fmt} data: {exc}") from None
            if out:
                return out

    def _produce_zstd(self) -> bytes:
        try:
            out = cast(bytes, self._zstd.read(_OUT_BLOCK))
        except zstandard.ZstdError as exc:
            raise IngestError(f"corrupt zstd data: {exc}") from None
        if not out:
            if self._take():  # libzstd may stop early on a bad stream: the frame check needs it all
                raise IngestError(
                    "corrupt zstd data: unexpected bytes after the end of the compressed stream"
                )
            if not self._frames.complete:
                raise IngestError("truncated zstd data: the compressed stream ends early")
        return out


class _InflatingThread:
    """A ``_Decompressor`` run in a thread of its own, ahead of the tar parser, through a bounded pipe.

    zlib(-ng), liblzma, libbz2 and libzstd release the GIL while they work, so inflating the upload
    overlaps parsing, hashing and deflating the objects instead of taking turns with them on the ingest's
    thread. ``read(n)`` has the decompressor's meaning; whatever the decompressor (or the upload under
    it) raised is raised here, in order, after the blocks produced before it. ``close()`` stops the thread
    (the parser may give up early: a refused member, a lost lease) and waits for it.
    """

    def __init__(self, source: _Decompressor) -> None:
        self.source = source
        self._blocks: queue.Queue[bytes | BaseException] = queue.Queue(_PIPE_BLOCKS)
        self._stop = threading.Event()
        self._out = b""
        self._pos = 0
        self._end: bytes | BaseException | None = None  # b"" at the end, or what ended it
        self._thread = threading.Thread(target=self._run, name=f"inflate-{source.fmt}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                block: bytes | BaseException = self.source.read(_OUT_BLOCK)
            except BaseException as exc:  # handed to the parser's thread, which raises it
                block = exc
            while not self._stop.is_set():
                try:
                    self._blocks.put(block, timeout=_PIPE_POLL)
                    break
                except queue.Full:
                    continue
            if not isinstance(block, bytes) or not block:
                return

    def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        if self._pos >= len(self._out):
            if self._end is not None:
                if isinstance(self._end, BaseException):
                    raise self._end
                return b""
            block = self._blocks.get()
            if isinstance(block, BaseException) or not block:
                self._end = block
                return self.read(n)
            self._out, self._pos = block, 0
        if n < 0 or (self._pos == 0 and n >= len(self._out)):
            chunk = self._out[self._pos :] if self._pos else self._out
        else:
            chunk = self._out[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):  # make room for a put the thread may be waiting on
                self._blocks.get(timeout=_PIPE_POLL)
        self._thread.join()


# --- tar headers ---------------------------------------------------------------------------------------


class _TarReader(tarfile.TarFile):
    """tarfile's reader plus the state our stricter header parsing keeps between headers."""

    members: list[tarfile.TarInfo]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.meta_depth = 0  # extended headers being processed in front of the member to come
        self.global_pax_bytes = 0
        self.saw_end = False  # the end-of-archive zero block was read
        self.last_name = ""  # the member read last (for messages)
        super().__init__(*args, **kwargs)


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile's header parsing, made strict and bounded for untrusted archives.

    tarfile takes a missing header, a short header or a bad checksum after the first member for the end
    of the archive; here they are errors. Extended headers (pax, GNU long names) are limited in size and
    number, pax records are parsed by a linear-time parser, sparse files are refused before tarfile
    reads their maps.
    """

    if TYPE_CHECKING:

        def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo: ...
        def _apply_pax_info(self, pax_headers: dict[str, str], encoding: str, errors: str) -> None: ...
        def _block(self, count: int) -> int: ...

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> Self:
        reader = cast(_TarReader, tf)
        fileobj = cast(IO[bytes], tf.fileobj)
        buf = fileobj.read(BLOCKSIZE)
        offset = fileobj.tell() - len(buf)
        if len(buf) < BLOCKSIZE:
            raise IngestError(_truncated(reader, offset + len(buf)))
        if buf.count(0) == BLOCKSIZE:
            if reader.meta_depth:
                raise IngestError(
                    f"corrupt archive: an extended header is not followed by a member (offset {offset})"
                )
            reader.saw_end = True
            raise tarfile.EOFHeaderError("end of archive")  # type: ignore[attr-defined]  # tarfile.next() ends here
        try:
            info = cls.frombuf(buf, tf.encoding, tf.errors)
        except tarfile.HeaderError as exc:
            if offset == 0:
                raise IngestError(
                    "not a tar archive: the data does not start with a valid tar header"
                ) from None
            raise IngestError(f"corrupt archive: invalid tar header at offset {offset} ({exc})") from None
        info.offset = offset
        if info.type in _META_TYPES:
            if not 0 <= info.size <= _META_MAX:
                raise IngestError(
                    f"corrupt archive: extended header of {info.size} bytes at offset {offset} (at most {_META_MAX})"
                )
            if reader.meta_depth >= _META_CHAIN:
                raise IngestError(
                    f"corrupt archive: more than {_META_CHAIN} extended headers in a row (offset {offset})"
                )
            reader.meta_depth += 1
            try:
                return cast(Self, info._proc_member(tf))
            finally:
                reader.meta_depth -= 1
        if info.type == tarfile.GNUTYPE_SPARSE:
            raise IngestError(f"member {_show(info.name)} is a sparse file, which is not supported")
        return cast(Self, info._proc_member(tf))

    def _proc_pax(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        """A pax extended (or global) header: like tarfile's, but linear-time and size-limited."""
        reader = cast(_TarReader, tf)
        fileobj = cast(IO[bytes], tf.fileobj)
        padded = self._block(self.size)
        buf = fileobj.read(padded)
        if len(buf) < padded:
            raise IngestError(_truncated(reader, fileobj.tell()))
        records = _parse_pax(buf[: self.size], self.offset)
        if self.type == tarfile.XGLTYPE:
            reader.global_pax_bytes += self.size
            if reader.global_pax_bytes > _META_MAX:
                raise IngestError(f"corrupt archive: more than {_META_MAX} bytes of global pax headers")
            pax_headers = cast(dict[str, str], tf.pax_headers)
        else:
            pax_headers = dict(tf.pax_headers)
        for key, value in records:
            if key == b"hdrcharset":
                pax_headers["hdrcharset"] = value.decode("utf-8", "surrogateescape")
        binary = pax_headers.get("hdrcharset") == "BINARY"
        for key, value in records:
            keyword = _decode(key, "utf-8", tf)
            binary_name = binary and keyword in tarfile.PAX_NAME_FIELDS
            pax_headers[keyword] = _decode(value, tf.encoding if binary_name else "utf-8", tf)
        following = self.fromtarfile(tf)
        if any(k.startswith("GNU.sparse.") for k in pax_headers):
            name = pax_headers.get("GNU.sparse.name") or pax_headers.get("path") or following.name
            raise IngestError(f"member {_show(name)} is a sparse file, which is not supported")
        if self.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            following._apply_pax_info(pax_headers, tf.encoding, tf.errors)
            following.offset = self.offset
            if "size" in pax_headers:  # the data (and so the next header) moved
                if following.size < 0:
                    raise IngestError(
                        f"member {_show(following.name)} has an invalid size ({following.size})"
                    )
                offset = following.offset_data
                if following.isreg() or following.type not in tarfile.SUPPORTED_TYPES:
                    offset += following._block(following.size)
                tf.offset = offset
        return following

    def _proc_gnusparse_00(self, *args: object) -> None:  # not reached: sparse members are refused first
        raise IngestError("sparse files are not supported")

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


def _parse_pax(data: bytes, offset: int) -> list[tuple[bytes, bytes]]:
    """Records ``"<length> <keyword>=<value>\\n"`` of a pax header, checked strictly, in linear time."""
    records: list[tuple[bytes, bytes]] = []
    pos, n = 0, len(data)
    while pos < n:
        if data[pos] == 0 and data.count(0, pos) == n - pos:
            break  # NUL padding within the declared size
        space = data.find(b" ", pos, min(n, pos + 21))
        end = pos + int(data[pos:space]) if space > pos and data[pos:space].isdigit() else -1
        equals = data.find(b"=", space + 1, end - 1) if space < end <= n else -1
        if equals <= space + 1 or data[end - 1] != 0x0A:
            raise IngestError(f"corrupt archive: malformed pax header at offset {offset}")
        records.append((data[space + 1 : equals], data[equals + 1 : end - 1]))
        pos = end
    return records


def _decode(value: bytes, encoding: str, tf: tarfile.TarFile) -> str:
    try:
        return value.decode(encoding, "strict")
    except UnicodeDecodeError:
        return value.decode(tf.encoding, tf.errors)


def _truncated(reader: _TarReader, offset: int) -> str:
    after = f" after member {_show(reader.last_name)}" if reader.last_name else ""
    return f"truncated archive: unexpected end of data at byte {offset}{after} (no end-of-archive marker)"


def _show(name: str) -> str:
    """A member name for a message: quoted, escaped, shortened if very long."""
    shown = repr(name)
    return shown if len(shown) <= _SHOW_MAX else shown[: _SHOW_MAX - 4] + "...'"


# --- member data ---------------------------------------------------------------------------------------


class _MemberStream(io.RawIOBase):
    """The data of one regular file member: exactly ``size`` bytes, read from the tar stream in place.

    Truncated or corrupt data and a compression ratio over the limit raise IngestError (naming the
    member). Only usable until the next entry is requested: the tar stream moves on then.
    """

    def __init__(self, fileobj: IO[bytes], size: int, shown: str) -> None:
        super().__init__()
        self._f = fileobj
        self._left = size
        self._shown = shown
        self.retired = False

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if self.retired:
            raise ValueError(f"the data of member {self._shown} was read after the next entry was requested")
        n = self._left if size is None or size < 0 else min(size, self._left)
        if n <= 0:
            return b""
        try:
            data = self._f.read(n)
        except IngestError as exc:
            raise IngestError(f"{exc.reason} (in member {self._shown})") from None
        except (tarfile.TarError, EOFError):
            data = b""
        if len(data) < n:
            raise IngestError(f"truncated archive: the data of member {self._shown} is cut short")
        self._left -= n
        return data

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)


# --- the tree ----------------------------------------------------------------------------------------

_DIR, _IMPLIED, _FILE, _SYMLINK = range(4)  # what a path is in the tree so far
_KIND_WORDS = {EntryKind.DIRECTORY: "directory", EntryKind.FILE: "file", EntryKind.SYMLINK: "symlink",
               EntryKind.HARDLINK: "hard link"}  # fmt: skip


def tar_entries(
    stream: BinaryIO,
    limits: IngestLimits = DEFAULT_LIMITS,
    striplevels: int = 0,
    uid: int = 0,
    gid: int = 0,
) -> Iterator[TreeEntry]:
    """The members of the tarball read from ``stream`` as tree entries, lazily, for ``add_tree``.

    ``stream``: a binary file object, read sequentially (never seeked) and not closed. Plain tar and
    gzip (also multi-member), bzip2, xz and zstd compressed tar are detected by content.

    Yields the tree root first (path ``""``, a DIRECTORY; see the module docstring for its mode and
    mtime), then one entry per member, paths relative and ``/``-separated (``./a``, ``a//b``, ``dir/``
    normalised). FILE entries carry a ``stream`` of exactly ``size`` bytes that must be read before the
    next entry is requested. Hard links become HARDLINK entries whose ``target`` is the path of the
    original regular file. Symlink targets are kept as they are. Modes lose setuid/setgid; owners are
    ``uid``/``gid``; mtimes are clamped to ``0 .. 2**32 - 1``.

    ``striplevels=N`` drops N leading path components like GNU tar's ``--strip-components`` (also from
    hard link targets); members with fewer components are skipped, and so are non-directories with
    exactly N; a directory with exactly N components supplies the root's mode and mtime.

    Raises IngestError while iterating for: absolute paths, ``..`` components, empty names; paths that
    go through a symlink or a file; devices, fifos, contiguous, sparse and unknown member types; hard
    links to anything but an earlier regular file; duplicate members (a directory may be listed twice);
    truncated or corrupt data; trailing data after the end of the archive; any ``limits`` exceeded.
    """
    if striplevels < 0:
        raise ValueError(f"striplevels must not be negative: {striplevels}")
    return _Ingest(stream, limits, striplevels, uid, gid).entries()


class _Ingest:
    """One pass over one tarball: the tree so far, the counters, the member being read."""

    def __init__(self, stream: BinaryIO, limits: IngestLimits, striplevels: int, uid: int, gid: int) -> None:
        self.stream = stream
        self.limits = limits
        self.strip = striplevels
        self.uid = uid
        self.gid = gid
        self.kinds: dict[str, int] = {"": _DIR}
        self.files: dict[str, str] = {}  # regular files and hard links -> the original file's path
        self.entries_seen = 0
        self.total_size = 0
        self.newest: int | None = None
        self.current: _MemberStream | None = None
        # Directories with a nested catalog marker ("<dir>/" keys) -> their nesting depth. At most
        # max_nested_catalogs of them, so checking a new one against all is cheap.
        self.catalogs: dict[str, int] = {}

    def entries(self) -> Iterator[TreeEntry]:
        members = self.members()
        first = next(members, None)
        if first is not None and first.path == "":
            root, root_listed = first, True
        else:
            root, root_listed = self.directory("", 0o755, first.mtime if first else 0), False
        yield root
        if first is not None and first is not root:
            yield first
        for entry in members:
            root_listed = root_listed or entry.path == ""
            yield entry
        if not root_listed and self.newest is not None and self.newest != root.mtime:
            yield self.directory("", 0o755, self.newest)

    def directory(self, path: str, mode: int, mtime: int) -> TreeEntry:
        return TreeEntry(path, EntryKind.DIRECTORY, mode=mode, mtime=mtime, uid=self.uid, gid=self.gid)

    def members(self) -> Iterator[TreeEntry]:
        head = _read_head(self.stream)
        source = _Decompressor(self.stream, head, detect_compression(head), self.limits)
        pipe = _InflatingThread(source) if source.fmt != "none" else None
        try:
            tar = self.open(pipe or source)
        except BaseException:
            if pipe is not None:
                pipe.close()
            raise
        try:
            while (info := self.next_member(tar)) is not None:
                entry = self.entry(tar, info)
                tar.last_name = info.name
                if entry is not None:
                    yield entry
            if not tar.saw_end:
                raise IngestError(_truncated(tar, tar.fileobj.tell()))
            while chunk := tar.fileobj.read(_OUT_BLOCK):  # padding; reading it to the end verifies checksums
                if chunk.count(0) != len(chunk):
                    raise IngestError(
                        "data after the end-of-archive marker (concatenated archives are not supported)"
                    )
        finally:
            self.retire()
            tar.close()
            if pipe is not None:
                pipe.close()

    def retire(self) -> None:
        if self.current is not None:
            self.current.retired = True
            self.current = None

    def open(self, source: _Decompressor | _InflatingThread) -> _TarReader:
        try:
            return _TarReader.open(
                fileobj=cast(IO[bytes], source),
                mode="r|",
                tarinfo=_StrictTarInfo,
                encoding="utf-8",
                errors="surrogateescape",
            )
        except IngestError:
            raise
        except (tarfile.TarError, ValueError, UnicodeError, OverflowError, EOFError) as exc:
            raise IngestError(f"corrupt archive: {exc}") from None

    def next_member(self, tar: _TarReader) -> tarfile.TarInfo | None:
        self.retire()
        try:
            info = tar.next()
        except IngestError:
            raise
        except tarfile.ReadError as exc:
            if "unexpected end of data" in str(exc) and tar.last_name:
                raise IngestError(
                    f"truncated archive: the data of member {_show(tar.last_name)} is cut short"
                ) from None
            raise IngestError(f"corrupt archive: {exc}") from None
        except (tarfile.TarError, ValueError, UnicodeError, OverflowError, EOFError) as exc:
            raise IngestError(f"corrupt archive: {exc}") from None
        tar.members.clear()  # tarfile keeps every member otherwise
        return info

    def count(self, what: str) -> None:
        self.entries_seen += 1
        if self.entries_seen > self.limits.max_entries:
            raise IngestError(f"too many entries: more than {self.limits.max_entries} (at {what})")

    def entry(self, tar: _TarReader, info: tarfile.TarInfo) -> TreeEntry | None:
        """The entry for one member, or None for a member that striplevels drops."""
        shown = _show(info.name)
        self.count(f"member {shown}")
        parts = _split(info.name, f"member {shown}")
        kind = _member_kind(info, shown)
        limits = self.limits
        if kind is EntryKind.FILE:
            if info.size < 0:
                raise IngestError(f"member {shown} has an invalid size ({info.size})")
            if info.size > limits.max_file_size:
                raise IngestError(
                    f"member {shown} is too large: {info.size} bytes (at most {limits.max_file_size})"
                )
            self.total_size += info.size
            if self.total_size > limits.max_total_size:
                raise IngestError(
                    f"the files are too large in total: more than {limits.max_total_size} bytes (at member {shown})"
                )
        mode = info.mode & 0o7777 & ~0o6000
        mtime = _clamp_mtime(info.mtime)
        if not parts and kind is not EntryKind.DIRECTORY:
            raise IngestError(f"member {shown} is the root of the tree but not a directory")
        if len(parts) < self.strip or (len(parts) == self.strip and kind is not EntryKind.DIRECTORY):
            return None
        path = "/".join(parts[self.strip :])
        if not path:
            return self.directory("", mode, mtime)
        self.check_length(path, shown)
        target = ""
        if kind is EntryKind.SYMLINK:
            target = info.linkname
            if not target or "\0" in target:
                raise IngestError(f"symlink {shown} has an invalid (empty) target")
            if len(target.encode("utf-8", "surrogateescape")) > limits.max_path_length:
                raise IngestError(f"symlink {shown} has a target longer than {limits.max_path_length} bytes")
        elif kind is EntryKind.HARDLINK:
            target = self.link_target(info, shown)
        self.place(path, kind, shown)
        self.newest = mtime if self.newest is None else max(self.newest, mtime)
        if kind is EntryKind.DIRECTORY:
            return self.directory(path, mode, mtime)
        entry = TreeEntry(path, kind, mode=mode, mtime=mtime, uid=self.uid, gid=self.gid, target=target)
        if kind is EntryKind.FILE:
            self.files[path] = path
            fileobj = tar.extractfile(info)
            assert fileobj is not None  # a regular file
            self.current = _MemberStream(fileobj, info.size, shown)
            entry.size = info.size
            entry.stream = cast(BinaryIO, self.current)
        elif kind is EntryKind.HARDLINK:
            self.files[path] = target
        return entry

    def check_length(self, path: str, shown: str) -> None:
        limits = self.limits
        raw = path.encode("utf-8", "surrogateescape")
        if len(raw) > limits.max_path_length:
            raise IngestError(f"member {shown}: path longer than {limits.max_path_length} bytes")
        if max(len(p) for p in raw.split(b"/")) > limits.max_name_length:
            raise IngestError(
                f"member {shown}: a path component is longer than {limits.max_name_length} bytes"
            )

    def link_target(self, info: tarfile.TarInfo, shown: str) -> str:
        """The original file a hard link member names: an earlier regular file (links resolved)."""
        parts = _split(info.linkname, f"hard link {shown} (target {_show(info.linkname)})")
        original = self.files.get("/".join(parts[self.strip :])) if len(parts) > self.strip else None
        if original is None:
            raise IngestError(
                f"hard link {shown} points to {_show(info.linkname)}, which is not an earlier regular file of the archive"
            )
        return original

    def place(self, path: str, kind: EntryKind, shown: str) -> None:
        """Record ``path`` in the tree, refusing duplicates and paths through symlinks or files."""
        new = _DIR if kind is EntryKind.DIRECTORY else _SYMLINK if kind is EntryKind.SYMLINK else _FILE
        old = self.kinds.get(path)
        if old is not None:
            if new == _DIR and old in (_DIR, _IMPLIED):
                self.kinds[path] = _DIR
                return
            if old == _IMPLIED:
                raise IngestError(
                    f"member {shown} is a {_KIND_WORDS[kind]}, but earlier members use {_show(path)} as a directory"
                )
            raise IngestError(f"duplicate member {shown}: the path {_show(path)} occurs twice in the archive")
        parent, implied = path, []
        while "/" in parent:
            parent = parent.rsplit("/", 1)[0]
            old = self.kinds.get(parent)
            if old is None:
                implied.append(parent)
            elif old in (_DIR, _IMPLIED):
                break
            elif old == _SYMLINK:
                raise IngestError(
                    f"member {shown} goes through the symlink {_show(parent)}: a symlink cannot be used as a directory"
                )
            else:
                raise IngestError(
                    f"member {shown} goes through {_show(parent)}, which is a file, not a directory"
                )
        for p in implied:
            self.count(f"directory {_show(p)}")
            self.kinds[p] = _IMPLIED
            if p.endswith("/" + NESTED_MARKER):
                self.nested_catalog(p, shown)
        self.kinds[path] = new
        if path.endswith("/" + NESTED_MARKER):
            self.nested_catalog(path, shown)

    def nested_catalog(self, marker: str, shown: str) -> None:
        """Count the nested catalog that ``marker`` (a path ending in ``/.cvmfscatalog``, of any type: the
        writer nests on the name alone) makes of its directory, refusing too many or too deep ones.

        Members come in any order, so a marker may land above ones already seen: those sink one level.
        """
        limits = self.limits
        key = marker[: -len(NESTED_MARKER)]  # "<dir>/"
        if len(self.catalogs) >= limits.max_nested_catalogs:
            raise IngestError(
                f"too many nested catalogs: more than {limits.max_nested_catalogs} directories with a "
                f"{NESTED_MARKER} (at member {shown}; [limits] max_nested_catalogs)"
            )
        depth = 1
        below = []
        for other, other_depth in self.catalogs.items():
            if key.startswith(other):  # an enclosing catalog (the nearest one is the deepest)
                depth = max(depth, other_depth + 1)
            elif other.startswith(key):
                below.append(other)
        self.catalogs[key] = depth
        for other in below:
            self.catalogs[other] += 1
        deepest = max([depth, *(self.catalogs[o] for o in below)])
        if deepest > limits.max_catalog_depth:
            raise IngestError(
                f"nested catalogs too deep: {deepest} levels, more than {limits.max_catalog_depth} "
                f"(at member {shown}; [limits] max_catalog_depth)"
            )


def _read_head(stream: BinaryIO) -> bytes:
    head = b""
    while len(head) < BLOCKSIZE and (data := stream.read(BLOCKSIZE - len(head))):
        head += data
    return head


def _split(name: str, what: str) -> list[str]:
    """The components of a member name (or hard link target); unsafe names raise IngestError."""
    if not name:
        raise IngestError(f"{what}: empty name")
    if "\0" in name:
        raise IngestError(f"{what}: NUL character in the name")
    if name.startswith("/"):
        raise IngestError(f"{what}: absolute paths are not allowed")
    parts = [p for p in name.split("/") if p and p != "."]
    if ".." in parts:
        raise IngestError(f"{what}: '..' path components are not allowed")
    return parts


def _member_kind(info: tarfile.TarInfo, shown: str) -> EntryKind:
    if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and info.sparse is None:
        return EntryKind.FILE
    if info.type == tarfile.DIRTYPE:
        return EntryKind.DIRECTORY
    if info.type == tarfile.SYMTYPE:
        return EntryKind.SYMLINK
    if info.type == tarfile.LNKTYPE:
        return EntryKind.HARDLINK
    what = _SPECIAL_NAMES.get(info.type, f"of unsupported type {info.type!r}")
    if info.sparse is not None:
        what = "a sparse file"
    raise IngestError(
        f"member {shown} is {what}: only files, directories, symlinks and hard links are allowed"
    )


def _clamp_mtime(mtime: float) -> int:
    if not math.isfinite(mtime):
        return 0
    return min(max(int(mtime), 0), MTIME_MAX)
