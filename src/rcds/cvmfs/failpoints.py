"""Named failure points for testing crash safety and error handling with real processes.

``RCDS_FAILPOINT=<name>`` makes the process exit abruptly (``os._exit``, no cleanup, like a kill -9
or a power cut for everything not yet fsynced) when it reaches that point.
``RCDS_FAILPOINT=<name>:enospc`` instead raises ``OSError(ENOSPC)`` there, as a full disk would.
Unset, ``hit`` costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os

ENV = "RCDS_FAILPOINT"
EXIT_CODE = 137


def hit(name: str) -> None:
    point = os.environ.get(ENV)
    if point is None:
        return
    if point == name:
        os._exit(EXIT_CODE)
    if point == f"{name}:enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
