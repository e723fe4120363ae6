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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .credentials import credentials_for_reading, find_credentials
from .errors import ClientError, PublishFailed, RequestRefused, WaitTimeout
from .locate import Found, Locator, Mode, RepositoriesUnknown, Target, parse_target, resolve_repositories
from .pubapi import PubApiClient
from .settings import ClientSettings, load_client_settings

if TYPE_CHECKING:
    from ..cvmfs.subscriber import Activity

log = logging.getLogger("rcds.client")

FIRST_DELAY = 1.0
DEFAULT_MAX_DELAY = 60.0  # through a mount, where the TTL cannot be read
CONFIG_RETRY_CAP = 30.0  # longest pause between asking unreachable servers for their repositories


@dataclass
class WaitResult:
    found: Found
    directory: Path | None  # where the job finds the code on this node
    seconds: float
    looks: int

    def environment(self, index: int = 0, name: str | None = None) -> dict[str, str]:
        """The variables for the job, named as jobsub_lite's wrapper names them for its tarballs.

        ``index`` 0 gives the plain names (the first tarball); ``index`` N >= 1 the ``_N`` names jobsub
        gives its N-th additional tarball. ``INPUT_TAR_FILE`` is ``<dir>/<name>.tar``, a file that does
        not exist (as with jobsub: scripts take its dirname); ``name`` defaults to the CID's last part.
        """
        suffix = f"_{index}" if index else ""
        env = {
            f"RCDS_CID{suffix}": self.found.cid,
            f"RCDS_REPOSITORY{suffix}": self.found.repository,
            f"RCDS_PATH{suffix}": self.found.path,
        }
        if self.directory is not None:
            directory = str(self.directory)
            env[f"RCDS_DIR{suffix}"] = directory
            env[f"INPUT_TAR_DIR_LOCAL{suffix}"] = directory  # what jobsub's job scripts read
            base = name or self.found.cid.rsplit("/", 1)[-1]
            env[f"INPUT_TAR_FILE{suffix}"] = f"{directory}/{base}.tar"
        return env


class StatusWatch:
    """Asks the publish servers' ``status`` for the CID while it is awaited, to stop at once on failure.

    A server that rejected the upload knows why; without this a job would wait its whole timeout and
    learn only that the CID "did not appear". Servers that cannot be asked (down, refusing, too old to
    have ``status``) are no reason to stop: the wait goes on through the repositories.
    """

    def __init__(self, settings: ClientSettings) -> None:
        self._api = PubApiClient(
            settings.servers,
            credentials_for_reading(),
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            retries=1,
        )
        self._refused = False
        self.last_state: str | None = None

    def check(self, cid: str) -> None:
        """Raise PublishFailed with the server's reason if a server says the publish of ``cid`` failed."""
        if self._refused:
            return
        try:
            doc = self._api.status(cid)
        except RequestRefused as exc:  # not allowed to ask (no credentials here): it will not change
            log.info("the publish servers do not tell %s: %s", cid, exc)
            self._refused = True
            return
        except (ClientError, ValueError) as exc:
            log.info("cannot ask the publish servers about %s: %s", cid, exc)
            return
        if doc is None:
            return
        self.last_state = str(doc.get("state"))
        if self.last_state == "failed":
            reason = doc.get("reason") or "no reason given"
            raise PublishFailed(
                f"{cid} will not appear: {self._api.last_server} could not publish it: {reason}"
            )

    def close(self) -> None:
        self._api.close()


