"""What a new user meets in the first hour (issue 18): each rough edge, against real processes.

Real ``rcds serve`` processes, real tarballs, real HTTP(S); terminal behaviour through a real pty.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import termios
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from client import client_env, rcds
from rcds.cli import SERVER_EXTRA_MODULES, main
from rcds.client.tarball import DEFAULT_EXCLUDES, write_tar
from server import RcdsServer, free_port, make_tarball

ROOT = Path(__file__).resolve().parent.parent
# Distribution names of the `server` extra -> the module each is imported as.
SERVER_DISTRIBUTIONS = {
    "aiohttp": "aiohttp",
    "numpy": "numpy",
    "pyjwt": "jwt",
    "prometheus-client": "prometheus_client",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcdsServer]:
    srv = RcdsServer(tmp_path_factory.mktemp("srv")).start()
    yield srv
    srv.close()


def reading_env(server: RcdsServer, home: Path, extra: str = "", **env: str) -> dict[str, str]:
    """A client of ``server`` that finds the keys in its data directory (what the banner tells users)."""
    return client_env(home, f'servers = ["{server.url}"]\nkeys = ["{server.root / "data"}"]\n{extra}', **env)


def code_dir(root: Path, files: dict[str, str] | None = None) -> Path:
    for name, text in (files or {"run.py": "print('hello')\n"}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def one_line(stderr: str) -> str:
    """The single line of an error, asserting it is one line and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# --- the command line itself ---------------------------------------------------------------------


def _commands(command: click.Command, ctx: click.Context) -> Iterator[tuple[str, click.Command]]:
    yield ctx.command_path, command
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None, name
            yield from _commands(sub, click.Context(sub, parent=ctx, info_name=name))


def test_every_option_of_every_command_has_help_text() -> None:
    missing = [
        f"{path} {'/'.join(p.opts)}"
        for path, command in _commands(main, click.Context(main, info_name="rcds"))
        for p in command.params
        if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()
    ]
    assert missing == []
    assert len(list(_commands(main, click.Context(main, info_name="rcds")))) > 15  # the walk saw them all


def test_dash_h_is_help_for_every_command(tmp_path: Path) -> None:
    env = client_env(tmp_path / "home")
    for args in (["-h"], ["wait", "-h"], ["publish", "-h"], ["repo", "ls", "-h"], ["serve", "-h"]):
        p = rcds(*args, env=env)
        assert p.returncode == 0, (args, p.stderr)
        assert p.stdout.startswith("Usage: "), args
    assert "--keys" in rcds("get", "-h", env=env).stdout


def test_the_server_extra_in_pyproject_is_what_the_cli_treats_as_server_only() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {req.split("[")[0].split(">")[0].split("=")[0].strip().lower() for req in extras["server"]}
    assert names == set(SERVER_DISTRIBUTIONS)
    assert set(SERVER_DISTRIBUTIONS.values()) == SERVER_EXTRA_MODULES
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not {req.split(">")[0].split("[")[0].lower() for req in base} & set(SERVER_DISTRIBUTIONS)


# Runs the rcds command in an interpreter where the server extra's modules cannot be imported, as
# after `pip install rcds` without `[server]`.
_WITHOUT_SERVER_EXTRA = """
import importlib.abc, sys
blocked = set(sys.argv[1].split(","))
class Uninstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Uninstalled())
sys.argv = ["rcds", *sys.argv[2:]]
from rcds.cli import main
main()
"""


def rcds_without_server_extra(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    blocked = ",".join(sorted(SERVER_EXTRA_MODULES))
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_SERVER_EXTRA, blocked, *map(str, args)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_without_the_server_extra_the_client_works_and_server_commands_say_what_to_install(
    server: RcdsServer, tmp_path: Path
) -> None:
    env = reading_env(server, tmp_path / "home", 'group = "light"\n')
    for args in (
        ["serve"],
        ["repo", "ls", "http://x/cvmfs/y"],
        ["gc", "--dry-run"],
    ):
        p = rcds_without_server_extra(*args, env=env)
        assert p.returncode == 1, (args, p.stderr)
        line = one_line(p.stderr)
        assert line.startswith(f"rcds {args[0]}: this command needs the server dependencies"), line
        assert "pip install 'rcds[server]'" in line
    # a snapshot needs only the client's dependencies (it imports neither the writer nor numpy)
    p = rcds_without_server_extra("replicate", "http://x", env=env)
    assert p.returncode == 2 and "Missing option '--storage'" in p.stderr, p.stderr
    listing = rcds_without_server_extra("-h", env=env)
    assert listing.returncode == 0 and "serve" in listing.stdout and "rcds[server]" in listing.stdout
    # The client commands do their whole job: publish, wait over HTTP, get with verified signatures.
    code = code_dir(tmp_path / "code")
    p = rcds_without_server_extra("publish", code, "--wait", env=env)
    assert p.returncode == 0, p.stderr
    cid, path = p.stdout.split()
    p = rcds_without_server_extra("wait", cid, "--timeout", "60", env=env)
    assert (p.returncode, p.stdout.strip()) == (0, path), p.stderr
    p = rcds_without_server_extra("get", cid, tmp_path / "copy", env=env)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "copy" / "run.py").read_text() == "print('hello')\n"


