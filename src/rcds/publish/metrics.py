"""Prometheus metrics of the publish service (one registry per service, so tests can run several)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge(
            "rcds_queue_depth", "Uploads acknowledged and waiting to be published", registry=r
        )
        self.waiting = Gauge(
            "rcds_waiting_jobs",
            "Acknowledged uploads waiting for the storage to recover (full disk, I/O errors): kept, retried",
            registry=r,
        )
        self.storage_waiting = Gauge(
            "rcds_storage_waiting",
            "1 while a repository's publishing waits for its storage to recover (full disk, I/O errors)",
            ["repository"],
            registry=r,
        )
        self.publishing = Gauge("rcds_publishing", "Uploads being published now", ["repository"], registry=r)
        self.publish_seconds = Histogram(
            "rcds_publish_seconds",
            "Upload acknowledged to CID live in a signed revision",
            ["repository"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "rcds_commit_seconds", "One repository revision: ingest and commit", ["repository"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "rcds_batch_cids", "CIDs published per revision (group commit)", ["repository"],
            buckets=(1, 2, 5, 10, 20, 50, 100, 200), registry=r,
        )  # fmt: skip
        self.published = Counter("rcds_published_cids", "CIDs published", ["repository"], registry=r)
        self.bytes_ingested = Counter(
            "rcds_ingested_bytes", "Uncompressed file bytes published", ["repository"], registry=r
        )
        self.bytes_uploaded = Counter("rcds_uploaded_bytes", "Tarball bytes received", registry=r)
        self.files_ingested = Counter(
            "rcds_ingested_files", "Tree entries published", ["repository"], registry=r
        )
        self.failures = Counter("rcds_publish_failures", "Failed publishes by reason", ["reason"], registry=r)
        self.requests = Counter("rcds_requests", "API requests", ["endpoint", "code"], registry=r)
        self.cids_present = Gauge("rcds_cids", "CIDs in the live revision", ["repository"], registry=r)
        self.revision = Gauge("rcds_revision", "Live revision", ["repository"], registry=r)
        self.cids_expired = Counter(
            "rcds_cleanup_expired_cids", "CIDs removed by cleanup as unused", ["repository"], registry=r
        )
        self.cleanup_seconds = Histogram(
            "rcds_cleanup_seconds", "Cleanup plus garbage collection of a repository", ["repository"],
            buckets=(1, 5, 15, 60, 300, 900, 3600), registry=r,
        )  # fmt: skip
        self.gc_objects_swept = Counter(
            "rcds_gc_swept_objects", "Objects deleted by garbage collection", ["repository"], registry=r
        )
        self.ts_skipped = Counter(
            "rcds_ts_records_skipped", "Last-use records not written: another CID's record is in their place",
            ["repository"], registry=r,
        )  # fmt: skip
        self.gc_bytes_freed = Counter(
            "rcds_gc_freed_bytes", "Bytes freed by garbage collection", ["repository"], registry=r
        )

        # Leases on sub-paths and ingest slots (``rcds.publish.leases``, ``rcds.publish.slots``).
        self.leases_held = Gauge(
            "rcds_leases_held", "Leases held now (ingests and external writers)", registry=r
        )
        self.lease_waiting = Gauge(
            "rcds_lease_waiting_jobs", "Queued jobs whose path is leased by someone else (left queued)",
            ["repository"], registry=r,
        )  # fmt: skip
        self.leases_expired = Counter(
            "rcds_leases_expired", "Leases that expired (their holder made no progress)", ["repository"],
            registry=r,
        )  # fmt: skip
        self.early_staging = Counter(
            "rcds_early_staging",
            "Big uploads by how they were ingested: staged as they arrived (staged), or not: no free slot, "
            "queued work first, lease busy, duplicate CID, upload abandoned, upload too slow (the slot given back), "
            "staging failed (requeued), error",
            ["outcome"],
            registry=r,
        )
        self.early_overlap_seconds = Histogram(
            "rcds_early_staging_overlap_seconds",
            "Seconds an early staging ran before its upload was acknowledged (ingest time saved)",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.graft_seconds = Histogram(
            "rcds_graft_seconds", "One revision grafting staged ingests (the writer lock held)", ["repository"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10), registry=r,
        )  # fmt: skip

        # The CVMFS-gateway API (``rcds.publish.gateway``).
        self.gateway_payload_bytes = Counter(
            "rcds_gateway_payload_bytes", "Object bytes received in gateway payloads (re-hashed, stored)",
            ["repository"], registry=r,
        )  # fmt: skip
        self.gateway_commits = Counter(
            "rcds_gateway_commits", "Gateway commits by outcome (ok, refused)", ["repository", "outcome"],
            registry=r,
        )  # fmt: skip
        self.gateway_commit_seconds = Histogram(
            "rcds_gateway_commit_seconds", "A gateway commit: checks, then the graft", ["repository"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=r,
        )  # fmt: skip

        # Notifications (``rcds.publish.notify``, ``rcds.web.notifications``; the replicas' subscribers).
        self.notification_subscribers = Gauge(
            "rcds_notification_subscribers", "Notification streams open to this server", registry=r
        )
        self.notifications_announced = Counter(
            "rcds_notifications_announced",
            "New revisions announced to subscribers",
            ["repository"],
            registry=r,
        )
        self.notification_drops = Counter(
            "rcds_notification_subscribers_dropped", "Subscribers dropped (slow: queue full, stalled: "
            "socket not drained)", ["reason"], registry=r,
        )  # fmt: skip
        self.notification_stream_up = Gauge(
            "rcds_notification_stream_up", "1 while a replica follows its upstream's notification stream",
            ["repository"], registry=r,
        )  # fmt: skip
        self.notification_streams_lost = Counter(
            "rcds_notification_streams_lost", "Times a replica's notification stream went down",
            ["repository"], registry=r,
        )  # fmt: skip
        self.notification_lag = Histogram(
            "rcds_notification_lag_seconds", "Upstream announced a revision to this replica serving it",
            ["repository"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=r,
        )  # fmt: skip
        self.notifications_unconfirmed = Counter(
            "rcds_notifications_unconfirmed",
            "Notifications whose revision the snapshot they triggered did not find (forged, or rolled back)",
            ["repository"], registry=r,
        )  # fmt: skip

    def watch_queue(self, depth: Callable[[], int], waiting: Callable[[], int]) -> None:
        self.queue_depth.set_function(lambda: float(depth()))
        self.waiting.set_function(lambda: float(waiting()))

    def watch_leases(self, held: Callable[[], int]) -> None:
        self.leases_held.set_function(lambda: float(held()))

    def render(self) -> bytes:
        return generate_latest(self.registry)
