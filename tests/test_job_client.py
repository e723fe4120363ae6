"""The job client file (``rcds.client.bundle``): ``wait`` and ``get`` on a bare python3 >= 3.9.

The file is fetched from a real server's ``/pubapi/client`` and run as a separate process with
``python3 -S -I`` (no site-packages, no PYTHON* variables: nothing pip installed is reachable) and an
environment holding only PATH, HOME and the client configuration file, under the current Python and
under a real 3.9 where there is one. Its results are compared with the installed ``rcds`` command's.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tarfile
import time
import tomllib
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from client import client_env, dead_server, rcds
from pki import make_ca, make_host_cert, make_proxy, make_user_cert, write_ca_dir
from rcds import minitoml
from rcds.client import bundle
from rcds.cvmfs import pkcs1
from rcds.cvmfs.stdhttp import StdlibHttp
from server import REPOS, RcdsServer, free_port, make_tarball
from squid import SquidProxy, require_squid

ROOT = Path(__file__).resolve().parents[1]


def _python39() -> str | None:
    for candidate in ("/root/.pyenv/versions/3.9.18/bin/python3", shutil.which("python3.9")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


PY39 = _python39()
PYTHONS = [
    pytest.param(sys.executable, id="current"),
    pytest.param(PY39, id="3.9", marks=pytest.mark.skipif(PY39 is None, reason="no Python 3.9 here")),
]
OLDEST = PY39 or sys.executable  # for the tests that run once


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcdsServer]:
    srv = RcdsServer(tmp_path_factory.mktemp("srv")).start()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def job_client(server: RcdsServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file as a wrapper gets it: ``curl -fsS <server>/pubapi/client -o rcds-job``."""
    r = httpx.get(f"{server.url}/pubapi/client")
    assert r.status_code == 200
    path = tmp_path_factory.mktemp("job") / "rcds-job"
    path.write_bytes(r.content)
    return path


def node_config(server: RcdsServer, home: Path, extra: str = "") -> Path:
    """A client configuration file (read by the job client's own TOML reader on 3.9)."""
    home.mkdir(parents=True, exist_ok=True)
    keys = ", ".join(f'"{server.storage(r) / ".rcds" / "keys"}"' for r in REPOS)
    cfg = home / "client.toml"
    cfg.write_text(
        f'# the worker node\'s settings\nservers = ["{server.url}"]\nkeys = [\n  {keys},\n]\n'
        f"read_timeout = 20\nretries = 2\n{extra}"
    )
    return cfg


