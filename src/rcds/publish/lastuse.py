"""Last-use times of CIDs, shared between servers through the repositories themselves.

Each server records last-use times (``publish`` of a present CID, ``update``, ``rcds wait --touch``) in
its SQLite state at once, batched every few seconds. So that every server of a deployment sees them, they
are also written into a repository as **ts records**, in the format of the service rcds replaces
(cvmfs-user-pub), so that either can read the other's:

* the record of CID ``c`` is the regular *file* ``/ts/<c>``; its mtime is the last-use time and it holds
  the writer's name and a newline (cvmfs-user-pub writes the identity of the last updater there);
* a two-level CID ``g/h`` has the file ``/ts/g/h``; the group directory ``/ts/g`` is a nested catalog,
  as cvmfs-user-pub's ``.cvmfsdirtab`` line ``/ts/*`` makes it, and so is ``/ts``.

Earlier rcds versions wrote a *directory* ``/ts/<c>`` holding a file ``by`` instead (the "legacy"
records below). They are still read, and a legacy record is turned into a file when it is next
written. Such a version also let the record of a one-level CID ``tg`` replace the directory ``/ts/tg``
that held the records of ``tg/...``: every function here touches only the one record it was asked for,
and leaves a record it cannot write without touching another's alone (it is counted and logged).

How a path under ``/ts`` is read (the one rule that reading, writing and removing share):

* ``/ts/X`` a regular file: the record of ``X``;
* ``/ts/X`` a directory that is *not* a nested catalog and holds a regular file ``by``: a legacy record
  of ``X`` (legacy records were never nested catalogs; groups always are, in both services). Its time is
  the mtime of ``by``, which only that record's writes set;
* in any directory ``/ts/X``: a regular file ``Y`` (except a legacy ``by``) is the record of ``X/Y``, and
  a directory ``Y`` holding ``by`` the legacy record of ``X/Y``.

Writing a record costs a (batched) publish, so a CID's record is rewritten only when its last-use time
has moved by more than ``share_seconds`` (default one hour): with expiry counted in days, an hour of
lag cannot expire anything early.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..cvmfs.catalog import NESTED_MARKER, Dirent
from ..cvmfs.writer import Transaction
from ..logs import fields
from .cid import cid_group

log = logging.getLogger("rcds.lastuse")

TS_DIR = "ts"
LEGACY_MARKER = "by"  # the file inside an rcds record of the older, directory format


class _Tree(Protocol):
    """What reading a record needs: a live revision (``StorageView``) or an open ``Transaction``."""

    def lookup(self, path: str) -> Dirent | None: ...

    def listdir(self, path: str) -> list[Dirent]: ...


@dataclass(frozen=True)
class Record:
    cid: str
    path: str  # the file, or for a legacy record its directory
    mtime: int  # the last-use time
    legacy: bool  # an rcds directory record (``<path>/by``)


@dataclass
class WriteReport:
    written: int = 0
    migrated: int = 0  # legacy directory records replaced by files
    skipped: list[str] = field(default_factory=list)  # CIDs whose record would have replaced another's


def server_name() -> str:
    return socket.getfqdn()


def _is_nested(d: Dirent) -> bool:
    return d.is_nested_root or d.is_nested_mountpoint


def _legacy_marker(tree: _Tree, path: str, d: Dirent) -> Dirent | None:
    """The ``by`` file of a legacy record directory at ``path`` (``d`` its entry), if it is one."""
    if not d.is_dir or _is_nested(d):
        return None
    marker = tree.lookup(f"{path}/{LEGACY_MARKER}")
    return marker if marker is not None and marker.is_regular else None


def find_record(tree: _Tree, cid: str) -> Record | None:
    """The ts record of ``cid`` in ``tree``, in either format, or None."""
    top = f"/{TS_DIR}"
    path = f"{top}/{cid}"
    group = cid_group(cid)
    if group:
        g = tree.lookup(f"{top}/{group}")
        if g is None or not g.is_dir:
            return None
        if cid.rsplit("/", 1)[1] == LEGACY_MARKER and _legacy_marker(tree, f"{top}/{group}", g) is not None:
            return None  # that ``by`` is the legacy record of the one-level CID ``group``
    d = tree.lookup(path)
    if d is None:
        return None
    if d.is_regular:
        return Record(cid, path, d.mtime, legacy=False)
    marker = _legacy_marker(tree, path, d) if d.is_dir else None
    if marker is not None:
        return Record(cid, path, marker.mtime, legacy=True)
    return None


def read_records(view: _Tree) -> dict[str, Record]:
    """Every ts record in a repository's live revision (or an open transaction): cid -> record."""
    found: dict[str, Record] = {}
    top = f"/{TS_DIR}"
    d = view.lookup(top)
    if d is None or not d.is_dir:
        return found
    for child in view.listdir(top):
        if child.name.startswith("."):  # .cvmfscatalog (no CID component starts with a dot)
            continue
        path = f"{top}/{child.name}"
        if child.is_regular:
            found[child.name] = Record(child.name, path, child.mtime, legacy=False)
            continue
        if not child.is_dir:
            continue
        entries = view.listdir(path)
        legacy = not _is_nested(child)
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_regular and e.name == LEGACY_MARKER and legacy:
                found[child.name] = Record(child.name, path, e.mtime, legacy=True)
            elif e.is_regular:
                cid = f"{child.name}/{e.name}"
                found[cid] = Record(cid, f"{path}/{e.name}", e.mtime, legacy=False)
            elif e.is_dir and not _is_nested(e):
                marker = view.lookup(f"{path}/{e.name}/{LEGACY_MARKER}")
                if marker is not None and marker.is_regular:
                    cid = f"{child.name}/{e.name}"
                    found[cid] = Record(cid, f"{path}/{e.name}", marker.mtime, legacy=True)
    return found


