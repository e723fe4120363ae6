"""``rcds wait``: the job wrapper's step between "job started" and "payload runs".

It waits until the CID is in any repository (through the mount, or over HTTP without one), backing off
exponentially up to the repository TTL (a CVMFS client sees a new revision only that often), then makes
what the job expects: a symlink to the code, and the variables a wrapper exports (as jobsub's
``INPUT_TAR_DIR_LOCAL``).
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from .credentials import find_credentials
from .errors import ClientError, WaitTimeout
from .locate import Found, Locator, Mode, Target, parse_target, resolve_repositories
from .pubapi import PubApiClient
from .settings import ClientSettings, load_client_settings

log = logging.getLogger("rcds.client")

FIRST_DELAY = 1.0
DEFAULT_MAX_DELAY = 60.0  # through a mount, where the TTL cannot be read


@dataclass
class WaitResult:
    found: Found
    directory: Path | None  # where the job finds the code on this node
    seconds: float
    looks: int

    def environment(self) -> dict[str, str]:
        env = {
            "RCDS_CID": self.found.cid,
            "RCDS_REPOSITORY": self.found.repository,
            "RCDS_PATH": self.found.path,
        }
        if self.directory is not None:
            env["RCDS_DIR"] = str(self.directory)
            env["INPUT_TAR_DIR_LOCAL"] = str(self.directory)  # what jobsub's job scripts read
        return env


def wait_for(
    target: Target, locator: Locator, *, timeout: float = 1200.0, max_delay: float | None = None
) -> WaitResult:
    """Look for the CID until it appears or ``timeout`` seconds pass (WaitTimeout, naming what was tried)."""
    started = time.monotonic()
    deadline = started + timeout
    delay, looks = FIRST_DELAY, 0
    while True:
        looks += 1
        found = locator.find(target.cid)
        if found is not None:
            log.info("found %s in %s after %d looks", target.cid, found.repository, looks)
            return WaitResult(found, found.local_path, time.monotonic() - started, looks)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeout(
                "\n".join([f"{target.cid} did not appear within {timeout:g} s.", *locator.looked_in()])
            )
        cap = max_delay if max_delay is not None else (locator.ttl() or DEFAULT_MAX_DELAY)
        log.info("%s not found (look %d); next look in %.0f s", target.cid, looks, min(delay, remaining))
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, max(cap, FIRST_DELAY))


def wait(
    target: str,
    settings: ClientSettings | None = None,
    *,
    timeout: float = 1200.0,
    mode: Mode = "auto",
    max_delay: float | None = None,
    link: Path | None = None,
    env_file: Path | None = None,
    touch: bool = False,
    get_dest: Path | None = None,
    progress: bool = True,
) -> WaitResult:
    """Everything ``rcds wait`` does: wait for ``target`` (a CID or /cvmfs path), then link and export.

    Without a mount of the repository that has the CID, ``get_dest`` receives a copy (as ``rcds get``);
    ``link`` then points there.
    """
    from .get import materialize_found

    settings = settings or load_client_settings()
    wanted = parse_target(target, settings)
    with Locator(settings, resolve_repositories(wanted, settings), mode, cache_dir=settings.cache) as locator:
        result = wait_for(wanted, locator, timeout=timeout, max_delay=max_delay)
        if result.directory is None and get_dest is not None:
            materialize_found(locator, result.found, get_dest, settings.cache, progress=progress)
            result.directory = get_dest.resolve()
    if touch:
        refresh(result.found.cid, settings)
    if link is not None:
        if result.directory is None:
            raise ClientError(
                f"{result.found.cid} is published in {result.found.repository}, but this node has no CVMFS"
                " mount of it: add --get DIR to copy it here, or use rcds get"
            )
        make_link(link, result.directory)
    if env_file is not None:
        write_env_file(env_file, result.environment())
    return result


def make_link(link: Path, directory: Path) -> None:
    """A symlink ``link`` -> ``directory``, replacing an older symlink (never a real file or directory)."""
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise ClientError(f"{link} exists and is not a symlink; not replacing it")
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.rcds-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(directory)
    os.replace(tmp, link)


def write_env_file(path: Path, env: dict[str, str]) -> None:
    """Shell ``export`` lines, quoted, for a wrapper to ``source``."""
    text = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    tmp = path.with_name(f".{path.name}.rcds-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def refresh(cid: str, settings: ClientSettings) -> str | None:
    """Refresh the CID's last-use time on the publish servers; a failure is logged, never fatal."""
    if not settings.servers:
        log.warning("--touch: no publish server configured")
        return None
    try:
        with PubApiClient(
            settings.servers,
            find_credentials(),
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            retries=1,
        ) as api:
            return api.update(cid)
    except ClientError as exc:
        log.warning("--touch failed (the job goes on): %s", exc)
        return None


__all__ = ["WaitResult", "make_link", "refresh", "wait", "wait_for", "write_env_file"]
