"""Named failure points for testing crash safety and error handling with real processes.

``RCDS_FAILPOINT=<name>`` makes the process exit abruptly (``os._exit``, no cleanup, like a kill -9
or a power cut for everything not yet fsynced) when it reaches that point.
``RCDS_FAILPOINT=<name>:enospc`` instead raises ``OSError(ENOSPC)`` there, as a full disk would;
``<name>:eio`` raises ``OSError(EIO)``, a failing disk; ``<name>:error`` raises ``FailpointError``, an error
that is nobody's environment (as a bug would be); ``<name>:sleep=<seconds>`` stalls there (a stuck disk or
a stalled ingest; from a file, until the file says otherwise or the seconds are up).
``RCDS_FAILPOINT_FILE=<path>`` reads the setting from that file at every point instead (missing or empty:
none), so that a test can fill and free the "disk" of a running server.
Unset, ``hit`` costs one or two dictionary lookups.
"""

from __future__ import annotations

import errno
import os
import time

ENV = "RCDS_FAILPOINT"
FILE_ENV = "RCDS_FAILPOINT_FILE"
EXIT_CODE = 137


class FailpointError(RuntimeError):
    pass


def _setting() -> str | None:
    """The failpoint set now: the file's (``FILE_ENV``) if there is one, else ``ENV``'s."""
    path = os.environ.get(FILE_ENV)
    if path is None:
        return os.environ.get(ENV)
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def hit(name: str) -> None:
    point = _setting()
    if point is None or not point.startswith(name):
        return
    if point == name:
        os._exit(EXIT_CODE)
    if point == f"{name}:enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if point == f"{name}:eio":
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    if point == f"{name}:error":
        raise FailpointError(f"failpoint {name}")
    if point.startswith(f"{name}:sleep="):
        _stall(float(point.split("=", 1)[1]), point)


def _stall(seconds: float, point: str) -> None:
    """Sleep ``seconds``, or less once the failpoint set is no longer ``point`` (a test frees a stalled
    process from the file when it is ready, instead of guessing how long the rest takes)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))
        if _setting() != point:
            return