def _only_marker(txn: Transaction, path: str) -> bool:
    """A legacy record directory that holds nothing but its ``by`` file."""
    return all(e.name == LEGACY_MARKER for e in txn.listdir(path))


def write_records(txn: Transaction, times: Mapping[str, float], writer: str) -> WriteReport:
    """Add or refresh the ts records of ``times`` (cid -> last-use time) in an open transaction.

    Never removes or replaces anything but the record of the CID being written; a record that cannot be
    written without doing so is skipped, logged and listed in the report.
    """
    report = WriteReport()
    if not times:
        return report
    top = f"/{TS_DIR}"
    t = txn.lookup(top)
    if t is None:
        txn.mkdir(top, nested=True)
    elif not t.is_dir:
        log.warning("ts records not written: /ts is not a directory", extra=fields(cids=len(times)))
        report.skipped.extend(sorted(times))
        return report
    data = (writer + "\n").encode()
    for cid, when in sorted(times.items()):
        outcome = _write_one(txn, top, cid, int(when), data)
        if outcome == "skipped":
            report.skipped.append(cid)
            log.warning(
                "ts record not written: another record is in its place",
                extra=fields(cid=cid, path=f"{top}/{cid}"),
            )
        else:
            report.written += 1
            report.migrated += outcome == "migrated"
    return report


def _write_one(txn: Transaction, top: str, cid: str, when: int, data: bytes) -> str:
    """Write one record: ``written``, ``migrated`` (a legacy directory became a file) or ``skipped``."""
    group = cid_group(cid)
    if group:
        gpath = f"{top}/{group}"
        g = txn.lookup(gpath)
        if g is None:
            txn.mkdir(gpath, nested=True)  # a catalog per group, as the original's dirtab ``/ts/*``
        elif not g.is_dir:
            return "skipped"  # the file record of the one-level CID ``group``
        elif cid.rsplit("/", 1)[1] == LEGACY_MARKER and _legacy_marker(txn, gpath, g) is not None:
            return "skipped"  # ``by`` there is the legacy record of the CID ``group``
    path = f"{top}/{cid}"
    d = txn.lookup(path)
    if d is None or d.is_regular:
        txn.write_file(path, data, when)
        return "written"
    if d.is_dir and _legacy_marker(txn, path, d) is not None:
        if _only_marker(txn, path):
            txn.remove(path)  # this CID's own legacy record, nothing else in it
            txn.write_file(path, data, when)
            return "migrated"
        # A legacy record directory that also holds other CIDs' records (``tg`` and ``tg/x`` written
        # by an older version): refresh this CID's ``by`` in place, touching nothing else.
        txn.write_file(f"{path}/{LEGACY_MARKER}", data, when)
        return "written"
    return "skipped"  # a group directory of other CIDs' records, or something that is no record


def remove_records(txn: Transaction, cids: Iterable[str]) -> int:
    """Remove exactly the ts records of ``cids`` (and group directories left empty); returns how many
    existed. A record directory that also holds other records loses only its ``by`` file."""
    removed = 0
    for cid in cids:
        rec = find_record(txn, cid)
        if rec is None:
            continue
        if not rec.legacy or _only_marker(txn, rec.path):
            txn.remove(rec.path)
        else:
            txn.remove(f"{rec.path}/{LEGACY_MARKER}")
        removed += 1
        remove_empty_group(txn, f"/{TS_DIR}", cid)
    return removed


def remove_empty_group(txn: Transaction, top: str, cid: str) -> None:
    """Remove the group directory of a two-level ``cid`` under ``top`` once nothing else is in it."""
    group = cid_group(cid)
    path = f"{top}/{group}"
    if not group:
        return
    g = txn.lookup(path)
    if g is not None and g.is_dir and all(d.name == NESTED_MARKER for d in txn.listdir(path)):
        txn.remove(path)


__all__ = [
    "LEGACY_MARKER",
    "TS_DIR",
    "Record",
    "WriteReport",
    "find_record",
    "read_records",
    "remove_empty_group",
    "remove_records",
    "server_name",
    "write_records",
]
