"""The ``rcds`` command line: thin faces on the library, one module per side.

``server`` holds ``rcds serve``, ``repo``, ``cleanup`` and ``gc``; ``replicate`` is alone in its module (a
poll with nothing new should cost little more than the interpreter); ``client`` holds ``rcds publish``,
``wait``, ``get`` and ``cache``. Commands are imported when they are used, so a client
installed without the ``server`` extra (``pip install rcds``: no aiohttp, numpy, ...) runs its commands,
and a server command there fails with one line saying what to install instead of a traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, NoReturn

import click

from .. import __version__

# command name -> (module under rcds.cli, attribute), in the order `rcds -h` lists them.
_COMMANDS: dict[str, tuple[str, str]] = {
    "publish": ("client", "publish"),
    "wait": ("client", "wait"),
    "get": ("client", "get"),
    "cache": ("client", "cache"),
    "push": ("push", "push"),
    "serve": ("server", "serve"),
    "repo": ("server", "repo"),
    "cleanup": ("server", "cleanup"),
    "gc": ("server", "gc"),
    "audit": ("server", "audit"),
    "replicate": ("replicate", "replicate"),
    "status": ("status", "status"),
    "shrinkwrap": ("shrinkwrap", "shrinkwrap"),
    "trace": ("shrinkwrap", "trace"),
    "build-job-client": ("jobclient", "build_job_client"),
}
# Import names of the `server` extra in pyproject.toml (tests/test_cli_usability.py keeps them in step).
SERVER_EXTRA_MODULES = frozenset({"aiohttp", "numpy", "jwt", "prometheus_client"})
SERVER_EXTRA_HINT = "pip install 'rcds[server]' (or '.[server]' in a checkout)"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a command stopped with Ctrl-C


def _missing_server_extra(exc: BaseException) -> str | None:
    """The missing module's name if ``exc`` is the import of a server-only dependency failing."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        root = exc.name.split(".")[0]
        if root in SERVER_EXTRA_MODULES:
            return root
    return None


def _fail_without_server_extra(name: str, module: str) -> NoReturn:
    click.echo(
        f"rcds {name}: this command needs the server dependencies (no module {module!r}): {SERVER_EXTRA_HINT}",
        err=True,
    )
    sys.exit(1)


def _placeholder(name: str, module: str) -> click.Command:
    """Stands in for a server command whose module cannot be imported: explains, exits 1."""

    @click.command(
        name,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        help="(needs the server extra: pip install 'rcds[server]')",
        add_help_option=False,
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args: tuple[str, ...]) -> None:
        _fail_without_server_extra(name, module)

    return command


class RcdsGroup(click.Group):
    """Loads commands on demand; Ctrl-C exits 130 with one line; -h works everywhere."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        where = _COMMANDS.get(cmd_name)
        if where is None:
            return None
        try:
            module = importlib.import_module(f"{__name__}.{where[0]}")
        except ModuleNotFoundError as exc:
            missing = _missing_server_extra(exc)
            if missing is None:
                raise
            return _placeholder(cmd_name, missing)
        command: click.Command = getattr(module, where[1])
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            # click would print "Aborted!" and exit 1; a script must be able to tell Ctrl-C from a failure.
            # On a terminal the line starts after the echoed ^C.
            click.echo(("\n" if sys.stderr.isatty() else "") + "rcds: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except ModuleNotFoundError as exc:  # a server dependency imported inside a command
            missing = _missing_server_extra(exc)
            if missing is None:
                raise
            _fail_without_server_extra(ctx.invoked_subcommand or "", missing)


@click.group(cls=RcdsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rcds")
def main() -> None:
    """rcds: publish user code into CernVM-FS repositories within seconds."""


__all__ = ["SERVER_EXTRA_MODULES", "main"]
