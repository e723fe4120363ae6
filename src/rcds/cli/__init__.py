"""The ``rcds`` command line: thin faces on the library, one module per side.

``server`` holds ``rcds serve`` and ``rcds repo``; ``client`` holds ``rcds publish``, ``wait`` and ``get``.
"""

from __future__ import annotations

import click

from .. import __version__
from .client import cache, get, publish, wait
from .jobclient import build_job_client
from .server import audit, cleanup, gc, replicate, repo, serve


@click.group()
@click.version_option(__version__, prog_name="rcds")
def main() -> None:
    """rcds: publish user code into CernVM-FS repositories within seconds."""


for command in (serve, repo, cleanup, gc, audit, replicate, publish, wait, get, cache, build_job_client):
    main.add_command(command)

__all__ = ["main"]