def job(
    python: str, client: Path, *args: object, home: Path, cfg: Path, extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The job client in a clean process: no site-packages, only PATH, HOME, the configuration and
    ``extra``."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "RCDS_CLIENT_CONFIG": str(cfg), **(extra or {})}
    return subprocess.run(
        [python, "-S", "-I", str(client), *map(str, args)],
        capture_output=True, text=True, env=env, timeout=120, check=False, cwd=home,
    )  # fmt: skip


def side_by_side(
    mine: Callable[[], subprocess.CompletedProcess[str]],
    theirs: Callable[[], subprocess.CompletedProcess[str]],
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """Two commands that each wait out their whole ``--timeout``, run at the same time: the suite waits
    once instead of twice."""
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(mine), pool.submit(theirs)
        return a.result(), b.result()


def job_json(python: str, client: Path, *args: object, home: Path, cfg: Path) -> dict[str, Any]:
    p = job(python, client, *args, "--json", home=home, cfg=cfg)
    assert p.returncode == 0, p.stderr
    doc: dict[str, Any] = json.loads(p.stdout)
    return doc


def installed_env(cfg: Path, home: Path) -> dict[str, str]:
    """The same configuration for the installed ``rcds`` command."""
    return client_env(home, cfg.read_text())


def tree(root: Path) -> dict[str, tuple[str, int, bytes | str | None]]:
    out: dict[str, tuple[str, int, bytes | str | None]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", 0, os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir", st.st_mode & 0o7777, None)
        else:
            out[rel] = ("file", st.st_mode & 0o7777, p.read_bytes())
    return out


def publish(server: RcdsServer, files: dict[str, bytes | str], group: str = "job") -> str:
    data = make_tarball(files)
    cid = f"{group}/{hashlib.sha256(data).hexdigest()}"
    assert server.publish(cid, data).status_code == 200
    assert server.wait_state(cid)["state"] == "published"
    return cid


FILES: dict[str, bytes | str] = {
    "run.sh": "#!/bin/sh\necho job\n",
    "ana.py": "print('analysis')\n" * 300,
    "lib/big.dat": os.urandom(1 << 20) + bytes(5 << 20),  # chunked by the server
    "lib/empty": b"",
    "conf/\u00e9t\u00e9.cfg": "x = 1\n",
}


@pytest.fixture(scope="module")
def published(server: RcdsServer) -> str:
    return publish(server, FILES)


# --- the file ------------------------------------------------------------------------------------


def test_the_server_offers_the_file_it_builds_from_its_own_modules(
    server: RcdsServer, job_client: Path
) -> None:
    r = httpx.get(f"{server.url}/pubapi/client")
    assert r.headers["Content-Type"].startswith("text/x-python")
    assert r.content == job_client.read_bytes() == bundle.build()  # stable: the same bytes every time
    again = httpx.get(f"{server.url}/pubapi/client", headers={"If-None-Match": r.headers["ETag"]})
    assert again.status_code == 304 and not again.content
    # what it holds: the job side, none of the server or of publishing
    names = set(bundle.modules())
    assert {"rcds.client.wait", "rcds.client.get", "rcds.cvmfs.reader", "rcds.cvmfs.pkcs1"} <= names
    assert not names & {"rcds.client.publish", "rcds.client.tarball", "rcds.cvmfs.writer", "rcds.web.pubapi"}


def test_a_wrapper_fetches_it_with_curl_and_runs_it(
    server: RcdsServer, published: str, tmp_path: Path
) -> None:
    """The lines docs/client.md gives a job wrapper, run by bash in a clean environment."""
    if shutil.which("curl") is None:
        pytest.skip("no curl here")
    cfg = node_config(server, tmp_path)
    script = (
        f"curl -fsS {server.url}/pubapi/client -o rcds-job \\\n"
        f'  && "$PY" -S -I rcds-job wait "$CID" --timeout 60 --get "$TMPDIR/code" --env-file rcds.env \\\n'
        '  && . ./rcds.env && cd "$INPUT_TAR_DIR_LOCAL" && sh ./run.sh\n'
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "RCDS_CLIENT_CONFIG": str(cfg),
           "TMPDIR": str(tmp_path), "CID": published, "PY": OLDEST}  # fmt: skip
    p = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [str((tmp_path / "code").resolve()), "job"]


def test_rcds_build_job_client_writes_the_same_file(tmp_path: Path, job_client: Path) -> None:
    out = tmp_path / "rcds-job"
    p = subprocess.run(
        [sys.executable, "-m", "rcds.cli", "build-job-client", "-o", out], capture_output=True, check=False
    )
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == job_client.read_bytes()
    assert os.access(out, os.X_OK)
    p = subprocess.run([sys.executable, "-m", "rcds.cli", "build-job-client", "-o", "-"], capture_output=True)
    assert p.returncode == 0 and p.stdout == job_client.read_bytes(), p.stderr  # '-': to stdout


def test_its_modules_keep_the_python_39_floor() -> None:
    """Statically, with vermin (run under a real 3.9 by the tests below), and ruff lints them as 3.9."""
    paths = bundle.module_paths()
    p = subprocess.run(
        [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())",
         "--no-tips", "--violations", "-t=3.9-", "--eval-annotations", *map(str, paths)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    # pyproject's per-file ruff target is the bundle's module list, so ruff checks them as 3.9 code
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["per-file-target-version"]
    declared: set[Path] = set()
    for pattern, version in table.items():
        assert version == "py39"
        m = re.fullmatch(r"(.*)\{(.*)\}(.*)", pattern)
        names = [m.group(1) + n + m.group(3) for n in m.group(2).split(",")] if m else [pattern]
        declared.update(ROOT / n for n in names)
    assert declared == set(paths)
    p = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *map(str, paths)],
                       cwd=ROOT, capture_output=True, text=True, check=False)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr  # invalid-syntax for 3.10+ syntax, no UP017/B905
    # What neither sees: ``X | Y`` of types evaluated at run time (3.10+).
    for path in paths:
        lines = _runtime_unions(ast.parse(path.read_text(), str(path)))
        assert not lines, f"{path}: lines {lines}: X | Y of types needs Python 3.10"


def test_its_modules_import_nothing_outside_the_standard_library_unguarded() -> None:
    """Third-party imports only under ``try: ... except ImportError`` (a fallback follows) or
    ``if TYPE_CHECKING``, so no code path of the job client can need a package pip installed."""
    for path in bundle.module_paths():
        unguarded = []
        for node, guarded in _imports_with_guard(ast.parse(path.read_text(), str(path)).body, False):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.level:
                continue  # rcds's own
            roots = {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"rcds"}
            if roots and not guarded:
                unguarded.append((node.lineno, sorted(roots)))
        assert not unguarded, f"{path}: {unguarded}"


def _imports_with_guard(
    body: list[ast.stmt], guarded: bool
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement in ``body`` (at any depth), and whether an ImportError guard or
    ``if TYPE_CHECKING`` encloses it."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, guarded
        elif isinstance(node, ast.Try):
            catches = any(h.type is not None and "ImportError" in ast.unparse(h.type) for h in node.handlers)
            yield from _imports_with_guard(node.body, guarded or catches)
            for handler in node.handlers:
                yield from _imports_with_guard(handler.body, guarded)
            yield from _imports_with_guard(node.orelse, guarded)
            yield from _imports_with_guard(node.finalbody, guarded)
        elif isinstance(node, ast.If):
            checking = ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
            yield from _imports_with_guard(node.body, guarded or checking)
            yield from _imports_with_guard(node.orelse, guarded)
        else:
            for field in ("body", "orelse", "finalbody"):
                inner = getattr(node, field, None)
                if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                    yield from _imports_with_guard(inner, guarded)


def _runtime_unions(tree: ast.Module) -> list[int]:
    """Lines with ``A | B`` in isinstance()/issubclass(), or in a module-level alias of a generic or None
    (``Key = tuple[str, int] | None``); flags ORed together (``A | B`` of names) are left alone."""
    found: list[int] = []
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass")
        ):
            continue
        if any(isinstance(a, ast.BinOp) and isinstance(a.op, ast.BitOr) for a in node.args[1:]):
            found.append(node.lineno)
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and _type_union(statement.value):
            found.append(statement.lineno)
    return found


def _type_union(expr: ast.expr) -> bool:
    if not (isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.BitOr)):
        return False
    sides = (expr.left, expr.right)
    return any(
        isinstance(x, ast.Subscript) or (isinstance(x, ast.Constant) and x.value is None) for x in sides
    ) or any(_type_union(x) for x in sides)


