"""Last-use times as they happen (``update``, a ``publish`` of a present CID): kept in memory and written
to the state database in batches, so that a busy CID costs one row write per flush, not per request.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .service import PublishService

log = logging.getLogger("rcds.publish")


class Touches:
    """The service's pending last-use times, and the thread that flushes them (it also prunes old jobs)."""

    def __init__(self, service: PublishService) -> None:
        self.service = service  # its state database is opened after us (``open``)
        self.thread: threading.Thread | None = None
        self._pending: dict[str, float] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="touch-flusher", daemon=True)
        self.thread.start()

    def touch(self, cid: str) -> None:
        with self._lock:
            self._pending[cid] = self.service.clock()

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, {}
        state = self.service.state
        if batch and state is not None:
            state.record_access(batch)

    def last_used(self, cid: str) -> float | None:
        """The newest of the pending time and the stored one."""
        with self._lock:
            pending = self._pending.get(cid)
        state = self.service.state
        stored = state.last_used(cid) if state is not None else None
        known = [t for t in (pending, stored) if t is not None]
        return max(known) if known else None

    def _loop(self) -> None:
        svc = self.service
        while not svc.stopping.wait(svc.settings.touch_flush_seconds):
            try:
                self.flush()
                assert svc.state is not None
                svc.state.prune(time.time() - 7 * 86400)  # finished jobs: a week of ``status``
            except Exception:
                log.exception("flushing access times failed")
