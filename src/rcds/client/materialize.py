"""The engine of ``rcds get``: materialise a published directory of a repository into a local directory.

This is what ``cp -a /cvmfs/<repo>/<path> DEST`` would do on a node with a CVMFS mount, for nodes without
FUSE. The tree is read from the (already verified) catalogs; every object is fetched over HTTP, verified
against its content hash while it streams, inflated on the fly and written once, as plain bytes. The file
becomes both the DEST file and an entry of a node cache shared by all jobs on the node (two names, one
inode), so a second ``get`` of the same code is nothing but ``link(2)`` calls and costs no extra disk.

Why the cache looks the way it does:

* An entry is keyed by content *and* by mode and mtime (``files/ab/<content>_<mode>_<mtime ns>``), because
  hard links share the inode and therefore its metadata: two files with the same bytes but another mode
  need two inodes. Another variant of the same content is made by a local copy, never downloaded again.
* An entry gets its name (``link(2)``, or ``rename(2)`` of a temp file) only once it is complete, verified
  and has its final mode and mtime, so concurrent ``get`` processes sharing the cache, and interrupted
  ones, never see half-written content. The first writer of an entry wins; a racing one links its DEST
  file to the winner's inode instead, so the data stays on disk once.
* A file written through one of its hard links changes the cache entry too. That is detected on reuse
  (size, mode or mtime no longer match the name) and the entry is rebuilt, so the change does not spread.

DEST itself appears atomically: the tree is built in a hidden sibling staging directory and renamed at the
very end, so DEST either does not exist or is complete.
"""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import logging
import os
import secrets
import shutil
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

from ..affinity import threads_on_one_cpu
from ..compat import SLOTS
from ..cvmfs.catalog import COMPRESSION_NONE, NESTED_MARKER, Dirent
from ..cvmfs.hashes import ContentHash, Suffix, normalize_path
from ..cvmfs.pieces import (
    BadFileEntry,
    Cancelled,
    CorruptObject,
    Piece,
    PieceSink,
    content_key,
    dirent_mtime_ns,
    is_built,
    lstat_or_none,
)
from ..cvmfs.reader import ReaderError, RepositoryReader
from ..cvmfs.sources import HttpSource, NotFound, SourceError
from ..logs import fields
from .progress import Progress

log = logging.getLogger("rcds.client")

__all__ = ["MaterializeError", "MaterializeStats", "materialize"]

_READ_BLOCK = 1 << 20  # bytes read from a response at a time
_TMP_MAX_AGE = 3600.0  # seconds; older files in <cache>/tmp are leftovers of killed processes
_LINK_FALLBACK = (errno.EXDEV, errno.EMLINK, errno.EPERM)
_PLACE_BATCH = 256  # cached entries handed to one worker task (keeps per-task overhead low)
_SMALL_PIECE = 256 * 1024  # objects below this size are fetched in batches...
_BATCH_PIECES = 16  # ...of at most this many (and about _SMALL_PIECE bytes)
_EMPTY_KEY = "empty"  # content key of size-0 files: nothing to fetch, the size says it all


@dataclass
class MaterializeStats:
    """What a ``materialize`` call did. Tree totals count every name (hard links included)."""

    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    downloaded_bytes: int = 0  # as served (compressed), every attempt included
    cached_files: int = 0  # regular files whose content was already in the node cache
    linked_files: int = 0  # DEST files that are hard links (to the cache or within a hard-link group)
    copied_files: int = 0  # DEST files whose bytes were copied
    seconds: float = 0.0


class MaterializeError(Exception):
    """The directory could not be materialised; DEST was left untouched (it does not exist)."""


@dataclass(**SLOTS)
class _Target:
    rel: str  # path below DEST
    group: tuple[str, int] | None  # hard-link group: (catalog mountpoint, group id)


@dataclass(**SLOTS)
class _Entry:
    """One cache entry (content + mode + mtime) and the DEST files made from it."""

    name: str  # relative to the cache root
    mode: int
    mtime_ns: int
    targets: list[_Target] = field(default_factory=list)


