"""Content hashes, path hashes and object names of the CernVM-FS format.

Object names are the hex digest of the *stored* (compressed) bytes plus a one-letter suffix telling the
kind of object; catalogs key their rows by the MD5 of the repository path split into two signed
little-endian 64-bit integers.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass
from typing import Protocol


class Suffix(enum.Enum):
    """Object kind, the letter after the hex digest in ``data/XX/...``."""

    NONE = ""
    CATALOG = "C"
    HISTORY = "H"
    CERTIFICATE = "X"
    METAINFO = "M"
    PARTIAL = "P"
    MICRO_CATALOG = "L"


class Algorithm(enum.Enum):
    """Content hash algorithms; the value is the id appended to the hex string."""

    SHA1 = ""
    RMD160 = "-rmd160"
    SHAKE128 = "-shake128"

    @property
    def flag_value(self) -> int:
        """The number stored in catalog flags bits 8-10 (shash id - 1)."""
        return _FLAG_VALUES[self._value_]  # keyed by the plain value: once per file or row, kept cheap

    @classmethod
    def from_flag_value(cls, value: int) -> Algorithm:
        return _BY_FLAG_VALUE[value]

    def new(self) -> _Hasher:
        if self is Algorithm.SHA1:
            return hashlib.sha1()
        if self is Algorithm.SHAKE128:
            return _Shake128()
        return hashlib.new("ripemd160")


_FLAG_VALUES = {Algorithm.SHA1.value: 0, Algorithm.RMD160.value: 1, Algorithm.SHAKE128.value: 2}
_BY_FLAG_VALUE = {0: Algorithm.SHA1, 1: Algorithm.RMD160, 2: Algorithm.SHAKE128}


class _Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def digest(self) -> bytes: ...


class _Shake128:
    """SHAKE-128 squeezed to 20 bytes, as CVMFS does."""

    def __init__(self) -> None:
        self._h = hashlib.shake_128()

    def update(self, data: bytes | memoryview, /) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        return self._h.digest(20)


@dataclass(frozen=True, order=True)
class ContentHash:
    """A 20-byte content digest with its algorithm."""

    digest: bytes
    algorithm: Algorithm = Algorithm.SHA1

    def __post_init__(self) -> None:
        if len(self.digest) != 20:
            raise ValueError(f"content digest must be 20 bytes, got {len(self.digest)}")

    @property
    def hex(self) -> str:
        """Lowercase hex with the algorithm id, as in manifests and ``nested_catalogs.sha1``."""
        return self.digest.hex() + self.algorithm.value

    def object_name(self, suffix: Suffix = Suffix.NONE) -> str:
        """Relative key of the object in the repository: ``data/ab/cdef...<suffix>``."""
        h = self.hex
        return f"data/{h[:2]}/{h[2:]}{suffix.value}"

    @classmethod
    def from_hex(cls, text: str) -> ContentHash:
        """Parse ``40 hex`` / ``hex-rmd160`` / ``hex-shake128`` (no suffix letter)."""
        text = text.strip()
        for algorithm in (Algorithm.RMD160, Algorithm.SHAKE128):
            if algorithm.value and text.endswith(algorithm.value):
                return cls(bytes.fromhex(text[: -len(algorithm.value)]), algorithm)
        if len(text) != 40:
            raise ValueError(f"not a content hash: {text!r}")
        return cls(bytes.fromhex(text), Algorithm.SHA1)

    @classmethod
    def of(cls, data: bytes | memoryview, algorithm: Algorithm = Algorithm.SHA1) -> ContentHash:
        h = algorithm.new()
        h.update(data)
        return cls(h.digest(), algorithm)

    def __str__(self) -> str:
        return self.hex


def md5_pair(path: str | bytes) -> tuple[int, int]:
    """MD5 of a repository path as the two signed little-endian int64 halves stored in catalogs."""
    raw = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path
    a, b = struct.unpack("<qq", hashlib.md5(raw).digest())
    return a, b


ROOT_MD5 = md5_pair("")
EMPTY_MD5_HEX = hashlib.md5(b"").hexdigest()


def parent_path(path: str) -> str:
    """Repository-absolute parent path: ``/a/b`` -> ``/a``, ``/a`` -> ``""``."""
    return path[: path.rfind("/")] if path else ""


def join_path(parent: str, name: str) -> str:
    return f"{parent}/{name}"


def normalize_path(path: str) -> str:
    """Turn ``a/b``, ``/a/b/``, ``/`` into the catalog form (``/a/b``, ``""`` for the root)."""
    parts = [p for p in path.split("/") if p]
    for p in parts:
        if p in (".", ".."):
            raise ValueError(f"path component {p!r} not allowed: {path!r}")
    return "".join("/" + p for p in parts)
