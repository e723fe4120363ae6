"""A repository's public tree in an S3 bucket, laid out as CVMFS lays it out: ``<alias>/data/xx/...`` and
``<alias>/.cvmfspublished`` (the alias is the repository name unless configured), so that a stratum 1 or
a client reads the bucket over plain HTTP when its policy allows anonymous GET.

Two clients, one per kind of request (bench/s3_clients.py and README, "Dependencies"):

- the data path, PUT, GET and HEAD of each object, goes through obstore (Rust ``object_store``): about
  0.3 ms of CPU per PUT against boto3's 1.4 ms, which on 2 cores shared with the writer's compression
  and a local S3 server is most of the difference between a publish to a bucket and one to disk;
- listing, DELETE and batched DeleteObjects, and the credentials, go through boto3: obstore's
  DeleteObjects rejects the reply of MinIO-family servers (``<Deleted>`` without ``<Key>``), and boto3
  resolves the standard AWS credential chain (environment, ``~/.aws`` files, ``profile``, roles) that
  both clients then use.

- Content-addressed objects are written once: ``put_object`` skips a key that exists (HEAD, then PUT).
- ``Cache-Control``: ``max-age=259200`` on ``data/`` objects, ``max-age=61`` on the ``.cvmfs*`` files
  (what CVMFS sets).
- A PUT is durable when it returns, so ``sync`` has nothing to do; the crash-safe order (objects, then
  catalogs, then the manifest last) is the writer's.
- One retry layer, this module's, for both clients (theirs are off): backoff on throttling (429, 503
  SlowDown), server errors and timeouts, as CVMFS does (100 ms doubling up to 2 s; from 250 ms up to 10 s
  when throttled); then a ``StorageError`` naming the bucket, the key and the reason.
- Conditional replace of the manifest (``If-Match``/``If-None-Match``) where the server honours it; the
  store probes that once (some servers, e.g. the MinIO gateway of juicefs, ignore the headers: then the
  repository's writer lock is the only guard).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ..logs import fields as log_fields
from . import ConditionFailed, ObjectMissing, ObjectStore, StorageError

log = logging.getLogger("rcds.storage.s3")

T = TypeVar("T")
DATA_CACHE_CONTROL = "max-age=259200"  # content-addressed: never changes
ROOT_CACHE_CONTROL = "max-age=61"  # .cvmfspublished and friends
DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes
THROTTLED_CODES = {"SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "RequestLimitExceeded"}
RETRY_STATUS = {429, 500, 502, 503, 504}
CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AccessDenied",
}


@dataclass(frozen=True)
class S3Settings:
    """Where the bucket is and how to talk to it. Credentials are not here: boto3 takes them from the
    usual places (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws/credentials``, ``profile``)
    and hands them to obstore too."""

    bucket: str
    prefix: str = ""  # the alias: keys are <prefix>/data/...
    endpoint: str = ""  # host[:port] or a URL; empty: AWS
    region: str = "us-east-1"
    addressing: str = "path"  # "path" (http://host/bucket/key) or "virtual" (http://bucket.host/key)
    https: bool = True  # for an endpoint given without a scheme
    profile: str = ""
    parallelism: int = 16  # puts in flight during a publish (CVMFS: 16 connections)
    retries: int = 5
    timeout: float = 60.0
    public_url: str = ""  # where clients read the bucket anonymously (serving may redirect there)
    # HEAD before each content-addressed PUT, skipping objects present (CVMFS_S3_PEEK_BEFORE_PUT, on in
    # CVMFS). Off here: the writer's content index already skips what the repository holds, so the HEAD
    # nearly always misses, and it costs the server a third more CPU per new object (bench/s3.py: 1 GiB
    # publish 27.5 s with it, 20.2-22.0 s without). Without it an object the index did not know is written
    # again: the same bytes, harmless, and a GC racing the publish cannot delete what a HEAD just found.
    peek_before_put: bool = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> S3Settings:
        """``s3://bucket[/prefix]`` plus settings; unknown option names are an error."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"not an S3 location (s3://bucket/prefix): {url!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown S3 settings for {url}: {', '.join(unknown)}")
        return cls(bucket=parts.netloc, prefix=parts.path.strip("/"), **options)

    @classmethod
    def parse_options(cls, pairs: Iterable[str]) -> dict[str, Any]:
        """``NAME=VALUE`` texts (a command line's) -> options for ``from_url``, each converted to its
        field's type: the names and types are the ``[repository.s3]`` settings'."""
        types = {f.name: f.type for f in fields(cls) if f.name not in ("bucket", "prefix")}
        options: dict[str, Any] = {}
        for pair in pairs:
            name, sep, text = pair.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in types:
                known = ", ".join(sorted(types))
                raise ValueError(f"S3 option {pair!r}: expected NAME=VALUE, NAME one of {known}")
            kind = str(types[name])
            try:
                if kind == "bool":
                    lowered = text.strip().lower()
                    if lowered not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                        raise ValueError("true or false")
                    options[name] = lowered in ("true", "yes", "1", "on")
                elif kind == "int":
                    options[name] = int(text)
                elif kind == "float":
                    options[name] = float(text)
                else:
                    options[name] = text
            except ValueError as exc:
                raise ValueError(f"S3 option {name}: {text!r} is not a valid {kind} ({exc})") from None
        if options.get("addressing", "path") not in ("path", "virtual"):
            raise ValueError("S3 option addressing: 'path' or 'virtual'")
        return options

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def endpoint_url(self) -> str | None:
        if not self.endpoint:
            return None
        if "://" in self.endpoint:
            return self.endpoint
        return f"{'https' if self.https else 'http'}://{self.endpoint}"

    def options(self) -> dict[str, Any]:
        """The settings other than the location, as ``from_url`` takes them (for repo.json)."""
        defaults = S3Settings(self.bucket)
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("bucket", "prefix") and getattr(self, f.name) != getattr(defaults, f.name)
        }