@dataclass(**SLOTS)
class _Content:
    """Distinct file content needed by the tree, with the cache entries (variants) that hold it."""

    key: str
    size: int
    compressed: bool
    pieces: list[Piece]
    label: str  # a path below DEST, for messages
    entries: list[_Entry] = field(default_factory=list)


class _Job:
    """A content to build in the cache: by download (piece by piece, in parallel) or by local copy."""

    def __init__(
        self, content: _Content, missing: list[_Entry], cached: list[_Entry], copy_from: str | None
    ) -> None:
        self.content = content
        self.missing = missing  # entries to create
        self.cached = cached  # entries already valid (their targets are placed with the others)
        self.copy_from = copy_from  # a valid cache file with the same content, if any
        self.lock = threading.Lock()
        self.remaining = len(content.pieces)
        self.failed = False
        self.fd: int | None = None
        self.tmp: str | None = None  # the file being written: a temp file in the cache, or in DEST
        self.direct = False  # written straight into the staging tree


def _entry_name(key: str, mode: int, mtime_ns: int) -> str:
    return f"files/{key[:2]}/{key[2:]}_{mode:o}_{mtime_ns}"


def _parse_entry_name(name: str) -> tuple[str, int, int] | None:
    """``<key rest>_<mode>_<mtime>`` -> (key rest, mode, mtime ns), None for a foreign name."""
    parts = name.rsplit("_", 2)
    if len(parts) != 3:
        return None
    try:
        return parts[0], int(parts[1], 8), int(parts[2])
    except ValueError:
        return None


def _force_rmtree(path: Path) -> None:
    """``rm -rf`` that also gets through directories without write permission (read-only trees)."""
    if not os.path.lexists(path):
        return
    if not path.is_dir() or path.is_symlink():
        path.unlink()
        return
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                with contextlib.suppress(OSError):
                    os.chmod(p, 0o700)
    shutil.rmtree(path)