@pytest.mark.parametrize("python", PYTHONS)
def test_the_clean_process_reaches_nothing_pip_installed(python: str, tmp_path: Path) -> None:
    """What the tests below rely on: in ``python -S -I`` the fallbacks are what runs."""
    for module in ("httpx", "httptools", "cryptography", "click", "tqdm", "zstandard"):
        p = subprocess.run([python, "-S", "-I", "-c", f"import {module}"], capture_output=True, check=False)
        assert p.returncode == 1, module


def test_usage_errors_and_help(job_client: Path, tmp_path: Path, server: RcdsServer) -> None:
    cfg = node_config(server, tmp_path)
    p = job(OLDEST, job_client, "wait", home=tmp_path, cfg=cfg)
    assert p.returncode == 2 and "usage:" in p.stderr
    p = job(OLDEST, job_client, "get", "x/y", tmp_path / "d", "--jobs", "0", home=tmp_path, cfg=cfg)
    assert p.returncode == 2
    p = job(OLDEST, job_client, "wait", "--help", home=tmp_path, cfg=cfg)
    assert p.returncode == 0 and "--env-file" in p.stdout
    p = job(OLDEST, job_client, "wait", "bad cid", home=tmp_path, cfg=cfg)
    assert p.returncode == 1
    assert p.stderr == rcds("wait", "bad cid", env=installed_env(cfg, tmp_path / "i")).stderr


