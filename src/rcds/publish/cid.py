"""Code IDs (CIDs): what the client names its tarball, and the directory it is published as.

A CID is one or two ``/``-separated components (``<hash>`` or ``<group>/<hash>``), as with the service rcds
replaces. Unlike that service, anything that could become a surprising path is refused instead of
normalised: a bad CID is a 400 with the reason and never reaches the file system.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

MAX_CID_LENGTH: Final = 200
PUBLISHER_FILE: Final = ".publisher"  # in every CID directory: who published it (a one-level CID's mark)
SAFE_CHARACTERS: Final = "A-Z a-z 0-9 and . _ - + = @"
_COMPONENT_RE: Final = re.compile(r"[A-Za-z0-9_+=@][A-Za-z0-9._+=@-]*")


class CidError(ValueError):
    """The reason a CID was refused (the text after ``Bad request: ``)."""


def validate_cid(cid: str) -> str:
    """Return ``cid`` unchanged if it is acceptable, else raise :class:`CidError` with the reason."""
    if not cid:
        raise CidError("empty cid")
    if cid.startswith("."):
        raise CidError('cid may not start with "."')
    if cid.startswith("/"):
        raise CidError('cid may not start with "/"')
    if len(cid) > MAX_CID_LENGTH:
        raise CidError(f"cid longer than {MAX_CID_LENGTH} characters")
    parts = cid.split("/")
    if len(parts) > 2:
        raise CidError("at most one slash allowed in cid")
    for part in parts:
        if not part:
            raise CidError("empty component in cid")
        if part.startswith("."):
            raise CidError('cid components may not start with "."')
        if not _COMPONENT_RE.fullmatch(part):
            raise CidError(f"disallowed character in cid (allowed: {SAFE_CHARACTERS}; no leading -)")
    return cid


def cid_group(cid: str) -> str | None:
    """The first component of a two-level CID (the experiment or group), else None."""
    return cid.split("/", 1)[0] if "/" in cid else None


def is_cid_directory(cid: str, exists: Callable[[str], bool]) -> bool:
    """Whether the existing directory ``<prefix>/<cid>`` is that CID's own, not a directory inside another.

    ``exists(path)`` tells whether ``<prefix>/<path>`` exists. The rule the server applies (see
    ``rcds.publish.namespace``): a top-level directory holding ``.publisher`` is a one-level CID and all
    below it is its content; any other top-level directory is a group of two-level CIDs.
    """
    group = cid_group(cid)
    if group is None:
        return exists(f"{cid}/{PUBLISHER_FILE}")
    return not exists(f"{group}/{PUBLISHER_FILE}")
