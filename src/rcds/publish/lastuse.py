"""Last-use times of CIDs, shared between servers through the repositories themselves.

Each server records last-use times (``publish`` of a present CID, ``update``, ``rcds wait --touch``) in
its SQLite state at once, batched every few seconds. So that every server of a deployment sees them, they
are also written into a repository as **ts records**, as the service rcds replaces did: the directory
``/ts/<cid>`` whose mtime is the last-use time and whose file ``by`` names the server. The records travel
with the repositories (stratum 1s, the other servers' replicas) like everything else, and cleanup takes
the newest time from every repository it can read plus its own state.

Writing a record costs a (batched) publish, so a CID's record is rewritten only when its last-use time
has moved by more than ``share_seconds`` (default one hour): with expiry counted in days, an hour of
lag cannot expire anything early.
"""

from __future__ import annotations

import io
import socket
from collections.abc import Mapping

from ..cvmfs.catalog import Dirent
from ..cvmfs.tree import EntryKind, TreeEntry
from ..cvmfs.writer import Transaction
from .cid import cid_group
from .presence import StorageView, scan_cid_dirs

TS_DIR = "ts"
TS_MARKER = "by"  # the file inside each record: which server wrote it


def server_name() -> str:
    return socket.getfqdn()


def write_records(txn: Transaction, times: Mapping[str, float], writer: str) -> None:
    """Add or refresh the ts records of ``times`` (cid -> last-use time) in an open transaction."""
    if not times:
        return
    top = f"/{TS_DIR}"
    if not txn.exists(top):
        txn.mkdir(top, nested=True)
    data = (writer + "\n").encode()
    for cid, when in sorted(times.items()):
        group = cid_group(cid)
        if group and not txn.exists(f"{top}/{group}"):
            txn.mkdir(f"{top}/{group}", nested=True)
        t = int(when)
        txn.add_tree(
            f"{top}/{cid}",
            [
                TreeEntry("", EntryKind.DIRECTORY, mode=0o755, mtime=t),
                TreeEntry(
                    TS_MARKER, EntryKind.FILE, mode=0o644, mtime=t, size=len(data), stream=io.BytesIO(data)
                ),
            ],
            nested=False,
        )


def remove_records(txn: Transaction, cids: list[str]) -> int:
    """Remove the ts records of ``cids`` (and groups left empty); returns how many existed."""
    removed = 0
    for cid in cids:
        if txn.remove(f"/{TS_DIR}/{cid}"):
            removed += 1
        remove_empty_group(txn, f"/{TS_DIR}", cid)
    return removed


def remove_empty_group(txn: Transaction, top: str, cid: str) -> None:
    """Remove the group directory of a two-level ``cid`` under ``top`` once nothing else is in it."""
    group = cid_group(cid)
    path = f"{top}/{group}"
    if group and txn.exists(path) and all(d.name == ".cvmfscatalog" for d in txn.listdir(path)):
        txn.remove(path)


def read_records(view: StorageView) -> dict[str, Dirent]:
    """The ts records in a repository's live revision: cid -> the record's directory entry (mtime)."""
    return scan_cid_dirs(view, TS_DIR, TS_MARKER)


__all__ = ["TS_DIR", "read_records", "remove_empty_group", "remove_records", "server_name", "write_records"]
