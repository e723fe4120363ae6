"""Who may use the CVMFS-gateway API (``/api/v1``): HMAC keys, as the stock gateway's, restricted to paths.

A key file holds lines ``plain_text <key id> <secret>`` (CVMFS's ``/etc/cvmfs/keys/<repo>.gw``). A request
carries ``Authorization: <key id> <base64 of the hex HMAC-SHA1 of the message>``, where the message is what
the stock gateway signs: the body of a lease request, the token for a commit or drop, the first
``Message-Size`` bytes of a legacy payload. rcds also signs what the stock gateway leaves open: a listing
(``GET``) signs the request path.

A WLCG token (``Authorization: Bearer <token>``, from an issuer of ``[auth.issuers]``) works as well: its
``storage.create:<path>`` scopes are the paths (below any local repository's root) it may lease; the
caller is ``<issuer>#<sub>``, so a lease belongs to a person, not a machine.

A key may lease only within its paths (``[gateway.key_paths]``: ``"<repo>/<path>"`` entries; ``"<repo>/"``
is the whole repository); a key without paths may lease nothing. This is CVMFS's rule (the lease path
must lie within the key's path) with a key per person rather than per machine as the intended use.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from pathlib import Path


class GatewayRefusal(Exception):
    """A request refused; ``reason`` goes into the CVMFS-style ``{"status":"error","reason":...}`` reply."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_key_file(text: str) -> dict[str, str]:
    """``plain_text <id> <secret>`` lines (blank lines and ``#`` comments skipped)."""
    keys: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) != 3 or parts[0] != "plain_text":
            raise ValueError(f"line {n}: expected 'plain_text <key id> <secret>'")
        keys[parts[1]] = parts[2]
    return keys


def hmac_hex(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha1).hexdigest()


def authorization(key_id: str, secret: str, message: bytes) -> str:
    """The ``Authorization`` header value a publisher sends for ``message``."""
    return f"{key_id} {base64.b64encode(hmac_hex(secret, message).encode()).decode()}"


def split_lease_path(lease_path: str) -> tuple[str, str]:
    """``repo/sub/path`` -> (``repo``, ``sub/path``); the sub-path is ``""`` for the whole repository."""
    repo, _, sub = lease_path.strip().lstrip("/").partition("/")
    parts = [p for p in sub.split("/") if p]
    if not repo or any(p in (".", "..") for p in parts) or "\0" in lease_path:
        raise GatewayRefusal("invalid_path")
    return repo, "/".join(parts)


def storage_create_paths(scope: object) -> tuple[str, ...]:
    """The paths of a token's ``storage.create:<path>`` scopes, without the leading '/' ("" = everything)."""
    if not isinstance(scope, str):
        return ()
    paths = []
    for item in scope.split():
        if item.startswith("storage.create:/"):
            parts = [p for p in item[len("storage.create:") :].split("/") if p]
            if not any(p in (".", "..") for p in parts):
                paths.append("/".join(parts))
    return tuple(paths)


def within(path: str, prefix: str) -> bool:
    """``path`` equals ``prefix`` or lies below it, component-wise (both without leading '/')."""
    return not prefix or path == prefix or path.startswith(prefix + "/")


class GatewayKeys:
    """The gateway's keys, their paths and which are admin keys."""

    def __init__(
        self,
        secrets: Mapping[str, str],
        key_paths: Mapping[str, Iterable[str]],
        admin_keys: Iterable[str] = (),
    ) -> None:
        self._secrets = dict(secrets)
        self._paths = {k: tuple(split_lease_path(p) for p in v) for k, v in key_paths.items()}
        self.admin_keys = frozenset(admin_keys)

    @classmethod
    def load(
        cls, files: Iterable[Path], key_paths: Mapping[str, Iterable[str]], admin_keys: Iterable[str] = ()
    ) -> GatewayKeys:
        secrets: dict[str, str] = {}
        for f in files:
            try:
                secrets.update(parse_key_file(Path(f).read_text()))
            except ValueError as exc:
                raise ValueError(f"{f}: {exc}") from exc
        return cls(secrets, key_paths, admin_keys)

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def verify(self, header: str | None, message: bytes) -> str:
        """The key id that signed ``message``, or GatewayRefusal("invalid_hmac")."""
        parts = (header or "").split(" ")
        if len(parts) != 2:
            raise GatewayRefusal("invalid_hmac")
        key_id, signature = parts
        secret = self._secrets.get(key_id)
        try:
            given = base64.b64decode(signature, validate=True)
        except ValueError:
            raise GatewayRefusal("invalid_hmac") from None
        # Compare even for an unknown key, so the answer's timing does not tell which key ids exist.
        expected = hmac_hex(secret or "\0unknown", message).encode()
        if not hmac.compare_digest(given, expected) or secret is None:
            raise GatewayRefusal("invalid_hmac")
        return key_id

    def may_lease(self, key_id: str, repository: str, path: str) -> bool:
        return any(r == repository and within(path, p) for r, p in self._paths.get(key_id, ()))

    def paths(self, key_id: str) -> list[str]:
        return [f"{r}/{p}" for r, p in self._paths.get(key_id, ())]

    def key_ids(self) -> list[str]:
        return sorted(self._secrets)
