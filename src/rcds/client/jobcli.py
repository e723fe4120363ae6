"""The job client's command line: ``wait`` and ``get`` with ``argparse``, for a bare python3.

The same options, output and exit codes as ``rcds wait`` and ``rcds get`` (``rcds.cli.client``), and the
same functions underneath (``rcds.client.wait.wait``, ``rcds.client.get.get``); the settings the options
make and what the commands print are built here for both command lines (``reading_settings``,
``wait_output``, ``get_output``). ``rcds.client.bundle`` puts this and what it imports into one file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..tomlconfig import ConfigError
from .errors import ClientError
from .settings import ClientSettings, load_client_settings, parse_proxies, server_url

if TYPE_CHECKING:
    from .wait import WaitResult

PROG = "rcds-job"


def reading_settings(
    servers: tuple[str, ...],
    repositories: tuple[str, ...],
    stratum_urls: tuple[str, ...],
    proxies: tuple[str, ...],
    keys: tuple[Path, ...],
    prefix: str | None,
    cache: Path | None,
) -> ClientSettings:
    """The client settings with the options of ``wait`` and ``get`` applied (empty means not given)."""
    return load_client_settings().with_overrides(
        servers=tuple(server_url(v) for v in servers) if servers else None,
        repositories=repositories or None,
        stratum_urls=stratum_urls or None,
        proxies=tuple(p for v in proxies for p in parse_proxies(v)) if proxies else None,
        keys=keys or None,
        prefix=prefix.strip("/") if prefix else None,
        cache=cache,
    )


def wait_output(result: WaitResult, as_json: bool, index: int = 0, name: str | None = None) -> str:
    """What ``wait`` prints: the directory holding the code (or its /cvmfs path), or one JSON object
    (``env``: the job's variables, for the ``index``-th tarball, see ``WaitResult.environment``)."""
    if not as_json:
        return str(result.directory or result.found.path)
    return json.dumps(
        {
            "cid": result.found.cid,
            "repository": result.found.repository,
            "path": result.found.path,
            "directory": str(result.directory or ""),
            "seconds": round(result.seconds, 3),
            "looks": result.looks,
            "env": result.environment(index, name),
        }
    )


def get_output(result: dict[str, Any], dest: Path, as_json: bool) -> str:
    """What ``get`` prints: the new directory, or the figures as one JSON object."""
    return json.dumps(result) if as_json else str(dest)


# --- argparse ------------------------------------------------------------------------------------


def _index(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return value


def _existing_path(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"path {text!r} does not exist")
    return path


def _jobs(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"{value} is not in the range 1<=x<=64")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    """The reading options of both commands (``_reading_options`` of ``rcds.cli.client``) and the rest."""
    parser.add_argument("--repository", dest="repositories", action="append", default=[],
                        help="Repository to search (repeatable).")  # fmt: skip
    parser.add_argument("--stratum-url", dest="stratum_urls", action="append", default=[], metavar="URL",
                        help="Repository URL template with @fqrn@ (repeatable; default: <server>/cvmfs/@fqrn@).")  # fmt: skip
    parser.add_argument("--proxy", dest="proxies", action="append", default=[],
                        help="HTTP proxy, or a CVMFS_HTTP_PROXY string like 'http://a:3128|http://b:3128;DIRECT'.")  # fmt: skip
    parser.add_argument("--keys", type=_existing_path, action="append", default=[],
                        help="Master public key file or key directory (default /etc/cvmfs/keys).")  # fmt: skip
    parser.add_argument("--prefix", default=None, help="The servers' CID directory (default sw).")
    parser.add_argument("--server", dest="servers", action="append", default=[], metavar="URL",
                        help="Publish server (repeatable; default: RCDS_SERVERS or the client configuration).")  # fmt: skip
    parser.add_argument(
        "--json", dest="as_json", action="store_true", help="Print one JSON object for scripts."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log progress to stderr.")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog=PROG,
        description="rcds wait and rcds get for jobs on worker nodes, on python3 alone (docs/client.md).",
    )
    top.add_argument("--version", action="version", version=f"{PROG} (rcds) {__version__}")
    commands = top.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    w = commands.add_parser("wait", help="Wait until a CID is published, then link it where the job expects it.",
                            description="Wait until a CID is published, then link it where the job expects it. "
                            "Prints the directory that holds the code (through the mount, or the --get copy).")  # fmt: skip
    w.add_argument("target", metavar="CID|/cvmfs/REPO/PREFIX/CID")
    w.add_argument("--timeout", type=float, default=1200.0, help="Seconds to wait (default 1200).")
    w.add_argument("--mode", choices=["auto", "mount", "http"], default="auto",
                   help="Look through the CVMFS mount, over HTTP, or the mount where there is one (default auto).")  # fmt: skip
    w.add_argument("--link", type=Path, default=None, help="Make this symlink to the code.")
    w.add_argument("--env-file", type=Path, default=None,
                   help="Write `export` lines here: RCDS_* and jobsub's INPUT_TAR_DIR_LOCAL and INPUT_TAR_FILE "
                   "(other variables already in the file are kept).")  # fmt: skip
    w.add_argument("--index", type=_index, default=0,
                   help="N >= 1: name the variables as jobsub does for its N-th additional tarball "
                   "(INPUT_TAR_DIR_LOCAL_N...; default 0).")  # fmt: skip
    w.add_argument(
        "--touch", action="store_true", help="Refresh the CID's last-use time on the publish servers."
    )
    w.add_argument("--get", dest="get_dest", type=Path, default=None,
                   help="Without a mount: copy the code into this new directory once found (as rcds get).")  # fmt: skip
    w.add_argument("--cache", type=Path, default=None, help="Node cache for --get.")
    w.add_argument("--max-interval", type=float, default=None,
                   help="Longest pause between looks (default: the TTL).")  # fmt: skip
    w.add_argument("--mount-root", type=Path, default=None, help="Default /cvmfs.")
    w.add_argument("--follow", action="store_true",
                   help="Over HTTP: look again as soon as a publish server announces a new revision.")  # fmt: skip
    _common(w)

    g = commands.add_parser("get", help="Copy a published CID into the new directory DEST over HTTP.",
                            description="Copy a published CID into the new directory DEST, over HTTP, without a "
                            "CVMFS mount. Signatures and every object's hash are verified. DEST appears complete "
                            "or not at all; an interrupted get resumes from what it already downloaded.")  # fmt: skip
    g.add_argument("target", metavar="CID|/cvmfs/REPO/PREFIX/CID")
    g.add_argument("dest", type=Path)
    g.add_argument("--cache", type=Path, default=None,
                   help="Node-wide cache: objects are downloaded once per node and hard-linked into DEST.")  # fmt: skip
    g.add_argument("--jobs", type=_jobs, default=8, help="Parallel downloads (default 8).")
    g.add_argument(
        "--copy", action="store_true", help="Copy files out of the cache instead of hard-linking them."
    )
    g.add_argument("-q", "--quiet", action="store_true", help="No progress bar.")
    _common(g)
    return top


def _run(args: argparse.Namespace) -> str:
    from .. import logs

    logs.configure("text", logging.INFO if args.verbose else logging.WARNING)
    settings = reading_settings(
        tuple(args.servers), tuple(args.repositories), tuple(args.stratum_urls), tuple(args.proxies),
        tuple(args.keys), args.prefix, args.cache,
    )  # fmt: skip
    if args.command == "wait":
        from .wait import wait

        result = wait(
            args.target,
            settings.with_overrides(mount_root=args.mount_root),
            timeout=args.timeout,
            mode=args.mode,
            max_delay=args.max_interval,
            link=args.link,
            env_file=args.env_file,
            touch=args.touch,
            get_dest=args.get_dest,
            progress=not args.as_json,
            index=args.index,
            follow=args.follow,
        )
        return wait_output(
            result, args.as_json, args.index, args.link.name if args.link is not None else None
        )
    from .get import get

    stats = get(
        args.target, args.dest, settings, jobs=args.jobs, link=not args.copy,
        progress=not (args.quiet or args.as_json),
    )  # fmt: skip
    return get_output(stats, args.dest, args.as_json)


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit codes of ``rcds`` (docs/client.md), and 2 for wrong usage."""
    args = parser().parse_args(argv)
    try:
        print(_run(args))
    except ClientError as exc:
        print(f"rcds: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ConfigError as exc:
        print(f"rcds: configuration error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rcds: interrupted", file=sys.stderr)
        return 130
    sys.stdout.flush()
    return 0


__all__ = ["get_output", "main", "parser", "reading_settings", "wait_output"]
