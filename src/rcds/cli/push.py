"""``rcds push``: a tarball or a directory straight into a path of a repository (``rcds.client.push``)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import click

from ..client.push import GatewayKey
from ..client.push import push as run_push
from ..client.settings import server_url
from .client import _client_command


def _work_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rcds" / "push"


@click.command("push")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.argument("target")
@click.option("--server", required=True, envvar="RCDS_SERVER", help="The rcds server (its /api/v1 gateway).")
@click.option(
    "--key",
    "key_file",
    required=True,
    envvar="RCDS_GATEWAY_KEY",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Gateway key file: a 'plain_text <key id> <secret>' line.",
)
@click.option("--key-id", default=None, help="Which key of the file (default: its first).")
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the local staging copy is kept between pushes [default: ~/.cache/rcds/push].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
@_client_command
def push(
    source: Path,
    target: str,
    server: str,
    key_file: Path,
    key_id: str | None,
    work_dir: Path | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Replace the content of TARGET (REPOSITORY:/path) with SOURCE (a tarball or a directory).

    Only the objects the server lacks are sent; running the same command again after an interruption
    resumes it. The server's gateway keys decide which paths a key may push to.
    """
    report = (lambda line: None) if quiet else (lambda line: click.echo(f"rcds push: {line}", err=True))
    result = run_push(
        source,
        target,
        server_url(server),
        GatewayKey.load(key_file, key_id),
        work_dir or _work_root(),
        report,
    )
    if as_json:
        click.echo(json.dumps(asdict(result)))
    else:
        click.echo(
            f"{result.repository}:{result.path} is revision {result.revision} "
            f"({result.objects_sent} of {result.objects} objects sent, {result.bytes_sent} bytes, "
            f"{result.seconds:.1f} s)"
        )