def _add_content_md5(params: dict[str, Any], **_: Any) -> None:
    """DeleteObjects needs Content-MD5 on servers that predate the CRC checksums boto3 >= 1.36 sends
    (MinIO-based ones among them); boto3 is told to send checksums only when required, so add it."""
    body = params.get("body") or b""
    if isinstance(body, str):
        body = body.encode()
    params["headers"]["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()


def _cache_control(key: str) -> str:
    return DATA_CACHE_CONTROL if key.startswith("data/") else ROOT_CACHE_CONTROL


# boto3 clients by what shapes them (settings and the AWS environment): making one costs ~50 ms of CPU
# (it loads and parses the service model), which a stratum 1 polling its upstream every few seconds would
# otherwise pay on every snapshot. Clients are thread-safe. An entry is made again after CLIENT_REUSE
# seconds, so that credentials rotated in ~/.aws/credentials are read again.
CLIENT_REUSE = 300.0
_AWS_ENVIRONMENT = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_DEFAULT_REGION",
)  # fmt: skip
_clients: dict[tuple[Any, ...], tuple[float, Any]] = {}
_clients_lock = threading.Lock()


def _shared_client(store: S3Store) -> Any:
    s = store.settings
    key = (
        s.endpoint_url, s.region, s.addressing, s.profile, s.parallelism, s.timeout,
        tuple(os.environ.get(name) for name in _AWS_ENVIRONMENT),
    )  # fmt: skip
    now = time.monotonic()
    with _clients_lock:
        made = _clients.get(key)
        if made is not None and now - made[0] < CLIENT_REUSE:
            return made[1]
    client = store._make_client()
    with _clients_lock:
        _clients[key] = (now, client)
    return client


CREDENTIALS_TTL = timedelta(minutes=5)  # how long obstore reuses credentials before asking boto3 again


class _SessionCredentials:
    """obstore's credential provider: the boto3 session's credentials (the standard chain, refreshed by
    botocore when they are temporary), so that both clients sign with the same ones."""

    def __init__(self, credentials: Any) -> None:
        self.credentials = credentials

    def __call__(self) -> dict[str, Any]:
        frozen = self.credentials.get_frozen_credentials()
        return {
            "access_key_id": frozen.access_key,
            "secret_access_key": frozen.secret_key,
            "token": frozen.token,
            "expires_at": datetime.now(UTC) + CREDENTIALS_TTL,
        }


