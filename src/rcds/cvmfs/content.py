"""Turning file content into stored objects, in parallel, with a persistent content index.

Compression and hashing run on a thread pool (zlib and hashlib release the GIL), so ingest uses every
core while the caller keeps reading its input in order; past ``processes_after_files`` small files, a
transaction on a local store hands them to worker processes instead (``smallfiles``: per-file system
calls make threads trade the GIL). In-flight bytes are bounded, so memory does not
grow with the input. The content index maps the SHA-256 of a piece's *uncompressed* bytes to the stored
object, so re-publishing unchanged content costs one hash pass and no compression.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from ..storage import ObjectStore
from ..storage.local import LocalStore
from . import smallfiles
from .catalog import Chunk
from .chunking import ChunkParams, file_cuts, iter_chunks
from .contentindex import ContentIndex
from .hashes import ContentHash, Suffix
from .objects import compress

READ_BLOCK = 1 << 20
# Whole (unchunked) files are stored in batches, one pool task per batch: a future, a queue hand-off and
# an index query per file cost as much as deflating a small file. A batch closes at whichever comes first.
BATCH_FILES = 64
BATCH_BYTES = 1 << 20


@dataclass
class StoredContent:
    """Where a file's content went: one object, or chunks (``hash`` None)."""

    size: int
    hash: ContentHash | None
    chunks: list[Chunk] = field(default_factory=list)
    written_bytes: int = 0  # compressed bytes newly written (0 when deduplicated)


@dataclass
class IngestStats:
    files: int = 0
    bytes_in: int = 0
    objects_written: int = 0
    bytes_written: int = 0
    pieces_from_index: int = 0


_Stored = tuple[ContentHash, int]  # an object's hash, compressed bytes newly written (0: it existed)


class _Batch:
    """Whole files stored by one pool task: each a path to read there, or bytes read already."""

    def __init__(self) -> None:
        self.items: list[tuple[str | bytes, int]] = []
        self.nbytes = 0
        self.future: Future[list[_Stored | BaseException]] | None = None


class PendingContent:
    """The future result of ingesting one file."""

    def __init__(
        self,
        size: int,
        whole: Future[tuple[ContentHash, int]] | None,
        pieces: list[tuple[int, int, Future[tuple[ContentHash, int]]]],
        index_key: bytes | None,
        writer: ContentWriter,
        batch: _Batch | None = None,
        slot: int = 0,
    ) -> None:
        self.size = size
        self._whole = whole
        self._pieces = pieces
        self._index_key = index_key
        self._writer = writer
        self._batch = batch
        self._slot = slot
        self._result: StoredContent | None = None

    @classmethod
    def done(cls, stored: StoredContent, writer: ContentWriter) -> PendingContent:
        """Content known already (nothing written): no futures, which cost a re-push of 20,000 files ~0.2 s."""
        pending = cls(stored.size, None, [], None, writer)
        pending._result = stored
        return pending

    def ready(self) -> bool:
        """Whether ``result`` would return (or raise) without waiting."""
        if self._result is not None:
            return True
        if self._batch is not None:
            return self._batch.future is not None and self._batch.future.done()
        if self._whole is not None:
            return self._whole.done()
        return all(future.done() for _, _, future in self._pieces)

    def result(self) -> StoredContent:
        if self._result is None:
            if self._batch is not None:
                if self._batch.future is None:
                    self._writer._submit_batch()
                assert self._batch.future is not None
                outcome = self._batch.future.result()[self._slot]
                if isinstance(outcome, BaseException):
                    raise outcome
                self._result = StoredContent(self.size, outcome[0], [], outcome[1])
            elif self._whole is not None:
                h, written = self._whole.result()
                self._result = StoredContent(self.size, h, [], written)
            else:
                chunks: list[Chunk] = []
                written = 0
                for offset, size, fut in self._pieces:
                    h, w = fut.result()
                    chunks.append(Chunk(offset, size, h))
                    written += w
                self._result = StoredContent(self.size, None, chunks, written)
                if self._index_key is not None and self._writer.index is not None:
                    self._writer.index.put(self._index_key, _encode_chunks(chunks))
        return self._result