class NotificationWaker:
    """``--follow``: the next look comes as soon as a publish server announces a new revision of one of the
    repositories, instead of at the end of the backoff.

    Each repository's stream (``<server>/api/v1/notifications/subscribe``, the servers in order) is followed
    in a thread (``rcds.cvmfs.subscriber``, standard library only). A message is only a reason to look
    again: what is found is read and verified as always. Without a stream the backoff goes on alone.
    """

    def __init__(self, servers: list[str], repositories: tuple[str, ...]) -> None:
        from ..cvmfs.subscriber import NotificationSubscriber

        self.event = threading.Event()
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        roots = [f"{s.rstrip('/')}/api/v1" for s in servers]
        self._subscribers = [NotificationSubscriber(roots, r, self._on_message).start() for r in repositories]

    def _on_message(self, message: Activity) -> None:
        with self._lock:
            before = self._seen.get(message.repository)
            if before is None or message.revision > before:
                self._seen[message.repository] = message.revision
        # The first message of a stream is the revision of the moment; only a newer one is news.
        if before is not None and message.revision > before:
            self.event.set()

    def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if a new revision cut it short."""
        woken = self.event.wait(seconds)
        self.event.clear()
        return woken

    def close(self) -> None:
        for sub in self._subscribers:
            sub.stop(timeout=1.0)


def wait_for(
    target: Target,
    locator: Locator,
    *,
    timeout: float = 1200.0,
    max_delay: float | None = None,
    status: StatusWatch | None = None,
    started: float | None = None,
    waker: NotificationWaker | None = None,
) -> WaitResult:
    """Look for the CID until it appears or ``timeout`` seconds pass (WaitTimeout, naming what was tried).

    With ``status``, the publish servers are asked after each look that missed, and a publish they
    report failed ends the wait at once (PublishFailed, with their reason). ``started`` is when the
    wait began (time.monotonic()), if earlier than this call.
    """
    started = time.monotonic() if started is None else started
    deadline = started + timeout
    delay, looks = FIRST_DELAY, 0
    while True:
        looks += 1
        found = locator.find(target.cid)
        if found is not None:
            log.info("found %s in %s after %d looks", target.cid, found.repository, looks)
            return WaitResult(found, found.local_path, time.monotonic() - started, looks)
        if status is not None:
            status.check(target.cid)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            last = f" (the publish server says: {status.last_state})" if status and status.last_state else ""
            raise WaitTimeout(
                "\n".join([f"{target.cid} did not appear within {timeout:g} s{last}.", *locator.looked_in()])
            )
        cap = max_delay if max_delay is not None else (locator.ttl() or DEFAULT_MAX_DELAY)
        log.info("%s not found (look %d); next look in %.0f s", target.cid, looks, min(delay, remaining))
        if waker is not None and waker.sleep(min(delay, remaining)):
            log.info("%s: a new revision was announced; looking now", target.cid)
        elif waker is None:
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
    index: int = 0,
    follow: bool = False,
) -> WaitResult:
    """Everything ``rcds wait`` does: wait for ``target`` (a CID or /cvmfs path), then link and export.

    Without a mount of the repository that has the CID, ``get_dest`` receives a copy (as ``rcds get``);
    ``link`` then points there. ``index`` N >= 1 writes the ``_N`` variables (see
    ``WaitResult.environment``) into ``env_file``, keeping the other variables already in it.
    ``follow``: also follow the publish servers' notification streams (``NotificationWaker``).
    """
    from .get import materialize_found

    started = time.monotonic()
    settings = settings or load_client_settings()
    wanted = parse_target(target, settings)
    repositories = _repositories_within(wanted, settings, started, timeout)
    status = StatusWatch(settings) if settings.servers else None
    # Through a mount the CVMFS client sees a new revision only after its TTL: nothing to follow there.
    waker = (
        NotificationWaker(list(settings.servers), repositories)
        if follow and settings.servers and mode != "mount"
        else None
    )
    try:
        with Locator(settings, repositories, mode, cache_dir=settings.cache) as locator:
            result = wait_for(
                wanted, locator, timeout=timeout, max_delay=max_delay, status=status, started=started,
                waker=waker,
            )  # fmt: skip
            if result.directory is None and get_dest is not None:
                materialize_found(locator, result.found, get_dest, settings.cache, progress=progress)
                result.directory = get_dest.resolve()
    finally:
        if status is not None:
            status.close()
        if waker is not None:
            waker.close()
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
        write_env_file(env_file, result.environment(index, link.name if link is not None else None))
    return result


def _repositories_within(
    target: Target, settings: ClientSettings, started: float, timeout: float
) -> tuple[str, ...]:
    """The repositories to search, asking the publish servers again until ``timeout`` if none answers.

    A job that starts while its servers restart must not fail in seconds: it has ``timeout`` to wait.
    """
    delay = FIRST_DELAY
    while True:
        try:
            return resolve_repositories(target, settings)
        except RepositoriesUnknown as exc:
            remaining = started + timeout - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(f"{target.cid}: gave up after {timeout:g} s: {exc}") from exc
            log.warning("%s; asking again in %.0f s", str(exc).splitlines()[0], min(delay, remaining))
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, CONFIG_RETRY_CAP)


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
    """Shell ``export`` lines, quoted, for a wrapper to ``source``.

    Lines already in the file for other variables are kept, so that one file can collect several
    tarballs' variables (``--index``); a variable set again is replaced.
    """
    kept: list[str] = []
    try:
        for line in path.read_text().splitlines():
            name = line[len("export ") :].split("=", 1)[0] if line.startswith("export ") else None
            if name not in env:
                kept.append(line + "\n")
    except FileNotFoundError:
        pass
    text = "".join(kept) + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
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


__all__ = [
    "NotificationWaker",
    "StatusWatch",
    "WaitResult",
    "make_link",
    "refresh",
    "wait",
    "wait_for",
    "write_env_file",
]
