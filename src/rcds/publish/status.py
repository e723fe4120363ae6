"""What the service is doing, as one JSON-able document: the data behind ``/status``, ``/status.json`` and
``rcds status`` (schema in docs/status.md).

Everything is read, nothing here changes the service. Sources:

* the state database's ``jobs`` table (through a connection of our own, so a status request never waits
  for the queue's lock): queue depth, the current and recent publishes, and the history aggregates, each
  one indexed query (``jobs_finished``, ``jobs_state``) whatever the number of jobs;
* ``<queue_dir>/status.db``: a small time series (queue depth, replica lag) sampled by the service's
  housekeeping thread, kept ``HISTORY_SECONDS``; losing its last samples in a crash costs nothing, so it
  is not fsynced like the queue;
* the repositories' manifests and whitelists, the presence index, the replication threads' state;
* cleanup's own planner, run in a background thread at most every ``CLEANUP_ESTIMATE_SECONDS`` per
  repository (it opens catalogs: too slow for a request).

Identities (the ``identity`` of jobs, a CID's ``.publisher``) are only put in a document made with
``sensitive=True``; the web layer decides who gets one.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..cvmfs.hashes import normalize_path
from ..cvmfs.manifest import Manifest, ManifestError
from ..cvmfs.whitelist import Whitelist
from ..storage import MANIFEST, WHITELIST, ObjectMissing, ObjectStore, store_from_settings
from .cid import PUBLISHER_FILE, CidError, validate_cid
from .cleanup import DAY, plan_cleanup
from .config import RepositorySettings, ServiceSettings
from .lastuse import LEGACY_MARKER, TS_DIR
from .presence import StorageView, scan_published_cids
from .state import FAILED, PUBLISHED, PUBLISHING, QUEUED

if TYPE_CHECKING:
    from .service import PublishService

log = logging.getLogger("rcds.status")

SCHEMA = 1
HOUR = 3600
HISTORY_SECONDS = 2 * DAY  # samples kept in status.db
CHART_HOURS = 24  # publishes, latency, queue depth and replica lag: the last day, per hour
CHART_DAYS = 7  # bytes per day (the state keeps a week of finished jobs)
CURRENT_LIMIT = 25  # queued and publishing jobs listed
RECENT_LIMIT = 30  # finished jobs listed
FAILED_LIMIT = 10  # failed jobs listed besides the recent ones
TREE_LIMIT = 500  # entries listed on a CID's page
WALK_LIMIT = 100_000  # entries counted by walking a CID that has no catalog of its own
CLEANUP_ESTIMATE_SECONDS = 600.0
SETTLE_SECONDS = 60.0  # an hour or day over for this long is final (commits on their way have landed)
MAX_SERIES_POINTS = 288  # a chart needs no more (one per 5 minutes over a day)

_USERINFO = re.compile(r"(//)[^/@\s]*@")


def _no_userinfo(text: str) -> str:
    """Drop ``user:password@`` from URLs in a text: a credential, never shown to anyone."""
    return _USERINFO.sub(r"\1", text)


@dataclass
class ReplicaState:
    """What the replication thread of one replica last saw (kept in memory by the service)."""

    revision: int | None = None
    last_attempt: float | None = None
    last_success: float | None = None  # the last snapshot that found the replica current
    last_change: float | None = None  # the last snapshot that brought a new revision
    last_error: str | None = None  # the last failure's reason (None once one succeeds)
    failures: int = 0  # consecutive

    def succeeded(self, revision: int, changed: bool, now: float) -> None:
        self.revision, self.last_attempt, self.last_success = revision, now, now
        if changed or self.last_change is None:
            self.last_change = now
        self.last_error, self.failures = None, 0

    def failed(self, reason: str, now: float) -> None:
        self.last_attempt, self.last_error = now, reason
        self.failures += 1

    def lag(self, now: float) -> float | None:
        """Seconds since the replica was last known to hold the upstream's revision."""
        return None if self.last_success is None else max(0.0, now - self.last_success)