def test_servers_down_are_reported_as_rcds_reports_them(job_client: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    cfg = home / "client.toml"
    cfg.write_text(f'servers = ["{dead_server()}", "{dead_server()}"]\nretries = 1\n')
    mine, theirs = side_by_side(
        lambda: job(OLDEST, job_client, "wait", "x/y", "--timeout", "5", home=home, cfg=cfg),
        lambda: rcds("wait", "x/y", "--timeout", "5", env=client_env(tmp_path / "i", cfg.read_text())),
    )
    # Both keep trying for the whole --timeout (a job may start while its server restarts): exit 3.
    assert mine.returncode == theirs.returncode == 3
    assert "ConnectError: [Errno 111] Connection refused" in mine.stderr
    # servers in random order
    assert sorted(_verdict(mine.stderr)) == sorted(_verdict(theirs.stderr))


# --- wait and get over HTTP ----------------------------------------------------------------------


@pytest.mark.parametrize("python", PYTHONS)
def test_wait_and_get_over_http_like_rcds(
    python: str, job_client: Path, server: RcdsServer, published: str, tmp_path: Path
) -> None:
    cid = published
    home = tmp_path / "home"
    cfg = node_config(server, home)
    cache = tmp_path / "node-cache"
    copy, link, env_file = tmp_path / "scratch" / "code", tmp_path / "input" / "code", tmp_path / "rcds.env"
    doc = job_json(
        python, job_client, "wait", cid, "--mode", "http", "--get", copy, "--cache", cache,
        "--link", link, "--env-file", env_file, "--timeout", "60", home=home, cfg=cfg,
    )  # fmt: skip
    assert doc["cid"] == cid and doc["directory"] == str(copy.resolve())
    assert doc["env"]["INPUT_TAR_DIR_LOCAL"] == str(copy.resolve())
    assert link.resolve() == copy.resolve()
    assert f"export RCDS_DIR={copy.resolve()}\n" in env_file.read_text()
    assert f"export RCDS_CID={cid}\n" in env_file.read_text()
    for name, data in FILES.items():
        assert (copy / name).read_bytes() == (data.encode() if isinstance(data, str) else data)
    assert os.stat(copy / "run.sh").st_mode & 0o777 == 0o755

    # get, from the cache the wait filled; the same result as the installed rcds get
    got = job_json(python, job_client, "get", cid, tmp_path / "job2", "--cache", cache, home=home, cfg=cfg)
    assert got["downloaded_bytes"] == 0 and got["files"] == got["linked_files"] > 0
    p = rcds(
        "get", cid, tmp_path / "job3", "--cache", cache, "--json", env=installed_env(cfg, tmp_path / "i")
    )
    assert p.returncode == 0, p.stderr
    theirs = json.loads(p.stdout)
    assert theirs["downloaded_bytes"] == 0  # the installed rcds reuses the job client's node cache
    assert tree(tmp_path / "job2") == tree(tmp_path / "job3") == tree(copy)
    figures = ("cid", "repository", "path", "files", "bytes", "linked_files", "downloaded_bytes")
    assert {k: got[k] for k in figures} == {k: theirs[k] for k in figures}
    assert got.keys() == theirs.keys()

    # and the other way: a cache filled by rcds get serves the job client
    other = tmp_path / "other-cache"
    p = rcds("get", cid, tmp_path / "job4", "--cache", other, env=installed_env(cfg, tmp_path / "i"))
    assert p.returncode == 0, p.stderr
    again = job_json(python, job_client, "get", cid, tmp_path / "job5", "--cache", other, home=home, cfg=cfg)
    assert again["downloaded_bytes"] == 0 and tree(tmp_path / "job5") == tree(copy)

    # plain output: the directory, as rcds wait prints it
    p = job(python, job_client, "wait", cid, "--mode", "http", "--timeout", "30", home=home, cfg=cfg)
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"/cvmfs/{doc['repository']}/sw/{cid}\n"


def test_wait_through_a_mount_writes_the_same_link_and_variables_as_rcds(
    job_client: Path, server: RcdsServer, tmp_path: Path
) -> None:
    mount = tmp_path / "cvmfs"
    for repo in REPOS:
        (mount / repo / "sw").mkdir(parents=True)
    cid = "mount/abc"
    target = mount / REPOS[1] / "sw" / cid
    home = tmp_path / "home"
    cfg = node_config(server, home, f'mount_root = "{mount}"\n')
    waiting = subprocess.Popen(
        [OLDEST, "-S", "-I", str(job_client), "wait", cid, "--timeout", "30", "--max-interval", "0.5",
         "--link", tmp_path / "mine" / "code", "--env-file", tmp_path / "mine.env"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=home,
        env={"PATH": "/usr/bin:/bin", "HOME": str(home), "RCDS_CLIENT_CONFIG": str(cfg)},
    )  # fmt: skip
    time.sleep(1.5)  # as the CVMFS client shows a new revision after its TTL
    target.mkdir(parents=True)
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    args = ("wait", cid, "--link", tmp_path / "theirs" / "code", "--env-file", tmp_path / "theirs.env")
    p = rcds(*args, env=installed_env(cfg, tmp_path / "i"))
    assert p.returncode == 0, p.stderr
    assert out == p.stdout == f"{target}\n"
    assert (tmp_path / "mine" / "code").resolve() == (tmp_path / "theirs" / "code").resolve() == target
    assert (tmp_path / "mine.env").read_text() == (tmp_path / "theirs.env").read_text()
    assert f"export INPUT_TAR_DIR_LOCAL={target}\n" in (tmp_path / "mine.env").read_text()


def test_a_tampered_object_is_refused_as_rcds_get_refuses_it(
    job_client: Path, server: RcdsServer, tmp_path: Path
) -> None:
    secret = os.urandom(200_000)
    cid = publish(server, {"data.bin": secret, "note.txt": "n\n"}, group="tamper")
    obj = next(
        p
        for r in REPOS
        for p in (server.storage(r) / "data").glob("*/*")
        if p.is_file() and _inflates_to(p, secret)
    )
    original = obj.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    obj.write_bytes(bytes(damaged))
    try:
        home = tmp_path / "home"
        cfg = node_config(server, home)
        dest = tmp_path / "dest"
        mine = job(OLDEST, job_client, "get", cid, dest, "--cache", tmp_path / "c1", home=home, cfg=cfg)
        theirs = rcds("get", cid, dest, "--cache", tmp_path / "c2", env=installed_env(cfg, tmp_path / "i"))
    finally:
        obj.write_bytes(original)
    assert mine.returncode == theirs.returncode == 1
    assert f"{obj.name} of data.bin is corrupt" in mine.stderr
    assert mine.stderr == theirs.stderr
    assert not dest.exists()


def _inflates_to(path: Path, data: bytes) -> bool:
    try:
        return zlib.decompress(path.read_bytes()) == data
    except zlib.error:
        return False


def test_a_bad_master_key_is_refused(
    job_client: Path, server: RcdsServer, published: str, tmp_path: Path
) -> None:
    """The signatures are checked: with another repository's key, nothing verifies."""
    home = tmp_path / "home"
    wrong = tmp_path / "keys"
    wrong.mkdir()
    for r in REPOS:  # each repository's name, with the other one's key
        other = next(x for x in REPOS if x != r)
        shutil.copy(server.storage(other) / ".rcds" / "keys" / f"{other}.pub", wrong / f"{r}.pub")
    cfg = node_config(server, home)
    cfg.write_text(cfg.read_text().split("keys = [")[0] + f'keys = "{wrong}"\n')
    mine = job(OLDEST, job_client, "get", published, tmp_path / "d", home=home, cfg=cfg)
    theirs = rcds("get", published, tmp_path / "d", env=installed_env(cfg, tmp_path / "i"))
    assert mine.returncode == theirs.returncode == 1
    assert "whitelist signature does not verify" in mine.stderr
    assert mine.stderr == theirs.stderr


def test_through_a_real_squid_with_the_first_proxy_down(
    job_client: Path, server: RcdsServer, published: str, tmp_path: Path
) -> None:
    require_squid()
    home = tmp_path / "home"
    with SquidProxy() as squid:
        cfg = node_config(server, home, f'proxies = "{dead_server()};{squid.url}"\nconnect_timeout = 2\n')
        doc = job_json(
            OLDEST,
            job_client,
            "get",
            published,
            tmp_path / "a",
            "--cache",
            tmp_path / "c",
            home=home,
            cfg=cfg,
        )
        assert doc["downloaded_bytes"] > 0
        urls = {e.url for e in squid.entries()}
    assert (tmp_path / "a" / "ana.py").read_text() == FILES["ana.py"]
    assert f"{server.url}/cvmfs/{doc['repository']}/.cvmfspublished" in urls  # absolute-form, via squid


def test_touch_refreshes_the_last_use_time_through_the_publish_api(
    job_client: Path, server: RcdsServer, tmp_path: Path
) -> None:
    cid = publish(server, {"t.txt": "touched\n"}, group="touch")
    before = server.status(cid).get("last_used")
    time.sleep(1.1)  # last_used has whole seconds
    home = tmp_path / "home"
    p = job(OLDEST, job_client, "wait", cid, "--mode", "http", "--touch", "--timeout", "10", "-v",
            home=home, cfg=node_config(server, home))  # fmt: skip
    assert p.returncode == 0 and "--touch failed" not in p.stderr, p.stderr
    deadline = time.monotonic() + 10
    while server.status(cid).get("last_used") == before:
        assert time.monotonic() < deadline, "last_used never changed"
        time.sleep(0.1)


class GridServer:
    """A server on HTTPS (and HTTP) with a grid CA directory, and a user's X.509 proxy it maps."""

    def __init__(self, d: Path) -> None:
        ca = make_ca()
        self.ca_dir = write_ca_dir(d / "certificates", [ca])
        host_cert, host_key = make_host_cert(ca).write(d, "host")
        alice = make_user_cert(ca, "Alice Smith", uid="alice")
        self.proxy_file = make_proxy(alice).write_proxy_file(d / "x509up_u_alice")
        gridmap = d / "grid-mapfile"
        gridmap.write_text(f'"{alice.dn}" alice\n')
        port = free_port()
        (d / "srv").mkdir()
        self.srv = RcdsServer(
            d / "srv",
            server_config=f'https = ["127.0.0.1:{port}"]\ntls_cert = "{host_cert}"\ntls_key = "{host_key}"\n'
            f'ca_path = "{self.ca_dir}"\n',
            extra_config=f'[auth]\nallow_localhost = false\ngridmapfile = "{gridmap}"\n',
        ).start()
        self.https = f"https://127.0.0.1:{port}"
        self.env = {"X509_USER_PROXY": str(self.proxy_file), "X509_CERT_DIR": str(self.ca_dir)}

    def tls(self) -> ssl.SSLContext:
        tls = ssl.create_default_context(capath=str(self.ca_dir))
        tls.load_cert_chain(self.proxy_file)
        return tls


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GridServer]:
    g = GridServer(tmp_path_factory.mktemp("grid"))
    yield g
    g.srv.close()


def test_over_https_with_an_x509_proxy_and_the_grid_ca_directory(
    job_client: Path, grid: GridServer, tmp_path: Path
) -> None:
    """The publish API over HTTPS (``config``, ``update`` for --touch) with a client certificate."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "job.py").write_text("print('x509')\n")
    env = client_env(tmp_path / "pub", f'servers = ["{grid.https}"]\ngroup = "alice"\n', **grid.env)
    p = rcds("publish", code, "--wait", "--json", env=env)
    assert p.returncode == 0, p.stderr
    cid = json.loads(p.stdout)["cid"]
    tls = grid.tls()

    def last_used() -> object:
        return (
            httpx.get(f"{grid.https}/pubapi/status", params={"cid": cid}, verify=tls).json().get("last_used")
        )

    before = last_used()
    time.sleep(1.1)  # last_used has whole seconds
    home = tmp_path / "home"
    cfg = node_config(grid.srv, home, f'stratum_urls = ["{grid.srv.url}/cvmfs/@fqrn@"]\n')
    cfg.write_text(cfg.read_text().replace(f'servers = ["{grid.srv.url}"]', f'servers = ["{grid.https}"]'))
    args = ("wait", cid, "--mode", "http", "--touch", "--get", tmp_path / "got", "--timeout", "30")
    p = job(OLDEST, job_client, *args, home=home, cfg=cfg, extra=grid.env)
    assert p.returncode == 0 and "--touch failed" not in p.stderr, p.stderr
    assert (tmp_path / "got" / "job.py").read_text() == "print('x509')\n"
    deadline = time.monotonic() + 10
    while last_used() == before:
        assert time.monotonic() < deadline, "last_used never changed"
        time.sleep(0.1)
    # a server certificate from a CA this node does not trust: refused, as rcds refuses it
    other = {**grid.env, "X509_CERT_DIR": str(write_ca_dir(tmp_path / "other", [make_ca("Someone Else")]))}
    untrusted = ("wait", cid, "--mode", "http", "--timeout", "5")
    mine, theirs = side_by_side(
        lambda: job(OLDEST, job_client, *untrusted, home=home, cfg=cfg, extra=other),
        lambda: rcds(*untrusted, env=client_env(tmp_path / "i", cfg.read_text(), **other)),
    )
    assert mine.returncode == theirs.returncode == 3  # kept trying for --timeout, then says why
    assert "CERTIFICATE_VERIFY_FAILED" in mine.stderr and "X509_CERT_DIR" in mine.stderr
    assert _verdict(_no_ssl_line(mine.stderr)) == _verdict(
        _no_ssl_line(theirs.stderr)
    )  # (_ssl.c:1129) in 3.9


def test_stdhttp_tunnels_https_through_a_proxy(grid: GridServer) -> None:
    """HTTPS through a site's squid: one CONNECT tunnel (a proxy URL with credentials), kept alive."""
    require_squid()
    with SquidProxy() as squid:
        http = StdlibHttp(5, 5, "rcds-test", grid.tls())
        proxy = squid.url.replace("http://", "http://user:pw@")
        try:
            with http.request("GET", f"{grid.https}/pubapi/config", proxy=proxy) as r:
                assert r.status == 200 and r.read().startswith(b"repos:")
            with http.request("GET", f"{grid.https}/pubapi/ping", proxy=proxy) as r:  # the same tunnel
                assert r.status == 200
        finally:
            http.close()
        deadline = time.monotonic() + 10  # squid logs a tunnel when it closes
        while not (connects := [e for e in squid.entries() if e.method == "CONNECT"]):
            assert time.monotonic() < deadline, "no CONNECT in squid's log"
            time.sleep(0.1)
    assert len(connects) == 1 and connects[0].url.endswith(grid.https.rsplit(":", 1)[1])


def test_an_unreadable_master_key_is_an_error_not_a_crash(
    job_client: Path, server: RcdsServer, published: str, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    cfg = node_config(server, home)
    bad = tmp_path / "bad.pub"
    bad.write_bytes(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    args = ("get", published, tmp_path / "d", "--keys", bad)
    mine = job(OLDEST, job_client, *args, home=home, cfg=cfg)
    theirs = rcds(*args, env=installed_env(cfg, tmp_path / "i"))
    assert mine.returncode == theirs.returncode == 1
    for p in (mine, theirs):  # the reason in the key's text differs: cryptography's words, or pkcs1's
        assert (
            p.stderr.startswith("rcds: error: cannot use the master public key of ") and str(bad) in p.stderr
        )
        assert "Traceback" not in p.stderr


# --- failures while waiting ----------------------------------------------------------------------


def test_a_rejected_upload_is_reported_with_its_reason(
    job_client: Path, server: RcdsServer, tmp_path: Path
) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../x")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    cid = f"bad/{hashlib.sha256(buf.getvalue()).hexdigest()}"
    assert server.publish(cid, buf.getvalue()).text == "OK\n"
    reason = server.wait_state(cid)["reason"]
    assert ".." in reason
    home = tmp_path / "home"
    cfg = node_config(server, home)
    args = ("wait", cid, "--mode", "http", "--timeout", "4", "--max-interval", "1")
    mine = job(OLDEST, job_client, *args, home=home, cfg=cfg)
    theirs = rcds(*args, env=installed_env(cfg, tmp_path / "i"))
    assert mine.returncode == theirs.returncode
    assert _no_timing(mine.stderr) == _no_timing(theirs.stderr)
    assert mine.returncode == 5 and reason in mine.stderr


def _no_ssl_line(text: str) -> str:
    return re.sub(r"_ssl\.c:\d+", "_ssl.c:N", text)


def _verdict(text: str) -> list[str]:
    """What a command finally says, without its timestamped log lines (their number varies with timing)."""
    return [line for line in _no_timing(text).splitlines() if not re.match(r"\d{4}-\d\d-\d\d \d\d:", line)]


def _no_timing(text: str) -> str:
    return re.sub(r"\d+(\.\d+)? s\b", "N s", text)


def test_a_server_restart_during_wait_still_ends_in_success(job_client: Path, tmp_path: Path) -> None:
    (tmp_path / "srv").mkdir()
    srv = RcdsServer(tmp_path / "srv").start()
    try:
        home = tmp_path / "home"
        cfg = node_config(srv, home)
        data = make_tarball({"hello.txt": "hello\n"})
        cid = f"restart/{hashlib.sha256(data).hexdigest()}"
        dest = tmp_path / "code"
        waiting = subprocess.Popen(
            [OLDEST, "-S", "-I", str(job_client), "wait", cid, "--mode", "http", "--get", dest,
             "--timeout", "90", "--max-interval", "1", "--json", "-v"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=home,
            env={"PATH": "/usr/bin:/bin", "HOME": str(home), "RCDS_CLIENT_CONFIG": str(cfg)},
        )  # fmt: skip
        try:
            time.sleep(2)  # it has asked `config` and looked at least once
            assert waiting.poll() is None
            srv.stop(signal.SIGTERM)
            time.sleep(3)  # looks that find nothing listening
            srv.start()  # the same port, configuration and keys
            assert srv.publish(cid, data).text == "OK\n"
            out, err = waiting.communicate(timeout=60)
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.wait()
        assert waiting.returncode == 0, err
        assert "Connection refused" in err or "ConnectionRefusedError" in err  # it did look while down
        doc = json.loads(out)
        assert doc["cid"] == cid and (dest / "hello.txt").read_text() == "hello\n"
    finally:
        srv.close()


# --- the standard library stand-ins, against the real thing ---------------------------------------


def test_pkcs1_reads_the_keys_and_certificates_as_cryptography_does(server: RcdsServer) -> None:
    for r in REPOS:
        keys = server.storage(r) / ".rcds" / "keys"
        pem = (keys / f"{r}.pub").read_bytes()
        theirs = serialization.load_pem_public_key(pem)
        assert isinstance(theirs, rsa.RSAPublicKey)
        mine = pkcs1.load_public_key(pem)
        assert (mine.n, mine.e) == (theirs.public_numbers().n, theirs.public_numbers().e)
        cert_pem = (keys / f"{r}.crt").read_bytes()
        cert = x509.load_pem_x509_certificate(cert_pem)
        cert_key = cert.public_key()
        assert isinstance(cert_key, rsa.RSAPublicKey)
        mine = pkcs1.load_public_key(cert_pem)
        assert mine == pkcs1.certificate_public_key(pkcs1.certificate_der(cert_pem))
        assert (mine.n, mine.e) == (cert_key.public_numbers().n, cert_key.public_numbers().e)
        # the DER is what the whitelist fingerprint hashes
        assert pkcs1.certificate_der(cert_pem) == cert.public_bytes(serialization.Encoding.DER)
        rsa_pkcs1 = theirs.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
        assert pkcs1.load_public_key(rsa_pkcs1) == pkcs1.load_public_key(pem)  # BEGIN RSA PUBLIC KEY
        der = base64_body(pem)
        for broken in (der[:-1], der + b"\0", der[:10]):
            with pytest.raises(ValueError):
                pkcs1.load_public_key(pem_of("PUBLIC KEY", broken))
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(pkcs1.NotRsaKey):
        pkcs1.load_public_key(ec_pem)
    with pytest.raises(ValueError, match="no PEM block"):
        pkcs1.load_public_key(b"not a key")
    for text in (b"MIIB*IjAN", b"QUJDRA=", b"QU=JD"):  # a stray character, short or misplaced padding
        with pytest.raises(ValueError, match="bad base64 in the PUBLIC KEY block"):
            pkcs1.load_public_key(b"-----BEGIN PUBLIC KEY-----\n" + text + b"\n-----END PUBLIC KEY-----\n")


def base64_body(pem: bytes) -> bytes:
    import base64

    return base64.b64decode(b"".join(pem.strip().splitlines()[1:-1]))


def pem_of(label: str, der: bytes) -> bytes:
    import base64

    return (
        f"-----BEGIN {label}-----\n".encode() + base64.encodebytes(der) + f"-----END {label}-----\n".encode()
    )


@pytest.mark.parametrize(
    "text",
    [
        "servers = [\"https://a.example.org\", 'http://b:8080']  # two\nretries = 3\nread_timeout = 1.5\n",
        'keys = [\n  "/etc/cvmfs/keys",  # comment\n  "/x y",\n]\ngroup = "d\\u00e9\\t"\n',
        "[table]\na.b = -1_000\nflag = false\n\n# end\n",
        "x = 1e3\ny = +2\nz = 0.25\n",
    ],
)
def test_minitoml_reads_a_client_configuration_as_tomllib_does(text: str) -> None:
    assert minitoml.loads(text) == tomllib.loads(text)


@pytest.mark.parametrize(
    "text",
    ["a = \n", 'a = "x\n', "a = 1 2\n", "a = 1\na = 2\n", "d = 1979-05-27\n", 'm = """x"""\n', "[[t]]\n"],
)
def test_minitoml_reports_what_it_cannot_read(text: str) -> None:
    with pytest.raises(minitoml.TOMLDecodeError):
        minitoml.loads(text)
