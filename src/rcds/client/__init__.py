"""The client side of rcds, as a Python API: publish code, wait for it in a job, read it without FUSE.

    from pathlib import Path
    from rcds.client import get, load_client_settings, publish, wait

    settings = load_client_settings().with_overrides(group="dune")
    result = publish(Path("analysis"), settings)        # PublishResult(cid=..., state=..., path=...)
    job = wait(result.cid, settings, timeout=600)       # WaitResult(directory=..., found=...)
    get(result.cid, Path("/scratch/code"), settings)    # dict: what was downloaded and linked

Every call takes an optional ``settings`` (``ClientSettings``); without it the client configuration
file and ``RCDS_*`` environment variables are read, as the command line does. Errors are
``ClientError`` subclasses, whose ``exit_code`` the command line exits with. See docs/client.md.
"""

from __future__ import annotations

from .errors import ClientError, PublishFailed, RequestRefused, ServersUnavailable, WaitTimeout
from .get import get
from .publish import PublishResult, publish
from .settings import ClientSettings, load_client_settings
from .wait import WaitResult, wait

__all__ = [
    "ClientError",
    "ClientSettings",
    "PublishFailed",
    "PublishResult",
    "RequestRefused",
    "ServersUnavailable",
    "WaitResult",
    "WaitTimeout",
    "get",
    "load_client_settings",
    "publish",
    "wait",
]
