"""``rcds publish``: from a directory or tarball to a published CID, uploading only what is missing.

A directory is hashed first without writing anything (reading and hashing is fast), so resubmitting
unchanged code costs one ``exists`` and one ``update``. Only when the CID is missing is the tarball
written, compressed, to a temporary file, hashed again on the way, and uploaded; if the two hashes
differ, the tree changed in between and nothing is uploaded under a CID that does not match.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..publish.cid import CidError, validate_cid
from .credentials import Credentials, find_credentials
from .errors import ClientError, PublishFailed, WaitTimeout
from .progress import Progress
from .pubapi import Answer, PubApiClient
from .settings import ClientSettings, load_client_settings
from .tarball import DEFAULT_EXCLUDES, TarballError, hash_file, write_compressed_tar, write_tar

log = logging.getLogger("rcds.client")

PRESENT = "present"  # already published before this call
QUEUED = "queued"  # uploaded and accepted; publishing follows within seconds
PUBLISHED = "published"  # uploaded and seen published (``wait=True``)
DRY_RUN = "dry-run"  # only the CID was computed
REUPLOAD_AFTER = 60.0  # seconds the answering server may not know a CID before --wait uploads it again


@dataclass
class PublishResult:
    cid: str
    state: str
    path: str | None = None  # /cvmfs/<repository>/<prefix>/<cid>, once known
    server: str | None = None
    tar_bytes: int = 0  # size of the tarball the CID hashes
    uploaded_bytes: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def tarball_digest(
    source: Path, excludes: Sequence[str] = DEFAULT_EXCLUDES, progress: bool = False
) -> tuple[str, int]:
    """The sha256 of a directory's reproducible tar, or of a tarball file's bytes, and that size.

    ``progress`` shows a line with the bytes hashed so far on a terminal (a large tree takes seconds).
    """
    if source.is_dir():
        with Progress(None, "hashing", enabled=progress) as bar:
            summary = write_tar(source, None, excludes, on_bytes=bar.update)
        return summary.sha256, summary.tar_bytes
    if source.is_file():
        with Progress(source.stat().st_size, "hashing", enabled=progress) as bar:
            return hash_file(source, on_bytes=bar.update)
    raise ClientError(f"{source}: no such directory or file")


def make_cid(group: str, digest: str) -> str:
    try:
        return validate_cid(f"{group}/{digest}" if group else digest)
    except CidError as exc:
        raise ClientError(f"cannot make a CID with group {group!r}: {exc}") from exc


def publish(
    source: Path,
    settings: ClientSettings | None = None,
    *,
    cid: str | None = None,
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
    wait: bool = False,
    timeout: float = 600.0,
    progress: bool = True,
    credentials: Credentials | None = None,
    tmpdir: Path | None = None,
    dry_run: bool = False,
) -> PublishResult:
    """Make ``source`` (a directory or a tarball) published under its CID; see the module docstring."""
    started = time.monotonic()
    settings = settings or load_client_settings()
    source = Path(source)
    digest, tar_bytes = tarball_digest(source, excludes, progress)
    if cid is not None:
        try:
            cid = validate_cid(cid)
        except CidError as exc:
            raise ClientError(f"bad --cid: {exc}") from exc
    else:
        cid = make_cid(settings.effective_group, digest)
    result = PublishResult(cid=cid, state=DRY_RUN, tar_bytes=tar_bytes)
    if dry_run:
        return result
    if not settings.servers:
        raise ClientError(
            "no publish server configured: use --server, RCDS_SERVERS or `servers` in the client configuration"
        )
    with PubApiClient(
        settings.servers,
        credentials or find_credentials(),
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        retries=settings.retries,
    ) as api:
        path = api.exists(cid)
        if path is not None:
            path = api.update(cid) or path
            result.state, result.path, result.server = PRESENT, path, api.last_server
        elif _in_progress(api, cid):  # uploaded moments ago (by us or a colleague): no second upload
            result.state, result.server = QUEUED, api.last_server
        else:
            answer, result.uploaded_bytes = _upload(
                api, source, cid, digest, excludes, progress, tmpdir, tar_bytes
            )
            result.server = answer.server
            if answer.body.startswith("PRESENT:"):
                result.state, result.path = PRESENT, answer.body[len("PRESENT:") :]
            else:
                result.state = QUEUED
        if result.state == QUEUED and wait:

            def upload_again() -> None:
                answer, n = _upload(api, source, cid, digest, excludes, False, tmpdir, tar_bytes)
                result.uploaded_bytes += n
                result.server = answer.server

            result.path = wait_published(api, cid, timeout, reupload=upload_again)
            result.state = PUBLISHED
    result.seconds = time.monotonic() - started
    log.info("publish %s: %s in %.1f s", cid, result.state, result.seconds)
    return result


def _in_progress(api: PubApiClient, cid: str) -> bool:
    """Whether the server already holds an upload of ``cid`` that it is publishing (rcds servers only)."""
    doc = api.status(cid)
    return doc is not None and doc.get("state") in ("queued", "publishing")


def _upload(
    api: PubApiClient,
    source: Path,
    cid: str,
    digest: str,
    excludes: Sequence[str],
    progress: bool,
    tmpdir: Path | None,
    tar_bytes: int | None = None,
) -> tuple[Answer, int]:
    if source.is_file():
        return api.publish(cid, source, progress), source.stat().st_size
    with tempfile.NamedTemporaryFile(prefix="rcds-upload-", suffix=".tar.zst", dir=tmpdir) as tmp:
        try:
            # The total is the tar stream's size, known from hashing it a moment ago.
            with Progress(tar_bytes, "compressing", enabled=progress) as bar:
                summary = write_compressed_tar(source, tmp.file, excludes, on_bytes=bar.update)  # type: ignore[arg-type]
            tmp.flush()
        except OSError as exc:
            raise ClientError(
                f"cannot write the tarball in {tmpdir or tempfile.gettempdir()}: {exc}"
            ) from exc
        if summary.sha256 != digest:
            raise TarballError(f"{source} changed while it was being published; publish again when stable")
        size = Path(tmp.name).stat().st_size
        log.info("uploading %s: %d bytes compressed from %d", cid, size, summary.tar_bytes)
        return api.publish(cid, Path(tmp.name), progress), size


def wait_published(
    api: PubApiClient,
    cid: str,
    timeout: float,
    reupload: Callable[[], None] | None = None,
    reupload_after: float = REUPLOAD_AFTER,
) -> str:
    """Poll until a server reports ``cid`` published; return its path. Fails early on a failed job.

    If the server that took the upload dies, the others answer "missing" (the job waits in the dead
    server's durable queue, and is published when it returns). After ``reupload_after`` seconds of that,
    ``reupload`` sends the tarball again, to a server that answers, so the job does not wait for the
    dead one; whichever copy is published first wins and the other is answered PRESENT.
    """
    deadline = time.monotonic() + timeout
    delay = 0.25
    missing_since: float | None = None
    while True:
        doc = api.status(cid)
        state = doc.get("state") if doc else None
        if doc is None:  # a server without /pubapi/status: fall back to exists
            path = api.exists(cid)
            if path is not None:
                return path
        elif state == "published":
            return str(doc["path"])
        elif state == "failed":
            raise PublishFailed(f"the server could not publish {cid}: {doc.get('reason', 'no reason given')}")
        if state == "missing" and reupload is not None:
            missing_since = missing_since if missing_since is not None else time.monotonic()
            if time.monotonic() - missing_since >= reupload_after:
                log.warning("%s: %s does not know the upload; uploading it again", cid, api.last_server)
                reupload()
                reupload, missing_since = None, None
        else:
            missing_since = None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeout(
                f"{cid} was not published within {timeout:g} s (last state: {state or 'missing'})"
            )
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 5.0)


__all__ = ["PublishResult", "make_cid", "publish", "tarball_digest", "wait_published"]