class StatusHistory:
    """The sampled time series: ``(t, series, value)`` rows in ``<queue_dir>/status.db``, pruned to
    ``HISTORY_SECONDS``. Thread-safe (one connection, one lock)."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        self._lock = threading.Lock()
        if readonly:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # samples are not worth an fsync each
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS samples (series TEXT NOT NULL, t REAL NOT NULL, value REAL NOT NULL)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS samples_series_t ON samples(series, t)")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, t: float, values: dict[str, float]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO samples (series, t, value) VALUES (?, ?, ?)",
                [(name, t, float(v)) for name, v in sorted(values.items())],
            )
            self._db.execute("DELETE FROM samples WHERE t < ?", (t - HISTORY_SECONDS,))
            self._db.execute("COMMIT")

    def series(self, name: str, since: float) -> list[tuple[float, float]]:
        """The samples of one series since ``since``, thinned to at most ``MAX_SERIES_POINTS`` (each kept
        point is the maximum of the ones it stands for: a short spike must stay visible)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT t, value FROM samples WHERE series = ? AND t >= ? ORDER BY t", (name, since)
            ).fetchall()
        points = [(float(t), float(v)) for t, v in rows]
        if len(points) <= MAX_SERIES_POINTS:
            return points
        step = -(-len(points) // MAX_SERIES_POINTS)
        return [(points[i][0], max(v for _, v in points[i : i + step])) for i in range(0, len(points), step)]

    def names(self) -> list[str]:
        with self._lock:
            return [str(r[0]) for r in self._db.execute("SELECT DISTINCT series FROM samples")]


class JobHistory:
    """Read-only queries over the state database's ``jobs`` and ``access`` tables, on a connection of
    its own (WAL: readers never block the queue's writers)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, timeout=10)
        self._hours: dict[float, dict[str, Any]] = {}  # finished hours, by start: they never change
        self._days: dict[float, dict[str, Any]] = {}  # finished local days, by start

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _records(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Rows as dicts keyed by the selected column names."""
        with self._lock:
            cursor = self._db.execute(sql, args)
            names = [c[0] for c in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def counts(self) -> dict[str, int]:
        rows = self._rows(
            "SELECT state, count(*), sum(waits > 0) FROM jobs WHERE state IN (?, ?) GROUP BY state",
            (QUEUED, PUBLISHING),
        )
        found = {str(s): (int(n), int(w or 0)) for s, n, w in rows}
        return {
            "queued": found.get(QUEUED, (0, 0))[0],
            "publishing": found.get(PUBLISHING, (0, 0))[0],
            "waiting": found.get(QUEUED, (0, 0))[1],
        }

    def current(self, limit: int = CURRENT_LIMIT) -> list[dict[str, Any]]:
        return self._records(
            "SELECT cid, state, repository, size, identity, submitted, started, attempts, waits, reason "
            "FROM jobs WHERE state IN (?, ?) ORDER BY state = ? DESC, id LIMIT ?",
            (QUEUED, PUBLISHING, PUBLISHING, limit),
        )

    def recent(self, limit: int = RECENT_LIMIT, state: str | None = None) -> list[dict[str, Any]]:
        """Finished jobs, newest first (all, or only those in ``state``)."""
        where = "finished IS NOT NULL"
        args: tuple[str, ...] = ()
        if state is not None:
            where, args = "finished IS NOT NULL AND state = ?", (state,)
        out = self._records(
            "SELECT cid, state, repository, revision, size, files, identity, submitted, finished, reason "
            f"FROM jobs INDEXED BY jobs_finished WHERE {where} ORDER BY finished DESC LIMIT ?",
            (*args, limit),
        )
        for job in out:
            job["seconds"] = round(job["finished"] - job["submitted"], 3)
        return out

    def _per_hour(self, start: float, end: float) -> dict[float, dict[str, Any]]:
        """Buckets of whole hours (UTC-aligned starts) for the jobs finished in ``[start, end)``: one
        covering-index range scan (``jobs_finished``), grouped in SQLite."""
        rows = self._rows(
            "SELECT CAST((finished - ?) / 3600 AS INTEGER) AS h, state, count(*), sum(size), "
            "avg(finished - submitted), max(finished - submitted) "
            "FROM jobs INDEXED BY jobs_finished WHERE finished >= ? AND finished < ? GROUP BY h, state",
            (start, start, end),
        )
        out: dict[float, dict[str, Any]] = {}
        for h, state, n, size, mean, peak in rows:
            b = out.setdefault(start + int(h) * HOUR, _empty_hour(start + int(h) * HOUR))
            if state == PUBLISHED:
                b.update(published=int(n), bytes=int(size or 0), latency_mean=mean, latency_max=peak)
            elif state == FAILED:
                b["failed"] = int(n)
        return out

    def hourly(self, now: float, hours: int = CHART_HOURS) -> list[dict[str, Any]]:
        """Per clock hour (oldest first, the last one the hour now under way): publishes, failures, tarball
        bytes, and the upload-to-live seconds (mean, max) of the publishes.

        A job's ``finished`` is stamped when it finishes, so an hour that is over never changes: its bucket
        is computed once and kept (after ``SETTLE_SECONDS``, for a commit that was on its way). A page build
        reads only the current hour's jobs, however busy the day was.
        """
        current = now - now % HOUR
        starts = [current - (hours - 1 - i) * HOUR for i in range(hours)]
        settled = now - SETTLE_SECONDS
        with self._lock:
            missing = [h for h in starts if h + HOUR <= settled and h not in self._hours]
        if missing:
            found = self._per_hour(missing[0], missing[-1] + HOUR)
            with self._lock:
                for h in missing:
                    self._hours[h] = found.get(h, _empty_hour(h))
                for h in [h for h in self._hours if h < starts[0] - CHART_DAYS * DAY]:
                    del self._hours[h]
        with self._lock:
            open_hours = [h for h in starts if h not in self._hours]
            known = {h: self._hours[h] for h in starts if h in self._hours}
        if open_hours:
            known.update(self._per_hour(open_hours[0], now + 1))
        return [dict(known.get(h) or _empty_hour(h)) for h in starts]

    def daily(self, now: float, hourly: list[dict[str, Any]], days: int = CHART_DAYS) -> list[dict[str, Any]]:
        """Per local calendar day (oldest first, today last): publishes and their tarball bytes. Past days
        are computed once and kept; today is the sum of ``hourly``'s buckets since midnight."""
        today = _local_midnight(now)
        starts = [_local_midnight(today - (days - 1 - i) * DAY + HOUR * 12) for i in range(days)]
        out: list[dict[str, Any]] = []
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < days else now + 1
            with self._lock:
                cached = self._days.get(start)
            if cached is None:
                if start == today and start % HOUR == 0 and hourly and hourly[0]["start"] <= start:
                    part = [b for b in hourly if b["start"] >= start]
                    cached = {
                        "published": sum(b["published"] for b in part),
                        "bytes": sum(b["bytes"] for b in part),
                    }
                else:
                    n, size = self._rows(
                        "SELECT count(*), sum(size) FROM jobs INDEXED BY jobs_finished "
                        "WHERE finished >= ? AND finished < ? AND state = ?",
                        (start, end, PUBLISHED),
                    )[0]
                    cached = {"published": int(n), "bytes": int(size or 0)}
                    if end <= now - SETTLE_SECONDS:
                        with self._lock:
                            self._days[start] = cached
            day = time.strftime("%Y-%m-%d", time.localtime(start))
            out.append({"day": day, "start": start, **cached})
        with self._lock:
            for d in [d for d in self._days if d < starts[0]]:
                del self._days[d]
        return out

    def last_hour(self, now: float) -> tuple[dict[str, int], int, int]:
        """The last 60 minutes: publishes per repository, publishes, failures."""
        rows = self._rows(
            "SELECT repository, state, count(*) FROM jobs INDEXED BY jobs_finished WHERE finished >= ? "
            "AND state IN (?, ?) GROUP BY repository, state",
            (now - HOUR, PUBLISHED, FAILED),
        )
        per_repo: dict[str, int] = {}
        published = failed = 0
        for repo, state, n in rows:
            if state == PUBLISHED:
                published += int(n)
                if repo is not None:
                    per_repo[str(repo)] = per_repo.get(str(repo), 0) + int(n)
            else:
                failed += int(n)
        return per_repo, published, failed

    def access_times(self) -> dict[str, float]:
        return {str(c): float(t) for c, t in self._rows("SELECT cid, last_used FROM access")}

    def latest(self, cid: str) -> dict[str, Any] | None:
        rows = self._records(
            "SELECT cid, state, repository, revision, size, files, identity, submitted, finished, reason, "
            "attempts, waits FROM jobs WHERE cid = ? ORDER BY id DESC LIMIT 1",
            (cid,),
        )
        return rows[0] if rows else None

    def last_used(self, cid: str) -> float | None:
        rows = self._rows("SELECT last_used FROM access WHERE cid = ?", (cid,))
        return float(rows[0][0]) if rows else None


def _empty_hour(start: float) -> dict[str, Any]:
    return {
        "start": start,
        "published": 0,
        "failed": 0,
        "bytes": 0,
        "latency_mean": None,
        "latency_max": None,
    }


def _local_midnight(t: float) -> float:
    lt = time.localtime(t)
    return time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday, 0, 0, 0, 0, 0, -1))


