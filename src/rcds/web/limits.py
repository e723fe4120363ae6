"""Keeping the server serviceable under load or attack (issue 12, defect 6).

A stalled upload holds a socket and an open spool file. Without limits a few hundred of them exhausted the
file descriptors: accept() and open() failed with EMFILE, every new upload got a 500 with a traceback in the
log, and normal publishes waited. The pieces here:

* :class:`UploadSlots`: how many uploads may be received at once, in total and per identity; the web layer
  answers 503 with ``Retry-After`` beyond that.
* :class:`ConnectionCap`: a protocol factory that answers a new connection with a canned 503 and closes it
  once ``max_connections`` are open, so the process never reaches its descriptor limit in accept().
* :func:`raise_open_file_limit` and :func:`connection_budget`: use the descriptors the system allows, and
  size the connection cap from them.
* :class:`LogThrottle` and :class:`ThrottleFilter`: the log says what is refused, at a bounded rate.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Final

log = logging.getLogger("rcds.server")

# Descriptors kept for what is not a client connection or a spool file: listening sockets, SQLite
# databases, repository files being served or written, key-fetch connections, log files.
FD_RESERVE: Final = 128


class UploadSlots:
    """Counts uploads in progress; :meth:`acquire` says no when the total or the identity's share is used up.

    Only touched from the event loop thread, so no lock is needed.
    """

    def __init__(self, total: int, per_identity: int) -> None:
        self.total = total
        self.per_identity = per_identity
        self._active: Counter[str] = Counter()
        self._count = 0

    def acquire(self, identity: str) -> bool:
        if self._count >= self.total or self._active[identity] >= self.per_identity:
            return False
        self._active[identity] += 1
        self._count += 1
        return True

    def release(self, identity: str) -> None:
        self._active[identity] -= 1
        if self._active[identity] <= 0:
            del self._active[identity]
        self._count -= 1

    @property
    def in_use(self) -> int:
        return self._count


class LogThrottle:
    """At most ``burst`` events per key in each ``interval`` seconds; counts what it holds back."""

    def __init__(self, burst: int = 10, interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int, int]] = {}  # key -> (window start, allowed, suppressed)

    def allow(self, key: str) -> tuple[bool, int]:
        """Whether to log this event, and how many of its kind were suppressed since the last one logged."""
        now = self._clock()
        with self._lock:
            start, allowed, suppressed = self._windows.get(key, (now, 0, 0))
            if now - start >= self.interval:
                start, allowed = now, 0
            if allowed < self.burst:
                self._windows[key] = (start, allowed + 1, 0)
                return True, suppressed
            self._windows[key] = (start, allowed, suppressed + 1)
            return False, 0


class ThrottleFilter(logging.Filter):
    """Rate-limits a library logger (asyncio's accept errors, aiohttp's bad-request tracebacks) per message."""

    def __init__(self, throttle: LogThrottle) -> None:
        super().__init__()
        self.throttle = throttle

    def filter(self, record: logging.LogRecord) -> bool:
        allowed, suppressed = self.throttle.allow(f"{record.name}:{record.msg}")
        if allowed and suppressed:
            record.msg = f"{record.msg} ({suppressed} similar messages suppressed)"
        return allowed


def throttle_library_logs(throttle: LogThrottle) -> None:
    for name in ("asyncio", "aiohttp.server", "aiohttp.web", "aiohttp.access"):
        logging.getLogger(name).addFilter(ThrottleFilter(throttle))


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (capped at 2**20); return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard if hard != resource.RLIM_INFINITY else 1 << 20, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft if soft != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
        return soft
    return wanted


def connection_budget(open_files: int, max_uploads: int) -> int:
    """Client connections that fit in ``open_files`` next to one spool file per upload and the reserve."""
    return max(16, open_files - max_uploads - FD_RESERVE)


class _Busy(asyncio.Protocol):
    """Answers a connection over the cap with a 503 and closes it, without reading the request."""

    def __init__(self, retry_after: int) -> None:
        self._retry_after = retry_after

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        body = b"Service busy: too many connections, retry later\n"
        head = (
            f"HTTP/1.1 503 Service Unavailable\r\nRetry-After: {self._retry_after}\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\nCache-control: max-age=0\r\n"
            "Connection: close\r\n\r\n"
        )
        transport.write(head.encode() + body)
        transport.close()  # after the write is flushed

    def data_received(self, data: bytes) -> None:
        pass  # the request is not read: the answer does not depend on it


class _Counted(asyncio.Protocol):
    """Passes every event to the real protocol, and gives its slot back when the connection ends.

    The slot is returned by ``connection_lost`` or, for a connection that never got that far (a failed TLS
    handshake), when the wrapper is freed: :func:`weakref.finalize` runs at most once either way.
    """

    def __init__(self, inner: asyncio.Protocol, release: Callable[[], None]) -> None:
        self._inner = inner
        self._release = weakref.finalize(self, release)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        self._inner.connection_lost(exc)


class ConnectionCap:
    """A protocol factory for ``loop.create_server``: ``factory()`` while fewer than ``limit`` connections
    are open, else a 503 answer.

    Connections are counted from the moment they are accepted (asyncio accepts a burst of them before any
    ``connection_made``, and a TLS connection is not "made" until its handshake is done), so neither a burst
    nor slow handshakes get past the cap.
    """

    def __init__(
        self, factory: Callable[[], asyncio.Protocol], limit: int, retry_after: int, throttle: LogThrottle
    ) -> None:
        self._factory = factory
        self.limit = limit
        self._retry_after = retry_after
        self._throttle = throttle
        self.open = 0
        self.refused = 0

    def _release(self) -> None:
        self.open -= 1

    def __call__(self) -> asyncio.Protocol:
        if self.open < self.limit:
            self.open += 1
            return _Counted(self._factory(), self._release)
        self.refused += 1
        allowed, suppressed = self._throttle.allow("connection cap")
        if allowed:
            log.warning(
                "connection refused: %d connections open (server.max_connections)%s",
                self.limit,
                f" ({suppressed} similar messages suppressed)" if suppressed else "",
            )
        return _Busy(self._retry_after)