# obstore raises one exception class per kind of failure, with the HTTP status and the server's S3 error
# code only in its message ("... Server returned non-2xx status code: 503 Service Unavailable: <Error>
# <Code>SlowDown</Code>..."): read from there (tests/test_s3.py's throttling proxy checks it).
_STATUS_IN_MESSAGE = re.compile(r"status code: (\d{3})")
_CODE_IN_MESSAGE = re.compile(r"<Code>([^<]+)</Code>")


def _obstore_failure(exc: Exception) -> tuple[int, str, str]:
    """(HTTP status or 0 for a transport failure, S3 error code, first line of the message)."""
    from obstore.exceptions import (
        AlreadyExistsError,
        PermissionDeniedError,
        PreconditionError,
        UnauthenticatedError,
    )

    text = str(exc)
    status_match = _STATUS_IN_MESSAGE.search(text)
    code_match = _CODE_IN_MESSAGE.search(text)
    status = int(status_match.group(1)) if status_match else 0
    if not status:
        if isinstance(exc, FileNotFoundError):
            status = 404
        elif isinstance(exc, (PreconditionError, AlreadyExistsError)):
            status = 412
        elif isinstance(exc, PermissionDeniedError):
            status = 403
        elif isinstance(exc, UnauthenticatedError):
            status = 401
    return status, code_match.group(1) if code_match else "", text.split("\n", 1)[0]