# --- rcds serve ----------------------------------------------------------------------------------


def test_a_port_in_use_is_one_line_and_nothing_is_created(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        p = subprocess.run(
            [sys.executable, "-m", "rcds.cli", "serve", "--data-dir", tmp_path / "d", "--port", str(port)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert p.returncode == 1
    assert one_line(p.stderr) == f"rcds serve: cannot listen on 127.0.0.1:{port}: address already in use"
    assert not (tmp_path / "d").exists()  # failed before creating repositories


# --- server URLs and TLS -------------------------------------------------------------------------


def test_server_url_mistakes_are_explained(server: RcdsServer, tmp_path: Path) -> None:
    env = client_env(tmp_path / "home", "retries = 2\n")
    code = code_dir(tmp_path / "code")
    host_port = server.url.removeprefix("http://")
    p = rcds("publish", code, "--server", f"ftp://{host_port}", env=env)
    assert p.returncode == 1
    assert "the scheme must be http:// or https://" in one_line(p.stderr)
    p = rcds("publish", code, "--server", f"{server.url}/pubapi", env=env)
    assert p.returncode == 1
    assert f"give the base URL without /pubapi ({server.url})" in one_line(p.stderr)
    p = rcds("publish", code, "--server", f"{server.url}/rcds", env=env)
    assert p.returncode == 5
    assert "HTTP 404" in p.stderr and "the server's base URL, scheme://host:port with no path?" in p.stderr
    # A bare host:port means https; against a plain HTTP server the error says what to write instead.
    p = rcds("publish", code, "--server", host_port, env=env)
    assert p.returncode == 4
    assert f"does not speak HTTPS here (plain HTTP? use {server.url})" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 2  # the same answer in each round is said once


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RcdsServer, str, Path]]:
    from pki import make_ca, make_host_cert, write_ca_dir

    d = tmp_path_factory.mktemp("pki")
    ca = make_ca()
    ca_dir = write_ca_dir(d / "certificates", [ca])
    cert, key = make_host_cert(ca).write(d, "host")
    port = free_port()
    srv = RcdsServer(
        tmp_path_factory.mktemp("tls"),
        server_config=f'https = ["127.0.0.1:{port}"]\ntls_cert = "{cert}"\ntls_key = "{key}"\n',
    ).start()
    yield srv, f"https://127.0.0.1:{port}", ca_dir
    srv.close()


def test_a_tls_failure_names_where_the_cas_were_looked_for(
    https_server: tuple[RcdsServer, str, Path], tmp_path: Path
) -> None:
    _, url, ca_dir = https_server
    code = code_dir(tmp_path / "code")
    env = client_env(tmp_path / "home", "retries = 1\n")
    if Path("/etc/grid-security/certificates").is_dir():
        pytest.skip("this machine has grid CAs, which the client would use instead of the system store")
    p = rcds("publish", code, "--server", url, env=env)
    assert p.returncode == 4
    assert "cannot verify the server's certificate" in p.stderr
    assert "CAs were looked for in the system trust store" in p.stderr and "set X509_CERT_DIR" in p.stderr
    empty = tmp_path / "other-cas"
    empty.mkdir()
    p = rcds("publish", code, "--server", url, env={**env, "X509_CERT_DIR": str(empty)})
    assert p.returncode == 4
    assert f"CAs were looked for in the CA directory {empty}" in p.stderr
    p = rcds("publish", code, "--server", url, env={**env, "X509_CERT_DIR": str(ca_dir)})
    assert p.returncode == 0, p.stderr  # the right CAs: it works


# --- terminals: Ctrl-C, progress lines -------------------------------------------------------------


def _on_pty(
    args: list[str], env: dict[str, str], stdout_too: bool = True
) -> tuple[subprocess.Popen[bytes], int]:
    """Run ``rcds args`` with its stderr (and stdin/stdout) on a new pty that is its controlling terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        # As an interactive shell starts a foreground job: Ctrl-C at its default. A test run started in
        # the background (`cmd &`, nohup) ignores SIGINT, and an ignored signal stays ignored across exec.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    proc = subprocess.Popen(
        [sys.executable, "-m", "rcds.cli", *args],
        stdin=slave, stdout=slave if stdout_too else subprocess.PIPE, stderr=slave, env=env,
        preexec_fn=controlling_terminal,
    )  # fmt: skip
    os.close(slave)
    return proc, master


def _drain(master: int, into: bytearray) -> threading.Thread:
    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every process holding the pty has exited
                return
            if not data:
                return
            into.extend(data)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_ctrl_c_on_a_terminal_exits_130_with_one_line(server: RcdsServer, tmp_path: Path) -> None:
    env = reading_env(server, tmp_path / "home")
    proc, master = _on_pty(["wait", "ctrlc/never", "--timeout", "600"], env)
    output = bytearray()
    reader = _drain(master, output)
    try:
        time.sleep(3)  # well into its waiting
        assert proc.poll() is None
        os.write(master, b"\x03")  # what the Ctrl-C key sends: the terminal signals the foreground group
        assert proc.wait(30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(5)
        os.close(master)
    text = output.decode(errors="replace").replace("\r", "")
    assert "Traceback" not in text and "Aborted" not in text
    assert text.strip().splitlines()[-1] == "rcds: interrupted"


def test_publish_shows_progress_while_hashing_and_compressing_on_a_terminal_only(
    server: RcdsServer, tmp_path: Path
) -> None:
    code = code_dir(tmp_path / "code", {f"f{i}.dat": os.urandom(1 << 16).hex() for i in range(8)})
    env = client_env(tmp_path / "home", f'servers = ["{server.url}"]\ngroup = "tty"\n')
    proc, master = _on_pty(["publish", str(code)], env, stdout_too=False)
    output = bytearray()
    reader = _drain(master, output)
    assert proc.stdout is not None
    stdout = proc.stdout.read().decode()
    assert proc.wait(60) == 0
    reader.join(5)
    os.close(master)
    text = output.decode(errors="replace")
    assert "hashing" in text and "compressing" in text and "upload" in text
    assert stdout.startswith("tty/")  # the CID on stdout, the progress lines only on the terminal
    # Not a terminal: no progress lines, only the outcome.
    code2 = code_dir(tmp_path / "code2", {"x.py": "pass\n"})
    p = rcds("publish", code2, env=env)
    assert p.returncode == 0, p.stderr
    assert "hashing" not in p.stderr and "compressing" not in p.stderr
    assert "did not wait for the publish to finish" in p.stderr


# --- publish: default excludes ----------------------------------------------------------------------


def test_bytecode_and_editor_debris_are_left_out_by_default(tmp_path: Path) -> None:
    clean = code_dir(tmp_path / "clean", {"ana/fit.py": "x = 1\n", "run.sh": "#!/bin/sh\n"})
    messy = code_dir(
        tmp_path / "messy",
        {
            "ana/fit.py": "x = 1\n",
            "run.sh": "#!/bin/sh\n",
            "ana/__pycache__/fit.cpython-311.pyc": "bytecode",
            "old.pyc": "bytecode",
            "run.sh~": "backup",
            ".run.sh.swp": "vim",
            ".git/HEAD": "ref",
            ".svn/entries": "svn",
            "core/keep.py": "kept: a directory called core is code",
        },
    )
    (clean / "core").mkdir()
    (clean / "core" / "keep.py").write_text("kept: a directory called core is code")
    os.chmod(clean / "run.sh", 0o644)
    env = client_env(tmp_path / "home", 'group = "ex"\n')
    clean_cid = rcds("publish", clean, "--dry-run", env=env).stdout.strip()
    messy_cid = rcds("publish", messy, "--dry-run", env=env).stdout.strip()
    assert clean_cid == messy_cid  # the debris changed nothing
    summary = write_tar(messy, None)
    assert sorted(summary.excluded) == sorted(
        [".git", ".svn", ".run.sh.swp", "ana/__pycache__", "old.pyc", "run.sh~"]
    )
    everything = rcds("publish", messy, "--dry-run", "--no-default-excludes", env=env).stdout.strip()
    assert everything != clean_cid
    assert write_tar(messy, None, ()).excluded == []
    for pattern in ("__pycache__", "*.pyc", ".git"):
        assert pattern in DEFAULT_EXCLUDES
        assert pattern in rcds("publish", "-h", env=env).stdout  # the help lists what is left out


# --- wait: keys, status, unreachable servers, jobsub's variables -----------------------------------


def bad_tarball() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escape.py")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    return buf.getvalue()


def test_a_rejected_upload_stops_the_wait_at_once_with_the_servers_reason(
    server: RcdsServer, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(bad_tarball())
    env = reading_env(server, tmp_path / "home", 'group = "rej"\n')
    p = rcds("publish", bad, env=env)  # without --wait: exit 0, and says that it did not wait
    assert p.returncode == 0, p.stderr
    assert "did not wait for the publish to finish" in p.stderr
    cid = p.stdout.strip()
    server.wait_state(cid, ("failed",))
    started = time.monotonic()
    p = rcds("wait", cid, "--timeout", "600", env=env)
    assert p.returncode == 5, p.stderr
    assert time.monotonic() - started < 30  # not the 600 s timeout
    line = one_line(p.stderr.replace("rcds: error: ", ""))
    assert f"{cid} will not appear: {server.url} could not publish it:" in line and ".." in line


def test_wait_finds_keys_in_the_servers_data_dir_and_a_missing_key_names_the_option(
    server: RcdsServer, tmp_path: Path
) -> None:
    cid = "keys/one"
    assert server.publish(cid, make_tarball({"a.py": "pass\n"})).text == "OK\n"
    path = server.wait_state(cid)["path"]
    env = client_env(tmp_path / "home")
    p = rcds("wait", cid, "--server", server.url, "--keys", server.root / "data", "--timeout", "30", env=env)
    assert (p.returncode, p.stdout.strip()) == (0, path), p.stderr
    p = rcds("wait", cid, "--server", server.url, "--timeout", "30", env=env)
    assert p.returncode == 1
    line = one_line(p.stderr)
    assert "no master public key for" in line and "pass --keys PATH" in line and "rcds serve" in line


def test_asking_status_needs_no_usable_credentials(server: RcdsServer, tmp_path: Path) -> None:
    """A job whose X.509 proxy variable is stale still waits (status is asked without credentials)."""
    assert server.publish("creds/stale", make_tarball({"c.py": "pass\n"})).text == "OK\n"
    path = server.wait_state("creds/stale")["path"]
    env = reading_env(server, tmp_path / "home", X509_USER_PROXY=str(tmp_path / "gone"))
    p = rcds("wait", "creds/stale", "--timeout", "30", env=env)
    assert (p.returncode, p.stdout.strip()) == (0, path), p.stderr


@pytest.mark.slow
def test_wait_keeps_trying_while_the_publish_server_is_down(tmp_path: Path) -> None:
    srv = RcdsServer(tmp_path)  # not started: its port refuses connections
    try:
        env = client_env(
            tmp_path / "home",
            f'servers = ["{srv.url}"]\nkeys = ["{srv.root / "data"}"]\nconnect_timeout = 2\n',
        )
        waiter = subprocess.Popen(
            [sys.executable, "-m", "rcds.cli", "wait", "late/cid", "--timeout", "120", "--max-interval", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        time.sleep(8)  # longer than the client's own retries (about 4 s)
        assert waiter.poll() is None, waiter.communicate()
        srv.start()
        assert srv.publish("late/cid", make_tarball({"b.py": "pass\n"})).text == "OK\n"
        out, err = waiter.communicate(timeout=90)
        assert waiter.returncode == 0, err
        assert out.strip() == srv.wait_state("late/cid")["path"]
    finally:
        srv.close()


@pytest.mark.slow
def test_a_server_that_stays_down_is_a_timeout_naming_it(tmp_path: Path) -> None:
    srv = RcdsServer(tmp_path)
    env = client_env(tmp_path / "home", f'servers = ["{srv.url}"]\nconnect_timeout = 1\n')
    started = time.monotonic()
    p = rcds("wait", "down/cid", "--timeout", "6", env=env)
    assert p.returncode == 3, p.stderr
    assert 6 <= time.monotonic() - started < 40
    assert "gave up after 6 s" in p.stderr and srv.url in p.stderr and "Traceback" not in p.stderr
    srv.close()


def test_the_env_file_has_jobsubs_variables_for_several_tarballs(server: RcdsServer, tmp_path: Path) -> None:
    for cid in ("env/first", "env/second"):
        assert server.publish(cid, make_tarball({f"{cid[4:]}.py": "pass\n"})).text == "OK\n"
        server.wait_state(cid)
    env = reading_env(server, tmp_path / "home")
    envfile = tmp_path / "job" / "rcds.env"
    envfile.parent.mkdir()
    first, second = tmp_path / "job" / "code1", tmp_path / "job" / "code2"
    p = rcds(
        "wait",
        "env/first",
        "--get",
        first,
        "--link",
        tmp_path / "job" / "mycode",
        "--env-file",
        envfile,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    p = rcds("wait", "env/second", "--get", second, "--index", "1", "--env-file", envfile, env=env)
    assert p.returncode == 0, p.stderr
    names = ["INPUT_TAR_DIR_LOCAL", "INPUT_TAR_FILE", "INPUT_TAR_DIR_LOCAL_1", "INPUT_TAR_FILE_1",
             "RCDS_CID", "RCDS_CID_1"]  # fmt: skip
    shown = subprocess.run(
        ["bash", "-c", f". {envfile} && " + " && ".join(f'echo "${n}"' for n in names)],
        capture_output=True, text=True, check=True,
    ).stdout.split("\n")  # fmt: skip
    assert shown[:6] == [
        str(first),
        f"{first}/mycode.tar",
        str(second),
        f"{second}/second.tar",
        "env/first",
        "env/second",
    ]
    # As in jobsub's scripts: the code is in the directory of INPUT_TAR_FILE.
    assert (Path(shown[1]).parent / "first.py").is_file() and (Path(shown[3]).parent / "second.py").is_file()
    assert os.readlink(tmp_path / "job" / "mycode") == str(first)


# --- README and CI -----------------------------------------------------------------------------------


def _blocks(markdown: str) -> list[str]:
    return markdown.split("```")[1::2]


def test_the_readme_opens_with_the_two_setup_commands_and_ci_runs_the_second() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = _blocks(readme)[0]
    assert readme.splitlines()[1:3] == ["", "```"]  # the README opens with it, right under the title
    commands = first_block.strip().splitlines()
    assert len(commands) == 2
    assert "venv" in commands[0] and "'.[server]'" in commands[0] and commands[0].endswith("rcds serve")
    assert "'.[server,test]'" in commands[1] and commands[1].endswith("-m pytest -q")
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci_lines[-1] == commands[1]


@pytest.mark.slow
def test_the_readme_examples_work_as_printed_against_the_embedded_default(tmp_path: Path) -> None:
    """The "one minute" block and the client block, run by bash against `rcds serve` (embedded default).

    Only the port changes (8080 may be taken here), and the script waits for the server to answer
    before going on, as the person pasting it does. ``rcds`` is this checkout's command.
    """
    if shutil.which("curl") is None:
        pytest.skip("the README's examples use curl")
    readme = (ROOT / "README.md").read_text()
    minute = next(b for b in _blocks(readme) if "sha256sum code.tgz" in b)
    client = next(b for b in _blocks(readme) if "rcds get" in b and "rcds publish ./mycode" in b)
    port = free_port()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "rcds").write_text(f'#!/bin/sh\nexec {sys.executable} -m rcds.cli "$@"\n')
    (bindir / "rcds").chmod(0o755)
    env = client_env(tmp_path / "home", PATH=f"{bindir}:{os.environ['PATH']}")
    work = tmp_path / "work"
    code_dir(work / "mycode", {"run.sh": "echo hello\n", "lib/util.py": "pass\n"})
    ready = f"until curl -sf http://127.0.0.1:{port}/pubapi/ping >/dev/null; do sleep 0.2; done"
    assert minute.strip().startswith("rcds serve &")
    script = minute.replace("8080", str(port)).replace(
        "rcds serve &", f"rcds serve --port {port} & SERVE=$!; {ready}", 1
    )
    p = subprocess.run(
        ["bash", "-c", f"set -e\n{script}\nkill $SERVE; wait $SERVE"],
        cwd=work, capture_output=True, text=True, env=env, timeout=180,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert "PRESENT:/cvmfs/user" in p.stdout and '"state": "published"' in p.stdout
    assert "run.sh" in p.stdout and "lib" in p.stdout  # rcds repo ls listed the tree, wherever it landed
    # The client block, against a server started as the README's first command starts it.
    serve = subprocess.Popen(
        [sys.executable, "-m", "rcds.cli", "serve", "--port", str(port)],
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    try:
        assert serve.stdout is not None
        banner = "".join(serve.stdout.readline() for _ in range(12))
        assert f"--keys {(work / 'rcds-data').resolve()}" in banner  # the banner's commands, complete
        p = subprocess.run(
            ["bash", "-c", "set -e\n" + client.replace("8080", str(port))],
            cwd=work, capture_output=True, text=True, env=env, timeout=180,
        )  # fmt: skip
        assert p.returncode == 0, p.stdout + p.stderr
        assert (work / "mycode-copy" / "run.sh").read_text() == "echo hello\n"
        assert (work / "mycode-job" / "lib" / "util.py").is_file()
        assert f"INPUT_TAR_DIR_LOCAL={work.resolve() / 'mycode-job'}" in (work / "rcds.env").read_text()
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
