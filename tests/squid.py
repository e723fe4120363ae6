"""Run a real Squid (``squid -N``) on 127.0.0.1 as the caching proxy in front of the HTTP tests.

A CVMFS repository is only as good as its behaviour behind the site squids and stratum 1s that sit
between it and the clients: what they cache, for how long, and what they pass through. Mocks cannot
answer that, so ``SquidProxy`` starts the distribution's squid with a minimal, private configuration
(its own port, work directory, logs, pid file and shared-memory names) and reads the cache result of
every request back from its access log.

Tests call ``require_squid()``: it skips when squid is not installed, unless ``RCDS_REQUIRE_SQUID=1``
(set by ``.ci/run``), where a missing squid is a failure. ``RCDS_SQUID`` names the binary explicitly
(empty: behave as if squid were not installed).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest

REQUIRE_ENV = "RCDS_REQUIRE_SQUID"
BINARY_ENV = "RCDS_SQUID"
# squid lives in sbin, often outside a normal user's PATH: look there too.
SBIN_DIRS = "/usr/sbin:/usr/local/sbin:/sbin"
# Users squid may drop privileges to when started as root (Debian: proxy; Fedora: squid).
EFFECTIVE_USERS = ("proxy", "squid", "nobody")

# Time, result/status, bytes, method, URL, hierarchy/peer, type, request and reply Cache-Control.
LOG_FORMAT = '%ts.%03tu %Ss/%03>Hs %<st %rm %ru %Sh/%<a %mt "%{Cache-Control}>h" "%{Cache-Control}<h"'
_LOG_RE = re.compile(
    r"(?P<time>\S+) (?P<result>[A-Z_]+)/(?P<code>\d+) (?P<size>\d+) (?P<method>\S+) (?P<url>\S+)"
    r' (?P<hierarchy>\S+) (?P<type>\S+) "(?P<request_cc>[^"]*)" "(?P<reply_cc>[^"]*)"'
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def squid_binary() -> str | None:
    """The squid executable: ``$RCDS_SQUID`` if set, else ``squid`` on PATH or in the sbin directories."""
    explicit = os.environ.get(BINARY_ENV)
    if explicit is not None:
        return explicit if explicit and os.access(explicit, os.X_OK) else None
    return shutil.which("squid") or shutil.which("squid", path=SBIN_DIRS)


def squid_available() -> bool:
    return squid_binary() is not None


def require_squid() -> str:
    """The squid binary; otherwise skip the test, or fail it when ``RCDS_REQUIRE_SQUID=1`` (CI)."""
    binary = squid_binary()
    if binary is not None:
        return binary
    where = (
        f"${BINARY_ENV}={os.environ[BINARY_ENV]!r}" if BINARY_ENV in os.environ else "PATH or " + SBIN_DIRS
    )
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(
            f"squid is required ({REQUIRE_ENV}=1) but not found in {where}; "
            "install it (apt-get install squid) or unset the variable to skip these tests",
            pytrace=False,
        )
    pytest.skip(f"squid not installed (looked in {where}); set {REQUIRE_ENV}=1 to make this a failure")


@dataclass(frozen=True)
class LogEntry:
    """One access.log line: squid's cache result (TCP_MISS, TCP_MEM_HIT, ...) for one request."""

    time: float
    result: str
    code: int
    size: int
    method: str
    url: str
    hierarchy: str
    content_type: str
    request_cache_control: str
    reply_cache_control: str

    @property
    def hit(self) -> bool:
        """Served from squid's cache without contacting the server (TCP_HIT, TCP_MEM_HIT, ...)."""
        return "HIT" in self.result.split("_")

    @property
    def outcome(self) -> str:
        """``TCP_MISS/404``: the result without squid's ``_ABORTED``/``_TIMEDOUT``/``_IGNORED`` details
        (a client that stops reading a 404 body it does not need makes an ``_ABORTED`` miss)."""
        result = re.sub(r"(_ABORTED|_TIMEDOUT|_IGNORED)+$", "", self.result)
        return f"{result}/{self.code}"


def parse_log_line(line: str) -> LogEntry | None:
    m = _LOG_RE.fullmatch(line.strip())
    if m is None:
        return None
    return LogEntry(
        float(m["time"]),
        m["result"],
        int(m["code"]),
        int(m["size"]),
        m["method"],
        m["url"],
        m["hierarchy"],
        m["type"],
        m["request_cc"],
        m["reply_cc"],
    )