class S3Store(ObjectStore):
    def __init__(self, settings: S3Settings, client: Any = None) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.parallelism = settings.parallelism
        self.public_url = settings.public_url.rstrip("/")
        self._base = f"{settings.prefix}/" if settings.prefix else ""
        self._session = self._make_session()
        self._data = self._make_data_store()
        self._boto: Any = client
        self._shared = client is None  # then made on first use, and shared (_shared_client)
        self._boto_lock = threading.Lock()
        self._conditional: bool | None = None
        self._probe_lock = threading.Lock()

    def _make_session(self) -> Any:
        try:
            import boto3
            import obstore  # noqa: F401 - both are needed; say so before the first request
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise StorageError(
                f"{self.settings.url}: S3 storage needs boto3 and obstore (pip install 'rcds[s3]')"
            ) from exc
        return boto3.session.Session(profile_name=self.settings.profile or None)

    @property
    def _client(self) -> Any:
        """boto3: listing and deletes (made on first use: a publish needs neither)."""
        with self._boto_lock:
            if self._boto is None:
                self._boto = _shared_client(self)
            return self._boto

    def _make_client(self) -> Any:
        import botocore.handlers
        from botocore.config import Config

        s = self.settings
        config = Config(
            region_name=s.region,
            s3={"addressing_style": "virtual" if s.addressing == "virtual" else "path"},
            max_pool_connections=max(s.parallelism, 10),
            connect_timeout=min(s.timeout, 10),
            read_timeout=s.timeout,
            retries={"total_max_attempts": 1},  # ours, below: one policy for every call, CVMFS's backoff
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        client = self._session.client("s3", endpoint_url=s.endpoint_url, config=config)
        client.meta.events.register("before-call.s3.DeleteObjects", _add_content_md5)
        # No "Expect: 100-continue": a round trip more for every request with a body, and after an empty
        # body the MinIO gateway of juicefs answers out of step (the next request on the connection times
        # out).
        client.meta.events.unregister("before-call.s3", botocore.handlers.add_expect_header)
        return client

    def _make_data_store(self) -> Any:
        """obstore: PUT, GET and HEAD of objects, the per-object hot path."""
        from obstore.store import S3Store as ObstoreS3

        s = self.settings
        endpoint = s.endpoint_url
        virtual = s.addressing == "virtual"
        if endpoint and virtual:  # obstore takes the bucket's own host name as the endpoint
            scheme, _, host = endpoint.partition("://")
            endpoint = f"{scheme}://{s.bucket}.{host}"
        config: dict[str, Any] = {"region": s.region, "virtual_hosted_style_request": virtual}
        if endpoint:
            config["endpoint"] = endpoint
        credentials = self._session.get_credentials()
        client_options: dict[str, Any] = {
            "allow_http": bool(endpoint and endpoint.startswith("http://")),
            "connect_timeout": timedelta(seconds=min(s.timeout, 10)),
            "timeout": timedelta(seconds=s.timeout),
            "pool_max_idle_per_host": str(max(s.parallelism, 10)),
        }
        # A private CA for an https endpoint, as boto3 takes it (AWS_CA_BUNDLE or the profile's
        # ca_bundle; botocore's session holds the resolved setting): added to obstore's trusted roots.
        ca_bundle = self._session._session.get_config_variable("ca_bundle")
        if ca_bundle:
            client_options["root_certificate"] = Path(ca_bundle).read_bytes()
        return ObstoreS3(
            s.bucket,
            config=config,  # type: ignore[arg-type]
            client_options=client_options,  # type: ignore[arg-type]
            retry_config={"max_retries": 0},  # ours, below
            # Without credentials in boto3's chain, obstore's own (environment, instance roles) is tried.
            credential_provider=_SessionCredentials(credentials) if credentials is not None else None,  # type: ignore[arg-type]
        )

    @property
    def description(self) -> str:
        where = f" at {self.settings.endpoint_url}" if self.settings.endpoint else ""
        return f"{self.settings.url}{where}"

    def _key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad object key {key!r}")
        return self._base + key

    # --- calls, retries, errors ------------------------------------------------------------------

    def _call(self, op: str, key: str, fn: Callable[[], T], missing_ok: bool = False) -> T:
        """``fn`` (a boto3 or an obstore request) with this store's retries; failures as rcds's errors."""
        from botocore.exceptions import BotoCoreError, ClientError
        from obstore.exceptions import BaseError as ObstoreError

        delay = 0.1
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
                detail: str = str(exc)
                failure: Exception = exc
            except BotoCoreError as exc:  # connection refused or reset, timeouts, DNS
                status, code, detail, failure = 0, type(exc).__name__, str(exc), exc
            except (ObstoreError, FileNotFoundError) as exc:
                status, code, detail = _obstore_failure(exc)
                failure = exc
            if missing_ok and (
                (status == 404 and code != "NoSuchBucket") or code in ("NoSuchKey", "NotFound")
            ):
                raise ObjectMissing(key) from None
            if status == 412 or code == "PreconditionFailed":
                raise ConditionFailed(
                    f"bucket {self.bucket}: {key} changed since it was read (another writer committed)"
                ) from failure
            throttled = status in (429, 503) or code in THROTTLED_CODES
            transient = throttled or status in RETRY_STATUS or status == 0
            if transient and attempt <= self.settings.retries:
                delay = self._backoff(op, key, attempt, delay, throttled, code or str(status or detail))
                continue
            if throttled:
                raise StorageError(
                    f"bucket {self.bucket}: {op} {key} throttled ({code or status}) after {attempt} attempts"
                ) from failure
            if status == 0:
                raise StorageError(
                    f"bucket {self.bucket}: {op} {key} failed after {attempt} attempts: {detail}"
                ) from failure
            raise StorageError(self._reason(op, key, code, status, detail)) from failure

    def _backoff(self, op: str, key: str, attempt: int, delay: float, throttled: bool, why: str) -> float:
        if throttled:
            delay = max(delay, 0.25)
        log.warning(
            "s3: retrying",
            extra=log_fields(bucket=self.bucket, op=op, key=key, attempt=attempt, reason=why, delay=delay),
        )
        time.sleep(delay * (0.5 + random.random() / 2))  # jitter: parallel puts do not retry in step
        return min(delay * 2, 10.0 if throttled else 2.0)

    def _reason(self, op: str, key: str, code: str, status: int, detail: str) -> str:
        if code == "NoSuchBucket":
            return f"bucket {self.bucket} does not exist ({op} {key}, {self.description})"
        if code in CREDENTIAL_CODES or status in (401, 403):
            return f"bucket {self.bucket}: credentials rejected ({code or status}) on {op} {key}"
        return f"bucket {self.bucket}: {op} {key} failed: {code or status}: {detail}"

    # --- ObjectStore -----------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except ObjectMissing:
            return False
        return True

    def _head(self, key: str) -> Mapping[str, Any]:
        import obstore

        full = self._key(key)
        return self._call("HEAD", key, lambda: obstore.head(self._data, full), missing_ok=True)

    def size(self, key: str) -> int:
        return int(self._head(key)["size"])

    def get(self, key: str) -> bytes:
        import obstore

        full = self._key(key)
        return self._call("GET", key, lambda: bytes(obstore.get(self._data, full).bytes()), missing_ok=True)

    def put(self, key: str, data: bytes | memoryview, mode: Any = None) -> None:
        """``mode``: obstore's ``"create"`` (If-None-Match: *) or ``{"e_tag": ...}`` (If-Match)."""
        import obstore

        full = self._key(key)
        attributes = {"Cache-Control": _cache_control(key), "Content-Type": "application/octet-stream"}
        self._call(
            "PUT",
            key,
            lambda: obstore.put(
                self._data,
                full,
                data,
                attributes=attributes,
                mode=mode,
                use_multipart=False,  # one PUT, atomic (objects are chunked far below S3's 5 GiB)
            ),
        )

    def put_file(self, key: str, path: str) -> None:
        """Upload the file (through obstore, read again for each attempt), then remove it. One PUT:
        objects up to S3's single-PUT limit (5 GiB)."""
        import obstore

        full = self._key(key)
        attributes = {"Cache-Control": _cache_control(key), "Content-Type": "application/octet-stream"}
        self._call(
            "PUT",
            key,
            lambda: obstore.put(self._data, full, Path(path), attributes=attributes, use_multipart=False),
        )
        os.unlink(path)

    def put_object(self, key: str, data: bytes | memoryview) -> bool:
        if self.settings.peek_before_put:
            return super().put_object(key, data)
        self.put(key, data)
        return True

    def put_durable(self, key: str, data: bytes) -> None:
        self.put(key, data)  # durable once acknowledged

    def delete(self, key: str) -> None:
        full = self._key(key)
        self._call("DELETE", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=full))

    def delete_many(self, keys: Iterable[str]) -> None:
        batch: list[str] = []
        for key in keys:
            batch.append(key)
            if len(batch) == DELETE_BATCH:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, keys: list[str]) -> None:
        objects = [{"Key": self._key(k)} for k in keys]
        reply = self._call(
            "DeleteObjects",
            f"{keys[0]} (+{len(keys) - 1})",
            lambda: self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}
            ),
        )
        errors = reply.get("Errors") or []
        if errors:
            first = errors[0]
            raise StorageError(
                f"bucket {self.bucket}: {len(errors)} of {len(keys)} deletes failed,"
                f" first {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
            )

    def iter_keys(self, prefix: str = "data/") -> Iterator[str]:
        # boto3, not obstore: obstore strips the trailing "/" of the directory markers that file-system
        # backed servers list, which would then pass for objects; a listing is no per-object hot path.
        start = self._key(prefix)
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": start, "MaxKeys": 1000}
            if token:
                args["ContinuationToken"] = token
            page = self._call("LIST", prefix, lambda a=args: self._client.list_objects_v2(**a))  # type: ignore[misc]
            for item in page.get("Contents") or []:
                name = str(item["Key"])
                if not name.endswith("/"):  # directory markers of file-system-backed servers
                    yield name[len(self._base) :]
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def sync(self) -> None:
        """Nothing: an acknowledged PUT is durable."""

    # --- conditional replace ---------------------------------------------------------------------

    @property
    def conditional_writes(self) -> bool:
        """Whether the server honours ``If-None-Match: *`` (probed once, on a private scratch key)."""
        with self._probe_lock:
            if self._conditional is None:
                probe = f".rcds-probe-{secrets.token_hex(6)}"
                self.put(probe, b"1")
                try:
                    self.put(probe, b"2", mode="create")
                    self._conditional = False
                except ConditionFailed:
                    self._conditional = True
                finally:
                    self.delete(probe)
                log.info(
                    "s3: conditional writes",
                    extra=log_fields(bucket=self.bucket, supported=self._conditional),
                )
            return self._conditional

    def version(self, key: str) -> str | None:
        if not self.conditional_writes:
            return None
        try:
            tag = self._head(key).get("e_tag")
        except ObjectMissing:
            return None
        return str(tag) if tag else None

    def replace_if(self, key: str, data: bytes, version: str | None) -> None:
        if not self.conditional_writes:
            self.put(key, data)
        elif version is None:
            self.put(key, data, mode="create")
        else:
            self.put(key, data, mode={"e_tag": version})

    def close(self) -> None:
        if self._boto is not None and not self._shared:  # a shared one stays open for the next store
            self._boto.close()