def next_cleanup_at(settings: ServiceSettings, index: int, now: float, done_today: bool) -> float:
    """When repository ``index`` (1-based, configuration order) is next cleaned: the start of its daily
    hour ``(gcstarthour - 1 + index) % 24`` (local time), or now if that hour is on and it was not cleaned."""
    hour = (settings.gcstarthour - 1 + index) % 24
    lt = time.localtime(now)
    if lt.tm_hour == hour and not done_today:
        return now
    start = time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday, hour, 0, 0, 0, 0, -1))
    while start <= now:
        start = _local_next_day(start)
    return start


def _local_next_day(t: float) -> float:
    lt = time.localtime(t + DAY + HOUR * 2)  # past a DST change either way, then back to the same hour
    return time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday, time.localtime(t).tm_hour, 0, 0, 0, 0, -1))


@dataclass
class _Estimate:
    at: float  # the cleanup time it was computed for
    revision: int
    expiring: int
    computed: float


class StatusCollector:
    """Builds status documents for a running service (``service``) or, for ``rcds status --config`` on a
    host where no server answers, from the files alone (``service=None``)."""

    def __init__(
        self,
        settings: ServiceSettings,
        service: PublishService | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.service = service
        self.clock = clock
        state_path = settings.queue_dir / "state.db"
        self.jobs = JobHistory(state_path) if state_path.exists() else None
        history_path = settings.queue_dir / "status.db"
        if service is not None:
            self.history: StatusHistory | None = service.status_history
        else:
            self.history = StatusHistory(history_path, readonly=True) if history_path.exists() else None
        self._cache: dict[bool, tuple[float, dict[str, Any]]] = {}
        self._cache_lock = threading.Lock()
        self._estimates: dict[str, _Estimate] = {}
        self._estimating: set[str] = set()
        self._estimate_lock = threading.Lock()
        self._stores: dict[str, ObjectStore] = {}

    def _public(self, rs: RepositorySettings) -> Path | ObjectStore:
        """Where a repository's public files are read: its directory, or its store when they are in a bucket."""
        if not rs.store:
            return rs.storage
        svc = self.service
        if svc is not None and rs.name in svc.repositories:
            return svc.repositories[rs.name].store
        if rs.name not in self._stores:
            self._stores[rs.name] = store_from_settings(rs.store)
        return self._stores[rs.name]

    def close(self) -> None:
        if self.jobs is not None:
            self.jobs.close()
        if self.service is None and self.history is not None:
            self.history.close()

    # --- the summary -----------------------------------------------------------------------------

    def summary(self, sensitive: bool) -> dict[str, Any]:
        """The status document, reused for ``[status] cache_seconds`` (the page refreshes itself, and many may
        watch it); identities only with ``sensitive``."""
        now = time.monotonic()
        with self._cache_lock:
            hit = self._cache.get(sensitive)
            if hit is not None and now - hit[0] < self.settings.status.cache_seconds:
                return hit[1]
        doc = self.build(sensitive)
        with self._cache_lock:
            self._cache[sensitive] = (now, doc)
        return doc

    def build(self, sensitive: bool) -> dict[str, Any]:
        now = self.clock()
        s = self.settings
        svc = self.service
        jobs = self.jobs
        counts = jobs.counts() if jobs else {"queued": 0, "publishing": 0, "waiting": 0}
        hourly = jobs.hourly(now) if jobs else []
        per_repo_hour, last_published, last_failed = jobs.last_hour(now) if jobs else ({}, 0, 0)
        current = jobs.current() if jobs else []
        recent = jobs.recent() if jobs else []
        failed = jobs.recent(FAILED_LIMIT, FAILED) if jobs else []
        since = now - CHART_HOURS * HOUR
        queue_series = self.history.series("queue_depth", since) if self.history else []
        repositories = [
            self._repository(i, rs.name, now, per_repo_hour) for i, rs in enumerate(s.repositories, start=1)
        ]
        lag_series = {}
        if self.history is not None:
            for rs in s.repositories:
                if rs.upstream:
                    lag_series[rs.name] = self.history.series(f"replica_lag:{rs.name}", since)
        doc: dict[str, Any] = {
            "schema": SCHEMA,
            "version": __version__,
            "server": svc.server_name if svc else None,
            "live": svc is not None,
            "generated_at": now,
            "sensitive": sensitive,
            "prefix": s.prefix,
            "maxdays": s.maxdays,
            "queue": counts,
            "publishes": {
                "last_hour": last_published,
                "failed_last_hour": last_failed,
                "last_day": sum(b["published"] for b in hourly),  # the 24 chart hours
                "failed_last_day": sum(b["failed"] for b in hourly),
                "bytes_last_day": sum(b["bytes"] for b in hourly),
            },
            "repositories": repositories,
            "current": [self._job(j, now, sensitive) for j in current],
            "recent": [self._job(j, now, sensitive) for j in recent],
            "failed": [self._job(j, now, sensitive) for j in failed],
            "leases": [],  # a hook: no leases exist yet (a later issue); the page shows them when there are
            "charts": {
                "hours": hourly,
                "days": jobs.daily(now, hourly) if jobs else [],
                "queue_depth": queue_series,
                "replica_lag": lag_series,
            },
        }
        return doc

    def _job(self, job: dict[str, Any], now: float, sensitive: bool) -> dict[str, Any]:
        out = dict(job)
        if not sensitive:
            out.pop("identity", None)
        if out.get("reason"):
            out["reason"] = _no_userinfo(str(out["reason"]))
        if out.get("state") in (QUEUED, PUBLISHING):
            out["age"] = round(now - float(out["submitted"]), 3)
        return {k: v for k, v in out.items() if v is not None}

    def _repository(self, index: int, name: str, now: float, per_hour: dict[str, int]) -> dict[str, Any]:
        s = self.settings
        rs = s.repositories[index - 1]
        svc = self.service
        out: dict[str, Any] = {"name": name, "kind": "local" if rs.local else "replica"}
        public = self._public(rs)
        manifest = _manifest(public)
        if manifest is not None:
            out.update(
                revision=manifest.revision,
                revision_time=manifest.timestamp,
                revision_age=max(0.0, now - manifest.timestamp),
            )
        if svc is not None:
            out["cids"] = svc.presence.count(name)
        else:
            out["cids"] = _count_cids(public, s.prefix)
        wl = _whitelist(public)
        if wl is not None:
            expires = wl.expires.timestamp()
            out.update(whitelist_expires=expires, whitelist_days_left=round((expires - now) / DAY, 2))
        if isinstance(public, ObjectStore):
            out["store"] = public.description
        with contextlib.suppress(OSError):
            du = shutil.disk_usage(rs.storage)  # with a bucket: the private state's file system
            out["disk"] = {"total": du.total, "used": du.used, "free": du.free}
        if rs.local:
            out["publishes_last_hour"] = per_hour.get(name, 0)
            if svc is not None:
                worker = next((w for w in svc.workers if w.repo_name == name), None)
                out["storage_waiting"] = bool(worker is not None and worker.storage_waiting)
                if svc.leases is not None:  # the paths written now (holders may name people: not shown)
                    out["leases"] = [
                        {
                            "path": x.path,
                            "held": round(now - x.acquired, 1),
                            "expires_in": round(x.expires - now, 1),
                        }
                        for x in svc.leases.list(name)
                    ]
            done_today = False
            if svc is not None and svc.state is not None:
                done_today = svc.state.last_cleanup_day(name) == time.strftime(
                    "%Y-%m-%d", time.localtime(now)
                )
            at = next_cleanup_at(s, index, now, done_today)
            cleanup: dict[str, Any] = {"at": at, "auto": s.auto_cleanup, "expiring": None}
            if manifest is not None:
                estimate = self._estimate(name, at, manifest.revision)
                if estimate is not None:
                    cleanup.update(expiring=estimate.expiring, computed_at=estimate.computed)
            out["next_cleanup"] = cleanup
        else:
            out["upstream"] = [_no_userinfo(u) for u in rs.upstream]
            state = svc.replica_states.get(name) if svc is not None else None
            if state is not None:
                out["replica"] = {
                    "revision": state.revision,
                    "last_success": state.last_success,
                    "last_change": state.last_change,
                    "lag": state.lag(now),
                    "failures": state.failures,
                    "last_error": _no_userinfo(state.last_error) if state.last_error else None,
                }
        return out

    # --- the cleanup estimate --------------------------------------------------------------------

    def _estimate(self, name: str, at: float, revision: int) -> _Estimate | None:
        """The last estimate of how many CIDs the next cleanup expires, starting a new one in the background
        when it is missing, stale, or for another revision or cleanup time."""
        with self._estimate_lock:
            known = self._estimates.get(name)
            fresh = (
                known is not None
                and known.revision == revision
                and abs(known.at - at) < HOUR
                and self.clock() - known.computed < CLEANUP_ESTIMATE_SECONDS
            )
            if not fresh and name not in self._estimating:
                self._estimating.add(name)
                threading.Thread(
                    target=self._run_estimate, args=(name, at), name=f"status-cleanup-{name}", daemon=True
                ).start()
            return known

    def _run_estimate(self, name: str, at: float) -> None:
        s = self.settings
        try:
            storages = {r.name: self._public(r) for r in s.repositories}
            access = self.jobs.access_times() if self.jobs else {}
            plan = plan_cleanup(name, storages, access, s.prefix, s.maxdays, at)
            with self._estimate_lock:
                self._estimates[name] = _Estimate(at, plan.revision, len(plan.expired), self.clock())
        except Exception as exc:  # a repository changing under us, say: tried again on the next request
            log.info("cleanup estimate failed", extra={"repository": name, "error": str(exc)})
        finally:
            with self._estimate_lock:
                self._estimating.discard(name)

    def wait_estimates(self, timeout: float) -> None:
        """For ``rcds status``: give the background estimates a moment to finish."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._estimate_lock:
                if not self._estimating:
                    return
            time.sleep(0.05)

    # --- one CID ---------------------------------------------------------------------------------

    def cid(self, raw: str, sensitive: bool, limit: int = TREE_LIMIT) -> dict[str, Any]:
        """One CID: state, where it is, when published and last used, when it expires, its size, and the
        first ``limit`` entries of its tree (breadth first) with the total count. Raises CidError."""
        cid = validate_cid(raw)
        s = self.settings
        now = self.clock()
        svc = self.service
        doc: dict[str, Any] = {"schema": SCHEMA, "cid": cid, "generated_at": now, "sensitive": sensitive}
        if svc is not None:
            doc.update(svc.status(cid))
            where = svc.presence.find(cid)
            repo_name = where.repository if where else None
        else:
            repo_name = self._find_offline(cid)
            job = self.jobs.latest(cid) if self.jobs else None
            doc["state"] = "published" if repo_name else (job["state"] if job else "missing")
            if repo_name:
                doc["repository"] = repo_name
                doc["path"] = f"/cvmfs/{repo_name}/{s.prefix}/{cid}"
            if job is not None:
                if job["state"] == PUBLISHED:
                    doc.update(files=job["files"], published_at=job["finished"])
                if job["reason"]:
                    doc["reason"] = job["reason"]
            last = self.jobs.last_used(cid) if self.jobs else None
            if last is not None:
                doc["last_used"] = last
        job_row = self.jobs.latest(cid) if self.jobs else None
        if job_row is not None:
            doc["tarball_size"] = job_row["size"]
            if sensitive:
                doc["identity"] = job_row["identity"]
        if doc.get("reason"):
            doc["reason"] = _no_userinfo(str(doc["reason"]))
        if repo_name is not None:
            storage = self._public(next(r for r in s.repositories if r.name == repo_name))
            self._tree(doc, storage, f"/{s.prefix}/{cid}", limit)
            local = next(r.local for r in s.repositories if r.name == repo_name)
            if local:
                # As cleanup decides: the newest of this server's last-use time, the CID directory's own
                # time (its publish) and the ts records of every repository readable here.
                times = [doc.get("last_used"), doc.get("mtime") or doc.get("published_at")]
                times += [self._ts_record_time(self._public(rs), cid) for rs in s.repositories]
                known = [float(t) for t in times if t]
                if known:
                    doc["expires_at"] = max(known) + s.maxdays * DAY
        return doc

    @staticmethod
    def _ts_record_time(storage: Path | ObjectStore, cid: str) -> float | None:
        """The time of ``cid``'s ts record in one repository (a file, or an older version's directory
        holding ``by``), or None."""
        if not _published(storage):
            return None
        try:
            with StorageView(storage) as view:
                d = view.lookup(f"/{TS_DIR}/{cid}")
                if d is not None and d.is_dir:
                    d = view.lookup(f"/{TS_DIR}/{cid}/{LEGACY_MARKER}")
                return float(d.mtime) if d is not None and d.is_regular else None
        except (OSError, ManifestError):
            return None

    def _find_offline(self, cid: str) -> str | None:
        for rs in self.settings.repositories:
            public = self._public(rs)
            if not _published(public):
                continue
            with contextlib.suppress(OSError, ManifestError), StorageView(public) as view:
                base = f"/{self.settings.prefix}/{cid}"
                if view.lookup(f"{base}/{PUBLISHER_FILE}") is not None:
                    return rs.name
        return None

    def _tree(self, doc: dict[str, Any], storage: Path | ObjectStore, top: str, limit: int) -> None:
        with StorageView(storage) as view:
            doc["live_revision"] = view.revision  # "revision": the one that brought the CID
            root = view.lookup(top)
            if root is None:
                return
            doc["mtime"] = root.mtime
            catalog = view.catalog_for(top)
            # The statistics are the CID's only when its directory is a catalog of its own (as rcds
            # publishes it); a repository written otherwise is counted by walking, up to a bound.
            counters = catalog.counters() if catalog.root_prefix == top else None
            if counters is None:
                self._count_by_walking(doc, view, top)
            else:
                totals = counters.totals()
                # Not counted: the .cvmfscatalog marker of each catalog (the CID's own and those below it,
                # empty regular files) and the CID's directory itself.
                files = totals["regular"] - 1 - totals["nested"]
                doc["files"] = files
                doc["size"] = totals["file_size"]
                doc["entries"] = files + totals["symlink"] + totals["special"] + totals["dir"] - 1
            listing: list[dict[str, Any]] = []
            for path, d in _walk(view, top):
                if len(listing) >= limit:
                    break
                item: dict[str, Any] = {
                    "path": path[len(top) + 1 :],
                    "type": "dir" if d.is_dir else "symlink" if d.is_symlink else "file",
                    "size": d.size,
                    "mtime": d.mtime,
                }
                if d.is_symlink:
                    item["target"] = d.symlink
                listing.append(item)
            doc["tree"] = listing
            doc["tree_truncated"] = len(listing) >= limit and doc.get("entries", 0) > len(listing)

    @staticmethod
    def _count_by_walking(doc: dict[str, Any], view: StorageView, top: str) -> None:
        files = size = entries = 0
        for _, d in _walk(view, top):
            entries += 1
            if d.is_regular:
                files += 1
                size += d.size
            if entries >= WALK_LIMIT:
                return  # too many to count on a page view: left out
        doc.update(files=files, size=size, entries=entries)


def _walk(view: StorageView, top: str) -> Iterator[tuple[str, Any]]:
    """Entries below ``top``, breadth first, each directory's entries in name order."""
    queue = [normalize_path(top)]
    while queue:
        here = queue.pop(0)
        for d in sorted(view.listdir(here), key=lambda d: d.name):
            if d.name == ".cvmfscatalog":
                continue
            path = f"{here}/{d.name}"
            yield path, d
            if d.is_dir:
                queue.append(path)


def _read_public(storage: Path | ObjectStore, name: str) -> bytes:
    return storage.get(name) if isinstance(storage, ObjectStore) else (storage / name).read_bytes()


def _published(storage: Path | ObjectStore) -> bool:
    return storage.exists(MANIFEST) if isinstance(storage, ObjectStore) else (storage / MANIFEST).exists()


def _manifest(storage: Path | ObjectStore) -> Manifest | None:
    try:
        return Manifest.parse(_read_public(storage, MANIFEST))[0]
    except (OSError, ObjectMissing, ManifestError):
        return None


def _whitelist(storage: Path | ObjectStore) -> Whitelist | None:
    try:
        return Whitelist.parse(_read_public(storage, WHITELIST))[0]
    except Exception:  # missing or unreadable: the page says nothing rather than fail
        return None


def _count_cids(storage: Path | ObjectStore, prefix: str) -> int | None:
    try:
        return len(scan_published_cids(storage, prefix))
    except (OSError, ManifestError):
        return None


__all__ = [
    "SCHEMA",
    "CidError",
    "JobHistory",
    "ReplicaState",
    "StatusCollector",
    "StatusHistory",
    "next_cleanup_at",
]
