"""Named crash points for testing crash safety with real processes.

``RCDS_FAILPOINT=<name>`` makes the process exit abruptly (``os._exit``, no cleanup, like a kill -9
or a power cut for everything not yet fsynced) when it reaches that point. Unset, ``hit`` costs one
dictionary lookup.
"""

from __future__ import annotations

import os

ENV = "RCDS_FAILPOINT"
EXIT_CODE = 137


def hit(name: str) -> None:
    if os.environ.get(ENV) == name:
        os._exit(EXIT_CODE)
