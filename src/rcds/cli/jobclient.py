"""``rcds build-job-client``: the job client file (``rcds.client.bundle``), for sites that ship it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ..client import bundle


@click.command("build-job-client")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("rcds-job"),
    show_default=True,
    help="Where to write the file ('-' for stdout).",
)
def build_job_client(output: Path) -> None:
    """Write the job client: `wait` and `get` in one file for a bare python3 >= 3.9.

    The same file `rcds serve` offers at /pubapi/client. Run it with `python3 rcds-job wait CID ...`.
    """
    data = bundle.build()
    if str(output) == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    os.replace(tmp, output)
    click.echo(str(output))


__all__ = ["build_job_client"]
