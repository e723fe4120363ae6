"""CVMFS repository notifications: the activity message and an SSE subscriber (standard library only).

The wire format is the CVMFS notification system's (``cvmfs/notify/messages.cc``, the gateway's
``frontend/notifications.go``), so that a stock ``cvmfs_swissknife notify -s`` can follow an rcds server and
an rcds replica can follow a CVMFS gateway:

* subscribe: ``GET <api>/notifications/subscribe`` with the JSON body ``{"version":1,"repository":"<fqrn>"}``
  (rcds servers also take ``?repository=<fqrn>`` instead of the body);
* the answer is ``text/event-stream``; every message is one event ``data: <json>\\n\\n``, where the JSON is
  ``{"version":1,"timestamp":"2 Dec 2026 18:09:07","type":"activity","repository":"<fqrn>",
  "manifest":"<base64 of the whole signed .cvmfspublished>"}``; the server sends its latest message for the
  repository at once on subscribe.

rcds adds ``"rcds_time"`` (seconds since the epoch, float) because the CVMFS ``timestamp`` has one-second
resolution; stock parsers ignore unknown keys. A message is a hint, never trusted: a subscriber only uses
it to snapshot sooner, and the snapshot verifies the signed manifest it fetches itself.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import contextlib
import http.client
import json
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from ..logs import fields

log = logging.getLogger("rcds.notify")

MESSAGE_VERSION = 1
SUBSCRIBE_PATH = "/notifications/subscribe"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
MAX_EVENT_BYTES = 1 << 20  # a manifest is a few hundred bytes; anything this large is not a message


class MessageError(ValueError):
    pass


@dataclass(frozen=True)
class Activity:
    """One notification: ``repository`` has a new signed manifest (``manifest``, raw bytes)."""

    repository: str
    manifest: bytes
    timestamp: str  # as CVMFS writes it: "%d %b %Y %H:%M:%S" (rcds: UTC)
    sent_at: float | None = None  # rcds_time: when the server announced it (precise)
    version: int = MESSAGE_VERSION

    @property
    def revision(self) -> int:
        """The revision the manifest names (its ``S`` line); unverified, -1 if it names none."""
        for line in self.manifest.split(b"\n"):
            if line == b"--":
                break
            if line.startswith(b"S"):
                try:
                    return int(line[1:].decode("ascii"))
                except (UnicodeDecodeError, ValueError):
                    return -1
        return -1

    @property
    def announced(self) -> float | None:
        """When the server announced it (epoch seconds): ``rcds_time``, else the CVMFS timestamp as UTC."""
        if self.sent_at is not None:
            return self.sent_at
        return parse_cvmfs_time(self.timestamp)

    def to_json(self) -> str:
        doc = {
            "version": self.version,
            "timestamp": self.timestamp,
            "type": "activity",
            "repository": self.repository,
            "manifest": base64.b64encode(self.manifest).decode("ascii"),
        }
        if self.sent_at is not None:
            doc["rcds_time"] = round(self.sent_at, 6)
        return json.dumps(doc, separators=(",", ":"))  # one line: an SSE data field cannot hold a newline


def cvmfs_time(now: float) -> str:
    """``StringifyTime`` of CVMFS (``cvmfs/util/string.cc``): ``2 Dec 2026 18:09:07``, here always UTC."""
    t = time.gmtime(now)
    return f"{t.tm_mday} {_MONTHS[t.tm_mon - 1]} {t.tm_year} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"


def parse_cvmfs_time(text: str) -> float | None:
    try:
        day, month, year, clock = text.split()
        hh, mm, ss = (int(x) for x in clock.split(":"))
        return float(calendar.timegm((int(year), _MONTHS.index(month) + 1, int(day), hh, mm, ss, 0, 0, 0)))
    except ValueError:
        return None


def make_activity(repository: str, manifest: bytes, now: float | None = None) -> Activity:
    now = time.time() if now is None else now
    return Activity(repository, manifest, cvmfs_time(now), sent_at=now)


def parse_activity(text: str) -> Activity:
    """An activity message (JSON), as ``notify::msg::Activity::FromJSONString`` reads it."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise MessageError(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("type") != "activity":
        raise MessageError("not an activity message")
    repository, manifest, stamp = doc.get("repository"), doc.get("manifest"), doc.get("timestamp")
    version, sent_at = doc.get("version"), doc.get("rcds_time")
    if not isinstance(repository, str) or not isinstance(manifest, str) or not isinstance(stamp, str):
        raise MessageError("repository, manifest and timestamp must be strings")
    if not isinstance(version, int):
        raise MessageError("version must be an integer")
    try:
        raw = base64.b64decode(manifest, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MessageError(f"manifest is not base64: {exc}") from exc
    if isinstance(sent_at, bool) or not isinstance(sent_at, (int, float)):
        sent_at = None
    return Activity(repository, raw, stamp, float(sent_at) if sent_at is not None else None, version)


def api_root_of(repository_url: str, fqrn: str) -> str | None:
    """The notification API root of a server whose repository URL is ``<base>/cvmfs/<fqrn>``: ``<base>/api/v1``.

    None for a URL of another shape (a squid, a plain directory...): its notifications must be named.
    """
    url = repository_url.rstrip("/")
    suffix = f"/cvmfs/{fqrn}"
    if not url.startswith(("http://", "https://")) or not url.endswith(suffix):
        return None
    return url[: -len(suffix)] + "/api/v1"


class SseParser:
    """Server-sent events, as the HTML standard parses them: ``data:`` lines joined, a blank line ends an
    event, ``:`` lines are comments; other fields (``event``, ``id``, ``retry``) are not used here."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._size = 0

    def feed_line(self, line: str) -> str | None:
        """One line without its end; returns an event's data when the line completes one."""
        if not line:
            if not self._data:
                return None
            data, self._data, self._size = "\n".join(self._data), [], 0
            return data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            value = value[1:] if value.startswith(" ") else value
            self._size += len(value)
            if self._size > MAX_EVENT_BYTES:
                raise MessageError("event too large")
            self._data.append(value)
        return None


class NotificationSubscriber:
    """Follows one repository's notifications from a list of servers (failover in order), in a thread.

    ``on_message`` gets every well-formed activity message for the repository (including the one the server
    sends on subscribe); ``on_state`` True when a stream is open, False when it went down. A stream that
    breaks or stays silent for ``idle_timeout`` seconds is reopened after a backoff (1 s doubling to
    ``max_backoff``, jittered), trying the next server.
    """

    def __init__(
        self,
        api_roots: list[str],
        repository: str,
        on_message: Callable[[Activity], None],
        *,
        on_state: Callable[[bool], None] | None = None,
        idle_timeout: float = 100.0,
        connect_timeout: float = 10.0,
        max_backoff: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not api_roots:
            raise ValueError("no notification server")
        self.api_roots = [u.rstrip("/") for u in api_roots]
        self.repository = repository
        self.on_message = on_message
        self.on_state = on_state
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.max_backoff = max_backoff
        self.ssl_context = ssl_context
        self.connected = False
        self.messages = 0  # well-formed messages received, all streams
        self.connects = 0  # streams opened
        self._stop = threading.Event()
        self._conn: http.client.HTTPConnection | None = None
        self._sock: socket.socket | None = None
        self._streamed = False  # the current attempt got as far as an open stream
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> NotificationSubscriber:
        self._thread = threading.Thread(target=self._run, name=f"notify-{self.repository}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):  # wakes the thread out of its blocking read
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        failures, index = 0, 0
        while not self._stop.is_set():
            root = self.api_roots[index % len(self.api_roots)]
            opened = time.monotonic()
            self._streamed = False
            try:
                self._follow(root)
                reason = "closed by the server"
            except TimeoutError as exc:
                reason = f"{type(exc).__name__}: {exc}"
                if self._streamed and not self._stop.is_set():
                    # Silent for idle_timeout after a stream was open (a CVMFS gateway sends no keep-alives;
                    # a vanished peer sends nothing): reopen at once, quietly; a failure there is "down".
                    log.info("notification stream idle, reopened", extra=fields(repository=self.repository))
                    continue
            except Exception as exc:  # whatever a server sends, the thread goes on (and polling too)
                reason = f"{type(exc).__name__}: {exc}"
            if self.connected:
                self.connected = False
                if self.on_state is not None:
                    self.on_state(False)
                if not self._stop.is_set():
                    log.warning(
                        "notification stream down",
                        extra=fields(repository=self.repository, server=root, reason=reason),
                    )
            elif not self._stop.is_set() and (failures == 0 or failures % 20 == 0):
                log.info(
                    "notification stream unavailable",
                    extra=fields(repository=self.repository, server=root, reason=reason),
                )
            # A stream that lived a while was healthy: start the backoff again from the bottom.
            failures = 0 if time.monotonic() - opened > 30 else failures + 1
            index += 1
            delay = min(self.max_backoff, 2.0 ** max(0, failures - 1)) * random.uniform(0.5, 1.0)
            self._stop.wait(delay)

    def _follow(self, root: str) -> None:
        parts = urlsplit(root)
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(
                parts.hostname or "", parts.port, timeout=self.connect_timeout,
                context=self.ssl_context or ssl.create_default_context(),
            )  # fmt: skip
        elif parts.scheme == "http":
            conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=self.connect_timeout)
        else:
            raise MessageError(f"not an http(s) URL: {root}")
        with self._lock:
            if self._stop.is_set():
                return
            self._conn = conn
        try:
            body = json.dumps({"version": MESSAGE_VERSION, "repository": self.repository}).encode()
            # The CVMFS request (a GET with a JSON body) plus the query form, which rcds servers accept too.
            path = f"{parts.path}{SUBSCRIBE_PATH}?repository={quote(self.repository)}"
            conn.request(
                "GET", path, body=body,
                headers={"Content-Type": "application/json", "Accept": "text/event-stream",
                         "User-Agent": "rcds-subscriber"},
            )  # fmt: skip
            sock = conn.sock  # getresponse() lets go of it when the server says it will close
            with self._lock:
                self._sock = sock
            resp = conn.getresponse()
            ctype = resp.getheader("Content-Type", "")
            if resp.status != 200 or not ctype.startswith("text/event-stream"):
                raise http.client.HTTPException(f"HTTP {resp.status} {ctype}: {resp.read(200)!r}")
            assert sock is not None
            sock.settimeout(self.idle_timeout)  # keep-alives arrive well within it
            self.connects += 1
            self._streamed = self.connected = True
            if self.on_state is not None:
                self.on_state(True)
            log.info("notification stream up", extra=fields(repository=self.repository, server=root))
            parser = SseParser()
            while not self._stop.is_set():
                raw = resp.readline(MAX_EVENT_BYTES + 2)
                if not raw:
                    return
                data = parser.feed_line(raw.decode("utf-8", "replace").rstrip("\r\n"))
                if data is None:
                    continue
                try:
                    message = parse_activity(data)
                except MessageError as exc:
                    log.info(
                        "notification ignored", extra=fields(repository=self.repository, reason=str(exc))
                    )
                    continue
                if message.repository != self.repository:
                    continue
                self.messages += 1
                self.on_message(message)
        finally:
            with self._lock:
                self._conn = self._sock = None
            conn.close()


__all__ = [
    "Activity",
    "MessageError",
    "NotificationSubscriber",
    "SseParser",
    "api_root_of",
    "cvmfs_time",
    "make_activity",
    "parse_activity",
]
