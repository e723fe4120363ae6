"""Garbage collection of a replica: a stratum 1 storage written by ``rcds.cvmfs.replica.snapshot``.

Without it a replica only grows: every snapshot adds the objects of the new revisions and nothing is ever
deleted. ``collect_replica_garbage`` (``rcds repo gc --storage <replica>``, and the publish service's daily
cleanup of its ``local = false`` replicas) runs the one algorithm of ``rcds.cvmfs.gc`` on the replica
through ``ReplicaGcTarget``:

* The preserved set follows the same rules, from the replica's own manifest and its own ``.cvmfsreflog``:
  the current revision; walking back through ``previous_revision``, the revisions whose timestamp (the
  replica's reflog records when it received them) is within the horizon, plus the first one older; every
  root catalog a tag of the replica's history database names. What is swept: the trees of the other root
  catalogs the reflog lists, and old certificates, histories and meta-infos.
* The manifest and whitelist are never rewritten: they stay byte-identical to the source's (a replica
  cannot sign, and its ``Y`` is the source's reflog). After the sweep the replica's own reflog is written
  without the swept roots and auxiliary objects, with its checksum ``.rcds-replica/reflog.chksum`` (as a
  snapshot writes them), and ``last_gc`` goes into ``.cvmfs_status.json``.
* ``G=no`` is refused, as CVMFS does: ``cvmfs_server gc`` on a stratum 1 requires the repository to be
  garbage-collectable, read from the manifest the stratum 1 serves, i.e. the source's
  (``is_garbage_collectable`` in ``cvmfs_server_util.sh``: ``get_repo_info_from_url $CVMFS_STRATUM1 -g``),
  and ``swissknife gc`` itself stops on ``!manifest->garbage_collectable()`` whatever the storage. A
  repository published with ``G=no`` promises that every revision it ever published stays available (the
  snapshot treats a missing old revision as an error for it); a mirror must not quietly break that.
* Locking: the whole run, mark and sweep, holds the replica's snapshot lock (``.rcds-replica/lock``), as
  ``cvmfs_server gc`` holds a stratum 1's update lock, so a snapshot and a collection of one replica never
  overlap; a collection that finds the lock taken fails at once (``GcError``: a snapshot is running). A
  dry run changes nothing and takes no lock.

The trap, and how it is closed. A snapshot does not descend into a catalog already present ("present
implies subtree complete", see ``rcds.cvmfs.replica``). The sweep deletes in post-order (a tree's objects,
then its nested catalogs, then the catalog), so a collection killed mid-sweep leaves catalogs that are
present with part of their subtree gone; if a later source revision or tag referenced one of them again,
the snapshot would trust it and the replica would serve a revision with missing objects. Therefore:

1. Before the first deletion the marker ``.rcds-replica/gc-unfinished`` is written (fsynced, with the
   run's threshold ``now - horizon``); it is removed only after the new reflog is written.
2. ``snapshot()``, holding the lock, finishes a collection whose marker it finds before it trusts any
   catalog (``finish_interrupted_gc``): it runs the collection again with the recorded threshold. Nothing
   changed in between (the replica was locked, and no snapshot ran), so the same revisions are preserved
   and the same trees planned; the walk tolerates what is already deleted and, by the post-order, still
   reaches every catalog that remains, so every catalog the killed run condemned is deleted. A revision
   that needs one again then fetches it afresh with all of its subtree.
3. Any collection that finds the marker uses a threshold no earlier than the recorded one (it preserves
   no more than the killed run did), so a run by hand with a longer horizon cannot adopt a half-swept
   catalog as preserved.

A second, quieter form of the same trap: a snapshot that was killed or failed leaves catalogs in
``data/`` whose subtrees are complete but that no reflog root lists yet; the next snapshot will trust
them. A swept revision may share objects with them (a CID published again with the same files), so the
replica's collection preserves every catalog present that neither the mark nor the plan reached, with all
it references (``GcTarget.keeps_present_catalogs_complete``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from ..logs import fields
from ..storage import ObjectStore
from ..storage.local import fsync_path
from .gc import DEFAULT_HORIZON, GcError, GcReport, ProgressFn, collect_garbage
from .manifest import Manifest
from .replica_store import PRIVATE_DIR, ReplicaError, ReplicaStorage, date_utc, recorded_store

log = logging.getLogger("rcds.gc")

MARKER_THRESHOLD = "threshold"


class ReplicaBusy(GcError):
    """A snapshot (or another garbage collection) of the replica holds its lock."""


def is_replica(storage: Path | str) -> bool:
    """A storage directory written by ``rcds.cvmfs.replica`` (not a stratum 0 of rcds), or the state
    directory of a replica in a bucket."""
    storage = Path(storage)
    if not (storage / PRIVATE_DIR).is_dir() or (storage / ".rcds" / "repo.json").exists():
        return False
    try:
        in_bucket = bool(recorded_store(storage))
    except ReplicaError:
        return False
    return in_bucket or (storage / ".cvmfspublished").is_file()


def collect_replica_garbage(
    storage: Path | str,
    *,
    horizon: float = DEFAULT_HORIZON,
    now: float | None = None,
    dry_run: bool = False,
    progress: ProgressFn | None = None,
) -> GcReport:
    """``collect_garbage`` for the replica in ``storage``, under its snapshot lock (see the module).

    Raises ``ReplicaBusy`` if a snapshot (or another collection) of it is running, ``GcError`` if it is
    no replica or is not garbage-collectable."""
    storage = Path(storage)
    if not is_replica(storage):
        raise GcError(
            f"{storage} is not a replica made by rcds (no {PRIVATE_DIR}/ beside .cvmfspublished, nor the"
            f" state of one in a bucket)"
        )
    replica = ReplicaStorage(storage)
    threshold = (time.time() if now is None else now) - horizon
    try:
        if dry_run:
            return _collect(replica, threshold, True, progress)
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(replica.locked())
            except ReplicaError as exc:
                raise ReplicaBusy(
                    f"{replica.where}: a snapshot (or another garbage collection) of this replica is running"
                ) from exc
            return _collect(replica, threshold, False, progress)
    finally:
        replica.close()


def finish_interrupted_gc(replica: ReplicaStorage) -> GcReport | None:
    """Finish the collection whose ``gc-unfinished`` marker is present; the caller holds the lock.

    Called by ``snapshot()`` before it pulls anything. None if there was nothing to finish."""
    recorded = _recorded_threshold(replica)
    if recorded is None:
        if replica.gc_unfinished.exists():
            # The marker is written completely and fsynced before the first deletion: an unreadable one
            # means that nothing was deleted.
            log.warning("gc: unreadable marker removed", extra=fields(storage=str(replica.storage)))
            replica.gc_unfinished.unlink(missing_ok=True)
        return None
    log.warning("gc: finishing an interrupted garbage collection", extra=fields(storage=str(replica.storage)))
    return _collect(replica, recorded, False, None)


def _collect(
    replica: ReplicaStorage, threshold: float, dry_run: bool, progress: ProgressFn | None
) -> GcReport:
    recorded = _recorded_threshold(replica)
    if recorded is not None and recorded > threshold:
        threshold = recorded  # never preserve more than an unfinished run did (see the module, point 3)
    return collect_garbage(
        ReplicaGcTarget(replica, threshold), horizon=0.0, now=threshold, dry_run=dry_run, progress=progress
    )


def _recorded_threshold(replica: ReplicaStorage) -> float | None:
    """The threshold the unfinished run recorded; None without a (readable) marker."""
    try:
        return float(json.loads(replica.gc_unfinished.read_text())[MARKER_THRESHOLD])
    except (OSError, ValueError, TypeError, KeyError):
        return None


class ReplicaGcTarget:
    """A replica's storage as a ``GcTarget``. Only made while the replica's lock is held (or for a dry
    run): its own ``lock`` is therefore a no-op."""

    catalog_cache: Path | None = None  # a replica keeps no uncompressed catalogs
    content_index: Path | None = None
    keeps_present_catalogs_complete = True  # what a snapshot assumes

    def __init__(self, replica: ReplicaStorage, threshold: float) -> None:
        self.replica = replica
        self.threshold = threshold
        self.store: ObjectStore = replica.store
        self.private = replica.private
        self.fqrn = self.manifest().fqrn

    def manifest(self) -> Manifest:
        try:
            manifest = self.replica.current_manifest()
        except ReplicaError as exc:  # unreadable
            raise GcError(str(exc)) from exc
        if manifest is None:
            raise GcError(f"{self.replica.where} holds no revision (no .cvmfspublished)")
        return manifest

    def lock(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()  # the snapshot lock is held for the whole run

    def recover(self) -> list[str]:
        return []  # a killed snapshot's leftovers are the next snapshot's business (and never swept)

    @contextlib.contextmanager
    def sweeping(self) -> Iterator[None]:
        self.replica.tmp.mkdir(parents=True, exist_ok=True)  # staging of the reflog and status files
        marker = self.replica.gc_unfinished
        doc = {MARKER_THRESHOLD: self.threshold, "started": date_utc(), "pid": os.getpid()}
        tmp = marker.with_name(marker.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(doc) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, marker)
        fsync_path(marker.parent)  # durable before the first deletion
        yield
        # Reached only when the reflog without the swept roots is written (an exception skips it).
        marker.unlink()
        fsync_path(marker.parent)

    def write_reflog(self, manifest: Manifest, reflog: Path) -> None:
        """The replica's own reflog and its checksum; the manifest (the source's, signed) stays as it is."""
        self.replica.write_reflog(reflog.read_bytes())

    def write_status(self, **fields: str) -> None:
        self.replica.update_status(**fields)


__all__ = ["ReplicaBusy", "ReplicaGcTarget", "collect_replica_garbage", "finish_interrupted_gc", "is_replica"]
