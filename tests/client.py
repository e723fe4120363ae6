"""Running the real ``rcds`` client command line against real servers, isolated from the user's setup."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Variables that would make the client pick up this machine's credentials or configuration.
_CLIENT_VARS = ("BEARER_TOKEN", "BEARER_TOKEN_FILE", "X509_USER_PROXY", "X509_CERT_DIR", "XDG_RUNTIME_DIR")


def client_env(home: Path, config: str = "", **extra: str) -> dict[str, str]:
    """An environment with its own HOME and client configuration file (TOML text ``config``)."""
    env = {k: v for k, v in os.environ.items() if k not in _CLIENT_VARS and not k.startswith("RCDS_")}
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "client.toml"
    cfg.write_text(config)
    env.update(HOME=str(home), RCDS_CLIENT_CONFIG=str(cfg), **extra)
    return env


def rcds(*args: object, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rcds.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def rcds_json(*args: object, env: dict[str, str], timeout: float = 120) -> dict[str, Any]:
    p = rcds(*args, "--json", env=env, timeout=timeout)
    assert p.returncode == 0, p.stderr
    doc: dict[str, Any] = json.loads(p.stdout)
    return doc


@contextmanager
def hanging_server() -> Iterator[str]:
    """A port that accepts TCP connections (the kernel's backlog) but never answers: a hung server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def dead_server() -> str:
    """A URL where nothing listens: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