class _Run:
    """State of one ``materialize`` call, shared by the worker threads.

    Paths are plain strings here: per-file ``pathlib`` overhead is measurable with tens of thousands of
    files, and the per-file work runs under the GIL.
    """

    def __init__(self, reader: RepositoryReader, staging: str, cache: str, link: bool) -> None:
        self.reader = reader
        self.staging = staging
        self.cache = cache
        self.tmpdir = os.path.join(cache, "tmp")
        self.link = link
        self.progress = Progress(None, "", enabled=False)  # replaced once the bytes to fetch are known
        self.cancel = threading.Event()
        self.stats = MaterializeStats()
        self._lock = threading.Lock()
        self._link_works = True  # cleared after EXDEV: no point trying link(2) for every file
        self._variants: dict[str, dict[str, list[str]]] = {}  # fan-out dir -> key rest -> names
        self._tmp_prefix = f"{os.getpid()}-{secrets.token_hex(4)}-"
        self._tmp_counter = itertools.count()

    # --- counters ------------------------------------------------------------------------------------

    def add_downloaded(self, n: int) -> None:
        with self._lock:
            self.stats.downloaded_bytes += n

    def add_progress(self, n: int) -> None:
        with self._lock:
            self.progress.update(n)

    def _count(self, linked: int, copied: int, cached: int = 0) -> None:
        with self._lock:
            self.stats.linked_files += linked
            self.stats.copied_files += copied
            self.stats.cached_files += cached

    # --- cache ---------------------------------------------------------------------------------------

    def temp(self) -> str:
        return f"{self.tmpdir}/{self._tmp_prefix}{next(self._tmp_counter)}"

    def path(self, entry: _Entry) -> str:
        return f"{self.cache}/{entry.name}"

    def clean_tmp(self) -> None:
        limit = time.time() - _TMP_MAX_AGE
        with os.scandir(self.tmpdir) as it:
            for e in it:
                with contextlib.suppress(OSError):
                    # ctime: a finished temp file already carries the (old) mtime of its entry
                    if e.stat(follow_symlinks=False).st_ctime < limit:
                        os.unlink(e.path)

    def other_variant(self, content: _Content) -> str | None:
        """A valid cache file with this content under another mode/mtime (made by an earlier run)."""
        fan, rest = content.key[:2], content.key[2:]
        index = self._variants.get(fan)
        if index is None:
            index = {}
            with contextlib.suppress(FileNotFoundError), os.scandir(f"{self.cache}/files/{fan}") as it:
                for e in it:
                    parsed = _parse_entry_name(e.name)
                    if parsed is not None:
                        index.setdefault(parsed[0], []).append(e.name)
            self._variants[fan] = index
        for name in index.get(rest, []):
            path = f"{self.cache}/files/{fan}/{name}"
            parsed = _parse_entry_name(name)
            st = lstat_or_none(path)
            if parsed and st is not None and is_built(st, content.size, parsed[1], parsed[2]):
                return path
        return None

    def _move_in(self, tmp: str, entry: _Entry, size: int) -> str:
        """Make a complete temp file the entry, atomically; if a racing writer was first, keep theirs.

        ``link(2)`` rather than ``rename(2)``: replacing an entry drops the link count of the inode other
        processes are linking into their trees at that moment, and linking an inode whose last name just
        went away fails (ENOENT). Only an entry that is no longer valid is replaced.
        """
        path = self.path(entry)
        for _ in range(2):
            try:
                os.link(tmp, path)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                continue
            except FileExistsError:
                st = lstat_or_none(path)
                if st is None or not is_built(st, size, entry.mode, entry.mtime_ns):
                    os.rename(tmp, path)
                    return path
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                os.rename(tmp, path)  # no hard links here: an atomic replace will do
                return path
            os.unlink(tmp)
            return path
        os.rename(tmp, path)
        return path

    def copy_variant(self, src: str, entry: _Entry, size: int) -> str:
        tmp = self.temp()
        try:
            shutil.copyfile(src, tmp)
            os.chmod(tmp, entry.mode)
            os.utime(tmp, ns=(entry.mtime_ns, entry.mtime_ns))
            return self._move_in(tmp, entry, size)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # --- placing files into the staging tree ---------------------------------------------------------

    def _try_link(self, src: str, dst: str, from_cache: bool) -> bool:
        """``link(2)``; False where a copy must do instead (other file system, link limit, not allowed)."""
        if from_cache and not self._link_works:
            return False
        for attempt in range(3):
            try:
                os.link(src, dst)
                break
            except FileNotFoundError:
                # Another process replaced or discarded the entry (rare: it was no longer valid) and the inode
                # lost its last name between lookup and link; the name may point to a new inode by now.
                if not from_cache or attempt == 2 or not os.path.isdir(os.path.dirname(dst)):
                    raise
                time.sleep(0.01)
            except OSError as exc:
                if exc.errno not in _LINK_FALLBACK:
                    raise
                if exc.errno == errno.EXDEV and from_cache and self._link_works:
                    self._link_works = False
                    log.info("cache is on another file system: copying", extra=fields(cache=self.cache))
                return False
        return True

    def _copy(self, src: str, dst: str, entry: _Entry) -> None:
        shutil.copyfile(src, dst)
        os.chmod(dst, entry.mode)
        os.utime(dst, ns=(entry.mtime_ns, entry.mtime_ns))

    def place(self, src: str, entry: _Entry, cached: bool, written: bool = False) -> None:
        """Make the entry's DEST files from the cache file ``src``, keeping hard-link groups together.

        ``written``: the first target is ``src`` itself (downloaded straight into the staging tree).
        """
        linked = copied = 0
        leaders: dict[tuple[str, int], str] = {}  # hard-link group -> its first DEST file
        for i, t in enumerate(entry.targets):
            dst = f"{self.staging}/{t.rel}"
            leader = leaders.get(t.group) if t.group is not None else None
            if i == 0 and written:
                linked_now = True
            else:
                try:
                    # A later member of a hard-link group links to the first; anything else to the cache file.
                    linked_now = (leader is not None and self._try_link(leader, dst, from_cache=False)) or (
                        self.link and self._try_link(src, dst, from_cache=True)
                    )
                    if not linked_now:
                        self._copy(src, dst, entry)
                except OSError as exc:
                    raise MaterializeError(self._os_message(exc, t.rel)) from exc
            linked += linked_now
            copied += not linked_now
            if t.group is not None and leader is None:
                leaders[t.group] = dst
        self._count(linked, copied, len(entry.targets) if cached else 0)

    def place_batch(self, batch: list[tuple[str, _Entry]]) -> None:
        for src, entry in batch:
            if self.cancel.is_set():
                raise Cancelled()
            self.place(src, entry, cached=True)

    # --- building cache entries ----------------------------------------------------------------------

    def run_copy_job(self, job: _Job) -> None:
        """Make the missing variants of a content from one already in the cache (no download)."""
        assert job.copy_from is not None
        for entry in job.missing:
            if self.cancel.is_set():
                raise Cancelled()
            try:
                path = self.copy_variant(job.copy_from, entry, job.content.size)
            except OSError as exc:
                raise MaterializeError(
                    f"cannot copy cache entry {job.copy_from} for {job.content.label}: {exc}"
                ) from exc
            self.place(path, entry, cached=True)
        for entry in job.cached:
            self.place(self.path(entry), entry, cached=True)

    def run_pieces(self, batch: list[tuple[_Job, Piece]]) -> None:
        prefetched = self._prefetch([piece for job, piece in batch if job.content.size > 0])
        for job, piece in batch:
            if self.cancel.is_set():
                raise Cancelled()
            self.run_piece(job, piece, prefetched.get(piece.name))

    def _prefetch(self, pieces: list[Piece]) -> dict[str, bytes]:
        """The served bytes of a batch of small pieces, requested together (``Source.fetch_many``: pipelined
        over HTTP; the batch holds at most ~256 KiB). Whatever fails here is simply fetched again, one by
        one, by ``_fetch``, which then reports the error."""
        if len(pieces) < 2:
            return {}
        bufs = [io.BytesIO() for _ in pieces]
        try:
            errors = self.reader.source.fetch_many([(p.name, b) for p, b in zip(pieces, bufs)])
        except Exception:
            return {}
        # fetch_many gives one error (or None) per item
        return {p.name: b.getvalue() for p, b, e in zip(pieces, bufs, errors) if e is None}

    def run_piece(self, job: _Job, piece: Piece, prefetched: bytes | None = None) -> None:
        """Download one object of a job (unless ``prefetched``); the thread finishing the job's last piece
        publishes the entries."""
        c = job.content
        try:
            with job.lock:
                if job.failed:
                    raise Cancelled()
                if job.fd is None:
                    # With hard links, write straight into the staging tree and link the finished file
                    # into the cache: one file and two names, fewer directory operations than a temp file.
                    job.direct = self.link and self._link_works
                    job.tmp = f"{self.staging}/{job.missing[0].targets[0].rel}" if job.direct else self.temp()
                    job.fd = os.open(job.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                fd = job.fd
            if c.size > 0:
                self._fetch(fd, piece, c, prefetched)
        except BaseException as exc:
            with job.lock:
                job.failed = True
                job.remaining -= 1
                last = job.remaining == 0
            if last:
                self.abort_job(job)
            error = self._error(exc, piece, c)
            if error is exc:
                raise
            raise error from exc
        with job.lock:
            job.remaining -= 1
            done = job.remaining == 0
            ok = done and not job.failed
        if ok:
            try:
                self.finish_job(job)
            except OSError as exc:
                self.abort_job(job)
                raise MaterializeError(self._os_message(exc, c.label)) from exc
        elif done:
            self.abort_job(job)

    def _fetch(self, fd: int, piece: Piece, c: _Content, prefetched: bytes | None = None) -> None:
        """Download (unless ``prefetched``), verify and inflate one object into place.

        A corrupt object is fetched once more with ``Cache-Control: no-cache``, as the CVMFS client does:
        a proxy that cached bad bytes would otherwise serve them until they expire.
        """
        for fresh in (False, True):
            sink = PieceSink(fd, piece, c.compressed, self.cancel, self.add_downloaded, self.add_progress)
            try:
                if prefetched is not None and not fresh:
                    sink.write(prefetched)
                else:
                    self.reader.source.fetch(piece.name, sink, fresh=fresh)  # type: ignore[arg-type]
                sink.finish()
                return
            except CorruptObject:
                if fresh:
                    raise
                sink.seek(0)

    def finish_job(self, job: _Job) -> None:
        """Publish the downloaded content as every missing variant, then place all the job's files."""
        assert job.fd is not None and job.tmp is not None
        size = job.content.size
        first, *others = job.missing
        made = [(self.copy_variant(job.tmp, e, size), e) for e in others]  # while the file is still 0600
        os.fchmod(job.fd, first.mode)
        os.utime(job.fd, ns=(first.mtime_ns, first.mtime_ns))
        os.close(job.fd)
        job.fd = None
        written, job.tmp = job.tmp, None
        if job.direct:
            in_cache = self._link_in(written, first, size)
            self.place(written, first, cached=False, written=True)
            if not in_cache:  # the DEST file stays, but it is not the cache's: count it as a copy
                self._count(-1, 1)
        else:
            self.place(self._move_in(written, first, size), first, cached=False)
        for path, entry in made:
            self.place(path, entry, cached=False)
        for entry in job.cached:
            self.place(self.path(entry), entry, cached=True)

    def _link_in(self, written: str, entry: _Entry, size: int) -> bool:
        """Give a finished file in the staging tree its name in the cache.

        False if the DEST file did not become the cache entry's inode (the cache got a copy, or kept a
        racing writer's entry that could not be linked).
        """
        path = self.path(entry)
        for _ in range(2):
            try:
                os.link(written, path)
                return True
            except FileNotFoundError:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            except FileExistsError:
                st = lstat_or_none(path)
                if st is None or not is_built(st, size, entry.mode, entry.mtime_ns):
                    tmp = self.temp()
                    os.link(written, tmp)
                    os.rename(tmp, path)
                    return True
                # A racing writer was first: use its inode in DEST too, so the data is on disk once.
                tmp = f"{os.path.dirname(written)}/.rcds-{self._tmp_prefix}{next(self._tmp_counter)}"
                if not self._try_link(path, tmp, from_cache=True):
                    return False
                os.rename(tmp, written)
                return True
            except OSError as exc:
                if exc.errno not in _LINK_FALLBACK:
                    raise
                if exc.errno == errno.EXDEV:
                    self._link_works = False
                break
        self.copy_variant(written, entry, size)
        return False

    def abort_job(self, job: _Job) -> None:
        """Close and delete the temp file of a job that failed or was cancelled (idempotent)."""
        with job.lock:
            fd, tmp = job.fd, job.tmp
            job.fd, job.tmp, job.failed = None, None, True
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _os_message(self, exc: OSError, label: str) -> str:
        if exc.errno == errno.ENOSPC:
            return (
                f"no space left on device while writing {label} (cache {self.cache}, staging {self.staging})"
            )
        return f"cannot write {label}: {exc}"

    def _error(self, exc: BaseException, piece: Piece, c: _Content) -> BaseException:
        if isinstance(exc, (Cancelled, MaterializeError, KeyboardInterrupt, SystemExit)):
            return exc
        if isinstance(exc, CorruptObject):
            return MaterializeError(f"object {piece.name} of {c.label} is corrupt: {exc}")
        if isinstance(exc, NotFound):
            return MaterializeError(f"object {piece.name} of {c.label} is missing on the server: {exc}")
        if isinstance(exc, SourceError):
            return MaterializeError(f"cannot download object {piece.name} of {c.label}: {exc}")
        if isinstance(exc, OSError):
            return MaterializeError(self._os_message(exc, c.label))
        return MaterializeError(f"cannot fetch object {piece.name} of {c.label}: {exc!r}")


# --- planning ----------------------------------------------------------------------------------------


@dataclass
class _Plan:
    dirs: list[tuple[str, int, int]] = field(default_factory=list)  # rel, mode, mtime ns
    symlinks: list[tuple[str, str, int]] = field(default_factory=list)  # rel, target, mtime ns
    contents: dict[str, _Content] = field(default_factory=dict)


def _pieces(d: Dirent, rel: str) -> tuple[str, list[Piece]]:
    """The content key and the objects of a regular file (checked: contiguous, covering the size)."""
    if d.size == 0:
        return _EMPTY_KEY, [Piece(ContentHash(bytes(20)), Suffix.NONE, 0, 0)]
    try:
        return content_key(d, rel)
    except BadFileEntry as exc:
        raise MaterializeError(str(exc)) from exc


def _check_name(name: str, parent: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise MaterializeError(f"unsafe entry name {name!r} in {parent or '/'} of the catalog")


def _plan(reader: RepositoryReader, top: str, stats: MaterializeStats) -> _Plan:
    """Everything to create, from the catalogs, before anything is written: a bad catalog fails early.

    Hidden entries are left out (a mount does not show them either), special files skipped with a warning.
    """
    plan = _Plan()
    entries: dict[tuple[str, int, int], _Entry] = {}
    mounts: dict[str, str] = {}  # directory -> mountpoint of the catalog holding its children
    skipped: set[str] = set()
    try:
        top_dirent = reader.stat(top)
    except FileNotFoundError as exc:
        raise MaterializeError(
            f"{top or '/'} does not exist in {reader.fqrn} (revision {reader.revision})"
        ) from exc
    if not top_dirent.is_dir:
        raise MaterializeError(f"{top or '/'} is not a directory in {reader.fqrn}")
    for e in reader.walk(top):
        path, d = e.path, e.dirent
        if path == top:
            mounts[top] = top if (d.is_nested_root or not top) else reader.catalog_for(top)[0]
            plan.dirs.append(("", d.mode & 0o3777, dirent_mtime_ns(d)))
            stats.directories += 1
            continue
        parent, name = path.rsplit("/", 1)
        if parent in skipped or d.is_hidden:
            skipped.add(path)
            continue
        _check_name(name, parent)
        rel = path[len(top) + 1 :]
        if d.is_dir:
            mounts[path] = path if d.is_nested_root else mounts[parent]
            plan.dirs.append((rel, d.mode & 0o3777, dirent_mtime_ns(d)))
            stats.directories += 1
        elif d.is_symlink:
            plan.symlinks.append((rel, d.symlink, dirent_mtime_ns(d)))
            stats.symlinks += 1
        elif d.is_regular:
            if parent == top and name == NESTED_MARKER and top_dirent.is_nested_root and d.size == 0:
                continue  # the marker rcds adds to every published tree: not part of the user's files
            if d.is_external:
                raise MaterializeError(f"{rel} is an external file (its content is not in the repository)")
            key, pieces = _pieces(d, rel)
            mode, mtime_ns = d.mode & 0o777, dirent_mtime_ns(d)
            entry = entries.get((key, mode, mtime_ns))
            if entry is None:
                entry = entries[key, mode, mtime_ns] = _Entry(
                    _entry_name(key, mode, mtime_ns), mode, mtime_ns
                )
                content = plan.contents.get(key)
                if content is None:
                    compressed = d.compression != COMPRESSION_NONE
                    content = plan.contents[key] = _Content(key, d.size, compressed, pieces, rel)
                content.entries.append(entry)
            group = (mounts[parent], d.hardlink_group) if d.hardlink_group else None
            entry.targets.append(_Target(rel, group))
            stats.files += 1
            stats.bytes += d.size
        else:
            log.warning("skipping special file", extra=fields(path=path, mode=f"{d.mode:o}"))
    return plan


# --- the public entry point --------------------------------------------------------------------------


def materialize(
    reader: RepositoryReader,
    path: str,
    dest: Path,
    *,
    cache_dir: Path | None = None,
    jobs: int = 8,
    link: bool = True,
    progress: bool = True,
) -> MaterializeStats:
    """Recreate the repository directory ``path`` as the new local directory ``dest``.

    ``reader`` must be open and trusted (manifest signature and whitelist verified). ``cache_dir`` is the
    node cache shared by every job on the node (and by concurrent processes); without it a private cache
    beside ``dest`` is used, kept if the call fails (a re-run resumes from it) and removed on success.
    ``jobs`` objects are fetched at once.

    With ``link`` DEST files are hard links to the cache entries where the file system allows (otherwise
    copies). Such a file must not be modified in place: that would modify the cache entry too (the next
    ``get`` notices and rebuilds the entry, but this DEST keeps the change). ``link=False`` always copies:
    for trees that will be edited. Identical files (same content, mode and mtime) share one inode in DEST
    with ``link``; true hard-link groups share one inode either way.

    Modes keep the permission bits (setuid/setgid dropped from files); owners are the caller's. Special
    files are skipped with a warning. The ``.cvmfscatalog`` marker rcds adds at the top of every
    published tree is left out; markers deeper down came from the user's files and are kept.

    Raises ``MaterializeError`` with DEST untouched (and no partial tree anywhere) on any failure;
    complete cache entries stay, so a re-run only fetches what is still missing.
    """
    started = time.monotonic()
    try:
        top = normalize_path(path)
    except ValueError as exc:
        raise MaterializeError(str(exc)) from exc
    dest = Path(os.path.abspath(dest))
    if not dest.name:
        raise MaterializeError(f"{dest} is not a usable destination")
    if os.path.lexists(dest):
        raise MaterializeError(f"{dest} already exists: rcds get only creates new directories")
    if jobs < 1:
        raise ValueError("jobs must be at least 1")
    stats = MaterializeStats()
    try:
        plan = _plan(reader, top, stats)
    except ReaderError as exc:
        raise MaterializeError(f"cannot read the catalogs of {reader.fqrn}: {exc}") from exc

    parent = dest.parent
    staging = parent / f".{dest.name}.rcds-partial"
    cache = parent / f".{dest.name}.rcds-cache" if cache_dir is None else Path(os.path.abspath(cache_dir))
    run = _Run(reader, str(staging), str(cache), link)
    source = reader.source
    if isinstance(source, HttpSource) and jobs > source.settings.max_connections:
        jobs = source.settings.max_connections  # more threads would only queue for a pooled connection
        log.info("jobs limited to the HTTP connection pool", extra=fields(jobs=jobs))
    try:
        parent.mkdir(parents=True, exist_ok=True)
        (cache / "tmp").mkdir(parents=True, exist_ok=True)
        (cache / "files").mkdir(exist_ok=True)
        run.clean_tmp()
        if os.path.lexists(staging):
            log.info("removing the staging directory of an interrupted run", extra=fields(path=str(staging)))
            _force_rmtree(staging)
        work = _classify(run, plan)
    except OSError as exc:
        raise MaterializeError(f"cannot prepare {staging} and the cache {cache}: {exc}") from exc

    total = sum(j.content.size for j in work.downloads)
    with Progress(total, f"get {dest.name}", enabled=progress) as bar:
        run.progress = bar
        try:
            _build(run, plan, work, jobs)
            if os.path.lexists(dest):
                raise MaterializeError(f"{dest} appeared while it was being materialised")
            os.rename(staging, dest)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                _force_rmtree(staging)
            if isinstance(exc, OSError):
                raise MaterializeError(run._os_message(exc, str(dest))) from exc
            raise
    if cache_dir is None:
        with contextlib.suppress(OSError):
            _force_rmtree(cache)
    stats.downloaded_bytes = run.stats.downloaded_bytes
    stats.cached_files = run.stats.cached_files
    stats.linked_files = run.stats.linked_files
    stats.copied_files = run.stats.copied_files
    stats.seconds = time.monotonic() - started
    log.info(
        "get",
        extra=fields(
            repository=reader.fqrn,
            revision=reader.revision,
            path=top or "/",
            dest=str(dest),
            files=stats.files,
            directories=stats.directories,
            symlinks=stats.symlinks,
            bytes=stats.bytes,
            downloaded_bytes=stats.downloaded_bytes,
            cached_files=stats.cached_files,
            linked_files=stats.linked_files,
            copied_files=stats.copied_files,
            seconds=stats.seconds,
        ),
    )
    return stats


@dataclass
class _Work:
    ready: list[tuple[str, _Entry]]  # every variant already in the cache: only place the files
    copies: list[_Job]  # made locally: from another variant in the cache, or empty files
    downloads: list[_Job]


def _classify(run: _Run, plan: _Plan) -> _Work:
    """Look every needed entry up in the cache (discarding modified ones) and sort out what to do."""
    work = _Work([], [], [])
    for c in plan.contents.values():
        cached, missing = [], []
        for e in c.entries:
            path = run.path(e)
            st = lstat_or_none(path)
            if st is not None and is_built(st, c.size, e.mode, e.mtime_ns):
                cached.append(e)
                continue
            if st is not None:
                log.warning(
                    "cache entry was modified (written through a hard link?): rebuilding it",
                    extra=fields(entry=path, path=c.label),
                )
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            missing.append(e)
        if not missing:
            work.ready.extend((run.path(e), e) for e in cached)
            continue
        source = run.path(cached[0]) if cached else run.other_variant(c)
        job = _Job(c, missing, cached, source)
        (work.copies if source is not None or c.key == _EMPTY_KEY else work.downloads).append(job)
    work.downloads.sort(key=lambda j: -j.content.size)  # big ones first: their chunks spread over the workers
    return work


def _build(run: _Run, plan: _Plan, work: _Work, jobs: int) -> None:
    """Fill the staging directory: tree skeleton, cache entries and files, then directory metadata."""
    os.mkdir(run.staging, 0o700)
    for rel, _, _ in plan.dirs[1:]:
        os.mkdir(f"{run.staging}/{rel}", 0o700)
    for rel, target, mtime_ns in plan.symlinks:
        p = f"{run.staging}/{rel}"
        os.symlink(target, p)
        with contextlib.suppress(NotImplementedError, OSError):
            os.utime(p, ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    # The pool's threads are made inside, on the caller's CPU: see rcds.affinity.
    with threads_on_one_cpu(), futures.ThreadPoolExecutor(jobs, thread_name_prefix="rcds-get") as pool:
        pending: set[futures.Future[None]] = set()
        try:
            units = [(job, piece) for job in work.downloads for piece in job.content.pieces]
            # empty files: one piece with nothing to fetch
            units += [(job, job.content.pieces[0]) for job in work.copies if job.copy_from is None]
            for batch in _batches(units):
                pending.add(pool.submit(run.run_pieces, batch))
            for job in work.copies:
                if job.copy_from is not None:
                    pending.add(pool.submit(run.run_copy_job, job))
            for i in range(0, len(work.ready), _PLACE_BATCH):
                pending.add(pool.submit(run.place_batch, work.ready[i : i + _PLACE_BATCH]))
            _wait(pending)
        except BaseException:
            run.cancel.set()
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True)
            for job in work.downloads + work.copies:
                run.abort_job(job)
            raise

    # Deepest first, so that a read-only directory is made read-only after everything inside it exists.
    for rel, mode, mtime_ns in sorted(plan.dirs, key=lambda x: -(x[0].count("/") + 1 if x[0] else 0)):
        p = os.path.join(run.staging, rel) if rel else run.staging
        os.chmod(p, mode)
        os.utime(p, ns=(mtime_ns, mtime_ns))


def _batches(units: list[tuple[_Job, Piece]]) -> list[list[tuple[_Job, Piece]]]:
    """The tasks for the pool, in order: big pieces one per task, small ones grouped.

    Grouping saves a task hand-over (and GIL switches) per small file. (Spreading the big pieces between
    the small batches, so that inflating overlaps with small requests waiting on the server, made no
    measurable difference in bench/get.py; the order stays that of ``units``, biggest first.)
    """
    out: list[list[tuple[_Job, Piece]]] = []
    batch: list[tuple[_Job, Piece]] = []
    held = 0
    for unit in units:
        size = unit[1].size
        if size >= _SMALL_PIECE:
            out.append([unit])
            continue
        batch.append(unit)
        held += size
        if len(batch) >= _BATCH_PIECES or held >= _SMALL_PIECE:
            out.append(batch)
            batch, held = [], 0
    if batch:
        out.append(batch)
    return out


def _wait(pending: set[futures.Future[None]]) -> None:
    """Wait for all tasks; raise the first real error (not the cancellations it caused)."""
    while pending:
        done, left = futures.wait(pending, return_when=futures.FIRST_EXCEPTION)
        pending.clear()
        pending.update(left)
        for f in done:
            exc = f.exception()
            if exc is not None and not isinstance(exc, Cancelled):
                raise exc