def _encode_chunks(chunks: list[Chunk]) -> bytes:
    return b"".join(struct.pack("<QQ", c.offset, c.size) + c.hash.digest for c in chunks)


def _decode_chunks(value: bytes) -> list[Chunk]:
    out = []
    for i in range(0, len(value), 36):
        off, size = struct.unpack_from("<QQ", value, i)
        out.append(Chunk(off, size, ContentHash(value[i + 16 : i + 36])))
    return out


class _Done(Future[tuple[ContentHash, int]]):
    def __init__(self, value: tuple[ContentHash, int]) -> None:
        super().__init__()
        self.set_result(value)


class FileCache(Protocol):
    """What a caller remembers of files it ingested before (``rcds push``'s stat cache): ``get`` returns
    the stored content of an unchanged file (its objects are in the store), ``put`` is told of every
    other file ingested, with its pending result."""

    def get(self, path: Path | str, size: int, st: os.stat_result | None = None) -> StoredContent | None: ...
    def put(self, path: Path | str, size: int, pending: PendingContent) -> None: ...


class ContentWriter:
    """Stores file content as objects; use one per transaction, then ``close``."""

    file_cache: FileCache | None = None  # consulted by ``add_file`` before it reads a file
    # Small files go to worker processes (``smallfiles``) once a transaction has this many, on a local
    # store: below it, starting the workers (~0.1 s, once per process) costs more than it saves.
    processes_after_files: int | None = 1000

    def __init__(
        self,
        store: ObjectStore,
        index: ContentIndex | None,
        params: ChunkParams | None = None,
        workers: int | None = None,
        max_inflight: int = 96 << 20,
    ) -> None:
        self.store = store
        self.index = index
        self.params = params or ChunkParams()
        workers = workers or store.parallelism or os.cpu_count() or 2
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rcds-ingest")
        # Batches of small files waiting or running: enough to keep every worker busy, few enough that a
        # fast tar stream does not park tens of MiB of small files in the queue (the byte budget alone
        # would let ~96 one-MiB batches wait).
        self._batch_slots = threading.Semaphore(2 * workers + 2)
        self._budget = threading.Semaphore(max(1, max_inflight // READ_BLOCK))
        self._stats_lock = threading.Lock()
        self.stats = IngestStats()
        # Objects this writer has stored or is storing (digest + suffix): identical content met twice in
        # one transaction (often in the same batch, before the index knows it) is put once, without
        # asking the store, whose put_object may not look first (S3 without peek_before_put).
        self._stored: set[bytes] = set()
        self._max_inflight_blocks = max(1, max_inflight // READ_BLOCK)
        self._batch = _Batch()
        self._small_files = 0
        self._in_workers: set[Future[list[_Stored | BaseException]]] = set()

    # --- pieces ----------------------------------------------------------------------------------

    def _count_file(self, size: int, pieces_from_index: int = 0) -> None:
        with self._stats_lock:
            self.stats.files += 1
            self.stats.bytes_in += size
            self.stats.pieces_from_index += pieces_from_index

    def _acquire(self, nbytes: int) -> int:
        # Rounded up: a batch of small files holding 1.9 MiB counts as two blocks, not one (rounding
        # down let ~96 near-1-MiB batches of a fast tar stream sit in memory at once).
        blocks = min(self._max_inflight_blocks, max(1, -(-nbytes // READ_BLOCK)))
        for _ in range(blocks):
            self._budget.acquire()
        return blocks

    def _release(self, blocks: int) -> None:
        for _ in range(blocks):
            self._budget.release()

    def _lookup(self, data: bytes | memoryview, suffix: Suffix) -> tuple[bytes | None, ContentHash | None]:
        """The index key of a piece and, if the index knows it and the object still exists, its hash."""
        if self.index is None:
            return None, None
        key = hashlib.sha256(data).digest() + suffix.value.encode()
        hit = self.index.get(key)
        if hit is not None:
            h = ContentHash(hit[:20])
            if self.store.exists(h.object_name(suffix)):
                with self._stats_lock:
                    self.stats.pieces_from_index += 1
                return key, h
        return key, None

    def _store_piece(self, data: bytes | memoryview, suffix: Suffix, blocks: int,
                     missed_key: bytes | None = None) -> tuple[ContentHash, int]:  # fmt: skip
        """Store one piece. ``missed_key``: the caller already probed the index under this key and missed."""
        try:
            key = missed_key
            if key is None:
                key, known = self._lookup(data, suffix)
                if known is not None:
                    return known, 0
            return self._compress_and_put(data, suffix, key)
        finally:
            self._release(blocks)

    def _compress_and_put(self, data: bytes | memoryview, suffix: Suffix, key: bytes | None) -> _Stored:
        """Deflate, name and store one piece the index did not know; record it under ``key``."""
        stored, h = compress(data)
        name = h.digest + suffix.value.encode()
        with self._stats_lock:
            first = name not in self._stored
            self._stored.add(name)
        written = False
        if first:
            try:
                written = self.store.put_object(h.object_name(suffix), stored)
            except BaseException:
                with self._stats_lock:  # not stored: a later copy must try again
                    self._stored.discard(name)
                raise
        if key is not None and self.index is not None:
            self.index.put(key, h.digest)
        if written:
            with self._stats_lock:
                self.stats.objects_written += 1
                self.stats.bytes_written += len(stored)
        return h, len(stored) if written else 0

    def _store_batch(self, batch: _Batch, blocks: int) -> list[_Stored | BaseException]:
        """Pool task: read, look up (one index query) and store the whole files of a batch.

        A file that fails (vanished, shorter than listed, a full disk) gets its own exception, raised by
        its ``PendingContent.result()``; the other files of the batch are stored as usual.
        """
        try:
            datas, keys = smallfiles.read_batch(batch.items, keyed=self.index is not None)
            known: dict[bytes, bytes] = {}
            if self.index is not None:
                known = self.index.get_many([k for k in keys if k is not None])
            out: list[_Stored | BaseException] = []
            for data, key in zip(datas, keys, strict=True):
                if isinstance(data, BaseException):
                    out.append(data)
                    continue
                hit = known.get(key) if key is not None else None
                if hit is not None:
                    h = ContentHash(hit[:20])
                    if self.store.exists(h.object_name(Suffix.NONE)):
                        with self._stats_lock:
                            self.stats.pieces_from_index += 1
                        out.append((h, 0))
                        continue
                try:
                    out.append(self._compress_and_put(data, Suffix.NONE, key))
                except Exception as exc:  # handed to the file's own result()
                    out.append(exc)
            return out
        finally:
            batch.items.clear()  # the pending results keep the batch: not its bytes
            self._release(blocks)
            self._batch_slots.release()

    def _add_to_batch(self, item: str | bytes, size: int) -> PendingContent:
        batch = self._batch
        batch.items.append((item, size))
        batch.nbytes += size
        pending = PendingContent(size, None, [], None, self, batch, len(batch.items) - 1)
        if len(batch.items) >= BATCH_FILES or batch.nbytes >= BATCH_BYTES:
            self._submit_batch()
        return pending

    def _submit_batch(self) -> None:
        """Hand the open batch to the pool (also when a result of it is wanted before it is full)."""
        batch = self._batch
        if not batch.items:
            return
        self._batch = _Batch()
        self._batch_slots.acquire()
        blocks = self._acquire(batch.nbytes)
        self._small_files += len(batch.items)
        batch.future = self._to_workers(batch, blocks) or self.pool.submit(self._store_batch, batch, blocks)
        after = self.processes_after_files
        if after and after // 2 < self._small_files <= after and isinstance(self.store, LocalStore):
            smallfiles.POOL.start_soon()  # half way there: the workers import while the threads go on

    def _to_workers(self, batch: _Batch, blocks: int) -> Future[list[_Stored | BaseException]] | None:
        """The batch's results from a worker process, or None where the threads store it."""
        after = self.processes_after_files
        if after is None or self._small_files <= after or not isinstance(self.store, LocalStore):
            return None
        index_path = str(self.index.path) if self.index is not None else None
        stored = smallfiles.POOL.submit((str(self.store.root), index_path, list(batch.items)))
        if stored is None:
            return None
        results: Future[list[_Stored | BaseException]] = Future()
        self._in_workers.add(results)

        def record(done: Future[list[smallfiles.FileOutcome | BaseException]]) -> None:
            try:
                results.set_result(self._record_stored(done.result()))
            except BaseException as exc:  # a worker lost (killed): every file of the batch fails with it
                results.set_exception(exc)
            finally:
                batch.items.clear()
                self._release(blocks)
                self._batch_slots.release()
                self._in_workers.discard(results)

        stored.add_done_callback(record)
        return results

    def _record_stored(
        self, outcomes: list[smallfiles.FileOutcome | BaseException]
    ) -> list[_Stored | BaseException]:
        """What a worker process stored, recorded as ``_store_batch`` records its own: stats, index entries."""
        out: list[_Stored | BaseException] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                out.append(outcome)
                continue
            key, digest, written = outcome
            h = ContentHash(digest)
            if written == smallfiles.FROM_INDEX:
                with self._stats_lock:
                    self.stats.pieces_from_index += 1
                out.append((h, 0))
                continue
            name = digest + Suffix.NONE.value.encode()
            with self._stats_lock:
                first = name not in self._stored
                self._stored.add(name)
                if first:
                    self.stats.objects_written += 1
                    self.stats.bytes_written += written
            if first and isinstance(self.store, LocalStore):
                self.store.note_written(written)  # toward its early sync, as its own puts count
            if key is not None and self.index is not None:
                self.index.put(key, digest)
            out.append((h, written if first else 0))
        return out

    def _submit(self, data: bytes, suffix: Suffix) -> Future[tuple[ContentHash, int]]:
        blocks = self._acquire(len(data))
        return self.pool.submit(self._store_piece, data, suffix, blocks)

    # --- files -----------------------------------------------------------------------------------

    def add_stream(self, stream: BinaryIO, size: int) -> PendingContent:
        """Ingest exactly ``size`` bytes from ``stream`` (read now, in order; stored in the background)."""
        self._count_file(size)
        if size <= self.params.min_size:
            return self._add_to_batch(_read_exact(stream, size), size)
        limited = cast(BinaryIO, _Limited(stream, size))
        pieces: list[tuple[int, int, Future[tuple[ContentHash, int]]]] = []
        offset = 0
        for chunk in iter_chunks(limited, self.params):
            if offset == 0 and len(chunk) == size:  # the detector found no cut: a sole piece is a whole file
                return PendingContent(size, self._submit(chunk, Suffix.NONE), [], None, self)
            pieces.append((offset, len(chunk), self._submit(chunk, Suffix.PARTIAL)))
            offset += len(chunk)
        if offset != size:
            raise EOFError(f"stream ended after {offset} of {size} bytes")
        return PendingContent(size, None, pieces, None, self)

    def add_file(
        self, path: Path | str, size: int | None = None, st: os.stat_result | None = None
    ) -> PendingContent:
        """Ingest a file on disk. Large files are hashed first: unchanged ones skip chunking entirely.
        ``st``, the file's ``stat`` if the caller has it, spares the file cache a second one."""
        size = os.path.getsize(path) if size is None else size
        if self.file_cache is not None:
            known = self.file_cache.get(path, size, st)
            if known is not None:
                self._count_file(size)
                return PendingContent.done(StoredContent(size, known.hash, list(known.chunks)), self)
            pending = self._add_file(path, size)
            self.file_cache.put(path, size, pending)
            return pending
        return self._add_file(path, size)

    def _add_file(self, path: Path | str, size: int) -> PendingContent:
        if size > self.params.min_size and self.index is not None:
            with open(path, "rb", buffering=0) as f:
                h = hashlib.file_digest(f, "sha256")  # into one reused buffer: no bytes object per block
            key = b"F" + h.digest() + struct.pack("<QQQ", *self._param_tuple())
            hit = self.index.get(key)
            if hit is not None:
                chunks = _decode_chunks(hit)
                if all(self.store.exists(c.hash.object_name(Suffix.PARTIAL)) for c in chunks):
                    self._count_file(size, pieces_from_index=len(chunks))
                    return PendingContent(
                        size, None, [(c.offset, c.size, _Done((c.hash, 0))) for c in chunks], None, self
                    )
            pending = self._add_big_file(path, size)
            if pending._whole is None:
                pending._index_key = key
            return pending
        if size > self.params.min_size:  # chunked, without an index to skip it
            return self._add_big_file(path, size)
        self._count_file(size)
        return self._add_to_batch(os.fspath(path), size)  # read by the pool task

    def _add_big_file(self, path: Path | str, size: int) -> PendingContent:
        """A file that may be chunked: cut here (``file_cuts`` reads only where a cut can fall), each piece
        read, deflated and stored by a pool task, so no piece's bytes pass through this thread."""
        name = os.fspath(path)
        pieces: list[tuple[int, int, Future[tuple[ContentHash, int]]]] = []
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for offset, length in file_cuts(fd, size, self.params):
                suffix = Suffix.NONE if length == size else Suffix.PARTIAL  # a sole piece is a whole file
                blocks = self._acquire(length)
                future = self.pool.submit(self._store_file_piece, name, offset, length, suffix, blocks)
                pieces.append((offset, length, future))
        finally:
            os.close(fd)
        self._count_file(size)
        if len(pieces) == 1:  # no cut: the whole file, one object
            return PendingContent(size, pieces[0][2], [], None, self)
        return PendingContent(size, None, pieces, None, self)

    def _store_file_piece(
        self, path: str, offset: int, length: int, suffix: Suffix, blocks: int
    ) -> tuple[ContentHash, int]:
        """Pool task: read ``length`` bytes of ``path`` at ``offset`` and store them as one piece."""
        try:
            data = smallfiles.read_file(path, length, offset)
        except BaseException:
            self._release(blocks)
            raise
        return self._store_piece(data, suffix, blocks)

    def _param_tuple(self) -> tuple[int, int, int]:
        return self.params.min_size, self.params.avg_size, self.params.max_size

    def store_blob(self, data: bytes, suffix: Suffix) -> ContentHash:
        """Store a small object now (markers, empty files)."""
        h, _ = self._submit(data, suffix).result()
        return h

    def close(self) -> None:
        """Wait for everything handed out (threads and worker processes) to end."""
        self._submit_batch()
        self.pool.shutdown(wait=True)
        for results in list(self._in_workers):
            with contextlib.suppress(Exception):
                results.result()


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    parts = []
    remaining = size
    while remaining:
        block = stream.read(min(remaining, 4 * READ_BLOCK))
        if not block:
            raise EOFError(f"stream ended {remaining} bytes early")
        parts.append(block)
        remaining -= len(block)
    return b"".join(parts) if len(parts) != 1 else parts[0]


class _Limited:
    """A read-only view of the next ``size`` bytes of a stream."""

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self._stream = stream
        self._left = size

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        n = self._left if n < 0 else min(n, self._left)
        data = self._stream.read(n)
        self._left -= len(data)
        return data

    def readinto(self, buf: memoryview | bytearray) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)
