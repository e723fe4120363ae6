"""``rcds push``: a tarball or a directory straight into a path of a repository (``rcds.client.push``)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import click

from ..client.credentials import find_credentials
from ..client.errors import ClientError
from ..client.push import GatewayKey
from ..client.push import push as run_push
from ..client.settings import server_url
from .client import _client_command


def _work_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rcds" / "push"


def _key(key_file: Path | None, key_id: str | None, url: str) -> GatewayKey:
    if key_file is not None:
        return GatewayKey.load(key_file, key_id)
    headers = find_credentials().headers_for(url)  # a token goes only over HTTPS or to this machine
    if "Authorization" not in headers:
        raise ClientError("rcds push needs a gateway key (--key) or a bearer token (WLCG token discovery)")
    return GatewayKey.token(headers["Authorization"].removeprefix("Bearer "))


@click.command("push")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.argument("target")
@click.option("--server", required=True, envvar="RCDS_SERVER", help="The rcds server (its /api/v1 gateway).")
@click.option(
    "--key",
    "key_file",
    default=None,
    envvar="RCDS_GATEWAY_KEY",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Gateway key file: a 'plain_text <key id> <secret>' line. Without it, a WLCG bearer token is used "
    "($BEARER_TOKEN, $BEARER_TOKEN_FILE, $XDG_RUNTIME_DIR/bt_u<uid>, /tmp/bt_u<uid>).",
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
    key_file: Path | None,
    key_id: str | None,
    work_dir: Path | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Replace the content of TARGET (REPOSITORY:/path) with SOURCE (a tarball or a directory).

    Only the objects the server lacks are sent; running the same command again after an interruption
    resumes it. The server decides which paths a key (or a token's storage.create scopes) may push to.
    """
    report = (lambda line: None) if quiet else (lambda line: click.echo(f"rcds push: {line}", err=True))
    url = server_url(server)
    result = run_push(source, target, url, _key(key_file, key_id, url), work_dir or _work_root(), report)
    if as_json:
        click.echo(json.dumps(asdict(result)))
    else:
        click.echo(
            f"{result.repository}:{result.path} is revision {result.revision} "
            f"({result.objects_sent} of {result.objects} objects sent, {result.bytes_sent} bytes, "
            f"{result.seconds:.1f} s)"
        )