class SquidProxy:
    """A private squid on ``127.0.0.1:<free port>``; ``url`` is the proxy URL for clients.

    Everything lives in a fresh directory under the system temp dir (not pytest's ``tmp_path``: as root,
    squid drops to an unprivileged user that must be able to reach it), removed by ``stop()``.
    """

    def __init__(self, extra_config: str = "", keep_workdir: bool = False) -> None:
        self.binary = squid_binary()
        self.extra_config = extra_config
        self.keep_workdir = keep_workdir
        self.workdir = Path(tempfile.mkdtemp(prefix="rcds-squid-"))
        # Squid names its shared-memory segments /dev/shm/<service>-cf__*.shm even with one worker: a
        # unique service name (-n) keeps parallel squids from opening each other's segments.
        self.service = "rcdstest" + secrets.token_hex(6)
        self.config_path = self.workdir / "squid.conf"
        self.access_log = self.workdir / "access.log"
        self.cache_log = self.workdir / "cache.log"
        self.output_log = self.workdir / "squid.out"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.user = self._effective_user()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def _effective_user() -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None  # squid keeps the invoking user
        for name in EFFECTIVE_USERS:
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(name)
        raise RuntimeError(f"running as root but none of the users {EFFECTIVE_USERS} exists for squid")

    def config(self) -> str:
        w = self.workdir
        lines = [
            f"http_port 127.0.0.1:{self.port}",
            "visible_hostname rcds-test-squid",
            # Clients on this host only, and only to servers on this host (any port).
            "acl rcds_src src 127.0.0.1/32",
            "acl rcds_dst dst 127.0.0.1/32",
            "http_access allow rcds_src rcds_dst",
            "http_access deny all",
            # One process, nothing shared: no SMP workers, no shared memory cache.
            "workers 1",
            "memory_cache_shared off",
            "max_filedescriptors 1024",  # squid sizes its tables by the fd limit; keep it small and fast
            # CVMFS objects reach tens of MB; both limits must precede cache_dir to apply to it.
            "cache_mem 64 MB",
            "maximum_object_size 64 MB",
            "maximum_object_size_in_memory 1 MB",
            # 4 x 16 directories, not the usual 16 x 256: deleting 4096 takes seconds on a slow disk.
            f"cache_dir ufs {w / 'cache'} 100 4 16",
            "refresh_pattern . 0 20% 4320",  # the Debian default
            f"logformat rcds {LOG_FORMAT}",
            f"access_log stdio:{self.access_log} rcds",
            "buffered_logs off",
            f"cache_log {self.cache_log}",
            "cache_store_log none",
            "logfile_rotate 0",
            f"pid_filename {w / 'squid.pid'}",
            f"coredump_dir {w}",
            "shutdown_lifetime 0 seconds",
            "pinger_enable off",
            "icp_port 0",
            "htcp_port 0",
            "digest_generation off",
            "client_db off",
        ]
        if self.user is not None:
            lines.append(f"cache_effective_user {self.user.pw_name}")
        return "\n".join([*lines, self.extra_config, ""])

    def _write_config(self) -> None:
        self.config_path.write_text(self.config())
        if self.user is not None:
            for path in (self.workdir, *self.workdir.rglob("*")):
                os.chown(path, self.user.pw_uid, self.user.pw_gid, follow_symlinks=False)

    def _command(self, *args: str) -> list[str]:
        assert self.binary is not None
        return [self.binary, "-N", "-n", self.service, "-f", str(self.config_path), *args]

    def start(self, timeout: float = 20, attempts: int = 5) -> SquidProxy:
        """Initialise the cache dir, start squid and wait until it accepts connections.

        A port taken between choosing and binding it is retried with another one. On failure squid is
        stopped, its directory removed, and the error carries the end of its logs.
        """
        try:
            if self.binary is None:
                raise RuntimeError("squid is not installed")
            self.port = free_port()
            self._write_config()
            init = subprocess.run(self._command("-z"), capture_output=True, timeout=timeout, check=False)
            self._remove_shm()  # squid -z leaves its segments behind
            if init.returncode != 0:
                raise RuntimeError(
                    f"squid -z failed ({init.returncode}): {init.stderr.decode()}\n{self.log_tail()}"
                )
            for attempt in range(attempts):
                if attempt:
                    self.port = free_port()
                    self._write_config()
                if self._launch(timeout):
                    return self
            raise RuntimeError(f"squid could not bind a port in {attempts} attempts\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _launch(self, timeout: float) -> bool:
        """Start squid on ``self.port``; False if the port was taken, an exception on other failures."""
        seen = len(self._read(self.cache_log))  # what earlier attempts logged
        out = open(self.output_log, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(self._command(), stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                rc, self.proc = self.proc.returncode, None
                self._remove_shm()
                if "Unable to open HTTP Socket" in self._read(self.cache_log)[seen:]:
                    return False
                raise RuntimeError(f"squid exited with {rc} while starting\n{self.log_tail()}")
            # Listening, and done scanning the (empty) cache_dir, so the first responses get stored.
            if self._accepting() and "Finished rebuilding storage" in self._read(self.cache_log)[seen:]:
                return True
            time.sleep(0.02)
        raise RuntimeError(f"squid did not come up within {timeout} s\n{self.log_tail()}")

    def _accepting(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        except OSError:
            return False
        return True

    def stop(self, timeout: float = 10) -> int | None:
        """SIGINT (squid's immediate shutdown; it still takes ~2 s), SIGKILL after ``timeout``."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait(timeout)
            self.proc = None
        self._remove_shm()
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return rc

    def _remove_shm(self) -> None:
        """Segments a killed (or ``-z``) squid did not unlink."""
        for seg in Path("/dev/shm").glob(f"{self.service}-*"):
            with contextlib.suppress(OSError):
                seg.unlink()

    def __enter__(self) -> SquidProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- logs ------------------------------------------------------------------------------------

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The end of cache.log and of squid's own output, for error messages."""
        cache = "\n".join(self._read(self.cache_log).splitlines()[-lines:])
        return f"--- {self.cache_log}:\n{cache}\n--- squid output:\n{self._read(self.output_log)[-4000:]}"

    def access_log_lines(self) -> list[str]:
        return self._read(self.access_log).splitlines()

    def entries(self, url: str | None = None) -> list[LogEntry]:
        """Parsed access.log entries, in order; only those for exactly ``url`` if given."""
        parsed = (parse_log_line(line) for line in self.access_log_lines())
        return [e for e in parsed if e is not None and (url is None or e.url == url)]

    def wait_entries(self, url: str, count: int, timeout: float = 5) -> list[LogEntry]:
        """The entries for ``url`` once there are at least ``count``: squid logs a request after the
        client may already have the whole response."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.entries(url)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.01)

    def hits_and_misses(self, url: str) -> tuple[int, int]:
        found = self.entries(url)
        hits = sum(e.hit for e in found)
        return hits, len(found) - hits
