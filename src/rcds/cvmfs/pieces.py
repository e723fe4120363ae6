"""A regular file as the objects it is stored in, and one object fetched into its range of a file.

``rcds get`` (``rcds.client.materialize``) and ``rcds shrinkwrap`` (``rcds.shrinkwrap.export``) build
files the same way: the file's **pieces** (one whole-file object, or its chunks) are fetched, each
verified against its content hash *as served*, inflated on the fly and written at its offset of the file
being built, so that no object is stored compressed or read twice. Both key what they keep by the same
**content key**, so that shrinkwrap can take files from ``rcds get``'s node cache.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..compat import SLOTS
from .catalog import COMPRESSION_NONE, Dirent
from .hashes import ContentHash, Suffix
from .objects import ZlibError, inflater

INFLATE_OUT = 4 << 20  # most bytes one inflate call may produce: bounds memory on a zip bomb


class Cancelled(Exception):
    """The fetch was cancelled (another piece failed, or the user interrupted)."""


class CorruptObject(Exception):
    """The bytes served for an object are not the object (hash, zlib stream or size is wrong)."""


class BadFileEntry(ValueError):
    """A catalog entry whose pieces cannot make the file (a broken chunk list, no content hash)."""


@dataclass(frozen=True, **SLOTS)
class Piece:
    hash: ContentHash
    suffix: Suffix
    offset: int
    size: int

    @property
    def name(self) -> str:
        return self.hash.object_name(self.suffix)


def dirent_mtime_ns(d: Dirent) -> int:
    """A catalog entry's mtime in nanoseconds."""
    return d.mtime * 1_000_000_000 + (d.mtimens or 0)


def content_key(d: Dirent, label: str) -> tuple[str, list[Piece]]:
    """The content key and the pieces of a non-empty regular file (``label`` names it in errors).

    The key is the content hash (``-raw`` when stored uncompressed), or for a chunked file the SHA-1 of
    its chunk list. Chunk lists are checked: contiguous, covering the size.
    """
    raw = "" if d.compression != COMPRESSION_NONE else "-raw"
    if d.is_chunked and d.chunks:
        pieces = [Piece(c.hash, Suffix.PARTIAL, c.offset, c.size) for c in d.chunks]
        expected = 0
        for p in pieces:
            if p.offset != expected or p.size <= 0:
                raise BadFileEntry(f"{label}: bad chunk list in the catalog (at offset {expected})")
            expected += p.size
        if expected != d.size:
            raise BadFileEntry(f"{label}: chunks cover {expected} bytes, the catalog says {d.size}")
        listing = "".join(f"{p.offset} {p.size} {p.hash.hex}\n" for p in pieces).encode()
        return hashlib.sha1(listing).hexdigest() + "-chunks" + raw, pieces
    if d.hash is None:
        raise BadFileEntry(f"{label}: regular file without content hash in the catalog")
    return d.hash.hex + raw, [Piece(d.hash, Suffix.NONE, 0, d.size)]


def lstat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def is_built(st: os.stat_result | None, size: int, mode: int, mtime_ns: int) -> bool:
    """Whether a local file (``st``) is one built from pieces with this size, mode and mtime: a file is
    given its mode and mtime only once it is complete, so these tell a finished file from a leftover."""
    return (
        st is not None
        and stat.S_ISREG(st.st_mode)
        and st.st_size == size
        and stat.S_IMODE(st.st_mode) == mode
        and st.st_mtime_ns == mtime_ns
    )


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class PieceSink:
    """The file object one piece is fetched into (by ``Source.fetch``).

    It hashes the bytes as served (the CVMFS name is the hash of the stored bytes), inflates them and
    writes the plain bytes at the piece's offset of ``fd``. A source that fails over mid-transfer rewinds
    it with ``seek(0)`` + ``truncate()``: that restarts hash and inflater and rewrites the same range.
    ``on_received(n)`` is told of every byte served, ``on_written(n)`` of every byte written (negative
    on a rewind), ``cancel`` stops the transfer at the next write.
    """

    def __init__(
        self,
        fd: int,
        piece: Piece,
        compressed: bool,
        cancel: threading.Event,
        on_received: Callable[[int], None],
        on_written: Callable[[int], None],
    ) -> None:
        self._fd = fd
        self._piece = piece
        self._compressed = compressed
        self._cancel = cancel
        self._on_received = on_received
        self._on_written = on_written
        self.error: CorruptObject | None = None  # what made this object corrupt, once it is
        self._start()

    def _corrupt(self, reason: str) -> CorruptObject:
        """The error to raise, remembered: a batch of sinks fetched together tells which one failed."""
        error = self.error = CorruptObject(reason)
        return error

    def _start(self) -> None:
        self.error = None
        self.hasher = self._piece.hash.algorithm.new()
        self.inflater = inflater() if self._compressed else None
        self.received = 0
        self.written = 0

    def write(self, data: bytes) -> int:
        if self._cancel.is_set():
            raise Cancelled()
        self.received += len(data)
        self._on_received(len(data))
        self.hasher.update(data)
        if self.inflater is None:
            self._put(data)
            return len(data)
        buf = data
        while buf:
            try:
                out = self.inflater.decompress(buf, INFLATE_OUT)
            except ZlibError as exc:
                # What is wrong, not which inflater noticed (their messages differ): a job client on a
                # bare python3 and an installed rcds report a damaged object in the same words.
                raise self._corrupt("not a valid zlib stream") from exc
            self._put(out)
            buf = self.inflater.unconsumed_tail
        return len(data)

    def _put(self, out: bytes) -> None:
        if not out:
            return
        if self.written + len(out) > self._piece.size:
            raise self._corrupt(f"inflates to more than the {self._piece.size} bytes the catalog says")
        pwrite_all(self._fd, out, self._piece.offset + self.written)
        self.written += len(out)
        self._on_written(len(out))

    def finish(self) -> None:
        """Check the whole piece arrived intact: hash, a complete zlib stream, the catalog's size."""
        if self.hasher.digest() != self._piece.hash.digest:
            raise self._corrupt("content hash mismatch")
        if self.inflater is not None:
            try:
                self._put(self.inflater.flush())
            except ZlibError as exc:
                raise self._corrupt("not a valid zlib stream") from exc
            if not self.inflater.eof:
                raise self._corrupt("truncated zlib stream")
            if self.inflater.unused_data:
                raise self._corrupt("data after the end of the zlib stream")
        if self.written != self._piece.size:
            raise self._corrupt(f"inflates to {self.written} bytes, the catalog says {self._piece.size}")

    # --- what HttpSource needs to rewind on failover ----------------------------------------------

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.received

    def seek(self, pos: int) -> int:
        if pos != 0:
            raise ValueError("can only rewind to the start")
        self._on_written(-self.written)
        self._start()
        return 0

    def truncate(self) -> int:
        return 0  # the same byte range is rewritten from the start; the size is checked at the end


__all__ = [
    "INFLATE_OUT",
    "BadFileEntry",
    "Cancelled",
    "CorruptObject",
    "Piece",
    "PieceSink",
    "content_key",
    "dirent_mtime_ns",
    "is_built",
    "lstat_or_none",
    "pwrite_all",
]
