"""Which publish failures are the environment's (a full disk, a failing or read-only file system) and
not the tarball's or ours.

An acknowledged upload must survive a full disk: a job failing with one of these waits, queued with its
spool file, and is retried (with capped backoff) until the storage recovers. Its ``publish_attempts``
budget is only spent on other errors, which are as likely to be a bug or a broken repository that will
fail the same way every time.
"""

from __future__ import annotations

import errno
import sqlite3

DISK_SPACE = "waiting for disk space"
STORAGE = "waiting for storage"

# Out of space, or of quota: more space (or a cleanup, or a raised quota) fixes it. EFBIG is what a file
# size limit (RLIMIT_FSIZE, a quota on one file) looks like; our objects and catalogs are far below
# what file systems allow, so it is never the tarball's size as such.
_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# The storage itself failing or refusing writes (a disk error, a file system remounted read-only, a stale
# NFS handle) or the process short of descriptors or memory: an operator fixes these, the tarball cannot.
_STORAGE_ERRNOS = frozenset(
    {errno.EIO, errno.EROFS, errno.ESTALE, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOLCK}
)
# SQLite's primary result codes (the low byte of the extended one): catalogs and the content index are
# SQLite files, and SQLite reports a failed write as SQLITE_FULL (ENOSPC) or SQLITE_IOERR (any other).
_SQLITE_FULL = 13
_SQLITE_IOERR = 10
_SQLITE_READONLY = 8
_SQLITE_CANTOPEN = 14


def environment_wait(exc: BaseException) -> str | None:
    """``"waiting for disk space: <error>"`` or ``"waiting for storage: <error>"`` if ``exc`` (or an
    exception it was raised from) is a transient environment error; None for anything else."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 8:
        seen.add(id(current))
        what = _classify(current)
        if what is not None:
            return f"{what}: {type(current).__name__}: {current}"
        current = current.__cause__ or current.__context__
    return None


def _classify(exc: BaseException) -> str | None:
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno in _SPACE_ERRNOS:
            return DISK_SPACE
        if exc.errno in _STORAGE_ERRNOS:
            return STORAGE
        return None
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is None:  # raised by the sqlite3 module itself, not by the library
            return None
        primary = code & 0xFF
        if primary == _SQLITE_FULL:
            return DISK_SPACE
        if primary in (_SQLITE_IOERR, _SQLITE_READONLY, _SQLITE_CANTOPEN):
            return STORAGE
    return None


__all__ = ["DISK_SPACE", "STORAGE", "environment_wait"]
