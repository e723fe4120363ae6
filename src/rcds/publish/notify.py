"""The announcement hub: every new revision of every repository this server holds, to its subscribers.

The service calls ``announce`` once a signed manifest is live (its own publishes and cleanups, revisions
made by other processes, and new revisions of its replicas, so that a chain of servers propagates them);
the web layer (``rcds.web.notifications``) streams each subscription as server-sent events. The hub keeps
the latest message per repository, which a new subscriber gets first (as the CVMFS gateway does).

Publishing never waits for a subscriber: ``announce`` only appends to bounded per-subscriber queues under a
short lock and calls each subscription's ``wake`` (which must not block). A subscriber whose queue is
full is dropped; the number of subscribers is capped.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from ..cvmfs.subscriber import Activity, make_activity
from ..logs import fields

log = logging.getLogger("rcds.notify")


class TooManySubscribers(Exception):
    pass


class Subscription:
    """One subscriber's queue of messages (JSON text). ``closed`` once dropped or unsubscribed."""

    def __init__(self, repository: str, limit: int, wake: Callable[[], None]) -> None:
        self.repository = repository
        self.limit = limit
        self.wake = wake
        self.queue: collections.deque[str] = collections.deque()
        self.closed = False
        self.dropped: str | None = None  # why the hub dropped it

    def pop(self) -> str | None:
        try:
            return self.queue.popleft()
        except IndexError:
            return None


class NotificationHub:
    def __init__(
        self,
        max_subscribers: int = 1000,
        queue_limit: int = 64,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        self.max_subscribers = max_subscribers
        self.queue_limit = queue_limit
        self.on_drop = on_drop
        self._lock = threading.Lock()
        self._subscribers: dict[str, set[Subscription]] = {}
        self._latest: dict[str, tuple[int, Activity, str]] = {}  # repository -> revision, message, JSON
        self.announced = 0

    def announce(self, repository: str, manifest: bytes, now: float | None = None) -> bool:
        """Tell the repository's subscribers about this manifest, unless its revision was announced already.

        Returns whether it was new. Never blocks on a subscriber.
        """
        message = make_activity(repository, manifest, time.time() if now is None else now)
        revision = message.revision
        text = message.to_json()
        dropped: list[Subscription] = []
        with self._lock:
            previous = self._latest.get(repository)
            if previous is not None and previous[0] >= revision:
                return False
            self._latest[repository] = (revision, message, text)
            self.announced += 1
            woken = []
            for sub in list(self._subscribers.get(repository, ())):
                if len(sub.queue) >= sub.limit:
                    self._remove(sub)
                    sub.dropped = "slow"
                    dropped.append(sub)
                else:
                    sub.queue.append(text)
                woken.append(sub)
        for sub in woken:
            sub.wake()
        for sub in dropped:
            self._dropped(sub)
        return True

    def latest(self, repository: str) -> str | None:
        with self._lock:
            entry = self._latest.get(repository)
        return entry[2] if entry is not None else None

    def latest_revision(self, repository: str) -> int | None:
        with self._lock:
            entry = self._latest.get(repository)
        return entry[0] if entry is not None else None

    def subscribe(self, repository: str, wake: Callable[[], None]) -> Subscription:
        """A new subscription, holding the latest message (if any) already."""
        sub = Subscription(repository, self.queue_limit, wake)
        with self._lock:
            if self.count_locked() >= self.max_subscribers:
                raise TooManySubscribers(f"{self.max_subscribers} subscribers already")
            self._subscribers.setdefault(repository, set()).add(sub)
            entry = self._latest.get(repository)
            if entry is not None:
                sub.queue.append(entry[2])
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._remove(sub)

    def drop(self, sub: Subscription, reason: str) -> None:
        """Drop a subscriber the web layer found stalled (its socket does not drain)."""
        with self._lock:
            if sub.closed:
                return
            self._remove(sub)
            sub.dropped = reason
        sub.wake()
        self._dropped(sub)

    def close(self) -> None:
        """End every subscription (shutdown): each stream handler sees ``closed`` and returns."""
        with self._lock:
            subs = [s for group in self._subscribers.values() for s in group]
            for sub in subs:
                self._remove(sub)
        for sub in subs:
            sub.wake()

    def count(self) -> int:
        with self._lock:
            return self.count_locked()

    def count_locked(self) -> int:
        return sum(len(group) for group in self._subscribers.values())

    def _remove(self, sub: Subscription) -> None:
        sub.closed = True
        group = self._subscribers.get(sub.repository)
        if group is not None:
            group.discard(sub)
            if not group:
                del self._subscribers[sub.repository]

    def _dropped(self, sub: Subscription) -> None:
        reason = sub.dropped or "slow"
        log.warning(
            "notification subscriber dropped",
            extra=fields(repository=sub.repository, reason=reason, queued=len(sub.queue)),
        )
        if self.on_drop is not None:
            self.on_drop(reason)


__all__ = ["NotificationHub", "Subscription", "TooManySubscribers"]
