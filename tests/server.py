"""Run the real ``rcds serve`` as a subprocess on 127.0.0.1 for the API tests."""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx

REPOS = ("user1.rcds.test", "user2.rcds.test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_tarball(files: dict[str, bytes | str], mode: str = "w:gz", mtime: int = 1_700_000_000) -> bytes:
    """A tarball of regular files (``name/`` keys with empty values make directories)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:  # type: ignore[call-overload]
        for name, data in files.items():
            info = tarfile.TarInfo(name.rstrip("/"))
            info.mtime = mtime
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
                continue
            raw = data.encode() if isinstance(data, str) else data
            info.size = len(raw)
            info.mode = 0o755 if name.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


class RcdsServer:
    def __init__(
        self,
        root: Path,
        extra_config: str = "",
        repos: tuple[str, ...] = REPOS,
        server_config: str = "",
        top_config: str = "",
    ) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = root / "rcds.toml"
        self.log_path = root / "server.log"
        self.repos = repos
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [f'data_dir = "{root / "data"}"', "touch_flush_seconds = 0.2", top_config, "[server]",
                 f'http = ["127.0.0.1:{self.port}"]', server_config, extra_config]  # fmt: skip
        if "[auth]" not in extra_config:
            lines += ["[auth]", 'gridmapfile = ""']
        for r in repos:
            lines += ["[[repository]]", f'name = "{r}"']
        self.config_path.write_text("\n".join(lines) + "\n")
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def storage(self, repo: str) -> Path:
        return self.root / "data" / repo

    def start(
        self,
        env: dict[str, str] | None = None,
        timeout: float = 60,
        max_file_size: int | None = None,
        max_open_files: int | None = None,
    ) -> RcdsServer:
        """``max_file_size``: RLIMIT_FSIZE of the server, to make writes fail as on a full disk;
        ``max_open_files``: its RLIMIT_NOFILE (soft and hard), to run it out of file descriptors."""

        def limit() -> None:
            if max_file_size is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_size, max_file_size))
            if max_open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (max_open_files, max_open_files))

        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rcds.cli",
                "serve",
                "--config",
                str(self.config_path),
                "--log-format",
                "json",
            ],
            stdout=log,
            stderr=log,
            env={**os.environ, **(env or {})},
            preexec_fn=limit,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rcds serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.client.get("/pubapi/ping").text == "OK\n":
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"rcds serve did not come up:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        self.proc = None
        return rc

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        self.client.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """The server's JSON log records of one event, in order."""
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if doc.get("event") == event:
                    out.append(doc)
        return out

    # --- API helpers -----------------------------------------------------------------------------

    def api(self, endpoint: str, method: str = "GET", **params: Any) -> httpx.Response:
        return self.client.request(method, f"/pubapi/{endpoint}", params=params)

    def publish(self, cid: str, data: bytes, **params: Any) -> httpx.Response:
        return self.client.post("/pubapi/publish", params={"cid": cid, **params}, content=data)

    def status(self, cid: str) -> dict[str, Any]:
        doc: dict[str, Any] = self.api("status", cid=cid).json()
        return doc

    def wait_state(
        self, cid: str, states: tuple[str, ...] = ("published", "failed"), timeout: float = 60
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            doc = self.status(cid)
            if doc["state"] in states:
                return doc
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cid} still {doc} after {timeout} s\n{self.log()[-4000:]}")
            time.sleep(0.02)
