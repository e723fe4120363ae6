"""Replicas of other servers' repositories (``upstream``), kept current inside the publish service.

One thread per replica snapshots it every ``replica_interval``, and at once when the upstream's
notification stream announces a newer revision (``rcds.cvmfs.replica``, ``rcds.cvmfs.subscriber``). Each
snapshot runs under the replica's lock in ``locks``, which the daily cleanup (``cleaner``) takes around
the replica's garbage collection. ``states`` is what each thread last saw, for the status page.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import TYPE_CHECKING

from ..logs import fields
from ..storage import ObjectStore
from .config import RepositorySettings
from .status import ReplicaState

if TYPE_CHECKING:
    from ..cvmfs.subscriber import Activity
    from .service import PublishService

log = logging.getLogger("rcds.publish")


class Replication:
    """The replication threads of one service, and what they share with the rest of it."""

    def __init__(self, service: PublishService) -> None:
        self.service = service
        upstreams = [rs for rs in service.settings.repositories if rs.upstream]
        # Per replica we snapshot: held by its replication thread around each snapshot and by cleanup
        # around its garbage collection, so that neither finds the other holding the replica's lock.
        self.locks = {rs.name: threading.Lock() for rs in upstreams}
        # For the status page (``status``): what each replication thread last saw.
        self.states = {rs.name: ReplicaState() for rs in upstreams}
        self.threads: list[threading.Thread] = []
        self._wakes: list[threading.Event] = []  # set on stop: replication threads wait on them
        self._stores: dict[str, ObjectStore] = {}  # replicas kept in buckets, read by ``public``
        self._stores_lock = threading.Lock()

    def start(self) -> None:
        for rs in self.service.settings.repositories:
            if rs.upstream:
                thread = threading.Thread(
                    target=self._loop, args=(rs,), name=f"replica-{rs.name}", daemon=True
                )
                thread.start()
                self.threads.append(thread)

    def wake_all(self) -> None:
        """Cut every thread's wait short (on stop: they see ``stopping`` and end)."""
        for wake in self._wakes:
            wake.set()

    def store(self, rs: RepositorySettings) -> ObjectStore:
        """The bucket of a replica kept in one (``storage = "s3://..."``), opened once."""
        with self._stores_lock:
            if rs.name not in self._stores:
                from ..storage import store_from_settings

                self._stores[rs.name] = store_from_settings(rs.store)
            return self._stores[rs.name]

    def _loop(self, rs: RepositorySettings) -> None:
        """Keep the replica of another server's repository current: a snapshot every replica_interval, and
        at once when the upstream's notification stream announces a revision newer than the replica's.

        A message only wakes the loop; the snapshot verifies what it fetches, so a forged or stale message
        costs one snapshot that finds nothing new. With the stream down the interval goes on as before.
        A source that is down only delays the replica; ``exists`` goes on answering from what it holds.
        """
        from ..cvmfs.replica import snapshot
        from ..cvmfs.subscriber import NotificationSubscriber

        assert rs.public_key is not None
        svc = self.service
        m = svc.metrics
        wake = threading.Event()
        self._wakes.append(wake)
        lock = threading.Lock()
        served = svc.known_revision.get(rs.name, -1)
        pending: list[tuple[int, float]] = []  # the newest announced revision not yet served, and when

        def on_message(message: Activity) -> None:
            revision = message.revision
            if revision <= served:
                return  # what the replica has (the message sent on subscribe, keep-alives)
            with lock:
                if not pending or revision > pending[0][0]:
                    pending[:] = [(revision, message.announced or time.time())]
            wake.set()

        def on_state(up: bool) -> None:
            m.notification_stream_up.labels(rs.name).set(1 if up else 0)
            if not up:
                m.notification_streams_lost.labels(rs.name).inc()

        subscriber = None
        if rs.notification_roots:
            m.notification_stream_up.labels(rs.name).set(0)
            subscriber = NotificationSubscriber(
                list(rs.notification_roots), rs.name, on_message, on_state=on_state,
                idle_timeout=max(100.0, 3 * svc.settings.notifications.keepalive),
            ).start()  # fmt: skip
        failures, trigger = 0, "start"
        try:
            while not svc.stopping.is_set():
                wake.clear()  # a message arriving during this snapshot wakes the next one
                try:
                    with self.locks[rs.name]:  # never while cleanup collects its garbage
                        report = snapshot(
                            list(rs.upstream), rs.storage, public_keys=[rs.public_key], fqrn=rs.name,
                            store=rs.store or None,
                        )  # fmt: skip
                    if failures:
                        log.info(
                            "replica source back", extra=fields(repository=rs.name, after_failures=failures)
                        )
                    failures = 0
                    self.states[rs.name].succeeded(report.revision, report.changed, time.time())
                    served = report.revision
                    lag = None
                    with lock:
                        announced = pending[0] if pending else None
                        if announced is not None and (announced[0] <= served or trigger == "notification"):
                            pending.clear()
                    if announced is not None and announced[0] <= served:
                        lag = max(0.0, time.time() - announced[1])
                        m.notification_lag.labels(rs.name).observe(lag)
                    elif announced is not None and trigger == "notification":
                        m.notifications_unconfirmed.labels(rs.name).inc()
                        log.warning(
                            "notification not confirmed by the snapshot",
                            extra=fields(repository=rs.name, announced=announced[0], revision=served),
                        )
                    if report.changed:
                        svc.announce(rs.name)  # verified and live here: a chain of servers passes it on
                        svc.refresh_presence(rs.name)
                        log.info(
                            "replicated",
                            extra=fields(
                                repository=rs.name, revision=report.revision, objects=report.objects_fetched,
                                bytes=report.bytes_fetched, seconds=round(report.seconds, 3), trigger=trigger,
                                notification_lag=None if lag is None else round(lag, 3),
                            ),
                        )  # fmt: skip
                except Exception as exc:
                    failures += 1
                    self.states[rs.name].failed(f"{type(exc).__name__}: {exc}", time.time())
                    if failures == 1 or failures % 20 == 0:  # a dead peer must not flood the log
                        log.warning(
                            "replication failed",
                            extra=fields(
                                repository=rs.name, failures=failures, error=f"{type(exc).__name__}: {exc}"
                            ),
                        )
                interval = svc.settings.replica_interval
                trigger = "notification" if wake.wait(interval * random.uniform(0.8, 1.2)) else "interval"
        finally:
            if subscriber is not None:
                subscriber.stop()
